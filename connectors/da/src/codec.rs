//! EigenDA's payload codec, version 0 (`PayloadEncodingVersion0`).
//!
//! An encoded payload is a whole number of 32-byte symbols, each a big-endian BN254 field
//! element, and the number of symbols is a power of two (the blob's polynomial):
//!
//! ```text
//! header (1 symbol):  0x00, version 0x00, payload length (u32 big-endian), 26 zero bytes
//! body:               0x00, 31 payload bytes, 0x00, 31 payload bytes, …   (the last chunk
//!                     zero-filled), then zero symbols up to the next power of two
//! ```
//!
//! The leading zero byte of every symbol keeps it below the BN254 scalar modulus. [`decode`] is
//! strict: it refuses a length that is not a power of two of symbols, a header that is not version
//! 0, a symbol whose guard byte is not zero, a claimed length longer than the body holds, and any
//! non-zero byte after the payload — each with a message saying which and where.

/// Bytes per symbol (a BN254 field element).
pub const SYMBOL: usize = 32;
/// Payload bytes per symbol (the first byte of each is the zero guard).
pub const CHUNK: usize = SYMBOL - 1;
/// The only encoding version there is.
pub const VERSION_0: u8 = 0;

/// Why bytes are not a version-0 encoded payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("encoded payload of {0} bytes: it must be a power of two of 32-byte symbols (32, 64, 128, …)")]
    Length(usize),
    #[error("bad header: first byte is {0:#04x}, must be 0x00")]
    HeaderGuard(u8),
    #[error("bad header: encoding version {0}, only version 0 is known")]
    Version(u8),
    #[error("bad header: bytes 6..32 must be zero, byte {0} is not")]
    HeaderPadding(usize),
    #[error(
        "bad padding: symbol {symbol} starts with {byte:#04x}, every symbol must start with 0x00"
    )]
    Guard { symbol: usize, byte: u8 },
    #[error("wrong length: the header claims {claimed} payload bytes, the body holds at most {capacity}")]
    Claimed { claimed: u32, capacity: usize },
    #[error(
        "bad padding: byte {offset} after the {claimed}-byte payload is {byte:#04x}, must be zero"
    )]
    Trailing {
        offset: usize,
        claimed: u32,
        byte: u8,
    },
    #[error("payload of {0} bytes is longer than a u32 length can say")]
    TooLong(usize),
}

/// Symbols the encoding of a `len`-byte payload takes: the header plus `ceil(len / 31)`, rounded
/// up to a power of two.
pub fn encoded_symbols(len: usize) -> usize {
    (1 + len.div_ceil(CHUNK)).next_power_of_two()
}

/// The payload bytes a blob of `symbols` symbols (a power of two) can carry.
pub fn max_payload(symbols: usize) -> usize {
    symbols.saturating_sub(1) * CHUNK
}

/// Encodes `payload` (version 0).
pub fn encode(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::TooLong(payload.len()))?;
    let mut out = vec![0u8; encoded_symbols(payload.len()) * SYMBOL];
    out[1] = VERSION_0;
    out[2..6].copy_from_slice(&len.to_be_bytes());
    for (chunk, symbol) in payload.chunks(CHUNK).zip(out[SYMBOL..].chunks_mut(SYMBOL)) {
        symbol[1..1 + chunk.len()].copy_from_slice(chunk);
    }
    Ok(out)
}

/// Decodes a version-0 encoded payload, refusing anything [`encode`] would not have produced
/// (except a longer power-of-two run of zero symbols after the payload, as a larger blob holds).
pub fn decode(encoded: &[u8]) -> Result<Vec<u8>, CodecError> {
    let symbols = encoded.len() / SYMBOL;
    if encoded.len() % SYMBOL != 0 || !symbols.is_power_of_two() {
        return Err(CodecError::Length(encoded.len()));
    }
    let header = &encoded[..SYMBOL];
    if header[0] != 0 {
        return Err(CodecError::HeaderGuard(header[0]));
    }
    if header[1] != VERSION_0 {
        return Err(CodecError::Version(header[1]));
    }
    if let Some(i) = header[6..].iter().position(|&b| b != 0) {
        return Err(CodecError::HeaderPadding(6 + i));
    }
    let claimed = u32::from_be_bytes(header[2..6].try_into().expect("4 bytes"));
    let capacity = max_payload(symbols);
    if claimed as usize > capacity {
        return Err(CodecError::Claimed { claimed, capacity });
    }
    let mut payload = Vec::with_capacity(claimed as usize);
    for (k, symbol) in encoded[SYMBOL..].chunks(SYMBOL).enumerate() {
        if symbol[0] != 0 {
            return Err(CodecError::Guard {
                symbol: k + 1,
                byte: symbol[0],
            });
        }
        let take = (claimed as usize - payload.len()).min(CHUNK);
        payload.extend_from_slice(&symbol[1..1 + take]);
        if let Some(i) = symbol[1 + take..].iter().position(|&b| b != 0) {
            return Err(CodecError::Trailing {
                offset: (k + 1) * SYMBOL + 1 + take + i,
                claimed,
                byte: symbol[1 + take + i],
            });
        }
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layr-Labs/eigenda `encoding/utils/codec` `TestGetPaddedDataLengthAgainstKnowns`: padded
    /// body lengths 30→32, 31→32, 32→64, 33→64, 68→96; with the header and the power-of-two
    /// rounding of `Payload.ToEncodedPayload` (`PayloadSizeToBlobSize`).
    #[test]
    fn upstream_known_lengths() {
        for (len, body) in [(30usize, 32usize), (31, 32), (32, 64), (33, 64), (68, 96)] {
            assert_eq!(len.div_ceil(CHUNK) * SYMBOL, body);
            let blob = (body + SYMBOL).next_power_of_two();
            assert_eq!(encode(&vec![1; len]).unwrap().len(), blob, "{len} bytes");
        }
        assert_eq!(encode(&[]).unwrap(), vec![0u8; 32]);
        // `BlobSymbolsToMaxPayloadSize`: (symbols - 1) * 31.
        assert_eq!(max_payload(1), 0);
        assert_eq!(max_payload(2), 31);
        assert_eq!(max_payload(4096), 4095 * 31);
    }

    /// The layout, byte by byte, for "hello" and a 40-byte payload.
    #[test]
    fn layout_byte_by_byte() {
        let e = encode(b"hello").unwrap();
        let mut want = vec![0u8; 64];
        want[5] = 5;
        want[33..38].copy_from_slice(b"hello");
        assert_eq!(e, want);
        let payload: Vec<u8> = (1..=40).collect();
        let e = encode(&payload).unwrap();
        assert_eq!(e.len(), 128); // header + 2 body symbols → 4
        assert_eq!(&e[..6], &[0, 0, 0, 0, 0, 40]);
        assert_eq!(e[32], 0);
        assert_eq!(&e[33..64], &payload[..31]);
        assert_eq!(e[64], 0);
        assert_eq!(&e[65..74], &payload[31..]);
        assert!(e[74..].iter().all(|&b| b == 0));
    }

    /// The Gettysburg address of upstream's `TestSimplePaddingCodec` round-trips.
    #[test]
    fn gettysburg_round_trips() {
        let text = "Fourscore and seven years ago our fathers brought forth, on this continent, a new nation, conceived in liberty, and dedicated to the proposition that all men are created equal.".repeat(9);
        let e = encode(text.as_bytes()).unwrap();
        assert!(e.chunks(32).all(|s| s[0] == 0));
        assert_eq!(decode(&e).unwrap(), text.as_bytes());
    }

    #[test]
    fn malformed_input_is_refused_with_its_reason() {
        let good = encode(b"the epoch's leaves").unwrap();
        let with = |i: usize, b: u8| {
            let mut e = good.clone();
            e[i] = b;
            decode(&e).unwrap_err()
        };
        assert_eq!(decode(&good[..63]).unwrap_err(), CodecError::Length(63));
        assert_eq!(decode(&[0u8; 96]).unwrap_err(), CodecError::Length(96));
        assert_eq!(decode(&[]).unwrap_err(), CodecError::Length(0));
        assert_eq!(with(0, 1), CodecError::HeaderGuard(1));
        assert_eq!(with(1, 1), CodecError::Version(1));
        assert_eq!(with(20, 7), CodecError::HeaderPadding(20));
        assert_eq!(
            with(32, 0x30),
            CodecError::Guard {
                symbol: 1,
                byte: 0x30
            }
        );
        assert_eq!(
            with(60, 9),
            CodecError::Trailing {
                offset: 60,
                claimed: 18,
                byte: 9
            }
        );
        assert_eq!(
            with(5, 200),
            CodecError::Claimed {
                claimed: 200,
                capacity: 31
            }
        );
        // A larger blob: more zero symbols after the payload decode to the same payload.
        let mut longer = good.clone();
        longer.resize(256, 0);
        assert_eq!(decode(&longer).unwrap(), b"the epoch's leaves");
    }

    proptest::proptest! {
        #[test]
        fn round_trips(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let e = encode(&payload).unwrap();
            proptest::prop_assert!(e.len() / SYMBOL == encoded_symbols(payload.len()));
            proptest::prop_assert!((e.len() / SYMBOL).is_power_of_two());
            proptest::prop_assert_eq!(decode(&e).unwrap(), payload);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }
    }
}
