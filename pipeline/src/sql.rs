//! `ledgerflow sql`: read-only DataFusion SQL over every Datanet and engine table in a store.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use arrow_schema::{DataType, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use ledgerflow_schemas::tables::{
    contribution_schema, rejection_schema, PARTITION_COLUMN, REJECTIONS_TABLE,
};
use ledgerflow_store::layout::valid_table_name;
use ledgerflow_store::{Store, TableKind};

/// Failures of a query: the user's SQL, or the store.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error(transparent)]
    Store(#[from] ledgerflow_store::StoreError),
    #[error("cannot format results: {0}")]
    Format(#[from] arrow_schema::ArrowError),
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
    Ndjson,
}

/// A table found in the store.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: String,
    pub kind: TableKind,
    pub files: usize,
    pub bytes: u64,
    pub days: Vec<String>,
}

/// Every stored table, Datanets first.
pub async fn list_tables(store: &Store) -> Result<Vec<TableInfo>, SqlError> {
    let mut out = Vec::new();
    for kind in [TableKind::Datanet, TableKind::Engine] {
        for name in store.list_dirs(kind.dir()).await? {
            if !valid_table_name(&name) {
                continue;
            }
            let files = store.list(&format!("{}/{name}", kind.dir())).await?;
            let parquet: Vec<&(String, u64)> = files
                .iter()
                .filter(|(p, _)| p.ends_with(".parquet"))
                .collect();
            let mut days: Vec<String> = parquet
                .iter()
                .filter_map(|(p, _)| {
                    p.split('/')
                        .find_map(|seg| seg.strip_prefix(&format!("{PARTITION_COLUMN}=")))
                        .map(str::to_string)
                })
                .collect();
            days.sort();
            days.dedup();
            out.push(TableInfo {
                name,
                kind,
                files: parquet.len(),
                bytes: parquet.iter().map(|(_, b)| b).sum(),
                days,
            });
        }
    }
    Ok(out)
}

fn known_schema(kind: TableKind, name: &str) -> Option<SchemaRef> {
    match (kind, name) {
        (TableKind::Datanet, _) => Some(contribution_schema()),
        (TableKind::Engine, REJECTIONS_TABLE) => Some(rejection_schema()),
        _ => None,
    }
}

/// A session with every table of `store` registered by name.
pub async fn session(store: &Store) -> Result<SessionContext, SqlError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let ctx = SessionContext::new_with_config(config);
    let url = store.url();
    if url.scheme() != "file" {
        let base = url::Url::parse(&format!(
            "{}://{}",
            url.scheme(),
            url.host_str().unwrap_or("")
        ))
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        ctx.register_object_store(&base, store.object_store());
    }
    let tables = list_tables(store).await?;
    let have_rejections = tables.iter().any(|t| t.name == REJECTIONS_TABLE);
    for t in &tables {
        if t.files == 0 {
            continue;
        }
        let table_url = ListingTableUrl::parse(format!("{}{}/{}/", url, t.kind.dir(), t.name))?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![(PARTITION_COLUMN.to_string(), DataType::Utf8)]);
        let schema = match known_schema(t.kind, &t.name) {
            Some(s) => s,
            None => options.infer_schema(&ctx.state(), &table_url).await?,
        };
        let config = ListingTableConfig::new(table_url)
            .with_listing_options(options)
            .with_schema(schema);
        ctx.register_table(t.name.as_str(), Arc::new(ListingTable::try_new(config)?))?;
    }
    if !have_rejections {
        // An empty `rejections` table, so queries over it work before anything was refused.
        let empty = datafusion::datasource::MemTable::try_new(rejection_schema(), vec![vec![]])?;
        ctx.register_table(REJECTIONS_TABLE, Arc::new(empty))?;
    }
    Ok(ctx)
}

/// Runs one read-only statement.
pub async fn query(store: &Store, sql: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let ctx = session(store).await?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, options).await?;
    Ok(df.collect().await?)
}

/// Formats results.
pub fn format(batches: &[RecordBatch], format: OutputFormat) -> Result<String, SqlError> {
    Ok(match format {
        OutputFormat::Table => arrow::util::pretty::pretty_format_batches(batches)?.to_string(),
        OutputFormat::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            String::from_utf8_lossy(&buf).into_owned()
        }
        OutputFormat::Json => {
            let mut w = arrow::json::ArrayWriter::new(Vec::new());
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            let mut s = String::from_utf8_lossy(&w.into_inner()).into_owned();
            if s.is_empty() {
                s.push_str("[]");
            }
            s
        }
        OutputFormat::Ndjson => {
            let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            String::from_utf8_lossy(&w.into_inner()).into_owned()
        }
    })
}
