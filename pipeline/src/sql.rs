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
    attribution_schema, contribution_schema, inference_schema, model_schema, penalty_schema,
    rejection_schema, ATTRIBUTIONS_TABLE, INFERENCES_TABLE, MODELS_TABLE, PARTITION_COLUMN,
    PENALTIES_TABLE, REJECTIONS_TABLE,
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
        (TableKind::Engine, PENALTIES_TABLE) => Some(penalty_schema()),
        (TableKind::Engine, ATTRIBUTIONS_TABLE) => Some(attribution_schema()),
        (TableKind::Engine, INFERENCES_TABLE) => Some(inference_schema()),
        (TableKind::Engine, MODELS_TABLE) => Some(model_schema()),
        (TableKind::Engine, crate::attribution::GRADIENTS_TABLE) => {
            Some(crate::attribution::gradient_table_schema())
        }
        _ => None,
    }
}

/// A session with every table of `store` registered by name.
pub async fn session(store: &Store) -> Result<SessionContext, SqlError> {
    session_with_partitions(
        store,
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    )
    .await
}

/// [`session`] planning `partitions` partitions per query (1: every aggregate sums in one
/// order, run after run).
pub async fn session_with_partitions(
    store: &Store,
    partitions: usize,
) -> Result<SessionContext, SqlError> {
    Ok(session_and_tables(store, partitions).await?.0)
}

/// [`session_with_partitions`], and the tables it found in the store (one listing for both).
pub async fn session_and_tables(
    store: &Store,
    partitions: usize,
) -> Result<(SessionContext, Vec<TableInfo>), SqlError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(partitions.max(1));
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
    // Empty engine tables, so queries over them work before anything was refused.
    for (name, schema) in [
        (REJECTIONS_TABLE, rejection_schema()),
        (PENALTIES_TABLE, penalty_schema()),
        (ATTRIBUTIONS_TABLE, attribution_schema()),
        (INFERENCES_TABLE, inference_schema()),
    ] {
        if !tables.iter().any(|t| t.name == name && t.files > 0) {
            let empty = datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
            ctx.register_table(name, Arc::new(empty))?;
        }
    }
    let datanets: Vec<&str> = tables
        .iter()
        .filter(|t| t.kind == TableKind::Datanet && t.files > 0)
        .map(|t| t.name.as_str())
        .collect();
    ctx.sql(&contributors_view(&datanets)).await?;
    Ok((ctx, tables))
}

/// Refusals that happen before the signature is verified: they say nothing about the address in
/// `contributor`, so they do not count for it.
const UNAUTHENTICATED: &str =
    "'malformed', 'schema', 'oversized', 'unknown_datanet', 'bad_signature', 'signer_mismatch'";

/// The `contributors` view: per address, contributions accepted (in every Datanet) and refused
/// after their signature held (in total and by reason), reputation, and penalty points.
///
/// Reputation is a credibility updated per decision in Kafka order (timestamp, partition,
/// offset): c ← 0.85·c + 0.15·outcome, outcome 1 for an accepted contribution and 0 for a
/// refused one, starting from 0.5; in closed form c = 0.5·0.85ⁿ + Σₖ 0.15·0.85ⁿ⁻ᵏ·outcomeₖ.
pub fn contributors_view(datanets: &[&str]) -> String {
    let mut parts: Vec<String> = datanets
        .iter()
        .map(|d| {
            format!(
                "SELECT contributor, kafka_timestamp AS ts, kafka_partition AS p, kafka_offset AS o, \
                 1.0 AS outcome, CAST(NULL AS VARCHAR) AS reason FROM \"{d}\""
            )
        })
        .collect();
    parts.push(format!(
        "SELECT contributor, kafka_timestamp AS ts, kafka_partition AS p, kafka_offset AS o, \
         0.0 AS outcome, reason FROM {REJECTIONS_TABLE} WHERE contributor IS NOT NULL AND reason NOT IN ({UNAUTHENTICATED})"
    ));
    format!(
        "CREATE VIEW contributors AS \
         WITH decisions AS ({}), \
         ranked AS (SELECT *, row_number() OVER (PARTITION BY contributor ORDER BY ts, p, o) AS r, \
                           count(*) OVER (PARTITION BY contributor) AS n FROM decisions), \
         rep AS (SELECT contributor, \
                        CAST(sum(CASE WHEN outcome = 1.0 THEN 1 ELSE 0 END) AS BIGINT) AS accepted, \
                        CAST(sum(CASE WHEN outcome = 0.0 THEN 1 ELSE 0 END) AS BIGINT) AS rejected, \
                        0.5 * power(0.85, CAST(max(n) AS DOUBLE)) \
                          + sum(0.15 * power(0.85, CAST(n - r AS DOUBLE)) * outcome) AS reputation \
                 FROM ranked GROUP BY contributor), \
         by_reason AS (SELECT contributor, \
                              string_agg(reason || ':' || CAST(c AS VARCHAR), ',' ORDER BY reason) AS rejected_by_reason \
                       FROM (SELECT contributor, reason, count(*) AS c FROM decisions \
                             WHERE reason IS NOT NULL GROUP BY contributor, reason) GROUP BY contributor), \
         pts AS (SELECT contributor, CAST(sum(points) AS BIGINT) AS penalty_points \
                 FROM {PENALTIES_TABLE} GROUP BY contributor) \
         SELECT rep.contributor AS address, accepted, rejected, \
                coalesce(by_reason.rejected_by_reason, '') AS rejected_by_reason, reputation, \
                coalesce(pts.penalty_points, 0) AS penalty_points \
         FROM rep LEFT JOIN by_reason ON rep.contributor = by_reason.contributor \
                  LEFT JOIN pts ON rep.contributor = pts.contributor",
        parts.join(" UNION ALL ")
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn engine_tables_and_contributors_answer_on_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        for q in [
            "SELECT count(*) FROM contributors",
            "SELECT count(*) FROM rejections",
            "SELECT count(*) FROM penalties",
            "SELECT count(*) FROM attributions",
            "SELECT count(*) FROM inferences",
        ] {
            let batches = query(&store, q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(
                batches.iter().map(|b| b.num_rows()).sum::<usize>(),
                1,
                "{q}"
            );
        }
    }
}
