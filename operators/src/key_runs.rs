//! A map of 16-byte hash keys to fixed-size values on disk as sorted runs: the exact-duplicate
//! keys of `dedup_exact` and the nonces of `verify`.
//!
//! Both were B-trees keyed by a hash, so every insert landed on a random leaf: once the tables
//! outgrew the page cache, each flush copied (redb is copy-on-write) and wrote back most of
//! their leaves for a few new keys on each, and at 1,000,000 contributions that was most of
//! what a flush wrote. Here, as for the band index ([`crate::band_runs`]), a flush sorts its
//! changes and appends them as one run of fixed-size blocks under increasing keys `(run,
//! block)`, and runs merge four at a time (the catalogue and the policy: [`crate::runs`]).
//!
//! It is a map: a key's newest entry wins. A lookup searches the runs newest first and stops at
//! the first entry for the key; an entry is a value or a tombstone (the key was forgotten). A
//! merge keeps the newest entry of each key, and drops tombstones when it reaches the oldest run
//! (nothing older is left for them to hide). The stages front lookups with a Bloom filter of
//! every key ([`crate::filter`]), so a key that was never stored, the usual case, reads nothing.
//!
//! Runs are written in the flush's transaction, so they are as durable and as consistent with the
//! other tables as before; a reader takes the list of runs from its own read transaction (each
//! run's block index is cached by id), so it searches the runs of its snapshot whatever merges
//! commit meanwhile.

use std::sync::Arc;

use redb::{ReadableTable, TableDefinition};

use crate::filter::{key64, KeyFilter};
pub use crate::runs::FANOUT;
use crate::runs::{Blocks, Catalog, ReadBlocks};

/// Bytes of a key.
pub const KEY: usize = 16;
use crate::runs::BLOCK_BYTES;

type LegacyDef<'a> = TableDefinition<'a, &'static [u8], &'static [u8]>;
type Run = crate::runs::Run<[u8; KEY]>;

/// A map of `KEY`-byte keys to `value_len`-byte values in sorted runs.
pub struct KeyRuns {
    catalog: Catalog<[u8; KEY]>,
    value_len: usize,
}

impl KeyRuns {
    /// Opens the map `name` (creating its tables), moving the entries of `legacy` (a B-tree
    /// `key → value`, the layout before runs) into a run and dropping it.
    pub fn open(
        db: &redb::Database,
        name: &str,
        value_len: usize,
        legacy: &str,
    ) -> Result<KeyRuns, redb::Error> {
        let map = KeyRuns {
            catalog: Catalog::new(
                format!("{name}/blocks"),
                format!("{name}/runs"),
                format!("{name}/firsts"),
            ),
            value_len,
        };
        let txn = db.begin_write()?;
        map.catalog.create(&txn)?;
        let legacy_def: LegacyDef<'_> = TableDefinition::new(legacy);
        // (A write transaction opens a missing table as an empty one; keys are in byte order.)
        let old: Vec<([u8; KEY], Option<Vec<u8>>)> = txn
            .open_table(legacy_def)?
            .iter()?
            .filter_map(|e| match e {
                Ok((k, v)) => {
                    let key: [u8; KEY] = k.value().try_into().ok()?;
                    let v = v.value();
                    (v.len() >= value_len).then(|| Ok((key, Some(v[..value_len].to_vec()))))
                }
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        if !old.is_empty() {
            map.append(&txn, &old)?;
        }
        txn.delete_table(legacy_def)?;
        txn.commit()?;
        Ok(map)
    }

    /// Bytes of an entry: key, tag (1 value, 0 tombstone), value.
    fn entry_len(&self) -> usize {
        KEY + 1 + self.value_len
    }

    fn per_block(&self) -> usize {
        (BLOCK_BYTES / self.entry_len()).max(1)
    }

    /// A Bloom filter of every key with an entry on disk, sized for twice as many.
    pub fn filter(&self, db: &redb::Database) -> Result<KeyFilter, redb::Error> {
        use redb::ReadableDatabase;
        let txn = db.begin_read()?;
        let reader = self.reader(&txn)?;
        let mut f = KeyFilter::with_capacity(2 * reader.entries());
        reader.each_key(|k| f.insert(key64(k)))?;
        Ok(f)
    }

    /// The map as `txn` sees it.
    pub fn reader(&self, txn: &redb::ReadTransaction) -> Result<KeyReader<'_>, redb::Error> {
        let (blocks, runs) = self.catalog.read(txn)?;
        Ok(KeyReader {
            map: self,
            blocks,
            runs,
        })
    }

    /// Appends `sorted` (strictly increasing keys; `None` forgets a key) as a new run, then
    /// merges runs by the policy of [`crate::runs`].
    pub fn append(
        &self,
        txn: &redb::WriteTransaction,
        sorted: &[([u8; KEY], Option<Vec<u8>>)],
    ) -> Result<(), redb::Error> {
        if sorted.is_empty() {
            return Ok(());
        }
        self.catalog.append(
            txn,
            |blocks, id| {
                let mut writer = RunWriter::new(self, id);
                for (k, v) in sorted {
                    writer.push(blocks, k, v.as_deref())?;
                }
                writer.finish(blocks)
            },
            |blocks, id, runs, oldest| self.merge(blocks, id, runs, oldest),
        )
    }

    /// Merges `runs` (oldest first) into run `id`, the newest entry of each key winning, block
    /// by block; tombstones go when `oldest` (no run is older than these).
    fn merge(
        &self,
        blocks: &mut Blocks<'_>,
        id: u64,
        runs: &[Arc<Run>],
        oldest: bool,
    ) -> Result<Run, redb::Error> {
        let mut cursors: Vec<Cursor<'_>> = runs.iter().map(|r| Cursor::new(r)).collect();
        let mut writer = RunWriter::new(self, id);
        let len = self.entry_len();
        loop {
            // The smallest key; among equal keys the newest run's (the highest index).
            let mut next: Option<(usize, [u8; KEY])> = None;
            for (i, c) in cursors.iter_mut().enumerate() {
                c.fill(blocks, len)?;
                if let Some(k) = c.key(len) {
                    if next.is_none_or(|(_, n)| k <= n) {
                        next = Some((i, k));
                    }
                }
            }
            let Some((newest, key)) = next else {
                break;
            };
            let entry = cursors[newest].entry(len);
            let value = (entry[KEY] == 1).then(|| &entry[KEY + 1..]);
            if value.is_some() || !oldest {
                writer.push(blocks, &key, value)?;
            }
            for c in &mut cursors {
                if c.key(len) == Some(key) {
                    c.pos += 1;
                }
            }
        }
        writer.finish(blocks)
    }
}

/// Writes one run block by block.
struct RunWriter<'m> {
    map: &'m KeyRuns,
    id: u64,
    firsts: Vec<[u8; KEY]>,
    block: Vec<u8>,
    in_block: usize,
    entries: u64,
}

impl<'m> RunWriter<'m> {
    fn new(map: &'m KeyRuns, id: u64) -> Self {
        Self {
            map,
            id,
            firsts: Vec::new(),
            block: Vec::with_capacity(BLOCK_BYTES),
            in_block: 0,
            entries: 0,
        }
    }

    fn push(
        &mut self,
        blocks: &mut Blocks<'_>,
        key: &[u8; KEY],
        value: Option<&[u8]>,
    ) -> Result<(), redb::Error> {
        if self.in_block == 0 {
            self.firsts.push(*key);
        }
        self.block.extend_from_slice(key);
        match value {
            Some(v) => {
                debug_assert_eq!(v.len(), self.map.value_len);
                self.block.push(1);
                self.block.extend_from_slice(&v[..self.map.value_len]);
            }
            None => {
                self.block.push(0);
                self.block.resize(self.block.len() + self.map.value_len, 0);
            }
        }
        self.in_block += 1;
        self.entries += 1;
        if self.in_block == self.map.per_block() {
            self.write_block(blocks)?;
        }
        Ok(())
    }

    fn write_block(&mut self, blocks: &mut Blocks<'_>) -> Result<(), redb::Error> {
        if self.in_block > 0 {
            blocks.insert(
                (self.id, self.firsts.len() as u32 - 1),
                self.block.as_slice(),
            )?;
            self.block.clear();
            self.in_block = 0;
        }
        Ok(())
    }

    fn finish(mut self, blocks: &mut Blocks<'_>) -> Result<Run, redb::Error> {
        self.write_block(blocks)?;
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
    block: Vec<u8>,
    pos: usize,
}

impl<'r> Cursor<'r> {
    fn new(run: &'r Run) -> Self {
        Self {
            run,
            next_block: 0,
            block: Vec::new(),
            pos: 0,
        }
    }

    fn fill(&mut self, blocks: &Blocks<'_>, len: usize) -> Result<(), redb::Error> {
        if (self.pos + 1) * len <= self.block.len()
            || self.next_block as usize >= self.run.firsts.len()
        {
            return Ok(());
        }
        let block = crate::runs::block(blocks, "key", self.run.id, self.next_block)?;
        self.block.clear();
        self.block.extend_from_slice(block.value());
        self.pos = 0;
        self.next_block += 1;
        Ok(())
    }

    fn entry(&self, len: usize) -> &[u8] {
        &self.block[self.pos * len..(self.pos + 1) * len]
    }

    fn key(&self, len: usize) -> Option<[u8; KEY]> {
        ((self.pos + 1) * len <= self.block.len())
            .then(|| self.entry(len)[..KEY].try_into().expect("a key"))
    }
}

/// The map as one read transaction sees it.
pub struct KeyReader<'m> {
    map: &'m KeyRuns,
    blocks: ReadBlocks,
    runs: Vec<Arc<Run>>,
}

impl KeyReader<'_> {
    /// Entries over all runs (a key counts once per run that holds it).
    pub fn entries(&self) -> u64 {
        self.runs.iter().map(|r| r.entries).sum()
    }

    /// The value of `key`: its newest entry, `None` when it has none or that is a tombstone.
    pub fn get(&self, key: &[u8; KEY]) -> Result<Option<Vec<u8>>, redb::Error> {
        let len = self.map.entry_len();
        for run in self.runs.iter().rev() {
            // Keys are unique in a run: the block is the last whose first key is at most `key`.
            let b = run.firsts.partition_point(|f| f <= key);
            if b == 0 {
                continue;
            }
            let block = crate::runs::block(&self.blocks, "key", run.id, b as u32 - 1)?;
            let bytes = block.value();
            let n = bytes.len() / len;
            let key_at = |i: usize| &bytes[i * len..i * len + KEY];
            let (mut lo, mut hi) = (0, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if key_at(mid) < key.as_slice() {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            if lo < n && key_at(lo) == key.as_slice() {
                let e = &bytes[lo * len..(lo + 1) * len];
                return Ok((e[KEY] == 1).then(|| e[KEY + 1..].to_vec()));
            }
        }
        Ok(None)
    }

    /// Calls `each` with every key that has an entry in some run (tombstones included).
    pub fn each_key(&self, mut each: impl FnMut(&[u8; KEY])) -> Result<(), redb::Error> {
        let len = self.map.entry_len();
        for run in &self.runs {
            for block in self.blocks.range((run.id, 0)..(run.id, u32::MAX))? {
                for e in block?.1.value().chunks_exact(len) {
                    each(e[..KEY].try_into().expect("a key"));
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

    fn key(n: u64) -> [u8; KEY] {
        let mut k = [0u8; KEY];
        k[..8].copy_from_slice(&n.to_be_bytes());
        k[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        k
    }

    /// Puts, overwrites and forgets keys through many flushes and merges: every lookup answers
    /// as a plain map would, and a reader of an older snapshot keeps its answers.
    #[test]
    fn runs_answer_as_a_map_through_appends_and_merges() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let map = KeyRuns::open(&db, "exact/keyruns", 5, "exact/keys").unwrap();
        let mut model: BTreeMap<[u8; KEY], Option<Vec<u8>>> = BTreeMap::new();
        for flush in 0..40u8 {
            let mut changes: BTreeMap<[u8; KEY], Option<Vec<u8>>> = BTreeMap::new();
            for _ in 0..rng.gen_range(1..600) {
                let k = key(rng.gen_range(0..5000));
                let v = if rng.gen_bool(0.15) {
                    None
                } else {
                    Some(vec![flush, rng.gen(), 0, 0, 7])
                };
                changes.insert(k, v);
            }
            let sorted: Vec<_> = changes.clone().into_iter().collect();
            let before = db.begin_read().unwrap();
            let old_model = model.clone();
            let txn = db.begin_write().unwrap();
            map.append(&txn, &sorted).unwrap();
            txn.commit().unwrap();
            model.extend(changes);
            let old = map.reader(&before).unwrap();
            for (k, v) in old_model.iter().step_by(13) {
                assert_eq!(&old.get(k).unwrap(), v, "old snapshot, flush {flush}");
            }
            let rtxn = db.begin_read().unwrap();
            let now = map.reader(&rtxn).unwrap();
            let sizes: Vec<u64> = now.runs.iter().map(|r| r.entries).collect();
            assert!(
                sizes
                    .windows(FANOUT)
                    .all(|w| w[1..].iter().sum::<u64>() < w[0]),
                "flush {flush}: run sizes {sizes:?}"
            );
            for n in 0..5000 {
                let k = key(n);
                assert_eq!(
                    now.get(&k).unwrap(),
                    model.get(&k).cloned().flatten(),
                    "flush {flush}, key {n}"
                );
            }
            assert_eq!(now.get(&key(1 << 40)).unwrap(), None);
        }
        let rtxn = db.begin_read().unwrap();
        let now = map.reader(&rtxn).unwrap();
        assert!(now.runs.len() <= 12, "{} runs", now.runs.len());
        // Merges into the oldest run dropped tombstones: fewer entries than keys ever written.
        let mut keys = 0u64;
        now.each_key(|_| keys += 1).unwrap();
        assert_eq!(keys, now.entries());
        assert!(keys < 5000 + model.len() as u64);
        // Reopened: the same answers.
        drop(now);
        drop(rtxn);
        drop(map);
        let map = KeyRuns::open(&db, "exact/keyruns", 5, "exact/keys").unwrap();
        let rtxn = db.begin_read().unwrap();
        let now = map.reader(&rtxn).unwrap();
        for (k, v) in &model {
            assert_eq!(&now.get(k).unwrap(), v);
        }
    }

    #[test]
    fn a_legacy_b_tree_becomes_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let legacy: LegacyDef<'_> = TableDefinition::new("verify/nonces");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(legacy).unwrap();
            for n in 0..1000u64 {
                t.insert(key(n).as_slice(), [n as u8; 32].as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
        let map = KeyRuns::open(&db, "verify/nonceruns", 32, "verify/nonces").unwrap();
        let rtxn = db.begin_read().unwrap();
        let now = map.reader(&rtxn).unwrap();
        assert_eq!(now.entries(), 1000);
        assert_eq!(now.get(&key(77)).unwrap(), Some(vec![77u8; 32]));
        assert_eq!(now.get(&key(5000)).unwrap(), None);
        assert!(matches!(
            rtxn.open_table(legacy),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }
}
