//! The LSH band index of `dedup_near` on disk: sorted runs of `(band key, document id)` pairs,
//! written whole at each flush and merged in the background of later ones (a log-structured
//! merge), instead of one B-tree insert per pair at a random place.
//!
//! Every accepted document adds one entry per band (14 by default). Inserted one by one into a
//! B-tree keyed by band key, each lands on a random leaf: at 200,000 documents that was the
//! largest single cost of a flush. Here a flush sorts its pending entries and appends them as a
//! new run of fixed-size blocks (just under 16 KiB, [`crate::runs::BLOCK_BYTES`]) under
//! increasing keys `(run, block)`: a sequential write. Runs merge four at a time
//! ([`crate::runs`], which also keeps the catalogue of runs). (A binary counter, pairwise merges, rewrote every entry twice as often: at
//! 1,000,000 documents its merges were most of the time a flush took.)
//!
//! A lookup reads one block per run: the first key of every block is kept in memory (8 bytes
//! per 1,020 entries), so the block that may hold a key is found without reading the disk. Most
//! lookups never get here: the stage's Bloom filter of band keys answers "absent" first, so
//! more runs cost little.
//!
//! Runs live in the job's state store (redb), written in the flush's transaction, so they are
//! exactly as durable and as consistent with the other tables as before. A decision takes the
//! list of runs from its own read transaction (a table of a few small keys; each run's block
//! index is cached by id), so the runs it searches are those of its snapshot even when a flush
//! commits a merge meanwhile; entries not yet on disk it finds in the pending layers
//! ([`crate::state`]).
//!
//! Entries of forgotten documents are not removed: a candidate whose document record is gone is
//! skipped, and such entries are few (texts refused after this stage).

use std::sync::Arc;

use redb::{ReadableTable, TableDefinition};

pub use crate::runs::FANOUT;
use crate::runs::{Blocks, Catalog, ReadBlocks};

const ENTRY: usize = 16;
/// Entries per block (earlier versions wrote 128; readers take a block's length as it is).
const BLOCK: usize = crate::runs::BLOCK_BYTES / ENTRY;

type Run = crate::runs::Run<u64>;

fn word(c: &[u8]) -> u64 {
    u64::from_le_bytes(c.try_into().expect("8 bytes"))
}

/// Names of the tables of one stage's index.
#[derive(Debug, Clone)]
pub struct RunTables {
    prefix: String,
}

impl RunTables {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// Creates the tables if needed and moves the entries of a `legacy` B-tree index (`(band
    /// key, doc id) → ()`, the layout before runs) into a run, dropping it.
    pub fn open(&self, db: &redb::Database, legacy: &str) -> Result<BandRuns, redb::Error> {
        let p = &self.prefix;
        let runs = BandRuns {
            catalog: Catalog::new(
                format!("{p}/band_blocks"),
                format!("{p}/band_runs"),
                format!("{p}/band_firsts"),
            ),
        };
        let txn = db.begin_write()?;
        runs.catalog.create(&txn)?;
        let legacy_def: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new(legacy);
        // (A write transaction opens a missing table as an empty one.)
        let old: Vec<(u64, u64)> = txn
            .open_table(legacy_def)?
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        if !old.is_empty() {
            runs.append(&txn, &old)?;
        }
        txn.delete_table(legacy_def)?;
        txn.commit()?;
        Ok(runs)
    }
}

fn write_run(blocks: &mut Blocks<'_>, id: u64, sorted: &[(u64, u64)]) -> Result<Run, redb::Error> {
    let mut firsts = Vec::with_capacity(sorted.len().div_ceil(BLOCK));
    let mut buf = Vec::with_capacity(BLOCK * ENTRY);
    for (b, chunk) in sorted.chunks(BLOCK).enumerate() {
        buf.clear();
        for (k, d) in chunk {
            buf.extend_from_slice(&k.to_le_bytes());
            buf.extend_from_slice(&d.to_le_bytes());
        }
        firsts.push(chunk[0].0);
        blocks.insert((id, b as u32), buf.as_slice())?;
    }
    Ok(Run {
        id,
        entries: sorted.len() as u64,
        firsts,
    })
}

/// Merges `runs` into run `id`, block by block, never holding any whole.
fn merge(blocks: &mut Blocks<'_>, id: u64, runs: &[Arc<Run>]) -> Result<Run, redb::Error> {
    let mut cursors: Vec<Cursor<'_>> = runs.iter().map(|r| Cursor::new(r)).collect();
    let mut out = Output {
        id,
        firsts: Vec::new(),
        block: Vec::with_capacity(BLOCK * ENTRY),
        entries: 0,
    };
    loop {
        // The cursor with the least entry, and the least entry of the others: everything of
        // that cursor's block up to it goes out in one stretch.
        let mut least: Option<(usize, (u64, u64))> = None;
        let mut bound: Option<(u64, u64)> = None;
        for (i, c) in cursors.iter_mut().enumerate() {
            c.fill(blocks)?;
            let Some(e) = c.peek() else { continue };
            match least {
                Some((_, l)) if e >= l => bound = Some(bound.map_or(e, |b| b.min(e))),
                _ => {
                    bound = least.map(|(_, l)| bound.map_or(l, |b| b.min(l)));
                    least = Some((i, e));
                }
            }
        }
        let Some((i, _)) = least else {
            break;
        };
        let c = &mut cursors[i];
        while let Some(e) = c.peek() {
            if bound.is_some_and(|b| e > b) {
                break;
            }
            out.push(blocks, e)?;
            c.pos += 1;
        }
    }
    out.finish(blocks)
}

/// The run a merge writes, one block at a time.
struct Output {
    id: u64,
    firsts: Vec<u64>,
    block: Vec<u8>,
    entries: u64,
}

impl Output {
    fn push(&mut self, blocks: &mut Blocks<'_>, (k, d): (u64, u64)) -> Result<(), redb::Error> {
        if self.block.is_empty() {
            self.firsts.push(k);
        }
        self.block.extend_from_slice(&k.to_le_bytes());
        self.block.extend_from_slice(&d.to_le_bytes());
        self.entries += 1;
        if self.block.len() == BLOCK * ENTRY {
            self.write(blocks)?;
        }
        Ok(())
    }

    fn write(&mut self, blocks: &mut Blocks<'_>) -> Result<(), redb::Error> {
        blocks.insert(
            (self.id, self.firsts.len() as u32 - 1),
            self.block.as_slice(),
        )?;
        self.block.clear();
        Ok(())
    }

    fn finish(mut self, blocks: &mut Blocks<'_>) -> Result<Run, redb::Error> {
        if !self.block.is_empty() {
            self.write(blocks)?;
        }
        Ok(Run {
            id: self.id,
            entries: self.entries,
            firsts: self.firsts,
        })
    }
}

/// Reads one run block by block during a merge.
struct Cursor<'r> {
    run: &'r Run,
    next_block: u32,
    entries: Vec<(u64, u64)>,
    pos: usize,
}

impl<'r> Cursor<'r> {
    fn new(run: &'r Run) -> Self {
        Self {
            run,
            next_block: 0,
            entries: Vec::new(),
            pos: 0,
        }
    }

    fn fill(&mut self, blocks: &Blocks<'_>) -> Result<(), redb::Error> {
        if self.pos < self.entries.len() || self.next_block as usize >= self.run.firsts.len() {
            return Ok(());
        }
        let block = crate::runs::block(blocks, "band", self.run.id, self.next_block)?;
        self.entries.clear();
        self.entries.extend(decode_block(block.value()));
        self.pos = 0;
        self.next_block += 1;
        Ok(())
    }

    fn peek(&self) -> Option<(u64, u64)> {
        self.entries.get(self.pos).copied()
    }
}

fn decode_block(bytes: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    bytes
        .chunks_exact(ENTRY)
        .map(|e| (word(&e[..8]), word(&e[8..])))
}

/// One stage's index: its catalogue of runs ([`crate::runs`]).
pub struct BandRuns {
    catalog: Catalog<u64>,
}

impl BandRuns {
    /// The index as `txn` sees it.
    pub fn reader(&self, txn: &redb::ReadTransaction) -> Result<DiskBands, redb::Error> {
        let (blocks, runs) = self.catalog.read(txn)?;
        Ok(DiskBands { blocks, runs })
    }

    /// Appends `sorted` (sorted by key, then id) to the index in `txn` as a new run, then
    /// merges runs by the policy of [`crate::runs`].
    pub fn append(
        &self,
        txn: &redb::WriteTransaction,
        sorted: &[(u64, u64)],
    ) -> Result<(), redb::Error> {
        if sorted.is_empty() {
            return Ok(());
        }
        self.catalog.append(
            txn,
            |blocks, id| write_run(blocks, id, sorted),
            |blocks, id, runs, _oldest| merge(blocks, id, runs),
        )
    }
}

/// The on-disk index for one decision.
pub struct DiskBands {
    blocks: ReadBlocks,
    runs: Vec<Arc<Run>>,
}

impl DiskBands {
    /// Entries over all runs.
    pub fn entries(&self) -> u64 {
        self.runs.iter().map(|r| r.entries).sum()
    }

    /// Calls `found` with the id of every entry of `key`.
    pub fn ids(&self, key: u64, mut found: impl FnMut(u64)) -> Result<(), redb::Error> {
        for run in &self.runs {
            // Entries of `key` start in the last block whose first key is below it, or in the
            // first block whose first key is it.
            let mut b = run.firsts.partition_point(|f| *f < key).saturating_sub(1);
            while b < run.firsts.len() && run.firsts[b] <= key {
                let block = crate::runs::block(&self.blocks, "band", run.id, b as u32)?;
                let bytes = block.value();
                let n = bytes.len() / ENTRY;
                let key_at = |i: usize| word(&bytes[i * ENTRY..i * ENTRY + 8]);
                let mut lo = 0;
                let mut hi = n;
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if key_at(mid) < key {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                let mut i = lo;
                while i < n && key_at(i) == key {
                    let at = i * ENTRY + 8;
                    found(word(&bytes[at..at + 8]));
                    i += 1;
                }
                // Only when the key runs to the end of this block can it go on in the next.
                if i < n {
                    break;
                }
                b += 1;
            }
        }
        Ok(())
    }

    /// Calls `each` with the key of every entry on disk.
    pub fn each_key(&self, mut each: impl FnMut(u64)) -> Result<(), redb::Error> {
        for run in &self.runs {
            for block in self.blocks.range((run.id, 0)..(run.id, u32::MAX))? {
                for (k, _) in decode_block(block?.1.value()) {
                    each(k);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use redb::ReadableDatabase;
    use std::collections::BTreeMap;

    /// Appends batches of entries (some keys with hundreds of ids, so they span blocks) through
    /// flushes and merges; every key's ids are found, and absent keys find nothing.
    #[test]
    fn runs_find_every_entry_through_appends_and_merges() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let tables = RunTables::new("near");
        let runs = tables.open(&db, "near/band_index").unwrap();
        let mut model: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let hot = [7u64, 1 << 40, u64::MAX];
        let mut id = 0u64;
        for flush in 0..40 {
            let mut entries = Vec::new();
            for _ in 0..rng.gen_range(1..3000) {
                let k = if rng.gen_bool(0.1) {
                    hot[rng.gen_range(0..hot.len())]
                } else {
                    rng.gen_range(0..1_000_000u64) << 20
                };
                entries.push((k, id));
                model.entry(k).or_default().push(id);
                id += 1;
            }
            entries.sort_unstable();
            // A reader of the snapshot before this flush keeps its runs through the merges.
            let before = db.begin_read().unwrap();
            let txn = db.begin_write().unwrap();
            runs.append(&txn, &entries).unwrap();
            txn.commit().unwrap();
            let old = runs.reader(&before).unwrap();
            let mut seen = 0;
            old.each_key(|_| seen += 1).unwrap();
            assert_eq!(seen, id - entries.len() as u64);
            for (k, _) in entries.iter().step_by(97) {
                old.ids(*k, |_| ()).unwrap();
            }
            let rtxn = db.begin_read().unwrap();
            let disk = runs.reader(&rtxn).unwrap();
            let sizes: Vec<u64> = disk.runs.iter().map(|r| r.entries).collect();
            assert!(
                sizes
                    .windows(FANOUT)
                    .all(|w| w[1..].iter().sum::<u64>() < w[0]),
                "flush {flush}: run sizes {sizes:?}: a run holds no more than the three after it"
            );
            for (k, ids) in &model {
                let mut got = Vec::new();
                disk.ids(*k, |d| got.push(d)).unwrap();
                got.sort_unstable();
                assert_eq!(&got, ids, "flush {flush}, key {k}");
            }
            for _ in 0..200 {
                let k = (rng.gen_range(0..1_000_000u64) << 20) | 1;
                let mut got = 0;
                disk.ids(k, |_| got += 1).unwrap();
                assert_eq!(got, 0);
            }
            let mut keys = 0;
            disk.each_key(|_| keys += 1).unwrap();
            assert_eq!(keys, id);
            if flush == 39 {
                assert!(sizes.len() <= 12, "40 flushes left {} runs", sizes.len());
            }
        }
        // Reopened: the same runs.
        drop(runs);
        let reopened = tables.open(&db, "near/band_index").unwrap();
        let rtxn = db.begin_read().unwrap();
        assert_eq!(reopened.reader(&rtxn).unwrap().entries(), id);
    }

    #[test]
    fn a_legacy_b_tree_index_becomes_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let legacy: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new("near/band_index");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(legacy).unwrap();
            for i in 0..1000u64 {
                t.insert((i % 37, i), ()).unwrap();
            }
        }
        txn.commit().unwrap();
        let tables = RunTables::new("near");
        let runs = tables.open(&db, "near/band_index").unwrap();
        let rtxn = db.begin_read().unwrap();
        assert_eq!(runs.reader(&rtxn).unwrap().entries(), 1000);
        assert!(matches!(
            rtxn.open_table(legacy),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        let disk = runs.reader(&rtxn).unwrap();
        let mut got = Vec::new();
        disk.ids(5, |d| got.push(d)).unwrap();
        assert_eq!(got, (0..1000).filter(|i| i % 37 == 5).collect::<Vec<_>>());
    }
}
