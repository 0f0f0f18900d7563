//! Table sinks: buffer a partition's rows as Parquet, one file per day per checkpoint.

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMillisecondType;
use arrow_array::{RecordBatch, UInt32Array};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use ledgerflow_schemas::tables::contribution_schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::layout::{day_of, valid_table_name, TableRef};
use crate::store::StoreError;

/// Configuration of a `datanet` sink.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableSinkConfig {
    /// The Datanet written (lowercase letters, digits and `_`; it is also the SQL table name).
    pub datanet: String,
    /// zstd level of the Parquet files (1 is fastest; 3 is zstd's default).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Most rows in one Parquet row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
}

fn default_zstd_level() -> i32 {
    1
}

fn default_row_group_rows() -> usize {
    64 * 1024
}

impl TableSinkConfig {
    /// Problems with the config that serde cannot see.
    pub fn check(&self) -> Result<(), String> {
        if !valid_table_name(&self.datanet) {
            return Err(format!(
                "datanet {:?} must start with a lowercase letter and hold only lowercase letters, digits and `_` (at most 64)",
                self.datanet
            ));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(format!(
                "zstd_level {} must be within 1..=22",
                self.zstd_level
            ));
        }
        if self.row_group_rows == 0 {
            return Err("row_group_rows must be at least 1".into());
        }
        Ok(())
    }

    /// The schema the sink's input must have.
    pub fn input_schema(&self) -> SchemaRef {
        contribution_schema()
    }
}

/// One encoded Parquet file, not yet in the store.
#[derive(Debug, Clone)]
pub struct EncodedFile {
    pub table: TableRef,
    /// Path relative to the store root.
    pub path: String,
    pub rows: u64,
    pub bytes: Bytes,
}

/// Writes one table's rows of one partition; see the crate docs for the commit protocol.
pub struct TableSink {
    table: TableRef,
    /// The timestamp column whose UTC day partitions the files.
    time_column: &'static str,
    schema: SchemaRef,
    props: WriterProperties,
    open: BTreeMap<String, (ArrowWriter<Vec<u8>>, u64)>,
}

impl TableSink {
    /// A sink of `table` rows of `schema`, Parquet with zstd at `zstd_level`.
    pub fn new(table: TableRef, schema: SchemaRef, zstd_level: i32, row_group_rows: usize) -> Self {
        let level = ZstdLevel::try_new(zstd_level).unwrap_or_default();
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(row_group_rows))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_created_by(concat!("ledgerflow ", env!("CARGO_PKG_VERSION")).to_string());
        // High-cardinality text: dictionaries only cost time.
        for col in ["content", "content_hash", "signature", "detail", "metadata"] {
            if schema.field_with_name(col).is_ok() {
                props = props.set_column_dictionary_enabled(ColumnPath::from(col), false);
            }
        }
        Self {
            table,
            time_column: "kafka_timestamp",
            schema,
            props: props.build(),
            open: BTreeMap::new(),
        }
    }

    /// Partitions by the UTC day of `column` (a millisecond timestamp) instead of
    /// `kafka_timestamp`, for tables whose rows do not come from Kafka records.
    pub fn partitioned_by(mut self, column: &'static str) -> Self {
        self.time_column = column;
        self
    }

    /// Buffers `batch`, split by the UTC day of its time column (`kafka_timestamp`).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let ts = batch
            .column_by_name(self.time_column)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "rows for `{}` have no {}",
                    self.table, self.time_column
                ))
            })?
            .as_primitive::<TimestampMillisecondType>();
        let day_no = |i: usize| ts.value(i).div_euclid(86_400_000);
        let first = day_no(0);
        if (1..batch.num_rows()).all(|i| day_no(i) == first) {
            return self.write_day(day_of(ts.value(0)), batch);
        }
        let mut by_day: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for i in 0..batch.num_rows() {
            by_day.entry(day_no(i)).or_default().push(i as u32);
        }
        for (day, rows) in by_day {
            let idx = UInt32Array::from(rows);
            let part = arrow::compute::take_record_batch(batch, &idx).map_err(|e| {
                StoreError::Corrupt(format!("cannot split rows of `{}` by day: {e}", self.table))
            })?;
            self.write_day(day_of(day * 86_400_000), &part)?;
        }
        Ok(())
    }

    fn write_day(&mut self, day: String, batch: &RecordBatch) -> Result<(), StoreError> {
        let table = self.table.name.clone();
        let perr = |source| StoreError::Parquet {
            table: table.clone(),
            source,
        };
        if !self.open.contains_key(&day) {
            let w = ArrowWriter::try_new(Vec::new(), self.schema.clone(), Some(self.props.clone()))
                .map_err(perr)?;
            self.open.insert(day.clone(), (w, 0));
        }
        let (w, rows) = self.open.get_mut(&day).expect("inserted above");
        w.write(batch).map_err(perr)?;
        *rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Rows buffered since the last [`TableSink::finish`].
    pub fn buffered_rows(&self) -> u64 {
        self.open.values().map(|(_, r)| r).sum()
    }

    /// Closes the buffered files, naming each `file_name` under its day.
    pub fn finish(&mut self, file_name: &str) -> Result<Vec<EncodedFile>, StoreError> {
        let mut files = Vec::with_capacity(self.open.len());
        for (day, (w, rows)) in std::mem::take(&mut self.open) {
            let bytes = w.into_inner().map_err(|source| StoreError::Parquet {
                table: self.table.name.clone(),
                source,
            })?;
            files.push(EncodedFile {
                path: self.table.file_path(&day, file_name),
                table: self.table.clone(),
                rows,
                bytes: Bytes::from(bytes),
            });
        }
        Ok(files)
    }
}
