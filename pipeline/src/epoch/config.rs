//! The `epochs:` section of a job file: how reward epochs are cut, funded, split, settled and
//! published.

use schemars::JsonSchema;
use serde::Deserialize;

/// Reward epochs. Epoch `n` (from 1) covers event time `[start + (n−1)·length, start + n·length)`
/// and closes when event time (the newest record of any Datanet or engine table) passes its
/// end plus `lateness_seconds`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EpochConfig {
    /// When epoch 1 starts (RFC 3339, e.g. `2026-01-01T00:00:00Z`).
    pub start: String,
    /// Length of an epoch in seconds.
    pub length_seconds: u64,
    /// How long after its end an epoch waits for late records before it closes.
    #[serde(default)]
    pub lateness_seconds: u64,
    /// Tokens emitted per epoch in base units (an integer), or `chain`: `RewardParams.emission`
    /// at the pinned block.
    #[serde(default = "from_chain")]
    pub emission: String,
    /// Attribution threshold in millionths of an output (scores below it earn nothing), or
    /// `chain`: `RewardParams.attributionThreshold` at the pinned block.
    #[serde(default = "from_chain")]
    pub attribution_threshold: String,
    /// Add the `fee` of the epoch's `inferences` to its pool.
    #[serde(default = "yes")]
    pub inference_fees: bool,
    #[serde(default)]
    pub shares: Shares,
    /// Receives the model owners' share (required when it is not 0).
    #[serde(default)]
    pub model_owner: Option<String>,
    /// Receives the protocol's share, and the data share of an epoch nobody earned in.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Weight lost per penalty point in the epoch (the default policy's `$penalty_per_point`).
    #[serde(default = "default_penalty_per_point")]
    pub penalty_per_point: f64,
    /// The reward policy: a SQL query answering `contributor` (0x address) and `weight`
    /// (≥ 0; the data share is split pro rata) and optionally `score`. It may use `$epoch`,
    /// `$start` and `$end` (the window, timestamps), `$threshold` (0–1) and
    /// `$penalty_per_point`. Default: [`super::DEFAULT_POLICY`].
    #[serde(default)]
    pub policy: Option<String>,
    pub chain: EpochChain,
    pub da: EpochDa,
    /// How often `epoch run` looks for newly closed epochs.
    #[serde(default = "default_poll_seconds")]
    pub poll_seconds: f64,
}

/// How the pool is split, in basis points (summing to 10,000).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Shares {
    #[serde(default = "all")]
    pub data: u32,
    #[serde(default)]
    pub model_owner: u32,
    #[serde(default)]
    pub protocol: u32,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            data: all(),
            model_owner: 0,
            protocol: 0,
        }
    }
}

/// Where epochs settle. The settler key comes from `LEDGERFLOW_SETTLER_KEY` or a keystore
/// (`LEDGERFLOW_SETTLER_KEYSTORE`), never from the job file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EpochChain {
    /// JSON-RPC URL of the L2.
    pub rpc: String,
    /// The JSON `ledgerflow contracts deploy` wrote.
    pub deployment: String,
    /// Blocks on top of a settlement before it counts.
    #[serde(default = "one")]
    pub confirmations: u64,
    /// Block whose state the chain parameters are read at (`finalized`, `safe`, `latest`).
    #[serde(default = "finalized")]
    pub params_block: String,
    /// Anchor each Datanet's content root of the epoch in `DatanetRegistry` (registering the
    /// Datanet first when it is not).
    #[serde(default = "yes")]
    pub anchor_datanets: bool,
    /// How long to wait for a transaction's confirmations.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: f64,
    /// L1 fee parameters for the Fjord estimate when the chain has no `L1Block` predeploy.
    #[serde(default)]
    pub l1: L1Config,
}

/// OP Stack L1 fee parameters (as `L1Block` holds them).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct L1Config {
    #[serde(default = "default_base_fee_scalar")]
    pub base_fee_scalar: u32,
    #[serde(default = "default_blob_base_fee_scalar")]
    pub blob_base_fee_scalar: u32,
    /// L1 base fee in wei.
    #[serde(default = "default_l1_base_fee")]
    pub base_fee: u64,
    /// L1 blob base fee in wei.
    #[serde(default = "one")]
    pub blob_base_fee: u64,
}

impl Default for L1Config {
    fn default() -> Self {
        let p = ledgerflow_chain::settlement::L1FeeParams::default();
        Self {
            base_fee_scalar: p.base_fee_scalar,
            blob_base_fee_scalar: p.blob_base_fee_scalar,
            base_fee: p.l1_base_fee as u64,
            blob_base_fee: p.blob_base_fee as u64,
        }
    }
}

impl L1Config {
    pub fn params(&self) -> ledgerflow_chain::settlement::L1FeeParams {
        ledgerflow_chain::settlement::L1FeeParams {
            base_fee_scalar: self.base_fee_scalar,
            blob_base_fee_scalar: self.blob_base_fee_scalar,
            l1_base_fee: self.base_fee.into(),
            blob_base_fee: self.blob_base_fee.into(),
        }
    }
}

/// Where epoch data is published: an OP Stack alt-DA server (eigenda-proxy, or `ledgerflow da
/// serve`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EpochDa {
    /// Base URL, e.g. `http://127.0.0.1:3100`.
    pub url: String,
}

fn from_chain() -> String {
    "chain".into()
}
fn yes() -> bool {
    true
}
fn one() -> u64 {
    1
}
fn all() -> u32 {
    10_000
}
fn finalized() -> String {
    "finalized".into()
}
fn default_penalty_per_point() -> f64 {
    0.1
}
fn default_poll_seconds() -> f64 {
    10.0
}
fn default_timeout() -> f64 {
    120.0
}
fn default_base_fee_scalar() -> u32 {
    ledgerflow_chain::settlement::L1FeeParams::default().base_fee_scalar
}
fn default_blob_base_fee_scalar() -> u32 {
    ledgerflow_chain::settlement::L1FeeParams::default().blob_base_fee_scalar
}
fn default_l1_base_fee() -> u64 {
    ledgerflow_chain::settlement::L1FeeParams::default().l1_base_fee as u64
}

impl EpochConfig {
    /// Epoch 1's start in Unix milliseconds.
    pub fn start_ms(&self) -> Result<i64, String> {
        chrono::DateTime::parse_from_rfc3339(&self.start)
            .map(|t| t.timestamp_millis())
            .map_err(|e| format!("{:?} is not an RFC 3339 time: {e}", self.start))
    }

    /// `[start, end)` of epoch `n` (from 1), in Unix milliseconds.
    pub fn window(&self, n: u64) -> Result<(i64, i64), String> {
        let start = self.start_ms()?;
        let len = (self.length_seconds as i64).saturating_mul(1000);
        let from = start.saturating_add(len.saturating_mul(n as i64 - 1));
        Ok((from, from.saturating_add(len)))
    }

    /// Event time at which epoch `n` closes.
    pub fn closes_at_ms(&self, n: u64) -> Result<i64, String> {
        Ok(self.window(n)?.1 + (self.lateness_seconds as i64).saturating_mul(1000))
    }

    /// Epochs closed at event time `watermark_ms` (every epoch up to the returned one).
    pub fn closed_through(&self, watermark_ms: i64) -> Result<u64, String> {
        let start = self.start_ms()?;
        let len = self.length_seconds.max(1) as i64 * 1000;
        let late = self.lateness_seconds as i64 * 1000;
        let t = watermark_ms - late - start;
        Ok(if t < len { 0 } else { (t / len) as u64 })
    }

    /// Every problem of the section, as (key under `epochs`, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Err(e) = self.start_ms() {
            out.push(("start", e));
        }
        if self.length_seconds == 0 {
            out.push(("length_seconds", "must be at least 1".into()));
        }
        let s = &self.shares;
        if s.data as u64 + s.model_owner as u64 + s.protocol as u64 != 10_000 {
            out.push((
                "shares",
                format!(
                    "data + model_owner + protocol must be 10000 basis points, not {}",
                    s.data as u64 + s.model_owner as u64 + s.protocol as u64
                ),
            ));
        }
        for (key, addr, share) in [
            ("model_owner", &self.model_owner, s.model_owner),
            ("protocol", &self.protocol, s.protocol),
        ] {
            match addr {
                Some(a) if ledgerflow_rewards::merkle::parse_address(a).is_err() => {
                    out.push((key, format!("{a:?} is not a 0x-prefixed 20-byte address")));
                }
                Some(_) => {}
                None if share > 0 => out.push((
                    if key == "model_owner" {
                        "shares.model_owner"
                    } else {
                        "shares.protocol"
                    },
                    format!(
                        "shares.{key} is {share} basis points but no `{key}` address receives it"
                    ),
                )),
                None => {}
            }
        }
        if self.emission != "chain" && ledgerflow_rewards::Amount::parse(&self.emission).is_err() {
            out.push((
                "emission",
                format!(
                    "{:?} is neither `chain` nor an amount in base units",
                    self.emission
                ),
            ));
        }
        if self.attribution_threshold != "chain"
            && !self
                .attribution_threshold
                .parse::<u64>()
                .is_ok_and(|t| t <= 1_000_000)
        {
            out.push((
                "attribution_threshold",
                format!(
                    "{:?} is neither `chain` nor millionths from 0 to 1000000",
                    self.attribution_threshold
                ),
            ));
        }
        if !(self.penalty_per_point.is_finite() && self.penalty_per_point >= 0.0) {
            out.push(("penalty_per_point", "must be a number ≥ 0".into()));
        }
        if let Some(sql) = &self.policy {
            if let Err(e) = datafusion::sql::parser::DFParser::parse_sql(sql) {
                out.push(("policy", format!("the policy is not SQL: {e}")));
            }
        }
        if !["finalized", "safe", "latest"].contains(&self.chain.params_block.as_str())
            && self.chain.params_block.parse::<u64>().is_err()
        {
            out.push((
                "chain.params_block",
                format!(
                    "{:?} is not finalized, safe, latest or a block number",
                    self.chain.params_block
                ),
            ));
        }
        if self.poll_seconds.is_nan() || self.poll_seconds <= 0.0 {
            out.push(("poll_seconds", "must be more than 0".into()));
        }
        out
    }
}
