//! Token amounts as Solidity's `uint256`: 32 big-endian bytes, parsed from decimal (or `0x` hex)
//! without floats or rounding.

use std::fmt;

/// A `uint256` amount in the token's smallest unit, as its 32 big-endian bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Amount(pub [u8; 32]);

/// Why a text is not a `uint256`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("empty amount")]
    Empty,
    #[error("{0:?} is not a non-negative integer (decimal digits, or 0x and hex digits)")]
    NotAnInteger(String),
    #[error("{0} does not fit in a uint256")]
    Overflow(String),
}

impl Amount {
    pub const ZERO: Amount = Amount([0; 32]);

    /// Parses a decimal integer (`1234`) or a `0x` hex one, as JavaScript's `BigInt` and
    /// ethers accept them for a `uint256`.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(AmountError::Empty);
        }
        let bad = || AmountError::NotAnInteger(text.to_owned());
        let overflow = || AmountError::Overflow(text.to_owned());
        let mut out = [0u8; 32];
        if let Some(hex_digits) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            if hex_digits.is_empty() || !hex_digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let digits = hex_digits.trim_start_matches('0');
            if digits.len() > 64 {
                return Err(overflow());
            }
            let padded = format!("{digits:0>64}");
            hex::decode_to_slice(padded, &mut out).map_err(|_| bad())?;
            return Ok(Amount(out));
        }
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        // Little-endian u64 limbs, fed up to 19 digits at a time: limbs = limbs * 10^k + chunk.
        let mut limbs = [0u64; 4];
        for chunk in t.as_bytes().chunks(19) {
            let mut value = 0u64;
            for &b in chunk {
                value = value * 10 + (b - b'0') as u64;
            }
            let scale = 10u64.pow(chunk.len() as u32);
            let mut carry = value as u128;
            for limb in limbs.iter_mut() {
                let v = *limb as u128 * scale as u128 + carry;
                *limb = v as u64;
                carry = v >> 64;
            }
            if carry != 0 {
                return Err(overflow());
            }
        }
        for (i, limb) in limbs.iter().enumerate() {
            out[32 - 8 * (i + 1)..32 - 8 * i].copy_from_slice(&limb.to_be_bytes());
        }
        Ok(Amount(out))
    }

    /// The amount as a `u128`, if it fits.
    pub fn to_u128(&self) -> Option<u128> {
        if self.0[..16].iter().any(|&b| b != 0) {
            return None;
        }
        Some(u128::from_be_bytes(
            self.0[16..].try_into().expect("16 bytes"),
        ))
    }
}

impl From<u128> for Amount {
    fn from(v: u128) -> Self {
        let mut out = [0u8; 32];
        out[16..].copy_from_slice(&v.to_be_bytes());
        Amount(out)
    }
}

impl fmt::Display for Amount {
    /// Decimal, without leading zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut n = self.0;
        let mut digits = Vec::new();
        while n.iter().any(|&b| b != 0) {
            // n, remainder = n / 10, n % 10
            let mut rem = 0u32;
            for byte in n.iter_mut() {
                let v = (rem << 8) | *byte as u32;
                *byte = (v / 10) as u8;
                rem = v % 10;
            }
            digits.push(b'0' + rem as u8);
        }
        if digits.is_empty() {
            digits.push(b'0');
        }
        digits.reverse();
        f.write_str(std::str::from_utf8(&digits).expect("ascii digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_hex_up_to_uint256_max() {
        let max = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        assert_eq!(Amount::parse(max).unwrap().0, [0xff; 32]);
        assert_eq!(Amount::parse(max).unwrap().to_string(), max);
        assert!(matches!(
            Amount::parse(
                "115792089237316195423570985008687907853269984665640564039457584007913129639936"
            ),
            Err(AmountError::Overflow(_))
        ));
        assert_eq!(Amount::parse("0x0100").unwrap(), Amount::from(256));
        assert_eq!(Amount::parse("000123").unwrap().to_string(), "123");
        assert_eq!(Amount::parse("0").unwrap(), Amount::ZERO);
        assert_eq!(Amount::ZERO.to_string(), "0");
        for bad in ["-1", "1.5", "1e18", "0x", "0xg1", " ", "12 3"] {
            assert!(Amount::parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn decimal_round_trips(v in proptest::prelude::any::<u128>()) {
            let a = Amount::parse(&v.to_string()).unwrap();
            proptest::prop_assert_eq!(a, Amount::from(v));
            proptest::prop_assert_eq!(a.to_u128(), Some(v));
            proptest::prop_assert_eq!(a.to_string(), v.to_string());
        }
    }
}
