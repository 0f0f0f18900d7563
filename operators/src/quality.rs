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
    // Most texts are ASCII: then bytes are characters, whitespace is six bytes, and the scans
    // below go by bytes.
    let ascii = text.is_ascii();
    let words = split_words(text, ascii);
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
    if memchr::memchr(b'{', text.as_bytes()).is_some() {
        fire!("c4_curly_bracket", "contains `{{` (code or templates)");
    }
    if let Some(w) = words
        .iter()
        .find(|w| w.len() > 1000 && w.chars().count() > 1000)
    {
        fire!("c4_long_word", "a word of {} characters", w.chars().count());
    }
    let sentences = count_sentences(text, ascii);
    if sentences < config.min_sentences {
        fire!(
            "c4_min_sentences",
            "{sentences} sentences, fewer than {}",
            config.min_sentences
        );
    }

    // Gopher quality. One pass over the words gathers what these rules and the language fast
    // path need.
    let w = WordStats::of(&words, ascii);
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
        let b = text.as_bytes();
        let symbols = memchr::memchr_iter(b'#', b).count()
            + memchr::memmem::find_iter(b, b"...").count()
            + if ascii {
                0
            } else {
                text.matches('…').count()
            };
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
    let total_chars = if ascii {
        text.len()
    } else {
        text.chars().count()
    }
    .max(1) as f64;
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
    let paragraphs: Vec<&str> = split_paragraphs(text)
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
        if let Some(f) = repetition(&words, text.len(), &on) {
            return Some(f);
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
            let newlines = memchr::memchr_iter(b'\n', text.as_bytes()).count() as f64 / n as f64;
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
    /// `ascii`: the words are all ASCII.
    fn of(words: &[&str], ascii: bool) -> Self {
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
            let ascii = ascii || w.is_ascii();
            let t = if ascii {
                trim_ascii_non_alphanumeric(w)
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
            if ascii || t.is_ascii() {
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
    /// Letters from the rarest in English text to the most common.
    const RARE_FIRST: &[u8] = b"zqjxkvbpygfwmucldrhsnioate";
    let t = text.as_bytes();
    // The scan stops at the needle's rarest letter: in prose, few places to compare.
    let rank = |b: &u8| {
        RARE_FIRST
            .iter()
            .position(|r| r == b)
            .unwrap_or(RARE_FIRST.len())
    };
    let Some((at, &anchor)) = needle.iter().enumerate().min_by_key(|(_, b)| rank(b)) else {
        return true;
    };
    let Some(last_start) = t.len().checked_sub(needle.len()) else {
        return false;
    };
    let anchors = &t[at..=last_start + at];
    let hit = |i: usize| t[i..i + needle.len()].eq_ignore_ascii_case(needle);
    let upper = anchor.to_ascii_uppercase();
    if upper == anchor {
        memchr::memchr_iter(anchor, anchors).any(hit)
    } else {
        memchr::memchr2_iter(anchor, upper, anchors).any(hit)
    }
}

/// Sentences: terminal punctuation followed by whitespace or the end of the text.
fn count_sentences(text: &str, ascii: bool) -> usize {
    if ascii {
        let b = text.as_bytes();
        return memchr::memchr3_iter(b'.', b'!', b'?', b)
            .filter(|&i| b.get(i + 1).is_none_or(|&c| is_ascii_space(c)))
            .count();
    }
    let mut n = 0;
    let mut prev_terminal = false;
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

/// `char::is_whitespace` on an ASCII byte (vertical tab included).
fn is_ascii_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// `text.split_whitespace()`, by bytes when the text is ASCII.
fn split_words(text: &str, ascii: bool) -> Vec<&str> {
    if !ascii {
        return text.split_whitespace().collect();
    }
    let b = text.as_bytes();
    let mut words = Vec::with_capacity(b.len() / 5);
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && is_ascii_space(b[i]) {
            i += 1;
        }
        let start = i;
        while i < b.len() && !is_ascii_space(b[i]) {
            i += 1;
        }
        if i > start {
            words.push(&text[start..i]);
        }
    }
    words
}

/// `w.trim_matches(|c: char| !c.is_ascii_alphanumeric())` for an ASCII word.
fn trim_ascii_non_alphanumeric(w: &str) -> &str {
    let b = w.as_bytes();
    let Some(start) = b.iter().position(u8::is_ascii_alphanumeric) else {
        return "";
    };
    let end = b
        .iter()
        .rposition(u8::is_ascii_alphanumeric)
        .unwrap_or(start);
    &w[start..=end]
}

/// `text.split("\n\n")`.
fn split_paragraphs(text: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    memchr::memmem::find_iter(text.as_bytes(), b"\n\n")
        .map(Some)
        .chain([None])
        .map(move |at| {
            let end = at.unwrap_or(text.len());
            let p = &text[start..end];
            start = end + 2;
            p
        })
}

/// Items that repeat an earlier one: how many, and their characters.
fn duplicates(items: &[&str]) -> (usize, usize) {
    let mut seen = std::collections::HashSet::with_capacity_and_hasher(
        items.len(),
        xxhash_rust::xxh3::Xxh3DefaultBuilder,
    );
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

thread_local! {
    static NGRAMS: std::cell::RefCell<Ngrams> = std::cell::RefCell::default();
}

/// Gopher's repetition rules over `words` (shares of the text's `bytes`, as datatrove computes
/// them); the first that fires.
fn repetition(words: &[&str], bytes: usize, on: &impl Fn(&str) -> bool) -> Option<Fired> {
    let total = bytes.max(1) as f64;
    NGRAMS.with_borrow_mut(|g| {
        g.start(
            words
                .iter()
                .map(|w| (xxhash_rust::xxh3::xxh3_64(w.as_bytes()), w.len())),
        );
        // No longer n-gram repeats once one length has none: the remaining lengths are skipped.
        for (n, thr, rule) in [
            (2, 0.20, "gopher_rep_top_2gram"),
            (3, 0.18, "gopher_rep_top_3gram"),
            (4, 0.16, "gopher_rep_top_4gram"),
        ] {
            let repeats = g.grow();
            let share = g.top() as f64 / total;
            if share > thr && on(rule) {
                return Some(Fired {
                    rule,
                    detail: format!(
                        "the most frequent {n}-gram covers {share:.3} of the characters, more than {thr}"
                    ),
                });
            }
            if !repeats {
                return None;
            }
        }
        for (n, thr, rule) in [
            (5, 0.15, "gopher_rep_dup_5gram"),
            (6, 0.14, "gopher_rep_dup_6gram"),
            (7, 0.13, "gopher_rep_dup_7gram"),
            (8, 0.12, "gopher_rep_dup_8gram"),
            (9, 0.11, "gopher_rep_dup_9gram"),
            (10, 0.10, "gopher_rep_dup_10gram"),
        ] {
            if !g.grow() {
                return None;
            }
            let share = g.duplicated() as f64 / total;
            if share > thr && on(rule) {
                return Some(Fired {
                    rule,
                    detail: format!(
                        "repeated {n}-grams cover {share:.3} of the characters, more than {thr}"
                    ),
                });
            }
        }
        None
    })
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

    /// Counts `key` seen at position `at`; returns its slot.
    fn add(&mut self, key: u64, at: u32) -> u32 {
        let mask = self.slots.len() - 1;
        let mut i = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.1 == 0 {
                *slot = (key, 1, at);
                self.used.push(i as u32);
                return i as u32;
            }
            if slot.0 == key {
                slot.1 += 1;
                return i as u32;
            }
            i = (i + 1) & mask;
        }
    }

    fn count(&self, slot: u32) -> u32 {
        self.slots[slot as usize].1
    }

    /// (count, first position) of every key counted.
    fn entries(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.used.iter().map(|&i| {
            let (_, c, at) = self.slots[i as usize];
            (c, at)
        })
    }
}

/// Gopher's repetition measures over a text's words, one n-gram length after the other
/// (datatrove's `find_top_duplicate` and `find_all_duplicate`; an n-gram is its sequence of
/// words, its characters those of its words). An n-gram can repeat only where the (n−1)-gram at
/// the same position repeats, so each length extends the hashes and counts only at the positions
/// where the previous length repeated: in prose most positions drop out after two or three words.
#[derive(Default)]
struct Ngrams {
    /// Word hashes.
    words: Vec<u64>,
    /// `ends[i]`: bytes in the words before word `i` (one more entry than words).
    ends: Vec<u32>,
    /// The n-gram length reached.
    n: usize,
    /// Positions whose n-gram occurs more than once, ascending.
    cand: Vec<u32>,
    /// The hash of the n-gram at each candidate.
    hash: Vec<u64>,
    /// The count slot of each candidate counted in the last step.
    slots: Vec<u32>,
    counts: NgramCounts,
    seen: NgramCounts,
}

impl Ngrams {
    /// Starts over on a text's words (hashes and byte lengths), at length 1 with every position a
    /// candidate.
    fn start(&mut self, words: impl Iterator<Item = (u64, usize)>) {
        self.words.clear();
        self.ends.clear();
        self.ends.push(0);
        let mut end = 0u32;
        for (h, len) in words {
            self.words.push(h);
            end = end.saturating_add(len as u32);
            self.ends.push(end);
        }
        self.n = 1;
        self.hash.clear();
        self.hash
            .extend(self.words.iter().map(|w| mix(0x243F_6A88_85A3_08D3, *w)));
        self.cand.clear();
        self.cand.extend(0..self.words.len() as u32);
    }

    /// Bytes in the `n` words from `i`.
    fn chars(&self, i: u32) -> usize {
        (self.ends[i as usize + self.n] - self.ends[i as usize]) as usize
    }

    /// Moves to n-grams one word longer; false when none of them repeats.
    fn grow(&mut self) -> bool {
        self.n += 1;
        let n = self.n;
        let len = self.words.len();
        while self.cand.last().is_some_and(|&i| i as usize + n > len) {
            self.cand.pop();
        }
        self.counts.reset(self.cand.len());
        self.slots.clear();
        for (h, &i) in self.hash.iter_mut().zip(&self.cand) {
            *h = mix(*h, self.words[i as usize + n - 1]);
            self.slots.push(self.counts.add(*h, i));
        }
        // Keep the candidates whose n-gram occurred more than once.
        let mut kept = 0;
        for j in 0..self.slots.len() {
            if self.counts.count(self.slots[j]) > 1 {
                self.cand[kept] = self.cand[j];
                self.hash[kept] = self.hash[j];
                kept += 1;
            }
        }
        self.cand.truncate(kept);
        self.hash.truncate(kept);
        kept > 0
    }

    /// The most frequent repeated n-gram's characters times its count (0 when none repeats).
    fn top(&self) -> usize {
        self.counts
            .entries()
            .filter(|(c, _)| *c > 1)
            .map(|(c, at)| c as usize * self.chars(at))
            .max()
            .unwrap_or(0)
    }

    /// Characters of repeated n-grams: scanning left to right, an n-gram seen before adds its
    /// characters and the scan jumps past it.
    fn duplicated(&mut self) -> usize {
        self.seen.reset(self.cand.len());
        let mut chars = 0;
        // The scan's next position. An n-gram that occurs once is never seen before (nor later,
        // so it need not be kept): the scan steps over it, straight to the next candidate.
        let mut next = 0;
        for (&i, &h) in self.cand.iter().zip(&self.hash) {
            if i < next {
                continue;
            }
            let slot = self.seen.add(h, i);
            if self.seen.count(slot) > 1 {
                chars += self.chars(i);
                next = i + self.n as u32;
            } else {
                next = i + 1;
            }
        }
        chars
    }
}

/// One step of an n-gram hash: the hash so far and the next word's.
fn mix(h: u64, w: u64) -> u64 {
    let h = (h.rotate_left(23) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^ (h >> 29)
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
        let stats = |text: &str| {
            WordStats::of(
                &text.split_whitespace().collect::<Vec<_>>(),
                text.is_ascii(),
            )
        };
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
            prop_assert_eq!(count_sentences(&text, true), count_sentences_by_char(&text));
        }

        /// The byte scans of ASCII texts split and trim as `str`'s methods do.
        #[test]
        fn ascii_scans_split_as_str_does(text in "[ab .\t\n\x0b\x0c\r#-]{0,120}") {
            prop_assert_eq!(split_words(&text, true), text.split_whitespace().collect::<Vec<_>>());
            prop_assert_eq!(
                split_paragraphs(&text).collect::<Vec<_>>(),
                text.split("\n\n").collect::<Vec<_>>()
            );
            for w in text.split_whitespace() {
                prop_assert_eq!(
                    trim_ascii_non_alphanumeric(w),
                    w.trim_matches(|c: char| !c.is_ascii_alphanumeric())
                );
            }
        }

        /// The pruned n-gram scan gives datatrove's measures at every length, computed here the
        /// plain way on the words themselves. Texts from a small vocabulary (many repeats).
        #[test]
        fn ngram_measures_match_the_plain_computation(
            words in proptest::collection::vec(0usize..6, 0..80)
        ) {
            let vocab = ["a", "bb", "ccc", "dddd", "ee", "f"];
            let words: Vec<&str> = words.iter().map(|&w| vocab[w]).collect();
            let mut g = Ngrams::default();
            g.start(words.iter().map(|w| (xxhash_rust::xxh3::xxh3_64(w.as_bytes()), w.len())));
            let mut stopped = false;
            for n in 2..=10 {
                let repeats = !stopped && g.grow();
                let (top, dup) = if stopped { (0, 0) } else { (g.top(), g.duplicated()) };
                prop_assert_eq!(top, plain_top(&words, n), "top {}-gram", n);
                prop_assert_eq!(dup, plain_duplicated(&words, n), "duplicated {}-grams", n);
                // Once no n-gram repeats, no longer one does.
                stopped = !repeats;
            }
        }
    }

    fn chars(gram: &[&str]) -> usize {
        gram.iter().map(|w| w.len()).sum()
    }

    /// datatrove's `find_top_duplicate`, counting only n-grams that repeat.
    fn plain_top(words: &[&str], n: usize) -> usize {
        let mut counts: std::collections::HashMap<&[&str], usize> = Default::default();
        for gram in words.windows(n) {
            *counts.entry(gram).or_default() += 1;
        }
        counts
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(g, c)| c * chars(g))
            .max()
            .unwrap_or(0)
    }

    /// datatrove's `find_all_duplicate`.
    fn plain_duplicated(words: &[&str], n: usize) -> usize {
        let mut seen = std::collections::HashSet::new();
        let (mut total, mut i) = (0, 0);
        while i + n <= words.len() {
            let gram = &words[i..i + n];
            if seen.contains(gram) {
                total += chars(gram);
                i += n;
            } else {
                seen.insert(gram);
                i += 1;
            }
        }
        total
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
