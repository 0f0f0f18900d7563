//! `quality_filter`: document-level quality and adversarial rules, language identification, and
//! PII masking.
//!
//! The rules and their default thresholds are those of datatrove's filters, which FineWeb
//! published:
//! - `limits`: word and byte bounds (`min_words` can be lowered for short-form Datanets such as
//!   Q&A pairs);
//! - `gopher_*` (Gopher quality, Rae et al. 2021): mean word length in [3, 10], symbol-to-word
//!   ratio ≤ 0.1 (`#`, `...`, `…`), ≤ 90 % of lines starting with a bullet, ≤ 30 % ending with an
//!   ellipsis, ≥ 80 % of words with a letter, ≥ 2 English stop words;
//! - `gopher_rep_*` (Gopher repetition): duplicated lines ≤ 30 % (by count) and ≤ 20 % (by
//!   characters), the same for paragraphs, the most frequent 2/3/4-gram covering ≤ 20/18/16 % of
//!   the characters, duplicated 5…10-grams covering ≤ 15…10 %;
//! - `fineweb_*` (FineWeb's own rules): ≥ 12 % of lines ending in terminal punctuation, ≤ 67 %
//!   of lines shorter than 30 characters, ≤ 1 % of characters in duplicated lines, newlines per
//!   word ≤ 0.3;
//! - `c4_*` (C4's page-level rules, without the terminal-punctuation rule): no "lorem ipsum", no
//!   `{`, no word over 1000 characters, at least `min_sentences` sentences;
//! - `language`: whatlang's detection must be in `languages` with at least
//!   `min_language_confidence`.
//!
//! A refusal's reason is `quality:<rule>`. Rules can be switched off one by one (`disable`).
//! The content a contributor signed is never rewritten by a refusal; PII masking (e-mail
//! addresses, phone numbers, IPv4 addresses) rewrites what is stored in the Datanet (the
//! `content_hash` column keeps naming the contribution as signed), and counts what it masked in
//! the `ledgerflow_pii_masked_total` metric.

use std::sync::{Arc, LazyLock};

use arrow_array::builder::StringBuilder;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use regex::Regex;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::metrics::PII_MASKED;
use crate::operator::{
    Collector, Operator, OperatorContext, OperatorError, StageEnv, StageFactory,
};
use crate::rows::{contribution_passthrough, keep_rows, Rows};
use crate::state::Decision;

/// Configuration of a `quality_filter` stage.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    /// Fewest words (Gopher: 50; lower it for Q&A pairs).
    #[serde(default = "default_min_words")]
    pub min_words: usize,
    #[serde(default = "default_max_words")]
    pub max_words: usize,
    #[serde(default)]
    pub min_bytes: usize,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// C4's sentence minimum (5 on web pages; lower it for short-form Datanets).
    #[serde(default = "default_min_sentences")]
    pub min_sentences: usize,
    /// ISO 639-3 codes whatlang may detect (e.g. `eng`); empty allows any language.
    #[serde(default)]
    pub languages: Vec<String>,
    /// Least whatlang confidence for the language check to count; below it the text passes.
    #[serde(default = "default_lang_confidence")]
    pub min_language_confidence: f64,
    /// Rules switched off, by name (e.g. `c4_min_sentences`, `gopher_rep_top_2gram`).
    #[serde(default)]
    pub disable: Vec<String>,
    /// Mask e-mail addresses, phone numbers and IPv4 addresses in stored content.
    #[serde(default = "default_true")]
    pub mask_pii: bool,
}

fn default_min_words() -> usize {
    50
}
fn default_max_words() -> usize {
    100_000
}
fn default_max_bytes() -> usize {
    1 << 20
}
fn default_min_sentences() -> usize {
    5
}
fn default_lang_confidence() -> f64 {
    0.5
}
fn default_true() -> bool {
    true
}

impl Default for QualityConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

/// Every rule name, for `disable` checks.
pub const RULES: &[&str] = &[
    "min_words",
    "max_words",
    "min_bytes",
    "max_bytes",
    "gopher_avg_word_length",
    "gopher_symbol_ratio",
    "gopher_bullet_lines",
    "gopher_ellipsis_lines",
    "gopher_alpha_words",
    "gopher_stop_words",
    "gopher_rep_dup_lines",
    "gopher_rep_dup_line_chars",
    "gopher_rep_dup_paragraphs",
    "gopher_rep_dup_paragraph_chars",
    "gopher_rep_top_2gram",
    "gopher_rep_top_3gram",
    "gopher_rep_top_4gram",
    "gopher_rep_dup_5gram",
    "gopher_rep_dup_6gram",
    "gopher_rep_dup_7gram",
    "gopher_rep_dup_8gram",
    "gopher_rep_dup_9gram",
    "gopher_rep_dup_10gram",
    "fineweb_line_punct",
    "fineweb_short_lines",
    "fineweb_char_dup",
    "fineweb_list",
    "c4_lorem_ipsum",
    "c4_curly_bracket",
    "c4_long_word",
    "c4_min_sentences",
    "language",
];

impl QualityConfig {
    pub fn check(&self) -> Result<(), String> {
        for d in &self.disable {
            if !RULES.contains(&d.as_str()) {
                return Err(format!(
                    "`disable` names an unknown rule {d:?}; rules: {}",
                    RULES.join(", ")
                ));
            }
        }
        for l in &self.languages {
            if whatlang::Lang::from_code(l).is_none() {
                return Err(format!(
                    "language {l:?} is not an ISO 639-3 code whatlang knows (e.g. \"eng\")"
                ));
            }
        }
        if self.min_words > self.max_words {
            return Err("min_words is above max_words".into());
        }
        Ok(())
    }

    fn on(&self, rule: &str) -> bool {
        !self.disable.iter().any(|d| d == rule)
    }
}

impl StageFactory for QualityConfig {
    fn output_schema(&self, inputs: &[SchemaRef]) -> Result<SchemaRef, String> {
        contribution_passthrough(inputs)
    }

    fn instantiate(&self, _: &str, _: &StageEnv) -> Result<Box<dyn Operator>, OperatorError> {
        Ok(Box::new(Quality {
            config: self.clone(),
            languages: self
                .languages
                .iter()
                .filter_map(whatlang::Lang::from_code)
                .collect(),
        }))
    }
}

/// One partition's `quality_filter`.
pub struct Quality {
    config: QualityConfig,
    languages: Vec<whatlang::Lang>,
}

/// A rule that fired: its name and what it measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub rule: &'static str,
    pub detail: String,
}

const BULLETS: &[char] = &['•', '●', '○', '▪', '◦', '-', '*', '‣', '⁃', '►'];
const TERMINAL: &[char] = &['.', '!', '?', '"', '\'', '…', '”', '’', ')', ':', ';'];

/// Checks `text` against every enabled rule; the first that fires.
pub fn check_text(
    text: &str,
    config: &QualityConfig,
    languages: &[whatlang::Lang],
) -> Option<Fired> {
    let on = |r: &str| config.on(r);
    macro_rules! fire {
        ($rule:expr, $($arg:tt)*) => {
            if on($rule) {
                return Some(Fired { rule: $rule, detail: format!($($arg)*) });
            }
        };
    }
    let bytes = text.len();
    if bytes < config.min_bytes {
        fire!(
            "min_bytes",
            "{bytes} bytes, fewer than {}",
            config.min_bytes
        );
    }
    if bytes > config.max_bytes {
        fire!("max_bytes", "{bytes} bytes, more than {}", config.max_bytes);
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let n = words.len();
    if n < config.min_words {
        fire!("min_words", "{n} words, fewer than {}", config.min_words);
    }
    if n > config.max_words {
        fire!("max_words", "{n} words, more than {}", config.max_words);
    }

    // C4 page rules.
    if contains_ignore_ascii_case(text, b"lorem ipsum") {
        fire!("c4_lorem_ipsum", "contains \"lorem ipsum\"");
    }
    if text.contains('{') {
        fire!("c4_curly_bracket", "contains `{{` (code or templates)");
    }
    if let Some(w) = words
        .iter()
        .find(|w| w.len() > 1000 && w.chars().count() > 1000)
    {
        fire!("c4_long_word", "a word of {} characters", w.chars().count());
    }
    let sentences = count_sentences(text);
    if sentences < config.min_sentences {
        fire!(
            "c4_min_sentences",
            "{sentences} sentences, fewer than {}",
            config.min_sentences
        );
    }

    // Gopher quality. One pass over the words gathers what these rules and the language fast
    // path need.
    let w = WordStats::of(&words);
    if n > 0 {
        if w.stripped > 0 {
            let avg = w.stripped_chars as f64 / w.stripped as f64;
            if !(3.0..=10.0).contains(&avg) {
                fire!(
                    "gopher_avg_word_length",
                    "mean word length {avg:.2} outside [3, 10]"
                );
            }
        }
        let symbols =
            text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
        let ratio = symbols as f64 / n as f64;
        if ratio > 0.1 {
            fire!(
                "gopher_symbol_ratio",
                "{ratio:.3} symbols (#, ...) per word, more than 0.1"
            );
        }
        let ratio = w.alpha as f64 / n as f64;
        if ratio < 0.8 {
            fire!(
                "gopher_alpha_words",
                "{ratio:.3} of words have a letter, fewer than 0.8"
            );
        }
        if w.stop < 2 {
            fire!(
                "gopher_stop_words",
                "{} stop words (the, be, to, of, and, that, have, with), fewer than 2",
                w.stop
            );
        }
    }
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !lines.is_empty() {
        let nl = lines.len() as f64;
        let bullets = lines.iter().filter(|l| l.starts_with(BULLETS)).count() as f64 / nl;
        if bullets > 0.9 {
            fire!(
                "gopher_bullet_lines",
                "{bullets:.3} of lines start with a bullet, more than 0.9"
            );
        }
        let ellipsis = lines
            .iter()
            .filter(|l| l.ends_with("...") || l.ends_with('…'))
            .count() as f64
            / nl;
        if ellipsis > 0.3 {
            fire!(
                "gopher_ellipsis_lines",
                "{ellipsis:.3} of lines end with an ellipsis, more than 0.3"
            );
        }
    }

    // Gopher repetition.
    let total_chars = text.chars().count().max(1) as f64;
    let (dup_lines, dup_line_chars) = duplicates(&lines);
    if !lines.is_empty() {
        let frac = dup_lines as f64 / lines.len() as f64;
        if frac > 0.3 {
            fire!(
                "gopher_rep_dup_lines",
                "{frac:.3} of lines are repeats, more than 0.3"
            );
        }
        let frac = dup_line_chars as f64 / total_chars;
        if frac > 0.2 {
            fire!(
                "gopher_rep_dup_line_chars",
                "{frac:.3} of characters are in repeated lines, more than 0.2"
            );
        }
    }
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if !paragraphs.is_empty() {
        let (dup, dup_chars) = duplicates(&paragraphs);
        let frac = dup as f64 / paragraphs.len() as f64;
        if frac > 0.3 {
            fire!(
                "gopher_rep_dup_paragraphs",
                "{frac:.3} of paragraphs are repeats, more than 0.3"
            );
        }
        let frac = dup_chars as f64 / total_chars;
        if frac > 0.2 {
            fire!(
                "gopher_rep_dup_paragraph_chars",
                "{frac:.3} of characters are in repeated paragraphs, more than 0.2"
            );
        }
    }
    if n > 0 {
        // Shares of the text's length, as datatrove computes them.
        let word_chars = text.len().max(1) as f64;
        let hashes: Vec<u64> = words
            .iter()
            .map(|w| xxhash_rust::xxh3::xxh3_64(w.as_bytes()))
            .collect();
        let lens: Vec<usize> = words.iter().map(|w| w.len()).collect();
        let mut scratch = NgramCounts::default();
        // A share is 0 exactly when no n-gram of that length repeats, and then no longer one
        // repeats either (its first words would): the remaining lengths are skipped.
        let mut repeats = true;
        for (g, thr, rule) in [
            (2, 0.20, "gopher_rep_top_2gram"),
            (3, 0.18, "gopher_rep_top_3gram"),
            (4, 0.16, "gopher_rep_top_4gram"),
        ] {
            if !repeats {
                break;
            }
            let share = top_ngram_share(&hashes, &lens, g, &mut scratch) / word_chars;
            repeats = share > 0.0;
            if share > thr {
                fire!(rule, "the most frequent {g}-gram covers {share:.3} of the characters, more than {thr}");
            }
        }
        for (g, thr, rule) in [
            (5, 0.15, "gopher_rep_dup_5gram"),
            (6, 0.14, "gopher_rep_dup_6gram"),
            (7, 0.13, "gopher_rep_dup_7gram"),
            (8, 0.12, "gopher_rep_dup_8gram"),
            (9, 0.11, "gopher_rep_dup_9gram"),
            (10, 0.10, "gopher_rep_dup_10gram"),
        ] {
            if !repeats {
                break;
            }
            let share = dup_ngram_chars(&hashes, &lens, g, &mut scratch) / word_chars;
            repeats = share > 0.0;
            if share > thr {
                fire!(
                    rule,
                    "repeated {g}-grams cover {share:.3} of the characters, more than {thr}"
                );
            }
        }
    }

    // FineWeb.
    if !lines.is_empty() {
        let nl = lines.len() as f64;
        let punct = lines.iter().filter(|l| l.ends_with(TERMINAL)).count() as f64 / nl;
        if punct < 0.12 {
            fire!(
                "fineweb_line_punct",
                "{punct:.3} of lines end in punctuation, fewer than 0.12"
            );
        }
        let short = lines
            .iter()
            .filter(|l| l.len() <= 30 || l.chars().count() <= 30)
            .count() as f64
            / nl;
        if short > 0.67 {
            fire!(
                "fineweb_short_lines",
                "{short:.3} of lines have 30 characters or fewer, more than 0.67"
            );
        }
        let ratio = dup_line_chars as f64 / total_chars;
        if ratio > 0.01 {
            fire!(
                "fineweb_char_dup",
                "{ratio:.3} of characters are in repeated lines, more than 0.01"
            );
        }
        if n > 0 {
            let newlines = text.matches('\n').count() as f64 / n as f64;
            if newlines > 0.3 {
                fire!(
                    "fineweb_list",
                    "{newlines:.3} newlines per word, more than 0.3 (a list)"
                );
            }
        }
    }

    // Language.
    if !languages.is_empty() && !w.plainly_english(languages) {
        if let Some(info) = whatlang::detect(text) {
            if info.confidence() >= config.min_language_confidence
                && !languages.contains(&info.lang())
            {
                fire!(
                    "language",
                    "detected {} (confidence {:.2}), allowed: {}",
                    info.lang().code(),
                    info.confidence(),
                    languages
                        .iter()
                        .map(|l| l.code())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
    None
}

/// What the word-level rules need, gathered in one pass over the whitespace-separated words.
struct WordStats {
    words: usize,
    /// Words with something left after trimming non-alphanumeric characters, and their
    /// characters.
    stripped: usize,
    stripped_chars: usize,
    /// Words containing a letter.
    alpha: usize,
    /// Trimmed words that are Gopher stop words.
    stop: usize,
    /// Trimmed words that are ASCII (the empty ones included) and English function words.
    latin: usize,
    function: usize,
}

impl WordStats {
    fn of(words: &[&str]) -> Self {
        let mut s = WordStats {
            words: words.len(),
            stripped: 0,
            stripped_chars: 0,
            alpha: 0,
            stop: 0,
            latin: 0,
            function: 0,
        };
        for w in words {
            let ascii = w.is_ascii();
            let t = if ascii {
                w.trim_matches(|c: char| !c.is_ascii_alphanumeric())
            } else {
                w.trim_matches(|c: char| !c.is_alphanumeric())
            };
            if !t.is_empty() {
                s.stripped += 1;
                s.stripped_chars += if ascii { t.len() } else { t.chars().count() };
            }
            let has_alpha = if ascii {
                w.bytes().any(|b| b.is_ascii_alphabetic())
            } else {
                w.chars().any(char::is_alphabetic)
            };
            s.alpha += usize::from(has_alpha);
            if t.is_ascii() {
                s.latin += 1;
                let mut buf = [0u8; 8];
                if t.len() < buf.len() {
                    let lower = &mut buf[..t.len()];
                    lower.copy_from_slice(t.as_bytes());
                    lower.make_ascii_lowercase();
                    s.stop += usize::from(is_stop_word(lower));
                    s.function += usize::from(is_english_function_word(lower));
                }
            }
        }
        s
    }

    /// A fast path for the language rule when English is allowed: Latin-script text in which at
    /// least a quarter of the words are English function words is English, without running
    /// whatlang's trigram models (most of the cost of the rules otherwise).
    fn plainly_english(&self, languages: &[whatlang::Lang]) -> bool {
        languages.contains(&whatlang::Lang::Eng)
            && self.words >= 8
            && self.latin * 10 >= self.words * 9
            && self.function * 4 >= self.words
    }
}

/// Gopher's stop words (the, be, to, of, and, that, have, with), given lowercase.
fn is_stop_word(w: &[u8]) -> bool {
    matches!(
        w,
        b"the" | b"be" | b"to" | b"of" | b"and" | b"that" | b"have" | b"with"
    )
}

/// English function words, given lowercase: in English prose about four words in ten are one of
/// these.
fn is_english_function_word(w: &[u8]) -> bool {
    matches!(
        w,
        b"the"
            | b"of"
            | b"and"
            | b"to"
            | b"a"
            | b"in"
            | b"that"
            | b"is"
            | b"was"
            | b"it"
            | b"for"
            | b"on"
            | b"with"
            | b"as"
            | b"by"
            | b"at"
            | b"be"
            | b"this"
            | b"had"
            | b"not"
            | b"are"
            | b"but"
            | b"from"
            | b"or"
            | b"have"
            | b"an"
            | b"they"
            | b"which"
            | b"were"
            | b"been"
            | b"has"
            | b"their"
            | b"would"
            | b"there"
            | b"its"
            | b"after"
            | b"before"
            | b"into"
            | b"than"
            | b"only"
            | b"also"
            | b"under"
            | b"between"
            | b"against"
    )
}

/// Whether `text` contains `needle` (lowercase ASCII), ignoring ASCII case: for a needle without
/// `k` this is `text.to_lowercase().contains(needle)` without the copy (the one non-ASCII
/// character that lowercases to ASCII is the Kelvin sign, to `k`).
fn contains_ignore_ascii_case(text: &str, needle: &[u8]) -> bool {
    let t = text.as_bytes();
    let Some(&first) = needle.first() else {
        return true;
    };
    let Some(last_start) = t.len().checked_sub(needle.len()) else {
        return false;
    };
    let starts = &t[..=last_start];
    let hit = |i: usize| t[i..i + needle.len()].eq_ignore_ascii_case(needle);
    let upper = first.to_ascii_uppercase();
    if upper == first {
        memchr::memchr_iter(first, starts).any(hit)
    } else {
        memchr::memchr2_iter(first, upper, starts).any(hit)
    }
}

fn count_sentences(text: &str) -> usize {
    let mut n = 0;
    let mut prev_terminal = false;
    if text.is_ascii() {
        for &b in text.as_bytes() {
            let t = matches!(b, b'.' | b'!' | b'?');
            // `char::is_whitespace` on ASCII, vertical tab included.
            if !t && prev_terminal && matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
                n += 1;
            }
            prev_terminal = t;
        }
        return n + usize::from(prev_terminal);
    }
    for c in text.chars() {
        let t = matches!(c, '.' | '!' | '?' | '。' | '！' | '？');
        if !t && prev_terminal && (c.is_whitespace()) {
            n += 1;
        }
        prev_terminal = t;
    }
    if prev_terminal {
        n += 1;
    }
    n
}

/// Items that repeat an earlier one: how many, and their characters.
fn duplicates(items: &[&str]) -> (usize, usize) {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let mut dup = 0;
    let mut chars = 0;
    for it in items {
        if !seen.insert(*it) {
            dup += 1;
            chars += it.chars().count();
        }
    }
    (dup, chars)
}

/// Counts of n-gram hashes: an open-addressing table reused across n-gram lengths and texts
/// (a text's n-grams number in the hundreds; clearing touches only the slots used).
#[derive(Default)]
struct NgramCounts {
    /// (hash, count, first position); count 0 marks an empty slot.
    slots: Vec<(u64, u32, u32)>,
    used: Vec<u32>,
}

impl NgramCounts {
    /// Empties the table and sizes it for `n` n-grams.
    fn reset(&mut self, n: usize) {
        let want = (2 * n).next_power_of_two().max(16);
        if self.slots.len() < want {
            self.slots = vec![(0, 0, 0); want];
        } else {
            for &i in &self.used {
                self.slots[i as usize].1 = 0;
            }
        }
        self.used.clear();
    }

    /// Counts `key` seen at position `at`; returns its count so far.
    fn add(&mut self, key: u64, at: usize) -> u32 {
        let mask = self.slots.len() - 1;
        let mut i = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.1 == 0 {
                *slot = (key, 1, at as u32);
                self.used.push(i as u32);
                return 1;
            }
            if slot.0 == key {
                slot.1 += 1;
                return slot.1;
            }
            i = (i + 1) & mask;
        }
    }

    /// (count, first position) of every key counted.
    fn entries(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.used.iter().map(|&i| {
            let (_, c, at) = self.slots[i as usize];
            (c as usize, at as usize)
        })
    }
}

/// The hash of the `n` words from `i` (words are given by their hashes).
fn ngram_hash(hashes: &[u64], i: usize, n: usize) -> u64 {
    let mut h = n as u64;
    for w in &hashes[i..i + n] {
        h = (h.rotate_left(23) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h ^ (h >> 29)
}

/// Characters of the most frequent repeated `n`-gram times its count (datatrove's
/// `find_top_duplicate`; n-grams are the words joined without spaces).
fn top_ngram_share(hashes: &[u64], lens: &[usize], n: usize, counts: &mut NgramCounts) -> f64 {
    if hashes.len() < n {
        return 0.0;
    }
    counts.reset(hashes.len() - n + 1);
    for i in 0..=hashes.len() - n {
        counts.add(ngram_hash(hashes, i, n), i);
    }
    // Only an n-gram that repeats counts (datatrove also counts a single occurrence, which on a
    // short text such as a Q&A pair is most of the text).
    counts
        .entries()
        .filter(|(c, _)| *c > 1)
        .map(|(c, at)| c * lens[at..at + n].iter().sum::<usize>())
        .max()
        .unwrap_or(0) as f64
}

/// Characters of repeated `n`-grams: scanning left to right, an n-gram seen before adds its
/// characters and the scan jumps past it (datatrove's `find_all_duplicate`).
fn dup_ngram_chars(hashes: &[u64], lens: &[usize], n: usize, seen: &mut NgramCounts) -> f64 {
    if hashes.len() < n {
        return 0.0;
    }
    seen.reset(hashes.len() - n + 1);
    let mut chars = 0usize;
    let mut i = 0;
    while i + n <= hashes.len() {
        if seen.add(ngram_hash(hashes, i, n), i) > 1 {
            chars += lens[i..i + n].iter().sum::<usize>();
            i += n;
        } else {
            i += 1;
        }
    }
    chars as f64
}

// ASCII classes and word boundaries (`(?-u)`): the addresses and numbers masked are ASCII, and a
// Unicode `\b` would keep the lazy DFA off any text with a non-ASCII letter (milliseconds per
// message instead of microseconds, found by fuzzing).
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i-u)\b[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}\b")
        .expect("regex")
});
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?-u)\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
    )
    .expect("regex")
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?-u)(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)[\s.\-]?|\b\d{2,4}[\s.\-])\d{3,4}[\s.\-]\d{3,4}\b",
    )
    .expect("regex")
});

/// A pattern, its placeholder and a byte scan every text it matches passes.
type PiiPattern = (&'static Regex, &'static str, fn(&[u8]) -> bool);

/// Necessary for [`EMAIL`]: an `@`.
fn may_hold_email(b: &[u8]) -> bool {
    memchr::memchr(b'@', b).is_some()
}

/// Necessary for [`IPV4`]: a `.` between two digits.
fn may_hold_ipv4(b: &[u8]) -> bool {
    memchr::memchr_iter(b'.', b)
        .any(|i| i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit())
}

/// Necessary for [`PHONE`]: three digits, a separator (`(?-u)\s`, `.` or `-`), three digits.
fn may_hold_phone(b: &[u8]) -> bool {
    let separator = |c: u8| matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | b'.' | b'-');
    let mut run = 0usize;
    for (i, &c) in b.iter().enumerate() {
        if c.is_ascii_digit() {
            run += 1;
            continue;
        }
        if run >= 3
            && separator(c)
            && b.get(i + 1..i + 4)
                .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
        {
            return true;
        }
        run = 0;
    }
    false
}

/// Replaces e-mail addresses, IPv4 addresses and phone numbers with placeholders; returns the
/// text and how many of each kind were masked (`None` when nothing was).
pub fn mask_pii(text: &str) -> Option<(String, [(&'static str, u64); 3])> {
    let mut counts = [("email", 0u64), ("ip", 0), ("phone", 0)];
    let mut out = std::borrow::Cow::Borrowed(text);
    let patterns: [PiiPattern; 3] = [
        (&EMAIL, "<EMAIL>", may_hold_email),
        (&IPV4, "<IP_ADDRESS>", may_hold_ipv4),
        (&PHONE, "<PHONE>", may_hold_phone),
    ];
    for (k, (re, placeholder, may_hold)) in patterns.into_iter().enumerate() {
        // A byte scan first: most texts cannot match a pattern at all.
        if !may_hold(out.as_bytes()) {
            continue;
        }
        let n = re.find_iter(&out).count() as u64;
        if n > 0 {
            counts[k].1 = n;
            out = std::borrow::Cow::Owned(re.replace_all(&out, placeholder).into_owned());
        }
    }
    match out {
        std::borrow::Cow::Owned(s) => Some((s, counts)),
        std::borrow::Cow::Borrowed(_) => None,
    }
}

impl Operator for Quality {
    fn process_batch(
        &mut self,
        batch: RecordBatch,
        ctx: &mut OperatorContext,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let rows = Rows::new(&batch, &ctx.stage)?;
        let mut keep = Vec::with_capacity(rows.len());
        let mut masked_any = false;
        let mut contents: Vec<Option<String>> = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let text = rows.content.value(i);
            match check_text(text, &self.config, &self.languages) {
                Some(f) => ctx.reject(rows.rejection(
                    i,
                    &Decision::reject(format!("quality:{}", f.rule), f.detail),
                    true,
                )),
                None => {
                    keep.push(i as u32);
                    let masked = if self.config.mask_pii {
                        mask_pii(text)
                    } else {
                        None
                    };
                    contents.push(masked.map(|(s, counts)| {
                        for (k, n) in counts {
                            if n > 0 {
                                ctx.count(PII_MASKED, k, n);
                            }
                        }
                        masked_any = true;
                        s
                    }));
                }
            }
        }
        let arrow_err = |source| OperatorError::Arrow {
            stage: ctx.stage.clone(),
            source,
        };
        let kept = keep_rows(&batch, &keep).map_err(arrow_err)?;
        if !masked_any {
            out.collect(kept);
            return Ok(());
        }
        let original = Rows::new(&kept, &ctx.stage)?;
        let mut b =
            StringBuilder::with_capacity(kept.num_rows(), original.content.value_data().len());
        for (i, m) in contents.iter().enumerate() {
            match m {
                Some(s) => b.append_value(s),
                None => b.append_value(original.content.value(i)),
            }
        }
        let idx = kept.schema().index_of("content").map_err(arrow_err)?;
        let mut columns: Vec<ArrayRef> = kept.columns().to_vec();
        columns[idx] = Arc::new(b.finish());
        out.collect(RecordBatch::try_new(kept.schema(), columns).map_err(arrow_err)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prose() -> String {
        "The court held that the lease was void because the landlord had not given notice. \
         In addition, the tenant argued that the deposit had to be returned with interest. \
         The appeal was dismissed and the costs were awarded to the respondent in full. \
         According to the record, the hearing took place over three days in the spring. \
         Both parties agreed that the contract had been signed before the relevant date. \
         The judge noted that the clause was ambiguous and construed it against the drafter."
            .to_string()
    }

    fn fired(text: &str, cfg: &QualityConfig) -> Option<&'static str> {
        let langs: Vec<_> = cfg
            .languages
            .iter()
            .filter_map(whatlang::Lang::from_code)
            .collect();
        check_text(text, cfg, &langs).map(|f| f.rule)
    }

    const STOP_WORDS: &[&str] = &["the", "be", "to", "of", "and", "that", "have", "with"];
    const ENGLISH_FUNCTION_WORDS: &[&str] = &[
        "the", "of", "and", "to", "a", "in", "that", "is", "was", "it", "for", "on", "with", "as",
        "by", "at", "be", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they",
        "which", "were", "been", "has", "their", "would", "there", "its", "after", "before",
        "into", "than", "only", "also", "under", "between", "against",
    ];

    #[test]
    fn word_lists_match_in_any_case_and_nothing_else() {
        let stats = |text: &str| WordStats::of(&text.split_whitespace().collect::<Vec<_>>());
        for w in STOP_WORDS {
            assert!(is_stop_word(w.as_bytes()), "{w}");
            assert_eq!(stats(&format!("({})", w.to_uppercase())).stop, 1, "{w}");
        }
        for w in ENGLISH_FUNCTION_WORDS {
            assert!(is_english_function_word(w.as_bytes()), "{w}");
            assert_eq!(stats(&format!("{w}.")).function, 1, "{w}");
        }
        for w in [
            "thee", "th", "", "withal", "bee", "an't", "agains", "betweenx", "théir",
        ] {
            assert!(!is_stop_word(w.as_bytes()) && !is_english_function_word(w.as_bytes()));
            assert_eq!(stats(w).function + stats(w).stop, 0, "{w}");
        }
        assert!(contains_ignore_ascii_case(
            "x LoReM IpSuM y",
            b"lorem ipsum"
        ));
        assert!(!contains_ignore_ascii_case("lorem  ipsum", b"lorem ipsum"));
        assert!(!contains_ignore_ascii_case("lorem", b"lorem ipsum"));
    }

    /// [`count_sentences`] without its ASCII path.
    fn count_sentences_by_char(text: &str) -> usize {
        let mut n = 0;
        let mut prev_terminal = false;
        for c in text.chars() {
            let t = matches!(c, '.' | '!' | '?' | '。' | '！' | '？');
            if !t && prev_terminal && c.is_whitespace() {
                n += 1;
            }
            prev_terminal = t;
        }
        n + usize::from(prev_terminal)
    }

    proptest! {
        #[test]
        fn ascii_sentences_count_as_by_char(text in "[a .!?\t\n\x0b\x0c\r]{0,200}") {
            prop_assert_eq!(count_sentences(&text), count_sentences_by_char(&text));
        }

        /// The repetition rules stop at the first n-gram length with no repeat: no longer n-gram
        /// can repeat then. Checked on texts from a small vocabulary (many repeats).
        #[test]
        fn no_repeat_at_one_length_means_none_at_longer_ones(
            words in proptest::collection::vec(0usize..6, 0..80)
        ) {
            let vocab = ["a", "bb", "ccc", "dddd", "ee", "f"];
            let hashes: Vec<u64> = words.iter().map(|&w| xxhash_rust::xxh3::xxh3_64(vocab[w].as_bytes())).collect();
            let lens: Vec<usize> = words.iter().map(|&w| vocab[w].len()).collect();
            let mut m = NgramCounts::default();
            let mut shares: Vec<f64> = (2..=4)
                .map(|g| top_ngram_share(&hashes, &lens, g, &mut m))
                .collect();
            shares.extend((5..=10).map(|g| dup_ngram_chars(&hashes, &lens, g, &mut m)));
            for pair in shares.windows(2) {
                prop_assert!(pair[0] > 0.0 || pair[1] == 0.0, "{shares:?}");
            }
        }
    }

    #[test]
    fn clean_prose_passes() {
        let cfg = QualityConfig {
            languages: vec!["eng".into()],
            ..Default::default()
        };
        assert_eq!(fired(&prose(), &cfg), None);
    }

    #[test]
    fn each_rule_fires_on_its_case() {
        let cfg = QualityConfig {
            languages: vec!["eng".into()],
            ..Default::default()
        };
        assert_eq!(fired("Too short. Really.", &cfg), Some("min_words"));
        let lorem = format!("{} Lorem ipsum dolor sit amet.", prose());
        assert_eq!(fired(&lorem, &cfg), Some("c4_lorem_ipsum"));
        let code = format!("{} function f() {{ return 1; }}", prose());
        assert_eq!(fired(&code, &cfg), Some("c4_curly_bracket"));
        let one_sentence = prose().replace(". ", ", ");
        assert_eq!(fired(&one_sentence, &cfg), Some("c4_min_sentences"));
        let repeated = format!("{}\n{}\n{}\n", prose(), prose(), prose());
        assert!(fired(&repeated, &cfg).unwrap().starts_with("gopher_rep"));
        let hashtags = format!("{} {}", prose(), "#tag ".repeat(40));
        assert_eq!(fired(&hashtags, &cfg), Some("gopher_symbol_ratio"));
        let numbers = format!("{} {}", prose(), "1234 5678 ".repeat(60));
        assert_eq!(fired(&numbers, &cfg), Some("gopher_alpha_words"));
        let german = "Das Gericht entschied, dass der Mietvertrag nichtig war, weil der Vermieter keine Kündigung ausgesprochen hatte. \
             Außerdem machte der Mieter geltend, dass die Kaution mit Zinsen zurückzuzahlen sei. \
             Die Berufung wurde zurückgewiesen und die Kosten wurden dem Beklagten auferlegt. \
             Laut Protokoll fand die Verhandlung an drei Tagen im Frühjahr statt und dauerte lange (the and). \
             Beide Parteien waren sich einig, dass der Vertrag vor dem maßgeblichen Datum unterzeichnet worden war. \
             Der Richter stellte fest, dass die Klausel mehrdeutig war, und legte sie gegen den Verfasser aus.";
        assert_eq!(fired(german, &cfg), Some("language"));
        let list = (0..80)
            .map(|i| format!("item {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let only_fineweb = QualityConfig {
            disable: RULES
                .iter()
                .filter(|r| !r.starts_with("fineweb"))
                .map(|r| r.to_string())
                .collect(),
            ..Default::default()
        };
        assert_eq!(fired(&list, &only_fineweb), Some("fineweb_line_punct"));
        let dup_lines = format!("{}\nSee above.\nSee above.", prose());
        assert_eq!(fired(&dup_lines, &only_fineweb), Some("fineweb_char_dup"));
    }

    #[test]
    fn short_form_datanets_lower_the_minimums() {
        let qa =
            "Q: What is the limitation period for a contract claim? A: Six years from the breach.";
        assert_eq!(fired(qa, &QualityConfig::default()), Some("min_words"));
        let short = QualityConfig {
            min_words: 5,
            min_sentences: 1,
            ..Default::default()
        };
        assert_eq!(fired(qa, &short), None);
    }

    #[test]
    fn unknown_rules_and_languages_fail_the_check() {
        let bad = QualityConfig {
            disable: vec!["gopher_typo".into()],
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("gopher_typo"));
        let bad = QualityConfig {
            languages: vec!["english".into()],
            ..Default::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn pii_is_masked_and_counted() {
        let (s, counts) = mask_pii(
            "Write to jane.doe@example.com or call +44 20 7946 0958; the server is 192.168.1.20.",
        )
        .unwrap();
        assert_eq!(
            s,
            "Write to <EMAIL> or call <PHONE>; the server is <IP_ADDRESS>."
        );
        assert_eq!(counts, [("email", 1), ("ip", 1), ("phone", 1)]);
        assert!(mask_pii("Section 12 of the 1998 rules applies.").is_none());
        // Short addresses have few digits.
        assert_eq!(
            mask_pii("host 10.0.0.1 is down").unwrap().0,
            "host <IP_ADDRESS> is down"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".*") {
            let cfg = QualityConfig { languages: vec!["eng".into()], ..Default::default() };
            let _ = fired(&text, &cfg);
            let _ = mask_pii(&text);
        }

        /// The byte scans before the patterns never skip a text a pattern matches.
        #[test]
        fn the_pii_scans_are_necessary_conditions(text in "[0-9.@ a-z\\-\t()+]{0,60}") {
            let b = text.as_bytes();
            prop_assert!(may_hold_email(b) || !EMAIL.is_match(&text));
            prop_assert!(may_hold_ipv4(b) || !IPV4.is_match(&text));
            prop_assert!(may_hold_phone(b) || !PHONE.is_match(&text));
        }

        #[test]
        fn lorem_search_equals_lowercase_contains(text in "[lLoOrReEmM iIpPsSuUK\u{212A}]{0,40}") {
            prop_assert_eq!(
                contains_ignore_ascii_case(&text, b"lorem ipsum"),
                text.to_lowercase().contains("lorem ipsum")
            );
        }

        #[test]
        fn arbitrary_bytes_as_text_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = fired(&text, &QualityConfig::default());
            let _ = mask_pii(&text);
        }
    }
}
