//! `dedup_exact` and `dedup_near`: a Datanet deduplicated against everything it ever accepted.
//!
//! - **Exact** (`dedup_exact`): the key is the XXH3-128 of the Datanet and the normalised text
//!   (NFC, lowercase, whitespace collapsed; [`crate::minhash::normalize`]); the authoritative
//!   record of every accepted key is in the job's state store, in memory until the next flush and
//!   on disk after, so there are no false negatives and (up to a 128-bit hash collision) no false
//!   positives. Refusal: `duplicate_exact`, `duplicate_of` = the accepted original's content hash.
//! - **Near** (`dedup_near`): MinHash of word 5-grams, 112 hashes in 14 bands of 8 rows by
//!   default (FineWeb's setting; all configurable). Documents sharing a band key with an accepted
//!   one are candidates; a candidate whose estimated Jaccard is at least `threshold` (0.8) makes
//!   the newcomer a `duplicate_near` of it (`duplicate_of`, `similarity` = the best match). The
//!   first arrival wins. Per accepted document the store keeps 14 band entries and the signature
//!   as 32-bit values.
//! - **Floods** (both, when `flood` is set): a duplicate sent by a *different* contributor within
//!   `flood.window_seconds` of the original's Kafka time is refused as `flood` (a Sybil pattern),
//!   and the original's contributor is penalised once per cluster along with the sender.
//!
//! State is shared by all partitions of the job (see [`crate::state`] for how replays stay
//! identical across crashes).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use ledgerflow_schemas::hex0x;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use schemars::JsonSchema;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::band_runs::{BandRuns, DiskBands, RunTables};
use crate::filter::{key64, KeyFilter};
use crate::key_runs::KeyRuns;
use crate::minhash::{band_keys, estimate, exact_key_of, MinHasher};
use crate::operator::{
    Barrier, Collector, Operator, OperatorContext, OperatorError, Settled, StageEnv, StageFactory,
};
use crate::rows::{contribution_passthrough, route, Rows};
use crate::state::{
    barrier, decide_rows, lock, op_err, Decision, Flushable, Journal, Layered, Pending, Released,
    Replay, SharedSlot, StateDb, StateError,
};

/// Cross-contributor duplicates within a window are a flood.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FloodConfig {
    /// A copy by another contributor this soon (Kafka time) after the original is a `flood`.
    #[serde(default = "default_flood_window")]
    pub window_seconds: u64,
}

fn default_flood_window() -> u64 {
    3600
}

/// Configuration of a `dedup_exact` stage.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExactConfig {
    #[serde(default)]
    pub flood: Option<FloodConfig>,
}

/// Configuration of a `dedup_near` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NearConfig {
    /// MinHash permutations; must equal `bands × rows`.
    #[serde(default = "default_num_perm")]
    pub num_perm: usize,
    #[serde(default = "default_bands")]
    pub bands: usize,
    #[serde(default = "default_rows")]
    pub rows: usize,
    /// Words per shingle.
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// Estimated Jaccard at or above which a candidate is a duplicate.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Seed of the permutations. Changing it invalidates the stored signatures.
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub flood: Option<FloodConfig>,
}

fn default_num_perm() -> usize {
    112
}
fn default_bands() -> usize {
    14
}
fn default_rows() -> usize {
    8
}
fn default_ngram() -> usize {
    5
}
fn default_threshold() -> f64 {
    0.8
}
fn default_seed() -> u64 {
    0x1ed9_e4f1_0c0f_fee5
}

impl Default for NearConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

impl NearConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.bands == 0 || self.rows == 0 || self.bands * self.rows != self.num_perm {
            return Err(format!(
                "num_perm ({}) must equal bands × rows ({} × {})",
                self.num_perm, self.bands, self.rows
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!("threshold {} is not in [0, 1]", self.threshold));
        }
        if self.ngram == 0 || self.ngram > 16 {
            return Err(format!("ngram {} is not in 1..=16", self.ngram));
        }
        Ok(())
    }
}

/// What the store keeps about an accepted original.
#[derive(Debug, Clone, PartialEq)]
struct Original {
    content_hash: [u8; 32],
    contributor: [u8; 20],
    ts_ms: i64,
    /// Its contributor was penalised for a flood of it already.
    flood_penalised: bool,
}

const ORIGINAL_BYTES: usize = 61;

impl Original {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.content_hash);
        out.extend_from_slice(&self.contributor);
        out.extend_from_slice(&self.ts_ms.to_le_bytes());
        out.push(u8::from(self.flood_penalised));
    }

    fn decode(b: &[u8]) -> Option<Original> {
        if b.len() < ORIGINAL_BYTES {
            return None;
        }
        Some(Original {
            content_hash: b[..32].try_into().ok()?,
            contributor: b[32..52].try_into().ok()?,
            ts_ms: i64::from_le_bytes(b[52..60].try_into().ok()?),
            flood_penalised: b[60] != 0,
        })
    }

    /// Both describe the same contribution row.
    fn same_row(&self, other: &Original) -> bool {
        self.content_hash == other.content_hash
            && self.contributor == other.contributor
            && self.ts_ms == other.ts_ms
    }

    fn of_row(rows: &Rows<'_>, i: usize) -> Original {
        Original {
            content_hash: hex0x::decode_fixed::<32>(rows.content_hash.value(i))
                .unwrap_or([0u8; 32]),
            contributor: hex0x::decode_fixed::<20>(rows.contributor.value(i)).unwrap_or([0u8; 20]),
            ts_ms: rows.timestamp.value(i),
            flood_penalised: false,
        }
    }
}

/// The refusal of a duplicate of `orig` (flood or plain), updating `orig` when its contributor is
/// penalised now.
fn duplicate_decision(
    flood: Option<&FloodConfig>,
    plain_reason: &str,
    rows: &Rows<'_>,
    i: usize,
    orig: &mut Original,
    similarity: Option<f64>,
) -> (Decision, bool) {
    let me = Original::of_row(rows, i);
    let duplicate_of = Some(hex0x::encode(&orig.content_hash));
    let within = |f: &FloodConfig| {
        (me.ts_ms - orig.ts_ms).unsigned_abs() <= f.window_seconds.saturating_mul(1000)
    };
    if let Some(f) = flood.filter(|f| me.contributor != orig.contributor && within(f)) {
        let mut also = Vec::new();
        let changed = !orig.flood_penalised;
        if changed {
            also.push(hex0x::encode(&orig.contributor));
            orig.flood_penalised = true;
        }
        let decision = Decision::Reject {
            reason: "flood".into(),
            detail: format!(
                "a copy of a contribution by {} sent by another contributor {} s after it (window {} s)",
                hex0x::encode(&orig.contributor),
                (me.ts_ms - orig.ts_ms) / 1000,
                f.window_seconds
            ),
            duplicate_of,
            similarity,
            also_penalise: also,
        };
        return (decision, changed);
    }
    let detail = match similarity {
        Some(s) => format!("estimated Jaccard {s:.3} with an accepted contribution"),
        None => "same normalised text as an accepted contribution".into(),
    };
    (
        Decision::Reject {
            reason: plain_reason.into(),
            detail,
            duplicate_of,
            similarity,
            also_penalise: Vec::new(),
        },
        false,
    )
}

// ---------------------------------------------------------------------------------------------
// Exact

/// The `dedup_exact` factory.
pub struct ExactStage {
    pub config: ExactConfig,
    shared: SharedSlot<ExactState>,
}

impl ExactStage {
    pub fn new(config: ExactConfig) -> Self {
        Self {
            config,
            shared: SharedSlot::default(),
        }
    }
}

pub struct ExactState {
    db: Arc<StateDb>,
    journal: Arc<Journal>,
    tables: Arc<ExactTables>,
}

struct ExactTables {
    /// key → the accepted original ([`Original`], encoded), as sorted runs.
    keys: KeyRuns,
    name: String,
    /// Every key in `keys` or pending (locked after `pending`).
    filter: Mutex<KeyFilter>,
    /// Changes since the last flush: `None` forgets a key (its text was refused downstream).
    pending: Mutex<Layered<HashMap<[u8; 16], Option<Original>>>>,
}

impl Flushable for ExactTables {
    fn name(&self) -> &str {
        &self.name
    }

    fn freeze(&self) {
        lock(&self.pending).freeze();
    }

    fn write_frozen(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        let Some(frozen) = lock(&self.pending).frozen() else {
            return Ok(());
        };
        let mut sorted: Vec<([u8; 16], Option<Vec<u8>>)> = frozen
            .iter()
            .map(|(k, v)| {
                let v = v.as_ref().map(|o| {
                    let mut buf = Vec::with_capacity(ORIGINAL_BYTES);
                    o.encode(&mut buf);
                    buf
                });
                (*k, v)
            })
            .collect();
        sorted.sort_unstable_by_key(|(k, _)| *k);
        self.keys.append(txn, &sorted)
    }

    fn release(&self) -> Released {
        lock(&self.pending).release()
    }

    fn pending_bytes(&self) -> usize {
        lock(&self.pending).current.len() * 112
    }
}

impl StageFactory for ExactStage {
    fn output_schema(&self, inputs: &[SchemaRef]) -> Result<SchemaRef, String> {
        contribution_passthrough(inputs)
    }

    fn stateful(&self) -> bool {
        true
    }

    fn instantiate(&self, stage: &str, env: &StageEnv) -> Result<Box<dyn Operator>, OperatorError> {
        let db = env.state(stage)?;
        let state = self
            .shared
            .get_or_init(db, || {
                // `{stage}/keys` was the B-tree of earlier versions.
                let keys = KeyRuns::open(
                    db.db(),
                    &format!("{stage}/key_runs"),
                    ORIGINAL_BYTES,
                    &format!("{stage}/keys"),
                )
                .map_err(|e| db.error(e))?;
                let filter = keys.filter(db.db()).map_err(|e| db.error(e))?;
                let tables = Arc::new(ExactTables {
                    keys,
                    name: format!("{stage}/key_runs"),
                    filter: Mutex::new(filter),
                    pending: Mutex::new(Layered::default()),
                });
                db.register(tables.clone());
                Ok(Arc::new(ExactState {
                    db: db.clone(),
                    journal: Journal::open(db, stage)?,
                    tables,
                }))
            })
            .map_err(|e: StateError| op_err(stage, e))?;
        Ok(Box::new(Exact {
            config: self.config.clone(),
            state,
            replay: Replay::default(),
            unsettled: HashMap::new(),
            carry: Carry::default(),
        }))
    }
}

/// One partition's `dedup_exact`.
pub struct Exact {
    config: ExactConfig,
    state: Arc<ExactState>,
    replay: Replay,
    /// Keys of the rows this instance passed that have not yet settled downstream, by Kafka
    /// position: a later stage may still refuse them (see [`Operator::on_settled`]).
    unsettled: HashMap<(i32, i64), ([u8; 16], Original)>,
    carry: Carry<[u8; 16]>,
}

impl Operator for Exact {
    fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let rows = Rows::new(&batch, &ctx.stage)?;
        let stage = ctx.stage.clone();
        let err = |e: &dyn std::fmt::Display| op_err(&stage, e);
        let keys: Vec<[u8; 16]> = self.carry.take_or(&rows, |i| {
            exact_key_of(rows.datanet.value(i), rows.content.value(i))
        });
        let state = self.state.clone();
        let _deciding = state.db.deciding();
        let txn = state.db.db().begin_read().map_err(|e| err(&e))?;
        let table = state.tables.keys.reader(&txn).map_err(|e| err(&e))?;
        let mut pending = lock(&state.tables.pending);
        let mut filter = lock(&state.tables.filter);
        let flood = self.config.flood.as_ref();
        // Keys passed and not yet settled, this batch's included.
        let mut unsettled: HashSet<[u8; 16]> = self.unsettled.values().map(|(k, _)| *k).collect();
        let decisions = decide_rows(
            &state.db,
            &state.journal,
            &mut self.replay,
            &rows,
            &stage,
            |i, replayed| {
                let key = &keys[i];
                if let Some(d) = replayed {
                    if matches!(d, Decision::Accept) {
                        unsettled.insert(*key);
                    }
                    return Ok(Some(d));
                }
                if unsettled.contains(key) {
                    // A copy of a text passed moments ago: whether that one is kept decides
                    // what this one is, so wait until it has settled.
                    return Ok(None);
                }
                let found = match pending.find(|p| p.get(key).cloned()) {
                    Some(o) => o,
                    None if filter.may_contain(key64(key)) => {
                        table.get(key)?.and_then(|v| Original::decode(&v))
                    }
                    None => None,
                };
                Ok(Some(match found {
                    None => {
                        pending
                            .current
                            .insert(*key, Some(Original::of_row(&rows, i)));
                        filter.insert(key64(key));
                        unsettled.insert(*key);
                        Decision::Accept
                    }
                    Some(mut orig) => {
                        let (d, changed) =
                            duplicate_decision(flood, "duplicate_exact", &rows, i, &mut orig, None);
                        if changed {
                            pending.current.insert(*key, Some(orig));
                        }
                        d
                    }
                }))
            },
        )?;
        drop(filter);
        drop(pending);
        drop(_deciding);
        let done = Decided {
            batch: &batch,
            rows: &rows,
            decisions: &decisions,
            db: &state.db,
        };
        done.finish(&mut self.unsettled, &mut self.carry, keys, |k| *k, ctx, out)
    }

    fn on_settled(
        &mut self,
        settled: &Settled,
        ctx: &mut OperatorContext,
    ) -> Result<(), OperatorError> {
        let refused = take_settled(&mut self.unsettled, settled);
        if refused.is_empty() {
            return Ok(());
        }
        // Refused after this stage: the Datanet does not hold them, so they are no originals.
        let state = &self.state;
        let err = |e: &dyn std::fmt::Display| op_err(&ctx.stage, e);
        let _deciding = state.db.deciding();
        let txn = state.db.db().begin_read().map_err(|e| err(&e))?;
        let table = state.tables.keys.reader(&txn).map_err(|e| err(&e))?;
        let mut pending = lock(&state.tables.pending);
        for (key, row) in refused {
            let stored = match pending.find(|p| p.get(&key).cloned()) {
                Some(o) => o,
                None => table
                    .get(&key)
                    .map_err(|e| err(&e))?
                    .and_then(|v| Original::decode(&v)),
            };
            // Only if the key still names this row (a replay after a crash may find a later
            // original in its place).
            if stored.is_some_and(|o| o.same_row(&row)) {
                pending.current.insert(key, None);
            }
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        b: &Barrier,
        ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<Option<Vec<u8>>, OperatorError> {
        barrier(&self.state.db, &self.state.journal, b, ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// Near

/// The `dedup_near` factory.
pub struct NearStage {
    pub config: NearConfig,
    shared: SharedSlot<NearState>,
}

impl NearStage {
    pub fn new(config: NearConfig) -> Self {
        Self {
            config,
            shared: SharedSlot::default(),
        }
    }
}

pub struct NearState {
    db: Arc<StateDb>,
    journal: Arc<Journal>,
    tables: Arc<NearTables>,
}

struct NearTables {
    /// The band index: sorted runs ([`crate::band_runs`]).
    bands: BandRuns,
    /// Documents written after they were first stored (a flood marked on the original, or
    /// forgotten: an empty record), and every document of state files from before `chunks`.
    docs: String,
    /// Documents as they were stored, consecutive ids in chunks of up to
    /// [`crate::runs::BLOCK_BYTES`] (31 documents of the default 112 hashes): one B-tree insert
    /// per chunk instead of one per document, and pages filled.
    chunks: String,
    meta: String,
    pending: Mutex<Layered<NearPending>>,
    /// Every band key the index holds, on disk or pending (locked after `pending`): most
    /// documents are new, none of their band keys anywhere, and cost no disk lookup.
    filter: Mutex<KeyFilter>,
}

/// A filter of every band key in `disk` and in the pending layers, sized for `keys`.
fn band_filter(
    keys: u64,
    disk: &DiskBands,
    pending: &Layered<NearPending>,
) -> Result<KeyFilter, redb::Error> {
    let mut f = KeyFilter::with_capacity(keys);
    disk.each_key(|k| f.insert(k))?;
    for layer in pending
        .frozen
        .as_deref()
        .into_iter()
        .chain([&pending.current])
    {
        for k in layer.buckets.keys() {
            f.insert(k);
        }
    }
    Ok(f)
}

/// Band key → ids of the documents with that band, for one layer. Nearly every key has one
/// document (a second one is a near-duplicate candidate), so the first id is held in the map
/// itself and only the rest in a vector: no allocation per band of a new document (the
/// allocations were about half of a decision's own time in a profile).
#[derive(Default)]
struct Buckets {
    first: HashMap<u64, u64, foldhash::fast::RandomState>,
    more: HashMap<u64, Vec<u64>, foldhash::fast::RandomState>,
}

impl Buckets {
    fn push(&mut self, key: u64, id: u64) {
        match self.first.entry(key) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(id);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(key).or_default().push(id)
            }
        }
    }

    /// The ids of `key`, in the order pushed.
    fn ids(&self, key: u64) -> impl Iterator<Item = u64> + '_ {
        let first = self.first.get(&key).copied();
        let more = first.and_then(|_| self.more.get(&key));
        first.into_iter().chain(more.into_iter().flatten().copied())
    }

    /// Takes `id` out of `key`'s ids.
    fn remove(&mut self, key: u64, id: u64) {
        let Some(first) = self.first.get_mut(&key) else {
            return;
        };
        // `more` never holds an empty vector.
        if let Some(more) = self.more.get_mut(&key) {
            if *first == id {
                *first = more.remove(0);
            } else {
                more.retain(|x| *x != id);
            }
            if more.is_empty() {
                self.more.remove(&key);
            }
        } else if *first == id {
            self.first.remove(&key);
        }
    }

    fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.first.keys().copied()
    }

    /// Every (key, id).
    fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.first.iter().map(|(k, id)| (*k, *id)).chain(
            self.more
                .iter()
                .flat_map(|(k, ids)| ids.iter().map(move |id| (*k, *id))),
        )
    }

    fn len(&self) -> usize {
        self.first.len()
    }
}

#[derive(Default)]
struct NearPending {
    buckets: Buckets,
    /// doc id → original ‖ truncated signature (u32 little-endian); `None` forgets the document
    /// (it was refused downstream).
    docs: HashMap<u64, Option<Vec<u8>>>,
    next_id: Option<u64>,
}

impl Pending for NearPending {
    fn next_layer(&self) -> Self {
        Self {
            next_id: self.next_id,
            ..Self::default()
        }
    }
}

impl Pending for HashMap<[u8; 16], Option<Original>> {}

/// A chunk of documents with consecutive ids, keyed by the first: `n: u32`, the end of each
/// record (`u32` × n), the records; an empty record is a forgotten document.
fn encode_chunk(records: &[&[u8]]) -> Vec<u8> {
    let total: usize = records.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(4 + 4 * records.len() + total);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    let mut end = 0u32;
    for r in records {
        end += r.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for r in records {
        out.extend_from_slice(r);
    }
    out
}

/// Record `index` of a chunk; `None` past its end or for a malformed chunk.
fn chunk_record(chunk: &[u8], index: u64) -> Option<&[u8]> {
    let word = |i: usize| -> Option<usize> {
        Some(u32::from_le_bytes(chunk.get(4 * i..4 * i + 4)?.try_into().ok()?) as usize)
    };
    let n = word(0)?;
    let i = usize::try_from(index).ok().filter(|i| *i < n)?;
    let base = 4 + 4 * n;
    let start = if i == 0 { 0 } else { word(i)? };
    chunk.get(base + start..base + word(i + 1)?)
}

/// The document tables of one read transaction.
struct DiskDocs {
    docs: redb::ReadOnlyTable<u64, &'static [u8]>,
    chunks: redb::ReadOnlyTable<u64, &'static [u8]>,
}

impl DiskDocs {
    fn open(tables: &NearTables, txn: &redb::ReadTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            docs: txn.open_table(tables.docs_def())?,
            chunks: txn.open_table(tables.chunks_def())?,
        })
    }

    /// Document `id` on disk: rewritten, else as first stored; `None` when it does not exist
    /// or was forgotten.
    fn get(&self, id: u64) -> Result<Option<Vec<u8>>, redb::Error> {
        if let Some(v) = self.docs.get(id)? {
            let v = v.value();
            return Ok((!v.is_empty()).then(|| v.to_vec()));
        }
        let Some((first, chunk)) = self.chunks.range(..=id)?.next_back().transpose()? else {
            return Ok(None);
        };
        Ok(chunk_record(chunk.value(), id - first.value())
            .filter(|r| !r.is_empty())
            .map(<[u8]>::to_vec))
    }
}

impl Layered<NearPending> {
    /// The record of document `id`: pending, else on disk; `None` when it does not exist or was
    /// forgotten.
    fn doc(&self, id: u64, disk: &DiskDocs) -> Result<Option<Vec<u8>>, redb::Error> {
        Ok(match self.find(|p| p.docs.get(&id).cloned()) {
            Some(r) => r,
            None => disk.get(id)?,
        })
    }

    /// The ids of the documents sharing a band key with `keys`.
    fn candidates(
        &self,
        keys: &[u64],
        disk: &DiskBands,
        filter: &KeyFilter,
    ) -> Result<BTreeSet<u64>, redb::Error> {
        let mut candidates = BTreeSet::new();
        for k in keys {
            if !filter.may_contain(*k) {
                continue;
            }
            for layer in self.frozen.as_deref().into_iter().chain([&self.current]) {
                candidates.extend(layer.buckets.ids(*k));
            }
            disk.ids(*k, |id| {
                candidates.insert(id);
            })?;
        }
        Ok(candidates)
    }
}

impl NearTables {
    fn docs_def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.docs)
    }
    fn chunks_def(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.chunks)
    }
    fn meta_def(&self) -> TableDefinition<'_, &'static str, u64> {
        TableDefinition::new(&self.meta)
    }
}

impl Flushable for NearTables {
    fn name(&self) -> &str {
        &self.docs
    }

    fn freeze(&self) {
        lock(&self.pending).freeze();
    }

    fn write_frozen(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        let Some(p) = lock(&self.pending).frozen() else {
            return Ok(());
        };
        // The band entries as one sorted run (document ids only grow, so the new documents
        // below are appended as chunks).
        let mut entries: Vec<(u64, u64)> = p.buckets.entries().collect();
        entries.sort_unstable();
        self.bands.append(txn, &entries)?;
        // Ids from the one on disk up are this layer's new documents (every earlier layer is on
        // disk): appended as chunks. Below it, documents rewritten since they were stored.
        let mut meta = txn.open_table(self.meta_def())?;
        let new_from = meta.get("next_id")?.map_or(0, |v| v.value());
        let mut docs: Vec<(u64, &[u8])> = p
            .docs
            .iter()
            .map(|(id, v)| (*id, v.as_deref().unwrap_or(&[])))
            .collect();
        docs.sort_unstable_by_key(|(id, _)| *id);
        let split = docs.partition_point(|(id, _)| *id < new_from);
        let mut rewritten = txn.open_table(self.docs_def())?;
        for (id, v) in &docs[..split] {
            rewritten.insert(*id, *v)?;
        }
        let mut chunks = txn.open_table(self.chunks_def())?;
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut first, mut bytes) = (0, 4);
        for (id, v) in &docs[split..] {
            // Ids are allocated consecutively, so a gap would be a bug; it only starts a chunk.
            let full = bytes + 4 + v.len() > crate::runs::BLOCK_BYTES;
            if !run.is_empty() && (full || *id != first + run.len() as u64) {
                chunks.insert(first, encode_chunk(&run).as_slice())?;
                run.clear();
                bytes = 4;
            }
            if run.is_empty() {
                first = *id;
            }
            run.push(v);
            bytes += 4 + v.len();
        }
        if !run.is_empty() {
            chunks.insert(first, encode_chunk(&run).as_slice())?;
        }
        if let Some(next) = p.next_id {
            meta.insert("next_id", next)?;
        }
        Ok(())
    }

    fn release(&self) -> Released {
        lock(&self.pending).release()
    }

    fn pending_bytes(&self) -> usize {
        let p = &lock(&self.pending).current;
        p.buckets.len() * 48
            + p.docs
                .values()
                .map(|v| v.as_ref().map_or(0, Vec::len) + 48)
                .sum::<usize>()
    }
}

impl StageFactory for NearStage {
    fn output_schema(&self, inputs: &[SchemaRef]) -> Result<SchemaRef, String> {
        contribution_passthrough(inputs)
    }

    fn stateful(&self) -> bool {
        true
    }

    fn instantiate(&self, stage: &str, env: &StageEnv) -> Result<Box<dyn Operator>, OperatorError> {
        let db = env.state(stage)?;
        let state = self
            .shared
            .get_or_init(db, || {
                let db_err = |e: redb::Error| db.error(e);
                // `{stage}/band_index` was the B-tree index of earlier versions.
                let bands = RunTables::new(stage)
                    .open(db.db(), &format!("{stage}/band_index"))
                    .map_err(db_err)?;
                let tables = Arc::new(NearTables {
                    bands,
                    docs: format!("{stage}/docs"),
                    chunks: format!("{stage}/doc_chunks"),
                    meta: format!("{stage}/meta"),
                    pending: Mutex::new(Layered::default()),
                    filter: Mutex::new(KeyFilter::with_capacity(0)),
                });
                db.ensure_table(tables.docs_def())?;
                db.ensure_table(tables.chunks_def())?;
                db.ensure_table(tables.meta_def())?;
                *lock(&tables.filter) = (|| {
                    let txn = db.db().begin_read()?;
                    let disk = tables.bands.reader(&txn)?;
                    band_filter(2 * disk.entries(), &disk, &Layered::default())
                })()
                .map_err(db_err)?;
                db.register(tables.clone());
                Ok(Arc::new(NearState {
                    db: db.clone(),
                    journal: Journal::open(db, stage)?,
                    tables,
                }))
            })
            .map_err(|e: StateError| op_err(stage, e))?;
        let c = &self.config;
        Ok(Box::new(Near {
            hasher: MinHasher::new(c.num_perm, c.ngram, c.seed),
            config: c.clone(),
            state,
            replay: Replay::default(),
            unsettled: HashMap::new(),
            carry: Carry::default(),
        }))
    }
}

/// One partition's `dedup_near`.
pub struct Near {
    config: NearConfig,
    hasher: MinHasher,
    state: Arc<NearState>,
    replay: Replay,
    /// The rows this instance passed that have not yet settled downstream, by Kafka position:
    /// their band keys and original.
    unsettled: HashMap<(i32, i64), (Vec<u64>, Original)>,
    carry: Carry<(Vec<u32>, Vec<u64>)>,
}

/// The best accepted match of a signature among its LSH candidates.
struct Match {
    id: u64,
    similarity: f64,
    record: Vec<u8>,
}

impl Near {
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        rows: &Rows<'_>,
        i: usize,
        sig: &[u32],
        keys: &[u64],
        disk: &DiskBands,
        docs: &DiskDocs,
        next_from_disk: u64,
        pending: &mut Layered<NearPending>,
        unsettled: &[Original],
        batch_ids: &mut HashSet<u64>,
    ) -> Result<Option<Decision>, redb::Error> {
        if keys.is_empty() {
            return Ok(Some(Decision::Accept));
        }
        let mut filter = lock(&self.state.tables.filter);
        let mut best: Option<Match> = None;
        for id in pending.candidates(keys, disk, &filter)? {
            let Some(record) = pending.doc(id, docs)? else {
                continue;
            };
            let s = estimate(&stored_signature(&record), sig);
            if s < self.config.threshold {
                continue;
            }
            let unsettled = batch_ids.contains(&id)
                || Original::decode(&record)
                    .is_some_and(|o| unsettled.iter().any(|u| u.same_row(&o)));
            if unsettled {
                // A near copy of a text passed moments ago: wait until that one has settled.
                return Ok(None);
            }
            if best.as_ref().is_none_or(|b| s > b.similarity) {
                best = Some(Match {
                    id,
                    similarity: s,
                    record,
                });
            }
        }
        if let Some(Match {
            id,
            similarity,
            mut record,
        }) = best
        {
            let Some(mut orig) = Original::decode(&record) else {
                return Ok(Some(Decision::Accept));
            };
            let (d, changed) = duplicate_decision(
                self.config.flood.as_ref(),
                "duplicate_near",
                rows,
                i,
                &mut orig,
                Some(similarity),
            );
            if changed {
                let mut head = Vec::with_capacity(ORIGINAL_BYTES);
                orig.encode(&mut head);
                record[..ORIGINAL_BYTES].copy_from_slice(&head);
                pending.current.docs.insert(id, Some(record));
            }
            return Ok(Some(d));
        }
        let pending = &mut pending.current;
        let id = pending.next_id.unwrap_or(next_from_disk);
        pending.next_id = Some(id + 1);
        let mut record = Vec::with_capacity(ORIGINAL_BYTES + sig.len() * 4);
        Original::of_row(rows, i).encode(&mut record);
        for v in sig {
            record.extend_from_slice(&v.to_le_bytes());
        }
        pending.docs.insert(id, Some(record));
        for k in keys {
            pending.buckets.push(*k, id);
            filter.insert(*k);
        }
        batch_ids.insert(id);
        Ok(Some(Decision::Accept))
    }
}

/// Removes the rows that have settled from `unsettled`; returns those refused.
fn take_settled<V>(unsettled: &mut HashMap<(i32, i64), V>, settled: &Settled) -> Vec<V> {
    let done: Vec<(i32, i64)> = unsettled
        .keys()
        .filter(|p| settled.all || settled.refused.contains(p) || settled.kept.contains(p))
        .copied()
        .collect();
    done.into_iter()
        .filter_map(|p| {
            let v = unsettled.remove(&p)?;
            settled.refused.contains(&p).then_some(v)
        })
        .collect()
}

/// Per-row work done before deciding (keys, signatures), kept for the rows [`Decided::finish`]
/// hands back, so a row is prepared once however many times it waits.
struct Carry<T> {
    carried: Option<((i32, i64), Vec<T>)>,
}

impl<T> Default for Carry<T> {
    fn default() -> Self {
        Self { carried: None }
    }
}

impl<T> Carry<T> {
    /// The prepared values of `rows`: carried over when `rows` is the rest handed back last
    /// time, else `prepare(i)` for each row.
    fn take_or(&mut self, rows: &Rows<'_>, prepare: impl FnMut(usize) -> T) -> Vec<T> {
        if let Some((first, v)) = self.carried.take() {
            if !rows.is_empty()
                && first == (rows.partition.value(0), rows.offset.value(0))
                && v.len() == rows.len()
            {
                return v;
            }
        }
        (0..rows.len()).map(prepare).collect()
    }

    /// Keeps the values of the rows from `decided` on (the ones deferred).
    fn keep_rest(&mut self, rows: &Rows<'_>, decided: usize, mut values: Vec<T>) {
        if decided < rows.len() {
            let first = (rows.partition.value(decided), rows.offset.value(decided));
            self.carried = Some((first, values.split_off(decided)));
        }
    }
}

/// A dedup stage's batch once decided (the first `decisions.len()` rows of it).
struct Decided<'a> {
    batch: &'a RecordBatch,
    rows: &'a Rows<'a>,
    decisions: &'a [Decision],
    db: &'a StateDb,
}

impl Decided<'_> {
    /// Remembers the rows passed as unsettled (with `remember(prepared value)`), sends
    /// them on and refuses the others, hands the undecided rest back to the runtime (see
    /// [`Collector::defer`]) with its prepared values, and lets the state spill if it must.
    fn finish<T, U>(
        &self,
        unsettled: &mut HashMap<(i32, i64), (U, Original)>,
        carry: &mut Carry<T>,
        prepared: Vec<T>,
        remember: impl Fn(&T) -> U,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let rows = self.rows;
        for (i, d) in self.decisions.iter().enumerate() {
            if matches!(d, Decision::Accept) {
                let position = (rows.partition.value(i), rows.offset.value(i));
                unsettled.insert(
                    position,
                    (remember(&prepared[i]), Original::of_row(rows, i)),
                );
            }
        }
        self.db
            .relieve_memory()
            .map_err(|e| op_err(&ctx.stage, e))?;
        route(self.batch, rows, self.decisions, |_| true, ctx, out)?;
        let (decided, n) = (self.decisions.len(), self.batch.num_rows());
        if decided < n {
            out.defer(self.batch.slice(decided, n - decided));
        }
        carry.keep_rest(rows, decided, prepared);
        Ok(())
    }
}

fn stored_signature(record: &[u8]) -> Vec<u32> {
    record
        .get(ORIGINAL_BYTES..)
        .unwrap_or(&[])
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

impl Operator for Near {
    fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let rows = Rows::new(&batch, &ctx.stage)?;
        let stage = ctx.stage.clone();
        let err = |e: &dyn std::fmt::Display| op_err(&stage, e);
        // Signatures and band keys outside the lock.
        let (bands, r) = (self.config.bands, self.config.rows);
        let hasher = &mut self.hasher;
        let prepared: Vec<(Vec<u32>, Vec<u64>)> = self.carry.take_or(&rows, |i| {
            let sig = hasher.signature(rows.content.value(i));
            if sig.0.iter().all(|v| *v == u64::MAX) {
                return (Vec::new(), Vec::new());
            }
            let scope = xxh3_64(rows.datanet.value(i).as_bytes());
            (sig.truncated(), band_keys(&sig.0, bands, r, scope))
        });
        let state = self.state.clone();
        let _deciding = state.db.deciding();
        let txn = state.db.db().begin_read().map_err(|e| err(&e))?;
        let disk = state.tables.bands.reader(&txn).map_err(|e| err(&e))?;
        let docs = DiskDocs::open(&state.tables, &txn).map_err(|e| err(&e))?;
        let next_from_disk = txn
            .open_table(state.tables.meta_def())
            .map_err(|e| err(&e))?
            .get("next_id")
            .map_err(|e| err(&e))?
            .map_or(0, |v| v.value());
        let mut pending = lock(&state.tables.pending);
        let mut replay = std::mem::take(&mut self.replay);
        // Passed and not yet settled: earlier batches' rows and this batch's replayed ones, and
        // the documents this batch added.
        let mut unsettled: Vec<Original> =
            self.unsettled.values().map(|(_, o)| o.clone()).collect();
        let mut batch_ids = HashSet::new();
        let decisions = decide_rows(
            &state.db,
            &state.journal,
            &mut replay,
            &rows,
            &stage,
            |i, replayed| {
                if let Some(d) = replayed {
                    if matches!(d, Decision::Accept) {
                        unsettled.push(Original::of_row(&rows, i));
                    }
                    return Ok(Some(d));
                }
                let (sig, keys) = &prepared[i];
                self.decide(
                    &rows,
                    i,
                    sig,
                    keys,
                    &disk,
                    &docs,
                    next_from_disk,
                    &mut pending,
                    &unsettled,
                    &mut batch_ids,
                )
            },
        );
        drop(unsettled);
        self.replay = replay;
        let decisions = decisions?;
        drop(pending);
        drop(_deciding);
        let done = Decided {
            batch: &batch,
            rows: &rows,
            decisions: &decisions,
            db: &state.db,
        };
        done.finish(
            &mut self.unsettled,
            &mut self.carry,
            prepared,
            |(_, band_keys)| band_keys.clone(),
            ctx,
            out,
        )
    }

    fn on_settled(
        &mut self,
        settled: &Settled,
        ctx: &mut OperatorContext,
    ) -> Result<(), OperatorError> {
        let refused = take_settled(&mut self.unsettled, settled);
        if refused.is_empty() {
            return Ok(());
        }
        // Refused after this stage: forget the document and its band entries. It is found
        // through its band keys (a replayed row does not know the id it was given).
        let state = &self.state;
        let err = |e: &dyn std::fmt::Display| op_err(&ctx.stage, e);
        let _deciding = state.db.deciding();
        let txn = state.db.db().begin_read().map_err(|e| err(&e))?;
        let disk = state.tables.bands.reader(&txn).map_err(|e| err(&e))?;
        let docs = DiskDocs::open(&state.tables, &txn).map_err(|e| err(&e))?;
        let mut pending = lock(&state.tables.pending);
        let filter = lock(&state.tables.filter);
        for (keys, row) in refused {
            for id in pending
                .candidates(&keys, &disk, &filter)
                .map_err(|e| err(&e))?
            {
                let record = pending.doc(id, &docs).map_err(|e| err(&e))?;
                if !record.is_some_and(|r| Original::decode(&r).is_some_and(|o| o.same_row(&row))) {
                    continue;
                }
                let current = &mut pending.current;
                // Its band entries on disk stay; they lead to no record (see band_runs).
                current.docs.insert(id, None);
                for k in &keys {
                    current.buckets.remove(*k, id);
                }
            }
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        b: &Barrier,
        ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<Option<Vec<u8>>, OperatorError> {
        barrier(&self.state.db, &self.state.journal, b, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    #[test]
    fn documents_read_back_from_chunks_and_rewrites_over_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let tables = Arc::new(NearTables {
            bands: RunTables::new("near")
                .open(db.db(), "near/band_index")
                .unwrap(),
            docs: "near/docs".into(),
            chunks: "near/doc_chunks".into(),
            meta: "near/meta".into(),
            pending: Mutex::new(Layered::default()),
            filter: Mutex::new(KeyFilter::with_capacity(0)),
        });
        db.ensure_table(tables.docs_def()).unwrap();
        db.ensure_table(tables.chunks_def()).unwrap();
        db.ensure_table(tables.meta_def()).unwrap();
        // A document of a state file from before chunks: one entry per document.
        let w = db.db().begin_write().unwrap();
        w.open_table(tables.docs_def())
            .unwrap()
            .insert(3, b"legacy".as_slice())
            .unwrap();
        w.open_table(tables.meta_def())
            .unwrap()
            .insert("next_id", 4)
            .unwrap();
        w.commit().unwrap();
        db.register(tables.clone());
        let record = |id: u64, round: u8| {
            // The size of a record of 112 hashes, give or take a few bytes.
            let mut r = vec![round; ORIGINAL_BYTES + 448];
            r.extend_from_slice(&id.to_le_bytes()[..(id % 7) as usize]);
            r
        };
        let mut model: HashMap<u64, Option<Vec<u8>>> =
            HashMap::from([(3, Some(b"legacy".to_vec()))]);
        let set = |id: u64, v: Option<Vec<u8>>, model: &mut HashMap<u64, Option<Vec<u8>>>| {
            let mut p = lock(&tables.pending);
            p.current.docs.insert(id, v.clone());
            p.current.next_id = Some(p.current.next_id.unwrap_or(4).max(id + 1));
            model.insert(id, v);
        };
        // New documents, two forgotten and one rewritten before they were written.
        for id in 4..154 {
            set(id, Some(record(id, 1)), &mut model);
        }
        set(20, None, &mut model);
        set(100, Some(record(100, 2)), &mut model);
        set(153, None, &mut model);
        db.flush(true).unwrap();
        // Rewritten after they were stored, one in the legacy table; and new ones.
        set(5, Some(record(5, 3)), &mut model);
        set(70, None, &mut model);
        set(3, None, &mut model);
        for id in 154..160 {
            set(id, Some(record(id, 3)), &mut model);
        }
        db.flush(false).unwrap();
        set(6, Some(record(6, 4)), &mut model);
        db.flush(true).unwrap();
        let txn = db.db().begin_read().unwrap();
        let disk = DiskDocs::open(&tables, &txn).unwrap();
        for id in 0..200 {
            let want = model.get(&id).cloned().flatten();
            assert_eq!(disk.get(id).unwrap(), want, "document {id}");
            assert_eq!(lock(&tables.pending).doc(id, &disk).unwrap(), want);
        }
        // Chunks of at most BLOCK_BYTES, not one entry per document: 150 documents of ~512
        // bytes in five, the six of the second flush in one.
        assert_eq!(disk.chunks.len().unwrap(), 6);
        for c in disk.chunks.iter().unwrap() {
            assert!(c.unwrap().1.value().len() <= crate::runs::BLOCK_BYTES);
        }
    }

    #[test]
    fn buckets_hold_what_a_map_of_vectors_holds() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut b = Buckets::default();
        let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
        for step in 0..20_000u64 {
            let key = rng.gen_range(0..300u64);
            if rng.gen_bool(0.3) {
                let ids = model.get(&key).cloned().unwrap_or_default();
                let id = if ids.is_empty() || rng.gen_bool(0.2) {
                    step
                } else {
                    ids[rng.gen_range(0..ids.len())]
                };
                b.remove(key, id);
                if let Some(v) = model.get_mut(&key) {
                    v.retain(|x| *x != id);
                }
            } else {
                b.push(key, step);
                model.entry(key).or_default().push(step);
            }
        }
        model.retain(|_, v| !v.is_empty());
        for key in 0..300 {
            let mut got: Vec<u64> = b.ids(key).collect();
            let mut want = model.get(&key).cloned().unwrap_or_default();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "key {key}");
        }
        let mut keys: Vec<u64> = b.keys().collect();
        keys.sort_unstable();
        let mut want: Vec<u64> = model.keys().copied().collect();
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(b.len(), model.len());
        let mut entries: Vec<(u64, u64)> = b.entries().collect();
        entries.sort_unstable();
        let mut want: Vec<(u64, u64)> = model
            .iter()
            .flat_map(|(k, ids)| ids.iter().map(move |id| (*k, *id)))
            .collect();
        want.sort_unstable();
        assert_eq!(entries, want);
    }

    #[test]
    fn chunk_records_round_trip() {
        let records: Vec<Vec<u8>> = (0..70).map(|i| vec![i as u8; (i * 13) % 9]).collect();
        let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let chunk = encode_chunk(&refs);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(chunk_record(&chunk, i as u64), Some(r.as_slice()));
        }
        assert_eq!(chunk_record(&chunk, 70), None);
        assert_eq!(chunk_record(&chunk[..10], 3), None);
        assert_eq!(chunk_record(&[], 0), None);
    }

    #[test]
    fn the_band_filter_holds_the_keys_on_disk_and_in_both_layers() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let runs = RunTables::new("near")
            .open(db.db(), "near/band_index")
            .unwrap();
        // Keys on disk, in a frozen layer and in the current one.
        let on_disk: Vec<u64> = (0..1000).map(|_| rng.gen()).collect();
        let mut entries: Vec<(u64, u64)> = on_disk
            .iter()
            .enumerate()
            .map(|(id, k)| (*k, id as u64))
            .collect();
        entries.sort_unstable();
        let txn = db.db().begin_write().unwrap();
        runs.append(&txn, &entries).unwrap();
        txn.commit().unwrap();
        let mut pending = Layered::<NearPending>::default();
        let frozen: Vec<u64> = (0..1000).map(|_| rng.gen()).collect();
        for k in &frozen {
            pending.current.buckets.push(*k, 1);
        }
        pending.freeze();
        let current: Vec<u64> = (0..1000).map(|_| rng.gen()).collect();
        for k in &current {
            pending.current.buckets.push(*k, 2);
        }
        let rtxn = db.db().begin_read().unwrap();
        let disk = runs.reader(&rtxn).unwrap();
        let f = band_filter(0, &disk, &pending).unwrap();
        assert_eq!(f.keys(), 3000);
        assert!(on_disk
            .iter()
            .chain(&frozen)
            .chain(&current)
            .all(|k| f.may_contain(*k)));
        let false_positives = (0..100_000).filter(|_| f.may_contain(rng.gen())).count();
        assert!(false_positives < 500, "{false_positives} of 100000");
    }
}
