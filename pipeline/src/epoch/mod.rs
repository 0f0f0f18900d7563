//! Reward epochs: a persisted state machine per epoch — closed → computed → published →
//! submitted → settled — advanced exactly once across crashes.
//!
//! - **computed**: the chain parameters are read at a pinned block (recorded with its hash),
//!   the reward policy (DataFusion SQL over `attributions`, `inferences`, `contributors`,
//!   `penalties`) weighs contributors, the pool is split by largest remainder, added to the
//!   previous epoch's cumulative amounts, and the tree, its leaves, each Datanet's content
//!   root and the epoch's payload are written to the store before the journal says so.
//! - **published**: the payload goes to the alt-DA server; the commitment is read back and
//!   checked, then journaled. A put is not idempotent, so once journaled it is never redone.
//! - **submitted**: each transaction (Datanet registrations and content roots, then `settle`)
//!   is signed and journaled *before* it is broadcast; a restart looks at the chain first
//!   (is it done? is the signed transaction known or mined?) and rebroadcasts the same bytes.
//! - **settled**: confirmations waited, the `Settled` event checked against the journal, gas
//!   and the Fjord L1 fee estimate recorded.
//!
//! Everything lives under `epochs/<job>/<epoch>/` in the store: `journal.json` (rewritten
//! whole, atomically, at each step), `leaves.csv` (the cumulative `address,amount` leaves, the
//! input of `ledgerflow rewards tree|proof|claim`), `manifest.json`, `payload.bin` (what was
//! published: zstd of the manifest line and the CSV of every contributor's cumulative amount,
//! epoch amount, score and weight) and `contents/<datanet>.txt` (the content hashes anchored).
//!
//! Tests kill the process at every step with `LEDGERFLOW_EPOCH_CRASH=<point>[@<epoch>]`
//! (points: [`CRASH_POINTS`]); the process aborts right there, like a `kill -9`.

pub mod config;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray};
use arrow_schema::DataType;
use bytes::Bytes;
use datafusion::common::ParamValues;
use datafusion::scalar::ScalarValue;
use ledgerflow_chain::primitives::{B256, U256};
use ledgerflow_chain::settlement::{self, Chain, Confirmed, PinnedBlock, SignedTx};
use ledgerflow_chain::Deployment;
use ledgerflow_da::AltDaClient;
use ledgerflow_rewards::merkle::{checksum_address, hex0x, parse_address};
use ledgerflow_rewards::{Account, Amount, Bytes32Tree, Leaf, StandardMerkleTree};
use ledgerflow_store::{Store, TableKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use config::EpochConfig;

/// The default reward policy: attribution scores at or above the threshold, summed per
/// contributor over the epoch's outputs, times the contributor's reputation (0.5, the prior,
/// for an address with no decisions yet), less `$penalty_per_point` of it per penalty point
/// charged in the epoch (nothing at all from 1 / `$penalty_per_point` points on).
pub const DEFAULT_POLICY: &str = "\
WITH earned AS (
  SELECT contributor, sum(score) AS score
  FROM attributions
  WHERE created_at >= $start AND created_at < $end AND score >= $threshold
  GROUP BY contributor
),
charged AS (
  SELECT contributor, sum(points) AS points
  FROM penalties
  WHERE kafka_timestamp >= $start AND kafka_timestamp < $end
  GROUP BY contributor
)
SELECT e.contributor,
       e.score,
       e.score * coalesce(c.reputation, 0.5)
         * greatest(0.0, 1.0 - $penalty_per_point * CAST(coalesce(p.points, 0) AS DOUBLE)) AS weight
FROM earned e
LEFT JOIN contributors c ON c.address = e.contributor
LEFT JOIN charged p ON p.contributor = e.contributor";

/// Where the runner can be made to abort, in the order it passes them.
pub const CRASH_POINTS: &[&str] = &[
    "computing", // artifacts written, journal not yet `computed`
    "computed",  // journal `computed`
    "put",       // payload put on DA, commitment not journaled
    "published", // journal `published`
    "signed",    // a transaction journaled, not broadcast
    "broadcast", // broadcast, not confirmed
    "confirmed", // `settle` confirmed, journal not yet `settled`
    "settled",   // journal `settled`
];

fn crash_point(point: &str, epoch: u64) {
    let Ok(spec) = std::env::var("LEDGERFLOW_EPOCH_CRASH") else {
        return;
    };
    let (p, e) = spec
        .split_once('@')
        .map_or((spec.as_str(), None), |(p, e)| (p, e.parse::<u64>().ok()));
    if p == point && e.is_none_or(|e| e == epoch) {
        eprintln!("LEDGERFLOW_EPOCH_CRASH: aborting at `{point}` of epoch {epoch}");
        std::process::abort();
    }
}

/// Where an epoch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Open,
    Closed,
    Computed,
    Published,
    Submitted,
    Settled,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).expect("state");
        write!(f, "{}", s.as_str().unwrap_or_default())
    }
}

/// What `computed` fixed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Computed {
    pub root: B256,
    pub data_hash: B256,
    pub total_cumulative: String,
    pub pool: String,
    pub contributors_paid: usize,
    pub leaves: usize,
    pub payload_bytes: usize,
    pub datanets: Vec<DatanetRoot>,
}

/// A Datanet's content root of an epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatanetRoot {
    pub datanet: String,
    pub root: B256,
    pub contributions: u64,
}

/// What `published` fixed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The DA commitment (certificate) as the server answered it, 0x-hex.
    pub commitment: String,
    /// keccak256 of the commitment: what `settle` records.
    pub commitment_hash: B256,
    /// Size of the EigenDA blob (the payload, codec-encoded).
    pub blob_bytes: usize,
}

/// One action on chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Action {
    Register { datanet: String },
    Anchor { datanet: String },
    Settle,
}

/// A journaled transaction: signed before it was broadcast.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournaledTx {
    pub action: Action,
    pub tx: SignedTx,
    pub confirmed: Option<Confirmed>,
}

/// The persisted state of one epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub epoch: u64,
    pub state: State,
    pub start: String,
    pub end: String,
    pub computed: Option<Computed>,
    pub published: Option<Published>,
    #[serde(default)]
    pub transactions: Vec<JournaledTx>,
    pub settlement: Option<Confirmed>,
    /// Gas and L1 fee of every transaction of the epoch.
    #[serde(default)]
    pub total_gas_used: u64,
    #[serde(default)]
    pub total_l1_fee: String,
    /// Seconds each step took (`compute`, `publish`, `settle`), in the run that did it.
    #[serde(default)]
    pub seconds: BTreeMap<String, f64>,
}

/// The epochs of a job in a store.
pub struct Epochs {
    pub store: Store,
    pub job: String,
    pub cfg: EpochConfig,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Epochs {
    pub fn new(store: Store, job: &str, cfg: EpochConfig) -> Self {
        Self {
            store,
            job: job.to_string(),
            cfg,
        }
    }

    fn dir(&self, n: u64) -> String {
        format!("epochs/{}/{n:08}", self.job)
    }

    pub fn artifact(&self, n: u64, name: &str) -> String {
        format!("{}/{name}", self.dir(n))
    }

    fn window(&self, n: u64) -> Result<(i64, i64)> {
        self.cfg.window(n).map_err(anyhow::Error::msg)
    }

    pub async fn journal(&self, n: u64) -> Result<Option<Journal>> {
        match self.store.get(&self.artifact(n, "journal.json")).await? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("reading {}", self.artifact(n, "journal.json"))
            })?)),
            None => Ok(None),
        }
    }

    async fn save(&self, j: &Journal) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(j)?;
        self.store
            .put(&self.artifact(j.epoch, "journal.json"), Bytes::from(bytes))
            .await?;
        Ok(())
    }

    /// The epochs journaled so far, in order.
    pub async fn journaled(&self) -> Result<Vec<u64>> {
        let mut out: Vec<u64> = self
            .store
            .list_dirs(&format!("epochs/{}", self.job))
            .await?
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Event time: the newest timestamp in any Datanet, `rejections`, `attributions` or
    /// `inferences` (None on an empty store).
    pub async fn watermark(&self) -> Result<Option<i64>> {
        let (ctx, tables) = crate::sql::session_and_tables(&self.store, 1).await?;
        let mut parts = Vec::new();
        for t in tables {
            if t.files == 0 {
                continue;
            }
            let column = match (t.kind, t.name.as_str()) {
                (TableKind::Datanet, _) => "kafka_timestamp",
                (_, "rejections") => "kafka_timestamp",
                (_, "attributions" | "inferences") => "created_at",
                _ => continue,
            };
            parts.push(format!(
                "SELECT CAST(max({column}) AS BIGINT) AS t FROM \"{}\"",
                t.name
            ));
        }
        if parts.is_empty() {
            return Ok(None);
        }
        let sql = format!("SELECT max(t) FROM ({})", parts.join(" UNION ALL "));
        let batches = ctx.sql(&sql).await?.collect().await?;
        let col = batches[0].column(0);
        let col = arrow::compute::cast(col, &DataType::Int64)?;
        let v = col.as_primitive::<arrow::datatypes::Int64Type>();
        Ok((!v.is_null(0)).then(|| v.value(0)))
    }

    /// Every epoch up to the last closed one (and the open one after it), with its state.
    pub async fn list(&self) -> Result<Vec<Value>> {
        let closed = match self.watermark().await? {
            Some(w) => self.cfg.closed_through(w).map_err(anyhow::Error::msg)?,
            None => 0,
        };
        let journaled = self.journaled().await?;
        let last = closed.max(journaled.last().copied().unwrap_or(0)) + 1;
        let mut out = Vec::new();
        for n in 1..=last {
            let (from, to) = self.window(n)?;
            let j = self.journal(n).await?;
            let state = match &j {
                Some(j) => j.state,
                None if n <= closed => State::Closed,
                None => State::Open,
            };
            out.push(json!({
                "epoch": n,
                "start": rfc3339(from),
                "end": rfc3339(to),
                "state": state,
                "root": j.as_ref().and_then(|j| j.computed.as_ref()).map(|c| c.root.to_string()),
                "contributors_paid": j.as_ref().and_then(|j| j.computed.as_ref()).map(|c| c.contributors_paid),
                "pool": j.as_ref().and_then(|j| j.computed.as_ref()).map(|c| c.pool.clone()),
                "settle_tx": j.as_ref().and_then(|j| j.settlement.as_ref()).map(|s| s.transaction.to_string()),
            }));
        }
        Ok(out)
    }

    /// The cumulative leaves of epoch `n` (empty before epoch 1).
    pub async fn leaves(&self, n: u64) -> Result<Vec<Leaf>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let path = self.artifact(n, "leaves.csv");
        let bytes = self
            .store
            .get(&path)
            .await?
            .with_context(|| format!("epoch {n} has no {path} (is it computed?)"))?;
        let text = std::str::from_utf8(&bytes).context("leaves.csv is not UTF-8")?;
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.starts_with("address,"))
        {
            return Ok(Vec::new());
        }
        ledgerflow_rewards::merkle::parse_leaves_csv(text)
            .map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }

    /// The content hashes of `datanet` anchored in epoch `n`.
    pub async fn contents(&self, n: u64, datanet: &str) -> Result<Vec<[u8; 32]>> {
        let path = self.artifact(n, &format!("contents/{datanet}.txt"));
        let bytes = self
            .store
            .get(&path)
            .await?
            .with_context(|| format!("no {path}"))?;
        std::str::from_utf8(&bytes)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(parse_hash)
            .collect()
    }
}

fn parse_hash(text: &str) -> Result<[u8; 32]> {
    let b = hex::decode(text.trim().trim_start_matches("0x"))
        .with_context(|| format!("{text:?} is not hex"))?;
    b.try_into()
        .map_err(|_| anyhow::anyhow!("{text:?} is not 32 bytes"))
}

/// One contributor's line of the epoch.
#[derive(Debug, Clone)]
struct Earned {
    score: f64,
    weight: f64,
    amount: u128,
}

/// Runs the policy over the epoch's window: (contributor, score, weight) rows, summed per
/// address. One partition, so the float sums are the same on every run.
async fn run_policy(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
    n: u64,
    window: (i64, i64),
    threshold_millionths: u64,
    penalty_per_point: f64,
) -> Result<BTreeMap<Account, (f64, f64)>> {
    let ts = |ms| ScalarValue::TimestampMillisecond(Some(ms), Some("UTC".into()));
    let params = ParamValues::Map(
        [
            ("epoch".to_string(), ScalarValue::UInt64(Some(n)).into()),
            ("start".to_string(), ts(window.0).into()),
            ("end".to_string(), ts(window.1).into()),
            (
                "threshold".to_string(),
                ScalarValue::Float64(Some(threshold_millionths as f64 / 1e6)).into(),
            ),
            (
                "penalty_per_point".to_string(),
                ScalarValue::Float64(Some(penalty_per_point)).into(),
            ),
        ]
        .into_iter()
        .collect(),
    );
    let options = datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql, options)
        .await
        .context("planning the reward policy")?
        .with_param_values(params)
        .context("binding the reward policy's parameters")?;
    let batches = df.collect().await.context("running the reward policy")?;
    let mut out: BTreeMap<Account, (f64, f64)> = BTreeMap::new();
    for b in &batches {
        let col = |name: &str| -> Result<Option<Arc<dyn Array>>> {
            Ok(match b.schema().index_of(name) {
                Ok(i) => Some(arrow::compute::cast(b.column(i), &DataType::Float64)?),
                Err(_) => None,
            })
        };
        let who = b
            .column_by_name("contributor")
            .context("the reward policy must answer a `contributor` column")?;
        let who = arrow::compute::cast(who, &DataType::Utf8)?;
        let who = who.as_string::<i32>();
        let weight = col("weight")?.context("the reward policy must answer a `weight` column")?;
        let weight = weight.as_primitive::<arrow::datatypes::Float64Type>();
        let score = col("score")?;
        for i in 0..b.num_rows() {
            if who.is_null(i) || weight.is_null(i) {
                continue;
            }
            let account = parse_address(who.value(i)).map_err(|e| {
                anyhow::anyhow!(
                    "the reward policy answered contributor {:?}: {e}",
                    who.value(i)
                )
            })?;
            let w = weight.value(i);
            if !w.is_finite() || w < 0.0 {
                bail!(
                    "the reward policy answered weight {w} for {}; weights are finite and ≥ 0",
                    who.value(i)
                );
            }
            let s = score
                .as_ref()
                .map(|s| s.as_primitive::<arrow::datatypes::Float64Type>())
                .filter(|s| !s.is_null(i))
                .map_or(0.0, |s| s.value(i));
            let e = out.entry(account).or_default();
            e.0 += s;
            e.1 += w;
        }
    }
    Ok(out)
}

/// Σ `fee` of the inferences created in the window (base units).
async fn inference_fees(
    ctx: &datafusion::prelude::SessionContext,
    window: (i64, i64),
) -> Result<u128> {
    let sql = format!(
        "SELECT CAST(fee AS VARCHAR) FROM inferences \
         WHERE created_at >= to_timestamp_millis({}) AND created_at < to_timestamp_millis({}) AND fee IS NOT NULL",
        window.0, window.1
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    let mut total: u128 = 0;
    for b in &batches {
        let col = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let col = col.as_string::<i32>();
        for i in 0..col.len() {
            let v: u128 = col
                .value(i)
                .parse()
                .with_context(|| format!("inference fee {:?}", col.value(i)))?;
            total = total.checked_add(v).context("inference fees overflow")?;
        }
    }
    Ok(total)
}

/// Turns weights into exact integers for the largest-remainder split: each weight relative to
/// the largest, on 53 bits (all an f64 holds).
fn integer_weights(weights: &[f64]) -> Vec<u128> {
    let max = weights.iter().copied().fold(0.0f64, f64::max);
    if max <= 0.0 {
        return vec![0; weights.len()];
    }
    weights
        .iter()
        .map(|w| ((w / max) * (1u64 << 53) as f64).round() as u128)
        .collect()
}

fn bps(pool: u128, bps: u32) -> Result<u128> {
    // pool · bps / 10000 without overflow: split the pool.
    let (q, r) = (pool / 10_000, pool % 10_000);
    q.checked_mul(bps as u128)
        .and_then(|a| a.checked_add(r * bps as u128 / 10_000))
        .context("pool overflow")
}

/// A running settler of a job's epochs.
pub struct Settler {
    pub epochs: Epochs,
    pub chain: Chain,
    pub deployment: Deployment,
    pub signer: ledgerflow_chain::PrivateKeySigner,
    pub da: AltDaClient,
}

/// What one `advance` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The epoch is not closed yet.
    NotClosed,
    /// The epoch reached `settled`.
    Settled,
}

impl Settler {
    pub async fn connect(
        epochs: Epochs,
        signer: ledgerflow_chain::PrivateKeySigner,
    ) -> Result<Self> {
        let chain = Chain::connect(&epochs.cfg.chain.rpc).await?;
        let deployment = Deployment::read(std::path::Path::new(&epochs.cfg.chain.deployment))?;
        if deployment.chain_id != chain.chain_id {
            bail!(
                "the deployment {} is for chain {} but {} is chain {}",
                epochs.cfg.chain.deployment,
                deployment.chain_id,
                epochs.cfg.chain.rpc,
                chain.chain_id
            );
        }
        if signer.address() != deployment.settler {
            bail!(
                "the settler key is {} but the deployment's settler is {}",
                signer.address(),
                deployment.settler
            );
        }
        let da = AltDaClient::new(&epochs.cfg.da.url);
        Ok(Self {
            epochs,
            chain,
            deployment,
            signer,
            da,
        })
    }

    /// The next epoch to work on: the first journaled one not settled, else the one after the
    /// last settled (checked against the chain).
    pub async fn next_epoch(&self) -> Result<u64> {
        let journaled = self.epochs.journaled().await?;
        let mut last_settled = 0;
        for n in &journaled {
            match self.epochs.journal(*n).await? {
                Some(j) if j.state == State::Settled => last_settled = *n,
                _ => return Ok(*n),
            }
        }
        let on_chain = self.chain.last_settled_epoch(&self.deployment).await?;
        if on_chain > last_settled {
            bail!(
                "EpochRewards has settled epoch {on_chain} but this store's journal of job `{}` ends at {last_settled}: another settler is at work, or this is not its store",
                self.epochs.job
            );
        }
        Ok(last_settled + 1)
    }

    /// Settles every closed epoch, in order; returns the epochs settled.
    pub async fn run_once(&self) -> Result<Vec<u64>> {
        let mut done = Vec::new();
        loop {
            let n = self.next_epoch().await?;
            match self.advance(n).await? {
                Step::Settled => done.push(n),
                Step::NotClosed => return Ok(done),
            }
        }
    }

    /// Takes epoch `n` from wherever its journal stands to `settled`.
    pub async fn advance(&self, n: u64) -> Result<Step> {
        let mut j = match self.epochs.journal(n).await? {
            Some(j) => j,
            None => {
                let closes = self
                    .epochs
                    .cfg
                    .closes_at_ms(n)
                    .map_err(anyhow::Error::msg)?;
                match self.epochs.watermark().await? {
                    Some(w) if w >= closes => {}
                    _ => return Ok(Step::NotClosed),
                }
                let (from, to) = self.epochs.window(n)?;
                Journal {
                    epoch: n,
                    state: State::Closed,
                    start: rfc3339(from),
                    end: rfc3339(to),
                    computed: None,
                    published: None,
                    transactions: Vec::new(),
                    settlement: None,
                    total_gas_used: 0,
                    total_l1_fee: "0".into(),
                    seconds: BTreeMap::new(),
                }
            }
        };
        if j.state == State::Closed {
            let t = std::time::Instant::now();
            let computed = self.compute(n).await?;
            j.seconds
                .insert("compute".into(), t.elapsed().as_secs_f64());
            crash_point("computing", n);
            tracing::info!(epoch = n, root = %computed.root, pool = %computed.pool, "epoch computed");
            j.computed = Some(computed);
            j.state = State::Computed;
            self.epochs.save(&j).await?;
            crash_point("computed", n);
        }
        if j.state == State::Computed {
            let t = std::time::Instant::now();
            j.published = Some(self.publish(n).await?);
            j.seconds
                .insert("publish".into(), t.elapsed().as_secs_f64());
            j.state = State::Published;
            self.epochs.save(&j).await?;
            crash_point("published", n);
        }
        if matches!(j.state, State::Published | State::Submitted) {
            let t = std::time::Instant::now();
            self.submit(&mut j).await?;
            j.seconds.insert("settle".into(), t.elapsed().as_secs_f64());
            crash_point("confirmed", n);
            j.state = State::Settled;
            self.epochs.save(&j).await?;
            tracing::info!(epoch = n, gas = j.total_gas_used, "epoch settled");
            crash_point("settled", n);
        }
        Ok(Step::Settled)
    }

    /// Threshold (millionths) and emission of epoch `n`, and the block they were read at.
    async fn params(&self, n: u64) -> Result<(u64, u128, Option<PinnedBlock>)> {
        let cfg = &self.epochs.cfg;
        let needs_chain = cfg.emission == "chain" || cfg.attribution_threshold == "chain";
        let (chain_params, block) = if needs_chain {
            let block = self.chain.block(&cfg.chain.params_block).await?;
            let p = self.chain.params_at(&self.deployment, n, &block).await?;
            (Some(p), Some(block))
        } else {
            (None, None)
        };
        let threshold = match (&chain_params, cfg.attribution_threshold.as_str()) {
            (Some(p), "chain") => p.attribution_threshold,
            (_, t) => t.parse()?,
        };
        let emission = match (&chain_params, cfg.emission.as_str()) {
            (Some(p), "chain") => u128::try_from(p.emission).context("emission beyond 128 bits")?,
            (_, e) => Amount::parse(e)
                .map_err(|e| anyhow::anyhow!("emission: {e}"))?
                .to_u128()
                .context("emission beyond 128 bits")?,
        };
        Ok((threshold, emission, block))
    }

    /// closed → computed: every artifact of the epoch, written before the journal says so.
    async fn compute(&self, n: u64) -> Result<Computed> {
        let e = &self.epochs;
        let cfg = &e.cfg;
        let window = e.window(n)?;
        let (threshold, emission, block) = self.params(n).await?;
        // One session (one listing of the store) for the policy, the fees and the content roots.
        let (ctx, tables) = crate::sql::session_and_tables(&e.store, 1).await?;
        let policy = cfg.policy.as_deref().unwrap_or(DEFAULT_POLICY);
        let earned = run_policy(&ctx, policy, n, window, threshold, cfg.penalty_per_point).await?;
        let fees = if cfg.inference_fees {
            inference_fees(&ctx, window).await?
        } else {
            0
        };
        let pool = emission.checked_add(fees).context("pool overflow")?;
        let owner_part = bps(pool, cfg.shares.model_owner)?;
        let data_part = bps(pool, cfg.shares.data)?;
        let mut protocol_part = pool - owner_part - data_part;

        let accounts: Vec<Account> = earned.keys().copied().collect();
        let weights: Vec<f64> = earned.values().map(|v| v.1).collect();
        let ints = integer_weights(&weights);
        let mut unallocated = 0u128;
        let amounts = if ints.iter().any(|w| *w > 0) {
            ledgerflow_rewards::largest_remainder(data_part, &ints)
        } else if cfg.protocol.is_some() {
            protocol_part += data_part;
            vec![0; accounts.len()]
        } else {
            unallocated = data_part;
            vec![0; accounts.len()]
        };
        let mut lines: BTreeMap<Account, Earned> = BTreeMap::new();
        for ((a, (score, weight)), amount) in earned.iter().zip(&amounts) {
            lines.insert(
                *a,
                Earned {
                    score: *score,
                    weight: *weight,
                    amount: *amount,
                },
            );
        }
        for (addr, part) in [
            (&cfg.model_owner, owner_part),
            (&cfg.protocol, protocol_part),
        ] {
            if let Some(addr) = addr {
                let a = parse_address(addr).map_err(anyhow::Error::msg)?;
                lines
                    .entry(a)
                    .or_insert(Earned {
                        score: 0.0,
                        weight: 0.0,
                        amount: 0,
                    })
                    .amount += part;
            }
        }

        // Cumulative: the previous epoch's leaves plus this epoch's amounts.
        let mut cumulative: BTreeMap<Account, u128> = BTreeMap::new();
        for leaf in e.leaves(n - 1).await? {
            let v = leaf
                .amount
                .to_u128()
                .context("a cumulative amount beyond 128 bits")?;
            *cumulative.entry(leaf.account).or_default() += v;
        }
        for (a, l) in &lines {
            let c = cumulative.entry(*a).or_default();
            *c = c.checked_add(l.amount).context("cumulative overflow")?;
        }
        cumulative.retain(|_, v| *v > 0);
        let leaves: Vec<Leaf> = cumulative
            .iter()
            .map(|(a, v)| Leaf {
                account: *a,
                amount: Amount::from(*v),
            })
            .collect();
        let total: u128 = cumulative.values().sum();
        let root = if leaves.is_empty() {
            [0u8; 32]
        } else {
            StandardMerkleTree::of(leaves.clone())?.root()
        };

        // Datanet content roots.
        let mut datanets = Vec::new();
        for t in &tables {
            if t.kind != TableKind::Datanet || t.files == 0 {
                continue;
            }
            let sql = format!(
                "SELECT DISTINCT content_hash FROM \"{}\" WHERE kafka_timestamp >= to_timestamp_millis({}) AND kafka_timestamp < to_timestamp_millis({}) ORDER BY content_hash",
                t.name, window.0, window.1
            );
            let mut hashes = Vec::new();
            for b in ctx.sql(&sql).await?.collect().await? {
                let col = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
                let col = col.as_string::<i32>();
                for i in 0..col.len() {
                    hashes.push(parse_hash(col.value(i))?);
                }
            }
            if hashes.is_empty() {
                continue;
            }
            let tree = Bytes32Tree::of(hashes.clone())?;
            let text: String = hashes.iter().map(|h| hex0x(h) + "\n").collect();
            e.store
                .put(
                    &e.artifact(n, &format!("contents/{}.txt", t.name)),
                    Bytes::from(text),
                )
                .await?;
            datanets.push(DatanetRoot {
                datanet: t.name.clone(),
                root: B256::from(tree.root()),
                contributions: hashes.len() as u64,
            });
        }

        let previous_root = match n {
            1 => None,
            _ => e
                .journal(n - 1)
                .await?
                .and_then(|j| j.computed)
                .map(|c| c.root),
        };
        let manifest = json!({
            "job": e.job,
            "epoch": n,
            "start": rfc3339(window.0),
            "end": rfc3339(window.1),
            "params": {
                "attribution_threshold_millionths": threshold,
                "emission": emission.to_string(),
                "source": if block.is_some() { "chain" } else { "config" },
                "block": block.map(|b| b.number),
                "block_hash": block.map(|b| b.hash.to_string()),
                "reward_params": self.deployment.reward_params.to_string(),
            },
            "pool": {
                "total": pool.to_string(),
                "emission": emission.to_string(),
                "inference_fees": fees.to_string(),
                "data": data_part.to_string(),
                "model_owner": owner_part.to_string(),
                "protocol": protocol_part.to_string(),
                "unallocated": unallocated.to_string(),
            },
            "policy_keccak256": hex0x(ledgerflow_schemas::contribution::keccak256(policy.as_bytes())),
            "root": hex0x(root),
            "previous_root": previous_root.map(|r| r.to_string()),
            "total_cumulative": total.to_string(),
            "leaves": leaves.len(),
            "contributors_paid": lines.values().filter(|l| l.amount > 0).count(),
            "datanets": datanets,
        });

        // leaves.csv: the cumulative leaves (the input of `rewards tree|proof|claim`).
        let mut csv = String::from("address,amount\n");
        for l in &leaves {
            csv.push_str(&format!("{},{}\n", checksum_address(&l.account), l.amount));
        }
        // The payload: manifest line, then every account's line.
        let mut body = serde_json::to_string(&manifest)?;
        body.push('\n');
        body.push_str("address,cumulative,amount,score,weight\n");
        for (a, c) in &cumulative {
            let l = lines.get(a);
            body.push_str(&format!(
                "{},{},{},{},{}\n",
                checksum_address(a),
                c,
                l.map_or(0, |l| l.amount),
                l.map_or(0.0, |l| l.score),
                l.map_or(0.0, |l| l.weight)
            ));
        }
        let payload = zstd::bulk::compress(body.as_bytes(), 3)?;
        let data_hash = ledgerflow_schemas::contribution::keccak256(&payload);
        e.store
            .put(&e.artifact(n, "leaves.csv"), Bytes::from(csv))
            .await?;
        e.store
            .put(
                &e.artifact(n, "manifest.json"),
                Bytes::from(serde_json::to_vec_pretty(&manifest)?),
            )
            .await?;
        let payload_bytes = payload.len();
        e.store
            .put(&e.artifact(n, "payload.bin"), Bytes::from(payload))
            .await?;
        Ok(Computed {
            root: B256::from(root),
            data_hash: B256::from(data_hash),
            total_cumulative: total.to_string(),
            pool: pool.to_string(),
            contributors_paid: lines.values().filter(|l| l.amount > 0).count(),
            leaves: leaves.len(),
            payload_bytes,
            datanets,
        })
    }

    /// computed → published: put, read back, verify.
    async fn publish(&self, n: u64) -> Result<Published> {
        let e = &self.epochs;
        let payload = e
            .store
            .get(&e.artifact(n, "payload.bin"))
            .await?
            .context("the computed epoch has no payload.bin")?
            .to_vec();
        let commitment = self
            .da
            .put(payload.clone())
            .await
            .context("publishing the epoch's data")?;
        crash_point("put", n);
        let back = self
            .da
            .get(&commitment)
            .await
            .context("reading the epoch's data back")?;
        if back != payload {
            bail!(
                "the DA server returned {} bytes for commitment 0x{} instead of the {} published",
                back.len(),
                hex::encode(&commitment),
                payload.len()
            );
        }
        let blob_bytes = ledgerflow_da::encode(&payload)?.len();
        Ok(Published {
            commitment: format!("0x{}", hex::encode(&commitment)),
            commitment_hash: B256::from(ledgerflow_schemas::contribution::keccak256(&commitment)),
            blob_bytes,
        })
    }

    /// The actions epoch `n` needs on chain, in order.
    fn actions(&self, j: &Journal) -> Vec<Action> {
        let mut out = Vec::new();
        if self.epochs.cfg.chain.anchor_datanets {
            for d in &j.computed.as_ref().expect("computed").datanets {
                out.push(Action::Register {
                    datanet: d.datanet.clone(),
                });
                out.push(Action::Anchor {
                    datanet: d.datanet.clone(),
                });
            }
        }
        out.push(Action::Settle);
        out
    }

    /// Whether the chain already shows `action` done (for `settle`: by this journal's root).
    async fn done_on_chain(&self, j: &Journal, action: &Action) -> Result<bool> {
        let c = j.computed.as_ref().expect("computed");
        let d = &self.deployment;
        Ok(match action {
            Action::Register { datanet } => self.chain.datanet_registered(d, datanet).await?,
            Action::Anchor { datanet } => {
                let root = self.chain.content_root(d, datanet, j.epoch).await?;
                let ours = c
                    .datanets
                    .iter()
                    .find(|x| &x.datanet == datanet)
                    .map(|x| x.root);
                if root != B256::ZERO && Some(root) != ours {
                    bail!("Datanet {datanet}'s content root of epoch {} on chain is {root}, not the journaled {ours:?}", j.epoch);
                }
                root != B256::ZERO
            }
            Action::Settle => {
                let events = self.chain.settled_events(d, j.epoch).await?;
                match events.as_slice() {
                    [] => false,
                    [(ev, _, _)] if ev.root == c.root => true,
                    [(ev, tx, _)] => bail!(
                        "epoch {} was settled on chain by {tx} with root {}, not the journaled {}",
                        j.epoch,
                        ev.root,
                        c.root
                    ),
                    _ => bail!("epoch {} has {} Settled events", j.epoch, events.len()),
                }
            }
        })
    }

    fn request(
        &self,
        j: &Journal,
        action: &Action,
    ) -> Result<ledgerflow_chain::TransactionRequest> {
        let c = j.computed.as_ref().expect("computed");
        let d = &self.deployment;
        Ok(match action {
            Action::Register { datanet } => settlement::register_call(d, datanet),
            Action::Anchor { datanet } => {
                let r = c
                    .datanets
                    .iter()
                    .find(|x| &x.datanet == datanet)
                    .context("no such Datanet root")?;
                settlement::anchor_call(d, datanet, j.epoch, r.root, r.contributions)
            }
            Action::Settle => {
                let p = j.published.as_ref().expect("published");
                let total = U256::from_str_radix(&c.total_cumulative, 10)?;
                settlement::settle_call(d, j.epoch, c.root, c.data_hash, p.commitment_hash, total)?
            }
        })
    }

    /// published/submitted → every transaction confirmed.
    async fn submit(&self, j: &mut Journal) -> Result<()> {
        let cfg = &self.epochs.cfg.chain;
        let timeout = Duration::from_secs_f64(cfg.timeout_seconds);
        let l1 = cfg.l1.params();
        for action in self.actions(j) {
            let at = j.transactions.iter().rposition(|t| t.action == action);
            if let Some(i) = at {
                if j.transactions[i].confirmed.is_some() {
                    continue;
                }
            }
            // A journaled, unconfirmed transaction: mined, pending, or never sent.
            let mut pending = at.map(|i| j.transactions[i].tx.clone());
            if let Some(tx) = &pending {
                if self.chain.receipt(tx.hash).await?.is_none()
                    && !self.chain.known(tx.hash).await?
                {
                    if self.chain.mined_nonce(tx.from).await? > tx.nonce {
                        // Its nonce went to another transaction: it can never be mined.
                        tracing::warn!(hash = %tx.hash, nonce = tx.nonce, "a journaled transaction's nonce was used by another; signing again");
                        pending = None;
                    } else {
                        self.chain.broadcast(tx).await?;
                        crash_point("broadcast", j.epoch);
                    }
                }
            }
            if pending.is_none() {
                if self.done_on_chain(j, &action).await? {
                    continue;
                }
                let nonce = self.chain.pending_nonce(self.signer.address()).await?;
                let tx = self
                    .chain
                    .sign(&self.signer, self.request(j, &action)?, nonce)
                    .await
                    .with_context(|| format!("{action:?} of epoch {}", j.epoch))?;
                j.transactions.push(JournaledTx {
                    action: action.clone(),
                    tx: tx.clone(),
                    confirmed: None,
                });
                j.state = State::Submitted;
                self.epochs.save(j).await?;
                crash_point("signed", j.epoch);
                self.chain.broadcast(&tx).await?;
                crash_point("broadcast", j.epoch);
                pending = Some(tx);
            }
            let tx = pending.expect("a transaction");
            let (receipt, confirmed) = self
                .chain
                .confirmed(&tx, cfg.confirmations, timeout, l1)
                .await?;
            if action == Action::Settle {
                let ev = receipt
                    .decoded_log::<ledgerflow_chain::bindings::EpochRewards::Settled>()
                    .context("the settle transaction emitted no Settled event")?;
                let c = j.computed.as_ref().expect("computed");
                let p = j.published.as_ref().expect("published");
                if ev.epoch != j.epoch
                    || ev.root != c.root
                    || ev.dataHash != c.data_hash
                    || ev.daCommitment != p.commitment_hash
                {
                    bail!(
                        "the Settled event of {} does not match the journal of epoch {}",
                        tx.hash,
                        j.epoch
                    );
                }
                j.settlement = Some(confirmed.clone());
            }
            let i = j
                .transactions
                .iter()
                .rposition(|t| t.tx.hash == tx.hash)
                .expect("journaled");
            j.transactions[i].confirmed = Some(confirmed);
            self.epochs.save(j).await?;
        }
        let confirmed: Vec<&Confirmed> = j
            .transactions
            .iter()
            .filter_map(|t| t.confirmed.as_ref())
            .collect();
        j.total_gas_used = confirmed.iter().map(|c| c.gas_used).sum();
        j.total_l1_fee = confirmed
            .iter()
            .map(|c| c.l1_fee.fee)
            .sum::<u128>()
            .to_string();
        if j.settlement.is_none() {
            // Settled before this journal recorded it (it cannot be: settle is journaled first).
            bail!("epoch {} has no confirmed settle transaction", j.epoch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_become_53_bit_integers() {
        assert_eq!(integer_weights(&[0.0, 0.0]), vec![0, 0]);
        let w = integer_weights(&[1.0, 0.5, 0.0]);
        assert_eq!(w, vec![1 << 53, 1 << 52, 0]);
    }

    use arrow_array::{
        ArrayRef, Decimal128Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
        TimestampMillisecondArray, UInt32Array, UInt64Array,
    };
    use ledgerflow_schemas::tables;

    const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    const HOUR: i64 = 3_600_000;

    fn ts(v: Vec<i64>) -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
    }
    fn strs(v: &[&str]) -> ArrayRef {
        Arc::new(StringArray::from(v.to_vec()))
    }
    fn addr(i: u8) -> String {
        format!("0x{}", hex::encode([i; 20]))
    }

    /// A policy session over what `store` holds now.
    async fn ctx(store: &Store) -> datafusion::prelude::SessionContext {
        crate::sql::session_with_partitions(store, 1).await.unwrap()
    }

    async fn put(store: &Store, table: &str, batch: RecordBatch, time: &'static str) {
        crate::tokens::put_table_file(store, table, &batch, time, &format!("{table}.parquet"))
            .await
            .unwrap();
    }

    /// The default policy: the threshold drops small scores, scores sum per contributor over
    /// the window only, reputation (0.5 for an address without decisions) multiplies, and
    /// each penalty point of the epoch takes `penalty_per_point` of the weight.
    #[tokio::test]
    async fn default_policy_weighs_scores_reputation_and_penalties() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let (a, b, c) = (addr(1), addr(2), addr(3));
        let batch = RecordBatch::try_new(
            tables::attribution_schema(),
            vec![
                strs(&["o1", "o1", "o1", "o2", "o3"]),
                strs(&["legal"; 5]),
                strs(&["0x01", "0x02", "0x03", "0x01", "0x02"]),
                strs(&[&a, &b, &c, &a, &b]),
                strs(&["span"; 5]),
                Arc::new(Float64Array::from(vec![0.6, 0.395, 0.005, 1.0, 1.0])),
                // o3 is in the next epoch.
                ts(vec![T0 + 1, T0 + 1, T0 + 1, T0 + 2, T0 + HOUR]),
            ],
        )
        .unwrap();
        put(&store, tables::ATTRIBUTIONS_TABLE, batch, "created_at").await;
        let penalties = RecordBatch::try_new(
            tables::penalty_schema(),
            vec![
                Arc::new(UInt64Array::from(vec![0, 0])),
                strs(&[&b, &b]),
                strs(&["legal", "legal"]),
                strs(&["duplicate_exact", "flood"]),
                Arc::new(UInt32Array::from(vec![1, 3])),
                strs(&["0x09", "0x0a"]),
                strs(&["t", "t"]),
                Arc::new(Int32Array::from(vec![0, 0])),
                Arc::new(Int64Array::from(vec![1, 2])),
                // The flood's 3 points fall in the next epoch.
                ts(vec![T0 + 5, T0 + HOUR + 5]),
            ],
        )
        .unwrap();
        put(
            &store,
            tables::PENALTIES_TABLE,
            penalties,
            "kafka_timestamp",
        )
        .await;
        let got = run_policy(
            &ctx(&store).await,
            DEFAULT_POLICY,
            1,
            (T0, T0 + HOUR),
            10_000,
            0.1,
        )
        .await
        .unwrap();
        let acct = |s: &str| parse_address(s).unwrap();
        assert_eq!(
            got.len(),
            2,
            "c's 0.005 is under the 0.01 threshold: {got:?}"
        );
        let (sa, wa) = got[&acct(&a)];
        let (sb, wb) = got[&acct(&b)];
        assert!(
            (sa - 1.6).abs() < 1e-12 && (wa - 0.8).abs() < 1e-12,
            "{sa} {wa}"
        );
        assert!((sb - 0.395).abs() < 1e-12, "{sb}");
        assert!((wb - 0.395 * 0.5 * 0.9).abs() < 1e-12, "{wb}");
    }

    /// A policy of the user's own: one share per contributor with an output in the window,
    /// whatever the scores; and the errors of policies that answer the wrong thing.
    #[tokio::test]
    async fn a_policy_of_ones_own_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let (a, b) = (addr(1), addr(2));
        let batch = RecordBatch::try_new(
            tables::attribution_schema(),
            vec![
                strs(&["o1", "o1", "o2"]),
                strs(&["legal"; 3]),
                strs(&["0x01", "0x02", "0x01"]),
                strs(&[&a, &b, &a]),
                strs(&["span"; 3]),
                Arc::new(Float64Array::from(vec![0.9, 0.1, 1.0])),
                ts(vec![T0 + 1, T0 + 1, T0 + 2]),
            ],
        )
        .unwrap();
        put(&store, tables::ATTRIBUTIONS_TABLE, batch, "created_at").await;
        let equal = "SELECT DISTINCT contributor, 1.0 AS weight FROM attributions \
                     WHERE created_at >= $start AND created_at < $end";
        let got = run_policy(&ctx(&store).await, equal, 1, (T0, T0 + HOUR), 0, 0.1)
            .await
            .unwrap();
        let weights: Vec<f64> = got.values().map(|v| v.1).collect();
        assert_eq!(weights, vec![1.0, 1.0]);
        for (sql, expected) in [
            ("SELECT contributor FROM attributions", "`weight` column"),
            (
                "SELECT 'nobody' AS contributor, 1.0 AS weight",
                "answered contributor",
            ),
            (
                "SELECT contributor, -1.0 AS weight FROM attributions",
                "finite and ≥ 0",
            ),
            ("DROP TABLE attributions", "planning the reward policy"),
        ] {
            let e = run_policy(&ctx(&store).await, sql, 1, (T0, T0 + HOUR), 0, 0.1)
                .await
                .unwrap_err();
            assert!(format!("{e:#}").contains(expected), "{sql}: {e:#}");
        }
    }

    #[tokio::test]
    async fn inference_fees_of_the_window_add_up_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(
            inference_fees(&ctx(&store).await, (T0, T0 + HOUR))
                .await
                .unwrap(),
            0
        );
        let big = 10i128.pow(30);
        let batch = RecordBatch::try_new(
            tables::inference_schema(),
            vec![
                strs(&["r1", "r2", "r3", "r4"]),
                strs(&["base"; 4]),
                strs(&["g1"; 4]),
                strs(&["legal"; 4]),
                strs(&["p"; 4]),
                strs(&["o"; 4]),
                Arc::new(UInt32Array::from(vec![1; 4])),
                Arc::new(UInt32Array::from(vec![1; 4])),
                Arc::new(Float64Array::from(vec![1.0; 4])),
                Arc::new(Float64Array::from(vec![1.0; 4])),
                Arc::new(
                    Decimal128Array::from(vec![Some(big), Some(7), None, Some(5)])
                        .with_precision_and_scale(38, 0)
                        .unwrap(),
                ),
                ts(vec![T0, T0 + HOUR - 1, T0 + 2, T0 + HOUR]),
            ],
        )
        .unwrap();
        put(&store, tables::INFERENCES_TABLE, batch, "created_at").await;
        assert_eq!(
            inference_fees(&ctx(&store).await, (T0, T0 + HOUR))
                .await
                .unwrap(),
            big as u128 + 7
        );
    }

    #[test]
    fn basis_points_do_not_overflow() {
        assert_eq!(bps(10_000, 2_500).unwrap(), 2_500);
        assert_eq!(bps(u128::MAX, 10_000).unwrap(), u128::MAX);
        assert_eq!(bps(9_999, 5_000).unwrap(), 4_999);
    }
}
