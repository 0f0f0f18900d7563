//! Text normalisation, exact-duplicate keys, and MinHash signatures with LSH banding.
//!
//! - [`normalize`]: NFC, lowercase, whitespace runs collapsed to one space, trimmed: the text an
//!   exact duplicate is judged on; [`exact_key`] is its 128-bit XXH3 (a collision among 10⁹
//!   distinct texts has probability ~10⁻²¹).
//! - [`MinHasher`]: word n-gram shingles (words are maximal runs of alphanumeric characters of
//!   the lowercased NFC text, so punctuation and spacing do not matter), each hashed to 64 bits
//!   (XXH3 of the n word hashes), then `num_perm` permutations `h ↦ a·h + b mod 2⁶⁴` (`a` odd, so
//!   each is a bijection of the 64-bit hashes) from a seeded SplitMix64, keeping the minimum of
//!   each: a 64-bit MinHash signature. FineWeb's setting is the default: 5-grams, 112 hashes,
//!   14 bands of 8 rows.
//! - [`Signature::jaccard`]: the share of equal positions, the unbiased Jaccard estimate.
//! - [`band_keys`]: one 64-bit key per band (XXH3 of the band's rows and its index): documents
//!   sharing a key are candidates, with probability `1 − (1 − sʳ)ᵇ` at Jaccard `s`.

use unicode_normalization::UnicodeNormalization;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, xxh3_64_with_seed};

/// NFC, lowercase, whitespace collapsed, trimmed.
pub fn normalize(text: &str) -> String {
    if text.is_ascii() {
        let mut out = Vec::with_capacity(text.len());
        normalize_ascii_into(text.as_bytes(), &mut out);
        return String::from_utf8(out).expect("ASCII in, ASCII out");
    }
    normalize_unicode(text)
}

/// [`normalize`] of an ASCII text, appended to `out`. ASCII is already NFC and lowercases byte
/// by byte; its whitespace (as `char`) is tab, line feed, vertical tab, form feed, carriage
/// return and space.
///
/// Eight bytes at a time where that changes nothing but case: no control byte, no two spaces
/// in a row (nor a space after whitespace), no leading space, and a last byte that is not a
/// space (so a fast step never leaves a space pending). Prose is almost all such steps.
fn normalize_ascii_into(text: &[u8], out: &mut Vec<u8>) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    /// High bit of every byte of `x` (ASCII) that is zero.
    fn zero_bytes(x: u64) -> u64 {
        !(((x & LOW7) + LOW7) | x | LOW7)
    }
    out.reserve(text.len());
    let mut any = false;
    let mut pending_space = false;
    let mut i = 0;
    while i < text.len() {
        if let Some(chunk) = text.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            // Bytes below 0x20: tab, line feed, … (ASCII only, so no borrow crosses a byte).
            let control = (w.wrapping_sub(0x20 * ONES)) & !w & HIGH;
            let spaces = zero_bytes(w ^ (0x20 * ONES));
            let starts_with_space = spaces & 0x80 != 0;
            if control == 0
                && spaces & (spaces >> 8) == 0
                && spaces >> 63 == 0
                && !(starts_with_space && (pending_space || !any))
            {
                if pending_space {
                    out.push(b' ');
                    pending_space = false;
                }
                // 'A'..='Z' gain 0x20.
                let ge_a = (w & LOW7) + (0x80 - 0x41) * ONES;
                let gt_z = (w & LOW7) + (0x80 - 0x5B) * ONES;
                let upper = (ge_a ^ gt_z) & HIGH & !w;
                out.extend_from_slice(&(w | (upper >> 2)).to_le_bytes());
                any = true;
                i += 8;
                continue;
            }
        }
        let b = text[i];
        if matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ') {
            pending_space = any;
        } else {
            if pending_space {
                out.push(b' ');
                pending_space = false;
            }
            out.push(b.to_ascii_lowercase());
            any = true;
        }
        i += 1;
    }
}

/// [`normalize`] for any text.
fn normalize_unicode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.nfc().flat_map(char::to_lowercase) {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// The exact-duplicate key of `text` within `datanet`: XXH3-128 of the datanet, a NUL, and the
/// normalised text.
pub fn exact_key(datanet: &str, normalized: &str) -> [u8; 16] {
    let mut buf = Vec::with_capacity(datanet.len() + 1 + normalized.len());
    buf.extend_from_slice(datanet.as_bytes());
    buf.push(0);
    buf.extend_from_slice(normalized.as_bytes());
    xxh3_128(&buf).to_le_bytes()
}

/// `exact_key(datanet, &normalize(text))`, an ASCII text normalised straight into the buffer
/// hashed.
pub fn exact_key_of(datanet: &str, text: &str) -> [u8; 16] {
    if !text.is_ascii() {
        return exact_key(datanet, &normalize_unicode(text));
    }
    let mut buf = Vec::with_capacity(datanet.len() + 1 + text.len());
    buf.extend_from_slice(datanet.as_bytes());
    buf.push(0);
    normalize_ascii_into(text.as_bytes(), &mut buf);
    xxh3_128(&buf).to_le_bytes()
}

/// 64-bit hashes of the words of `text` (maximal alphanumeric runs of its lowercased NFC form).
pub fn word_hashes(text: &str, out: &mut Vec<u64>) {
    out.clear();
    if text.is_ascii() {
        // Words hashed where they lie, through a lowercase copy only when they have a capital.
        let bytes = text.as_bytes();
        let mut lower = [0u8; 64];
        let mut i = 0;
        while i < bytes.len() {
            if !bytes[i].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            let start = i;
            let mut upper = false;
            while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
                upper |= bytes[i].is_ascii_uppercase();
                i += 1;
            }
            let w = &bytes[start..i];
            out.push(if !upper {
                xxh3_64(w)
            } else if w.len() <= lower.len() {
                let l = &mut lower[..w.len()];
                l.copy_from_slice(w);
                l.make_ascii_lowercase();
                xxh3_64(l)
            } else {
                xxh3_64(w.to_ascii_lowercase().as_slice())
            });
        }
        return;
    }
    word_hashes_unicode(text, out);
}

/// [`word_hashes`] for any text: NFC, lowercased, split at every character that is not
/// alphanumeric.
fn word_hashes_unicode(text: &str, out: &mut Vec<u64>) {
    let mut word = String::with_capacity(32);
    let flush = |word: &mut String, out: &mut Vec<u64>| {
        if !word.is_empty() {
            out.push(xxh3_64(word.as_bytes()));
            word.clear();
        }
    };
    for c in text.nfc().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, out);
        }
    }
    flush(&mut word, out);
}

/// Shingle hashes: one per window of `n` consecutive words (one for the whole text when it has
/// fewer than `n` words, none when it has no word).
pub fn shingle_hashes(words: &[u64], n: usize, out: &mut Vec<u64>) {
    out.clear();
    if words.is_empty() {
        return;
    }
    let n = n.max(1);
    let mut buf = [0u8; 8 * 16];
    let windows = if words.len() < n {
        1
    } else {
        words.len() - n + 1
    };
    let n = n.min(words.len()).min(16);
    for w in 0..windows {
        for (i, h) in words[w..w + n].iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&h.to_le_bytes());
        }
        out.push(xxh3_64(&buf[..n * 8]));
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A MinHash signature: the minimum of each permutation over the shingles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature(pub Vec<u64>);

impl Signature {
    /// Estimated Jaccard similarity: the share of equal positions.
    pub fn jaccard(&self, other: &Signature) -> f64 {
        estimate(&self.0, &other.0)
    }

    /// The signature as stored: the high 32 bits of each value (an equality of two truncated
    /// values that are not equal in full has probability 2⁻³², far below the estimate's noise).
    pub fn truncated(&self) -> Vec<u32> {
        self.0.iter().map(|v| (v >> 32) as u32).collect()
    }
}

/// Share of equal positions of two equally long vectors.
pub fn estimate<T: PartialEq>(a: &[T], b: &[T]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len() as f64
}

/// Makes MinHash signatures with fixed, seeded permutations.
#[derive(Debug, Clone)]
pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    ngram: usize,
    words: Vec<u64>,
    shingles: Vec<u64>,
}

impl MinHasher {
    pub fn new(num_perm: usize, ngram: usize, seed: u64) -> Self {
        let mut s = seed;
        let a = (0..num_perm).map(|_| splitmix64(&mut s) | 1).collect();
        let b = (0..num_perm).map(|_| splitmix64(&mut s)).collect();
        Self {
            a,
            b,
            ngram,
            words: Vec::new(),
            shingles: Vec::new(),
        }
    }

    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// The signature of `text`'s word n-grams.
    pub fn signature(&mut self, text: &str) -> Signature {
        let mut words = std::mem::take(&mut self.words);
        let mut shingles = std::mem::take(&mut self.shingles);
        word_hashes(text, &mut words);
        shingle_hashes(&words, self.ngram, &mut shingles);
        let sig = self.signature_of_hashes(&shingles);
        self.words = words;
        self.shingles = shingles;
        sig
    }

    /// The signature of a set given as 64-bit element hashes (repeats do not matter).
    pub fn signature_of_hashes(&self, hashes: &[u64]) -> Signature {
        let k = self.a.len();
        let mut mins = Vec::with_capacity(k.next_multiple_of(LANES));
        // Permutations in blocks of `LANES`, elements in the inner loop: a block's multipliers,
        // offsets and minimums stay in registers (one AVX-512 register each).
        for (a, b) in self.a.chunks(LANES).zip(self.b.chunks(LANES)) {
            let mut pa = [0u64; LANES];
            let mut pb = [0u64; LANES];
            pa[..a.len()].copy_from_slice(a);
            pb[..b.len()].copy_from_slice(b);
            mins.extend_from_slice(&min_block(&pa, &pb, hashes));
        }
        mins.truncate(k);
        Signature(mins)
    }
}

/// Permutations computed side by side: 8 × 64 bits, one AVX-512 register.
const LANES: usize = 8;

/// The minimum of `a·h + b` over `hashes`, for each of the block's permutations: the one
/// kernel, compiled for the best vector extension the CPU has (the results are the same bits
/// whichever runs: integer arithmetic).
#[allow(unsafe_code)]
fn min_block(a: &[u64; LANES], b: &[u64; LANES], hashes: &[u64]) -> [u64; LANES] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has the extensions `min_block_avx512` is compiled for.
            return unsafe { min_block_avx512(a, b, hashes) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above, for AVX2.
            return unsafe { min_block_avx2(a, b, hashes) };
        }
    }
    min_block_portable(a, b, hashes)
}

/// 64-bit multiplies and unsigned minimums in vector lanes: `vpmullq`, `vpminuq`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn min_block_avx512(a: &[u64; LANES], b: &[u64; LANES], hashes: &[u64]) -> [u64; LANES] {
    min_block_portable(a, b, hashes)
}

/// AVX2 has neither instruction; the compiler builds both from 32-bit multiplies and compares,
/// still ahead of scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn min_block_avx2(a: &[u64; LANES], b: &[u64; LANES], hashes: &[u64]) -> [u64; LANES] {
    min_block_portable(a, b, hashes)
}

#[inline(always)]
fn min_block_portable(a: &[u64; LANES], b: &[u64; LANES], hashes: &[u64]) -> [u64; LANES] {
    let mut m = [u64::MAX; LANES];
    for &h in hashes {
        for j in 0..LANES {
            m[j] = m[j].min(a[j].wrapping_mul(h).wrapping_add(b[j]));
        }
    }
    m
}

/// One key per band of `rows` values: documents that share any key are LSH candidates.
/// `scope` (e.g. a hash of the Datanet's name) keeps different Datanets apart.
pub fn band_keys(sig: &[u64], bands: usize, rows: usize, scope: u64) -> Vec<u64> {
    (0..bands)
        .map(|band| {
            let mut buf = Vec::with_capacity(rows * 8);
            for v in &sig[band * rows..(band + 1) * rows] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            xxh3_64_with_seed(
                &buf,
                scope ^ (band as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
        })
        .collect()
}

/// Probability that two documents of Jaccard `s` share at least one of `bands` bands of `rows`.
pub fn candidate_probability(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// Exact Jaccard similarity of two sets of hashes.
pub fn exact_jaccard(a: &[u64], b: &[u64]) -> f64 {
    use std::collections::HashSet;
    let a: HashSet<u64> = a.iter().copied().collect();
    let b: HashSet<u64> = b.iter().copied().collect();
    let union = a.union(&b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(&b).count() as f64 / union as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    proptest! {
        #[test]
        fn exact_keys_hash_the_normalised_text(text in ".{0,100}") {
            prop_assert_eq!(exact_key_of("legal", &text), exact_key("legal", &normalize(&text)));
        }

        #[test]
        fn the_ascii_word_path_equals_the_unicode_one(text in "[ -~\t\n]{0,300}") {
            let (mut fast, mut general) = (Vec::new(), Vec::new());
            word_hashes(&text, &mut fast);
            word_hashes_unicode(&text, &mut general);
            prop_assert_eq!(fast, general);
        }

        #[test]
        fn every_kernel_gives_the_portable_minimums(
            hashes in proptest::collection::vec(any::<u64>(), 0..200),
            seed in any::<u64>(),
        ) {
            let h = MinHasher::new(LANES, 5, seed);
            let a: [u64; LANES] = h.a.clone().try_into().unwrap();
            let b: [u64; LANES] = h.b.clone().try_into().unwrap();
            prop_assert_eq!(min_block(&a, &b, &hashes), min_block_portable(&a, &b, &hashes));
        }
    }

    #[test]
    fn long_capitalised_words_hash_lowercased() {
        let text = format!("{} and {}", "Ab".repeat(50), "ab".repeat(50));
        let mut h = Vec::new();
        word_hashes(&text, &mut h);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0], h[2]);
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize("  Hello\t\tWORLD \n"), "hello world");
        // "é" precomposed and decomposed normalise to the same text.
        assert_eq!(normalize("Caf\u{e9}"), normalize("Cafe\u{301}"));
        assert_eq!(
            exact_key("d", &normalize("A  b")),
            exact_key("d", &normalize("a b"))
        );
        assert_ne!(exact_key("d", "a b"), exact_key("e", "a b"));
    }

    #[test]
    fn words_ignore_punctuation_and_case() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        word_hashes("The court, held: NO.", &mut a);
        word_hashes("the court held no", &mut b);
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
    }

    /// Two sets of `n` elements sharing exactly `shared`, from `rng`.
    fn pair(rng: &mut ChaCha20Rng, n: usize, shared: usize) -> (Vec<u64>, Vec<u64>) {
        let common: Vec<u64> = (0..shared).map(|_| rng.gen()).collect();
        let mut a = common.clone();
        let mut b = common;
        a.extend((0..n - shared).map(|_| rng.gen::<u64>()));
        b.extend((0..n - shared).map(|_| rng.gen::<u64>()));
        (a, b)
    }

    /// Mean absolute error of the estimate over pairs with Jaccard spread over [0, 1].
    fn mae(num_perm: usize, pairs: usize) -> f64 {
        let mh = MinHasher::new(num_perm, 5, 7);
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut err = 0.0;
        for i in 0..pairs {
            let n = 200;
            let shared = (i * (n + 1) / pairs).min(n);
            let (a, b) = pair(&mut rng, n, shared);
            let exact = exact_jaccard(&a, &b);
            let est = mh
                .signature_of_hashes(&a)
                .jaccard(&mh.signature_of_hashes(&b));
            err += (est - exact).abs();
        }
        err / pairs as f64
    }

    #[test]
    fn estimate_accuracy() {
        // The estimate is a mean of num_perm Bernoulli(J) draws: its mean absolute error over J
        // uniform on [0, 1] is √(2/π)·(π/8)/√k ≈ 0.0296 at k = 112 and 0.0196 at k = 256.
        let e256 = mae(256, 2000);
        assert!(e256 <= 0.03, "MAE at 256 hashes: {e256}");
        let e112 = mae(112, 2000);
        assert!(e112 <= 0.0296 * 1.1, "MAE at 112 hashes: {e112}");
    }

    #[test]
    fn lsh_detection_rate_follows_the_s_curve() {
        let mh = MinHasher::new(112, 5, 3);
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        for s in [0.7, 0.8, 0.9] {
            // |A ∩ B| / |A ∪ B| = s with |A| = |B| = n: shared = 2ns / (1 + s).
            let n = 300;
            let shared = (2.0 * n as f64 * s / (1.0 + s)).round() as usize;
            let trials = 1500;
            let mut hits = 0;
            let mut exact_sum = 0.0;
            for _ in 0..trials {
                let (a, b) = pair(&mut rng, n, shared);
                exact_sum += exact_jaccard(&a, &b);
                let ka = band_keys(&mh.signature_of_hashes(&a).0, 14, 8, 0);
                let kb = band_keys(&mh.signature_of_hashes(&b).0, 14, 8, 0);
                if ka.iter().zip(&kb).any(|(x, y)| x == y) {
                    hits += 1;
                }
            }
            let rate = hits as f64 / trials as f64;
            let expect = candidate_probability(exact_sum / trials as f64, 14, 8);
            assert!(
                (rate - expect).abs() <= 0.05,
                "s = {s}: detected {rate}, the S-curve says {expect}"
            );
        }
    }

    #[test]
    fn identical_texts_have_identical_signatures() {
        let mut mh = MinHasher::new(112, 5, 1);
        let a = mh.signature("The court held that the lease was void, and that rent was due.");
        let b = mh.signature("the COURT held that the lease was void and that rent was due");
        assert_eq!(a, b);
        assert_eq!(a.jaccard(&b), 1.0);
        let c =
            mh.signature("A completely different text about the weather in the mountains today.");
        assert!(a.jaccard(&c) < 0.1);
    }

    proptest! {
        #[test]
        fn ascii_fast_path_matches_the_general_one(text in "[\\x00-\\x7f]{0,200}") {
            prop_assert_eq!(normalize(&text), normalize_unicode(&text));
            prop_assert_eq!(exact_key_of("legal", &text), exact_key("legal", &normalize_unicode(&text)));
        }

        #[test]
        fn ascii_prose_normalises_as_the_general_path_does(
            text in "([A-Za-z0-9,.]{1,9}( |  |\t|\n \r| \x0b|\x0c)?){0,80}",
        ) {
            prop_assert_eq!(normalize(&text), normalize_unicode(&text));
            let padded = format!("  {text} \n");
            prop_assert_eq!(normalize(&padded), normalize_unicode(&padded));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".*") {
            let mut mh = MinHasher::new(16, 5, 1);
            let _ = mh.signature(&text);
            let _ = normalize(&text);
        }
    }
}
