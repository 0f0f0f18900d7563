//! Where things live in the store.

use std::fmt;

use ledgerflow_schemas::tables::PARTITION_COLUMN;

/// Datanets are user data; engine tables (`rejections`, …) are the engine's own records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    Datanet,
    Engine,
}

impl TableKind {
    pub fn dir(self) -> &'static str {
        match self {
            TableKind::Datanet => "datanets",
            TableKind::Engine => "tables",
        }
    }
}

/// A stored table.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TableRef {
    pub kind: TableKind,
    pub name: String,
}

impl TableRef {
    pub fn datanet(name: impl Into<String>) -> Self {
        Self {
            kind: TableKind::Datanet,
            name: name.into(),
        }
    }

    pub fn engine(name: impl Into<String>) -> Self {
        Self {
            kind: TableKind::Engine,
            name: name.into(),
        }
    }

    /// `datanets/<name>` or `tables/<name>`, relative to the store root.
    pub fn dir(&self) -> String {
        format!("{}/{}", self.kind.dir(), self.name)
    }

    /// The relative path of one data file of this table.
    pub fn file_path(&self, day: &str, file_name: &str) -> String {
        format!("{}/{PARTITION_COLUMN}={day}/{file_name}", self.dir())
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Whether `name` can be a Datanet or table name: it becomes a path segment and a SQL identifier.
pub fn valid_table_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The deterministic data-file name of a partition's offset range.
pub fn part_file_name(topic: &str, partition: i32, first_offset: i64, last_offset: i64) -> String {
    let topic: String = topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("part-{topic}-{partition:05}-{first_offset:020}-{last_offset:020}.parquet")
}

/// `YYYY-MM-DD` (UTC) of a millisecond timestamp.
pub fn day_of(ts_ms: i64) -> String {
    let days = ts_ms.div_euclid(86_400_000);
    chrono::DateTime::from_timestamp(days * 86_400, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_table_name("legal"));
        assert!(valid_table_name("legal_v2"));
        assert!(!valid_table_name("Legal"));
        assert!(!valid_table_name("2legal"));
        assert!(!valid_table_name("a/b"));
        assert_eq!(
            part_file_name("contributions.legal", 3, 0, 99),
            "part-contributions.legal-00003-00000000000000000000-00000000000000000099.parquet"
        );
        assert_eq!(day_of(1_764_000_000_000), "2025-11-24");
        assert_eq!(day_of(-1), "1969-12-31");
        assert_eq!(
            TableRef::datanet("legal").file_path("2025-11-24", "f.parquet"),
            "datanets/legal/day=2025-11-24/f.parquet"
        );
    }
}
