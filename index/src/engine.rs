//! Queries over memory-mapped shards, with infini-gram's semantics and result shapes.
//!
//! Every query follows infini-gram's engine (`cpp_engine.h`, version 4 indexes): the same
//! binary searches over `table.s`, the same approximation rule for next-token distributions
//! over many occurrences, the same binary lifting for ∞-gram back-off, and the same maximal-span
//! rule as OLMoTrace's attribution. One deliberate difference: when a query sorts before every
//! suffix of a shard, infini-gram's longest-prefix search inspects no suffix (an unsigned
//! `start - 1` wraps around) and reports 0; ours inspects the first suffix.
//!
//! One quirk is kept because infini-gram has it: next-token distributions read both the
//! separator and the end of a shard as EOS, but sorted they are the first and the last
//! suffixes of a segment, so when a prompt occurs at the very end of a shard and before a
//! separator, the shortcut "first next token == last next token" credits the whole segment to
//! EOS (infini-gram 2.6.0 answers `ntd([1])` over the documents `[1,1,1]`, `[1]` with
//! `{EOS: 4}`). `tests/brute_force.rs` checks every other case against a scan.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

use crate::build::{count_tokens, parse_unigram, shard_names};
use crate::{IndexError, Result, DOC_SEP};

/// A read-only file, memory-mapped (or empty).
enum Mapped {
    Map(memmap2::Mmap),
    Empty,
}

impl Mapped {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| IndexError::Open(path.to_path_buf(), e))?;
        if file.metadata()?.len() == 0 {
            return Ok(Self::Empty);
        }
        // SAFETY: index files are immutable once written (shards are written to a staging
        // folder and renamed into place, never rewritten); a file truncated underneath us by
        // another process is outside what the index supports, as for any mmap-based reader.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }
            .map_err(|e| IndexError::Open(path.to_path_buf(), e))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Self::Map(map))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Map(m) => m,
            Self::Empty => &[],
        }
    }
}

/// One shard: its token file, suffix array, document offsets and (optional) metadata.
pub struct Shard {
    name: String,
    ds: Mapped,
    sa: Mapped,
    od: Mapped,
    meta: Option<(Mapped, Mapped)>,
    tok_cnt: u64,
    ptr_size: usize,
    doc_cnt: u64,
}

impl Shard {
    pub(crate) fn open(dir: &Path, name: &str) -> Result<Self> {
        let file = |kind: &str| dir.join(format!("{kind}.{name}"));
        let ds = Mapped::open(&file("tokenized"))?;
        let sa = Mapped::open(&file("table"))?;
        let od = Mapped::open(&file("offset"))?;
        let meta = if file("metadata").exists() {
            Some((
                Mapped::open(&file("metadata"))?,
                Mapped::open(&file("metaoff"))?,
            ))
        } else {
            None
        };
        let ds_size = ds.bytes().len() as u64;
        let bad = |why: String| {
            Err(IndexError::Format(format!(
                "shard {name} in {}: {why}",
                dir.display()
            )))
        };
        if ds_size % 2 != 0 {
            return bad(format!("tokenized.{name} has an odd length {ds_size}"));
        }
        let tok_cnt = ds_size / 2;
        let sa_size = sa.bytes().len() as u64;
        if tok_cnt == 0 || sa_size % tok_cnt != 0 || sa_size / tok_cnt > 8 || sa_size == 0 {
            return bad(format!(
                "table.{name} has {sa_size} bytes for {tok_cnt} tokens"
            ));
        }
        let od_size = od.bytes().len() as u64;
        if od_size % 8 != 0 {
            return bad(format!(
                "offset.{name} has {od_size} bytes, not a list of u64"
            ));
        }
        let doc_cnt = od_size / 8;
        if let Some((_, om)) = &meta {
            if om.bytes().len() as u64 != doc_cnt * 8 {
                return bad(format!("metaoff.{name} does not list {doc_cnt} documents"));
            }
        }
        Ok(Self {
            name: name.to_owned(),
            ptr_size: (sa_size / tok_cnt) as usize,
            ds,
            sa,
            od,
            meta,
            tok_cnt,
            doc_cnt,
        })
    }

    /// The shard's file suffix (`0` for `tokenized.0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tokens in the shard, separators included.
    pub fn tok_cnt(&self) -> u64 {
        self.tok_cnt
    }

    /// Documents in the shard.
    pub fn doc_cnt(&self) -> u64 {
        self.doc_cnt
    }

    /// Document `local`'s line of `metadata.s` (empty without metadata).
    pub fn metadata_line(&self, local: u64) -> String {
        metadata_line(self, local)
    }

    pub(crate) fn ds(&self) -> &[u8] {
        self.ds.bytes()
    }

    pub(crate) fn rank_to_ptr(&self, rank: u64) -> u64 {
        let at = rank as usize * self.ptr_size;
        let mut b = [0u8; 8];
        b[..self.ptr_size].copy_from_slice(&self.sa.bytes()[at..at + self.ptr_size]);
        u64::from_le_bytes(b)
    }

    pub(crate) fn doc_ix_to_ptr(&self, doc_ix: u64) -> u64 {
        if doc_ix == self.doc_cnt {
            return self.ds().len() as u64;
        }
        read_u64(self.od.bytes(), doc_ix as usize)
    }

    /// The token at byte `ptr`, the separator and the end of the shard read as `eos`.
    fn token_at(&self, ptr: u64, eos: u16) -> u16 {
        let ds = self.ds();
        if ptr as usize >= ds.len() {
            return eos;
        }
        let t = u16::from_le_bytes([ds[ptr as usize], ds[ptr as usize + 1]]);
        if t == DOC_SEP {
            eos
        } else {
            t
        }
    }

    /// The suffix at `ptr`, cut to `n` bytes (or the end of the shard).
    fn window(&self, ptr: u64, n: usize) -> &[u8] {
        let ds = self.ds();
        let start = ptr as usize;
        &ds[start..(start + n).min(ds.len())]
    }

    /// infini-gram's `_find_thread`: the rank range `[lo, hi)` of suffixes starting with
    /// `query`, searched within `hint`.
    pub(crate) fn find(&self, query: &[u8], hint: (u64, u64)) -> (u64, u64) {
        if query.is_empty() {
            return (0, self.tok_cnt);
        }
        let n = query.len();
        let (mut lo, mut hi) = hint;
        let mut mi = 0;
        let mut found = false;
        while lo < hi {
            mi = (lo + hi - 1) >> 1;
            match self.window(self.rank_to_ptr(mi), n).cmp(query) {
                std::cmp::Ordering::Less => lo = mi + 1,
                std::cmp::Ordering::Greater => hi = mi,
                std::cmp::Ordering::Equal => {
                    found = true;
                    break;
                }
            }
        }
        if !found {
            return (lo, lo);
        }
        // Left boundary in (lo - 1, mi]: l is always < query, r always >= query.
        let (mut l, mut r) = (lo as i128 - 1, mi as i128);
        while r - l > 1 {
            let m = (l + r) >> 1;
            if self.window(self.rank_to_ptr(m as u64), n) < query {
                l = m;
            } else {
                r = m;
            }
        }
        let first = r as u64;
        // Right boundary in (mi, hi]: l is always <= query, r always > query.
        let (mut l, mut r) = (mi, hi);
        while r - l > 1 {
            let m = (l + r) >> 1;
            if query < self.window(self.rank_to_ptr(m), n) {
                r = m;
            } else {
                l = m;
            }
        }
        (first, r)
    }

    /// infini-gram's `_get_freq_by_token_id_approx`.
    #[allow(clippy::too_many_arguments)]
    fn next_tokens(
        &self,
        num_bytes: u64,
        segment: (u64, u64),
        unit: u64,
        token_start: Option<u16>,
        token_end: Option<u16>,
        eos: u16,
        out: &mut BTreeMap<u16, u64>,
    ) {
        let (start, end) = segment;
        if end - start < 4 * unit {
            let mut rank = start;
            while rank < end {
                let rank_mid = if rank + unit <= end {
                    rank + (unit >> 1)
                } else {
                    (rank + end) >> 1
                };
                let token = self.token_at(self.rank_to_ptr(rank_mid) + num_bytes, eos);
                *out.entry(token).or_default() +=
                    if rank + unit <= end { unit } else { end - rank };
                rank += unit;
            }
            return;
        }
        let first =
            token_start.unwrap_or_else(|| self.token_at(self.rank_to_ptr(start) + num_bytes, eos));
        let last =
            token_end.unwrap_or_else(|| self.token_at(self.rank_to_ptr(end - 1) + num_bytes, eos));
        if first == last {
            // infini-gram assigns (not adds) here; the map is fresh at this depth.
            out.insert(first, end - start);
            return;
        }
        let mi = (start + end) >> 1;
        let mut left = BTreeMap::new();
        let mut right = BTreeMap::new();
        self.next_tokens(
            num_bytes,
            (start, mi),
            unit,
            Some(first),
            None,
            eos,
            &mut left,
        );
        self.next_tokens(
            num_bytes,
            (mi, end),
            unit,
            None,
            Some(last),
            eos,
            &mut right,
        );
        for (t, f) in left.into_iter().chain(right) {
            *out.entry(t).or_default() += f;
        }
    }

    /// Length in tokens of the longest prefix of `query` found in this shard.
    fn longest_prefix(&self, query: &[u8]) -> usize {
        let (start, end) = self.find(query, (0, self.tok_cnt));
        if start != end {
            return query.len() / 2;
        }
        let mut best = 0;
        for rank in start.saturating_sub(1)..(start + 1).min(self.tok_cnt) {
            let ptr = self.rank_to_ptr(rank) as usize;
            let lcp = self.ds()[ptr..]
                .iter()
                .zip(query)
                .take_while(|(a, b)| a == b)
                .count();
            best = best.max(lcp / 2);
        }
        best
    }
}

fn read_u64(bytes: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

pub(crate) fn to_le(ids: &[u16]) -> Vec<u8> {
    ids.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// `find`: total count and the rank range in each shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Find {
    pub cnt: u64,
    pub segment_by_shard: Vec<(u64, u64)>,
}

/// `count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Count {
    pub count: u64,
    pub approx: bool,
}

/// `prob`: P(cont | prompt) = cont_cnt / prompt_cnt, `-1` when the prompt never occurs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prob {
    pub prompt_cnt: u64,
    pub cont_cnt: u64,
    pub prob: f64,
}

/// One token of a next-token distribution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NextToken {
    pub cont_cnt: u64,
    pub prob: f64,
}

/// `ntd`: the distribution of the token after every occurrence of the prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ntd {
    pub prompt_cnt: u64,
    pub result_by_token_id: BTreeMap<u16, NextToken>,
    pub approx: bool,
}

/// `infgram_prob`: [`Prob`] for the longest suffix of the prompt that occurs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InfgramProb {
    pub prompt_cnt: u64,
    pub cont_cnt: u64,
    pub prob: f64,
    pub suffix_len: usize,
}

/// `infgram_ntd`: [`Ntd`] for the longest suffix of the prompt that occurs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InfgramNtd {
    pub prompt_cnt: u64,
    pub result_by_token_id: BTreeMap<u16, NextToken>,
    pub approx: bool,
    pub suffix_len: usize,
}

/// A document (or the window of it around a match), as infini-gram's `get_doc_by_*` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Doc {
    /// Index of the document over all shards, in shard order.
    pub doc_ix: u64,
    /// Tokens in the document (separator excluded).
    pub doc_len: u64,
    /// Tokens in `token_ids`.
    pub disp_len: u64,
    /// Position of the match within `token_ids`.
    pub needle_offset: u64,
    /// The document's line of `metadata.s` (empty without metadata).
    pub metadata: String,
    pub token_ids: Vec<u16>,
}

/// One occurrence of an attributed span: shard and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SpanDoc {
    pub s: usize,
    pub ptr: u64,
}

/// A maximal span of the input found in the index (tokens `[l, r)`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    pub l: usize,
    pub r: usize,
    pub length: usize,
    pub count: u64,
    /// Σ log P(token) over the span's tokens, P the token's frequency in the index.
    pub unigram_logprob_sum: f64,
    pub docs: Vec<SpanDoc>,
}

/// Parameters of maximal-span attribution (OLMoTrace's).
#[derive(Debug, Clone, Default)]
pub struct AttributeParams {
    /// A span may end just after one of these tokens but not extend past it.
    pub delim_ids: Vec<u16>,
    /// Shortest span reported, in tokens.
    pub min_len: usize,
    /// Spans occurring more often than this are dropped (too common to attribute).
    pub max_cnt: u64,
    /// With a beginning-of-word set: spans start and end at word boundaries.
    pub bow_ids: Option<std::collections::BTreeSet<u16>>,
}

/// An opened index: every shard of one directory, memory-mapped.
pub struct Index {
    dir: PathBuf,
    shards: Vec<Shard>,
    eos: u16,
    unigram: OnceLock<(BTreeMap<u16, u64>, u64)>,
}

impl Index {
    /// Opens every shard in `dir`, in infini-gram's order. `eos` is the token id that the
    /// document separator and the end of a shard read as in next-token results.
    pub fn open(dir: &Path, eos: u16) -> Result<Self> {
        let names = shard_names(dir)?;
        if names.is_empty() {
            return Err(IndexError::Format(format!(
                "{}: no shard (tokenized.*) in this folder",
                dir.display()
            )));
        }
        let shards = names
            .iter()
            .map(|n| Shard::open(dir, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            eos,
            unigram: OnceLock::new(),
        })
    }

    /// The folder the index was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shards, in infini-gram's order (`s` in results indexes this list).
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Tokens in all shards, separators included.
    pub fn total_tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.tok_cnt).sum()
    }

    /// Documents in all shards.
    pub fn total_docs(&self) -> u64 {
        self.shards.iter().map(|s| s.doc_cnt).sum()
    }

    fn find_hinted(&self, query: &[u8], hints: &[(u64, u64)]) -> Find {
        let segment_by_shard: Vec<(u64, u64)> = self
            .shards
            .iter()
            .zip(hints)
            .map(|(s, &h)| s.find(query, h))
            .collect();
        Find {
            cnt: segment_by_shard.iter().map(|(a, b)| b - a).sum(),
            segment_by_shard,
        }
    }

    fn full_hints(&self) -> Vec<(u64, u64)> {
        self.shards.iter().map(|s| (0, s.tok_cnt)).collect()
    }

    /// Occurrences of `ids` (rank range per shard).
    pub fn find(&self, ids: &[u16]) -> Find {
        self.find_hinted(&to_le(ids), &self.full_hints())
    }

    /// Number of occurrences of `ids`.
    pub fn count(&self, ids: &[u16]) -> Count {
        Count {
            count: self.find(ids).cnt,
            approx: false,
        }
    }

    /// P(`cont` | `prompt`) from counts.
    pub fn prob(&self, prompt: &[u16], cont: u16) -> Prob {
        let found = self.find(prompt);
        if found.cnt == 0 {
            return Prob {
                prompt_cnt: 0,
                cont_cnt: 0,
                prob: -1.0,
            };
        }
        let mut ids = prompt.to_vec();
        ids.push(cont);
        let cont_cnt = self.find_hinted(&to_le(&ids), &found.segment_by_shard).cnt;
        Prob {
            prompt_cnt: found.cnt,
            cont_cnt,
            prob: cont_cnt as f64 / found.cnt as f64,
        }
    }

    /// The next-token distribution after `prompt`; beyond `max_support` occurrences it is
    /// estimated from a sample of every `unit`-th occurrence (`approx`).
    pub fn ntd(&self, prompt: &[u16], max_support: u64) -> Ntd {
        let found = self.find(prompt);
        if found.cnt == 0 {
            return Ntd {
                prompt_cnt: 0,
                result_by_token_id: BTreeMap::new(),
                approx: false,
            };
        }
        let mut unit = 1u64;
        while found.cnt > unit * max_support.max(1) {
            unit <<= 1;
        }
        let num_bytes = prompt.len() as u64 * 2;
        let mut freq = BTreeMap::new();
        for (shard, &segment) in self.shards.iter().zip(&found.segment_by_shard) {
            let mut part = BTreeMap::new();
            shard.next_tokens(num_bytes, segment, unit, None, None, self.eos, &mut part);
            for (t, f) in part {
                *freq.entry(t).or_default() += f;
            }
        }
        let prompt_cnt: u64 = freq.values().sum();
        let result_by_token_id = freq
            .into_iter()
            .map(|(t, f)| {
                (
                    t,
                    NextToken {
                        cont_cnt: f,
                        prob: f as f64 / prompt_cnt as f64,
                    },
                )
            })
            .collect();
        Ntd {
            prompt_cnt,
            result_by_token_id,
            approx: unit > 1,
        }
    }

    /// Length of the longest suffix of `prompt` that occurs (binary lifting, then bisection).
    fn longest_occurring_suffix(&self, prompt: &[u16]) -> usize {
        let n = prompt.len();
        let (mut lo, mut hi) = (0usize, 1usize);
        loop {
            if hi > n {
                hi = n + 1;
                break;
            }
            if self.find(&prompt[n - hi..]).cnt == 0 {
                break;
            }
            lo = hi;
            hi <<= 1;
        }
        while hi - lo > 1 {
            let mid = (lo + hi) >> 1;
            if self.find(&prompt[n - mid..]).cnt == 0 {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        lo
    }

    /// ∞-gram probability: [`Index::prob`] on the longest occurring suffix of `prompt`.
    pub fn infgram_prob(&self, prompt: &[u16], cont: u16) -> InfgramProb {
        let suffix_len = self.longest_occurring_suffix(prompt);
        let p = self.prob(&prompt[prompt.len() - suffix_len..], cont);
        InfgramProb {
            prompt_cnt: p.prompt_cnt,
            cont_cnt: p.cont_cnt,
            prob: p.prob,
            suffix_len,
        }
    }

    /// ∞-gram next-token distribution.
    pub fn infgram_ntd(&self, prompt: &[u16], max_support: u64) -> InfgramNtd {
        let suffix_len = self.longest_occurring_suffix(prompt);
        let d = self.ntd(&prompt[prompt.len() - suffix_len..], max_support);
        InfgramNtd {
            prompt_cnt: d.prompt_cnt,
            result_by_token_id: d.result_by_token_id,
            approx: d.approx,
            suffix_len,
        }
    }

    fn shard(&self, s: usize) -> Result<&Shard> {
        self.shards.get(s).ok_or_else(|| {
            IndexError::Query(format!("shard {s} out of range [0, {})", self.shards.len()))
        })
    }

    /// The document holding the suffix at `rank` of shard `s`, up to `max_disp_len` tokens
    /// around it.
    pub fn doc_by_rank(&self, s: usize, rank: u64, max_disp_len: u64) -> Result<Doc> {
        let shard = self.shard(s)?;
        if rank >= shard.tok_cnt {
            return Err(IndexError::Query(format!(
                "rank {rank} out of range [0, {})",
                shard.tok_cnt
            )));
        }
        self.doc_by_ptr(s, shard.rank_to_ptr(rank), max_disp_len)
    }

    /// The document holding byte `ptr` of shard `s`.
    pub fn doc_by_ptr(&self, s: usize, ptr: u64, max_disp_len: u64) -> Result<Doc> {
        let shard = self.shard(s)?;
        if ptr >= shard.ds().len() as u64 || ptr % 2 != 0 {
            return Err(IndexError::Query(format!(
                "pointer {ptr} is not a token of shard {s}"
            )));
        }
        let (mut lo, mut hi) = (0u64, shard.doc_cnt);
        while hi - lo > 1 {
            let mi = (lo + hi) >> 1;
            if shard.doc_ix_to_ptr(mi) <= ptr {
                lo = mi;
            } else {
                hi = mi;
            }
        }
        let local = lo;
        let doc_ix = self.shards[..s].iter().map(|x| x.doc_cnt).sum::<u64>() + local;
        let doc_start = shard.doc_ix_to_ptr(local) + 2;
        let doc_end = shard.doc_ix_to_ptr(local + 1);
        let before = max_disp_len / 2;
        let after = max_disp_len.div_ceil(2);
        let disp_start = doc_start.max(ptr.saturating_sub(2 * before));
        let disp_end = doc_end.min(ptr + 2 * after);
        Ok(Doc {
            doc_ix,
            doc_len: doc_end.saturating_sub(doc_start) / 2,
            disp_len: disp_end.saturating_sub(disp_start) / 2,
            needle_offset: ptr.saturating_sub(disp_start) / 2,
            metadata: metadata_line(shard, local),
            token_ids: tokens(shard, disp_start, disp_end),
        })
    }

    /// Document `doc_ix` (counted over all shards), its first `max_disp_len` tokens.
    pub fn doc_by_ix(&self, doc_ix: u64, max_disp_len: u64) -> Result<Doc> {
        let mut local = doc_ix;
        for shard in &self.shards {
            if local < shard.doc_cnt {
                let doc_start = shard.doc_ix_to_ptr(local) + 2;
                let doc_end = shard.doc_ix_to_ptr(local + 1);
                let disp_end = doc_end.min(doc_start + 2 * max_disp_len);
                return Ok(Doc {
                    doc_ix,
                    doc_len: (doc_end - doc_start) / 2,
                    disp_len: (disp_end - doc_start) / 2,
                    needle_offset: 0,
                    metadata: metadata_line(shard, local),
                    token_ids: tokens(shard, doc_start, disp_end),
                });
            }
            local -= shard.doc_cnt;
        }
        Err(IndexError::Query(format!(
            "document {doc_ix} out of range [0, {})",
            self.total_docs()
        )))
    }

    /// Token counts over all shards (separators under 65535) and the total, computed once:
    /// read from a shard's `unigram.s` where it has one, else counted over its tokens.
    pub fn unigram_counts(&self) -> &(BTreeMap<u16, u64>, u64) {
        self.unigram.get_or_init(|| {
            let mut counts = vec![0u64; 1 << 16];
            for shard in &self.shards {
                let cached =
                    std::fs::read_to_string(self.dir.join(format!("unigram.{}", shard.name)))
                        .ok()
                        .and_then(|text| parse_unigram(&text));
                match cached {
                    Some(pairs) => pairs.into_iter().for_each(|(t, c)| counts[t as usize] += c),
                    None => count_tokens(shard.ds(), &mut counts),
                }
            }
            let total = counts.iter().sum();
            let map = counts
                .into_iter()
                .enumerate()
                .filter(|(_, c)| *c > 0)
                .map(|(t, c)| (t as u16, c))
                .collect();
            (map, total)
        })
    }

    /// Longest prefix of `ids` found in any shard, cut after a delimiter and backed off to a
    /// word boundary as infini-gram's `compute_longest_prefix_len`.
    fn longest_prefix(&self, ids: &[u16], params: &AttributeParams) -> usize {
        let query = to_le(ids);
        let mut len = self
            .shards
            .iter()
            .map(|s| s.longest_prefix(&query))
            .max()
            .unwrap_or(0);
        if let Some(pos) = ids[..len.saturating_sub(1)]
            .iter()
            .position(|t| params.delim_ids.contains(t))
        {
            len = pos + 1;
        }
        if let Some(bow) = &params.bow_ids {
            while len > 0 {
                if len == ids.len() || bow.contains(&ids[len]) {
                    break;
                }
                len -= 1;
            }
        }
        len
    }

    /// Maximal-span attribution (OLMoTrace): from every start position the longest span of
    /// `ids` that occurs, kept when at least `min_len` long and at most `max_cnt` frequent, and
    /// dropped when nested in an earlier kept span; each with every occurrence.
    pub fn attribute(&self, ids: &[u16], params: &AttributeParams) -> Vec<Span> {
        let mut kept: Vec<(usize, usize, Find)> = Vec::new();
        let mut last_r = 0;
        for l in 0..ids.len() {
            if let Some(bow) = &params.bow_ids {
                if !bow.contains(&ids[l]) {
                    continue;
                }
            }
            let len = self.longest_prefix(&ids[l..], params);
            if len < params.min_len || len == 0 {
                continue;
            }
            let found = self.find(&ids[l..l + len]);
            if found.cnt > params.max_cnt {
                continue;
            }
            if l + len > last_r {
                last_r = l + len;
                kept.push((l, l + len, found));
            }
        }
        let (unigrams, total) = self.unigram_counts();
        kept.into_iter()
            .map(|(l, r, found)| {
                let docs = found
                    .segment_by_shard
                    .iter()
                    .enumerate()
                    .flat_map(|(s, &(a, b))| (a..b).map(move |rank| (s, rank)))
                    .map(|(s, rank)| SpanDoc {
                        s,
                        ptr: self.shards[s].rank_to_ptr(rank),
                    })
                    .collect();
                let unigram_logprob_sum = ids[l..r]
                    .iter()
                    .map(|t| match unigrams.get(t) {
                        Some(&c) => (c as f64).ln() - (*total as f64).ln(),
                        None => -10000.0,
                    })
                    .sum();
                Span {
                    l,
                    r,
                    length: r - l,
                    count: found.cnt,
                    unigram_logprob_sum,
                    docs,
                }
            })
            .collect()
    }
}

fn metadata_line(shard: &Shard, local: u64) -> String {
    let Some((mt, om)) = &shard.meta else {
        return String::new();
    };
    let start = read_u64(om.bytes(), local as usize) as usize;
    let end = if local + 1 == shard.doc_cnt {
        mt.bytes().len()
    } else {
        read_u64(om.bytes(), local as usize + 1) as usize
    };
    String::from_utf8_lossy(&mt.bytes()[start.min(end)..end]).into_owned()
}

fn tokens(shard: &Shard, start: u64, end: u64) -> Vec<u16> {
    shard.ds()[start as usize..end as usize]
        .chunks_exact(2)
        .map(|p| u16::from_le_bytes([p[0], p[1]]))
        .collect()
}
