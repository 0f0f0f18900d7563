//! The OP Stack alt-DA server API, as eigenda-proxy serves it: `POST /put` with the payload as
//! the body answers the commitment (opaque bytes), `GET /get/0x<commitment hex>` answers the
//! payload. [`AltDaClient`] talks to any such server; [`serve`] is a loopback server of the same
//! API for tests and local runs (`ledgerflow da serve`), which keeps each payload as the EigenDA
//! blob the proxy would disperse (encoded with [`crate::codec`], decoded again on every read).
//!
//! A put is not idempotent: like a real DA certificate, each commitment the loopback server
//! answers is new, even for a payload it already holds. Callers that must not publish twice
//! journal the commitment before they act on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha3::{Digest, Keccak256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::codec;

/// The most a blob may hold: EigenDA's 16 MiB limit.
pub const MAX_BLOB_BYTES: usize = 16 << 20;

/// The largest payload that fits in one blob.
pub fn max_payload_bytes() -> usize {
    codec::max_payload(MAX_BLOB_BYTES / codec::SYMBOL)
}

/// Failures of a DA server call.
#[derive(Debug, thiserror::Error)]
pub enum DaError {
    #[error("DA server {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("DA server {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("DA server {url} answered an empty commitment")]
    EmptyCommitment { url: String },
    #[error("the payload is {len} bytes; one blob holds at most {max}")]
    TooLarge { len: usize, max: usize },
}

/// A client of an alt-DA server (eigenda-proxy, or [`serve`]).
#[derive(Debug, Clone)]
pub struct AltDaClient {
    base: String,
    http: reqwest::Client,
}

impl AltDaClient {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:3100`).
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("a plain HTTP client builds");
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// Publishes `payload`; returns its commitment.
    pub async fn put(&self, payload: Vec<u8>) -> Result<Vec<u8>, DaError> {
        if payload.len() > max_payload_bytes() {
            return Err(DaError::TooLarge {
                len: payload.len(),
                max: max_payload_bytes(),
            });
        }
        let url = format!("{}/put", self.base);
        let commitment = self.call(self.http.post(&url).body(payload), &url).await?;
        if commitment.is_empty() {
            return Err(DaError::EmptyCommitment { url });
        }
        Ok(commitment)
    }

    /// The payload behind `commitment`.
    pub async fn get(&self, commitment: &[u8]) -> Result<Vec<u8>, DaError> {
        let url = format!("{}/get/0x{}", self.base, hex::encode(commitment));
        self.call(self.http.get(&url), &url).await
    }

    async fn call(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Vec<u8>, DaError> {
        let http = |source| DaError::Http {
            url: url.to_string(),
            source,
        };
        let resp = req.send().await.map_err(http)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(http)?;
        if !status.is_success() {
            return Err(DaError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        Ok(body.to_vec())
    }
}

/// keccak256 of `bytes`.
pub fn keccak256(bytes: &[u8]) -> [u8; 32] {
    Keccak256::digest(bytes).into()
}

/// What the loopback server holds: blobs by commitment, optionally mirrored to a directory.
#[derive(Default)]
struct Blobs {
    memory: Mutex<HashMap<Vec<u8>, Arc<Vec<u8>>>>,
    dir: Option<PathBuf>,
    puts: AtomicU64,
}

impl Blobs {
    fn path(&self, commitment: &[u8]) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}.blob", hex::encode(commitment))))
    }

    /// Encodes and keeps a payload; the commitment is OP's generic-commitment prefix (`0x01`),
    /// EigenDA's DA-layer byte (`0x00`), a version byte (`0x00`), the blob's keccak256, and a
    /// sequence number that makes every put's commitment new.
    fn put(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let blob = codec::encode(payload).map_err(|e| e.to_string())?;
        if blob.len() > MAX_BLOB_BYTES {
            return Err(format!(
                "the payload is {} bytes; one blob holds at most {}",
                payload.len(),
                max_payload_bytes()
            ));
        }
        let seq = self.puts.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let mut commitment = vec![0x01, 0x00, 0x00];
        commitment.extend_from_slice(&keccak256(&blob));
        commitment.extend_from_slice(&(nanos ^ seq).to_be_bytes());
        if let Some(path) = self.path(&commitment) {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &blob)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        self.memory
            .lock()
            .expect("blob map")
            .insert(commitment.clone(), Arc::new(blob));
        Ok(commitment)
    }

    /// The payload of `commitment`, decoded from its blob; `None` when unknown.
    fn get(&self, commitment: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let held = self
            .memory
            .lock()
            .expect("blob map")
            .get(commitment)
            .cloned();
        let blob = match held {
            Some(b) => b,
            None => match self.path(commitment).map(std::fs::read) {
                Some(Ok(b)) => Arc::new(b),
                _ => return Ok(None),
            },
        };
        if blob.len() < 32 || keccak256(&blob) != commitment.get(3..35).unwrap_or_default() {
            return Err("the stored blob does not match its commitment".into());
        }
        codec::decode(&blob).map(Some).map_err(|e| e.to_string())
    }
}

/// Binds `addr` and serves the alt-DA API until the runtime stops; returns the bound address.
/// With `dir`, blobs are also written there and read back after a restart.
pub async fn serve(addr: &str, dir: Option<PathBuf>) -> std::io::Result<SocketAddr> {
    if let Some(d) = &dir {
        std::fs::create_dir_all(d)?;
    }
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let blobs = Arc::new(Blobs {
        dir,
        ..Blobs::default()
    });
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let blobs = blobs.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(sock, &blobs).await {
                    tracing::debug!("DA connection: {e}");
                }
            });
        }
    });
    Ok(bound)
}

/// One request per connection (`Connection: close`).
async fn handle(mut sock: TcpStream, blobs: &Blobs) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 << 10 {
            return respond(&mut sock, 431, b"request head too large").await;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        request.next().unwrap_or_default(),
        request.next().unwrap_or_default(),
    );
    let path = target.split('?').next().unwrap_or_default();
    let mut length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(usize::MAX);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return respond(&mut sock, 411, b"send a Content-Length").await;
            }
        }
    }
    match (method, path) {
        ("POST", "/put" | "/put/") => {
            if length > max_payload_bytes() {
                return respond(&mut sock, 413, b"the payload does not fit in one blob").await;
            }
            let mut body = buf.split_off(head_end);
            while body.len() < length {
                let mut chunk = vec![0u8; (length - body.len()).min(1 << 20)];
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
            match blobs.put(&body) {
                Ok(c) => respond(&mut sock, 200, &c).await,
                Err(e) => respond(&mut sock, 400, e.as_bytes()).await,
            }
        }
        ("GET", p) if p.starts_with("/get/") => {
            let key = p["/get/".len()..].trim_start_matches("0x");
            let Ok(commitment) = hex::decode(key) else {
                return respond(&mut sock, 400, b"the commitment is not hex").await;
            };
            match blobs.get(&commitment) {
                Ok(Some(payload)) => respond(&mut sock, 200, &payload).await,
                Ok(None) => respond(&mut sock, 404, b"no blob with this commitment").await,
                Err(e) => respond(&mut sock, 500, e.as_bytes()).await,
            }
        }
        ("GET", "/health") => respond(&mut sock, 200, b"ok").await,
        _ => respond(&mut sock, 404, b"try POST /put or GET /get/0x<commitment>").await,
    }
}

async fn respond(sock: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("ledgerflow-da-{}", std::process::id()));
        let addr = serve("127.0.0.1:0", Some(dir.clone())).await.unwrap();
        let client = AltDaClient::new(&format!("http://{addr}"));
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let c1 = client.put(payload.clone()).await.unwrap();
        let c2 = client.put(payload.clone()).await.unwrap();
        assert_ne!(c1, c2, "every put answers a new commitment");
        assert_eq!(&c1[..3], &[1, 0, 0]);
        assert_eq!(client.get(&c1).await.unwrap(), payload);
        assert_eq!(client.get(&c2).await.unwrap(), payload);
        assert_eq!(client.get(&[]).await.ok(), None);
        let mut unknown = c1.clone();
        unknown[5] ^= 1;
        match client.get(&unknown).await {
            Err(DaError::Status { status: 404, .. }) => {}
            other => panic!("{other:?}"),
        }
        // An empty payload is a valid blob too.
        let c3 = client.put(Vec::new()).await.unwrap();
        assert_eq!(client.get(&c3).await.unwrap(), Vec::<u8>::new());
        // A second server over the same directory reads what the first one stored.
        let again = serve("127.0.0.1:0", Some(dir.clone())).await.unwrap();
        let client2 = AltDaClient::new(&format!("http://{again}/"));
        assert_eq!(client2.get(&c1).await.unwrap(), payload);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn oversized_payloads_are_refused_before_sending() {
        let client = AltDaClient::new("http://127.0.0.1:9");
        match client.put(vec![0; max_payload_bytes() + 1]).await {
            Err(DaError::TooLarge { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
