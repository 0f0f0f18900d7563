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

/// What `ledgerflow index build --datanet` keeps beside the shards (`ledgerflow.json`; the name
/// avoids the words infini-gram's engine looks for in file names).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DatanetIndexManifest {
    pub datanet: String,
    /// Datanet files (relative to the store root) already in a shard, in indexing order.
    pub files: Vec<String>,
    pub shards: Vec<ledgerflow_index::ShardSummary>,
    pub vocab_size: usize,
}

/// Options of [`build_datanet_index`].
#[derive(Debug, Clone)]
pub struct DatanetIndexOptions {
    /// Vocabulary of the tokenizer trained on the first build.
    pub vocab_size: usize,
    /// Memory one shard may use while its suffix array is built; shards are cut to fit.
    pub memory_budget: u64,
    pub threads: usize,
}

/// What one build added.
#[derive(Debug, serde::Serialize)]
pub struct DatanetIndexReport {
    pub index: std::path::PathBuf,
    pub new_files: usize,
    pub new_documents: u64,
    pub new_shards: Vec<ledgerflow_index::ShardSummary>,
    pub shards: usize,
    pub tokenizer_trained: bool,
}

/// Where the token index of `datanet` lives: `<store>/indexes/<datanet>` (a local store only:
/// the index is memory-mapped).
pub fn datanet_index_dir(
    store: &ledgerflow_store::Store,
    datanet: &str,
) -> Result<std::path::PathBuf> {
    let url = store.url();
    if url.scheme() != "file" {
        bail!("token indexes are memory-mapped and need a local store, not {url}");
    }
    let root = url
        .to_file_path()
        .map_err(|()| anyhow::anyhow!("{url} is not a local path"))?;
    Ok(root.join("indexes").join(datanet))
}

/// Rows `(content_hash, contributor, content)` of one Datanet Parquet file.
async fn datanet_rows(
    store: &ledgerflow_store::Store,
    rel: &str,
) -> Result<Vec<(String, String, String)>> {
    use arrow_array::{Array, StringArray};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let bytes = store
        .get(rel)
        .await?
        .with_context(|| format!("{rel} vanished from the store"))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .with_context(|| format!("reading {rel}"))?
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let col = |name: &str| -> Result<StringArray> {
            let c = batch
                .column_by_name(name)
                .with_context(|| format!("{rel} has no column {name}"))?;
            Ok(c.as_any()
                .downcast_ref::<StringArray>()
                .with_context(|| format!("{rel}: column {name} is not text"))?
                .clone())
        };
        let (hash, who, content) = (col("content_hash")?, col("contributor")?, col("content")?);
        for i in 0..batch.num_rows() {
            if content.is_null(i) {
                continue;
            }
            rows.push((
                hash.value(i).to_owned(),
                who.value(i).to_owned(),
                content.value(i).to_owned(),
            ));
        }
    }
    Ok(rows)
}

/// Indexes what `datanet` committed since the last build: the first build trains the Datanet's
/// byte-level BPE tokenizer on its texts; every build appends shards (cut to the memory budget)
/// for the Datanet files not yet indexed and leaves the old shards as they are.
pub async fn build_datanet_index(
    store: &ledgerflow_store::Store,
    datanet: &str,
    opts: &DatanetIndexOptions,
) -> Result<DatanetIndexReport> {
    use ledgerflow_index::{build::build_bytes, ShardWriter, TextTokenizer};
    let dir = datanet_index_dir(store, datanet)?;
    std::fs::create_dir_all(&dir)?;
    let manifest_path = dir.join("ledgerflow.json");
    let mut manifest: DatanetIndexManifest = match std::fs::read(&manifest_path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
        Err(_) => DatanetIndexManifest {
            datanet: datanet.to_owned(),
            ..Default::default()
        },
    };
    let table = ledgerflow_store::layout::TableRef::datanet(datanet);
    let mut files: Vec<String> = store
        .list(&table.dir())
        .await?
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.ends_with(".parquet"))
        .collect();
    if files.is_empty() && manifest.files.is_empty() {
        bail!("Datanet {datanet} has no committed data in {}", store.url());
    }
    files.sort();
    let indexed: std::collections::HashSet<&String> = manifest.files.iter().collect();
    let new: Vec<String> = files
        .iter()
        .filter(|f| !indexed.contains(f))
        .cloned()
        .collect();

    let tokenizer_path = dir.join("tokenizer.json");
    let mut trained = false;
    // Rows read to train the tokenizer (in file order), kept for the files indexed below.
    let mut read: std::collections::BTreeMap<String, Vec<(String, String, String)>> =
        Default::default();
    let tokenizer = if tokenizer_path.exists() {
        TextTokenizer::load(&tokenizer_path)?
    } else {
        for f in &files {
            read.insert(f.clone(), datanet_rows(store, f).await?);
        }
        let texts = read.values().flatten().map(|r| r.2.as_str());
        let tok = TextTokenizer::train(texts, opts.vocab_size, 2)?;
        let tmp = dir.join(".tokenizer.json.partial");
        std::fs::write(&tmp, tok.to_json()?)?;
        std::fs::rename(&tmp, &tokenizer_path)?;
        trained = true;
        tok
    };

    let mut new_shards = Vec::new();
    let mut writer: Option<ShardWriter> = None;
    let mut new_documents = 0;
    for f in &new {
        let rows = match read.remove(f) {
            Some(rows) => rows,
            None => datanet_rows(store, f).await?,
        };
        for (hash, contributor, content) in rows {
            let ids = tokenizer.encode(&content)?;
            let full = writer.as_ref().is_some_and(|w| {
                w.docs() > 0 && build_bytes(w.tokens() + ids.len() as u64 + 1) > opts.memory_budget
            });
            if full {
                let w = writer.take().expect("writer");
                new_shards.push(w.finish(opts.threads)?);
            }
            let w = writer.get_or_insert_with(|| {
                ShardWriter::new(&dir, manifest.shards.len() + new_shards.len(), datanet)
            });
            w.add_document(
                &ids,
                &json!({"content_hash": hash, "contributor": contributor}),
            )?;
            new_documents += 1;
        }
    }
    if let Some(w) = writer.take() {
        new_shards.push(w.finish(opts.threads)?);
    }
    manifest.files.extend(new.iter().cloned());
    manifest.shards.extend(new_shards.iter().cloned());
    manifest.vocab_size = tokenizer.vocab_size();
    let tmp = dir.join(".ledgerflow.json.partial");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&tmp, &manifest_path)?;
    Ok(DatanetIndexReport {
        index: dir,
        new_files: new.len(),
        new_documents,
        new_shards,
        shards: manifest.shards.len(),
        tokenizer_trained: trained,
    })
}

/// `ledgerflow attribute`: the maximal spans of `text` in the Datanet's index (decoded) and the
/// contributions they credit.
pub fn attribute_text(dir: &Path, text: &str, params: &AttributeParams) -> Result<Value> {
    let tokenizer = ledgerflow_index::TextTokenizer::load(&dir.join("tokenizer.json"))
        .with_context(|| {
            format!(
                "no tokenizer in {} (run `ledgerflow index build --datanet` first)",
                dir.display()
            )
        })?;
    let index = open(dir, tokenizer.eos_id())?;
    let ids = tokenizer.encode(text)?;
    let spans = index.attribute(&ids, params);
    let credits = ledgerflow_index::credit(&index, &spans)?;
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            Ok(json!({
                "l": s.l, "r": s.r, "length": s.length, "count": s.count,
                "text": tokenizer.decode(&ids[s.l..s.r])?,
                "docs": s.docs.len(),
            }))
        })
        .collect::<Result<_>>()?;
    Ok(json!({ "tokens": ids.len(), "spans": spans, "contributions": credits }))
}
