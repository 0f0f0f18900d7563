//! Job files: YAML read with positions, `${VAR}` interpolation, and checks against the typed
//! configs of the registry, reporting *every* problem at once with file, line, column, key and
//! a hint.
//!
//! ```yaml
//! name: ingest
//! checkpoint: { interval_seconds: 5 }
//! sources:
//!   contributions: { type: kafka, brokers: "${KAFKA_BROKERS:-embedded}", topic: contributions.legal }
//! stages:
//!   decode: { type: decode_contributions, inputs: [contributions] }
//! sinks:
//!   legal: { type: datanet, inputs: [decode], datanet: legal }
//! ```

pub mod interpolate;
mod schema_check;

use std::fmt;

use marked_yaml::{LoaderOptions, Node};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::registry::{self, Built, Role};
pub use schema_check::{did_you_mean, SchemaChecker};

/// A position in a job file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn of(node: &Node) -> Pos {
        node.span()
            .start()
            .map(|m| Pos {
                line: m.line(),
                column: m.column(),
            })
            .unwrap_or_default()
    }

    pub fn of_key(key: &marked_yaml::types::MarkedScalarNode) -> Pos {
        key.span()
            .start()
            .map(|m| Pos {
                line: m.line(),
                column: m.column(),
            })
            .unwrap_or_default()
    }
}

/// One problem in a job file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: Pos,
    /// Dotted path of the offending key, e.g. `sources.contributions.topic`.
    pub key: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error",
            self.file, self.pos.line, self.pos.column
        )?;
        if !self.key.is_empty() {
            write!(f, " at `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Every problem found in a job file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        write!(
            f,
            "{} error{} found",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for Diagnostics {}

/// Checkpointing of every partition's pipeline.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// A checkpoint is taken at least this often, in seconds.
    #[serde(default = "default_interval_seconds")]
    pub interval_seconds: f64,
    /// ... and whenever a partition has read this many records since the last one.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// ... or this many bytes of record values (bounds memory per partition).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// ... and, over all the partitions one process holds, whenever their record bytes not yet
    /// checkpointed add up to this: the partitions holding the most are checkpointed until half
    /// of it is left. The same number bounds the Arrow memory of batches in flight from the
    /// source to the pipelines (the source waits), so memory per process is bounded whatever
    /// the number of partitions.
    #[serde(default = "default_max_total_bytes")]
    pub max_total_bytes: u64,
}

fn default_interval_seconds() -> f64 {
    5.0
}
fn default_max_rows() -> u64 {
    500_000
}
fn default_max_bytes() -> u64 {
    48 << 20
}
fn default_max_total_bytes() -> u64 {
    128 << 20
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval_seconds: default_interval_seconds(),
            max_rows: default_max_rows(),
            max_bytes: default_max_bytes(),
            max_total_bytes: default_max_total_bytes(),
        }
    }
}

/// Where the Prometheus endpoint listens while the job runs.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` of `/metrics`; empty or absent: no endpoint (the CLI's `--metrics` overrides).
    #[serde(default)]
    pub listen: Option<String>,
}

/// The top-level keys of a job file other than `sources`, `stages` and `sinks`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobHeader {
    /// The job's name: it names its checkpoints and its default consumer group.
    pub name: String,
    /// What the job does, for people.
    #[serde(default)]
    pub description: Option<String>,
    /// Store root (local directory, `file://` or `s3://`); the CLI's `--store` overrides it.
    #[serde(default)]
    pub store: Option<String>,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub signing: SigningConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub penalties: PenaltyPolicy,
    /// Reward epochs (`ledgerflow epoch run`).
    #[serde(default)]
    pub epochs: Option<crate::epoch::EpochConfig>,
}

/// The EIP-712 domain contributions are signed in: name `ledgerflow`, version `1`, and these.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// `chainId` of the domain (31337, anvil's, by default).
    #[serde(default = "default_chain_id")]
    pub chain_id: u64,
    /// `verifyingContract` of the domain, 0x-hex (the zero address by default).
    #[serde(default = "default_verifying_contract")]
    pub verifying_contract: String,
}

fn default_chain_id() -> u64 {
    31337
}
fn default_verifying_contract() -> String {
    format!("0x{}", "0".repeat(40))
}

impl Default for SigningConfig {
    fn default() -> Self {
        Self {
            chain_id: default_chain_id(),
            verifying_contract: default_verifying_contract(),
        }
    }
}

impl SigningConfig {
    pub fn domain(&self) -> Result<ledgerflow_schemas::contribution::SigningDomain, String> {
        let verifying_contract = ledgerflow_operators::signature::parse_address(
            &self.verifying_contract,
        )
        .map_err(|_| {
            format!(
                "verifying_contract {:?} is not a 0x-prefixed 20-byte address",
                self.verifying_contract
            )
        })?;
        Ok(ledgerflow_schemas::contribution::SigningDomain {
            chain_id: self.chain_id,
            verifying_contract,
        })
    }
}

/// Where stateful stages (`verify_signatures`, `dedup_exact`, `dedup_near`) keep their state.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Local directory of the state store; by default `<store>/_state/<job>` when the store is
    /// a local directory (required with an object store).
    #[serde(default)]
    pub dir: Option<String>,
    /// Page cache of the state store: the memory the state may use besides what is pending.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Pending changes are written to disk (not yet durably) when they pass this many bytes.
    /// Decisions go on while a write runs and new changes collect beside the ones being written,
    /// so the state may hold up to twice this in memory.
    #[serde(default = "default_pending_bytes")]
    pub max_pending_bytes: u64,
}

fn default_cache_bytes() -> u64 {
    64 << 20
}
fn default_pending_bytes() -> u64 {
    64 << 20
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: None,
            cache_bytes: default_cache_bytes(),
            max_pending_bytes: default_pending_bytes(),
        }
    }
}

/// Penalty points per refusal reason, charged to the (verified) contributor in the reward epoch
/// of the record's Kafka time. Reasons not listed cost nothing; `quality:*` covers every quality
/// rule. Refusals before the signature is verified never penalise anyone.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PenaltyPolicy {
    /// Length of a reward epoch in seconds (penalties are booked to `floor(time / epoch_seconds)`).
    #[serde(default = "default_epoch_seconds")]
    pub epoch_seconds: u64,
    #[serde(default = "default_points")]
    pub points: std::collections::BTreeMap<String, u32>,
}

fn default_epoch_seconds() -> u64 {
    86_400
}
fn default_points() -> std::collections::BTreeMap<String, u32> {
    [
        ("duplicate_exact", 1),
        ("duplicate_near", 1),
        ("duplicate_substring", 1),
        ("flood", 10),
        ("rate_limit", 2),
        ("quality:*", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Default for PenaltyPolicy {
    fn default() -> Self {
        Self {
            epoch_seconds: default_epoch_seconds(),
            points: default_points(),
        }
    }
}

impl PenaltyPolicy {
    /// Points for a refusal with `reason`.
    pub fn points_for(&self, reason: &str) -> u32 {
        if let Some(p) = self.points.get(reason) {
            return *p;
        }
        match reason.split_once(':') {
            Some((family, _)) => self
                .points
                .get(&format!("{family}:*"))
                .copied()
                .unwrap_or(0),
            None => 0,
        }
    }
}

/// A source, stage or sink of a job.
pub struct NodeSpec {
    pub name: String,
    pub role: Role,
    pub kind: String,
    pub inputs: Vec<(String, Pos)>,
    pub built: Built,
    pub pos: Pos,
}

/// A job file, read and checked.
pub struct JobSpec {
    pub file: String,
    pub header: JobHeader,
    pub nodes: Vec<NodeSpec>,
}

impl JobSpec {
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Every refusal reason a stage gives (besides `quality:<rule>`), and `duplicate_substring`,
/// the penalty the token index charges for repeating a long span of an earlier contribution.
pub const REASONS: &[&str] = &[
    "malformed",
    "schema",
    "oversized",
    "unknown_datanet",
    "bad_signature",
    "signer_mismatch",
    "expired",
    "not_yet_valid",
    "replay",
    "rate_limit",
    "duplicate_exact",
    "duplicate_near",
    "flood",
    "duplicate_substring",
    "quality:*",
];

const SECTIONS: [(&str, Role); 3] = [
    ("sources", Role::Source),
    ("stages", Role::Stage),
    ("sinks", Role::Sink),
];

/// Reads a job file from disk. See [`parse`].
pub fn load(path: &std::path::Path) -> Result<JobSpec, Diagnostics> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&file, &text, &|k| std::env::var(k).ok()),
        Err(e) => Err(Diagnostics(vec![Diagnostic {
            file,
            pos: Pos::default(),
            key: String::new(),
            message: format!("cannot read the job file: {e}"),
            hint: None,
        }])),
    }
}

/// Parses and checks a job file's text: syntax, keys, types, interpolation, operator configs,
/// and then the DAG (see [`crate::plan`]). Returns every problem found.
pub fn parse(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<JobSpec, Diagnostics> {
    let mut diags = Vec::new();
    let diag = |pos: Pos, key: &str, message: String, hint: Option<String>| Diagnostic {
        file: file.to_string(),
        pos,
        key: key.to_string(),
        message,
        hint,
    };
    let root = match marked_yaml::parse_yaml_with_options(
        0,
        text,
        LoaderOptions::default().error_on_duplicate_keys(true),
    ) {
        Ok(n) => n,
        Err(e) => {
            let pos = match &e {
                marked_yaml::LoadError::TopLevelMustBeMapping(m)
                | marked_yaml::LoadError::TopLevelMustBeSequence(m)
                | marked_yaml::LoadError::UnexpectedAnchor(m)
                | marked_yaml::LoadError::MappingKeyMustBeScalar(m)
                | marked_yaml::LoadError::UnexpectedTag(m)
                | marked_yaml::LoadError::ScanError(m, _) => Pos {
                    line: m.line(),
                    column: m.column(),
                },
                marked_yaml::LoadError::DuplicateKey(inner) => Pos::of_key(&inner.key),
            };
            let msg = e.to_string();
            let msg = msg
                .split_once(": ")
                .map(|(_, m)| m.to_string())
                .unwrap_or(msg);
            return Err(Diagnostics(vec![diag(
                pos,
                "",
                format!("invalid YAML: {msg}"),
                Some("job files are YAML mappings; anchors and tags are not supported".into()),
            )]));
        }
    };
    let Some(map) = root.as_mapping() else {
        return Err(Diagnostics(vec![diag(
            Pos::of(&root),
            "",
            "a job file must be a mapping".into(),
            None,
        )]));
    };

    // Header keys, checked against JobHeader's schema.
    let header_schema =
        serde_json::to_value(schemars::schema_for!(JobHeader)).expect("schemas serialise");
    let checker = SchemaChecker::new(file, env);
    let header_keys: Vec<&str> = checker.property_names(&header_schema);
    let mut header_map = marked_yaml::types::MarkedMappingNode::new_empty(*root.span());
    for (k, v) in map.iter() {
        let key = k.as_str();
        if SECTIONS.iter().any(|(s, _)| *s == key) {
            continue;
        }
        if header_keys.contains(&key) {
            header_map.insert(k.clone(), v.clone());
        } else {
            let mut all: Vec<&str> = header_keys.clone();
            all.extend(SECTIONS.iter().map(|(s, _)| *s));
            diags.push(diag(
                Pos::of_key(k),
                key,
                format!("unknown key `{key}`"),
                Some(did_you_mean(key, &all)),
            ));
        }
    }
    let header_value = checker.convert(&Node::Mapping(header_map), &header_schema, "", &mut diags);
    let header: Option<JobHeader> = header_value.and_then(|v| match serde_json::from_value(v) {
        Ok(h) => Some(h),
        Err(e) => {
            diags.push(diag(Pos::of(&root), "", e.to_string(), None));
            None
        }
    });
    if let Some(name) = map.get_scalar("name") {
        let name = name.as_str();
        if !name.contains('$') && !crate::naming::valid_job_name(name) {
            diags.push(diag(
                map.get_node("name").map(Pos::of).unwrap_or_default(),
                "name",
                format!("job name {name:?} is not usable as a path segment"),
                Some("use letters, digits, `-` and `_`".into()),
            ));
        }
    }
    if let Some(h) = &header {
        // The position of `checkpoint.<key>`, else of `checkpoint`.
        let at = |key: &str| {
            let ck = map.get_node("checkpoint");
            ck.and_then(|c| c.as_mapping())
                .and_then(|c| c.get_node(key))
                .or(ck)
                .map(Pos::of)
                .unwrap_or_default()
        };
        let ck = &h.checkpoint;
        if !(ck.interval_seconds > 0.0 && ck.interval_seconds.is_finite()) {
            diags.push(diag(
                at("interval_seconds"),
                "checkpoint.interval_seconds",
                "must be a positive number of seconds".into(),
                None,
            ));
        }
        for (key, value) in [
            ("max_rows", ck.max_rows),
            ("max_bytes", ck.max_bytes),
            ("max_total_bytes", ck.max_total_bytes),
        ] {
            if value == 0 {
                diags.push(diag(
                    at(key),
                    &format!("checkpoint.{key}"),
                    "must be at least 1".into(),
                    Some("leave the key out for its default".into()),
                ));
            }
        }
        let nested = |section: &str, key: &str| {
            let sec = map.get_node(section);
            sec.and_then(|c| c.as_mapping())
                .and_then(|c| c.get_node(key))
                .or(sec)
                .map(Pos::of)
                .unwrap_or_default()
        };
        if let Err(e) = h.signing.domain() {
            diags.push(diag(
                nested("signing", "verifying_contract"),
                "signing.verifying_contract",
                e,
                None,
            ));
        }
        if h.penalties.epoch_seconds == 0 {
            diags.push(diag(
                nested("penalties", "epoch_seconds"),
                "penalties.epoch_seconds",
                "must be at least 1".into(),
                None,
            ));
        }
        if let Some(ep) = &h.epochs {
            for (key, message) in ep.problems() {
                // The deepest node of `epochs.<key>` that the file has.
                let mut node = map.get_node("epochs");
                for seg in key.split('.') {
                    match node
                        .and_then(|n| n.as_mapping())
                        .and_then(|m| m.get_node(seg))
                    {
                        Some(n) => node = Some(n),
                        None => break,
                    }
                }
                diags.push(diag(
                    node.map(Pos::of).unwrap_or_default(),
                    &format!("epochs.{key}"),
                    message,
                    None,
                ));
            }
        }
        for key in h.penalties.points.keys() {
            let known = key.strip_prefix("quality:").map_or_else(
                || REASONS.contains(&key.as_str()),
                |rule| rule == "*" || ledgerflow_operators::quality::RULES.contains(&rule),
            );
            if !known {
                diags.push(diag(
                    nested("penalties", "points"),
                    "penalties.points",
                    format!("`{key}` is not a refusal reason"),
                    Some(did_you_mean(key, REASONS)),
                ));
            }
        }
    }

    // Sources, stages, sinks.
    let mut nodes: Vec<NodeSpec> = Vec::new();
    for (section, role) in SECTIONS {
        let Some(section_node) = map.get_node(section) else {
            continue;
        };
        let Some(section_map) = section_node.as_mapping() else {
            diags.push(diag(
                Pos::of(section_node),
                section,
                format!("`{section}` must be a mapping of names to {section}"),
                None,
            ));
            continue;
        };
        for (name_node, body) in section_map.iter() {
            let name = name_node.as_str().to_string();
            let path = format!("{section}.{name}");
            if let Some(prev) = nodes.iter().find(|n| n.name == name) {
                diags.push(diag(
                    Pos::of_key(name_node),
                    &path,
                    format!("`{name}` is already defined (line {})", prev.pos.line),
                    Some("sources, stages and sinks share one namespace".into()),
                ));
                continue;
            }
            if !crate::naming::valid_job_name(&name) {
                diags.push(diag(
                    Pos::of_key(name_node),
                    &path,
                    format!("`{name}` is not a valid name"),
                    Some("use letters, digits, `-` and `_`".into()),
                ));
            }
            if let Some(n) = parse_node(&checker, &name, &path, role, name_node, body, &mut diags) {
                nodes.push(n);
            }
        }
    }
    let epochs_only = map.get_node("epochs").is_some() && map.get_node("sources").is_none();
    if !nodes.iter().any(|n| n.role == Role::Source)
        && !diags.iter().any(|d| d.key.starts_with("sources"))
        && !epochs_only
    {
        diags.push(diag(
            Pos::of(&root),
            "sources",
            "a job needs at least one source".into(),
            None,
        ));
    }
    let spec = header.map(|header| JobSpec {
        file: file.to_string(),
        header,
        nodes,
    });
    if let Some(spec) = &spec {
        crate::plan::check(spec, &mut diags);
    }
    match spec {
        Some(spec) if diags.is_empty() => Ok(spec),
        _ => {
            diags.sort_by_key(|d| (d.pos.line, d.pos.column));
            Err(Diagnostics(diags))
        }
    }
}

fn parse_node(
    checker: &SchemaChecker<'_>,
    name: &str,
    path: &str,
    role: Role,
    name_node: &marked_yaml::types::MarkedScalarNode,
    body: &Node,
    diags: &mut Vec<Diagnostic>,
) -> Option<NodeSpec> {
    let d = |pos: Pos, key: String, message: String, hint: Option<String>| Diagnostic {
        file: checker.file().to_string(),
        pos,
        key,
        message,
        hint,
    };
    let Some(m) = body.as_mapping() else {
        diags.push(d(
            Pos::of(body),
            path.to_string(),
            "must be a mapping with a `type`".into(),
            None,
        ));
        return None;
    };
    let kinds: Vec<&str> = registry::registry()
        .iter()
        .filter(|e| e.role == role)
        .map(|e| e.name)
        .collect();
    let Some(type_node) = m.get_scalar("type") else {
        diags.push(d(
            Pos::of_key(name_node),
            format!("{path}.type"),
            "missing `type`".into(),
            Some(format!("one of: {}", kinds.join(", "))),
        ));
        return None;
    };
    let kind = type_node.as_str();
    let Some(entry) = registry::registry()
        .iter()
        .find(|e| e.name == kind && e.role == role)
    else {
        let hint = match registry::registry().iter().find(|e| e.name == kind) {
            Some(e) => format!("`{kind}` is a {}, not a {}", e.role, role),
            None => did_you_mean(kind, &kinds),
        };
        diags.push(d(
            Pos::of_key(type_node),
            format!("{path}.type"),
            format!("unknown {role} type `{kind}`"),
            Some(hint),
        ));
        return None;
    };

    let mut inputs = Vec::new();
    match (m.get_node("inputs"), role) {
        (None, Role::Source) => {}
        (Some(n), Role::Source) => diags.push(d(
            Pos::of(n),
            format!("{path}.inputs"),
            "a source takes no inputs".into(),
            None,
        )),
        (None, _) => diags.push(d(
            Pos::of_key(name_node),
            format!("{path}.inputs"),
            format!("a {role} needs `inputs`"),
            Some("e.g. `inputs: [decode]`".into()),
        )),
        (Some(n), _) => match n.as_sequence() {
            Some(seq) if !seq.is_empty() => {
                for item in seq.iter() {
                    match item.as_scalar() {
                        Some(s) => inputs.push((s.as_str().to_string(), Pos::of(item))),
                        None => diags.push(d(
                            Pos::of(item),
                            format!("{path}.inputs"),
                            "inputs are names of sources or stages".into(),
                            None,
                        )),
                    }
                }
            }
            _ => diags.push(d(
                Pos::of(n),
                format!("{path}.inputs"),
                "`inputs` must be a non-empty list of names".into(),
                Some("e.g. `inputs: [decode]`".into()),
            )),
        },
    }

    let schema = serde_json::to_value((entry.schema)()).expect("schemas serialise");
    let mut config = marked_yaml::types::MarkedMappingNode::new_empty(*body.span());
    for (k, v) in m.iter() {
        if k.as_str() != "type" && k.as_str() != "inputs" {
            config.insert(k.clone(), v.clone());
        }
    }
    let before = diags.len();
    let value = checker.convert(&Node::Mapping(config), &schema, path, diags)?;
    if diags.len() > before {
        return None;
    }
    match (entry.build)(value) {
        Ok(built) => Some(NodeSpec {
            name: name.to_string(),
            role,
            kind: kind.to_string(),
            inputs,
            built,
            pos: Pos::of_key(name_node),
        }),
        Err(e) => {
            diags.push(d(Pos::of_key(name_node), path.to_string(), e, None));
            None
        }
    }
}
