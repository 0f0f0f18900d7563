//! A sorted map from a metadata key (a Datanet index uses the content hash) to the document
//! holding it, stored as an `fst` map beside the shards: `documents.fst` (a name infini-gram's
//! engine ignores). Values pack the shard's position in the index and the document's position
//! in the shard (`shard << 40 | local`).

use std::path::Path;

use crate::engine::Index;
use crate::{IndexError, Result};

/// File name of the map in an index folder.
pub const DOCUMENT_MAP: &str = "documents.fst";

/// Where a document is: the shard's position in [`Index::shards`] and the document's in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocRef {
    pub shard: usize,
    pub local: u64,
}

impl DocRef {
    /// The document's index over all shards (as [`Index::doc_by_ix`] takes it).
    pub fn doc_ix(&self, index: &Index) -> u64 {
        index.shards()[..self.shard]
            .iter()
            .map(|s| s.doc_cnt())
            .sum::<u64>()
            + self.local
    }
}

/// Writes `documents.fst` in `out`: for every document of `index` whose metadata line has
/// `"metadata": {field: "…"}`, that string → the document. When two documents share a key the
/// first (in index order) wins. Returns the number of keys.
pub fn write_document_map(index: &Index, field: &str, out: &Path) -> Result<usize> {
    let mut entries: Vec<(String, u64)> = Vec::new();
    for (s, shard) in index.shards().iter().enumerate() {
        for local in 0..shard.doc_cnt() {
            let line = shard.metadata_line(local);
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(key) = v["metadata"][field].as_str() {
                entries.push((key.to_owned(), ((s as u64) << 40) | local));
            }
        }
    }
    // Stable: among equal keys the first in index order stays first.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.dedup_by(|later, first| later.0 == first.0);
    let tmp = out.join(format!(".{DOCUMENT_MAP}.partial"));
    let file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut builder = fst::MapBuilder::new(file).map_err(fst_error)?;
    for (k, v) in &entries {
        builder.insert(k, *v).map_err(fst_error)?;
    }
    builder.finish().map_err(fst_error)?;
    std::fs::rename(&tmp, out.join(DOCUMENT_MAP))?;
    Ok(entries.len())
}

/// `documents.fst` of an index folder, read into memory.
pub struct DocumentMap(fst::Map<Vec<u8>>);

impl DocumentMap {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(DOCUMENT_MAP);
        let bytes = std::fs::read(&path).map_err(|e| IndexError::Open(path.clone(), e))?;
        fst::Map::new(bytes)
            .map(Self)
            .map_err(|e| IndexError::Format(format!("{}: {e}", path.display())))
    }

    /// The document whose key is `key`.
    pub fn get(&self, key: &str) -> Option<DocRef> {
        self.0.get(key).map(|v| DocRef {
            shard: (v >> 40) as usize,
            local: v & ((1 << 40) - 1),
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn fst_error(e: fst::Error) -> IndexError {
    IndexError::Format(format!("documents.fst: {e}"))
}
