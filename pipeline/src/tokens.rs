//! `ledgerflow index`: building token indexes and querying them, with JSON shaped like
//! infini-gram's results.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ledgerflow_index::engine::AttributeParams;
use ledgerflow_index::Index;
use serde_json::{json, Value};

/// One query of `ledgerflow index query`.
#[derive(Debug, Clone)]
pub enum Query {
    /// `{"count": N, "approx": false}`.
    Count,
    /// `{"cnt": N, "segment_by_shard": [[lo, hi], …]}`.
    Find,
    /// P(cont | tokens): `{"prompt_cnt", "cont_cnt", "prob"}`.
    Prob { cont: u16 },
    /// Next-token distribution: `{"prompt_cnt", "result_by_token_id": {id: {"cont_cnt", "prob"}}, "approx"}`.
    Ntd { max_support: u64 },
    /// ∞-gram probability: as `Prob`, with `suffix_len`.
    InfgramProb { cont: u16 },
    /// ∞-gram next-token distribution: as `Ntd`, with `suffix_len`.
    InfgramNtd { max_support: u64 },
    /// The document holding rank `rank` of shard `shard`.
    Doc {
        shard: usize,
        rank: u64,
        max_disp_len: u64,
    },
    /// Maximal spans of the tokens and the contributions they credit.
    Attribute(AttributeParams),
}

/// Runs `query` on `tokens` and returns its JSON result.
pub fn run_query(index: &Index, tokens: &[u16], query: &Query) -> Result<Value> {
    Ok(match query {
        Query::Count => serde_json::to_value(index.count(tokens))?,
        Query::Find => serde_json::to_value(index.find(tokens))?,
        Query::Prob { cont } => serde_json::to_value(index.prob(tokens, *cont))?,
        Query::Ntd { max_support } => serde_json::to_value(index.ntd(tokens, *max_support))?,
        Query::InfgramProb { cont } => serde_json::to_value(index.infgram_prob(tokens, *cont))?,
        Query::InfgramNtd { max_support } => {
            serde_json::to_value(index.infgram_ntd(tokens, *max_support))?
        }
        Query::Doc {
            shard,
            rank,
            max_disp_len,
        } => serde_json::to_value(index.doc_by_rank(*shard, *rank, *max_disp_len)?)?,
        Query::Attribute(params) => {
            let spans = index.attribute(tokens, params);
            let credits = ledgerflow_index::credit(index, &spans)?;
            json!({ "spans": spans, "contributions": credits })
        }
    })
}

/// Parses `1,2,3` (spaces allowed) into token ids.
pub fn parse_tokens(s: &str) -> Result<Vec<u16>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u16>()
                .with_context(|| format!("token {t:?} is not an integer in [0, 65535]"))
        })
        .collect()
}

/// Opens the index in `dir`, with a readable error when it is not one.
pub fn open(dir: &Path, eos: u16) -> Result<Index> {
    if !dir.is_dir() {
        bail!("{}: no such index folder", dir.display());
    }
    Index::open(dir, eos).with_context(|| format!("opening the index in {}", dir.display()))
}
