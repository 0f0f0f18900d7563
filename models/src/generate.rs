//! Generation with continuous, mixed-adapter batching: sequences join and leave the running
//! batch between steps; each step runs the base projections once for the whole batch and each
//! adapter's low-rank product on its own rows ([`Rows`]), attention per row over its KV cache.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};

use crate::lora::Adapter;
use crate::model::{KvCache, LowRank, Rows, Transformer};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks a token from `logits` (greedy at temperature 0; ties go to the lowest id).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    if s.temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (((l - max) as f64) / s.temperature).exp()))
        .collect();
    let sum: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / sum;
        n += 1;
        if kept >= s.top_p {
            break;
        }
    }
    let total: f64 = probs[..n].iter().map(|p| p.1).sum();
    let mut x = rng.gen::<f64>() * total;
    for p in &probs[..n] {
        x -= p.1;
        if x <= 0.0 {
            return p.0;
        }
    }
    probs[n - 1].0
}

/// What a request hears back, in order: tokens, then one `Done` (or an `Error`).
#[derive(Debug, Clone)]
pub enum Event {
    Token(u32),
    Done(Finished),
    Error(String),
}

/// How a sequence ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// `stop` (a stop token) or `length` (max_tokens or the model's context).
    pub reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    pub total: Duration,
    /// Rows in the step batches this sequence ran in, summed (its mean batch is this over its
    /// completion tokens).
    pub batch_rows: usize,
}

/// A request for the engine. `adapter` is held for the whole sequence, so replacing an adapter
/// in the server never changes a sequence in flight.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<u32>,
    pub sampling: Sampling,
    pub adapter: Option<Arc<Adapter>>,
    /// Receives the events; returns false when nobody listens any more (the sequence stops).
    pub events: Box<dyn FnMut(Event) -> bool + Send>,
}

struct Running {
    req: Request,
    cache: KvCache,
    last: u32,
    produced: usize,
    rng: rand_chacha::ChaCha8Rng,
    started: Instant,
    first: Option<Duration>,
    batch_rows: usize,
}

/// Step statistics the engine reports after every step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub batch: usize,
    pub adapters: usize,
    pub prefills: usize,
    pub seconds: f64,
}

/// Runs requests from `rx` until every sender is gone and the batch is empty. At most
/// `max_batch` sequences run at once; new ones are prefilled one by one between steps.
pub fn run_engine(
    model: &Transformer,
    device: &Device,
    rx: Receiver<Request>,
    max_batch: usize,
    on_step: &mut dyn FnMut(StepStats),
) {
    let mut running: Vec<Running> = Vec::new();
    let mut open = true;
    loop {
        // Admit: block when idle, otherwise take what is waiting.
        while open && running.len() < max_batch.max(1) {
            let next = if running.is_empty() {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                rx.try_recv().ok()
            };
            let Some(req) = next else { break };
            let started = Instant::now();
            if let Some(r) = prefill(model, device, req, started) {
                running.push(r);
            }
        }
        if running.is_empty() {
            if !open {
                return;
            }
            continue;
        }
        let t0 = Instant::now();
        let n = running.len();
        let adapters = match step(model, device, &mut running) {
            Ok(a) => a,
            Err(e) => {
                for mut r in running.drain(..) {
                    (r.req.events)(Event::Error(e.to_string()));
                }
                continue;
            }
        };
        on_step(StepStats {
            batch: n,
            adapters,
            prefills: 0,
            seconds: t0.elapsed().as_secs_f64(),
        });
        running.retain_mut(|r| !finish_if_done(r));
    }
}

/// Runs the prompt through the model and emits the first token; `None` when the sequence
/// already ended, failed (its listener heard why) or its listener left.
fn prefill(
    model: &Transformer,
    device: &Device,
    mut req: Request,
    started: Instant,
) -> Option<Running> {
    let ctx = model.cfg.max_seq_len;
    let refuse = |req: &mut Request, e: String| {
        (req.events)(Event::Error(e));
        None
    };
    if req.prompt.is_empty() {
        return refuse(&mut req, "the prompt has no tokens".into());
    }
    if req.prompt.len() + req.max_tokens > ctx {
        let e = format!(
            "this model's maximum context length is {ctx} tokens; the request has {} prompt tokens and max_tokens {}",
            req.prompt.len(),
            req.max_tokens
        );
        return refuse(&mut req, e);
    }
    let mut cache = KvCache::default();
    let mut run = || -> Result<Vec<f32>> {
        let tokens = Tensor::from_vec(req.prompt.clone(), (1, req.prompt.len()), device)?;
        let rows = match &req.adapter {
            Some(a) => Rows::all(a.as_ref() as &dyn LowRank),
            None => Rows::base(),
        };
        model
            .forward_cached(&tokens, &mut [&mut cache], &rows)?
            .squeeze(0)?
            .to_vec1::<f32>()
    };
    let logits = match run() {
        Ok(l) => l,
        Err(e) => return refuse(&mut req, e.to_string()),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(req.sampling.seed);
    let mut r = Running {
        last: 0,
        produced: 0,
        cache,
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(0),
        started,
        first: None,
        batch_rows: 1,
        req,
    };
    if r.req.max_tokens == 0 {
        finish(&mut r, "length");
        return None;
    }
    let tok = sample(&logits, &r.req.sampling, &mut rng);
    r.rng = rng;
    r.first = Some(started.elapsed());
    if !emit(&mut r, tok) || finish_if_done(&mut r) {
        return None;
    }
    Some(r)
}

/// Sends a token (unless it is a stop token); false when the listener left.
fn emit(r: &mut Running, tok: u32) -> bool {
    r.last = tok;
    r.produced += 1;
    if r.req.stop.contains(&tok) {
        return true;
    }
    (r.req.events)(Event::Token(tok))
}

fn finish(r: &mut Running, reason: &'static str) {
    let done = Finished {
        reason,
        prompt_tokens: r.req.prompt.len(),
        completion_tokens: r.produced - usize::from(reason == "stop"),
        time_to_first_token: r.first.unwrap_or_default(),
        total: r.started.elapsed(),
        batch_rows: r.batch_rows,
    };
    (r.req.events)(Event::Done(done));
}

/// Ends the sequence when it produced a stop token or reached its length; true if it ended.
fn finish_if_done(r: &mut Running) -> bool {
    if r.produced > 0 && r.req.stop.contains(&r.last) {
        finish(r, "stop");
        true
    } else if r.produced >= r.req.max_tokens {
        // (Admission checked prompt + max_tokens against the context.)
        finish(r, "length");
        true
    } else {
        false
    }
}

/// One decoding step of every running sequence; returns the number of distinct adapters.
fn step(model: &Transformer, device: &Device, running: &mut [Running]) -> Result<usize> {
    let tokens: Vec<u32> = running.iter().map(|r| r.last).collect();
    let n = tokens.len();
    let tokens = Tensor::from_vec(tokens, (n, 1), device)?;
    // Rows grouped by adapter (the same Arc, i.e. the same loaded version).
    let mut groups: Vec<(Arc<Adapter>, Vec<u32>)> = Vec::new();
    for (i, r) in running.iter().enumerate() {
        if let Some(a) = &r.req.adapter {
            match groups.iter_mut().find(|g| Arc::ptr_eq(&g.0, a)) {
                Some(g) => g.1.push(i as u32),
                None => groups.push((a.clone(), vec![i as u32])),
            }
        }
    }
    let per_row: Vec<Option<Arc<Adapter>>> =
        running.iter().map(|r| r.req.adapter.clone()).collect();
    let rows = match groups.as_slice() {
        [] => Rows::base(),
        [(a, idx)] if idx.len() == n => Rows::all(a.as_ref() as &dyn LowRank),
        _ => Rows {
            groups: vec![],
            capture: None,
            per_row: Some(
                per_row
                    .iter()
                    .map(|a| a.as_deref().map(|a| a as &dyn LowRank))
                    .collect(),
            ),
        },
    };
    let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|r| &mut r.cache).collect();
    let logits = model.forward_cached(&tokens, &mut caches, &rows)?;
    let logits = logits.to_vec2::<f32>()?;
    for (r, l) in running.iter_mut().zip(&logits) {
        let tok = sample(l, &r.req.sampling, &mut r.rng);
        r.batch_rows += n;
        if !emit(r, tok) {
            // The listener left: end it at its length so it leaves the batch.
            r.req.max_tokens = r.produced;
        }
    }
    Ok(groups.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{safetensors_bytes, LoraConfig};
    use crate::model::{init_seeded, ModelConfig};
    use candle_nn::{VarBuilder, VarMap};

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 23,
            d_model: 16,
            n_layers: 2,
            n_heads: 2,
            d_ff: 24,
            max_seq_len: 32,
            ..Default::default()
        }
    }

    fn model(varmap: &VarMap) -> Transformer {
        init_seeded(varmap, &cfg(), 5, &crate::test_device()).unwrap();
        Transformer::new(
            &cfg(),
            VarBuilder::from_varmap(varmap, candle_core::DType::F32, &crate::test_device()),
        )
        .unwrap()
    }

    /// An adapter with random (non-zero) `B`, loaded back from its PEFT safetensors.
    fn adapter(m: &Transformer, seed: u64, targets: &[&str]) -> Arc<Adapter> {
        let lc = LoraConfig {
            rank: if seed % 2 == 0 { 2 } else { 4 },
            alpha: 8.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        };
        let vm = VarMap::new();
        Adapter::init(m, &lc, seed, &vm, &crate::test_device()).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut named: Vec<(String, candle_core::Var)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &named {
            if name.contains("lora_B") {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.3..0.3)).collect();
                var.set(&Tensor::from_vec(v, var.shape(), &crate::test_device()).unwrap())
                    .unwrap();
            }
        }
        let bytes = safetensors_bytes(&vm).unwrap();
        Arc::new(Adapter::from_safetensors(&bytes, &lc, m, &crate::test_device()).unwrap())
    }

    fn close(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Prefill + cached decoding gives the logits of a full forward pass, and a mixed batch
    /// (two adapters and the base) gives each row what it gets alone.
    #[test]
    fn cached_mixed_batches_match_full_passes() {
        let vm = VarMap::new();
        let m = model(&vm);
        let a1 = adapter(&m, 1, &["q_proj", "v_proj", "down_proj"]);
        let a2 = adapter(&m, 2, &["k_proj", "o_proj", "gate_proj", "up_proj"]);
        let seqs: [Vec<u32>; 3] = [vec![1, 5, 7, 2], vec![3, 3, 9], vec![4, 8, 15, 16, 22]];
        let adapters = [Some(a1.clone()), Some(a2.clone()), None];
        let full = |s: &[u32], a: &Option<Arc<Adapter>>| -> Vec<f32> {
            let t = Tensor::from_vec(s.to_vec(), (1, s.len()), &crate::test_device()).unwrap();
            let rows = match a {
                Some(a) => Rows::all(a.as_ref() as &dyn LowRank),
                None => Rows::base(),
            };
            let l = m.forward_rows(&t, &rows).unwrap();
            l.narrow(1, s.len() - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // Prefill all but the last two tokens of each, then two batched steps.
        let mut caches: Vec<KvCache> = vec![KvCache::default(); 3];
        for (i, s) in seqs.iter().enumerate() {
            let t = Tensor::from_vec(
                s[..s.len() - 2].to_vec(),
                (1, s.len() - 2),
                &crate::test_device(),
            )
            .unwrap();
            let rows = match &adapters[i] {
                Some(a) => Rows::all(a.as_ref() as &dyn LowRank),
                None => Rows::base(),
            };
            let l = m.forward_cached(&t, &mut [&mut caches[i]], &rows).unwrap();
            let want = full(&s[..s.len() - 2], &adapters[i]);
            assert!(close(&l.flatten_all().unwrap().to_vec1().unwrap(), &want) < 1e-4);
        }
        for back in [2usize, 1] {
            let toks: Vec<u32> = seqs.iter().map(|s| s[s.len() - back]).collect();
            let t = Tensor::from_vec(toks, (3, 1), &crate::test_device()).unwrap();
            let i0 = Tensor::from_vec(vec![0u32], 1, &crate::test_device()).unwrap();
            let i1 = Tensor::from_vec(vec![1u32], 1, &crate::test_device()).unwrap();
            let rows = if back == 2 {
                Rows {
                    groups: vec![
                        (a1.as_ref() as &dyn LowRank, Some(i0)),
                        (a2.as_ref() as &dyn LowRank, Some(i1)),
                    ],
                    per_row: None,
                    capture: None,
                }
            } else {
                // The batched form, with different ranks and targets per row.
                Rows {
                    groups: vec![],
                    capture: None,
                    per_row: Some(vec![
                        Some(a1.as_ref() as &dyn LowRank),
                        Some(a2.as_ref() as &dyn LowRank),
                        None,
                    ]),
                }
            };
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let l = m
                .forward_cached(&t, &mut refs, &rows)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (i, s) in seqs.iter().enumerate() {
                let want = full(&s[..s.len() - back + 1], &adapters[i]);
                let d = close(&l[i], &want);
                assert!(d < 1e-4, "row {i}, {back} back: {d}");
            }
        }
        // The adapters change the output (the test would pass vacuously otherwise).
        assert!(close(&full(&seqs[0], &adapters[0]), &full(&seqs[0], &None)) > 1e-3);
        assert!(close(&full(&seqs[1], &adapters[1]), &full(&seqs[1], &None)) > 1e-3);
    }

    /// The engine's continuous batching gives every request what greedy decoding of it alone
    /// gives, whatever else shares its steps.
    #[test]
    fn the_engine_matches_one_request_at_a_time() {
        let vm = VarMap::new();
        let m = model(&vm);
        let a1 = adapter(&m, 1, &["q_proj", "up_proj"]);
        let a2 = adapter(&m, 2, &["v_proj", "down_proj"]);
        let prompts: Vec<(Vec<u32>, Option<Arc<Adapter>>, usize)> = (0..9)
            .map(|i| {
                let p: Vec<u32> = (0..(2 + i % 4))
                    .map(|k| ((i * 7 + k * 3) % 22 + 1) as u32)
                    .collect();
                let a = [Some(a1.clone()), Some(a2.clone()), None][i % 3].clone();
                (p, a, 4 + i % 5)
            })
            .collect();
        let greedy = |p: &[u32], a: &Option<Arc<Adapter>>, n: usize| -> Vec<u32> {
            let mut s = p.to_vec();
            for _ in 0..n {
                let t = Tensor::from_vec(s.clone(), (1, s.len()), &crate::test_device()).unwrap();
                let rows = match a {
                    Some(a) => Rows::all(a.as_ref() as &dyn LowRank),
                    None => Rows::base(),
                };
                let l = m.forward_rows(&t, &rows).unwrap();
                let l: Vec<f32> = l
                    .narrow(1, s.len() - 1, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                s.push(sample(
                    &l,
                    &Sampling::default(),
                    &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
                ));
            }
            s[p.len()..].to_vec()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        type Heard = Arc<std::sync::Mutex<(Vec<u32>, Option<Finished>)>>;
        let outs: Vec<Heard> = (0..prompts.len()).map(|_| Default::default()).collect();
        for (i, (p, a, n)) in prompts.iter().enumerate() {
            let out = outs[i].clone();
            tx.send(Request {
                prompt: p.clone(),
                max_tokens: *n,
                stop: vec![],
                sampling: Sampling::default(),
                adapter: a.clone(),
                events: Box::new(move |e| {
                    let mut o = out.lock().unwrap();
                    match e {
                        Event::Token(t) => o.0.push(t),
                        Event::Done(f) => o.1 = Some(f),
                        Event::Error(e) => panic!("{e}"),
                    }
                    true
                }),
            })
            .unwrap();
        }
        drop(tx);
        let mut widest = 0;
        run_engine(&m, &crate::test_device(), rx, 4, &mut |s| {
            widest = widest.max(s.batch)
        });
        assert_eq!(widest, 4);
        for (i, (p, a, n)) in prompts.iter().enumerate() {
            let o = outs[i].lock().unwrap();
            assert_eq!(o.0, greedy(p, a, *n), "request {i}");
            let f = o.1.as_ref().unwrap();
            assert_eq!(
                (f.reason, f.completion_tokens, f.prompt_tokens),
                ("length", *n, p.len())
            );
        }
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let logits = [0.0f32, 3.0, 2.9, -5.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.6,
            seed: 3,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let picks: Vec<u32> = (0..200).map(|_| sample(&logits, &s, &mut rng)).collect();
        assert!(picks.iter().all(|&p| p == 1 || p == 2), "{picks:?}");
        assert!(picks.contains(&1) && picks.contains(&2));
        let mut again = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert_eq!(
            picks,
            (0..200)
                .map(|_| sample(&logits, &s, &mut again))
                .collect::<Vec<_>>()
        );
        assert_eq!(sample(&logits, &Sampling::default(), &mut again), 1);
    }
}
