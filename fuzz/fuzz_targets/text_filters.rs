//! Any text through every quality rule (all enabled, English and a few other languages
//! allowed), PII masking, normalisation, the exact key and the MinHash signature and band keys
//! of `dedup_near`: an answer, never a panic, and the invariants the stages rely on.
#![no_main]

use ledgerflow_operators::minhash::{band_keys, exact_key, normalize, MinHasher};
use ledgerflow_operators::quality::{check_text, mask_pii, QualityConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let config = QualityConfig::default();
    let languages = [whatlang::Lang::Eng, whatlang::Lang::Deu, whatlang::Lang::Cmn];
    let _ = check_text(&text, &config, &languages);
    if let Some((masked, counts)) = mask_pii(&text) {
        assert!(counts.iter().any(|(_, n)| *n > 0), "masked text without a count");
        let _ = check_text(&masked, &config, &languages);
    }
    let normalized = normalize(&text);
    assert_eq!(normalize(&normalized), normalized, "normalize is not idempotent");
    let _ = exact_key("legal", &normalized);
    let mut hasher = MinHasher::new(112, 5, 7);
    let sig = hasher.signature(&text);
    assert_eq!(sig.0.len(), 112);
    assert_eq!(band_keys(&sig.0, 14, 8, 1).len(), 14);
});
