//! `ledgerflow serve`: every model of the store's registry behind an OpenAI-compatible HTTP API.
//!
//! One engine thread per base model runs continuous, mixed-adapter batches
//! ([`ledgerflow_models::generate`]). Adapters live in the store and are loaded on demand into a
//! byte-budgeted LRU; concurrent requests for a cold adapter wait for one load. A name maps to a
//! content-addressed version (the keccak256 of its safetensors), and a request holds the version
//! it started with, so replacing an adapter never changes a request in flight. Every answer is
//! credited to the contributions it repeats (span matching against the model's Datanet index),
//! returned as `attribution` and written to `inferences` and `attributions`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ledgerflow_index::TextTokenizer;
use ledgerflow_models::generate::{run_engine, Event, Request, Sampling};
use ledgerflow_models::{Adapter, LoraConfig, Transformer};
use ledgerflow_store::Store;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OnceCell};

use crate::train::{load_base, registry, ModelRow};

/// How `ledgerflow serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `host:port` to listen on.
    pub listen: String,
    /// Bearer token for loading and unloading adapters (none: those endpoints are refused).
    pub api_key: Option<String>,
    /// Bytes of adapter tensors kept resident.
    pub adapter_budget_bytes: usize,
    /// Sequences per engine step.
    pub max_batch: usize,
    /// Credit answers to contributions by span matching (needs the Datanet's index).
    pub attribution: bool,
    /// Also answer requests from Kafka: brokers, request topic, response topic, group.
    pub kafka: Option<KafkaServing>,
    /// How answers of adapters with a gradient index are credited by gradient.
    pub gradient: crate::attribution::ScoreOptions,
}

/// Inference over Kafka: JSON requests (the body of `/v1/completions`, plus an optional `id`;
/// the record key otherwise) from `requests`, responses (the HTTP response, with `request_id`)
/// to `responses` keyed by the request id. Offsets are committed only up to requests answered,
/// so a crash answers a request again rather than never.
#[derive(Debug, Clone)]
pub struct KafkaServing {
    pub brokers: String,
    pub requests: String,
    pub responses: String,
    pub group: String,
}

/// A served base model.
struct Base {
    row: ModelRow,
    model: Arc<Transformer>,
    /// Where the model's weights are, and so where its adapters are loaded.
    device: candle_core::Device,
    tokenizer: Arc<TextTokenizer>,
    engine: std::sync::mpsc::Sender<Request>,
    max_len: usize,
}

/// Where an adapter version's files are.
#[derive(Debug, Clone)]
enum Source {
    /// A folder of the store (`models/<id>`).
    Store(String),
    /// A local folder (`load_lora_adapter` with a path).
    Local(PathBuf),
}

/// An adapter name and the version it currently stands for.
#[derive(Debug, Clone)]
struct Named {
    name: String,
    parent: String,
    datanet: String,
    generation: String,
    config: LoraConfig,
    source: Source,
    created: i64,
}

#[derive(Default)]
struct AdapterStats {
    hits: u64,
    misses: u64,
    loads: u64,
    evictions: u64,
    load_seconds: f64,
}

struct Resident {
    adapter: Arc<Adapter>,
    bytes: usize,
    tick: u64,
    name: String,
}

#[derive(Default)]
struct Cache {
    resident: HashMap<String, Resident>,
    loading: HashMap<String, Arc<OnceCell<Arc<Adapter>>>>,
    bytes: usize,
    tick: u64,
    stats: HashMap<String, AdapterStats>,
    /// The latest load times (seconds), for quantiles.
    recent_loads: std::collections::VecDeque<f64>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    ttft_us: AtomicU64,
    ttft_count: AtomicU64,
    tpot_us: AtomicU64,
    tpot_count: AtomicU64,
    steps: AtomicU64,
    step_rows: AtomicU64,
    step_adapters: AtomicU64,
}

struct AppState {
    store: Store,
    bases: HashMap<String, Base>,
    adapters: RwLock<HashMap<String, Named>>,
    cache: Mutex<Cache>,
    budget: usize,
    counters: Arc<Counters>,
    api_key: Option<String>,
    attribution: bool,
    gradient: crate::attribution::ScoreOptions,
    spans: Mutex<HashMap<String, Arc<crate::tokens::SpanIndex>>>,
    /// Gradient scorers by adapter generation (`None`: no index when last looked, and when).
    scorers: Mutex<HashMap<String, CachedScorer>>,
    recorder: mpsc::UnboundedSender<Record>,
    started: i64,
}

/// A gradient scorer of an adapter version, or `None` (no index) and when that was seen.
type CachedScorer = (Option<Arc<crate::attribution::Scorer>>, Instant);

/// An answered request, to be written to `inferences` and `attributions`.
struct Record {
    request_id: String,
    model: String,
    generation: Option<String>,
    datanet: String,
    prompt: String,
    output: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    ttft_ms: f64,
    total_ms: f64,
    created_at_ms: i64,
    attribution: Option<Value>,
    gradient: Option<Value>,
}

/// An error in OpenAI's shape.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.0 {
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            s if s.is_server_error() => "InternalServerError",
            _ => "BadRequestError",
        };
        let body = json!({ "error": {
            "message": self.1, "type": kind, "param": null, "code": self.0.as_u16()
        }});
        (self.0, axum::Json(body)).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A running server.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub models: Vec<String>,
}

/// Loads every base model of the registry, registers every adapter, binds and serves until
/// `shutdown` resolves; returns once bound (the server runs on the current runtime).
pub async fn start(
    store: Store,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Server, tokio::task::JoinHandle<()>)> {
    let device = crate::train::candle_device()?;
    let rows = registry(&store)
        .await
        .context("reading the `models` registry")?;
    if rows.is_empty() {
        bail!("the registry has no models: train one with `ledgerflow train --datanet NAME`");
    }
    let counters = Arc::new(Counters::default());
    let mut bases = HashMap::new();
    for row in rows.iter().filter(|r| r.kind == "base") {
        let loaded = load_base(&store, row, &device).await?;
        let model = Arc::new(loaded.model);
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (m, d, c, max_batch) = (
            model.clone(),
            device.clone(),
            counters.clone(),
            opts.max_batch,
        );
        std::thread::Builder::new()
            .name(format!("engine-{}", row.id))
            .spawn(move || {
                run_engine(&m, &d, rx, max_batch, &mut |s| {
                    c.steps.fetch_add(1, Ordering::Relaxed);
                    c.step_rows.fetch_add(s.batch as u64, Ordering::Relaxed);
                    c.step_adapters
                        .fetch_add(s.adapters as u64, Ordering::Relaxed);
                })
            })?;
        bases.insert(
            row.id.clone(),
            Base {
                row: row.clone(),
                max_len: loaded.cfg.max_seq_len,
                model,
                device: device.clone(),
                tokenizer: Arc::new(loaded.tokenizer),
                engine: tx,
            },
        );
    }
    let mut adapters = HashMap::new();
    for row in rows.iter().filter(|r| r.kind == "adapter") {
        let Some(parent) = row.parent.clone().filter(|p| bases.contains_key(p)) else {
            tracing::warn!("adapter {} has no served base; skipped", row.id);
            continue;
        };
        let hyper: Value = serde_json::from_str(&row.hyperparameters).unwrap_or_default();
        let config: LoraConfig = serde_json::from_value(hyper["lora"].clone())
            .with_context(|| format!("adapter {} has no valid `lora` hyperparameters", row.id))?;
        adapters.insert(
            row.id.clone(),
            Named {
                name: row.id.clone(),
                parent,
                datanet: row.datanet.clone(),
                generation: row.content_hash.clone(),
                config,
                source: Source::Store(row.dir()),
                created: row.created_at_ms / 1000,
            },
        );
    }
    let (rec_tx, rec_rx) = mpsc::unbounded_channel();
    let state = Arc::new(AppState {
        store: store.clone(),
        bases,
        adapters: RwLock::new(adapters),
        cache: Mutex::new(Cache::default()),
        budget: opts.adapter_budget_bytes,
        counters,
        api_key: opts.api_key.clone(),
        attribution: opts.attribution,
        gradient: opts.gradient.clone(),
        spans: Mutex::new(HashMap::new()),
        scorers: Mutex::new(HashMap::new()),
        recorder: rec_tx,
        started: now_ms() / 1000,
    });
    let recorder = tokio::spawn(record_loop(store, rec_rx));
    let kafka = opts.kafka.clone().map(|k| {
        let st = state.clone();
        tokio::spawn(async move {
            if let Err(e) = kafka_loop(st, k).await {
                tracing::error!("Kafka serving stopped: {e:#}");
            }
        })
    });
    let mut models: Vec<String> = state.bases.keys().cloned().collect();
    models.extend(state.adapters.read().expect("adapters").keys().cloned());
    models.sort();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!("server: {e}");
        }
        // Stop taking Kafka requests (those not answered are not committed: they are answered
        // after a restart), let the recorder write what is queued, then stop.
        if let Some(k) = kafka {
            k.abort();
            let _ = k.await;
        }
        drop(state);
        if tokio::time::timeout(Duration::from_secs(30), recorder)
            .await
            .is_err()
        {
            tracing::warn!("answers still being recorded after 30 s; stopping without them");
        }
    });
    Ok((Server { addr, models }, handle))
}

/// Writes answered requests to `inferences` and `attributions`, everything queued at once in
/// one file of each.
async fn record_loop(store: Store, mut rx: mpsc::UnboundedReceiver<Record>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = write_records(&store, &batch).await {
            tracing::error!("recording {} inferences: {e:#}", batch.len());
        }
    }
}

async fn write_records(store: &Store, batch: &[Record]) -> Result<()> {
    let rows: Vec<crate::tokens::Inference<'_>> = batch
        .iter()
        .map(|r| crate::tokens::Inference {
            request_id: &r.request_id,
            model: &r.model,
            adapter_generation: r.generation.as_deref(),
            datanet: &r.datanet,
            prompt: &r.prompt,
            output: &r.output,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            time_to_first_token_ms: Some(r.ttft_ms),
            total_ms: Some(r.total_ms),
            fee: None,
            created_at_ms: r.created_at_ms,
        })
        .collect();
    let key = hex::encode(
        &ledgerflow_schemas::contribution::keccak256(batch[0].request_id.as_bytes())[..12],
    );
    crate::tokens::record_inference_batch(store, &rows, &format!("served-{key}.parquet")).await?;
    // Span credits and gradient credits: one file of each per batch.
    type Credits = fn(&Record) -> Option<&Value>;
    let kinds: [(&str, &str, Credits); 2] = [
        ("span", "served", |r| r.attribution.as_ref()),
        ("gradient", "served-gradient", |r| r.gradient.as_ref()),
    ];
    for (method, prefix, credits_of) in kinds {
        let credits: Vec<(&str, &str, &Value, i64)> = batch
            .iter()
            .filter_map(|r| {
                Some((
                    r.request_id.as_str(),
                    r.datanet.as_str(),
                    credits_of(r)?,
                    r.created_at_ms,
                ))
            })
            .collect();
        crate::tokens::record_attribution_batch(
            store,
            &credits,
            method,
            &format!("{prefix}-{key}.parquet"),
        )
        .await?;
    }
    Ok(())
}

impl AppState {
    /// The adapter version `named` stands for, from memory or loaded once from its files.
    async fn adapter(&self, named: &Named) -> Result<Arc<Adapter>, ApiError> {
        let cell = {
            let mut c = self.cache.lock().expect("cache");
            c.tick += 1;
            let tick = c.tick;
            if let Some(r) = c.resident.get_mut(&named.generation) {
                r.tick = tick;
                let a = r.adapter.clone();
                c.stats.entry(named.name.clone()).or_default().hits += 1;
                return Ok(a);
            }
            c.stats.entry(named.name.clone()).or_default().misses += 1;
            c.loading
                .entry(named.generation.clone())
                .or_default()
                .clone()
        };
        let base = &self.bases[&named.parent];
        let loaded = cell
            .get_or_try_init(|| async {
                let t0 = Instant::now();
                let bytes = match &named.source {
                    Source::Store(dir) => self
                        .store
                        .get(&format!("{dir}/adapter_model.safetensors"))
                        .await
                        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                        .ok_or_else(|| {
                            ApiError(
                                StatusCode::NOT_FOUND,
                                format!("{dir}/adapter_model.safetensors is not in the store"),
                            )
                        })?
                        .to_vec(),
                    Source::Local(dir) => std::fs::read(dir.join("adapter_model.safetensors"))
                        .map_err(|e| {
                            ApiError(StatusCode::NOT_FOUND, format!("{}: {e}", dir.display()))
                        })?,
                };
                let hash = ledgerflow_schemas::hex0x::encode(
                    &ledgerflow_schemas::contribution::keccak256(&bytes),
                );
                if hash != named.generation {
                    return Err(ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "adapter {} changed on disk: {hash} is not the registered {}",
                            named.name, named.generation
                        ),
                    ));
                }
                let (model, config) = (base.model.clone(), named.config.clone());
                let device = base.device.clone();
                let adapter = tokio::task::spawn_blocking(move || {
                    Adapter::from_safetensors(&bytes, &config, &model, &device)
                })
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                let mut c = self.cache.lock().expect("cache");
                let secs = t0.elapsed().as_secs_f64();
                let s = c.stats.entry(named.name.clone()).or_default();
                s.loads += 1;
                s.load_seconds += secs;
                if c.recent_loads.len() == 4096 {
                    c.recent_loads.pop_front();
                }
                c.recent_loads.push_back(secs);
                Ok::<_, ApiError>(Arc::new(adapter))
            })
            .await?
            .clone();
        let mut c = self.cache.lock().expect("cache");
        if !c.resident.contains_key(&named.generation) {
            let bytes = loaded.tensor_bytes();
            c.tick += 1;
            let tick = c.tick;
            c.resident.insert(
                named.generation.clone(),
                Resident {
                    adapter: loaded.clone(),
                    bytes,
                    tick,
                    name: named.name.clone(),
                },
            );
            c.bytes += bytes;
            while c.bytes > self.budget && c.resident.len() > 1 {
                let victim = c
                    .resident
                    .iter()
                    .filter(|(g, _)| **g != named.generation)
                    .min_by_key(|(_, r)| r.tick)
                    .map(|(g, _)| g.clone());
                let Some(victim) = victim else { break };
                let r = c.resident.remove(&victim).expect("resident");
                c.bytes -= r.bytes;
                c.stats.entry(r.name).or_default().evictions += 1;
            }
        }
        if c.loading
            .get(&named.generation)
            .is_some_and(|l| Arc::ptr_eq(l, &cell))
        {
            c.loading.remove(&named.generation);
        }
        Ok(loaded)
    }

    fn span_index(&self, datanet: &str) -> Option<Arc<crate::tokens::SpanIndex>> {
        if let Some(s) = self.spans.lock().expect("spans").get(datanet) {
            return Some(s.clone());
        }
        let dir = crate::tokens::datanet_index_dir(&self.store, datanet).ok()?;
        let opened = Arc::new(crate::tokens::SpanIndex::open(&dir).ok()?);
        self.spans
            .lock()
            .expect("spans")
            .insert(datanet.to_string(), opened.clone());
        Some(opened)
    }
}

/// A completion to run.
struct Job {
    model: String,
    prompt: String,
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
}

/// A model name resolved to its base and, for an adapter, the version in use.
struct Resolved<'a> {
    base: &'a Base,
    named: Option<Named>,
    adapter: Option<Arc<Adapter>>,
}

impl Resolved<'_> {
    fn datanet(&self) -> &str {
        match &self.named {
            Some(n) => &n.datanet,
            None => &self.base.row.datanet,
        }
    }
}

async fn resolve<'a>(state: &'a AppState, model: &str) -> Result<Resolved<'a>, ApiError> {
    if let Some(base) = state.bases.get(model) {
        return Ok(Resolved {
            base,
            named: None,
            adapter: None,
        });
    }
    let named = state.adapters.read().expect("adapters").get(model).cloned();
    let Some(named) = named else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
        ));
    };
    let adapter = state.adapter(&named).await?;
    Ok(Resolved {
        base: &state.bases[&named.parent],
        named: Some(named),
        adapter: Some(adapter),
    })
}

/// What a finished completion produced.
struct Outcome {
    id: String,
    created: i64,
    text: String,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    attribution: Value,
}

impl Outcome {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// Runs `job`, calling `on_text` with each new piece of text (false: the client left).
async fn run_job(
    state: &Arc<AppState>,
    job: Job,
    id: String,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Outcome, ApiError> {
    let created = now_ms();
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    let resolved = resolve(state, &job.model).await?;
    let base = resolved.base;
    let prompt: Vec<u32> = base
        .tokenizer
        .encode(&job.prompt)
        .map_err(|e| bad(format!("{e:#}")))?
        .into_iter()
        .map(u32::from)
        .collect();
    if prompt.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    if prompt.len() + job.max_tokens > base.max_len {
        return Err(bad(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            base.max_len,
            prompt.len() + job.max_tokens,
            prompt.len(),
            job.max_tokens
        )));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    base.engine
        .send(Request {
            prompt: prompt.clone(),
            max_tokens: job.max_tokens,
            stop: vec![u32::from(base.tokenizer.eos_id())],
            sampling: job.sampling.clone(),
            adapter: resolved.adapter.clone(),
            events: Box::new(move |e| tx.send(e).is_ok()),
        })
        .map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped".into()))?;
    let mut ids: Vec<u16> = Vec::new();
    let mut text = String::new();
    let mut finish = "length";
    let mut done = None;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token(t) => {
                ids.push(t as u16);
                let decoded = base.tokenizer.decode(&ids).unwrap_or_default();
                // Hold back a partial UTF-8 sequence until its last byte arrives.
                if decoded.ends_with('\u{FFFD}') || !decoded.starts_with(&text) {
                    continue;
                }
                let mut piece = decoded[text.len()..].to_string();
                let mut stopped = false;
                if let Some((at, _)) = job
                    .stop
                    .iter()
                    .filter_map(|s| decoded.find(s.as_str()).map(|i| (i, s)))
                    .min()
                {
                    piece = decoded[text.len()..at.max(text.len())].to_string();
                    stopped = true;
                }
                if !piece.is_empty() && !on_text(&piece) {
                    break;
                }
                text.push_str(&piece);
                if stopped {
                    finish = "stop";
                    break;
                }
            }
            Event::Done(f) => {
                finish = f.reason;
                done = Some(f);
                break;
            }
            Event::Error(e) => {
                state.counters.errors.fetch_add(1, Ordering::Relaxed);
                return Err(bad(e));
            }
        }
    }
    drop(rx);
    let elapsed = (now_ms() - created).max(0) as f64;
    let completion_tokens = done.as_ref().map_or(ids.len(), |d| d.completion_tokens);
    let (ttft_ms, total_ms) = match &done {
        Some(d) => (
            d.time_to_first_token.as_secs_f64() * 1e3,
            d.total.as_secs_f64() * 1e3,
        ),
        None => (elapsed, elapsed),
    };
    let c = &state.counters;
    c.prompt_tokens
        .fetch_add(prompt.len() as u64, Ordering::Relaxed);
    c.completion_tokens
        .fetch_add(completion_tokens as u64, Ordering::Relaxed);
    c.ttft_us
        .fetch_add((ttft_ms * 1e3) as u64, Ordering::Relaxed);
    c.ttft_count.fetch_add(1, Ordering::Relaxed);
    if completion_tokens > 1 {
        let per = (total_ms - ttft_ms) / (completion_tokens - 1) as f64;
        c.tpot_us.fetch_add(
            (per * 1e3 * (completion_tokens - 1) as f64) as u64,
            Ordering::Relaxed,
        );
        c.tpot_count
            .fetch_add(completion_tokens as u64 - 1, Ordering::Relaxed);
    }
    let datanet = resolved.datanet().to_string();
    let attribution = if state.attribution {
        attribute(state, &datanet, &text).await
    } else {
        Value::Null
    };
    // Gradient influence too, when the adapter version has a `gradients` index.
    let gradient = match (&resolved.named, state.attribution) {
        (Some(n), true) => gradient_scores(state, n, &format!("{}{}", job.prompt, text)).await,
        _ => None,
    };
    let model_name = job.model.clone();
    let _ = state.recorder.send(Record {
        request_id: id.clone(),
        model: model_name,
        generation: resolved.named.as_ref().map(|n| n.generation.clone()),
        datanet: datanet.clone(),
        prompt: job.prompt,
        output: text.clone(),
        prompt_tokens: prompt.len() as u32,
        completion_tokens: completion_tokens as u32,
        ttft_ms,
        total_ms,
        created_at_ms: created,
        attribution: attribution
            .get("contributions")
            .map(|_| attribution.clone()),
        gradient: gradient.clone(),
    });
    Ok(Outcome {
        id,
        created: created / 1000,
        text,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        completion_tokens,
        attribution: json!({
            "method": "span",
            "datanet": datanet,
            "generation": resolved.named.as_ref().map(|n| n.generation.clone()),
            "contributions": attribution.get("contributions").cloned().unwrap_or(json!([])),
            "spans": attribution.get("spans").map_or(0, |s| s.as_array().map_or(0, Vec::len)),
            "error": attribution.get("error").cloned(),
            "gradient": gradient,
        }),
    })
}

/// TracIn scores of an answer of adapter version `named` against its `gradients` index, if
/// built (the scorer is opened once per version; a missing index is looked for again after
/// 30 s).
async fn gradient_scores(state: &Arc<AppState>, named: &Named, text: &str) -> Option<Value> {
    // The registry id of the version: its folder in the store.
    let Source::Store(dir) = &named.source else {
        return None;
    };
    let id = dir.strip_prefix("models/")?.to_string();
    if text.is_empty() {
        return None;
    }
    let (st, n, t) = (state.clone(), named.clone(), text.to_string());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let cached = st
            .scorers
            .lock()
            .expect("scorers")
            .get(&n.generation)
            .cloned();
        let scorer = match cached {
            Some((s, _)) if s.is_some() => s,
            Some((None, at)) if at.elapsed() < Duration::from_secs(30) => None,
            _ => {
                let opened = crate::attribution::Scorer::open(&handle, &st.store, &id)
                    .ok()
                    .filter(|s| s.generation() == n.generation)
                    .map(Arc::new);
                st.scorers
                    .lock()
                    .expect("scorers")
                    .insert(n.generation.clone(), (opened.clone(), Instant::now()));
                opened
            }
        }?;
        scorer.score(&t, &st.gradient).ok()
    })
    .await
    .ok()
    .flatten()
}

/// Span credits of `text` in `datanet`'s index (`{"error": …}` when there is none).
async fn attribute(state: &Arc<AppState>, datanet: &str, text: &str) -> Value {
    if text.is_empty() {
        return json!({ "contributions": [], "spans": [] });
    }
    let (st, dn, tx) = (state.clone(), datanet.to_string(), text.to_string());
    tokio::task::spawn_blocking(move || {
        let Some(index) = st.span_index(&dn) else {
            return json!({ "error": format!("Datanet `{dn}` has no index (ledgerflow index build --datanet {dn})") });
        };
        let params = ledgerflow_index::AttributeParams {
            min_len: 4,
            max_cnt: 1000,
            ..Default::default()
        };
        index
            .attribute(&tx, &params)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }))
    })
    .await
    .unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// The sampling fields shared by both completion endpoints.
fn job_from(body: &Value, prompt: String, default_max: usize) -> Result<Job, ApiError> {
    let model = body["model"]
        .as_str()
        .ok_or_else(|| bad("`model` is required"))?
        .to_string();
    let max_tokens = match &body["max_tokens"] {
        Value::Null => match &body["max_completion_tokens"] {
            Value::Null => default_max,
            v => v
                .as_u64()
                .ok_or_else(|| bad("`max_completion_tokens` must be a non-negative integer"))?
                as usize,
        },
        v => v
            .as_u64()
            .ok_or_else(|| bad("`max_tokens` must be a non-negative integer"))?
            as usize,
    };
    let temperature = match &body["temperature"] {
        Value::Null => 1.0,
        v => v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| bad("`temperature` must be between 0 and 2"))?,
    };
    let top_p = match &body["top_p"] {
        Value::Null => 1.0,
        v => v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| bad("`top_p` must be in (0, 1]"))?,
    };
    let seed = match &body["seed"] {
        Value::Null => rand::random(),
        v => v
            .as_u64()
            .ok_or_else(|| bad("`seed` must be a non-negative integer"))?,
    };
    if body["n"].as_u64().is_some_and(|n| n != 1) {
        return Err(bad("only n = 1 is supported"));
    }
    let stop = match &body["stop"] {
        Value::Null => vec![],
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("`stop` must be strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("`stop` must be a string or a list of strings")),
    };
    Ok(Job {
        model,
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        stop,
    })
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    completion_endpoint(state, body, false).await
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    completion_endpoint(state, body, true).await
}

/// The chat template: one `role: content` line per message, then `assistant:`.
fn chat_prompt(messages: &Value) -> Result<String, ApiError> {
    let list = messages
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("`messages` must be a non-empty list"))?;
    let mut out = String::new();
    for m in list {
        let role = m["role"]
            .as_str()
            .ok_or_else(|| bad("a message has no `role`"))?;
        let content = match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            _ => return Err(bad("a message has no `content`")),
        };
        out.push_str(&format!("{role}: {content}\n"));
    }
    out.push_str("assistant:");
    Ok(out)
}

async fn completion_endpoint(state: Arc<AppState>, body: Bytes, chat: bool) -> Response {
    let body = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let prompt = if chat {
        chat_prompt(&body["messages"])
    } else {
        match &body["prompt"] {
            Value::String(s) => Ok(s.clone()),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                Ok(a[0].as_str().unwrap_or_default().to_string())
            }
            _ => Err(bad("`prompt` must be a string (or a list of one)")),
        }
    };
    let job = match prompt.and_then(|p| job_from(&body, p, 16)) {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let model = job.model.clone();
    let id = request_id(if chat { "chatcmpl" } else { "cmpl" });
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    if body["stream"].as_bool() != Some(true) {
        return match run_job(&state, job, id, |_| true).await {
            Ok(o) => {
                let choice = if chat {
                    json!({ "index": 0, "message": { "role": "assistant", "content": o.text },
                            "logprobs": null, "finish_reason": o.finish_reason })
                } else {
                    json!({ "index": 0, "text": o.text, "logprobs": null,
                            "finish_reason": o.finish_reason })
                };
                axum::Json(json!({
                    "id": o.id, "object": object, "created": o.created, "model": model,
                    "choices": [choice], "usage": o.usage(), "attribution": o.attribution,
                }))
                .into_response()
            }
            Err(e) => e.into_response(),
        };
    }
    // Resolve before streaming so an unknown model is a plain 404.
    if let Err(e) = resolve(&state, &model).await {
        return e.into_response();
    }
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let created = now_ms() / 1000;
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Value, extra: Option<(&str, Value)>| {
            let mut c = json!({ "id": id, "object": chunk_object, "created": created,
                                "model": model, "choices": choices });
            if let Some((k, v)) = extra {
                c[k] = v;
            }
            c
        }
    };
    tokio::spawn(async move {
        if chat {
            let _ = tx.send(chunk(
                json!([{ "index": 0, "delta": { "role": "assistant", "content": "" },
                         "logprobs": null, "finish_reason": null }]),
                None,
            ));
        }
        let tx2 = tx.clone();
        let c2 = chunk.clone();
        let result = run_job(&state, job, id, |piece| {
            let choice = if chat {
                json!([{ "index": 0, "delta": { "content": piece }, "logprobs": null,
                         "finish_reason": null }])
            } else {
                json!([{ "index": 0, "text": piece, "logprobs": null, "finish_reason": null }])
            };
            tx2.send(c2(choice, None)).is_ok()
        })
        .await;
        match result {
            Ok(o) => {
                let last = if chat {
                    json!([{ "index": 0, "delta": {}, "logprobs": null,
                             "finish_reason": o.finish_reason }])
                } else {
                    json!([{ "index": 0, "text": "", "logprobs": null,
                             "finish_reason": o.finish_reason }])
                };
                let _ = tx.send(chunk(last, None));
                let mut usage = chunk(json!([]), Some(("usage", o.usage())));
                usage["attribution"] = o.attribution;
                let _ = tx.send(usage);
            }
            Err(ApiError(_, msg)) => {
                let _ = tx.send(json!({ "error": { "message": msg, "type": "BadRequestError" } }));
            }
        }
    });
    let stream = futures::stream::unfold((rx, false), |(mut rx, ended)| async move {
        if ended {
            return None;
        }
        match rx.recv().await {
            Some(v) => Some((
                Ok::<_, std::convert::Infallible>(SseEvent::default().data(v.to_string())),
                (rx, false),
            )),
            None => Some((Ok(SseEvent::default().data("[DONE]")), (rx, true))),
        }
    });
    Sse::new(stream).into_response()
}

/// The Kafka side of the server (see [`KafkaServing`]).
async fn kafka_loop(state: Arc<AppState>, k: KafkaServing) -> Result<()> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    use std::collections::{BTreeSet, HashMap as Map};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("the Kafka request consumer")?;
    consumer.subscribe(&[&k.requests])?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &k.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()
        .context("the Kafka response producer")?;
    let consumer = Arc::new(consumer);
    // Offsets in flight per partition: commit below the smallest one still running.
    // Per partition: offsets running, and the offset committed.
    type InFlight = Map<i32, (BTreeSet<i64>, i64)>;
    let pending: Arc<Mutex<InFlight>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let m = consumer.recv().await?;
        let (partition, offset) = (m.partition(), m.offset());
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let payload = m.payload().unwrap_or_default().to_vec();
        drop(m);
        pending
            .lock()
            .expect("pending")
            .entry(partition)
            .or_insert_with(|| (BTreeSet::new(), -1))
            .0
            .insert(offset);
        let permit = slots.clone().acquire_owned().await?;
        let (state, producer, consumer, pending, k) = (
            state.clone(),
            producer.clone(),
            consumer.clone(),
            pending.clone(),
            k.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let parsed: Result<Value, ApiError> = (|| {
                let body = parse_body(&Bytes::from(payload))?;
                Ok(body)
            })();
            let request_id = parsed
                .as_ref()
                .ok()
                .and_then(|b| b["id"].as_str().map(str::to_string))
                .or(key)
                .unwrap_or_else(|| format!("kafka-{partition}-{offset}"));
            let response = match parsed {
                Ok(body) => kafka_answer(&state, &body, &request_id).await,
                Err(ApiError(_, msg)) => {
                    json!({ "error": { "message": msg, "type": "BadRequestError" } })
                }
            };
            let mut response = response;
            response["request_id"] = json!(request_id);
            let text = response.to_string();
            let sent = producer
                .send(
                    FutureRecord::to(&k.responses)
                        .key(&request_id)
                        .payload(&text),
                    Duration::from_secs(30),
                )
                .await;
            if let Err((e, _)) = sent {
                tracing::error!("response {request_id} not delivered: {e}");
                return; // not committed: answered again after a restart
            }
            let commit = {
                let mut p = pending.lock().expect("pending");
                let (running, _) = p.get_mut(&partition).expect("partition");
                running.remove(&offset);
                let upto = running.first().copied().unwrap_or(offset + 1);
                let entry = p.get_mut(&partition).expect("partition");
                (upto > entry.1).then(|| {
                    entry.1 = upto;
                    upto
                })
            };
            if let Some(upto) = commit {
                let mut tpl = TopicPartitionList::new();
                if tpl
                    .add_partition_offset(&k.requests, partition, Offset::Offset(upto))
                    .is_ok()
                {
                    let _ = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async);
                }
            }
        });
    }
}

/// A completion for a Kafka request: the HTTP response's JSON, or `{"error": …}`.
async fn kafka_answer(state: &Arc<AppState>, body: &Value, id: &str) -> Value {
    let prompt = match &body["prompt"] {
        Value::String(s) => Ok(s.clone()),
        _ => {
            chat_prompt(&body["messages"]).map_err(|_| bad("`prompt` (or `messages`) is required"))
        }
    };
    let chat = !body["prompt"].is_string();
    let job = match prompt.and_then(|p| job_from(body, p, 16)) {
        Ok(j) => j,
        Err(ApiError(_, msg)) => {
            return json!({ "error": { "message": msg, "type": "BadRequestError" } })
        }
    };
    let model = job.model.clone();
    match run_job(state, job, id.to_string(), |_| true).await {
        Ok(o) => {
            let choice = if chat {
                json!({ "index": 0, "message": { "role": "assistant", "content": o.text },
                        "finish_reason": o.finish_reason })
            } else {
                json!({ "index": 0, "text": o.text, "finish_reason": o.finish_reason })
            };
            json!({
                "id": o.id, "object": if chat { "chat.completion" } else { "text_completion" },
                "created": o.created, "model": model, "choices": [choice],
                "usage": o.usage(), "attribution": o.attribution,
            })
        }
        Err(ApiError(status, msg)) => {
            json!({ "error": { "message": msg, "code": status.as_u16() } })
        }
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let mut data = Vec::new();
    let mut bases: Vec<&Base> = state.bases.values().collect();
    bases.sort_by(|a, b| a.row.id.cmp(&b.row.id));
    for b in bases {
        data.push(json!({
            "id": b.row.id, "object": "model", "created": b.row.created_at_ms / 1000,
            "owned_by": "ledgerflow", "root": b.row.id, "parent": null,
            "max_model_len": b.max_len, "datanet": b.row.datanet,
            "generation": b.row.content_hash,
        }));
    }
    let adapters = state.adapters.read().expect("adapters");
    let resident: std::collections::HashSet<String> = state
        .cache
        .lock()
        .expect("cache")
        .resident
        .keys()
        .cloned()
        .collect();
    let mut named: Vec<&Named> = adapters.values().collect();
    named.sort_by(|a, b| a.name.cmp(&b.name));
    for n in named {
        data.push(json!({
            "id": n.name, "object": "model", "created": n.created,
            "owned_by": "ledgerflow", "root": n.name, "parent": n.parent,
            "max_model_len": state.bases[&n.parent].max_len, "datanet": n.datanet,
            "generation": n.generation, "resident": resident.contains(&n.generation),
        }));
    }
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "adapter loading is off: start the server with --api-key (or LEDGERFLOW_API_KEY)"
                .into(),
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison of the token.
    let ok = given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required".into(),
        ))
    }
}

/// vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`: `lora_path` is a registered
/// model id, a folder of the store (`models/<id>`) or a local folder with PEFT's
/// `adapter_config.json` and `adapter_model.safetensors`. Loading a name again points it at the
/// new version; requests already running keep theirs.
async fn load_lora_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        authorized(&state, &headers)?;
        let body = parse_body(&body)?;
        let name = body["lora_name"].as_str().ok_or_else(|| bad("`lora_name` is required"))?;
        let path = body["lora_path"].as_str().ok_or_else(|| bad("`lora_path` is required"))?;
        if name.is_empty() || state.bases.contains_key(name) {
            return Err(bad(format!("`{name}` cannot name an adapter")));
        }
        let (source, config_bytes, weights) = read_adapter_files(&state, path).await?;
        let config: Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("adapter_config.json: {e}")))?;
        let lora = LoraConfig::from_peft_json(&config).map_err(|e| bad(format!("adapter_config.json: {e}")))?;
        let parent = config["base_model_name_or_path"].as_str().unwrap_or_default().to_string();
        let base = state.bases.get(&parent).ok_or_else(|| {
            bad(format!("adapter_config.json: base_model_name_or_path `{parent}` is not a served base model"))
        })?;
        // Check it fits its base before the name points at it.
        let (model, l2, w2) = (base.model.clone(), lora.clone(), weights.clone());
        let device = base.device.clone();
        tokio::task::spawn_blocking(move || {
            Adapter::from_safetensors(&w2, &l2, &model, &device).map(|_| ())
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| bad(format!("the adapter does not fit {parent}: {e}")))?;
        let generation = ledgerflow_schemas::hex0x::encode(
            &ledgerflow_schemas::contribution::keccak256(&weights),
        );
        let datanet = body["datanet"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                let adapters = state.adapters.read().expect("adapters");
                adapters.get(name).map(|n| n.datanet.clone())
            })
            .unwrap_or_else(|| base.row.datanet.clone());
        let named = Named {
            name: name.to_string(),
            parent,
            datanet,
            generation: generation.clone(),
            config: lora,
            source,
            created: now_ms() / 1000,
        };
        state
            .adapters
            .write()
            .expect("adapters")
            .insert(name.to_string(), named);
        Ok::<_, ApiError>(json!({ "lora_name": name, "generation": generation }))
    }
    .await;
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn read_adapter_files(
    state: &AppState,
    path: &str,
) -> Result<(Source, Vec<u8>, Vec<u8>), ApiError> {
    let local = PathBuf::from(path);
    if local.is_absolute() && local.is_dir() {
        let read = |n: &str| {
            std::fs::read(local.join(n))
                .map_err(|e| bad(format!("{}: {e}", local.join(n).display())))
        };
        return Ok((
            Source::Local(local.clone()),
            read("adapter_config.json")?,
            read("adapter_model.safetensors")?,
        ));
    }
    let dir = if path.starts_with("models/") {
        path.trim_end_matches('/').to_string()
    } else {
        format!("models/{path}")
    };
    let get = |n: &str| {
        let p = format!("{dir}/{n}");
        async move {
            state
                .store
                .get(&p)
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map(|b| b.to_vec())
                .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{p} is not in the store")))
        }
    };
    Ok((
        Source::Store(dir.clone()),
        get("adapter_config.json").await?,
        get("adapter_model.safetensors").await?,
    ))
}

async fn unload_lora_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        authorized(&state, &headers)?;
        let body = parse_body(&body)?;
        let name = body["lora_name"]
            .as_str()
            .ok_or_else(|| bad("`lora_name` is required"))?;
        let gone = state.adapters.write().expect("adapters").remove(name);
        let Some(gone) = gone else {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no adapter `{name}`"),
            ));
        };
        // Drop its memory unless another name still uses the version.
        let still = state
            .adapters
            .read()
            .expect("adapters")
            .values()
            .any(|n| n.generation == gone.generation);
        if !still {
            let mut c = state.cache.lock().expect("cache");
            if let Some(r) = c.resident.remove(&gone.generation) {
                c.bytes -= r.bytes;
            }
        }
        Ok::<_, ApiError>(json!({ "lora_name": name, "unloaded": true }))
    }
    .await;
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Prometheus text: per adapter resident/hits/misses/loads/evictions/load seconds; requests,
/// tokens, time to first token and per output token, batch rows per step.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let c = &state.counters;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_requests_total counter\nledgerflow_requests_total {}",
        g(&c.requests)
    );
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_request_errors_total counter\nledgerflow_request_errors_total {}",
        g(&c.errors)
    );
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_prompt_tokens_total counter\nledgerflow_prompt_tokens_total {}",
        g(&c.prompt_tokens)
    );
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_generation_tokens_total counter\nledgerflow_generation_tokens_total {}",
        g(&c.completion_tokens)
    );
    let _ = writeln!(out, "# TYPE ledgerflow_time_to_first_token_seconds summary\nledgerflow_time_to_first_token_seconds_sum {}\nledgerflow_time_to_first_token_seconds_count {}", g(&c.ttft_us) as f64 / 1e6, g(&c.ttft_count));
    let _ = writeln!(out, "# TYPE ledgerflow_time_per_output_token_seconds summary\nledgerflow_time_per_output_token_seconds_sum {}\nledgerflow_time_per_output_token_seconds_count {}", g(&c.tpot_us) as f64 / 1e6, g(&c.tpot_count));
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_engine_steps_total counter\nledgerflow_engine_steps_total {}",
        g(&c.steps)
    );
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_engine_step_rows_total counter\nledgerflow_engine_step_rows_total {}",
        g(&c.step_rows)
    );
    let _ = writeln!(out, "# TYPE ledgerflow_engine_step_adapters_total counter\nledgerflow_engine_step_adapters_total {}", g(&c.step_adapters));
    let cache = state.cache.lock().expect("cache");
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_adapter_resident_bytes gauge\nledgerflow_adapter_resident_bytes {}",
        cache.bytes
    );
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_adapter_budget_bytes gauge\nledgerflow_adapter_budget_bytes {}",
        state.budget
    );
    let mut loads: Vec<f64> = cache.recent_loads.iter().copied().collect();
    loads.sort_by(f64::total_cmp);
    let _ = writeln!(out, "# TYPE ledgerflow_adapter_load_seconds summary");
    for q in [0.5, 0.9, 0.99] {
        let v = if loads.is_empty() {
            f64::NAN
        } else {
            loads[((loads.len() - 1) as f64 * q).round() as usize]
        };
        let _ = writeln!(
            out,
            "ledgerflow_adapter_load_seconds{{quantile=\"{q}\"}} {v}"
        );
    }
    let _ = writeln!(out, "ledgerflow_adapter_load_seconds_count {}", loads.len());
    let adapters = state.adapters.read().expect("adapters");
    let mut names: Vec<&String> = adapters.keys().collect();
    names.sort();
    for (metric, kind) in [
        ("resident", "gauge"),
        ("hits_total", "counter"),
        ("misses_total", "counter"),
        ("loads_total", "counter"),
        ("evictions_total", "counter"),
        ("load_seconds_sum", "counter"),
    ] {
        let _ = writeln!(out, "# TYPE ledgerflow_adapter_{metric} {kind}");
        for name in &names {
            let s = cache.stats.get(*name);
            let v = match metric {
                "resident" => f64::from(u8::from(
                    cache.resident.contains_key(&adapters[*name].generation),
                )),
                "hits_total" => s.map_or(0, |s| s.hits) as f64,
                "misses_total" => s.map_or(0, |s| s.misses) as f64,
                "loads_total" => s.map_or(0, |s| s.loads) as f64,
                "evictions_total" => s.map_or(0, |s| s.evictions) as f64,
                _ => s.map_or(0.0, |s| s.load_seconds),
            };
            let _ = writeln!(out, "ledgerflow_adapter_{metric}{{adapter=\"{name}\"}} {v}");
        }
    }
    let _ = writeln!(
        out,
        "# TYPE ledgerflow_uptime_seconds gauge\nledgerflow_uptime_seconds {}",
        now_ms() / 1000 - state.started
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// Waits for `limit` (if any), ctrl-c or SIGTERM, whichever first.
pub async fn until(limit: Option<Duration>) {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut t) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            t.recv().await;
            return;
        }
        std::future::pending::<()>().await
    };
    let timer = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = timer => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
