//! `ledgerflow index`: building token indexes and querying them, with JSON shaped like
//! infini-gram's results.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ledgerflow_index::engine::AttributeParams;
use ledgerflow_index::Index;
use serde_json::{json, Value};

use crate::spec::PenaltyPolicy;

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

/// Opens the index in `dir` (a Datanet index: its current generation), with a readable error
/// when it is not one.
pub fn open(dir: &Path, eos: u16) -> Result<Index> {
    if !dir.is_dir() {
        bail!("{}: no such index folder", dir.display());
    }
    let shards = shards_dir(dir)?;
    Index::open(&shards, eos).with_context(|| format!("opening the index in {}", shards.display()))
}

/// What `ledgerflow index build --datanet` keeps beside the shards (`ledgerflow.json`; the name
/// avoids the words infini-gram's engine looks for in file names).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DatanetIndexManifest {
    pub datanet: String,
    /// The shards live in `gen-<generation>/`; every build that changes them writes the next
    /// generation (unchanged shards hard-linked) and then replaces this file.
    #[serde(default)]
    pub generation: u64,
    /// Datanet files (relative to the store root) already in a shard, in indexing order.
    pub files: Vec<String>,
    pub shards: Vec<ledgerflow_index::ShardSummary>,
    pub vocab_size: usize,
}

/// When small shards are merged: a run of at least `factor` consecutive shards of fewer than
/// `small_shard_tokens` tokens each becomes one shard (as many of them as fit the memory budget).
#[derive(Debug, Clone, Copy)]
pub struct MergePolicy {
    /// 0 turns merging off.
    pub factor: usize,
    pub small_shard_tokens: u64,
}

impl Default for MergePolicy {
    fn default() -> Self {
        Self {
            factor: 4,
            small_shard_tokens: 16 << 20,
        }
    }
}

/// Options of [`build_datanet_index`].
#[derive(Debug, Clone)]
pub struct DatanetIndexOptions {
    /// Vocabulary of the tokenizer trained on the first build.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged by the tokenizer's training.
    pub min_frequency: u64,
    /// Memory one shard may use while its suffix array is built; shards are cut to fit.
    pub memory_budget: u64,
    pub threads: usize,
    pub merge: MergePolicy,
    /// Report new documents that repeat a span of at least this many tokens of an earlier one
    /// (`None`: no such pass).
    pub substring_min_tokens: Option<usize>,
}

/// A new document repeating a span of an earlier one (a `duplicate_substring` penalty).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubstringDuplicateRow {
    pub content_hash: String,
    pub contributor: String,
    pub duplicate_of: String,
    pub duplicate_of_contributor: String,
    /// The span: first token in the later document, and length in tokens.
    pub offset: usize,
    pub length: usize,
    #[serde(skip)]
    position: Option<KafkaPosition>,
}

/// What one build added.
#[derive(Debug, serde::Serialize)]
pub struct DatanetIndexReport {
    pub index: std::path::PathBuf,
    pub generation: u64,
    pub new_files: usize,
    pub new_documents: u64,
    pub new_shards: Vec<ledgerflow_index::ShardSummary>,
    /// Shard numbers (of the previous layout) merged into one, per merge.
    pub merged: Vec<Vec<usize>>,
    pub shards: usize,
    pub tokenizer_trained: bool,
    pub substring_duplicates: Vec<SubstringDuplicateRow>,
    /// Rows written to the `penalties` table.
    pub penalties: usize,
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

/// The folder holding the current shards of the index in `dir`: `dir` itself for a plain
/// infini-gram index, `dir/gen-<N>` for a Datanet index (`ledgerflow.json` names N).
pub fn shards_dir(dir: &Path) -> Result<std::path::PathBuf> {
    let manifest = dir.join("ledgerflow.json");
    if !manifest.exists() {
        return Ok(dir.to_path_buf());
    }
    let m: DatanetIndexManifest = serde_json::from_slice(&std::fs::read(&manifest)?)
        .with_context(|| format!("reading {}", manifest.display()))?;
    Ok(dir.join(format!("gen-{}", m.generation)))
}

/// Where a Datanet row came from (for penalty rows).
#[derive(Debug, Clone)]
struct KafkaPosition {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp_ms: i64,
}

/// One Datanet row as the index needs it.
struct DatanetRow {
    hash: String,
    contributor: String,
    content: String,
    position: KafkaPosition,
}

/// The rows of one Datanet Parquet file.
async fn datanet_rows(store: &ledgerflow_store::Store, rel: &str) -> Result<Vec<DatanetRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
    use arrow_array::{Array, ArrayRef};
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
        let col = |name: &str| -> Result<ArrayRef> {
            batch
                .column_by_name(name)
                .cloned()
                .with_context(|| format!("{rel} has no column {name}"))
        };
        let text = |name: &str| -> Result<arrow_array::StringArray> {
            Ok(col(name)?
                .as_string_opt::<i32>()
                .with_context(|| format!("{rel}: column {name} is not text"))?
                .clone())
        };
        let (hash, who, content, topic) = (
            text("content_hash")?,
            text("contributor")?,
            text("content")?,
            text("kafka_topic")?,
        );
        let partition = col("kafka_partition")?;
        let partition = partition
            .as_primitive_opt::<Int32Type>()
            .context("kafka_partition is not int32")?;
        let offset = col("kafka_offset")?;
        let offset = offset
            .as_primitive_opt::<Int64Type>()
            .context("kafka_offset is not int64")?;
        let ts = col("kafka_timestamp")?;
        let ts = ts
            .as_primitive_opt::<TimestampMillisecondType>()
            .context("kafka_timestamp is not a millisecond timestamp")?;
        for i in 0..batch.num_rows() {
            if content.is_null(i) {
                continue;
            }
            rows.push(DatanetRow {
                hash: hash.value(i).to_owned(),
                contributor: who.value(i).to_owned(),
                content: content.value(i).to_owned(),
                position: KafkaPosition {
                    topic: topic.value(i).to_owned(),
                    partition: partition.value(i),
                    offset: offset.value(i),
                    timestamp_ms: ts.value(i),
                },
            });
        }
    }
    Ok(rows)
}

const SHARD_FILES: [&str; 6] = [
    "tokenized",
    "offset",
    "table",
    "metadata",
    "metaoff",
    "unigram",
];

/// Links (or copies, across file systems) the files of shard `from` in `src` to shard `to`
/// in `dst`.
fn link_shard(src: &Path, from: usize, dst: &Path, to: usize) -> Result<()> {
    for kind in SHARD_FILES {
        let a = src.join(format!("{kind}.{from}"));
        let b = dst.join(format!("{kind}.{to}"));
        if a.exists() && std::fs::hard_link(&a, &b).is_err() {
            std::fs::copy(&a, &b).with_context(|| format!("copying {}", a.display()))?;
        }
    }
    Ok(())
}

/// Indexes what `datanet` committed since the last build: the first build trains the Datanet's
/// byte-level BPE tokenizer on its texts; every build appends shards (cut to the memory budget)
/// for the Datanet files not yet indexed, reports the new documents that repeat long spans of
/// earlier ones, merges runs of small shards, and rewrites the content-hash map. Shards are
/// written into a new generation folder and published by replacing `ledgerflow.json`, so a
/// reader never sees a half-built index and a crash at any point leaves the last generation.
/// With `penalties`, every substring duplicate becomes a `duplicate_substring` penalty row
/// (and a `substring_duplicates` row), written under a name fixed by the generation so a
/// build that crashed after writing them rewrites the same files.
pub async fn build_datanet_index(
    store: &ledgerflow_store::Store,
    datanet: &str,
    opts: &DatanetIndexOptions,
    penalties: Option<&PenaltyPolicy>,
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
    let old_dir = dir.join(format!("gen-{}", manifest.generation));
    let mut report = DatanetIndexReport {
        index: old_dir.clone(),
        generation: manifest.generation,
        new_files: new.len(),
        new_documents: 0,
        new_shards: Vec::new(),
        merged: Vec::new(),
        shards: manifest.shards.len(),
        tokenizer_trained: false,
        substring_duplicates: Vec::new(),
        penalties: 0,
    };
    if new.is_empty() {
        return Ok(report);
    }

    let tokenizer_path = dir.join("tokenizer.json");
    // Rows read to train the tokenizer (in file order), kept for the files indexed below.
    let mut read: std::collections::BTreeMap<String, Vec<DatanetRow>> = Default::default();
    let tokenizer = if tokenizer_path.exists() {
        TextTokenizer::load(&tokenizer_path)?
    } else {
        for f in &files {
            read.insert(f.clone(), datanet_rows(store, f).await?);
        }
        let texts = read.values().flatten().map(|r| r.content.as_str());
        let tok = TextTokenizer::train(texts, opts.vocab_size, opts.min_frequency)?;
        let tmp = dir.join(".tokenizer.json.partial");
        std::fs::write(&tmp, tok.to_json()?)?;
        std::fs::rename(&tmp, &tokenizer_path)?;
        report.tokenizer_trained = true;
        tok
    };

    // The next generation: the current shards linked in, new shards after them.
    let generation = manifest.generation + 1;
    let gen_dir = dir.join(format!("gen-{generation}"));
    if gen_dir.exists() {
        std::fs::remove_dir_all(&gen_dir)?; // left by a build that crashed
    }
    std::fs::create_dir_all(&gen_dir)?;
    for s in 0..manifest.shards.len() {
        link_shard(&old_dir, s, &gen_dir, s)?;
    }
    let first_new = manifest.shards.len();
    let tokenizer_id = ledgerflow_schemas::hex0x::encode(
        &ledgerflow_schemas::contribution::keccak256(&std::fs::read(&tokenizer_path)?),
    );
    let mut positions: std::collections::HashMap<String, KafkaPosition> = Default::default();
    let mut writer: Option<ShardWriter> = None;
    for f in &new {
        let rows = match read.remove(f) {
            Some(rows) => rows,
            None => datanet_rows(store, f).await?,
        };
        let mut token_rows = TokenRows::default();
        for row in rows {
            let ids = tokenizer.encode(&row.content)?;
            let full = writer.as_ref().is_some_and(|w| {
                w.docs() > 0 && build_bytes(w.tokens() + ids.len() as u64 + 1) > opts.memory_budget
            });
            if full {
                let w = writer.take().expect("writer");
                report.new_shards.push(w.finish(opts.threads)?);
            }
            let w = writer.get_or_insert_with(|| {
                ShardWriter::new(&gen_dir, first_new + report.new_shards.len(), datanet)
            });
            w.add_document(
                &ids,
                &json!({"content_hash": row.hash, "contributor": row.contributor}),
            )?;
            token_rows.push(&row, &ids);
            positions.insert(row.hash, row.position);
            report.new_documents += 1;
        }
        token_rows.write(store, datanet, f, &tokenizer_id).await?;
    }
    if let Some(w) = writer.take() {
        report.new_shards.push(w.finish(opts.threads)?);
    }
    let mut shards = manifest.shards.clone();
    shards.extend(report.new_shards.iter().cloned());

    // Exact-substring duplicates among the new documents, before merging renumbers shards.
    if let (Some(min_len), false) = (opts.substring_min_tokens, report.new_shards.is_empty()) {
        let index = ledgerflow_index::Index::open(&gen_dir, tokenizer.eos_id())?;
        for d in ledgerflow_index::substring_duplicates(&index, first_new as u64, min_len)? {
            let meta = |line: &str| -> (String, String) {
                let v: Value = serde_json::from_str(line).unwrap_or_default();
                let field = |k: &str| v["metadata"][k].as_str().unwrap_or_default().to_owned();
                (field("content_hash"), field("contributor"))
            };
            let (content_hash, contributor) = meta(&d.metadata);
            let (duplicate_of, duplicate_of_contributor) = meta(&d.of_metadata);
            report.substring_duplicates.push(SubstringDuplicateRow {
                position: positions.get(&content_hash).cloned(),
                content_hash,
                contributor,
                duplicate_of,
                duplicate_of_contributor,
                offset: d.offset,
                length: d.length,
            });
        }
    }

    merge_small_shards(&gen_dir, &mut shards, opts, &mut report.merged)?;
    let index = ledgerflow_index::Index::open(&gen_dir, tokenizer.eos_id())?;
    ledgerflow_index::write_document_map(&index, "content_hash", &gen_dir)?;
    drop(index);

    if let Some(policy) = penalties {
        report.penalties = write_substring_tables(
            store,
            datanet,
            generation,
            &report.substring_duplicates,
            policy,
        )
        .await?;
    }

    manifest.generation = generation;
    manifest.files.extend(new.iter().cloned());
    manifest.shards = shards;
    manifest.vocab_size = tokenizer.vocab_size();
    let tmp = dir.join(".ledgerflow.json.partial");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&tmp, &manifest_path)?;
    // Older generations: readers that opened them keep their mappings.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("gen-") && n != format!("gen-{generation}")) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    report.index = gen_dir;
    report.generation = generation;
    report.shards = manifest.shards.len();
    Ok(report)
}

/// Merges runs of small shards of `dir` (see [`MergePolicy`]), renumbering the shards after
/// each merged run so they stay `0..n`.
fn merge_small_shards(
    dir: &Path,
    shards: &mut Vec<ledgerflow_index::ShardSummary>,
    opts: &DatanetIndexOptions,
    merged: &mut Vec<Vec<usize>>,
) -> Result<()> {
    use ledgerflow_index::build::build_bytes;
    if opts.merge.factor < 2 {
        return Ok(());
    }
    // Original numbers of the current shards, to report merges in the caller's terms.
    let mut origin: Vec<Vec<usize>> = (0..shards.len()).map(|s| vec![s]).collect();
    loop {
        let small = |s: &ledgerflow_index::ShardSummary| s.tokens < opts.merge.small_shard_tokens;
        // The first run of consecutive small shards that fits the budget and is long enough.
        let mut run = None;
        let mut i = 0;
        while i < shards.len() {
            if !small(&shards[i]) {
                i += 1;
                continue;
            }
            let mut j = i;
            let mut tokens = 0;
            while j < shards.len()
                && small(&shards[j])
                && build_bytes(tokens + shards[j].tokens) <= opts.memory_budget
            {
                tokens += shards[j].tokens;
                j += 1;
            }
            if j - i >= opts.merge.factor {
                run = Some((i, j));
                break;
            }
            i = j.max(i + 1);
        }
        let Some((a, b)) = run else {
            return Ok(());
        };
        let names: Vec<String> = (a..b).map(|s| s.to_string()).collect();
        let staging = dir.join(".merge");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        let summary = ledgerflow_index::merge_shards(dir, &names, &staging, a, opts.threads)?;
        for s in a..b {
            for kind in SHARD_FILES {
                let _ = std::fs::remove_file(dir.join(format!("{kind}.{s}")));
            }
        }
        for (k, s) in (b..shards.len()).enumerate() {
            for kind in SHARD_FILES {
                let from = dir.join(format!("{kind}.{s}"));
                if from.exists() {
                    std::fs::rename(&from, dir.join(format!("{kind}.{}", a + 1 + k)))?;
                }
            }
        }
        for kind in SHARD_FILES {
            let from = staging.join(format!("{kind}.{a}"));
            if from.exists() {
                std::fs::rename(&from, dir.join(format!("{kind}.{a}")))?;
            }
        }
        std::fs::remove_dir_all(&staging)?;
        let joined: Vec<usize> = origin[a..b].concat();
        merged.push(joined.clone());
        origin.splice(a..b, [joined]);
        shards.splice(a..b, [summary]);
        for (k, s) in shards.iter_mut().enumerate() {
            s.shard = k;
        }
    }
}

/// The Kafka position columns of an engine table (topic, partition, offset, timestamp), in the
/// order of its schema.
fn position_columns<'a>(
    positions: impl Iterator<Item = &'a KafkaPosition> + Clone,
) -> Vec<arrow_array::ArrayRef> {
    use arrow_array::{Int32Array, Int64Array, StringArray, TimestampMillisecondArray};
    vec![
        std::sync::Arc::new(StringArray::from_iter_values(
            positions.clone().map(|p| p.topic.as_str()),
        )),
        std::sync::Arc::new(Int32Array::from_iter_values(
            positions.clone().map(|p| p.partition),
        )),
        std::sync::Arc::new(Int64Array::from_iter_values(
            positions.clone().map(|p| p.offset),
        )),
        std::sync::Arc::new(
            TimestampMillisecondArray::from_iter_values(positions.map(|p| p.timestamp_ms))
                .with_timezone("UTC"),
        ),
    ]
}

/// The token column of one Datanet file's rows, written to the `tokens` table.
#[derive(Default)]
struct TokenRows {
    hashes: Vec<String>,
    contributors: Vec<String>,
    tokens: Vec<Vec<u16>>,
    positions: Vec<KafkaPosition>,
}

impl TokenRows {
    fn push(&mut self, row: &DatanetRow, ids: &[u16]) {
        self.hashes.push(row.hash.clone());
        self.contributors.push(row.contributor.clone());
        self.tokens.push(ids.to_vec());
        self.positions.push(row.position.clone());
    }

    /// Writes the rows of Datanet file `source` (a store path under the Datanet's folder) to
    /// the `tokens` table, under a name derived from `source`: a Datanet file is indexed once,
    /// and a build that crashed before publishing rewrites the same file.
    async fn write(
        self,
        store: &ledgerflow_store::Store,
        datanet: &str,
        source: &str,
        tokenizer: &str,
    ) -> Result<()> {
        use arrow_array::builder::{ListBuilder, UInt16Builder};
        use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
        if self.hashes.is_empty() {
            return Ok(());
        }
        let schema = ledgerflow_schemas::tables::token_schema();
        let item = match schema.field_with_name("tokens")?.data_type() {
            arrow_schema::DataType::List(item) => item.clone(),
            other => bail!("tokens column is {other}, not a list"),
        };
        let mut lists = ListBuilder::new(UInt16Builder::new()).with_field(item);
        for ids in &self.tokens {
            lists.values().append_slice(ids);
            lists.append(true);
        }
        let n = self.hashes.len();
        let mut columns: Vec<ArrayRef> = vec![
            std::sync::Arc::new(StringArray::from(self.hashes)),
            std::sync::Arc::new(StringArray::from(self.contributors)),
            std::sync::Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                datanet, n,
            ))),
            std::sync::Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                tokenizer, n,
            ))),
            std::sync::Arc::new(lists.finish()),
            std::sync::Arc::new(UInt32Array::from_iter_values(
                self.tokens.iter().map(|t| t.len() as u32),
            )),
        ];
        columns.extend(position_columns(self.positions.iter()));
        let batch = RecordBatch::try_new(schema, columns)?;
        let dir = ledgerflow_store::layout::TableRef::datanet(datanet).dir();
        let stem = source
            .strip_prefix(dir.as_str())
            .unwrap_or(source)
            .trim_matches('/')
            .trim_end_matches(".parquet")
            .replace(['/', '='], "-");
        put_table_file(
            store,
            ledgerflow_schemas::tables::TOKENS_TABLE,
            &batch,
            "kafka_timestamp",
            &format!("{datanet}-{stem}.parquet"),
        )
        .await
    }
}

/// Writes the `duplicate_substring` penalties and the `substring_duplicates` rows of one index
/// generation; returns the number of penalty rows.
async fn write_substring_tables(
    store: &ledgerflow_store::Store,
    datanet: &str,
    generation: u64,
    rows: &[SubstringDuplicateRow],
    policy: &PenaltyPolicy,
) -> Result<usize> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
    use ledgerflow_schemas::tables::{penalty_schema, substring_duplicate_schema};
    let rows: Vec<(&SubstringDuplicateRow, &KafkaPosition)> = rows
        .iter()
        .filter_map(|r| r.position.as_ref().map(|p| (r, p)))
        .collect();
    if rows.is_empty() {
        return Ok(0);
    }
    let file = format!("index-{datanet}-gen{generation}.parquet");
    let strings = |f: &dyn Fn(&SubstringDuplicateRow) -> &str| -> ArrayRef {
        std::sync::Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(r, _)| f(r)),
        ))
    };
    let mut columns: Vec<ArrayRef> = vec![
        strings(&|r| &r.content_hash),
        strings(&|r| &r.contributor),
        std::sync::Arc::new(StringArray::from_iter_values(rows.iter().map(|_| datanet))),
        strings(&|r| &r.duplicate_of),
        strings(&|r| &r.duplicate_of_contributor),
        std::sync::Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|(r, _)| r.offset as u64),
        )),
        std::sync::Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|(r, _)| r.length as u64),
        )),
    ];
    columns.extend(position_columns(rows.iter().map(|(_, p)| *p)));
    let batch = RecordBatch::try_new(substring_duplicate_schema(), columns)?;
    // Deterministic content under a deterministic name: a rerun after a crash rewrites it.
    put_table_file(
        store,
        ledgerflow_schemas::tables::SUBSTRING_DUPLICATES_TABLE,
        &batch,
        "kafka_timestamp",
        &file,
    )
    .await?;

    let points = policy.points_for("duplicate_substring");
    if points == 0 {
        return Ok(0);
    }
    let mut columns: Vec<ArrayRef> = vec![
        std::sync::Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, p)| {
            (p.timestamp_ms.max(0) as u64 / 1000) / policy.epoch_seconds.max(1)
        }))),
        std::sync::Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(r, _)| r.contributor.as_str()),
        )),
        std::sync::Arc::new(StringArray::from_iter_values(rows.iter().map(|_| datanet))),
        std::sync::Arc::new(StringArray::from_iter_values(
            rows.iter().map(|_| "duplicate_substring"),
        )),
        std::sync::Arc::new(UInt32Array::from_iter_values(rows.iter().map(|_| points))),
        std::sync::Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(r, _)| r.content_hash.as_str()),
        )),
    ];
    columns.extend(position_columns(rows.iter().map(|(_, p)| *p)));
    let batch = RecordBatch::try_new(penalty_schema(), columns)?;
    put_table_file(
        store,
        ledgerflow_schemas::tables::PENALTIES_TABLE,
        &batch,
        "kafka_timestamp",
        &file,
    )
    .await?;
    Ok(rows.len())
}

/// Writes `batch` into the engine table `table` as one Parquet file named `file` per UTC day of
/// `time_column`, replacing files of that name.
pub(crate) async fn put_table_file(
    store: &ledgerflow_store::Store,
    table: &str,
    batch: &arrow_array::RecordBatch,
    time_column: &'static str,
    file: &str,
) -> Result<()> {
    let mut sink = ledgerflow_store::TableSink::new(
        ledgerflow_store::layout::TableRef::engine(table),
        batch.schema(),
        3,
        64 * 1024,
    )
    .partitioned_by(time_column);
    sink.write(batch)?;
    for f in sink.finish(file)? {
        store.put(&f.path, f.bytes).await?;
    }
    Ok(())
}

/// A Datanet's index opened for span attribution (its tokenizer and shards), kept open by the
/// model server between requests.
pub struct SpanIndex {
    tokenizer: ledgerflow_index::TextTokenizer,
    index: Index,
}

impl SpanIndex {
    /// Opens the index in `dir` (`ledgerflow index build --datanet` writes it).
    pub fn open(dir: &Path) -> Result<Self> {
        let tokenizer = ledgerflow_index::TextTokenizer::load(&dir.join("tokenizer.json"))
            .with_context(|| {
                format!(
                    "no tokenizer in {} (run `ledgerflow index build --datanet` first)",
                    dir.display()
                )
            })?;
        let index = open(dir, tokenizer.eos_id())?;
        Ok(Self { tokenizer, index })
    }

    /// The maximal spans of `text` in the index (decoded) and the contributions they credit.
    pub fn attribute(&self, text: &str, params: &AttributeParams) -> Result<Value> {
        let ids = self.tokenizer.encode(text)?;
        let spans = self.index.attribute(&ids, params);
        let credits = ledgerflow_index::credit(&self.index, &spans)?;
        let spans: Vec<Value> = spans
            .iter()
            .map(|s| {
                Ok(json!({
                    "l": s.l, "r": s.r, "length": s.length, "count": s.count,
                    "text": self.tokenizer.decode(&ids[s.l..s.r])?,
                    "docs": s.docs.len(),
                }))
            })
            .collect::<Result<_>>()?;
        Ok(json!({ "tokens": ids.len(), "spans": spans, "contributions": credits }))
    }
}

/// `ledgerflow attribute`: the maximal spans of `text` in the Datanet's index (decoded) and the
/// contributions they credit.
pub fn attribute_text(dir: &Path, text: &str, params: &AttributeParams) -> Result<Value> {
    SpanIndex::open(dir)?.attribute(text, params)
}

/// Writes the `contributions` of an [`attribute_text`] result as `attributions` rows of model
/// output `output_id` (method `span`), created at `created_at_ms`. The file is named by the
/// output id and the method, so recording an output again replaces its rows of that day
/// instead of adding to them. Returns the number of rows.
pub async fn record_attributions(
    store: &ledgerflow_store::Store,
    datanet: &str,
    output_id: &str,
    result: &Value,
    created_at_ms: i64,
) -> Result<usize> {
    if output_id.is_empty() {
        bail!("an output id is required to record attributions");
    }
    let id = hex::encode(&ledgerflow_schemas::contribution::keccak256(output_id.as_bytes())[..12]);
    let file = format!("span-{datanet}-{id}.parquet");
    record_attribution_batch(
        store,
        &[(output_id, datanet, result, created_at_ms)],
        "span",
        &file,
    )
    .await
}

/// Writes the credits of several outputs — (output id, Datanet, a result with `contributions`
/// of `content_hash`, `contributor`, `score`, created at) — as `attributions` rows of `method`
/// (`span`, `gradient`) in one file per day named `file`. Returns the number of rows.
pub async fn record_attribution_batch(
    store: &ledgerflow_store::Store,
    outputs: &[(&str, &str, &Value, i64)],
    method_name: &str,
    file: &str,
) -> Result<usize> {
    use arrow_array::builder::{
        ArrayBuilder, Float64Builder, StringBuilder, TimestampMillisecondBuilder,
    };
    use arrow_array::{ArrayRef, RecordBatch};
    use ledgerflow_schemas::tables::{attribution_schema, ATTRIBUTIONS_TABLE};
    use std::sync::Arc;
    let (mut out, mut dn, mut hash, mut who, mut method) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut score, mut at) = (Float64Builder::new(), TimestampMillisecondBuilder::new());
    for (output_id, datanet, result, created_at_ms) in outputs {
        let credits = result["contributions"]
            .as_array()
            .context("the attribution result has no contributions")?;
        for c in credits {
            out.append_value(output_id);
            dn.append_value(datanet);
            hash.append_value(c["content_hash"].as_str().unwrap_or_default());
            who.append_value(c["contributor"].as_str().unwrap_or_default());
            method.append_value(method_name);
            score.append_value(c["score"].as_f64().unwrap_or(0.0));
            at.append_value(*created_at_ms);
        }
    }
    let n = out.len();
    if n == 0 {
        return Ok(0);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(out.finish()),
        Arc::new(dn.finish()),
        Arc::new(hash.finish()),
        Arc::new(who.finish()),
        Arc::new(method.finish()),
        Arc::new(score.finish()),
        Arc::new(at.finish().with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(attribution_schema(), columns)?;
    put_table_file(store, ATTRIBUTIONS_TABLE, &batch, "created_at", file).await?;
    Ok(n)
}

/// One answered request, as `record_inference` writes it to `inferences`.
pub struct Inference<'a> {
    pub request_id: &'a str,
    pub model: &'a str,
    /// For an adapter: the content hash of the exact version that answered.
    pub adapter_generation: Option<&'a str>,
    pub datanet: &'a str,
    pub prompt: &'a str,
    pub output: &'a str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub time_to_first_token_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// Fee in the reward token's base units (< 10^38).
    pub fee: Option<u128>,
    pub created_at_ms: i64,
}

/// Writes one row of `inferences` (the file named by the request id, so recording it again
/// replaces it).
pub async fn record_inference(store: &ledgerflow_store::Store, i: &Inference<'_>) -> Result<()> {
    if i.request_id.is_empty() {
        bail!("an inference needs a request id");
    }
    let id =
        hex::encode(&ledgerflow_schemas::contribution::keccak256(i.request_id.as_bytes())[..12]);
    record_inference_batch(
        store,
        std::slice::from_ref(i),
        &format!("inference-{id}.parquet"),
    )
    .await
}

/// Writes rows of `inferences` in one file per day named `file`.
pub async fn record_inference_batch(
    store: &ledgerflow_store::Store,
    rows: &[Inference<'_>],
    file: &str,
) -> Result<()> {
    use arrow_array::{
        ArrayRef, Decimal128Array, Float64Array, RecordBatch, StringArray,
        TimestampMillisecondArray, UInt32Array,
    };
    use ledgerflow_schemas::tables::{inference_schema, INFERENCES_TABLE};
    use std::sync::Arc;
    if let Some(i) = rows.iter().find(|i| i.request_id.is_empty()) {
        bail!("an inference of {} needs a request id", i.model);
    }
    let s = |f: &dyn for<'x> Fn(&'x Inference<'_>) -> &'x str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        s(&|i| i.request_id),
        s(&|i| i.model),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|i| i.adapter_generation),
        )),
        s(&|i| i.datanet),
        s(&|i| i.prompt),
        s(&|i| i.output),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|i| i.prompt_tokens),
        )),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|i| i.completion_tokens),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|i| i.time_to_first_token_ms),
        )),
        Arc::new(Float64Array::from_iter(rows.iter().map(|i| i.total_ms))),
        Arc::new(
            Decimal128Array::from_iter(rows.iter().map(|i| i.fee.map(|f| f as i128)))
                .with_precision_and_scale(38, 0)?,
        ),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|i| i.created_at_ms))
                .with_timezone("UTC"),
        ),
    ];
    let batch = RecordBatch::try_new(inference_schema(), columns)?;
    put_table_file(store, INFERENCES_TABLE, &batch, "created_at", file).await
}

/// `ledgerflow index doc`: the document of a Datanet index holding the contribution
/// `content_hash` (looked up in `documents.fst`), decoded.
pub fn document_by_hash(dir: &Path, content_hash: &str) -> Result<Value> {
    let tokenizer = ledgerflow_index::TextTokenizer::load(&dir.join("tokenizer.json"))?;
    let index = open(dir, tokenizer.eos_id())?;
    let map = ledgerflow_index::DocumentMap::open(index.dir())?;
    let key = content_hash.to_ascii_lowercase();
    let found = map
        .get(&key)
        .with_context(|| format!("no document with content hash {key} in {}", dir.display()))?;
    let doc = index.doc_by_ix(found.doc_ix(&index), u64::MAX / 4)?;
    let metadata: Value = serde_json::from_str(&doc.metadata).unwrap_or(Value::Null);
    Ok(json!({
        "doc_ix": doc.doc_ix,
        "shard": found.shard,
        "doc_len": doc.doc_len,
        "metadata": metadata["metadata"],
        "text": tokenizer.decode(&doc.token_ids)?,
    }))
}
