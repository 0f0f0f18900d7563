//! Durable state shared by the partitions of a stateful stage: an embedded on-disk store
//! (redb, one file per job) fronted by in-memory tables, plus a journal of decisions that makes a
//! replay after a crash decide exactly as the first run did.
//!
//! # Why a journal
//!
//! A Datanet is deduplicated against everything it has ever accepted, whatever Kafka partition
//! each contribution came through, so the state of `verify`, `exact` and `near` is one per job and
//! shared by the pipelines of all the partitions a process holds. Partitions checkpoint
//! independently, so on restart a partition replays records whose effects other partitions have
//! already seen (a duplicate in partition 3 was refused because the original in partition 1 was
//! accepted, and partition 1 had not committed yet). Every decision is therefore written to a
//! journal keyed by the record's Kafka position, in the same store transaction as the state it
//! changed. A replayed record finds its decision there and repeats it; records not in the journal
//! were never decided against durable state and are decided afresh. Journal entries below a
//! partition's committed offset can never be replayed and are pruned at its next barrier.
//!
//! # Durability and memory
//!
//! Changes accumulate in memory and are written in one transaction by [`StateDb::flush`]: on
//! every barrier of any partition (made durable before the partition's checkpoint commits, so a
//! committed decision never depends on state that could be lost) and whenever the in-memory part
//! passes its budget. A flush sets the changes aside ([`Layered`]) and writes them while the
//! partitions go on deciding, reading them from memory until the write has committed: decisions
//! stop only for the moments the flush swaps layers. What is on disk is read through redb's page cache, whose size is the state's
//! memory budget (`state.cache_bytes`); the state itself can grow far beyond RAM.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::operator::OperatorError;

/// A job's stage state on local disk.
pub struct StateDb {
    db: Database,
    path: PathBuf,
    /// Everything that writes to the database registers here so one flush covers all of it.
    writers: Mutex<Vec<Arc<dyn Flushable>>>,
    /// Serialises flushes (redb allows one write transaction at a time anyway).
    flush_lock: Mutex<()>,
    /// Decisions hold it shared; a flush holds it exclusively while it sets the changes aside
    /// and while it lets them go after its commit, so a decision reads every change either from
    /// memory or from disk.
    gate: RwLock<()>,
    max_pending: std::sync::atomic::AtomicUsize,
    /// A non-durable flush happened since the last durable one.
    undurable: std::sync::atomic::AtomicBool,
    /// Flushes are numbered as they begin; `durable_done` is the number of the latest one after
    /// which everything was durable. A durable flush asked for at a barrier is skipped when one
    /// that began after the request has completed (group commit: the partitions' barriers share
    /// fsyncs).
    tickets: std::sync::atomic::AtomicU64,
    durable_done: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish()
    }
}

/// Why the state store failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {detail}")]
    Db { path: String, detail: String },
}

impl StateError {
    fn db(path: &Path, e: impl std::fmt::Display) -> Self {
        StateError::Db {
            path: path.display().to_string(),
            detail: e.to_string(),
        }
    }
}

/// Something with in-memory changes to write into a transaction, in three steps.
pub trait Flushable: Send + Sync {
    /// Sets the pending changes aside for the flush that begins (no decision runs meanwhile);
    /// decisions keep reading them until [`Flushable::release`].
    fn freeze(&self);
    /// Writes the changes set aside into `txn` (decisions run meanwhile).
    fn write_frozen(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error>;
    /// The flush has committed: the changes set aside are on disk and can go (no decision runs
    /// meanwhile). Returns them, to be dropped after decisions may run again: freeing millions
    /// of small allocations is not for the exclusive gate.
    fn release(&self) -> Released;
    /// Bytes of pending changes held in memory, not counting those set aside (approximate).
    fn pending_bytes(&self) -> usize;
    /// What it is, for the log line of a flush.
    fn name(&self) -> &str;
}

/// What [`Flushable::release`] lets go, dropped outside the gate.
pub type Released = Option<Box<dyn Send>>;

/// The in-memory changes of a stage's tables in two layers: `current` takes new changes;
/// `frozen` holds the ones a flush in progress is writing, which decisions read (after
/// `current`, before the disk) until the write has committed.
#[derive(Default)]
pub struct Layered<P> {
    pub current: P,
    pub frozen: Option<Arc<P>>,
}

/// The changes one layer holds.
pub trait Pending: Default {
    /// What the next layer starts from when this one is frozen: running values that are not
    /// changes (a next id, a window bound); nothing by default.
    fn next_layer(&self) -> Self {
        Self::default()
    }
}

impl<P: Pending> Layered<P> {
    /// Moves `current` aside as the frozen layer; returns it.
    pub fn freeze(&mut self) -> Arc<P> {
        let next = self.current.next_layer();
        let p = Arc::new(std::mem::replace(&mut self.current, next));
        self.frozen = Some(p.clone());
        p
    }

    /// The frozen layer, for writing.
    pub fn frozen(&self) -> Option<Arc<P>> {
        self.frozen.clone()
    }

    /// Lets the frozen layer go (it is on disk); returns it to be dropped by the caller.
    pub fn release(&mut self) -> Released
    where
        P: Send + Sync + 'static,
    {
        self.frozen.take().map(|p| Box::new(p) as Box<dyn Send>)
    }

    /// The newest answer of `f` over the layers: `current`, then `frozen`.
    pub fn find<'a, T>(&'a self, f: impl Fn(&'a P) -> Option<T>) -> Option<T> {
        f(&self.current).or_else(|| self.frozen.as_deref().and_then(f))
    }
}

impl StateDb {
    /// Opens (creating it if needed) the state file `dir/state.redb`, with `cache_bytes` of page
    /// cache. A second process opening the same file fails: one process owns a job's state.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Arc<StateDb>, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::db(dir, e))?;
        let path = dir.join("state.redb");
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StateError::db(
                    &path,
                    "already open in another process: one process runs a job with stateful stages",
                ),
                e => StateError::db(&path, e),
            })?;
        Ok(Arc::new(StateDb {
            db,
            path,
            writers: Mutex::new(Vec::new()),
            flush_lock: Mutex::new(()),
            gate: RwLock::new(()),
            max_pending: std::sync::atomic::AtomicUsize::new(64 << 20),
            undurable: std::sync::atomic::AtomicBool::new(false),
            tickets: std::sync::atomic::AtomicU64::new(0),
            durable_done: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database, for reads (`begin_read`).
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Includes `w` in every flush from now on.
    pub fn register(&self, w: Arc<dyn Flushable>) {
        lock(&self.writers).push(w);
    }

    /// Held while deciding a batch: state read from memory or disk is consistent meanwhile.
    pub fn deciding(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every registered writer's pending changes in one transaction, durably (fsync) when
    /// `durable`.
    pub fn flush(&self, durable: bool) -> Result<(), StateError> {
        use std::sync::atomic::Ordering::SeqCst;
        // Every decision of the caller was made before this point: any flush that begins later
        // covers them.
        let needed = self.tickets.load(SeqCst) + 1;
        let _one = lock(&self.flush_lock);
        if durable && self.durable_done.load(SeqCst) >= needed {
            return Ok(());
        }
        let writers = lock(&self.writers).clone();
        let (ticket, bytes) = {
            let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let ticket = self.tickets.fetch_add(1, SeqCst) + 1;
            // Nothing pending and nothing written since the last durable flush: nothing to do
            // (the stages of one barrier all ask; the first one's flush covers the others).
            let pending: usize = writers.iter().map(|w| w.pending_bytes()).sum();
            if pending == 0 && (!durable || !self.undurable.load(SeqCst)) {
                if durable {
                    self.durable_done.fetch_max(ticket, SeqCst);
                }
                return Ok(());
            }
            for w in &writers {
                w.freeze();
            }
            (ticket, pending)
        };
        let started = std::time::Instant::now();
        let err = |e: redb::Error| StateError::db(&self.path, e);
        let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| StateError::db(&self.path, e))?;
        let mut spent = Vec::with_capacity(writers.len() + 1);
        for w in &writers {
            let t = std::time::Instant::now();
            w.write_frozen(&txn).map_err(err)?;
            spent.push(format!("{} {:.3}", w.name(), t.elapsed().as_secs_f64()));
        }
        let t = std::time::Instant::now();
        txn.commit().map_err(|e| err(e.into()))?;
        spent.push(format!("commit {:.3}", t.elapsed().as_secs_f64()));
        let released: Vec<Released> = {
            let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
            writers.iter().map(|w| w.release()).collect()
        };
        drop(released);
        self.undurable.store(!durable, SeqCst);
        if durable {
            self.durable_done.fetch_max(ticket, SeqCst);
        }
        tracing::debug!(
            durable,
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            spent = spent.join(", "),
            "state written"
        );
        Ok(())
    }

    /// Pending changes are written (not durably) once they pass `bytes`.
    pub fn set_max_pending_bytes(&self, bytes: usize) {
        self.max_pending
            .store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes pending changes when they have grown past the budget (call after a batch, holding
    /// no lock of the state).
    pub fn relieve_memory(&self) -> Result<(), StateError> {
        if self.pending_bytes() > self.max_pending.load(std::sync::atomic::Ordering::Relaxed) {
            self.flush(false)?;
        }
        Ok(())
    }

    /// Pending in-memory bytes over all writers.
    pub fn pending_bytes(&self) -> usize {
        lock(&self.writers).iter().map(|w| w.pending_bytes()).sum()
    }

    /// An error of this store.
    pub fn error(&self, e: impl std::fmt::Display) -> StateError {
        StateError::db(&self.path, e)
    }

    /// Bytes of the state file on disk.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Makes sure `table` exists, so read transactions can open it.
    pub fn ensure_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: TableDefinition<'_, K, V>,
    ) -> Result<(), StateError> {
        let _one = lock(&self.flush_lock);
        let txn = self
            .db
            .begin_write()
            .map_err(|e| StateError::db(&self.path, e))?;
        txn.open_table(def)
            .map_err(|e| StateError::db(&self.path, e))?;
        txn.commit().map_err(|e| StateError::db(&self.path, e))?;
        Ok(())
    }
}

/// The one shared state of a stateful stage, made when its first instance is.
pub struct SharedSlot<S> {
    slot: Mutex<Option<(Weak<StateDb>, Arc<S>)>>,
}

impl<S> Default for SharedSlot<S> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<S> SharedSlot<S> {
    /// The state living in `db`, made by `init` the first time.
    pub fn get_or_init(
        &self,
        db: &Arc<StateDb>,
        init: impl FnOnce() -> Result<Arc<S>, StateError>,
    ) -> Result<Arc<S>, StateError> {
        let mut slot = lock(&self.slot);
        if let Some((weak, s)) = slot.as_ref() {
            if weak.upgrade().is_some_and(|d| Arc::ptr_eq(&d, db)) {
                return Ok(s.clone());
            }
        }
        let s = init()?;
        *slot = Some((Arc::downgrade(db), s.clone()));
        Ok(s)
    }
}

/// Locks a mutex; a poisoned one (a panic elsewhere) still holds consistent data here because
/// every critical section either completes or leaves only in-memory changes behind.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a stage decided for one record, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    Accept,
    Reject {
        reason: String,
        detail: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duplicate_of: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        similarity: Option<f64>,
        /// Other contributors penalised by this decision (a flood's earlier members).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        also_penalise: Vec<String>,
    },
}

impl Decision {
    pub fn reject(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Decision::Reject {
            reason: reason.into(),
            detail: detail.into(),
            duplicate_of: None,
            similarity: None,
            also_penalise: Vec::new(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Decision::Accept => Vec::new(),
            d => serde_json::to_vec(d).expect("decisions serialise"),
        }
    }

    fn decode(bytes: &[u8]) -> Option<Decision> {
        if bytes.is_empty() {
            Some(Decision::Accept)
        } else {
            serde_json::from_slice(bytes).ok()
        }
    }
}

/// The journal of one stage: decisions by Kafka (partition, offset), pending ones in memory.
///
/// On disk a flush writes one entry per partition: the decisions it took, packed (offsets as
/// deltas, an accepted record's decision empty: about two bytes a record), keyed by
/// `(partition, last offset)`. Pruning drops the entries that end below a partition's committed
/// offset and rewrites the one that straddles it. (One B-tree entry per decision, the layout
/// before, cost every record an insert and a delete in each stateful stage: ~4 % of the cleaning
/// job's CPU.)
pub struct Journal {
    table: String,
    pending: Mutex<Layered<JournalPending>>,
}

/// The decisions of one partition in one layer, in the order taken.
#[derive(Default)]
struct PartitionLog {
    offsets: Vec<i64>,
    /// End of each decision's encoding in `bytes`.
    ends: Vec<u32>,
    bytes: Vec<u8>,
}

impl PartitionLog {
    fn push(&mut self, offset: i64, decision: &[u8]) {
        self.offsets.push(offset);
        self.bytes.extend_from_slice(decision);
        self.ends.push(self.bytes.len() as u32);
    }

    /// (offset, encoded decision) in the order recorded.
    fn iter(&self) -> impl Iterator<Item = (i64, &[u8])> + '_ {
        self.offsets.iter().enumerate().map(|(i, &o)| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
            (o, &self.bytes[start..self.ends[i] as usize])
        })
    }
}

#[derive(Default)]
struct JournalPending {
    decisions: BTreeMap<i32, PartitionLog>,
    bytes: usize,
    /// Per partition: journal entries below this offset are committed and can go.
    prune_below: HashMap<i32, i64>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// A journal entry: `(offset, decision)` pairs by ascending offset, each offset a delta from the
/// one before (the first from 0), each decision its length and bytes.
fn pack<'a>(decisions: impl IntoIterator<Item = (i64, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0i64;
    for (o, d) in decisions {
        put_varint(&mut out, (o - prev) as u64);
        put_varint(&mut out, d.len() as u64);
        out.extend_from_slice(d);
        prev = o;
    }
    out
}

/// The pairs of a journal entry, `None` where it is cut short.
fn unpack(bytes: &[u8]) -> impl Iterator<Item = Option<(i64, &[u8])>> + '_ {
    let mut at = 0;
    let mut prev = 0i64;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let item = (|| {
            let o = prev.checked_add(get_varint(bytes, &mut at)? as i64)?;
            let len = get_varint(bytes, &mut at)? as usize;
            let d = bytes.get(at..at.checked_add(len)?)?;
            at += len;
            prev = o;
            Some((o, d))
        })();
        if item.is_none() {
            at = bytes.len();
        }
        Some(item)
    })
}

impl Journal {
    /// The journal of stage `stage`, registered with `db` for flushes. A journal in the layout
    /// before (`{stage}/journal`, one entry per decision) is packed at open.
    pub fn open(db: &StateDb, stage: &str) -> Result<Arc<Journal>, StateError> {
        let j = Arc::new(Journal {
            table: format!("{stage}/journal_packed"),
            pending: Mutex::new(Layered::default()),
        });
        let err = |e: redb::Error| StateError::db(db.path(), e);
        {
            let _one = lock(&db.flush_lock);
            let txn = db.db.begin_write().map_err(|e| err(e.into()))?;
            let legacy_name = format!("{stage}/journal");
            let legacy: TableDefinition<'_, (i32, i64), &'static [u8]> =
                TableDefinition::new(&legacy_name);
            {
                let old = txn.open_table(legacy).map_err(|e| err(e.into()))?;
                let mut parts: BTreeMap<i32, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
                for item in old.iter().map_err(|e| err(e.into()))? {
                    let (k, v) = item.map_err(|e| err(e.into()))?;
                    let (p, o) = k.value();
                    parts.entry(p).or_default().push((o, v.value().to_vec()));
                }
                let mut t = txn.open_table(j.def()).map_err(|e| err(e.into()))?;
                for (p, ds) in parts {
                    let last = ds.last().map_or(0, |(o, _)| *o);
                    let packed = pack(ds.iter().map(|(o, d)| (*o, d.as_slice())));
                    t.insert((p, last), packed.as_slice())
                        .map_err(|e| err(e.into()))?;
                }
            }
            txn.delete_table(legacy).map_err(|e| err(e.into()))?;
            txn.commit().map_err(|e| err(e.into()))?;
        }
        db.register(j.clone());
        Ok(j)
    }

    fn def(&self) -> TableDefinition<'_, (i32, i64), &'static [u8]> {
        TableDefinition::new(&self.table)
    }

    /// Records `decision` for the record at (`partition`, `offset`).
    pub fn record(&self, partition: i32, offset: i64, decision: &Decision) {
        let bytes = decision.encode();
        let p = &mut lock(&self.pending).current;
        p.bytes += bytes.len() + 12;
        p.decisions
            .entry(partition)
            .or_default()
            .push(offset, &bytes);
    }

    /// The decisions already taken for `partition` at or after `from` (durable or pending): what a
    /// pipeline resuming at `from` must repeat.
    pub fn replay_from(
        &self,
        db: &StateDb,
        partition: i32,
        from: i64,
    ) -> Result<BTreeMap<i64, Decision>, StateError> {
        let mut out = BTreeMap::new();
        let txn = db
            .db()
            .begin_read()
            .map_err(|e| StateError::db(db.path(), e))?;
        let t = txn
            .open_table(self.def())
            .map_err(|e| StateError::db(db.path(), e))?;
        let corrupt =
            || StateError::db(db.path(), format!("{}: an entry is cut short", self.table));
        // (An offset in two entries has the same decision in both: a replayed record's decision
        // is recorded again as it was.)
        for item in t
            .range((partition, from)..=(partition, i64::MAX))
            .map_err(|e| StateError::db(db.path(), e))?
        {
            let (_, v) = item.map_err(|e| StateError::db(db.path(), e))?;
            for pair in unpack(v.value()) {
                let (o, d) = pair.ok_or_else(corrupt)?;
                if o >= from {
                    if let Some(d) = Decision::decode(d) {
                        out.insert(o, d);
                    }
                }
            }
        }
        let p = lock(&self.pending);
        // Oldest first, so newer layers win.
        for layer in p.frozen.as_deref().into_iter().chain([&p.current]) {
            let Some(log) = layer.decisions.get(&partition) else {
                continue;
            };
            for (o, v) in log.iter() {
                if o >= from {
                    if let Some(d) = Decision::decode(v) {
                        out.insert(o, d);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Entries of `partition` below `offset` belong to a committed checkpoint: drop them at the
    /// next flush.
    pub fn committed_below(&self, partition: i32, offset: i64) {
        let p = &mut lock(&self.pending).current;
        let e = p.prune_below.entry(partition).or_insert(offset);
        *e = (*e).max(offset);
    }
}

impl Flushable for Journal {
    fn name(&self) -> &str {
        &self.table
    }

    fn freeze(&self) {
        lock(&self.pending).freeze();
    }

    fn write_frozen(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        let Some(p) = lock(&self.pending).frozen() else {
            return Ok(());
        };
        let mut t = txn.open_table(self.def())?;
        for (part, log) in &p.decisions {
            // By offset, the last decision recorded for an offset kept (a replayed record's
            // decision is recorded again).
            let mut pairs: Vec<(i64, &[u8])> = log.iter().collect();
            pairs.sort_by_key(|(o, _)| *o);
            let mut kept: Vec<(i64, &[u8])> = Vec::with_capacity(pairs.len());
            for pair in pairs {
                match kept.last_mut() {
                    Some(last) if last.0 == pair.0 => *last = pair,
                    _ => kept.push(pair),
                }
            }
            let Some(&(last, _)) = kept.last() else {
                continue;
            };
            // An entry of the same partition and last offset (a replay that decided nothing
            // new) is folded in, older decisions first.
            let mut packed = Vec::new();
            if let Some(old) = t.get((*part, last))? {
                let mut merged: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
                for pair in unpack(old.value()) {
                    let (o, d) = pair.ok_or_else(|| {
                        redb::Error::Corrupted(format!("{}: an entry is cut short", self.table))
                    })?;
                    merged.insert(o, d.to_vec());
                }
                for (o, d) in &kept {
                    merged.insert(*o, d.to_vec());
                }
                packed = pack(merged.iter().map(|(o, d)| (*o, d.as_slice())));
            }
            if packed.is_empty() {
                packed = pack(kept);
            }
            t.insert((*part, last), packed.as_slice())?;
        }
        for (part, below) in &p.prune_below {
            t.retain_in((*part, i64::MIN)..(*part, *below), |_, _| false)?;
            // The first entry left may begin below the committed offset: cut it.
            let straddling = match t.range((*part, *below)..=(*part, i64::MAX))?.next() {
                Some(item) => {
                    let (k, v) = item?;
                    let mut pairs = Vec::new();
                    let mut cut = false;
                    for pair in unpack(v.value()) {
                        let (o, d) = pair.ok_or_else(|| {
                            redb::Error::Corrupted(format!("{}: an entry is cut short", self.table))
                        })?;
                        if o < *below {
                            cut = true;
                        } else {
                            pairs.push((o, d.to_vec()));
                        }
                    }
                    cut.then(|| {
                        (
                            k.value(),
                            pack(pairs.iter().map(|(o, d)| (*o, d.as_slice()))),
                        )
                    })
                }
                None => None,
            };
            if let Some((key, packed)) = straddling {
                t.insert(key, packed.as_slice())?;
            }
        }
        Ok(())
    }

    fn release(&self) -> Released {
        lock(&self.pending).release()
    }

    fn pending_bytes(&self) -> usize {
        let p = &lock(&self.pending).current;
        p.bytes + p.prune_below.len() * 16
    }
}

impl Pending for JournalPending {}

/// The replay buffer of one partition's operator instance: decisions to repeat, loaded when the
/// instance sees its first record.
#[derive(Default)]
pub struct Replay {
    loaded: bool,
    decisions: BTreeMap<i64, Decision>,
}

impl Replay {
    /// The decision already taken for `offset`, if this is a replayed record.
    pub fn take(
        &mut self,
        journal: &Journal,
        db: &StateDb,
        partition: i32,
        offset: i64,
    ) -> Result<Option<Decision>, StateError> {
        if !self.loaded {
            self.decisions = journal.replay_from(db, partition, offset)?;
            self.loaded = true;
        }
        if self.decisions.is_empty() {
            return Ok(None);
        }
        Ok(self.decisions.remove(&offset))
    }
}

/// Decides the rows of a batch in order: `decide(i, replayed)` gets the journaled decision of a
/// replayed record in `replayed` (and must repeat it) and `None` for any other; every decision
/// is journaled (in the same flush as the state `decide` changed). `decide` returns `None` to
/// stop before row `i` (its outcome hangs on rows not yet settled downstream): the decisions
/// returned are then those of the rows before it. Call it holding [`StateDb::deciding`].
pub fn decide_rows(
    db: &StateDb,
    journal: &Journal,
    replay: &mut Replay,
    rows: &crate::rows::Rows<'_>,
    stage: &str,
    mut decide: impl FnMut(usize, Option<Decision>) -> Result<Option<Decision>, redb::Error>,
) -> Result<Vec<Decision>, OperatorError> {
    let mut decisions = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let (partition, offset) = (rows.partition.value(i), rows.offset.value(i));
        let replayed = replay
            .take(journal, db, partition, offset)
            .map_err(|e| op_err(stage, e))?;
        let Some(decision) = decide(i, replayed).map_err(|e| op_err(stage, e))? else {
            break;
        };
        journal.record(partition, offset, &decision);
        decisions.push(decision);
    }
    Ok(decisions)
}

/// The barrier of a stateful stage: journal entries of `partition` below the barrier's first
/// offset are committed, and the state is made durable before the partition's checkpoint.
pub fn barrier(
    db: &StateDb,
    journal: &Journal,
    barrier: &crate::operator::Barrier,
    ctx: &crate::operator::OperatorContext,
) -> Result<Option<Vec<u8>>, OperatorError> {
    journal.committed_below(ctx.partition, barrier.first_offset);
    db.flush(true).map_err(|e| op_err(&ctx.stage, e))?;
    Ok(None)
}

/// Converts a state failure into an operator failure of `stage` (the job restarts from its last
/// checkpoint).
pub fn op_err(stage: &str, e: impl std::fmt::Display) -> OperatorError {
    OperatorError::External {
        stage: stage.to_string(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose write checks what a decision could see at that moment.
    struct Probe {
        db: Mutex<Weak<StateDb>>,
        layers: Mutex<Layered<BTreeMap<u64, u64>>>,
        /// During the write: could a decision run, and what did it read for key 1.
        during_write: Mutex<Option<(bool, Option<u64>)>>,
    }

    impl Pending for BTreeMap<u64, u64> {}

    impl Probe {
        fn def() -> TableDefinition<'static, u64, u64> {
            TableDefinition::new("probe")
        }
    }

    impl Flushable for Probe {
        fn name(&self) -> &str {
            "probe"
        }

        fn freeze(&self) {
            lock(&self.layers).freeze();
        }
        fn write_frozen(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
            let db = lock(&self.db).upgrade().expect("db");
            let decides = db.gate.try_read().is_ok();
            let read = lock(&self.layers).find(|p| p.get(&1).copied());
            *lock(&self.during_write) = Some((decides, read));
            let Some(frozen) = lock(&self.layers).frozen() else {
                return Ok(());
            };
            let mut t = txn.open_table(Self::def())?;
            for (k, v) in frozen.iter() {
                t.insert(*k, *v)?;
            }
            Ok(())
        }
        fn release(&self) -> Released {
            lock(&self.layers).release()
        }
        fn pending_bytes(&self) -> usize {
            lock(&self.layers).current.len() * 16
        }
    }

    #[test]
    fn a_flush_writes_while_decisions_read_its_changes_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let probe = Arc::new(Probe {
            db: Mutex::new(Arc::downgrade(&db)),
            layers: Mutex::new(Layered::default()),
            during_write: Mutex::new(None),
        });
        db.ensure_table(Probe::def()).unwrap();
        db.register(probe.clone());
        lock(&probe.layers).current.insert(1, 10);
        db.flush(true).unwrap();
        // While the write ran, a decision could run and found the change in the frozen layer.
        assert_eq!(*lock(&probe.during_write), Some((true, Some(10))));
        // After the commit the layer is gone and the change is on disk.
        assert!(lock(&probe.layers).frozen.is_none());
        let txn = db.db().begin_read().unwrap();
        let t = txn.open_table(Probe::def()).unwrap();
        assert_eq!(t.get(1).unwrap().map(|v| v.value()), Some(10));
        // The current layer shadows the frozen one.
        let mut l = Layered::<BTreeMap<u64, u64>>::default();
        l.current.insert(1, 1);
        l.freeze();
        assert_eq!(l.find(|p| p.get(&1).copied()), Some(1));
        l.current.insert(1, 2);
        assert_eq!(l.find(|p| p.get(&1).copied()), Some(2));
    }

    #[test]
    fn journal_round_trip_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let j = Journal::open(&db, "exact").unwrap();
        j.record(0, 5, &Decision::Accept);
        j.record(0, 6, &Decision::reject("duplicate_exact", "same text"));
        j.record(1, 5, &Decision::Accept);
        // Pending decisions replay before a flush ...
        assert_eq!(j.replay_from(&db, 0, 0).unwrap().len(), 2);
        db.flush(true).unwrap();
        // ... and durable ones after it, from the requested offset on.
        let r = j.replay_from(&db, 0, 6).unwrap();
        assert_eq!(r.len(), 1);
        assert!(matches!(&r[&6], Decision::Reject { reason, .. } if reason == "duplicate_exact"));
        j.committed_below(0, 6);
        db.flush(false).unwrap();
        assert_eq!(j.replay_from(&db, 0, 0).unwrap().len(), 1);
        assert_eq!(j.replay_from(&db, 1, 0).unwrap().len(), 1);
    }

    /// Decisions recorded over many flushes, some records replayed (recorded again), partitions
    /// committed as they go: a resume at any offset at or after the committed one replays
    /// exactly the decisions taken from there, through reopens of the store.
    #[test]
    fn the_packed_journal_replays_what_was_decided() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let mut j = Journal::open(&db, "near").unwrap();
        let mut model: BTreeMap<(i32, i64), Decision> = BTreeMap::new();
        let mut next = [0i64; 3];
        let mut committed = [0i64; 3];
        for round in 0..60 {
            for _ in 0..rng.gen_range(0..200) {
                let p = rng.gen_range(0..3);
                let (o, d) = if rng.gen_bool(0.1) && next[p as usize] > committed[p as usize] {
                    // A replayed record: its decision again.
                    let o = rng.gen_range(committed[p as usize]..next[p as usize]);
                    let Some(d) = model.get(&(p, o)) else {
                        continue;
                    };
                    (o, d.clone())
                } else {
                    let o = next[p as usize];
                    next[p as usize] += rng.gen_range(1..4);
                    let d = if rng.gen_bool(0.8) {
                        Decision::Accept
                    } else {
                        Decision::reject("duplicate_exact", format!("round {round}"))
                    };
                    (o, d)
                };
                j.record(p, o, &d);
                model.insert((p, o), d);
            }
            if rng.gen_bool(0.3) {
                let p = rng.gen_range(0..3);
                let c = rng.gen_range(committed[p as usize]..=next[p as usize]);
                committed[p as usize] = c;
                j.committed_below(p, c);
            }
            db.flush(rng.gen_bool(0.5)).unwrap();
            if round % 20 == 19 {
                drop(j);
                drop(db);
                db = StateDb::open(dir.path(), 1 << 20).unwrap();
                j = Journal::open(&db, "near").unwrap();
            }
            for p in 0..3 {
                let from = rng.gen_range(committed[p as usize]..=next[p as usize]);
                let got = j.replay_from(&db, p, from).unwrap();
                let want: BTreeMap<i64, Decision> = model
                    .range((p, from)..=(p, i64::MAX))
                    .map(|((_, o), d)| (*o, d.clone()))
                    .collect();
                assert_eq!(got, want, "round {round}, partition {p} from {from}");
            }
        }
        // Pruning keeps the table to what may still be replayed.
        let txn = db.db().begin_read().unwrap();
        let t = txn.open_table(j.def()).unwrap();
        let mut entries = 0;
        for item in t.iter().unwrap() {
            let (k, _) = item.unwrap();
            let (p, last) = k.value();
            assert!(last >= committed[p as usize], "{p} {last} {committed:?}");
            entries += 1;
        }
        assert!(entries <= 3 * 60, "{entries} entries");
    }

    #[test]
    fn a_journal_of_one_entry_per_decision_is_packed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let legacy: TableDefinition<'_, (i32, i64), &'static [u8]> =
            TableDefinition::new("exact/journal");
        let refused = Decision::reject("duplicate_exact", "same text");
        let txn = db.db().begin_write().unwrap();
        {
            let mut t = txn.open_table(legacy).unwrap();
            for o in 0..100i64 {
                let d = if o % 7 == 0 {
                    refused.encode()
                } else {
                    Vec::new()
                };
                t.insert((o as i32 % 2, o), d.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        let j = Journal::open(&db, "exact").unwrap();
        let r = j.replay_from(&db, 0, 10).unwrap();
        assert_eq!(r.len(), 45);
        assert_eq!(r[&14], refused);
        assert_eq!(r[&12], Decision::Accept);
        let txn = db.db().begin_read().unwrap();
        assert!(matches!(
            txn.open_table(legacy),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn packed_entries_round_trip_and_cut_bytes_never_panic(
            pairs in proptest::collection::btree_map(0i64..1 << 40, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 0..30),
            cut in 0usize..2000,
        ) {
            let packed = pack(pairs.iter().map(|(o, d)| (*o, d.as_slice())));
            let back: Vec<(i64, Vec<u8>)> = unpack(&packed).map(|p| { let (o, d) = p.unwrap(); (o, d.to_vec()) }).collect();
            proptest::prop_assert_eq!(back, pairs.into_iter().collect::<Vec<_>>());
            let short = &packed[..cut.min(packed.len())];
            let _ = unpack(short).count();
        }
    }

    #[test]
    fn second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = StateDb::open(dir.path(), 1 << 20).unwrap();
        let e = StateDb::open(dir.path(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("already open"), "{e}");
    }
}
