//! Splitting an epoch's reward pool into integer amounts: pro rata to weights, by the largest
//! remainder method, so the epoch pays out exactly its pool and the rounding is deterministic.

/// Splits `pool` (token base units) pro rata to `weights`: everyone first gets
/// `floor(pool · w / W)`; the units this leaves over (fewer than the number of positive
/// remainders) go one each to the largest remainders `pool · w mod W`, ties to the earlier
/// index. The amounts add up to exactly `pool`; a zero weight gets zero. With no weight at all
/// (`W = 0`) nothing is paid and every amount is zero. Products are exact (256-bit).
pub fn largest_remainder(pool: u128, weights: &[u128]) -> Vec<u128> {
    let total = weights
        .iter()
        .try_fold(0u128, |sum, &w| sum.checked_add(w))
        .expect("the weights add up to more than a u128");
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut amounts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for &w in weights {
        let (q, r) = mul_div_rem(pool, w, total);
        amounts.push(q);
        remainders.push(r);
    }
    let paid: u128 = amounts.iter().sum();
    let left = (pool - paid) as usize; // < weights.len(), see above
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| remainders[b].cmp(&remainders[a]).then(a.cmp(&b)));
    for &i in &order[..left] {
        amounts[i] += 1;
    }
    amounts
}

/// `(a · b / c, a · b mod c)` with the product held in 256 bits; the quotient must fit a u128
/// (it does when `b <= c`).
fn mul_div_rem(a: u128, b: u128, c: u128) -> (u128, u128) {
    let (hi, lo) = mul_wide(a, b);
    // Long division of hi:lo by c, one bit at a time.
    let (mut rem, mut quotient) = (0u128, 0u128);
    for i in (0..256).rev() {
        let bit = if i >= 128 {
            (hi >> (i - 128)) & 1
        } else {
            (lo >> i) & 1
        };
        let carry = rem >> 127;
        rem = (rem << 1) | bit;
        if carry == 1 || rem >= c {
            rem = rem.wrapping_sub(c);
            assert!(i < 128, "quotient does not fit a u128");
            quotient |= 1 << i;
        }
    }
    (quotient, rem)
}

/// The 256-bit product of two u128s as (high, low) halves.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    let (a1, a0) = (a >> 64, a & u64::MAX as u128);
    let (b1, b0) = (b >> 64, b & u64::MAX as u128);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 64) + (p01 & u64::MAX as u128) + (p10 & u64::MAX as u128);
    let lo = (p00 & u64::MAX as u128) | (mid << 64);
    let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (hi, lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_exactly_and_breaks_ties_by_index() {
        assert_eq!(largest_remainder(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(largest_remainder(100, &[0, 5, 0]), vec![0, 100, 0]);
        assert_eq!(largest_remainder(7, &[]), Vec::<u128>::new());
        assert_eq!(largest_remainder(7, &[0, 0]), vec![0, 0]);
        assert_eq!(largest_remainder(2, &[2, 3, 5]), vec![0, 1, 1]);
        // A pool of 10^27 (a billion 18-decimal tokens) and 10^18-scaled scores: exact.
        let pool = 10u128.pow(27);
        let split = largest_remainder(pool, &[10u128.pow(18), 2 * 10u128.pow(18), 3]);
        assert_eq!(split.iter().sum::<u128>(), pool);
        assert_eq!(mul_div_rem(u128::MAX, u128::MAX, u128::MAX), (u128::MAX, 0));
        assert_eq!(mul_div_rem(u128::MAX, 3, 4), (u128::MAX / 4 * 3 + 2, 1));
    }

    proptest! {
        #[test]
        fn matches_exact_arithmetic(pool in 0u128..1 << 60, weights in proptest::collection::vec(0u128..1 << 60, 0..40)) {
            let split = largest_remainder(pool, &weights);
            let Some(total) = std::num::NonZeroU128::new(weights.iter().sum()) else {
                prop_assert!(split.iter().all(|&a| a == 0));
                return Ok(());
            };
            // Products stay below 2^120: exact in u128.
            let floor = |k: usize| pool * weights[k] / total;
            let rem = |k: usize| pool * weights[k] % total;
            prop_assert_eq!(split.iter().sum::<u128>(), pool);
            for k in 0..weights.len() {
                prop_assert!(split[k] == floor(k) || split[k] == floor(k) + 1);
                if weights[k] == 0 {
                    prop_assert_eq!(split[k], 0);
                }
            }
            // The units above the floor went to the largest remainders, ties to the earlier.
            let up = |k: usize| split[k] > floor(k);
            for i in 0..weights.len() {
                for j in 0..weights.len() {
                    if up(j) && !up(i) {
                        prop_assert!(rem(j) > rem(i) || (rem(j) == rem(i) && j < i));
                    }
                }
            }
        }

        #[test]
        fn wide_products_are_exact(a in any::<u128>(), b in any::<u128>()) {
            // The low half is the wrapping product; dividing the whole by `a` gives back `b`
            // exactly, which needs the high half right.
            prop_assert_eq!(mul_wide(a, b).1, a.wrapping_mul(b));
            if a != 0 {
                prop_assert_eq!(mul_div_rem(a, b, a), (b, 0));
            }
        }
    }
}
