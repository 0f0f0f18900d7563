//! `ledgerflow gen contributions`: realistic, distinct, validly signed contributions, the same
//! for the same seed, with planted bad cases at chosen rates.
//!
//! Text is domain prose assembled from a grammar with large slot vocabularies, so two
//! contributions share few word 5-grams; it passes common quality rules (stop words, mean word
//! length, sentence punctuation, no bullets). Signatures come from [test wallets](crate::wallet).

use std::io::Write;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use ledgerflow_schemas::contribution::{Contribution, SigningDomain};
use ledgerflow_schemas::hex0x;

use crate::wallet::TestWallet;
use ledgerflow_operators::quality::{check_text, QualityConfig};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub count: u64,
    pub datanet: String,
    pub seed: u64,
    /// Distinct contributor wallets.
    pub contributors: u64,
    /// Target content length in bytes (approximate).
    pub content_bytes: usize,
    /// Share of lines that are not valid contribution messages (bad JSON, wrong types, …).
    pub malformed_rate: f64,
    /// First `issued_at`; each message is one second later than the previous.
    pub issued_at: u64,
    /// `expires_at - issued_at`, in seconds.
    pub valid_seconds: u64,
    pub domain: SigningDomain,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            count: 1000,
            datanet: "legal".into(),
            seed: 7,
            contributors: 1000,
            content_bytes: 1000,
            malformed_rate: 0.0,
            issued_at: 1_764_000_000,
            valid_seconds: 10 * 365 * 86_400,
            domain: SigningDomain::default(),
        }
    }
}

struct Vocab {
    subjects: &'static [&'static str],
    verbs: &'static [&'static str],
    objects: &'static [&'static str],
    adjectives: &'static [&'static str],
    places: &'static [&'static str],
    people: &'static [&'static str],
}

const LEGAL: Vocab = Vocab {
    subjects: &[
        "court",
        "tribunal",
        "appellate panel",
        "district judge",
        "arbitrator",
        "commission",
        "regulator",
        "plaintiff",
        "defendant",
        "claimant",
        "respondent",
        "trustee",
        "lessee",
        "licensor",
        "employer",
        "insurer",
        "contractor",
        "agency",
        "ministry",
        "registrar",
    ],
    verbs: &[
        "held",
        "found",
        "ruled",
        "concluded",
        "argued",
        "conceded",
        "noted",
        "determined",
        "observed",
        "decided",
        "maintained",
        "asserted",
        "acknowledged",
        "recognised",
        "emphasised",
        "clarified",
    ],
    objects: &[
        "the indemnity clause",
        "the limitation period",
        "the duty of care",
        "the arbitration agreement",
        "the termination notice",
        "the lease covenant",
        "the implied warranty",
        "the fiduciary obligation",
        "the force majeure provision",
        "the liquidated damages",
        "the jurisdiction clause",
        "the data processing addendum",
        "the non-compete covenant",
        "the easement",
        "the statutory exemption",
        "the disclosure requirement",
        "the payment schedule",
        "the confidentiality undertaking",
    ],
    adjectives: &[
        "enforceable",
        "void",
        "ambiguous",
        "reasonable",
        "material",
        "binding",
        "unconscionable",
        "severable",
        "express",
        "implied",
        "procedural",
        "substantive",
        "timely",
        "defective",
        "valid",
        "proportionate",
    ],
    places: &[
        "Delaware",
        "Ontario",
        "New South Wales",
        "Singapore",
        "Bavaria",
        "Lagos",
        "Kenya",
        "Quebec",
        "Scotland",
        "California",
        "Texas",
        "Victoria",
        "Hong Kong",
        "Dublin",
        "Rotterdam",
        "Geneva",
    ],
    people: &[
        "Alvarez",
        "Okafor",
        "Lindqvist",
        "Nakamura",
        "Brennan",
        "Haddad",
        "Petrov",
        "Moreau",
        "Castellano",
        "Whitfield",
        "Adeyemi",
        "Kowalski",
        "Fitzgerald",
        "Tanaka",
        "Oyelaran",
        "Drummond",
    ],
};

const MEDICAL: Vocab = Vocab {
    subjects: &[
        "clinician",
        "trial team",
        "cardiologist",
        "nurse practitioner",
        "pharmacist",
        "review board",
        "oncology unit",
        "research group",
        "paediatrician",
        "surgeon",
        "radiologist",
        "epidemiologist",
        "care team",
        "laboratory",
        "registry",
        "guideline panel",
    ],
    verbs: &[
        "reported",
        "observed",
        "recommended",
        "measured",
        "documented",
        "monitored",
        "assessed",
        "confirmed",
        "questioned",
        "noted",
        "compared",
        "evaluated",
        "described",
        "reviewed",
    ],
    objects: &[
        "the dosing regimen",
        "the blood pressure target",
        "the adverse event rate",
        "the screening interval",
        "the infection control protocol",
        "the discharge criteria",
        "the imaging findings",
        "the biomarker threshold",
        "the follow-up schedule",
        "the consent procedure",
        "the renal function",
        "the sedation protocol",
        "the vaccination schedule",
        "the triage score",
    ],
    adjectives: &[
        "elevated",
        "stable",
        "significant",
        "marginal",
        "acute",
        "chronic",
        "reversible",
        "persistent",
        "mild",
        "severe",
        "transient",
        "consistent",
        "clinical",
        "early",
    ],
    places: &[
        "Leeds",
        "Toronto",
        "Melbourne",
        "Nairobi",
        "Utrecht",
        "Osaka",
        "Lyon",
        "Boston",
        "Auckland",
        "Cape Town",
        "Bergen",
        "Pune",
        "Porto",
        "Calgary",
    ],
    people: &[
        "Mensah", "Schmidt", "Rossi", "Kimura", "Dubois", "Novak", "Ibrahim", "Larsen", "Moreno",
        "Chen", "Walsh", "Singh", "Becker", "Silva",
    ],
};

const FINANCE: Vocab = Vocab {
    subjects: &[
        "analyst",
        "treasury desk",
        "auditor",
        "fund manager",
        "central bank",
        "credit committee",
        "risk officer",
        "issuer",
        "underwriter",
        "pension trustee",
        "rating agency",
        "controller",
        "broker",
        "board",
    ],
    verbs: &[
        "revised",
        "estimated",
        "reported",
        "flagged",
        "reconciled",
        "hedged",
        "projected",
        "reviewed",
        "disclosed",
        "adjusted",
        "questioned",
        "approved",
        "benchmarked",
        "stress tested",
    ],
    objects: &[
        "the liquidity buffer",
        "the yield curve",
        "the capital ratio",
        "the credit spread",
        "the revenue forecast",
        "the loan covenant",
        "the depreciation schedule",
        "the cash flow statement",
        "the dividend policy",
        "the exchange rate exposure",
        "the impairment charge",
        "the collateral haircut",
        "the coupon payment",
        "the working capital",
    ],
    adjectives: &[
        "quarterly",
        "adjusted",
        "consolidated",
        "volatile",
        "audited",
        "projected",
        "material",
        "conservative",
        "seasonal",
        "deferred",
        "nominal",
        "real",
        "prudent",
        "unhedged",
    ],
    places: &[
        "London",
        "Frankfurt",
        "Zurich",
        "Tokyo",
        "New York",
        "Sao Paulo",
        "Mumbai",
        "Johannesburg",
        "Seoul",
        "Chicago",
        "Luxembourg",
        "Toronto",
        "Sydney",
        "Paris",
    ],
    people: &[
        "Hartley", "Yamamoto", "Fischer", "Ortega", "Banerjee", "Novak", "Sorensen", "Achebe",
        "Lambert", "Moretti", "Kaplan", "Huang", "Delgado", "Keane",
    ],
};

const CONNECTIVES: &[&str] = &[
    "However,",
    "In addition,",
    "As a result,",
    "By contrast,",
    "Accordingly,",
    "Moreover,",
    "Nevertheless,",
    "In that respect,",
    "For that reason,",
    "On review,",
    "Subsequently,",
    "In practice,",
];

fn vocab(datanet: &str) -> &'static Vocab {
    match datanet {
        d if d.contains("med") || d.contains("health") || d.contains("clinic") => &MEDICAL,
        d if d.contains("fin") || d.contains("bank") || d.contains("market") => &FINANCE,
        _ => &LEGAL,
    }
}

fn pick<'a>(rng: &mut ChaCha20Rng, xs: &[&'a str]) -> &'a str {
    xs.choose(rng).copied().unwrap_or("")
}

fn sentence(rng: &mut ChaCha20Rng, v: &Vocab, out: &mut String) {
    let subj = pick(rng, v.subjects);
    let verb = pick(rng, v.verbs);
    let obj = pick(rng, v.objects);
    let adj = pick(rng, v.adjectives);
    let adj2 = pick(rng, v.adjectives);
    let place = pick(rng, v.places);
    let person = pick(rng, v.people);
    let person2 = pick(rng, v.people);
    let year = rng.gen_range(1988..=2025);
    let n = rng.gen_range(2..=97);
    let obj2 = pick(rng, v.objects);
    let s = match rng.gen_range(0..10) {
        0 => format!("The {subj} in {place} {verb} that {obj} was {adj} and that {obj2} remained {adj2}."),
        1 => format!("In {person} v. {person2} ({year}), the {subj} {verb} that {obj} had to be read with {obj2}."),
        2 => format!("{} the {subj} {verb} that {obj} was not {adj} under section {n} of the {year} rules.", pick(rng, CONNECTIVES)),
        3 => format!("According to {person}, {obj} became {adj} after {n} days, which the {subj} in {place} {verb} with some care."),
        4 => format!("The {subj} {verb} {obj} against {obj2} and found the difference {adj} in {n} of the cases reviewed."),
        5 => format!("Between {year} and {}, the {subj} {verb} that {obj} in {place} was {adj} for most of the period.", year + rng.gen_range(1..6)),
        6 => format!("{person} and {person2} {verb} that the {adj} reading of {obj} would leave {obj2} without effect."),
        7 => format!("It is {adj} that the {subj} {verb} {obj} only once, on day {n}, before the review in {place}."),
        8 => format!("{} {obj} was treated as {adj}, while {obj2} was left to the {subj} to settle with {person}.", pick(rng, CONNECTIVES)),
        _ => format!("The record from {place} shows that the {subj} {verb} {obj} in {year} and again in {}.", year + rng.gen_range(1..9)),
    };
    out.push_str(&s);
}

/// The text of one contribution: a few paragraphs of domain prose of about `target` bytes.
pub fn content(rng: &mut ChaCha20Rng, datanet: &str, target: usize) -> String {
    let v = vocab(datanet);
    let mut out = String::with_capacity(target + 200);
    let mut in_paragraph = 0;
    while out.len() < target {
        if in_paragraph > 0 {
            out.push(if in_paragraph >= rng.gen_range(3..6) {
                '\n'
            } else {
                ' '
            });
            if out.ends_with('\n') {
                out.push('\n');
                in_paragraph = 0;
            }
        }
        sentence(rng, v, &mut out);
        in_paragraph += 1;
    }
    out
}

fn malformed(rng: &mut ChaCha20Rng, good: &str) -> String {
    match rng.gen_range(0..5) {
        0 => good[..good.len() / 2].to_string(),
        1 => "this is not json at all".to_string(),
        2 => good.replacen("\"nonce\":", "\"nonce\":\"seventeen\",\"x\":", 1),
        3 => good.replacen("\"contributor\":\"0x", "\"contributor\":\"0xzz", 1),
        _ => "[1,2,3]".to_string(),
    }
}

/// Writes `opts.count` JSON lines to `out`; returns how many are valid contributions.
pub fn write_contributions(opts: &GenOptions, out: &mut dyn Write) -> std::io::Result<u64> {
    let wallets: Vec<TestWallet> = (0..opts.contributors.max(1))
        .map(|i| TestWallet::derive(opts.seed, i))
        .collect();
    let mut nonces = vec![0u64; wallets.len()];
    let separator_domain = opts.domain;
    // Texts pass the quality rules (with minimums low enough for short texts): a generated
    // contribution is refused only when it is planted as malformed.
    let quality = QualityConfig {
        min_words: 5,
        min_sentences: 1,
        ..Default::default()
    };
    let mut valid = 0u64;
    // Lines are made in chunks: text and choices serially (deterministic), signatures in parallel.
    const CHUNK: u64 = 4096;
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
    let mut i = 0u64;
    while i < opts.count {
        let n = CHUNK.min(opts.count - i);
        let mut items = Vec::with_capacity(n as usize);
        for j in 0..n {
            let w = rng.gen_range(0..wallets.len());
            nonces[w] += 1;
            let text = loop {
                let t = content(&mut rng, &opts.datanet, opts.content_bytes);
                if check_text(&t, &quality, &[whatlang::Lang::Eng]).is_none() {
                    break t;
                }
            };
            let bad = opts.malformed_rate > 0.0 && rng.gen_bool(opts.malformed_rate.min(1.0));
            let tag =
                ["contract", "ruling", "note", "memo", "summary", "opinion"][rng.gen_range(0..6)];
            items.push((w, nonces[w], text, bad, tag, i + j));
        }
        let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
        let per = items.len().div_ceil(threads);
        let lines: Vec<(String, bool, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(per.max(1))
                .map(|chunk| {
                    let wallets = &wallets;
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(w, nonce, text, bad, tag, idx)| {
                                let issued = opts.issued_at + idx;
                                let mut c = Contribution {
                                    datanet: opts.datanet.as_str().into(),
                                    contributor: hex0x::encode(&wallets[*w].address()).into(),
                                    content: text.as_str().into(),
                                    metadata: Some(serde_json::json!({
                                        "lang": "en", "kind": tag, "source": "ledgerflow-gen",
                                        "license": "CC-BY-4.0", "seq": idx
                                    })),
                                    nonce: *nonce,
                                    issued_at: issued,
                                    expires_at: issued + opts.valid_seconds,
                                    signature: "".into(),
                                };
                                let digest = c
                                    .signing_digest(&separator_domain)
                                    .expect("generated metadata canonicalises");
                                c.signature =
                                    hex0x::encode(&wallets[*w].sign_digest(&digest)).into();
                                let json =
                                    serde_json::to_string(&c).expect("contributions serialise");
                                (json, *bad, *idx)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("generator thread"))
                .collect()
        });
        for (json, bad, idx) in lines {
            if bad {
                let mut r =
                    ChaCha20Rng::seed_from_u64(opts.seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                writeln!(out, "{}", malformed(&mut r, &json))?;
            } else {
                valid += 1;
                writeln!(out, "{json}")?;
            }
        }
        i += n;
    }
    Ok(valid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledgerflow_operators::decode::{decode_message, DecodeConfig};

    #[test]
    fn deterministic_distinct_and_decodable() {
        let opts = GenOptions {
            count: 50,
            contributors: 5,
            ..Default::default()
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        assert_eq!(write_contributions(&opts, &mut a).unwrap(), 50);
        write_contributions(&opts, &mut b).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        let mut hashes = std::collections::HashSet::new();
        for line in text.lines() {
            let row = decode_message(line.as_bytes(), &DecodeConfig::default()).unwrap();
            assert!(row.content.len() >= 900, "about 1 KB of text");
            hashes.insert(row.content_hash);
        }
        assert_eq!(hashes.len(), 50);
    }

    #[test]
    fn planted_malformed_lines_are_refused() {
        let opts = GenOptions {
            count: 200,
            contributors: 3,
            malformed_rate: 0.2,
            ..Default::default()
        };
        let mut out = Vec::new();
        let valid = write_contributions(&opts, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let refused = text
            .lines()
            .filter(|l| decode_message(l.as_bytes(), &DecodeConfig::default()).is_err())
            .count() as u64;
        assert!(refused > 10);
        assert_eq!(valid + refused, 200);
    }
}

/// What `gen attributions` writes.
#[derive(Debug, Clone)]
pub struct AttributionGen {
    pub datanet: String,
    /// Distinct contributors: synthetic addresses 0…n−1 (no keys behind them; the same in
    /// every run, so runs with other seeds credit the same contributors).
    pub contributors: u64,
    pub outputs: u64,
    /// Contributions credited per output (scores summing to 1).
    pub per_output: u64,
    /// `created_at` uniformly in `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    pub seed: u64,
}

/// The synthetic address of contributor `i` (the last 20 bytes of a keccak; no key behind it).
pub fn synthetic_address(i: u64) -> [u8; 20] {
    let mut buf = b"ledgerflow synthetic contributor ".to_vec();
    buf.extend_from_slice(&i.to_be_bytes());
    let h = ledgerflow_schemas::contribution::keccak256(&buf);
    h[12..].try_into().expect("20 bytes")
}

/// Writes `attributions` rows (method `span`) for synthetic model outputs: the first rows
/// credit every contributor once, later ones random contributors; the same for the same seed.
/// Returns the number of rows.
pub async fn write_attributions(
    store: &ledgerflow_store::Store,
    opts: &AttributionGen,
) -> anyhow::Result<usize> {
    use arrow_array::{
        ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    };
    use std::sync::Arc;
    anyhow::ensure!(opts.to_ms > opts.from_ms, "--to must be after --from");
    anyhow::ensure!(
        opts.contributors > 0 && opts.per_output > 0,
        "nothing to credit"
    );
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
    let n = (opts.outputs * opts.per_output) as usize;
    let (mut out_ids, mut hashes, mut who, mut scores, mut at) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut row = 0u64;
    for o in 0..opts.outputs {
        let created = rng.gen_range(opts.from_ms..opts.to_ms);
        let weights: Vec<f64> = (0..opts.per_output)
            .map(|_| rng.gen_range(0.05..1.0))
            .collect();
        let sum: f64 = weights.iter().sum();
        for w in weights {
            let c = if row < opts.contributors {
                row
            } else {
                rng.gen_range(0..opts.contributors)
            };
            row += 1;
            out_ids.push(format!("gen-{}-{o}", opts.seed));
            let h = ledgerflow_schemas::contribution::keccak256(
                format!("{}-{row}", opts.seed).as_bytes(),
            );
            hashes.push(hex0x::encode(&h));
            who.push(hex0x::encode(&synthetic_address(c)));
            scores.push(w / sum);
            at.push(created);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(out_ids)),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            opts.datanet.as_str(),
            n,
        ))),
        Arc::new(StringArray::from(hashes)),
        Arc::new(StringArray::from(who)),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            "span", n,
        ))),
        Arc::new(Float64Array::from(scores)),
        Arc::new(TimestampMillisecondArray::from(at).with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(ledgerflow_schemas::tables::attribution_schema(), columns)?;
    crate::tokens::put_table_file(
        store,
        ledgerflow_schemas::tables::ATTRIBUTIONS_TABLE,
        &batch,
        "created_at",
        &format!("gen-{}-{}.parquet", opts.seed, opts.from_ms),
    )
    .await?;
    Ok(n)
}
