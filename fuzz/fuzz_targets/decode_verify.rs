//! A Kafka record value, whatever its bytes, through the decoder and, when it decodes, the
//! signature check of `verify_signatures` (EIP-712 digest with RFC 8785 metadata, recovery,
//! comparison with `contributor`): an answer, never a panic.
#![no_main]

use ledgerflow_operators::decode::{decode_message, DecodeConfig};
use ledgerflow_operators::signature::check_contribution;
use ledgerflow_schemas::contribution::{Contribution, SigningDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = DecodeConfig::default();
    let Ok(row) = decode_message(data, &config) else {
        return;
    };
    let metadata = row
        .metadata
        .as_deref()
        .map(|m| serde_json::from_str::<serde_json::Value>(m).expect("decoded metadata is JSON"));
    let c = Contribution {
        datanet: row.datanet.as_str().into(),
        contributor: row.contributor.as_str().into(),
        content: row.content.as_str().into(),
        metadata,
        nonce: row.nonce,
        issued_at: row.issued_at,
        expires_at: row.expires_at,
        signature: row.signature.as_str().into(),
    };
    let _ = check_contribution(&c, &SigningDomain::default());
});
