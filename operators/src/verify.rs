//! `verify_signatures`: the contributor's EIP-712 signature, its validity window, replays and
//! rate limits.
//!
//! For each contribution row, in order, refusing with the first reason that applies:
//! 1. `bad_signature` / `signer_mismatch`: the signature does not recover to `contributor` in
//!    the job's signing domain (see [`crate::signature`]);
//! 2. `not_yet_valid` / `expired`: the Kafka record timestamp, widened by `clock_skew_seconds`
//!    either way, is before `issued_at` or after `expires_at`;
//! 3. `replay`: the same (datanet, contributor, nonce) was verified before (`duplicate_of` names
//!    the first contribution that used it);
//! 4. `rate_limit`: the contributor already has `rate_limit.max` verified contributions in the
//!    same window of `rate_limit.window_seconds` (tumbling, by Kafka timestamp).
//!
//! Only refusals after step 1 carry the contributor for penalties: before the signature holds,
//! `contributor` is an unauthenticated claim. Nonces and window counts live in the job's state
//! store (see [`crate::state`]), shared by all partitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use ledgerflow_schemas::contribution::{
    contribution_struct_encoding, eip712_digest_input, keccak256,
};
use ledgerflow_schemas::hex0x;
use ledgerflow_schemas::keccak::keccak256_many;
use redb::{ReadableDatabase, TableDefinition};
use schemars::JsonSchema;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_128;

use crate::batch_verify::{prove, Claim, KnownKey, MIN_BATCH};
use crate::filter::{key64, KeyFilter};
use crate::key_runs::{KeyReader, KeyRuns};
use crate::metrics::SIGNATURES;
use crate::operator::{
    Barrier, Collector, Operator, OperatorContext, OperatorError, StageEnv, StageFactory,
};
use crate::rows::{contribution_passthrough, route, Rows};
use crate::signature::{
    address_of_uncompressed, parse_signature_hex, recover_public_key, SignatureCheckError,
};
use crate::state::{
    barrier, decide_rows, lock, op_err, Decision, Flushable, Journal, Layered, Pending, Released,
    Replay, SharedSlot, StateDb, StateError,
};

/// Configuration of a `verify_signatures` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Tolerance, in seconds, between the Kafka record timestamp and `issued_at` / `expires_at`.
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    /// At most `max` verified contributions per contributor per window; more are `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// A per-contributor rate limit over tumbling windows of Kafka time.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub max: u32,
    pub window_seconds: u64,
}

fn default_skew() -> u64 {
    300
}

impl VerifyConfig {
    pub fn check(&self) -> Result<(), String> {
        if let Some(r) = &self.rate_limit {
            if r.max == 0 || r.window_seconds == 0 {
                return Err("rate_limit.max and rate_limit.window_seconds must be positive".into());
            }
        }
        Ok(())
    }
}

/// The factory: config plus the state its instances share.
pub struct VerifyStage {
    pub config: VerifyConfig,
    shared: SharedSlot<VerifyState>,
}

impl VerifyStage {
    pub fn new(config: VerifyConfig) -> Self {
        Self {
            config,
            shared: SharedSlot::default(),
        }
    }
}

impl StageFactory for VerifyStage {
    fn output_schema(&self, inputs: &[SchemaRef]) -> Result<SchemaRef, String> {
        contribution_passthrough(inputs)
    }

    fn stateful(&self) -> bool {
        true
    }

    fn instantiate(&self, stage: &str, env: &StageEnv) -> Result<Box<dyn Operator>, OperatorError> {
        let db = env.state(stage)?;
        let state = self
            .shared
            .get_or_init(db, || VerifyState::open(db, stage))
            .map_err(|e| op_err(stage, e))?;
        Ok(Box::new(Verify {
            config: self.config.clone(),
            separator: env.signing.separator(),
            state,
            replay: Replay::default(),
        }))
    }
}

/// State shared by the partitions: nonces seen and per-window counts.
pub struct VerifyState {
    db: Arc<StateDb>,
    journal: Arc<Journal>,
    tables: Arc<VerifyTables>,
    known: KnownKeys,
}

struct VerifyTables {
    /// nonce key → content hash of the first contribution that used it, as sorted runs.
    nonces: KeyRuns,
    name: String,
    /// Every key in `nonces` or pending (locked after `pending`): a fresh nonce, the usual
    /// case, costs no disk lookup.
    filter: Mutex<KeyFilter>,
    counts: String,
    pending: Mutex<Layered<VerifyPending>>,
}

#[derive(Default)]
struct VerifyPending {
    /// nonce key → content hash of the first contribution that used it.
    nonces: HashMap<[u8; 16], [u8; 32]>,
    /// (window ‖ contributor) → verified count (absolute).
    counts: HashMap<[u8; 28], u32>,
    /// Windows before this can be dropped.
    oldest_live_window: u64,
}

impl Pending for VerifyPending {
    fn next_layer(&self) -> Self {
        Self {
            oldest_live_window: self.oldest_live_window,
            ..Self::default()
        }
    }
}

impl VerifyTables {
    fn counts_def(&self) -> TableDefinition<'_, &'static [u8], u32> {
        TableDefinition::new(&self.counts)
    }
}

impl Flushable for VerifyTables {
    fn name(&self) -> &str {
        &self.name
    }

    fn freeze(&self) {
        lock(&self.pending).freeze();
    }

    fn write_frozen(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        let Some(p) = lock(&self.pending).frozen() else {
            return Ok(());
        };
        let mut nonces: Vec<([u8; 16], Option<Vec<u8>>)> = p
            .nonces
            .iter()
            .map(|(k, v)| (*k, Some(v.to_vec())))
            .collect();
        nonces.sort_unstable_by_key(|(k, _)| *k);
        self.nonces.append(txn, &nonces)?;
        let mut c = txn.open_table(self.counts_def())?;
        for (k, v) in &p.counts {
            c.insert(k.as_slice(), *v)?;
        }
        if p.oldest_live_window > 0 {
            let below = window_key(p.oldest_live_window, &[0u8; 20]);
            c.retain_in(..below.as_slice(), |_, _| false)?;
        }
        Ok(())
    }

    fn release(&self) -> Released {
        lock(&self.pending).release()
    }

    fn pending_bytes(&self) -> usize {
        let p = &lock(&self.pending).current;
        p.nonces.len() * 80 + p.counts.len() * 64
    }
}

fn window_key(window: u64, contributor: &[u8; 20]) -> [u8; 28] {
    let mut k = [0u8; 28];
    k[..8].copy_from_slice(&window.to_be_bytes());
    k[8..].copy_from_slice(contributor);
    k
}

fn nonce_key(datanet: &str, contributor: &[u8; 20], nonce: u64) -> [u8; 16] {
    let mut buf = Vec::with_capacity(datanet.len() + 29);
    buf.extend_from_slice(datanet.as_bytes());
    buf.push(0);
    buf.extend_from_slice(contributor);
    buf.extend_from_slice(&nonce.to_le_bytes());
    xxh3_128(&buf).to_le_bytes()
}

impl VerifyState {
    fn open(db: &Arc<StateDb>, stage: &str) -> Result<Arc<Self>, StateError> {
        // `{stage}/nonces` was the B-tree of earlier versions.
        let nonces = KeyRuns::open(
            db.db(),
            &format!("{stage}/nonce_runs"),
            32,
            &format!("{stage}/nonces"),
        )
        .map_err(|e| db.error(e))?;
        let filter = nonces.filter(db.db()).map_err(|e| db.error(e))?;
        let tables = VerifyTables {
            nonces,
            name: format!("{stage}/nonce_runs"),
            filter: Mutex::new(filter),
            counts: format!("{stage}/window_counts"),
            pending: Mutex::new(Layered::default()),
        };
        db.ensure_table(tables.counts_def())?;
        let tables = Arc::new(tables);
        db.register(tables.clone());
        Ok(Arc::new(Self {
            db: db.clone(),
            journal: Journal::open(db, stage)?,
            tables,
            known: KnownKeys::default(),
        }))
    }
}

/// One partition's instance.
pub struct Verify {
    config: VerifyConfig,
    separator: [u8; 32],
    state: Arc<VerifyState>,
    replay: Replay,
}

/// What the signature check says about one row, before any state is consulted.
enum SigOutcome {
    Valid([u8; 20]),
    Refused(Decision),
}

/// A row ready for its signature to be checked, or already refused.
enum Prepared {
    Refused(Decision),
    Ready {
        claimed: [u8; 20],
        digest: [u8; 32],
        signature: [u8; 65],
    },
}

fn refuse(reason: &str, detail: String) -> Prepared {
    Prepared::Refused(Decision::reject(reason, detail))
}

/// Public keys of contributors whose signatures recovered before, shared by the partitions, so
/// that their later signatures are checked in batches ([`crate::batch_verify`]). Bounded: past
/// [`KnownKeys::MAX`] an arbitrary key is forgotten for each new one (it is learnt again from its
/// contributor's next signature).
#[derive(Default)]
struct KnownKeys {
    keys: Mutex<HashMap<[u8; 20], Arc<KnownKey>>>,
}

impl KnownKeys {
    /// ~200 bytes each: at most ~13 MB.
    const MAX: usize = 1 << 16;

    /// Which rows are proven to be signed by their claimed contributor (see [`prove`]).
    fn prove(&self, prepared: &[Prepared]) -> Vec<bool> {
        let mut proven = vec![false; prepared.len()];
        // (row, its signature, its signer's key) for the rows by known contributors.
        type Known<'p> = (usize, [u8; 32], &'p [u8; 65], [u8; 20], Arc<KnownKey>);
        let known: Vec<Known<'_>> = {
            let keys = lock(&self.keys);
            prepared
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match p {
                    Prepared::Ready {
                        claimed,
                        digest,
                        signature,
                    } => keys
                        .get(claimed)
                        .map(|k| (i, *digest, signature, *claimed, k.clone())),
                    Prepared::Refused(_) => None,
                })
                .collect()
        };
        if known.len() < MIN_BATCH {
            return proven;
        }
        let claims: Vec<Claim<'_>> = known
            .iter()
            .map(|(_, digest, signature, signer, key)| Claim {
                digest: *digest,
                signature,
                signer: *signer,
                key,
            })
            .collect();
        for ((i, ..), ok) in known.iter().zip(prove(&claims)) {
            proven[*i] = ok;
        }
        proven
    }

    fn learn(&self, learnt: Vec<([u8; 20], [u8; 65])>) {
        if learnt.is_empty() {
            return;
        }
        let mut keys = lock(&self.keys);
        for (address, point) in learnt {
            if keys.contains_key(&address) {
                continue;
            }
            let Some(key) = KnownKey::from_uncompressed(&point) else {
                continue;
            };
            if keys.len() >= Self::MAX {
                let any = *keys.keys().next().expect("full, so not empty");
                keys.remove(&any);
            }
            keys.insert(address, Arc::new(key));
        }
    }
}

impl Verify {
    /// Everything about each row's signature that needs no elliptic-curve arithmetic. The
    /// hashes of the whole batch are computed together, stage by stage ([`keccak256_many`]).
    fn prepare(&self, rows: &Rows<'_>) -> Vec<Prepared> {
        struct Fields<'r> {
            claimed: [u8; 20],
            content_hash: [u8; 32],
            metadata: Option<&'r str>,
        }
        let fields: Vec<Result<Fields<'_>, Prepared>> = (0..rows.len())
            .map(|i| {
                let Some(claimed) = hex0x::decode_fixed::<20>(rows.contributor.value(i)) else {
                    return Err(refuse(
                        "schema",
                        "contributor is not a 20-byte address".into(),
                    ));
                };
                let Some(content_hash) = hex0x::decode_fixed::<32>(rows.content_hash.value(i))
                else {
                    return Err(refuse(
                        "schema",
                        "content_hash is not 32 bytes of hex".into(),
                    ));
                };
                Ok(Fields {
                    claimed,
                    content_hash,
                    metadata: rows.metadata(i),
                })
            })
            .collect();
        let metadata: Vec<&[u8]> = fields
            .iter()
            .filter_map(|f| f.as_ref().ok()?.metadata.map(str::as_bytes))
            .collect();
        let mut metadata_hashes = keccak256_many(&metadata).into_iter();
        let mut datanet_hashes: HashMap<&str, [u8; 32]> = HashMap::new();
        let encodings: Vec<[u8; 224]> = fields
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let f = f.as_ref().ok()?;
                let metadata_hash = match f.metadata {
                    Some(_) => metadata_hashes.next().expect("one hash per metadata"),
                    None => [0u8; 32],
                };
                let datanet = rows.datanet.value(i);
                let datanet_hash = *datanet_hashes
                    .entry(datanet)
                    .or_insert_with(|| keccak256(datanet.as_bytes()));
                Some(contribution_struct_encoding(
                    &datanet_hash,
                    &f.content_hash,
                    &metadata_hash,
                    rows.nonce.value(i),
                    rows.issued_at.value(i),
                    rows.expires_at.value(i),
                ))
            })
            .collect();
        let struct_hashes =
            keccak256_many(&encodings.iter().map(|e| e.as_slice()).collect::<Vec<_>>());
        let inputs: Vec<[u8; 66]> = struct_hashes
            .iter()
            .map(|h| eip712_digest_input(&self.separator, h))
            .collect();
        let mut digests =
            keccak256_many(&inputs.iter().map(|e| e.as_slice()).collect::<Vec<_>>()).into_iter();
        fields
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let f = match f {
                    Ok(f) => f,
                    Err(refused) => return refused,
                };
                let digest = digests.next().expect("one digest per row prepared");
                match parse_signature_hex(rows.signature.value(i)) {
                    Ok(signature) => Prepared::Ready {
                        claimed: f.claimed,
                        digest,
                        signature,
                    },
                    Err(e) => refuse("bad_signature", e.to_string()),
                }
            })
            .collect()
    }

    /// Recovers row `i`'s signer one by one; a signer that is the contributor is `learnt`.
    fn recover(
        rows: &Rows<'_>,
        i: usize,
        claimed: &[u8; 20],
        digest: &[u8; 32],
        signature: &[u8; 65],
        learnt: &mut Vec<([u8; 20], [u8; 65])>,
    ) -> SigOutcome {
        let refused = match recover_public_key(digest, signature) {
            Ok(key) => {
                let signer = address_of_uncompressed(&key);
                if signer == *claimed {
                    learnt.push((signer, key));
                    return SigOutcome::Valid(signer);
                }
                SignatureCheckError::Mismatch { recovered: signer }
            }
            Err(e) => SignatureCheckError::Bad(e),
        };
        SigOutcome::Refused(Decision::reject(
            refused.reason(),
            refused.detail(rows.contributor.value(i)),
        ))
    }

    /// The signature outcome of every row: rows by contributors whose keys are known are
    /// checked in one batch, the rest (and any the batch does not prove) one by one.
    fn check_signatures(&self, rows: &Rows<'_>, ctx: &mut OperatorContext) -> Vec<SigOutcome> {
        let prepared = self.prepare(rows);
        let proven = self.state.known.prove(&prepared);
        let batched = proven.iter().filter(|p| **p).count();
        let ready = prepared
            .iter()
            .filter(|p| matches!(p, Prepared::Ready { .. }))
            .count();
        if batched > 0 {
            ctx.count(SIGNATURES, "batch", batched as u64);
        }
        if ready > batched {
            ctx.count(SIGNATURES, "recovery", (ready - batched) as u64);
        }
        let mut learnt = Vec::new();
        let outcomes = prepared
            .into_iter()
            .zip(proven)
            .enumerate()
            .map(|(i, (p, proven))| match p {
                Prepared::Refused(d) => SigOutcome::Refused(d),
                Prepared::Ready { claimed, .. } if proven => SigOutcome::Valid(claimed),
                Prepared::Ready {
                    claimed,
                    digest,
                    signature,
                } => Self::recover(rows, i, &claimed, &digest, &signature, &mut learnt),
            })
            .collect();
        self.state.known.learn(learnt);
        outcomes
    }

    /// Decides a row whose signature holds, against (and updating) the shared state.
    fn decide(
        &self,
        rows: &Rows<'_>,
        i: usize,
        signer: &[u8; 20],
        read: &ReadTables<'_>,
        pending: &mut Layered<VerifyPending>,
        filter: &mut KeyFilter,
    ) -> Result<Decision, redb::Error> {
        let ts_s = rows.timestamp.value(i).max(0) as u64 / 1000;
        let skew = self.config.clock_skew_seconds;
        let (issued, expires) = (rows.issued_at.value(i), rows.expires_at.value(i));
        if ts_s.saturating_add(skew) < issued {
            return Ok(Decision::reject(
                "not_yet_valid",
                format!("issued_at {issued} is after the record time {ts_s} (+{skew} s skew)"),
            ));
        }
        if ts_s > expires.saturating_add(skew) {
            return Ok(Decision::reject(
                "expired",
                format!("expires_at {expires} is before the record time {ts_s} (−{skew} s skew)"),
            ));
        }
        let nonce = rows.nonce.value(i);
        let key = nonce_key(rows.datanet.value(i), signer, nonce);
        let first = match pending.find(|p| p.nonces.get(&key).copied()) {
            Some(h) => Some(h),
            None if filter.may_contain(key64(&key)) => read.nonce(&key)?,
            None => None,
        };
        if let Some(first) = first {
            return Ok(Decision::Reject {
                reason: "replay".into(),
                detail: format!(
                    "nonce {nonce} of this contributor was used before in this datanet"
                ),
                duplicate_of: Some(hex0x::encode(&first)),
                similarity: None,
                also_penalise: Vec::new(),
            });
        }
        if let Some(limit) = &self.config.rate_limit {
            let window = ts_s / limit.window_seconds;
            let wk = window_key(window, signer);
            let count = match pending.find(|p| p.counts.get(&wk).copied()) {
                Some(c) => c,
                None => read.count(&wk)?,
            };
            if count >= limit.max {
                return Ok(Decision::reject(
                    "rate_limit",
                    format!(
                        "{count} contributions in the {} s window starting at {} (max {})",
                        limit.window_seconds,
                        window * limit.window_seconds,
                        limit.max
                    ),
                ));
            }
            let p = &mut pending.current;
            p.counts.insert(wk, count + 1);
            p.oldest_live_window = p.oldest_live_window.max(window.saturating_sub(2));
        }
        let content_hash =
            hex0x::decode_fixed::<32>(rows.content_hash.value(i)).unwrap_or([0u8; 32]);
        pending.current.nonces.insert(key, content_hash);
        filter.insert(key64(&key));
        Ok(Decision::Accept)
    }
}

/// Read access to the durable tables for one batch.
struct ReadTables<'a> {
    nonces: KeyReader<'a>,
    counts: redb::ReadOnlyTable<&'static [u8], u32>,
    _txn: &'a redb::ReadTransaction,
}

impl ReadTables<'_> {
    fn nonce(&self, key: &[u8; 16]) -> Result<Option<[u8; 32]>, redb::Error> {
        Ok(self.nonces.get(key)?.and_then(|v| v.try_into().ok()))
    }
    fn count(&self, key: &[u8; 28]) -> Result<u32, redb::Error> {
        Ok(self.counts.get(key.as_slice())?.map_or(0, |v| v.value()))
    }
}

impl Operator for Verify {
    fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let rows = Rows::new(&batch, &ctx.stage)?;
        let stage = ctx.stage.clone();
        let err = |e: &dyn std::fmt::Display| op_err(&stage, e);
        // Signatures first, outside the state's locks: they are most of the work.
        let sigs = self.check_signatures(&rows, ctx);
        let state = self.state.clone();
        let _deciding = state.db.deciding();
        let txn = state.db.db().begin_read().map_err(|e| err(&e))?;
        let read = ReadTables {
            nonces: state.tables.nonces.reader(&txn).map_err(|e| err(&e))?,
            counts: txn
                .open_table(state.tables.counts_def())
                .map_err(|e| err(&e))?,
            _txn: &txn,
        };
        let mut pending = lock(&state.tables.pending);
        let mut filter = lock(&state.tables.filter);
        let mut replay = std::mem::take(&mut self.replay);
        let decisions = decide_rows(
            &state.db,
            &state.journal,
            &mut replay,
            &rows,
            &stage,
            |i, replayed| match &sigs[i] {
                _ if replayed.is_some() => Ok(replayed),
                SigOutcome::Refused(d) => Ok(Some(d.clone())),
                SigOutcome::Valid(signer) => self
                    .decide(&rows, i, signer, &read, &mut pending, &mut filter)
                    .map(Some),
            },
        );
        self.replay = replay;
        let decisions = decisions?;
        drop(filter);
        drop(pending);
        drop(_deciding);
        state.db.relieve_memory().map_err(|e| err(&e))?;
        route(
            &batch,
            &rows,
            &decisions,
            |i| matches!(sigs[i], SigOutcome::Valid(_)),
            ctx,
            out,
        )?;
        Ok(())
    }

    fn on_barrier(
        &mut self,
        b: &Barrier,
        ctx: &mut OperatorContext,
        _out: &mut Collector,
    ) -> Result<Option<Vec<u8>>, OperatorError> {
        barrier(&self.state.db, &self.state.journal, b, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DecodeConfig;
    use arrow_array::builder::{BinaryBuilder, Int32Builder, Int64Builder, StringBuilder};
    use arrow_array::{ArrayRef, TimestampMillisecondArray};
    use ledgerflow_schemas::contribution::{Contribution, SigningDomain};
    use ledgerflow_schemas::tables::kafka_record_schema;
    use secp256k1::ecdsa::RecoverableSignature;
    use secp256k1::{Message, SecretKey};

    #[test]
    fn nonce_keys_separate_datanets_and_nonces() {
        let a = [1u8; 20];
        assert_ne!(nonce_key("legal", &a, 1), nonce_key("legal", &a, 2));
        assert_ne!(nonce_key("legal", &a, 1), nonce_key("medical", &a, 1));
        assert_eq!(nonce_key("legal", &a, 1), nonce_key("legal", &a, 1));
    }

    /// A signed message: (JSON, Kafka timestamp ms).
    fn signed(key: u8, content: &str, nonce: u64, issued: u64, expires: u64) -> String {
        let sk = SecretKey::from_secret_bytes([key; 32]).unwrap();
        let pk = sk.public_key().serialize_uncompressed();
        let address = &keccak256(&pk[1..])[12..];
        let mut c = Contribution {
            datanet: "legal".into(),
            contributor: hex0x::encode(address).into(),
            content: content.into(),
            metadata: None,
            nonce,
            issued_at: issued,
            expires_at: expires,
            signature: "".into(),
        };
        let digest = c.signing_digest(&SigningDomain::default()).unwrap();
        let (recid, rs) =
            RecoverableSignature::sign_ecdsa_recoverable(Message::from_digest(digest), &sk)
                .serialize_compact();
        let mut sig = rs.to_vec();
        sig.push(27 + recid.to_u8());
        c.signature = hex0x::encode(&sig).into();
        serde_json::to_string(&c).unwrap()
    }

    fn records(msgs: &[(String, i64)], first_offset: i64) -> RecordBatch {
        let mut key = BinaryBuilder::new();
        let mut value = BinaryBuilder::new();
        let mut topic = StringBuilder::new();
        let mut partition = Int32Builder::new();
        let mut offset = Int64Builder::new();
        let mut ts = Vec::new();
        for (i, (m, t)) in msgs.iter().enumerate() {
            key.append_null();
            value.append_value(m.as_bytes());
            topic.append_value("t");
            partition.append_value(0);
            offset.append_value(first_offset + i as i64);
            ts.push(*t);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(key.finish()),
            Arc::new(value.finish()),
            Arc::new(topic.finish()),
            Arc::new(partition.finish()),
            Arc::new(offset.finish()),
            Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
        ];
        RecordBatch::try_new(kafka_record_schema(), cols).unwrap()
    }

    /// Runs decode then `op` over `batch`; returns the reason of each row in order.
    fn decide(op: &mut Box<dyn Operator>, batch: RecordBatch) -> Vec<String> {
        decide_counting(op, batch).0
    }

    /// [`decide`], and the signatures checked in a batch.
    fn decide_counting(op: &mut Box<dyn Operator>, batch: RecordBatch) -> (Vec<String>, u64) {
        let mut decode = DecodeConfig::default()
            .instantiate("decode", &StageEnv::default())
            .unwrap();
        let mut ctx = OperatorContext::new("decode", 0);
        let mut out = Collector::default();
        decode.process_batch(batch, &mut ctx, &mut out).unwrap();
        let rows = out.take().pop().unwrap();
        let offsets: Vec<i64> = Rows::new(&rows, "t").unwrap().offset.values().to_vec();
        let mut ctx = OperatorContext::new("verify", 0);
        let mut out = Collector::default();
        op.process_batch(rows, &mut ctx, &mut out).unwrap();
        let batched = ctx
            .take_counts()
            .iter()
            .filter(|(name, kind, _)| *name == SIGNATURES && *kind == "batch")
            .map(|(_, _, n)| n)
            .sum();
        let kept: Vec<i64> = out
            .take()
            .iter()
            .flat_map(|b| Rows::new(b, "t").unwrap().offset.values().to_vec())
            .collect();
        let rejected: BTreeMap<i64, String> = ctx
            .take_rejections()
            .into_iter()
            .map(|r| (r.kafka_offset, r.reason))
            .collect();
        let reasons = offsets
            .iter()
            .map(|o| {
                if kept.contains(o) {
                    "accept".to_string()
                } else {
                    rejected[o].clone()
                }
            })
            .collect();
        (reasons, batched)
    }

    use std::collections::BTreeMap;

    /// Contributors seen before are checked in batches: the decisions are those of one-by-one
    /// recovery, forgeries among them included.
    #[test]
    fn known_contributors_are_checked_in_batches_with_the_same_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_at(dir.path());
        let stage = stage_without_rate_limit();
        let t = 1_800_000_000u64;
        let ms = t as i64 * 1000;
        let mut op = stage.instantiate("verify", &env).unwrap();
        // First sight of keys 1..=4: recovered one by one, and learnt.
        let first: Vec<(String, i64)> = (1..=4u8)
            .map(|k| (signed(k, &format!("first {k}"), 0, t, t + 10), ms))
            .collect();
        assert_eq!(decide(&mut op, records(&first, 0)), ["accept"; 4]);
        let mut msgs = Vec::new();
        let mut want = Vec::new();
        for i in 0..200u64 {
            let key = (i % 4) as u8 + 1;
            let mut m = signed(key, &format!("text {i}"), i + 1, t, t + 10);
            let reason = match i {
                // Another known contributor's signature over this message.
                17 => {
                    let other = signed(key % 4 + 1, &format!("text {i}"), i + 1, t, t + 10);
                    let sig = |m: &str| m[m.find("\"signature\"").unwrap()..].to_string();
                    m = m.replace(&sig(&m), &sig(&other));
                    "signer_mismatch"
                }
                // The other y parity.
                90 => {
                    m = m
                        .replace("1b\"}", "1x\"}")
                        .replace("1c\"}", "1b\"}")
                        .replace("1x\"}", "1c\"}");
                    "signer_mismatch"
                }
                // High s.
                151 => {
                    let at = m.find("\"signature\":\"0x").unwrap() + 15 + 64;
                    m.replace_range(at..at + 1, "f");
                    "bad_signature"
                }
                _ => "accept",
            };
            msgs.push((m, ms));
            want.push(reason);
        }
        let (reasons, batched) = decide_counting(&mut op, records(&msgs, 10));
        assert_eq!(reasons, want);
        // All but the forgeries' halves of the batch (the sub-batches that hold) went by batch.
        assert!(batched >= 100, "{batched} signatures checked in batches");
        // A new partition's instance with no keys learnt decides the same rows the same way
        // (one by one), against a fresh state.
        let dir2 = tempfile::tempdir().unwrap();
        let mut cold = stage_without_rate_limit()
            .instantiate("verify", &env_at(dir2.path()))
            .unwrap();
        assert_eq!(
            decide_counting(&mut cold, records(&msgs, 10)),
            (want.iter().map(|s| s.to_string()).collect(), 0)
        );
    }

    fn stage_without_rate_limit() -> VerifyStage {
        VerifyStage::new(VerifyConfig {
            clock_skew_seconds: 60,
            rate_limit: None,
        })
    }

    fn env_at(dir: &std::path::Path) -> StageEnv {
        StageEnv {
            state: Some(StateDb::open(dir, 1 << 20).unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn window_replay_rate_limit_and_a_replayed_partition() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let env = StageEnv {
            state: Some(db.clone()),
            ..Default::default()
        };
        let stage = VerifyStage::new(VerifyConfig {
            clock_skew_seconds: 60,
            rate_limit: Some(RateLimit {
                max: 3,
                window_seconds: 3600,
            }),
        });
        let t = 1_800_000_000i64; // seconds
        let ms = t * 1000;
        let u = t as u64;
        let mut wrong_v = signed(1, "x", 99, u, u + 10);
        wrong_v = wrong_v.replace("1b\"}", "1d\"}").replace("1c\"}", "1d\"}");
        let msgs = vec![
            (signed(1, "a", 1, u, u + 10), ms),
            (signed(1, "b", 2, u, u + 10), ms),
            (signed(1, "c", 1, u, u + 10), ms), // nonce 1 again
            (signed(1, "d", 3, u - 1000, u - 500), ms), // expired
            (signed(1, "e", 4, u + 1000, u + 2000), ms), // not yet valid
            (signed(1, "f", 5, u - 30, u + 10), ms), // within the skew
            (signed(1, "g", 6, u, u + 10), ms), // fourth in the window
            (signed(2, "h", 1, u, u + 10), ms), // another contributor
            (signed(1, "i", 7, u + 3600, u + 7200), ms + 3_600_000), // next window
            (wrong_v, ms),
        ];
        let want = [
            "accept",
            "accept",
            "replay",
            "expired",
            "not_yet_valid",
            "accept",
            "rate_limit",
            "accept",
            "accept",
            "bad_signature",
        ];
        let mut op = stage.instantiate("verify", &env).unwrap();
        assert_eq!(decide(&mut op, records(&msgs, 0)), want);
        // A restarted pipeline replays the same records: same decisions, not "replay" of itself.
        let mut again = stage.instantiate("verify", &env).unwrap();
        assert_eq!(decide(&mut again, records(&msgs, 0)), want);
        // After a durable flush and reopening the store too.
        db.flush(true).unwrap();
        drop((op, again, env, stage));
        drop(db);
        let db = StateDb::open(dir.path(), 1 << 20).unwrap();
        let env = StageEnv {
            state: Some(db),
            ..Default::default()
        };
        let stage = VerifyStage::new(VerifyConfig {
            clock_skew_seconds: 60,
            rate_limit: Some(RateLimit {
                max: 3,
                window_seconds: 3600,
            }),
        });
        let mut op = stage.instantiate("verify", &env).unwrap();
        assert_eq!(decide(&mut op, records(&msgs, 0)), want);
        // New records are decided against the durable state.
        let later = vec![(signed(1, "j", 2, u, u + 10), ms)];
        let mut op2 = stage.instantiate("verify", &env).unwrap();
        assert_eq!(decide(&mut op2, records(&later, 100)), ["replay"]);
    }
}
