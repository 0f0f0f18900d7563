//! What the sorted-run stores on disk ([`crate::band_runs`], [`crate::key_runs`]) share: the
//! catalogue of runs (three redb tables), the block index of each run cached by id, and the
//! merge policy. What a run's blocks hold, and how runs merge, is each store's own.
//!
//! Tables: `blocks` maps `(run, block)` to a block of entries, `runs` maps a run's id to its
//! entry count (the runs of the store as of a transaction), `firsts` maps it to the first key
//! of each of its blocks. A run is immutable once written and ids only grow, so a run's block
//! index is cached by id; which runs make up the store is always read from the transaction at
//! hand, so a reader searches the runs of its own snapshot whatever merges commit meanwhile.
//!
//! Merge policy: after a new run, the newest [`FANOUT`] runs merge into one while the newer
//! three of them hold at least as many entries as the oldest (a base-4 counter: every run holds
//! more entries than the three after it together). Each entry is rewritten about log₄(entries /
//! flush) times over its life, and a store has at most about 3·log₄ of that many runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redb::{ReadableTable, TableDefinition};

/// Runs merged at once.
pub const FANOUT: usize = 4;

/// Most bytes of a block. redb gives a leaf a page of 4 KiB × 2ⁿ and never puts a second entry
/// on a leaf the first one already fills past half, so a block just under a power of two (with
/// its key and the leaf's header, under 64 bytes) fills its page: 2 KiB blocks had a 4 KiB page
/// each, half of every run's bytes on disk empty. At 16 KiB a flush or a merge also makes an
/// eighth of the B-tree inserts it did, and a lookup reads 16 KiB from the page cache.
pub const BLOCK_BYTES: usize = 16 * 1024 - 64;

/// The blocks table, open in a write transaction.
pub type Blocks<'t> = redb::Table<'t, (u64, u32), &'static [u8]>;
/// The blocks table, open in a read transaction.
pub type ReadBlocks = redb::ReadOnlyTable<(u64, u32), &'static [u8]>;
/// Runs, oldest first.
pub type Runs<F> = Vec<Arc<Run<F>>>;

type BlocksDef<'a> = TableDefinition<'a, (u64, u32), &'static [u8]>;
type RunsDef<'a> = TableDefinition<'a, u64, u64>;
type FirstsDef<'a> = TableDefinition<'a, u64, &'static [u8]>;

/// The first key of a block, as kept in memory and in the `firsts` table.
pub trait FirstKey: Copy + Send + Sync + 'static {
    const BYTES: usize;
    fn put(&self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

impl FirstKey for u64 {
    const BYTES: usize = 8;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(bytes: &[u8]) -> Self {
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
}

impl FirstKey for [u8; 16] {
    const BYTES: usize = 16;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn get(bytes: &[u8]) -> Self {
        bytes.try_into().expect("16 bytes")
    }
}

/// Block `block` of run `run` of the `what` store (a run lacking one of its blocks is a corrupt
/// store).
pub fn block<'t>(
    blocks: &'t impl ReadableTable<(u64, u32), &'static [u8]>,
    what: &str,
    run: u64,
    block: u32,
) -> Result<redb::AccessGuard<'t, &'static [u8]>, redb::Error> {
    blocks
        .get((run, block))?
        .ok_or_else(|| redb::Error::Corrupted(format!("{what} run {run} lacks block {block}")))
}

/// One sorted run: its id, size and the first key of each block.
#[derive(Debug)]
pub struct Run<F> {
    pub id: u64,
    pub entries: u64,
    pub firsts: Vec<F>,
}

/// The catalogue of one store's runs.
pub struct Catalog<F> {
    blocks: String,
    runs: String,
    firsts: String,
    cache: Mutex<HashMap<u64, Arc<Run<F>>>>,
}

impl<F: FirstKey> Catalog<F> {
    pub fn new(blocks: String, runs: String, firsts: String) -> Self {
        Self {
            blocks,
            runs,
            firsts,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn blocks_def(&self) -> BlocksDef<'_> {
        TableDefinition::new(&self.blocks)
    }
    fn runs_def(&self) -> RunsDef<'_> {
        TableDefinition::new(&self.runs)
    }
    fn firsts_def(&self) -> FirstsDef<'_> {
        TableDefinition::new(&self.firsts)
    }

    /// Creates the tables if they do not exist.
    pub fn create(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        txn.open_table(self.runs_def())?;
        txn.open_table(self.firsts_def())?;
        txn.open_table(self.blocks_def())?;
        Ok(())
    }

    /// The runs as of `runs` (oldest first: ids grow with age), from the cache or `firsts`.
    fn runs_of(
        &self,
        runs: &impl ReadableTable<u64, u64>,
        firsts: &impl ReadableTable<u64, &'static [u8]>,
    ) -> Result<Vec<Arc<Run<F>>>, redb::Error> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for entry in runs.iter()? {
            let (id, entries) = entry?;
            let (id, entries) = (id.value(), entries.value());
            if let Some(run) = cache.get(&id) {
                out.push(run.clone());
                continue;
            }
            let bytes = firsts.get(id)?.ok_or_else(|| {
                redb::Error::Corrupted(format!("{}: run {id} has no block index", self.runs))
            })?;
            let run = Arc::new(Run {
                id,
                entries,
                firsts: bytes.value().chunks_exact(F::BYTES).map(F::get).collect(),
            });
            cache.insert(id, run.clone());
            out.push(run);
        }
        Ok(out)
    }

    /// The blocks table and the runs (oldest first) as `txn` sees them.
    pub fn read(&self, txn: &redb::ReadTransaction) -> Result<(ReadBlocks, Runs<F>), redb::Error> {
        let runs = txn.open_table(self.runs_def())?;
        let firsts = txn.open_table(self.firsts_def())?;
        Ok((
            txn.open_table(self.blocks_def())?,
            self.runs_of(&runs, &firsts)?,
        ))
    }

    fn record(&self, txn: &redb::WriteTransaction, run: &Run<F>) -> Result<(), redb::Error> {
        txn.open_table(self.runs_def())?
            .insert(run.id, run.entries)?;
        let mut firsts = Vec::with_capacity(run.firsts.len() * F::BYTES);
        for f in &run.firsts {
            f.put(&mut firsts);
        }
        txn.open_table(self.firsts_def())?
            .insert(run.id, firsts.as_slice())?;
        Ok(())
    }

    /// Adds the run `write` makes (given its id), then merges the newest [`FANOUT`] runs with
    /// `merge` (given the new id, the runs oldest first, and whether no run is older) while
    /// the newer ones together hold at least as many entries as the oldest; the runs merged
    /// are deleted (readers of earlier transactions still see them: redb's snapshots).
    pub fn append(
        &self,
        txn: &redb::WriteTransaction,
        write: impl FnOnce(&mut Blocks<'_>, u64) -> Result<Run<F>, redb::Error>,
        mut merge: impl FnMut(&mut Blocks<'_>, u64, &[Arc<Run<F>>], bool) -> Result<Run<F>, redb::Error>,
    ) -> Result<(), redb::Error> {
        let mut runs = {
            let runs = txn.open_table(self.runs_def())?;
            let firsts = txn.open_table(self.firsts_def())?;
            self.runs_of(&runs, &firsts)?
        };
        let mut next_id = runs.last().map_or(0, |r| r.id + 1);
        let mut blocks = txn.open_table(self.blocks_def())?;
        let run = write(&mut blocks, next_id)?;
        self.record(txn, &run)?;
        next_id += 1;
        runs.push(Arc::new(run));
        let mut merged_away = Vec::new();
        while runs.len() >= FANOUT {
            let at = runs.len() - FANOUT;
            let tail = &runs[at..];
            let newer: u64 = tail[1..].iter().map(|r| r.entries).sum();
            if newer < tail[0].entries {
                break;
            }
            let merged = merge(&mut blocks, next_id, tail, at == 0)?;
            next_id += 1;
            for r in tail {
                for block in 0..r.firsts.len() as u32 {
                    blocks.remove((r.id, block))?;
                }
            }
            {
                let mut all_runs = txn.open_table(self.runs_def())?;
                let mut all_firsts = txn.open_table(self.firsts_def())?;
                for r in tail {
                    all_runs.remove(r.id)?;
                    all_firsts.remove(r.id)?;
                }
            }
            self.record(txn, &merged)?;
            merged_away.extend(tail.iter().map(|r| r.id));
            runs.truncate(at);
            runs.push(Arc::new(merged));
        }
        // Readers of older snapshots that still need the runs merged away read their block
        // index back from their snapshot.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for id in merged_away {
            cache.remove(&id);
        }
        if let Some(run) = runs.last() {
            cache.insert(run.id, run.clone());
        }
        Ok(())
    }
}
