//! `ledgerflow gen contributions --planted RATE --manifest FILE`: a stream of contributions with
//! planted cases for the cleaning pipeline, and the decision each line must get.
//!
//! Every line is either a fresh, valid contribution (expected: accepted) or, with probability
//! `rate`, one planted case, chosen uniformly among:
//! - `duplicate_exact`: an earlier accepted text re-signed by its own contributor with a new
//!   nonce, with case and spacing changed (the normalised text is equal);
//! - `duplicate_near`: an earlier accepted text with one to three words changed near its ends, so
//!   its word 5-gram Jaccard with the original is at least 0.95 (recorded exactly);
//! - `far` (expected: accepted): an earlier accepted text whose second half is replaced, Jaccard
//!   at most 0.5 (recorded): must not be taken for a near duplicate;
//! - `signer_mismatch` (signed by another wallet) and `bad_signature` (v = 29);
//! - `replay`: an earlier accepted message sent again byte for byte;
//! - `expired`: validity window long over at the Kafka time;
//! - `flood`: a fresh text from one contributor followed by near copies from two others;
//! - `quality:min_words` (a two-sentence text) and `quality:c4_lorem_ipsum`;
//! - `malformed` / `schema`: a broken message (as [`crate::gen`] makes them);
//! - `copy_of_refused`: a planted near duplicate or quality refusal sent again, same text, by the
//!   same contributor with a new nonce: refused for the same reason as the first (a text the
//!   Datanet refused is no original, so it is not a `duplicate_exact` of anything).
//!
//! The manifest has one tab-separated line per message: line index (= Kafka offset when the
//! stream goes to one partition in order), expected reason or `accept`, the content hash of the
//! original a duplicate must point to (or `-`), and the exact Jaccard where one was planted (or
//! `-`). Decisions depend on arrival order (the first arrival wins), so a planted stream is meant
//! for a one-partition topic.

use std::collections::HashSet;
use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use ledgerflow_operators::minhash::{exact_jaccard, shingle_hashes, word_hashes};
use ledgerflow_operators::quality::{check_text, QualityConfig};
use ledgerflow_schemas::contribution::Contribution;
use ledgerflow_schemas::hex0x;

use crate::gen::{content, GenOptions};
use crate::wallet::TestWallet;

/// What was planted on one line.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub reason: String,
    pub duplicate_of: Option<String>,
    pub jaccard: Option<f64>,
}

struct Unsigned {
    wallet: usize,
    signer: usize,
    datanet: String,
    content: String,
    nonce: u64,
    issued_at: u64,
    expires_at: u64,
    seq: u64,
    bad_v: bool,
}

struct Accepted {
    wallet: usize,
    content: String,
    hash: String,
    line: String,
}

const KINDS: &[&str] = &[
    "duplicate_exact",
    "duplicate_near",
    "far",
    "signer_mismatch",
    "bad_signature",
    "replay",
    "expired",
    "flood",
    "quality:min_words",
    "quality:c4_lorem_ipsum",
    "malformed",
    "copy_of_refused",
];

fn shingles(text: &str) -> Vec<u64> {
    let (mut w, mut s) = (Vec::new(), Vec::new());
    word_hashes(text, &mut w);
    shingle_hashes(&w, 5, &mut s);
    s
}

/// Replaces `k` words at the ends of `text` (alternating last, first, second to last …).
fn tweak_ends(rng: &mut ChaCha20Rng, text: &str, k: usize) -> String {
    let mut words: Vec<String> = text.split(' ').map(str::to_string).collect();
    let n = words.len();
    const FRESH: &[&str] = &["plainly", "notably", "briefly", "fairly", "duly", "solely"];
    for j in 0..k.min(n) {
        let at = if j % 2 == 0 { n - 1 - j / 2 } else { j / 2 };
        let w = FRESH[rng.gen_range(0..FRESH.len())];
        words[at] = format!("{w}{}", rng.gen_range(10..99));
    }
    words.join(" ")
}

/// Case and spacing changed, same normalised text.
fn respace(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for (i, w) in text.split(' ').enumerate() {
        if i > 0 {
            out.push_str(if i % 7 == 0 { "  " } else { " " });
        }
        if i % 5 == 0 {
            out.push_str(&w.to_uppercase());
        } else {
            out.push_str(w);
        }
    }
    format!("  {out}\n")
}

/// Writes the stream to `out` and the expectations to `manifest`; returns how many were planted.
pub fn write_planted(
    opts: &GenOptions,
    rate: f64,
    out: &mut dyn Write,
    manifest: &mut dyn Write,
) -> std::io::Result<u64> {
    let wallets: Vec<TestWallet> = (0..opts.contributors.max(3))
        .map(|i| TestWallet::derive(opts.seed, i))
        .collect();
    let mut nonces = vec![0u64; wallets.len()];
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed ^ 0x00b1_a57e);
    let mut pool: Vec<Accepted> = Vec::new();
    let mut planted = 0u64;
    let mut seen_texts: HashSet<String> = HashSet::new();
    let mut line_no = 0u64;
    let mut pending: Vec<(Unsigned, Expected)> = Vec::new();
    // Planted refusals to send again: (wallet, text, expected).
    let mut refused: Vec<(usize, String, Expected)> = Vec::new();

    let emit = |pending: &mut Vec<(Unsigned, Expected)>,
                pool: &mut Vec<Accepted>,
                out: &mut dyn Write,
                manifest: &mut dyn Write,
                line_no: &mut u64|
     -> std::io::Result<()> {
        let signed = sign_all(&wallets, opts, pending);
        for ((u, exp), (line, hash)) in pending.drain(..).zip(signed) {
            let line = match exp.reason.as_str() {
                "malformed" => {
                    let mut r = ChaCha20Rng::seed_from_u64(u.seq);
                    if r.gen_bool(0.5) {
                        line[..line.len() / 2].to_string()
                    } else {
                        "this is not json at all".to_string()
                    }
                }
                _ => line,
            };
            let dup = exp.duplicate_of.as_deref().unwrap_or("-");
            let j = exp.jaccard.map_or("-".to_string(), |j| format!("{j:.4}"));
            writeln!(manifest, "{}\t{}\t{dup}\t{j}", *line_no, exp.reason)?;
            writeln!(out, "{line}")?;
            if exp.reason == "accept" && u.signer == u.wallet && exp.jaccard.is_none() {
                if pool.len() >= 50_000 {
                    let at = (u.seq as usize * 7919) % pool.len();
                    pool.swap_remove(at);
                }
                pool.push(Accepted {
                    wallet: u.wallet,
                    content: u.content,
                    hash,
                    line,
                });
            }
            *line_no += 1;
        }
        Ok(())
    };

    // Fresh texts pass the default quality rules, so that only planted junk is refused.
    let quality = QualityConfig::default();
    let fresh = |rng: &mut ChaCha20Rng, seen: &mut HashSet<String>| loop {
        let t = content(rng, &opts.datanet, opts.content_bytes);
        if check_text(&t, &quality, &[whatlang::Lang::Eng]).is_none() && seen.insert(t.clone()) {
            return t;
        }
    };

    let mut i = 0u64;
    while i < opts.count {
        let mut next_nonce = |w: usize| {
            nonces[w] += 1;
            nonces[w]
        };
        let issued = opts.issued_at + i;
        let unsigned = |w: usize, nonce: u64, content: String, seq: u64| Unsigned {
            wallet: w,
            signer: w,
            datanet: opts.datanet.clone(),
            content,
            nonce,
            issued_at: issued,
            expires_at: issued + opts.valid_seconds,
            seq,
            bad_v: false,
        };
        let accept = Expected {
            reason: "accept".into(),
            duplicate_of: None,
            jaccard: None,
        };
        let kind = if !pool.is_empty() && rng.gen_bool(rate.clamp(0.0, 1.0)) {
            KINDS[rng.gen_range(0..KINDS.len())]
        } else {
            "fresh"
        };
        let w = rng.gen_range(0..wallets.len());
        let pick = |rng: &mut ChaCha20Rng, pool: &Vec<Accepted>| rng.gen_range(0..pool.len());
        match kind {
            "fresh" => {
                let t = fresh(&mut rng, &mut seen_texts);
                pending.push((unsigned(w, next_nonce(w), t, i), accept));
            }
            "duplicate_exact" => {
                let d = &pool[pick(&mut rng, &pool)];
                let t = respace(&d.content);
                let hash = d.hash.clone();
                let dw = d.wallet;
                pending.push((
                    unsigned(dw, next_nonce(dw), t, i),
                    Expected {
                        reason: kind.into(),
                        duplicate_of: Some(hash),
                        jaccard: None,
                    },
                ));
            }
            "duplicate_near" | "far" => {
                let d = &pool[pick(&mut rng, &pool)];
                let (t, dw, hash) = if kind == "far" {
                    let half = d.content.len() / 2;
                    let cut = d.content[..half].rfind(' ').unwrap_or(half);
                    // The head of the original (cut at a word) and the first half of a fresh
                    // text, cut after a sentence so the last line still ends in punctuation.
                    let tail = fresh(&mut rng, &mut seen_texts);
                    let end = tail[..tail.len() / 2]
                        .rfind(". ")
                        .map_or(tail.len(), |at| at + 1);
                    let t = format!("{} {}", &d.content[..cut], &tail[..end]);
                    (t, w, d.hash.clone())
                } else {
                    let k = rng.gen_range(1..=3);
                    (
                        tweak_ends(&mut rng, &d.content, k),
                        d.wallet,
                        d.hash.clone(),
                    )
                };
                let j = exact_jaccard(&shingles(&t), &shingles(&d.content));
                let ok = if kind == "far" {
                    j <= 0.5 && check_text(&t, &quality, &[whatlang::Lang::Eng]).is_none()
                } else {
                    j >= 0.95
                };
                if !ok || !seen_texts.insert(t.clone()) {
                    continue;
                }
                let exp = if kind == "far" {
                    Expected {
                        reason: "accept".into(),
                        duplicate_of: None,
                        jaccard: Some(j),
                    }
                } else {
                    Expected {
                        reason: kind.into(),
                        duplicate_of: Some(hash),
                        jaccard: Some(j),
                    }
                };
                if kind == "duplicate_near" {
                    refused.push((dw, t.clone(), exp.clone()));
                }
                pending.push((unsigned(dw, next_nonce(dw), t, i), exp));
            }
            "signer_mismatch" | "bad_signature" => {
                let t = fresh(&mut rng, &mut seen_texts);
                let mut u = unsigned(w, next_nonce(w), t, i);
                if kind == "signer_mismatch" {
                    u.signer = (w + 1) % wallets.len();
                } else {
                    u.bad_v = true;
                }
                pending.push((
                    u,
                    Expected {
                        reason: kind.into(),
                        duplicate_of: None,
                        jaccard: None,
                    },
                ));
            }
            "replay" => {
                // Sent again byte for byte: flush what is pending first so the line exists.
                let d = pick(&mut rng, &pool);
                emit(&mut pending, &mut pool, out, manifest, &mut line_no)?;
                let d = &pool[d.min(pool.len() - 1)];
                writeln!(manifest, "{line_no}\treplay\t{}\t-", d.hash)?;
                writeln!(out, "{}", d.line)?;
                line_no += 1;
            }
            "expired" => {
                let t = fresh(&mut rng, &mut seen_texts);
                let mut u = unsigned(w, next_nonce(w), t, i);
                u.issued_at = opts.issued_at.saturating_sub(86_400 * 400);
                u.expires_at = u.issued_at + 3600;
                pending.push((
                    u,
                    Expected {
                        reason: kind.into(),
                        duplicate_of: None,
                        jaccard: None,
                    },
                ));
            }
            "flood" => {
                let t = fresh(&mut rng, &mut seen_texts);
                let first = w;
                pending.push((
                    unsigned(first, next_nonce(first), t.clone(), i),
                    accept.clone(),
                ));
                // The original's hash is known once signed; copies point to it.
                let hash =
                    hex0x::encode(&ledgerflow_schemas::contribution::keccak256(t.as_bytes()));
                for k in 1..=2usize {
                    let other = (first + k * 17) % wallets.len();
                    if other == first {
                        continue;
                    }
                    let copy = tweak_ends(&mut rng, &t, 1);
                    seen_texts.insert(copy.clone());
                    pending.push((
                        unsigned(other, next_nonce(other), copy, i),
                        Expected {
                            reason: "flood".into(),
                            duplicate_of: Some(hash.clone()),
                            jaccard: None,
                        },
                    ));
                }
            }
            "quality:min_words" => {
                // The first two sentences of a fresh text: far fewer than 50 words.
                let long = fresh(&mut rng, &mut seen_texts);
                let mut ends = long.match_indices(". ").map(|(at, _)| at + 1);
                let t = match (ends.next(), ends.next()) {
                    (Some(_), Some(second)) => long[..second].to_string(),
                    _ => long.split(' ').take(20).collect::<Vec<_>>().join(" "),
                };
                let exp = Expected {
                    reason: kind.into(),
                    duplicate_of: None,
                    jaccard: None,
                };
                refused.push((w, t.clone(), exp.clone()));
                pending.push((unsigned(w, next_nonce(w), t, i), exp));
            }
            "quality:c4_lorem_ipsum" => {
                let t = format!(
                    "{} Lorem ipsum dolor sit amet.",
                    fresh(&mut rng, &mut seen_texts)
                );
                let exp = Expected {
                    reason: kind.into(),
                    duplicate_of: None,
                    jaccard: None,
                };
                refused.push((w, t.clone(), exp.clone()));
                pending.push((unsigned(w, next_nonce(w), t, i), exp));
            }
            "copy_of_refused" => {
                if refused.is_empty() {
                    continue;
                }
                let (rw, t, exp) = refused[rng.gen_range(0..refused.len())].clone();
                pending.push((unsigned(rw, next_nonce(rw), t, i), exp));
            }
            _ => {
                let t = fresh(&mut rng, &mut seen_texts);
                pending.push((
                    unsigned(w, next_nonce(w), t, i),
                    Expected {
                        reason: "malformed".into(),
                        duplicate_of: None,
                        jaccard: None,
                    },
                ));
            }
        }
        if kind != "fresh" {
            planted += 1;
        }
        i += 1;
        // Signed in chunks; one by one at first, so the pool of originals fills.
        if pending.len() >= 4096 || pool.len() < 64 {
            emit(&mut pending, &mut pool, out, manifest, &mut line_no)?;
        }
    }
    emit(&mut pending, &mut pool, out, manifest, &mut line_no)?;
    Ok(planted)
}

/// Signs `items` on every core; returns (JSON line, content hash) in order.
fn sign_all(
    wallets: &[TestWallet],
    opts: &GenOptions,
    items: &[(Unsigned, Expected)],
) -> Vec<(String, String)> {
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let per = items.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(u, _)| {
                            let mut c = Contribution {
                                datanet: u.datanet.as_str().into(),
                                contributor: hex0x::encode(&wallets[u.wallet].address()).into(),
                                content: u.content.as_str().into(),
                                metadata: Some(serde_json::json!({
                                    "lang": "en", "source": "ledgerflow-gen-planted", "seq": u.seq
                                })),
                                nonce: u.nonce,
                                issued_at: u.issued_at,
                                expires_at: u.expires_at,
                                signature: "".into(),
                            };
                            let digest = c
                                .signing_digest(&opts.domain)
                                .expect("generated metadata canonicalises");
                            let mut sig = wallets[u.signer].sign_digest(&digest);
                            if u.bad_v {
                                sig[64] = 29;
                            }
                            c.signature = hex0x::encode(&sig).into();
                            let hash = hex0x::encode(&c.content_hash());
                            (serde_json::to_string(&c).expect("serialises"), hash)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("signing thread"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_stream_is_deterministic_and_consistent() {
        let opts = GenOptions {
            count: 3000,
            contributors: 50,
            ..Default::default()
        };
        let (mut a, mut ma) = (Vec::new(), Vec::new());
        let (mut b, mut mb) = (Vec::new(), Vec::new());
        let planted = write_planted(&opts, 0.3, &mut a, &mut ma).unwrap();
        write_planted(&opts, 0.3, &mut b, &mut mb).unwrap();
        assert_eq!((a.clone(), ma.clone()), (b, mb));
        assert!(planted > 500, "{planted}");
        let lines = String::from_utf8(a).unwrap();
        let manifest = String::from_utf8(ma).unwrap();
        assert_eq!(lines.lines().count(), manifest.lines().count());
        let mut kinds = std::collections::BTreeMap::new();
        for (n, m) in manifest.lines().enumerate() {
            let f: Vec<&str> = m.split('\t').collect();
            assert_eq!(f[0], n.to_string());
            *kinds.entry(f[1].to_string()).or_insert(0) += 1;
        }
        for k in KINDS
            .iter()
            .filter(|k| !["far", "copy_of_refused"].contains(*k))
        {
            assert!(kinds.contains_key(*k), "no {k} planted: {kinds:?}");
        }
    }
}
