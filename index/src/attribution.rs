//! From maximal spans to per-contribution credit.
//!
//! The scoring rule, deterministic and normalised per output:
//!
//! 1. A span of `L` tokens that occurs `c` times in an index of `T` tokens weighs
//!    `w = L · ln(1 + T / c)`: longer spans and rarer spans say more about where the output came
//!    from (`ln(1 + T/c)` is the span's inverse frequency, kept positive).
//! 2. Each of its `c` occurrences receives `w / c`, credited to the document that holds it
//!    (its contribution: content hash and contributor from the shard's metadata). A contribution
//!    holding the span twice receives two shares.
//! 3. A contribution's score is the sum of its shares over all spans, divided by the sum over
//!    all contributions, so the scores of one output add up to 1.
//!
//! Ties are broken by content hash, so the order is reproducible.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{Index, Span};
use crate::Result;

/// Credit of one contribution for one output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Credit {
    /// `0x…` keccak256 of the contribution's content, from the index metadata.
    pub content_hash: String,
    /// `0x…` address of its contributor.
    pub contributor: String,
    /// Share of the output's attribution, in (0, 1]; all credits of an output sum to 1.
    pub score: f64,
    /// Spans of the output that occur in this contribution.
    pub spans: usize,
}

/// Credits the contributions behind `spans` (from [`Index::attribute`]) by the rule above.
/// Documents without `content_hash` / `contributor` metadata are credited under empty strings.
pub fn credit(index: &Index, spans: &[Span]) -> Result<Vec<Credit>> {
    let total = index.total_tokens().max(1) as f64;
    let mut by_contribution: BTreeMap<(String, String), (f64, usize)> = BTreeMap::new();
    let mut doc_cache: BTreeMap<(usize, u64), (String, String)> = BTreeMap::new();
    for span in spans {
        let c = span.count.max(1) as f64;
        let share = span.length as f64 * (1.0 + total / c).ln() / c;
        let mut seen_in_span = std::collections::BTreeSet::new();
        for occ in &span.docs {
            let doc = index.doc_by_ptr(occ.s, occ.ptr, 0)?;
            let key = doc_cache
                .entry((occ.s, doc.doc_ix))
                .or_insert_with(|| contribution_of(&doc.metadata))
                .clone();
            let entry = by_contribution.entry(key.clone()).or_insert((0.0, 0));
            entry.0 += share;
            if seen_in_span.insert(key) {
                entry.1 += 1;
            }
        }
    }
    let sum: f64 = by_contribution.values().map(|(s, _)| s).sum();
    let mut credits: Vec<Credit> = by_contribution
        .into_iter()
        .map(|((content_hash, contributor), (score, spans))| Credit {
            content_hash,
            contributor,
            score: if sum > 0.0 { score / sum } else { 0.0 },
            spans,
        })
        .collect();
    credits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.content_hash.cmp(&b.content_hash))
            .then_with(|| a.contributor.cmp(&b.contributor))
    });
    Ok(credits)
}

/// `(content_hash, contributor)` from a metadata line `{"path":…,"metadata":{…}}`.
fn contribution_of(line: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap_or_default();
    let field = |k: &str| {
        v.get("metadata")
            .and_then(|m| m.get(k))
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    (field("content_hash"), field("contributor"))
}
