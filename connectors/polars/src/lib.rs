//! Any table of a ledgerflow store as a polars [`LazyFrame`] (also `ledgerflow::polars_frame`
//! under the `ledgerflow` crate's `polars` feature, off by default).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use polars::prelude::*;
//! let store = ledgerflow_store::Store::open("./data")?;
//! let top = ledgerflow_polars::datanet(&store, "legal")
//!     .await?
//!     .group_by([col("contributor")])
//!     .agg([len().alias("n")])
//!     .sort(["n"], SortMultipleOptions::default().with_order_descending(true))
//!     .limit(5)
//!     .collect()?;
//! # Ok(()) }
//! ```
//!
//! The frame scans exactly the Parquet files the store lists as committed when it is built (the
//! engine renames files into a table's directory only after their checkpoint is recorded), with
//! the Hive `day=` directories as a `day` date column, as DataFusion, DuckDB and pyarrow see it.
//! `s3://` stores are read by polars' own object store client, which takes the same `AWS_*`
//! environment as the engine.

use anyhow::{bail, Result};
use ledgerflow_store::{Store, TableKind, TableRef};
use polars::prelude::*;

/// The Datanet `name` as a lazy scan of its committed files.
pub async fn datanet(store: &Store, name: &str) -> Result<LazyFrame> {
    table(store, &TableRef::datanet(name)).await
}

/// An engine table (`rejections`, …) as a lazy scan of its committed files.
pub async fn engine_table(store: &Store, name: &str) -> Result<LazyFrame> {
    table(store, &TableRef::engine(name)).await
}

async fn table(store: &Store, table: &TableRef) -> Result<LazyFrame> {
    let dir = table.dir();
    let files: Vec<String> = store
        .list(&dir)
        .await?
        .into_iter()
        .filter(|(p, _)| p.ends_with(".parquet"))
        .map(|(p, _)| p)
        .collect();
    if files.is_empty() {
        let kind = match table.kind {
            TableKind::Datanet => "Datanet",
            TableKind::Engine => "engine table",
        };
        bail!(
            "{kind} `{}` has no committed data in {} (see `ledgerflow datanet list`)",
            table.name,
            store.url()
        );
    }
    let paths = files
        .iter()
        .map(|rel| absolute(store, rel))
        .collect::<Result<Vec<_>>>()?;
    let args = ScanArgsParquet {
        hive_options: HiveOptions::new_enabled(),
        // The paths are literal file names, not patterns.
        glob: false,
        ..Default::default()
    };
    let paths = paths
        .into_iter()
        .map(|p| PlRefPath::new(p.as_str()))
        .collect();
    LazyFrame::scan_parquet_files(paths, args)
        .map_err(|e| anyhow::anyhow!("scanning {}{dir}: {e}", store.url()))
}

/// What polars opens for `rel`: a plain path for local stores, the `s3://` URL otherwise.
fn absolute(store: &Store, rel: &str) -> Result<String> {
    let url = store.url().join(rel)?;
    if url.scheme() == "file" {
        let path = url
            .to_file_path()
            .map_err(|()| anyhow::anyhow!("{url} is not a local path"))?;
        Ok(path.to_string_lossy().into_owned())
    } else {
        Ok(url.to_string())
    }
}
