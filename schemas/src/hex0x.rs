//! Lowercase `0x` hex, the one spelling of addresses and hashes in every SQL-facing table.

/// `0x` followed by the lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    s.push_str(&hex::encode(bytes));
    s
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
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
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
}
