//! The LSH band index of `dedup_near` on disk: sorted runs of `(band key, document id)` pairs,
//! written whole at each flush and merged in the background of later ones (a log-structured
//! merge), instead of one B-tree insert per pair at a random place.
//!
//! Every accepted document adds one entry per band (14 by default). Inserted one by one into a
//! B-tree keyed by band key, each lands on a random leaf: at 200,000 documents that was the
//! largest single cost of a flush. Here a flush sorts its pending entries and appends them as a
//! new run of fixed-size blocks (128 entries, 2 KiB) under increasing keys `(run, block)`: a
//! sequential write. Runs are merged pairwise, newest first, while the newer holds at least as
//! many entries as the one before it (a binary counter), so run sizes fall and a lookup searches
//! at most ~log₂(entries / smallest run) runs; each entry is rewritten about that many times over
//! its life.
//!
//! A lookup reads one block per run: the first key of every block is kept in memory (8 bytes
//! per 128 entries), so the block that may hold a key is found without reading the disk. Most
//! lookups never get here: the stage's Bloom filter of band keys answers "absent" first.
//!
//! Runs live in the job's state store (redb), written in the flush's transaction, so they are
//! exactly as durable and as consistent with the other tables as before. The list of runs a
//! decision sees changes only when a flush releases its frozen layer (under the state's
//! exclusive gate, see [`crate::state`]): until then decisions read the frozen layer from memory
//! and the previous runs from their own read transaction.
//!
//! Entries of forgotten documents are not removed: a candidate whose document record is gone is
//! skipped, and such entries are few (texts refused after this stage).

use std::sync::Arc;

use redb::{ReadableTable, TableDefinition};

/// Entries per block.
const BLOCK: usize = 128;
const ENTRY: usize = 16;

/// One sorted run: its id, size and the first key of each block.
#[derive(Debug)]
pub struct Run {
    id: u64,
    entries: u64,
    firsts: Vec<u64>,
}

impl Run {
    fn encode_meta(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 8 * self.firsts.len());
        v.extend_from_slice(&self.entries.to_le_bytes());
        for f in &self.firsts {
            v.extend_from_slice(&f.to_le_bytes());
        }
        v
    }

    fn decode_meta(id: u64, v: &[u8]) -> Option<Self> {
        if v.len() < 8 || v.len() & 7 != 0 {
            return None;
        }
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
        Some(Self {
            id,
            entries: word(&v[..8]),
            firsts: v[8..].chunks_exact(8).map(word).collect(),
        })
    }
}

/// Names of the two tables of one stage's index.
#[derive(Debug, Clone)]
pub struct RunTables {
    /// (run, block) → block of entries.
    blocks: String,
    /// run → entry count ‖ first key of each block.
    runs: String,
}

type BlocksDef<'a> = TableDefinition<'a, (u64, u32), &'static [u8]>;
type RunsDef<'a> = TableDefinition<'a, u64, &'static [u8]>;

impl RunTables {
    pub fn new(prefix: &str) -> Self {
        Self {
            blocks: format!("{prefix}/band_blocks"),
            runs: format!("{prefix}/band_runs"),
        }
    }
    fn blocks_def(&self) -> BlocksDef<'_> {
        TableDefinition::new(&self.blocks)
    }
    fn runs_def(&self) -> RunsDef<'_> {
        TableDefinition::new(&self.runs)
    }

    /// Creates the tables if needed, moves the entries of a `legacy` B-tree index (`(band key,
    /// doc id) → ()`, the layout before runs) into a run and drops it, and loads the runs.
    pub fn open(&self, db: &redb::Database, legacy: &str) -> Result<BandRuns, redb::Error> {
        let txn = db.begin_write()?;
        let mut next_id = 0;
        let mut live = Vec::new();
        {
            let runs = txn.open_table(self.runs_def())?;
            txn.open_table(self.blocks_def())?;
            for entry in runs.iter()? {
                let (id, meta) = entry?;
                let id = id.value();
                let run = Run::decode_meta(id, meta.value()).ok_or_else(|| {
                    redb::Error::Corrupted(format!("band run {id}: bad metadata"))
                })?;
                next_id = next_id.max(id + 1);
                live.push(Arc::new(run));
            }
        }
        let legacy_def: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new(legacy);
        let old: Vec<(u64, u64)> = match txn.open_table(legacy_def) {
            Ok(t) => t
                .iter()?
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?,
            Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let migrated = !old.is_empty();
        if migrated {
            // Runs are searched oldest first only for speed; order does not matter for results.
            live.push(Arc::new(self.write_run(&txn, next_id, &old)?));
            next_id += 1;
        }
        let _ = txn.delete_table(legacy_def)?;
        txn.commit()?;
        Ok(BandRuns {
            live,
            staged: None,
            next_id,
            tables: self.clone(),
        })
    }

    fn write_run(
        &self,
        txn: &redb::WriteTransaction,
        id: u64,
        sorted: &[(u64, u64)],
    ) -> Result<Run, redb::Error> {
        let mut blocks = txn.open_table(self.blocks_def())?;
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
        let run = Run {
            id,
            entries: sorted.len() as u64,
            firsts,
        };
        txn.open_table(self.runs_def())?
            .insert(id, run.encode_meta().as_slice())?;
        Ok(run)
    }

    /// Merges runs `a` and `b` (by blocks, never holding either whole) into run `id`, and
    /// deletes them.
    fn merge(
        &self,
        txn: &redb::WriteTransaction,
        id: u64,
        a: &Run,
        b: &Run,
    ) -> Result<Run, redb::Error> {
        let mut blocks = txn.open_table(self.blocks_def())?;
        let mut cursors = [Cursor::new(a), Cursor::new(b)];
        let mut firsts = Vec::new();
        let mut out: Vec<u8> = Vec::with_capacity(BLOCK * ENTRY);
        let mut entries = 0u64;
        loop {
            for c in &mut cursors {
                c.fill(&blocks)?;
            }
            let next = match (cursors[0].peek(), cursors[1].peek()) {
                (None, None) => break,
                (Some(x), None) => (0, x),
                (None, Some(y)) => (1, y),
                (Some(x), Some(y)) => {
                    if x <= y {
                        (0, x)
                    } else {
                        (1, y)
                    }
                }
            };
            cursors[next.0].pos += 1;
            let (k, d) = next.1;
            if out.is_empty() {
                firsts.push(k);
            }
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&d.to_le_bytes());
            entries += 1;
            if out.len() == BLOCK * ENTRY {
                blocks.insert((id, firsts.len() as u32 - 1), out.as_slice())?;
                out.clear();
            }
        }
        if !out.is_empty() {
            blocks.insert((id, firsts.len() as u32 - 1), out.as_slice())?;
        }
        for run in [a, b] {
            for block in 0..run.firsts.len() as u32 {
                blocks.remove((run.id, block))?;
            }
        }
        let mut runs = txn.open_table(self.runs_def())?;
        runs.remove(a.id)?;
        runs.remove(b.id)?;
        let run = Run {
            id,
            entries,
            firsts,
        };
        runs.insert(id, run.encode_meta().as_slice())?;
        Ok(run)
    }

    /// The on-disk index as seen by `txn` and the runs `runs` (those live for the decision).
    pub fn reader(
        &self,
        txn: &redb::ReadTransaction,
        runs: Vec<Arc<Run>>,
    ) -> Result<DiskBands, redb::Error> {
        Ok(DiskBands {
            blocks: txn.open_table(self.blocks_def())?,
            runs,
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

    fn fill(
        &mut self,
        blocks: &redb::Table<'_, (u64, u32), &'static [u8]>,
    ) -> Result<(), redb::Error> {
        if self.pos < self.entries.len() || self.next_block as usize >= self.run.firsts.len() {
            return Ok(());
        }
        let block = blocks.get((self.run.id, self.next_block))?.ok_or_else(|| {
            redb::Error::Corrupted(format!(
                "band run {} lacks block {}",
                self.run.id, self.next_block
            ))
        })?;
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
    bytes.chunks_exact(ENTRY).map(|e| {
        (
            u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(e[8..].try_into().expect("8 bytes")),
        )
    })
}

/// The runs of one stage: those decisions see, and those a flush has written but not released.
pub struct BandRuns {
    live: Vec<Arc<Run>>,
    staged: Option<(Vec<Arc<Run>>, u64)>,
    next_id: u64,
    tables: RunTables,
}

/// What a flush needs to write the next runs, taken from [`BandRuns`] without holding it.
pub struct RunWriter {
    runs: Vec<Arc<Run>>,
    next_id: u64,
    tables: RunTables,
}

impl BandRuns {
    /// The runs a decision reads (stable while the decision holds the state's gate).
    pub fn live(&self) -> Vec<Arc<Run>> {
        self.live.clone()
    }

    /// Entries over the live runs.
    pub fn entries(&self) -> u64 {
        self.live.iter().map(|r| r.entries).sum()
    }

    pub fn writer(&self) -> RunWriter {
        RunWriter {
            runs: self.live.clone(),
            next_id: self.next_id,
            tables: self.tables.clone(),
        }
    }

    /// A flush has written `w`'s runs (not yet committed).
    pub fn stage(&mut self, w: RunWriter) {
        self.staged = Some((w.runs, w.next_id));
    }

    /// The flush that staged runs has committed: decisions see them from now on.
    pub fn release(&mut self) {
        if let Some((runs, next_id)) = self.staged.take() {
            self.live = runs;
            self.next_id = next_id;
        }
    }
}

impl RunWriter {
    /// Appends `sorted` (sorted by key, then id) as a new run, then merges the newest runs
    /// while the newer one holds at least as many entries as the one before it.
    pub fn append(
        &mut self,
        txn: &redb::WriteTransaction,
        sorted: &[(u64, u64)],
    ) -> Result<(), redb::Error> {
        if sorted.is_empty() {
            return Ok(());
        }
        let run = self.tables.write_run(txn, self.next_id, sorted)?;
        self.next_id += 1;
        self.runs.push(Arc::new(run));
        while let [.., older, newer] = self.runs.as_slice() {
            if newer.entries < older.entries {
                break;
            }
            let merged = self.tables.merge(txn, self.next_id, older, newer)?;
            self.next_id += 1;
            self.runs.truncate(self.runs.len() - 2);
            self.runs.push(Arc::new(merged));
        }
        Ok(())
    }
}

/// The on-disk index for one decision.
pub struct DiskBands {
    blocks: redb::ReadOnlyTable<(u64, u32), &'static [u8]>,
    runs: Vec<Arc<Run>>,
}

impl DiskBands {
    /// Calls `found` with the id of every entry of `key`.
    pub fn ids(&self, key: u64, mut found: impl FnMut(u64)) -> Result<(), redb::Error> {
        for run in &self.runs {
            // Entries of `key` start in the last block whose first key is below it, or in the
            // first block whose first key is it.
            let mut b = run.firsts.partition_point(|f| *f < key).saturating_sub(1);
            while b < run.firsts.len() && run.firsts[b] <= key {
                let Some(block) = self.blocks.get((run.id, b as u32))? else {
                    return Err(redb::Error::Corrupted(format!(
                        "band run {} lacks block {b}",
                        run.id
                    )));
                };
                let bytes = block.value();
                let n = bytes.len() / ENTRY;
                let key_at = |i: usize| {
                    u64::from_le_bytes(bytes[i * ENTRY..i * ENTRY + 8].try_into().expect("8"))
                };
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
                    found(u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8")));
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
        let mut runs = tables.open(&db, "near/band_index").unwrap();
        let mut model: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let hot = [7u64, 1 << 40, u64::MAX];
        let mut id = 0u64;
        for flush in 0..12 {
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
            let txn = db.begin_write().unwrap();
            let mut w = runs.writer();
            w.append(&txn, &entries).unwrap();
            runs.stage(w);
            txn.commit().unwrap();
            runs.release();
            let sizes: Vec<u64> = runs.live.iter().map(|r| r.entries).collect();
            assert!(
                sizes.windows(2).all(|w| w[1] < w[0]),
                "flush {flush}: run sizes {sizes:?} not decreasing"
            );
            let rtxn = db.begin_read().unwrap();
            let disk = tables.reader(&rtxn, runs.live()).unwrap();
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
        }
        // Reopened: the same runs.
        drop(runs);
        let reopened = tables.open(&db, "near/band_index").unwrap();
        assert_eq!(reopened.entries(), id);
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
        assert_eq!(runs.entries(), 1000);
        let rtxn = db.begin_read().unwrap();
        assert!(matches!(
            rtxn.open_table(legacy),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
        let disk = tables.reader(&rtxn, runs.live()).unwrap();
        let mut got = Vec::new();
        disk.ids(5, |d| got.push(d)).unwrap();
        assert_eq!(got, (0..1000).filter(|i| i % 37 == 5).collect::<Vec<_>>());
    }
}
