//! Exact-substring duplicates (Lee et al., "Deduplicating Training Data Makes Language Models
//! Better", ExactSubstr): documents that repeat a span of at least `min_len` tokens of an
//! *earlier* document, found from the suffix arrays of the index.
//!
//! Documents are ordered as the index holds them (shard order, then position in the shard),
//! which for a Datanet index is commit order: the first arrival keeps its span and every later
//! copy is reported, once, with the earlier document it repeats.
//!
//! The search is exact and does not look at every position: a span of `L >= min_len` tokens
//! contains a whole block `[k·h, k·h + h)` of the document for `h = ⌈min_len / 2⌉` (because
//! `L >= 2h - 1`). So each aligned block is counted first (one binary search per `h` tokens);
//! only a block that occurs elsewhere leads to the `min_len`-grams around it, each looked up in
//! the earlier shards (any occurrence is earlier) and in the document's own shard (an
//! occurrence before the document's first byte is earlier).

use serde::Serialize;

use crate::engine::{to_le, Index};
use crate::{Result, DOC_SEP};

/// A later document repeating a span of an earlier one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubstringDuplicate {
    /// The later document (index over all shards).
    pub doc_ix: u64,
    /// An earlier document holding the span.
    pub of_doc_ix: u64,
    /// The span's first token in the later document.
    pub offset: usize,
    /// The span's length in tokens (the match extended as far as both documents agree).
    pub length: usize,
    /// `metadata.s` lines of the two documents (empty without metadata).
    pub metadata: String,
    pub of_metadata: String,
}

/// Every document of the shards numbered `from_shard` or above that repeats a span of at least
/// `min_len` tokens (at least 2) of an earlier document; at most one report per document (its
/// first such span). Shards are ordered by their numbers (not infini-gram's string order of
/// file names, in which `10` precedes `2`); shards whose names are not numbers come last.
pub fn substring_duplicates(
    index: &Index,
    from_shard: u64,
    min_len: usize,
) -> Result<Vec<SubstringDuplicate>> {
    let min_len = min_len.max(2);
    let h = min_len.div_ceil(2);
    let shards = index.shards();
    let number = |s: usize| shards[s].name().parse::<u64>().unwrap_or(u64::MAX);
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by_key(|&s| (number(s), s));
    let mut out = Vec::new();
    for (at, &sd) in order.iter().enumerate() {
        if number(sd) < from_shard {
            continue;
        }
        let shard = &shards[sd];
        let ds = shard.ds();
        for local in 0..shard.doc_cnt() {
            let start = shard.doc_ix_to_ptr(local) + 2;
            let end = shard.doc_ix_to_ptr(local + 1);
            let doc: Vec<u16> = ds[start as usize..end as usize]
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect();
            let earlier = &order[..at];
            if let Some((s, ptr, offset, length)) =
                first_repeat(index, earlier, sd, start, &doc, min_len, h)
            {
                let of = index.doc_by_ptr(s, ptr, 0)?;
                let this = index.doc_by_ptr(sd, start, 0)?;
                out.push(SubstringDuplicate {
                    doc_ix: this.doc_ix,
                    of_doc_ix: of.doc_ix,
                    offset,
                    length,
                    metadata: this.metadata,
                    of_metadata: of.metadata,
                });
            }
        }
    }
    Ok(out)
}

/// The first span of `doc` (in shard `sd`, its tokens starting at byte `start`) of at least
/// `min_len` tokens that occurs before the document: `(shard, byte offset of the earlier
/// occurrence, offset in doc, length)`.
fn first_repeat(
    index: &Index,
    earlier: &[usize],
    sd: usize,
    start: u64,
    doc: &[u16],
    min_len: usize,
    h: usize,
) -> Option<(usize, u64, usize, usize)> {
    let n = doc.len();
    if n < min_len {
        return None;
    }
    let shards = index.shards();
    let mut k = 0;
    while k + h <= n {
        let block = to_le(&doc[k..k + h]);
        let occurs_elsewhere = earlier
            .iter()
            .chain([&sd])
            .map(|&s| {
                let s = &shards[s];
                let (a, b) = s.find(&block, (0, s.tok_cnt()));
                b - a
            })
            .sum::<u64>()
            > 1;
        if occurs_elsewhere {
            // Every min_len-gram of the document that contains this block.
            let first = (k + h).saturating_sub(min_len);
            let last = k.min(n - min_len);
            for i in first..=last {
                let gram = to_le(&doc[i..i + min_len]);
                if let Some((s, ptr)) = earlier_occurrence(index, earlier, sd, start, &gram) {
                    let (left, right) = extend(shards[s].ds(), ptr, doc, i, min_len);
                    return Some((s, ptr, i - left, left + min_len + right));
                }
            }
        }
        k += h;
    }
    None
}

/// An occurrence of `gram` before byte `start` of shard `sd`, or anywhere in an `earlier` shard.
fn earlier_occurrence(
    index: &Index,
    earlier: &[usize],
    sd: usize,
    start: u64,
    gram: &[u8],
) -> Option<(usize, u64)> {
    let shards = index.shards();
    for &s in earlier {
        let shard = &shards[s];
        let (a, b) = shard.find(gram, (0, shard.tok_cnt()));
        if a < b {
            return Some((s, shard.rank_to_ptr(a)));
        }
    }
    let shard = &shards[sd];
    let (a, b) = shard.find(gram, (0, shard.tok_cnt()));
    (a..b)
        .map(|rank| shard.rank_to_ptr(rank))
        .find(|&ptr| ptr < start)
        .map(|ptr| (sd, ptr))
}

/// How far the match of `doc[i..i + len]` at byte `ptr` of `ds` extends to the left and to the
/// right (a separator never equals a document token, so it stops at document boundaries).
fn extend(ds: &[u8], ptr: u64, doc: &[u16], i: usize, len: usize) -> (usize, usize) {
    let token = |byte: u64| u16::from_le_bytes([ds[byte as usize], ds[byte as usize + 1]]);
    let mut left = 0;
    while left < i && ptr >= 2 * (left as u64 + 1) {
        let t = token(ptr - 2 * (left as u64 + 1));
        if t == DOC_SEP || t != doc[i - left - 1] {
            break;
        }
        left += 1;
    }
    let mut right = 0;
    loop {
        let at = ptr + 2 * (len + right) as u64;
        if i + len + right >= doc.len() || at as usize + 2 > ds.len() {
            break;
        }
        let t = token(at);
        if t == DOC_SEP || t != doc[i + len + right] {
            break;
        }
        right += 1;
    }
    (left, right)
}
