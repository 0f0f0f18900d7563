//! Writing shards in infini-gram's on-disk format and building their suffix arrays.
//!
//! A shard `s` is five files in one directory (infini-gram's names, so its engine opens ours):
//!
//! | file | contents |
//! | --- | --- |
//! | `tokenized.s` | u16 little-endian tokens; every document is preceded by the separator `0xFFFF` |
//! | `offset.s` | u64 little-endian byte offset in `tokenized.s` of each document's separator |
//! | `table.s` | the suffix array: byte offsets into `tokenized.s` of every token position, in the order of the suffixes' bytes, each `ceil(log2(bytes)/8)` bytes wide, little-endian |
//! | `metadata.s` | one JSON line per document (`{"path":…,"linenum":…,"metadata":{…}}`) |
//! | `metaoff.s` | u64 little-endian byte offset of each document's line in `metadata.s` |
//! | `unigram.s` | `token count` lines, every token id that occurs (separator included), ascending |
//!
//! Suffixes are ordered by their *bytes* (infini-gram compares `tokenized.s` with `memcmp`), which
//! for little-endian u16 tokens is not the order of the token values: the construction sorts
//! the tokens byte-swapped (`u16::from_be_bytes` of the stored pair), exactly as infini-gram's
//! `rust_indexing make-part` does, and a suffix that is a prefix of another sorts first. The
//! resulting `table.s` is byte-identical to infini-gram's whenever no span of 100,000 bytes or
//! more repeats (beyond that, infini-gram's own output depends on how many parts its indexer
//! split the file into, i.e. on its CPU count and memory flag).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use libsais::SuffixArrayConstruction;
use serde::{Deserialize, Serialize};

use crate::{IndexError, Result, DOC_SEP};

/// Bytes per suffix-array entry for a `tokenized` file of `ds_size` bytes:
/// `ceil(log2(ds_size) / 8)`, infini-gram's `ratio`, at least 1.
pub fn pointer_width(ds_size: u64) -> usize {
    if ds_size <= 1 {
        return 1;
    }
    // ceil(log2(n)) for n >= 2 is the bit length of n - 1.
    let bits = 64 - (ds_size - 1).leading_zeros() as usize;
    bits.div_ceil(8).max(1)
}

/// Memory a shard of `tokens` tokens needs while its suffix array is built: the tokens
/// (2 bytes), the byte-swapped copy sorted by libsais (2 bytes) and the suffix array (4 bytes
/// per token below 2³¹ tokens, 8 above).
pub fn build_bytes(tokens: u64) -> u64 {
    let sa = if tokens < i32::MAX as u64 { 4 } else { 8 };
    tokens * (2 + 2 + sa)
}

/// libsais on `keys` into an owned buffer of i32 or i64 positions (`in_owned_buffer32` /
/// `in_owned_buffer64`: the two are distinct types), on `threads` OpenMP threads.
macro_rules! sais {
    ($keys:expr, $threads:expr, $buffer:ident) => {{
        let run = SuffixArrayConstruction::for_text($keys).$buffer();
        let sa = if $threads > 1 {
            run.multi_threaded(libsais::ThreadCount::fixed(
                $threads.min(u16::MAX as usize) as u16
            ))
            .run()
        } else {
            run.single_threaded().run()
        };
        sa.map_err(|e| IndexError::Build(format!("libsais: {e:?}")))?
            .into_vec()
    }};
}

/// The suffix array of a little-endian u16 token file, as byte offsets in infini-gram's order,
/// written to `out` with `pointer_width(le_bytes.len())` bytes per entry.
pub fn write_table(le_bytes: &[u8], out: &Path, threads: usize) -> Result<()> {
    check_even(le_bytes, out)?;
    let mut slots: Vec<u16> = le_bytes
        .chunks_exact(2)
        .map(|pair| u16::from_ne_bytes([pair[0], pair[1]]))
        .collect();
    sort_keys_in_place(&mut slots);
    sort_and_write(&slots, out, threads)
}

/// [`write_table`] for tokens the caller no longer needs: they are turned into sort keys where
/// they lie (no copy of the shard in memory), so `le_bytes` holds no tokens afterwards.
fn write_table_in_place(le_bytes: &mut [u8], out: &Path, threads: usize) -> Result<()> {
    check_even(le_bytes, out)?;
    match bytemuck::try_cast_slice_mut::<u8, u16>(le_bytes) {
        Ok(slots) => {
            sort_keys_in_place(slots);
            sort_and_write(slots, out, threads)
        }
        // A buffer that is not 2-byte aligned (allocators align far more, but nothing promises it).
        Err(_) => write_table(le_bytes, out, threads),
    }
}

fn check_even(le_bytes: &[u8], out: &Path) -> Result<()> {
    if le_bytes.len() % 2 != 0 {
        return Err(IndexError::Format(format!(
            "{}: a u16 token file has an even number of bytes, this one {}",
            out.display(),
            le_bytes.len()
        )));
    }
    Ok(())
}

/// Turns each u16 slot, holding a stored little-endian token pair of `tokenized.s` as it lies in
/// memory, into the key the suffix array sorts it by. infini-gram compares `tokenized.s` by its
/// bytes, i.e. each pair as the big-endian value `u16::from_be_bytes`; the keys are those values
/// renumbered densely (the rank of each among the distinct values that occur). Renumbering keeps
/// every comparison, so the suffix array is the same, and it keeps libsais's bucket arrays
/// (indexed by symbol) small and in cache: on 50M tokens of a 646-word corpus the sort takes
/// 3.3 s instead of 3.8 s.
fn sort_keys_in_place(slots: &mut [u16]) {
    let value = |slot: u16| u16::from_be_bytes(slot.to_ne_bytes()) as usize;
    let mut present = vec![false; 1 << 16];
    for &slot in slots.iter() {
        present[value(slot)] = true;
    }
    let mut rank = vec![0u16; 1 << 16];
    let mut next = 0u32;
    for (v, &occurs) in present.iter().enumerate() {
        if occurs {
            // At most 65,536 distinct values, so every rank fits a u16.
            rank[v] = next as u16;
            next += 1;
        }
    }
    for slot in slots {
        *slot = rank[value(*slot)];
    }
}

/// Sorts the suffixes of `keys` with libsais and writes `table.s` (the file is synced).
fn sort_and_write(keys: &[u16], out: &Path, threads: usize) -> Result<()> {
    let width = pointer_width(keys.len() as u64 * 2);
    let mut file = File::create(out)?;
    let n = keys.len();
    if n == 0 {
        // Nothing to sort (libsais wants at least one symbol).
    } else if n < i32::MAX as usize {
        let mut sa = sais!(keys, threads, in_owned_buffer32);
        if width == 4 {
            // The common case, as one pass the compiler vectorises.
            for p in &mut sa {
                *p = i32::from_ne_bytes((*p as u32 * 2).to_le_bytes());
            }
        } else {
            pack_entries::<4>(bytemuck::cast_slice_mut(&mut sa), width);
        }
        write_in_pieces(&mut file, &bytemuck::cast_slice(&sa)[..n * width])?;
    } else {
        let mut sa = sais!(keys, threads, in_owned_buffer64);
        pack_entries::<8>(bytemuck::cast_slice_mut(&mut sa), width);
        write_in_pieces(&mut file, &bytemuck::cast_slice(&sa)[..n * width])?;
    }
    file.sync_all()?;
    Ok(())
}

/// One write(2) of hundreds of megabytes is several times slower here than the same bytes a
/// mebibyte at a time.
fn write_in_pieces(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    bytes
        .chunks(1 << 20)
        .try_for_each(|piece| file.write_all(piece))
}

/// Rewrites a suffix array held as native-endian `W`-byte token positions into `table.s` entries
/// in place: each position becomes its byte offset (twice the token position), little-endian,
/// `width` bytes wide (`width <= W`), packed from the start of the buffer (the first
/// `n * width` bytes hold the entries). Entry `i` is written to bytes `i*width..(i+1)*width`,
/// which end at or before the start of entry `i + 1`, so no entry is overwritten before it is
/// read.
fn pack_entries<const W: usize>(buffer: &mut [u8], width: usize) {
    debug_assert!(width <= W && buffer.len() % W == 0);
    let n = buffer.len() / W;
    for i in 0..n {
        let mut native = [0u8; 8];
        native[..W].copy_from_slice(&buffer[i * W..(i + 1) * W]);
        let position = if W == 4 {
            u32::from_ne_bytes([native[0], native[1], native[2], native[3]]) as u64
        } else {
            u64::from_ne_bytes(native)
        };
        buffer[i * width..(i + 1) * width].copy_from_slice(&(position * 2).to_le_bytes()[..width]);
    }
}

/// What one shard holds, as reported after it is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSummary {
    /// The shard's number `s` (its files end in `.s`).
    pub shard: usize,
    /// Documents in the shard.
    pub docs: u64,
    /// Tokens in `tokenized.s`, separators included (= entries of `table.s`).
    pub tokens: u64,
    /// Bytes per `table.s` entry.
    pub pointer_width: usize,
}

/// One document's metadata line in `metadata.s`, shaped as infini-gram's indexer writes it.
#[derive(Debug, Serialize)]
struct MetaLine<'a> {
    path: &'a str,
    linenum: u64,
    metadata: &'a serde_json::Value,
}

/// Accumulates documents for one shard and writes its five files.
#[derive(Debug)]
pub struct ShardWriter {
    dir: PathBuf,
    shard: usize,
    path_label: String,
    tokens: Vec<u8>,
    offsets: Vec<u64>,
    meta: Vec<u8>,
    metaoff: Vec<u64>,
}

impl ShardWriter {
    /// A writer for shard `shard` in `dir`; `path_label` is what each metadata line names as
    /// its `path` (the Datanet, or the source file).
    pub fn new(dir: &Path, shard: usize, path_label: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            shard,
            path_label: path_label.to_owned(),
            tokens: Vec::new(),
            offsets: Vec::new(),
            meta: Vec::new(),
            metaoff: Vec::new(),
        }
    }

    /// Tokens written so far, separators included.
    pub fn tokens(&self) -> u64 {
        self.tokens.len() as u64 / 2
    }

    /// Documents written so far.
    pub fn docs(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// Appends one document: the separator, then its tokens. A token equal to the separator
    /// (65535) is refused: it would split the document in two.
    pub fn add_document(&mut self, tokens: &[u16], metadata: &serde_json::Value) -> Result<()> {
        if tokens.contains(&DOC_SEP) {
            return Err(IndexError::Format(format!(
                "document {} of shard {} holds token {DOC_SEP}, the document separator",
                self.offsets.len(),
                self.shard
            )));
        }
        self.offsets.push(self.tokens.len() as u64);
        self.tokens.extend_from_slice(&DOC_SEP.to_le_bytes());
        for t in tokens {
            self.tokens.extend_from_slice(&t.to_le_bytes());
        }
        self.metaoff.push(self.meta.len() as u64);
        let line = MetaLine {
            path: &self.path_label,
            linenum: self.offsets.len() as u64 - 1,
            metadata,
        };
        serde_json::to_writer(&mut self.meta, &line)
            .map_err(|e| IndexError::Format(format!("metadata: {e}")))?;
        self.meta.push(b'\n');
        Ok(())
    }

    /// Appends one document with its `metadata.s` line as it is (a document moved from another
    /// shard keeps its provenance). Tokens are stored little-endian, as in `tokenized.s`.
    fn add_document_le(&mut self, le_tokens: &[u8], metadata_line: &str) {
        self.offsets.push(self.tokens.len() as u64);
        self.tokens.extend_from_slice(&DOC_SEP.to_le_bytes());
        self.tokens.extend_from_slice(le_tokens);
        self.metaoff.push(self.meta.len() as u64);
        self.meta
            .extend_from_slice(metadata_line.trim_end_matches('\n').as_bytes());
        self.meta.push(b'\n');
    }

    /// Writes the shard's files (into a staging folder, then moved into place, `table.s` last)
    /// and builds its suffix array on `threads` threads.
    pub fn finish(mut self, threads: usize) -> Result<ShardSummary> {
        let s = self.shard;
        let staging = self.dir.join(format!(".staging-{s}"));
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir_all(&staging)?;
        fs::write(staging.join(format!("tokenized.{s}")), &self.tokens)?;
        fs::write(staging.join(format!("offset.{s}")), u64s_le(&self.offsets))?;
        fs::write(staging.join(format!("metadata.{s}")), &self.meta)?;
        fs::write(staging.join(format!("metaoff.{s}")), u64s_le(&self.metaoff))?;
        fs::write(
            staging.join(format!("unigram.{s}")),
            unigram_lines(&self.tokens),
        )?;
        let ds_len = self.tokens.len() as u64;
        // Written above; the table sorts them where they lie.
        write_table_in_place(
            &mut self.tokens,
            &staging.join(format!("table.{s}")),
            threads,
        )?;
        for name in [
            "tokenized",
            "offset",
            "metadata",
            "metaoff",
            "unigram",
            "table",
        ] {
            let file = format!("{name}.{s}");
            fs::rename(staging.join(&file), self.dir.join(&file))?;
        }
        fs::remove_dir(&staging)?;
        Ok(ShardSummary {
            shard: s,
            docs: self.offsets.len() as u64,
            tokens: ds_len / 2,
            pointer_width: pointer_width(ds_len),
        })
    }
}

/// infini-gram's `unigram.s` (what its indexer writes with `--add_unigram`, and what its engine
/// reads instead of counting every token id with a search).
fn unigram_lines(le_tokens: &[u8]) -> String {
    let mut counts = vec![0u64; 1 << 16];
    count_tokens(le_tokens, &mut counts);
    let mut out = String::new();
    for (token, &count) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        out.push_str(&format!("{token} {count}\n"));
    }
    out
}

/// Adds the occurrences of every token of `le_tokens` to `counts` (indexed by token id).
pub(crate) fn count_tokens(le_tokens: &[u8], counts: &mut [u64]) {
    for pair in le_tokens.chunks_exact(2) {
        counts[u16::from_le_bytes([pair[0], pair[1]]) as usize] += 1;
    }
}

/// The counts of a `unigram.s` file (`token count` lines, or bare counts indexed by line, as
/// infini-gram's engine reads them); `None` when a line is neither.
pub(crate) fn parse_unigram(text: &str) -> Option<Vec<(u16, u64)>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| match line.split_once(' ') {
            Some((t, c)) => Some((t.parse().ok()?, c.trim().parse().ok()?)),
            None => Some((u16::try_from(i).ok()?, line.trim().parse().ok()?)),
        })
        .collect()
}

fn u64s_le(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The shard numbers of the `tokenized.*` files in `dir`, in the order infini-gram's engine
/// loads them (the file names sorted as strings, so `tokenized.10` comes before `tokenized.2`).
pub fn shard_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| IndexError::Open(dir.to_path_buf(), e))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(suffix) = name.strip_prefix("tokenized.") {
            names.push(suffix.to_owned());
        }
    }
    names.sort_by(|a, b| format!("tokenized.{a}").cmp(&format!("tokenized.{b}")));
    Ok(names)
}

/// Builds `table.s` for every `tokenized.s` of infini-gram's tokenizing step in `input`
/// (with its `offset.s`, and `metadata.s` / `metaoff.s` when present), writing the index to
/// `out` (which may be `input`). Each shard must fit `memory_budget` bytes while it is built
/// ([`build_bytes`]).
pub fn build_from_tokenized(
    input: &Path,
    out: &Path,
    threads: usize,
    memory_budget: u64,
) -> Result<Vec<ShardSummary>> {
    let names = shard_names(input)?;
    if names.is_empty() {
        return Err(IndexError::Format(format!(
            "{}: no tokenized.* file (infini-gram's tokenizing step writes tokenized.0, offset.0, …)",
            input.display()
        )));
    }
    fs::create_dir_all(out)?;
    let same = fs::canonicalize(input)? == fs::canonicalize(out)?;
    let mut summaries = Vec::new();
    for name in names {
        let ds_path = input.join(format!("tokenized.{name}"));
        let mut ds = Vec::new();
        File::open(&ds_path)?.read_to_end(&mut ds)?;
        let tokens = ds.len() as u64 / 2;
        if build_bytes(tokens) > memory_budget {
            return Err(IndexError::Budget {
                shard: ds_path,
                needed: build_bytes(tokens),
                budget: memory_budget,
            });
        }
        let od_path = input.join(format!("offset.{name}"));
        let od = fs::read(&od_path).map_err(|e| IndexError::Open(od_path.clone(), e))?;
        check_offsets(&ds_path, &ds, &od)?;
        let docs = od.len() as u64 / 8;
        if !same {
            for file in ["tokenized", "offset", "metadata", "metaoff", "unigram"] {
                let from = input.join(format!("{file}.{name}"));
                if from.exists() {
                    fs::copy(&from, out.join(format!("{file}.{name}")))?;
                }
            }
        }
        let table = out.join(format!("table.{name}"));
        let staging = out.join(format!(".table.{name}.partial"));
        let ds_len = ds.len() as u64;
        // The tokens are not needed after this: sort them where they lie.
        write_table_in_place(&mut ds, &staging, threads)?;
        fs::rename(&staging, &table)?;
        summaries.push(ShardSummary {
            shard: name.parse().unwrap_or(summaries.len()),
            docs,
            tokens,
            pointer_width: pointer_width(ds_len),
        });
    }
    Ok(summaries)
}

/// Merges shards `names` of `dir` (in that order) into one new shard `shard` written to `out`:
/// the documents and their metadata lines are concatenated and the suffix array is built anew.
/// The old shards are left as they are (the caller swaps them out).
pub fn merge_shards(
    dir: &Path,
    names: &[String],
    out: &Path,
    shard: usize,
    threads: usize,
) -> Result<ShardSummary> {
    let mut writer = ShardWriter::new(out, shard, "");
    for name in names {
        let from = crate::engine::Shard::open(dir, name)?;
        for local in 0..from.doc_cnt() {
            let start = from.doc_ix_to_ptr(local) + 2;
            let end = from.doc_ix_to_ptr(local + 1);
            writer.add_document_le(
                &from.ds()[start as usize..end as usize],
                &from.metadata_line(local),
            );
        }
    }
    writer.finish(threads)
}

/// `offset.s` must list, in increasing order from 0, the position of every separator that
/// starts a document of `tokenized.s`.
fn check_offsets(ds_path: &Path, ds: &[u8], od: &[u8]) -> Result<()> {
    let bad = |why: String| Err(IndexError::Format(format!("{}: {why}", ds_path.display())));
    if ds.len() % 2 != 0 {
        return bad(format!("odd length {} for u16 tokens", ds.len()));
    }
    if od.len() % 8 != 0 {
        return bad(format!(
            "offset file of {} bytes is not a list of u64",
            od.len()
        ));
    }
    let mut last = None;
    for (i, chunk) in od.chunks_exact(8).enumerate() {
        let off = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if i == 0 && off != 0 {
            return bad(format!("the first document starts at byte {off}, not 0"));
        }
        if last.is_some_and(|l| off <= l) || off as usize + 2 > ds.len() {
            return bad(format!(
                "document {i} starts at byte {off}, out of order or past the end"
            ));
        }
        if ds[off as usize..off as usize + 2] != DOC_SEP.to_le_bytes() {
            return bad(format!(
                "document {i} at byte {off} does not start with the separator"
            ));
        }
        last = Some(off);
    }
    if last.is_none() && !ds.is_empty() {
        return bad("tokens but no document offsets".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_width_is_infini_grams_ratio() {
        // int(np.ceil(np.log2(ds_size) / 8))
        for (size, width) in [
            (2, 1),
            (256, 1),
            (257, 2),
            (65_536, 2),
            (65_537, 3),
            (1 << 24, 3),
            ((1 << 24) + 2, 4),
            (1 << 32, 4),
            ((1 << 32) + 2, 5),
        ] {
            assert_eq!(pointer_width(size), width, "size {size}");
        }
    }

    /// The naive definition: sort every even byte offset by the bytes from there to the end.
    fn naive(le: &[u8]) -> Vec<u64> {
        let mut v: Vec<u64> = (0..le.len() as u64 / 2).map(|i| i * 2).collect();
        v.sort_by(|&a, &b| le[a as usize..].cmp(&le[b as usize..]));
        v
    }

    fn read_table(path: &Path, width: usize) -> Vec<u64> {
        fs::read(path)
            .unwrap()
            .chunks_exact(width)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..width].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect()
    }

    #[test]
    fn entries_are_packed_in_place_at_every_width() {
        let positions: Vec<u64> = vec![0, 1, 127, 128, 65_535, 1 << 23, (1 << 31) - 1];
        for width in 1..=8 {
            let fits = |p: &u64| width == 8 || p * 2 < 1u64 << (8 * width);
            let expected: Vec<u8> = positions
                .iter()
                .filter(|p| fits(p))
                .flat_map(|p| (p * 2).to_le_bytes()[..width].to_vec())
                .collect();
            if width <= 4 {
                let mut sa: Vec<i32> = positions
                    .iter()
                    .filter(|p| fits(p))
                    .map(|&p| p as i32)
                    .collect();
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut sa[..]);
                pack_entries::<4>(bytes, width);
                assert_eq!(&bytes[..expected.len()], &expected[..]);
            }
            let mut sa: Vec<i64> = positions
                .iter()
                .filter(|p| fits(p))
                .map(|&p| p as i64)
                .collect();
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut sa[..]);
            pack_entries::<8>(bytes, width);
            assert_eq!(&bytes[..expected.len()], &expected[..]);
        }
    }

    proptest::proptest! {
        #[test]
        fn table_orders_suffixes_by_their_bytes(tokens in proptest::collection::vec(
            proptest::prop_oneof![0u16..4, 250u16..262, 65_530u16..=65_535], 0..300)) {
            let le: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("table.0");
            write_table(&le, &path, 1).unwrap();
            let width = pointer_width(le.len() as u64);
            proptest::prop_assert_eq!(read_table(&path, width), naive(&le));
        }
    }

    #[test]
    fn shard_writer_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 0, "demo");
        w.add_document(&[5, 6, 7], &serde_json::json!({"contributor": "0xab"}))
            .unwrap();
        w.add_document(&[6, 7], &serde_json::json!({"contributor": "0xcd"}))
            .unwrap();
        assert!(w
            .add_document(&[1, DOC_SEP], &serde_json::Value::Null)
            .is_err());
        let summary = w.finish(1).unwrap();
        assert_eq!(summary.docs, 2);
        assert_eq!(summary.tokens, 7);
        let ds = fs::read(dir.path().join("tokenized.0")).unwrap();
        assert_eq!(
            ds,
            [255, 255, 5, 0, 6, 0, 7, 0, 255, 255, 6, 0, 7, 0].to_vec()
        );
        let od = fs::read(dir.path().join("offset.0")).unwrap();
        assert_eq!(
            od,
            [0u64, 8]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert_eq!(read_table(&dir.path().join("table.0"), 1), naive(&ds));
        let meta = fs::read_to_string(dir.path().join("metadata.0")).unwrap();
        assert_eq!(
            meta.lines().next().unwrap(),
            r#"{"path":"demo","linenum":0,"metadata":{"contributor":"0xab"}}"#
        );
        assert!(!dir.path().join(".staging-0").exists());
        let unigram = fs::read_to_string(dir.path().join("unigram.0")).unwrap();
        assert_eq!(unigram, "5 1\n6 2\n7 2\n65535 2\n");
    }

    #[test]
    fn from_tokenized_checks_offsets_and_budget() {
        let input = tempfile::tempdir().unwrap();
        fs::write(
            input.path().join("tokenized.0"),
            [255, 255, 1, 0, 255, 255, 2, 0],
        )
        .unwrap();
        fs::write(
            input.path().join("offset.0"),
            [0u64, 6]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = build_from_tokenized(input.path(), out.path(), 1, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("document 1 at byte 6"), "{err}");
        fs::write(
            input.path().join("offset.0"),
            [0u64, 4]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let err = build_from_tokenized(input.path(), out.path(), 1, 10).unwrap_err();
        assert!(matches!(err, IndexError::Budget { .. }), "{err}");
        let built = build_from_tokenized(input.path(), out.path(), 1, 1 << 30).unwrap();
        assert_eq!(built[0].tokens, 4);
        assert!(out.path().join("table.0").exists());
        assert!(out.path().join("tokenized.0").exists());
    }

    #[test]
    fn shards_sort_as_infini_gram_sorts_them() {
        let dir = tempfile::tempdir().unwrap();
        for s in [0, 1, 2, 10] {
            fs::write(dir.path().join(format!("tokenized.{s}")), []).unwrap();
        }
        assert_eq!(shard_names(dir.path()).unwrap(), ["0", "1", "10", "2"]);
    }
}
