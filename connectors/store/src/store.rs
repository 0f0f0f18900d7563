//! Opening a store root (local directory or S3-compatible URL) and the few operations we need.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

/// Failures of the store. `Conflict` means another writer committed first (fencing).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL {url:?} is not usable: {detail}")]
    Url { url: String, detail: String },
    #[error("object store error at {path}: {source}")]
    Object {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{path} already exists: another writer committed this checkpoint first")]
    Conflict { path: String },
    #[error("cannot write Parquet for table `{table}`: {source}")]
    Parquet {
        table: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn object(path: &Path, source: object_store::Error) -> Self {
        StoreError::Object {
            path: path.to_string(),
            source,
        }
    }
}

/// A store root: an object store and the prefix inside it everything lives under.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    url: Url,
}

impl Store {
    /// Opens `location`: a local directory path (created if missing), `file:///…`, or
    /// `s3://bucket/prefix` (credentials and endpoint from the usual `AWS_*` environment, e.g.
    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
    pub fn open(location: &str) -> Result<Self, StoreError> {
        let err = |detail: String| StoreError::Url {
            url: location.to_string(),
            detail,
        };
        if location.starts_with("s3://") {
            let url = Url::parse(location).map_err(|e| err(e.to_string()))?;
            let bucket = url.host_str().ok_or_else(|| err("no bucket".into()))?;
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                builder = builder
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_endpoint(endpoint);
            }
            let s3 = builder.build().map_err(|e| err(e.to_string()))?;
            let prefix = url.path().trim_matches('/').to_string();
            let root = Url::parse(&format!(
                "s3://{bucket}/{prefix}{}",
                if prefix.is_empty() { "" } else { "/" }
            ))
            .map_err(|e| err(e.to_string()))?;
            return Ok(Self {
                inner: Arc::new(s3),
                prefix,
                url: root,
            });
        }
        let dir = match location.strip_prefix("file://") {
            Some(p) => std::path::PathBuf::from(p),
            None if location.contains("://") => {
                return Err(err(
                    "only local paths, file:// and s3:// are supported".into()
                ))
            }
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
        let dir = dir.canonicalize().map_err(|e| err(e.to_string()))?;
        let url =
            Url::from_directory_path(&dir).map_err(|()| err("not an absolute path".into()))?;
        Ok(Self {
            inner: Arc::new(LocalFileSystem::new()),
            prefix: dir.to_string_lossy().trim_matches('/').to_string(),
            url,
        })
    }

    /// The root URL, ending in `/` (what DataFusion, DuckDB and pyarrow are pointed at).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The object store, for registering with DataFusion.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.clone()
    }

    /// The absolute object path of `rel`, a path relative to the root.
    pub fn path(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{}", self.prefix, rel.trim_start_matches('/')))
        }
    }

    /// `path` made relative to the root again.
    pub fn relative(&self, path: &Path) -> String {
        let s = path.as_ref();
        s.strip_prefix(&self.prefix)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(s)
            .to_string()
    }

    pub async fn put(&self, rel: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(rel);
        self.inner
            .put(&path, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| StoreError::object(&path, e))
    }

    /// Creates `rel` only if it does not exist yet; `Conflict` otherwise.
    pub async fn put_new(&self, rel: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(rel);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::Conflict {
                path: path.to_string(),
            }),
            Err(e) => Err(StoreError::object(&path, e)),
        }
    }

    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(rel);
        match self.inner.get(&path).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| StoreError::object(&path, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::object(&path, e)),
        }
    }

    pub async fn exists(&self, rel: &str) -> Result<bool, StoreError> {
        let path = self.path(rel);
        match self.inner.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::object(&path, e)),
        }
    }

    pub async fn rename(&self, from_rel: &str, to_rel: &str) -> Result<(), StoreError> {
        let (from, to) = (self.path(from_rel), self.path(to_rel));
        self.inner
            .rename(&from, &to)
            .await
            .map_err(|e| StoreError::object(&from, e))
    }

    pub async fn delete(&self, rel: &str) -> Result<(), StoreError> {
        let path = self.path(rel);
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::object(&path, e)),
        }
    }

    /// Every object under `rel_prefix`, as (relative path, size in bytes), sorted by path.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = self.path(rel_prefix);
        let mut out: Vec<(String, u64)> =
            match self.inner.list(Some(&prefix)).try_collect::<Vec<_>>().await {
                Ok(v) => v
                    .into_iter()
                    .map(|m| (self.relative(&m.location), m.size))
                    .collect(),
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(StoreError::object(&prefix, e)),
            };
        out.sort();
        Ok(out)
    }

    /// The names of the directories directly under `rel_prefix`.
    pub async fn list_dirs(&self, rel_prefix: &str) -> Result<Vec<String>, StoreError> {
        let prefix = self.path(rel_prefix);
        match self.inner.list_with_delimiter(Some(&prefix)).await {
            Ok(r) => {
                let mut dirs: Vec<String> = r
                    .common_prefixes
                    .iter()
                    .filter_map(|p| p.filename().map(str::to_string))
                    .collect();
                dirs.sort();
                Ok(dirs)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(StoreError::object(&prefix, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_round_trip_and_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        assert!(store.url().as_str().starts_with("file:///"));
        store
            .put_new("a/b.json", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert!(matches!(
            store.put_new("a/b.json", Bytes::from_static(b"2")).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            store.get("a/b.json").await.unwrap().unwrap(),
            Bytes::from_static(b"1")
        );
        store.rename("a/b.json", "c/d.json").await.unwrap();
        assert!(!store.exists("a/b.json").await.unwrap());
        assert_eq!(
            store.list("c").await.unwrap(),
            vec![("c/d.json".to_string(), 1)]
        );
        assert_eq!(
            store.list_dirs("").await.unwrap(),
            vec!["a".to_string(), "c".to_string()]
        );
        assert!(store.get("nope").await.unwrap().is_none());
    }
}
