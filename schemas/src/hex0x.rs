//! Lowercase `0x` hex, the one spelling of addresses and hashes in every SQL-facing table.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Value of each byte as a hex digit, or 0xff.
const VALUES: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// `0x` followed by the lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = Vec::with_capacity(2 + bytes.len() * 2);
    s.extend_from_slice(b"0x");
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)]);
        s.push(DIGITS[usize::from(b & 15)]);
    }
    String::from_utf8(s).expect("ASCII")
}

/// Decodes hex `digits` (any letter case, no prefix) into `out`, which must be half as long;
/// `false` if a digit is not hex or the lengths do not fit.
pub fn decode_into(digits: &[u8], out: &mut [u8]) -> bool {
    if digits.len() != out.len() * 2 {
        return false;
    }
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (VALUES[usize::from(pair[0])], VALUES[usize::from(pair[1])]);
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 15);
    }
    bad & 0xf0 == 0
}

/// Decodes `0x`-prefixed (or bare) hex of exactly `N` bytes, any letter case.
pub fn decode_fixed<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    decode_into(digits.as_bytes(), &mut out).then_some(out)
}

/// Decodes `0x`-prefixed (or bare) hex of any even length.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    hex::decode(digits).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_case() {
        assert_eq!(encode(&[0xab, 0x01]), "0xab01");
        assert_eq!(decode_fixed::<2>("0xAB01"), Some([0xab, 0x01]));
        assert_eq!(decode_fixed::<2>("0xab0"), None);
        assert_eq!(decode_fixed::<2>("0xzz01"), None);
        assert_eq!(decode("ab01"), Some(vec![0xab, 0x01]));
    }

    #[test]
    fn decoding_agrees_with_the_hex_crate_on_every_byte_pair() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let digits = [a, b];
                let mut ours = [0u8; 1];
                let mut theirs = [0u8; 1];
                let ok = decode_into(&digits, &mut ours);
                assert_eq!(
                    ok,
                    hex::decode_to_slice(digits, &mut theirs).is_ok(),
                    "{a} {b}"
                );
                if ok {
                    assert_eq!(ours, theirs);
                }
            }
        }
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(encode(&bytes)[2..], hex::encode(&bytes));
    }
}
