//! The commit log of one source partition: the atomic record of what a checkpoint made visible.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::layout::TableRef;
use crate::store::{Store, StoreError};

/// Records kept per partition; older ones are pruned (the files they name stay).
const KEEP_RECORDS: u64 = 16;

/// Which source partition a log belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    pub job: String,
    pub source: String,
    pub topic: String,
    pub partition: i32,
}

impl PartitionKey {
    fn suffix(&self) -> String {
        format!(
            "{}/{}/{}/{:05}",
            self.job, self.source, self.topic, self.partition
        )
    }

    /// Where this partition's commit records live.
    pub fn log_dir(&self) -> String {
        format!("_checkpoints/{}", self.suffix())
    }

    /// Where this partition's files wait for their commit.
    pub fn staging_dir(&self) -> String {
        format!("_staging/{}", self.suffix())
    }

    /// Where this partition's operator snapshots live.
    pub fn state_dir(&self) -> String {
        format!("_state/{}", self.suffix())
    }
}

/// One file a checkpoint committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommittedFile {
    pub table: TableRef,
    /// Final path, relative to the store root.
    pub path: String,
    /// Where it was staged before the commit moved it.
    pub staged: String,
    pub rows: u64,
    pub bytes: u64,
}

/// A checkpoint of one partition, made visible atomically by creating its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub format: u32,
    pub job: String,
    pub source: String,
    pub topic: String,
    pub partition: i32,
    /// Position in this partition's log, from 1.
    pub seq: u64,
    /// First source offset this checkpoint covers.
    pub first_offset: i64,
    /// Where the partition resumes.
    pub next_offset: i64,
    pub files: Vec<CommittedFile>,
    /// Operator snapshots: stage name → path of the snapshot.
    pub state: BTreeMap<String, String>,
    /// Rows read from the source in this checkpoint, and how many were rejected.
    pub rows_in: u64,
    pub rows_rejected: u64,
    /// Which worker process wrote it (for people; not used in decisions).
    pub worker: String,
}

/// Reads and appends one partition's commit records.
pub struct CommitLog {
    store: Store,
    key: PartitionKey,
}

impl CommitLog {
    pub fn new(store: Store, key: PartitionKey) -> Self {
        Self { store, key }
    }

    pub fn key(&self) -> &PartitionKey {
        &self.key
    }

    fn record_path(&self, seq: u64) -> String {
        format!("{}/{seq:020}.json", self.key.log_dir())
    }

    /// The last committed record, if any.
    pub async fn latest(&self) -> Result<Option<CommitRecord>, StoreError> {
        let listed = self.store.list(&self.key.log_dir()).await?;
        let Some((path, _)) = listed.iter().rev().find(|(p, _)| p.ends_with(".json")) else {
            return Ok(None);
        };
        let bytes = self
            .store
            .get(path)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("{path} vanished while being read")))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{path}: {e}")))
    }

    /// Makes a recovered partition consistent: moves into place the files of the last record that
    /// were staged but not moved yet, and deletes staging leftovers of uncommitted checkpoints.
    /// Returns the last record.
    pub async fn recover(&self) -> Result<Option<CommitRecord>, StoreError> {
        let latest = self.latest().await?;
        if let Some(rec) = &latest {
            self.move_into_place(rec).await?;
        }
        for (path, _) in self.store.list(&self.key.staging_dir()).await? {
            self.store.delete(&path).await?;
        }
        Ok(latest)
    }

    /// Creates the record `rec` (its `seq` must be the last one plus one), then moves its files
    /// into place. `Conflict` means another writer owns the partition now.
    pub async fn commit(&self, rec: &CommitRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode commit record: {e}")))?;
        self.store
            .put_new(&self.record_path(rec.seq), Bytes::from(json))
            .await?;
        self.move_into_place(rec).await?;
        if rec.seq > KEEP_RECORDS {
            self.store
                .delete(&self.record_path(rec.seq - KEEP_RECORDS))
                .await?;
        }
        Ok(())
    }

    async fn move_into_place(&self, rec: &CommitRecord) -> Result<(), StoreError> {
        for f in &rec.files {
            if self.store.exists(&f.staged).await? {
                self.store.rename(&f.staged, &f.path).await?;
            } else if !self.store.exists(&f.path).await? {
                return Err(StoreError::Corrupt(format!(
                    "commit {} names {} but neither it nor its staged copy {} exists",
                    self.record_path(rec.seq),
                    f.path,
                    f.staged
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, files: Vec<CommittedFile>) -> CommitRecord {
        CommitRecord {
            format: 1,
            job: "j".into(),
            source: "s".into(),
            topic: "t".into(),
            partition: 0,
            seq,
            first_offset: 0,
            next_offset: 10,
            files,
            state: BTreeMap::new(),
            rows_in: 10,
            rows_rejected: 0,
            worker: "w".into(),
        }
    }

    #[tokio::test]
    async fn commit_fences_and_recovery_rolls_forward() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let key = PartitionKey {
            job: "j".into(),
            source: "s".into(),
            topic: "t".into(),
            partition: 0,
        };
        let log = CommitLog::new(store.clone(), key.clone());
        assert!(log.latest().await.unwrap().is_none());

        let staged = format!(
            "{}/x/datanets/d/day=2025-01-01/p.parquet",
            key.staging_dir()
        );
        let f = CommittedFile {
            table: TableRef::datanet("d"),
            path: "datanets/d/day=2025-01-01/p.parquet".into(),
            staged: staged.clone(),
            rows: 1,
            bytes: 3,
        };
        store
            .put(&staged, Bytes::from_static(b"abc"))
            .await
            .unwrap();
        // A crash after the record was created but before the file moved: write the record only.
        store
            .put_new(
                &log.record_path(1),
                Bytes::from(serde_json::to_vec(&rec(1, vec![f.clone()])).unwrap()),
            )
            .await
            .unwrap();
        let orphan = format!(
            "{}/y/datanets/d/day=2025-01-01/q.parquet",
            key.staging_dir()
        );
        store.put(&orphan, Bytes::from_static(b"zz")).await.unwrap();

        let latest = log.recover().await.unwrap().unwrap();
        assert_eq!(latest.seq, 1);
        assert!(store.exists(&f.path).await.unwrap());
        assert!(!store.exists(&orphan).await.unwrap());

        // A second writer of seq 1 is fenced out.
        assert!(matches!(
            log.commit(&rec(1, vec![])).await,
            Err(StoreError::Conflict { .. })
        ));
        log.commit(&rec(2, vec![])).await.unwrap();
        assert_eq!(log.latest().await.unwrap().unwrap().seq, 2);
    }
}
