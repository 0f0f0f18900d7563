//! Checking many signatures at once against public keys already known.
//!
//! Recovering a signer costs one libsecp256k1 recovery per signature (~40 µs on the development
//! machine: a sqrt and a two-point scalar multiplication of 128 doublings with the endomorphism).
//! A contributor signs many contributions, though, and once one of its signatures has recovered
//! to its address its public key `Q` is known. For a signature `(r, s, v)` over digest `e`,
//! recovery (libsecp256k1's `ecdsa_recover`, OpenZeppelin's `ECDSA.recover`) yields `Q` exactly
//! when `s·R = e·G + r·Q`, where `R` is the curve point with x-coordinate `r` and the y parity
//! of `v`. Multiplying by `1/s`, that is `R − u₁·G − u₂·Q = 0` with `u₁ = e/s`, `u₂ = r/s`.
//!
//! A batch of such signatures holds when, with weights `zᵢ` of 128 bits,
//!
//! ```text
//! Σ zᵢ·Rᵢ − (Σ zᵢ·u₁ᵢ)·G − Σ_keys (Σ_{i signed with Q} zᵢ·u₂ᵢ)·Q = 0,
//! ```
//!
//! one multi-scalar multiplication (Pippenger's bucket method over signed digits) of one point
//! per signature and two per distinct key (`Q` and `2¹²⁸·Q`, so that every scalar is 128 bits),
//! instead of one two-point multiplication per signature. In a group of prime order, if any term
//! `Rᵢ − u₁ᵢ·G − u₂ᵢ·Q` is not zero the weighted sum is zero for at most one value of that
//! term's weight, i.e. with probability ≤ 2⁻¹²⁷. The weights are derived from a Keccak-256 hash
//! of the whole batch (digests, signatures, signers), so they are fixed only once every
//! signature is: whoever chooses the signatures cannot aim at them (Fiat–Shamir).
//!
//! A batch that does not hold is halved until the halves that do hold are found; what is left
//! is reported unproven, and the caller recovers those signatures one by one, which gives the
//! exact reason. A proven signature is one whose recovery would give `Q`, so the decision of
//! [`crate::verify`] is the same either way; only its cost differs.

use std::sync::LazyLock;

use k256::elliptic_curve::group::Group;
use k256::elliptic_curve::ops::Reduce;
use k256::elliptic_curve::sec1::FromEncodedPoint;
use k256::elliptic_curve::PrimeField;
use k256::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar, U256};
use sha3::{Digest, Keccak256};

use crate::signature::screen;

/// Fewest signatures worth a multi-scalar multiplication: below this the buckets cost more than
/// they save, and the caller recovers one by one.
pub const MIN_BATCH: usize = 48;

/// A sub-batch this small that does not hold is left to one-by-one recovery, and halving stops
/// after this many levels, so that a batch full of forgeries costs at most a few
/// multiplications more than recovering it one by one.
const LEAF: usize = 32;
const MAX_DEPTH: u32 = 6;

/// A public key whose signatures can be checked in batches: `Q` and `2¹²⁸·Q`.
#[derive(Clone, Debug)]
pub struct KnownKey {
    q: AffinePoint,
    q_hi: AffinePoint,
}

impl KnownKey {
    /// From an uncompressed SEC1 point `0x04 ‖ x ‖ y` (as recovery returns it); `None` if it is
    /// not a point of the curve.
    pub fn from_uncompressed(point: &[u8; 65]) -> Option<Self> {
        let encoded = EncodedPoint::from_bytes(point).ok()?;
        let q: AffinePoint = Option::from(AffinePoint::from_encoded_point(&encoded))?;
        if bool::from(ProjectivePoint::from(q).is_identity()) {
            return None;
        }
        Some(Self {
            q,
            q_hi: times_2_128(q),
        })
    }
}

fn times_2_128(p: AffinePoint) -> AffinePoint {
    let mut x = ProjectivePoint::from(p);
    for _ in 0..128 {
        x = x.double();
    }
    x.to_affine()
}

static GENERATOR_HI: LazyLock<AffinePoint> = LazyLock::new(|| times_2_128(AffinePoint::GENERATOR));

/// One signature to check: it must recover to `key`, the key of `signer`.
pub struct Claim<'a> {
    pub digest: [u8; 32],
    pub signature: &'a [u8; 65],
    pub signer: [u8; 20],
    pub key: &'a KnownKey,
}

/// A claim in the form the batch equation needs.
struct Prepared {
    /// Index of the claim.
    index: usize,
    /// Index of the claim's key among the batch's distinct keys.
    key: usize,
    big_r: AffinePoint,
    /// e/s and r/s.
    u1: Scalar,
    u2: Scalar,
}

/// Which of `claims` are proven to recover to their keys. `false` means "not proven", not
/// "invalid": the caller decides those by recovering them one by one. Claims whose signature
/// recovery would refuse anyway (bad `v`, high or out-of-range scalars, no point at `r`) are
/// never proven.
pub fn prove(claims: &[Claim<'_>]) -> Vec<bool> {
    let mut proven = vec![false; claims.len()];
    let mut keys: Vec<&KnownKey> = Vec::new();
    let mut key_of: std::collections::HashMap<[u8; 20], usize> = Default::default();
    let mut parts = Vec::with_capacity(claims.len());
    let mut r_s = Vec::with_capacity(claims.len());
    for (index, c) in claims.iter().enumerate() {
        let Some((r, s, e, big_r)) = parse(&c.digest, c.signature) else {
            continue;
        };
        let key = *key_of.entry(c.signer).or_insert_with(|| {
            keys.push(c.key);
            keys.len() - 1
        });
        parts.push(Prepared {
            index,
            key,
            big_r,
            u1: e,
            u2: r,
        });
        r_s.push(s);
    }
    // 1/s for every claim with one inversion (Montgomery's trick); s is never zero here.
    let mut prefix = Vec::with_capacity(r_s.len());
    let mut acc = Scalar::ONE;
    for s in &r_s {
        prefix.push(acc);
        acc *= s;
    }
    let Some(mut inv) = Option::<Scalar>::from(acc.invert()) else {
        return proven;
    };
    for i in (0..parts.len()).rev() {
        let s_inv = prefix[i] * inv;
        inv *= &r_s[i];
        parts[i].u1 *= &s_inv;
        parts[i].u2 *= &s_inv;
    }
    let all: Vec<&Prepared> = parts.iter().collect();
    settle(claims, &keys, &all, 0, &mut proven);
    proven
}

/// Marks `batch` proven if it holds; otherwise halves it (see [`LEAF`], [`MAX_DEPTH`]).
fn settle(
    claims: &[Claim<'_>],
    keys: &[&KnownKey],
    batch: &[&Prepared],
    depth: u32,
    proven: &mut [bool],
) {
    if batch.is_empty() {
        return;
    }
    if holds(claims, keys, batch) {
        for p in batch {
            proven[p.index] = true;
        }
    } else if batch.len() > LEAF && depth < MAX_DEPTH {
        let (a, b) = batch.split_at(batch.len() / 2);
        settle(claims, keys, a, depth + 1, proven);
        settle(claims, keys, b, depth + 1, proven);
    }
}

/// r, s and e as scalars and the point R, or `None` where recovery itself would refuse.
fn parse(digest: &[u8; 32], sig: &[u8; 65]) -> Option<(Scalar, Scalar, Scalar, AffinePoint)> {
    let odd = screen(sig).ok()?;
    let s_bytes: [u8; 32] = sig[32..64].try_into().expect("32 bytes");
    let r_bytes: FieldBytes = <[u8; 32]>::try_from(&sig[..32]).expect("32 bytes").into();
    let r: Scalar = Option::from(Scalar::from_repr(r_bytes))?;
    let s: Scalar = Option::from(Scalar::from_repr(s_bytes.into()))?;
    if bool::from(r.is_zero()) || bool::from(s.is_zero()) {
        return None;
    }
    // libsecp256k1 reduces the digest modulo the group order, as here.
    let e = <Scalar as Reduce<U256>>::reduce_bytes(&(*digest).into());
    // r < n < p, so r is the x-coordinate itself (recovery ids 2 and 3, x = r + n, are not
    // Ethereum's).
    Some((r, s, e, decompress(&r_bytes, odd == 1)?))
}

/// The point with x-coordinate `x` and y of the given parity, `None` if there is none. Its
/// square root is libsecp256k1's (`secp256k1_ec_pubkey_parse` of the compressed encoding), about
/// 40 % faster than k256's `AffinePoint::decompress` here; the point comes back to k256 for the
/// multiplication (the uncompressed encoding, checked against the curve equation again).
fn decompress(x: &FieldBytes, odd: bool) -> Option<AffinePoint> {
    let mut compressed = [0u8; 33];
    compressed[0] = if odd { 0x03 } else { 0x02 };
    compressed[1..].copy_from_slice(x);
    let point = secp256k1::PublicKey::from_slice(&compressed).ok()?;
    let encoded = EncodedPoint::from_bytes(point.serialize_uncompressed()).ok()?;
    Option::from(AffinePoint::from_encoded_point(&encoded))
}

/// Whether the weighted batch equation holds for `batch`.
fn holds(claims: &[Claim<'_>], keys: &[&KnownKey], batch: &[&Prepared]) -> bool {
    let mut transcript = Keccak256::new();
    transcript.update(b"ledgerflow batch ecrecover v1");
    for p in batch {
        let c = &claims[p.index];
        transcript.update(c.digest);
        transcript.update(c.signature);
        transcript.update(c.signer);
    }
    let seed: [u8; 32] = transcript.finalize().into();
    let mut points = Vec::with_capacity(batch.len() + 2 + 2 * keys.len());
    let mut scalars = Vec::with_capacity(points.capacity());
    let mut g = Scalar::ZERO;
    let mut q = vec![Scalar::ZERO; keys.len()];
    let mut used = vec![false; keys.len()];
    let mut words = [0u8; 32];
    for (i, p) in batch.iter().enumerate() {
        if i % 2 == 0 {
            let mut h = Keccak256::new();
            h.update(seed);
            h.update((i as u64).to_le_bytes());
            words = h.finalize().into();
        }
        let half = &words[(i % 2) * 16..(i % 2) * 16 + 16];
        // Odd, so never zero.
        let z = u128::from_le_bytes(half.try_into().expect("16 bytes")) | 1;
        let zs = Scalar::from(z);
        points.push(p.big_r);
        scalars.push(z);
        g += zs * p.u1;
        q[p.key] += zs * p.u2;
        used[p.key] = true;
    }
    let mut push_split = |point: AffinePoint, point_hi: AffinePoint, k: Scalar| {
        let bytes = (-k).to_bytes();
        let hi = u128::from_be_bytes(bytes[..16].try_into().expect("16 bytes"));
        let lo = u128::from_be_bytes(bytes[16..].try_into().expect("16 bytes"));
        points.push(point);
        scalars.push(lo);
        points.push(point_hi);
        scalars.push(hi);
    };
    push_split(AffinePoint::GENERATOR, *GENERATOR_HI, g);
    for (k, key) in keys.iter().enumerate() {
        if used[k] {
            push_split(key.q, key.q_hi, q[k]);
        }
    }
    bool::from(multiply_sum(&points, &scalars).is_identity())
}

/// Σ kᵢ·Pᵢ for 128-bit kᵢ: Pippenger's buckets over signed digits of `c` bits.
fn multiply_sum(points: &[AffinePoint], scalars: &[u128]) -> ProjectivePoint {
    let n = points.len();
    // Digits fit in i16 up to c = 15. Cost of window c: ⌈129/c⌉ · (n mixed additions + 2^c full ones to sum 2^(c−1) buckets).
    let c = (4..=15usize)
        .min_by_key(|&c| 129usize.div_ceil(c) * (n + (1usize << c) * 9 / 8))
        .expect("non-empty range");
    let windows = 129usize.div_ceil(c);
    let half = 1i32 << (c - 1);
    let mask = (1u128 << c) - 1;
    // digits[j * n + i]: digit j of scalar i, in (−2^(c−1), 2^(c−1)].
    let mut digits = vec![0i16; windows * n];
    for (i, &k) in scalars.iter().enumerate() {
        let mut carry = 0i32;
        for j in 0..windows {
            let shift = j * c;
            let bits = if shift < 128 {
                ((k >> shift) & mask) as i32
            } else {
                0
            };
            let mut d = bits + carry;
            carry = 0;
            if d > half {
                d -= 1 << c;
                carry = 1;
            }
            digits[j * n + i] = d as i16;
        }
        debug_assert_eq!(carry, 0, "129 bits hold a 128-bit scalar's signed digits");
    }
    let mut buckets = vec![ProjectivePoint::IDENTITY; half as usize];
    let mut acc = ProjectivePoint::IDENTITY;
    for j in (0..windows).rev() {
        for _ in 0..c {
            acc = acc.double();
        }
        buckets.fill(ProjectivePoint::IDENTITY);
        for (d, p) in digits[j * n..(j + 1) * n].iter().zip(points) {
            match *d {
                0 => {}
                d if d > 0 => buckets[(d - 1) as usize] += p,
                d => buckets[(-d - 1) as usize] -= p,
            }
        }
        let mut running = ProjectivePoint::IDENTITY;
        let mut sum = ProjectivePoint::IDENTITY;
        for b in buckets.iter().rev() {
            running += b;
            sum += &running;
        }
        acc += &sum;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::recover_public_key;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use secp256k1::ecdsa::RecoverableSignature;
    use secp256k1::{Message, SecretKey};

    /// TEST wallets from a fixed seed.
    fn wallet(i: u8) -> (SecretKey, [u8; 65], [u8; 20]) {
        let mut bytes = [0x5au8; 32];
        bytes[0] = i.wrapping_add(1);
        let sk = SecretKey::from_secret_bytes(bytes).unwrap();
        let pk = sk.public_key().serialize_uncompressed();
        let addr = crate::signature::address_of_uncompressed(&pk);
        (sk, pk, addr)
    }

    fn sign(sk: &SecretKey, digest: &[u8; 32]) -> [u8; 65] {
        let (recid, rs) =
            RecoverableSignature::sign_ecdsa_recoverable(Message::from_digest(*digest), sk)
                .serialize_compact();
        let mut sig = [0u8; 65];
        sig[..64].copy_from_slice(&rs);
        sig[64] = 27 + recid.to_u8();
        sig
    }

    proptest! {
        /// libsecp256k1's decompression gives k256's point, or none where k256 has none (x not
        /// on the curve, x ≥ p).
        #[test]
        fn decompress_agrees_with_k256(x in any::<[u8; 32]>(), odd in any::<bool>(), high in any::<bool>()) {
            use k256::elliptic_curve::point::DecompressPoint;
            let mut x = x;
            if high {
                // Near p = 2²⁵⁶ − 2³² − 977, where x ≥ p must be refused.
                x[..27].fill(0xff);
            }
            let x: FieldBytes = x.into();
            let k256: Option<AffinePoint> =
                AffinePoint::decompress(&x, k256::elliptic_curve::subtle::Choice::from(u8::from(odd))).into();
            prop_assert_eq!(decompress(&x, odd), k256);
        }
    }

    #[test]
    fn multiply_sum_equals_the_plain_sum_of_products() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in [1usize, 2, 5, 40, 300] {
            let points: Vec<AffinePoint> = (0..n)
                .map(|_| (ProjectivePoint::GENERATOR * Scalar::from(rng.gen::<u64>())).to_affine())
                .collect();
            let mut scalars: Vec<u128> = (0..n).map(|_| rng.gen()).collect();
            scalars[0] = u128::MAX; // the top digit's carry
            if n > 2 {
                scalars[1] = 0;
                scalars[2] = 1;
            }
            let want = points
                .iter()
                .zip(&scalars)
                .fold(ProjectivePoint::IDENTITY, |acc, (p, k)| {
                    acc + ProjectivePoint::from(*p) * Scalar::from(*k)
                });
            assert_eq!(multiply_sum(&points, &scalars), want, "n = {n}");
        }
    }

    /// `count` signatures by `wallets` wallets over distinct digests.
    fn claims_data(count: usize, wallets: u8, seed: u64) -> Vec<([u8; 32], [u8; 65], u8)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|_| {
                let w = rng.gen_range(0..wallets);
                let digest: [u8; 32] = rng.gen();
                (digest, sign(&wallet(w).0, &digest), w)
            })
            .collect()
    }

    fn run(data: &[([u8; 32], [u8; 65], u8)], wallets: u8) -> Vec<bool> {
        let keys: Vec<KnownKey> = (0..wallets)
            .map(|w| KnownKey::from_uncompressed(&wallet(w).1).unwrap())
            .collect();
        let claims: Vec<Claim<'_>> = data
            .iter()
            .map(|(digest, sig, w)| Claim {
                digest: *digest,
                signature: sig,
                signer: wallet(*w).2,
                key: &keys[*w as usize],
            })
            .collect();
        prove(&claims)
    }

    #[test]
    fn a_batch_of_genuine_signatures_is_proven_whole() {
        let data = claims_data(300, 7, 1);
        assert!(run(&data, 7).iter().all(|p| *p));
    }

    #[test]
    fn forgeries_are_never_proven_and_the_rest_mostly_are() {
        let mut data = claims_data(600, 5, 2);
        let bad = [3usize, 250, 599];
        // The signature of another digest; the other parity of R; another wallet's signature.
        data[3].1 = sign(&wallet(data[3].2).0, &[9u8; 32]);
        data[250].1[64] ^= 1;
        data[599].1 = sign(&wallet((data[599].2 + 1) % 5).0, &data[599].0);
        let proven = run(&data, 5);
        for &i in &bad {
            assert!(!proven[i], "forgery {i} proven");
        }
        let unproven = proven.iter().filter(|p| !**p).count();
        // Each forgery leaves at most its leaf (600 / 2^4 < 2·LEAF here) to one-by-one recovery.
        assert!(unproven <= bad.len() * 2 * LEAF, "{unproven} unproven");
    }

    #[test]
    fn refusals_of_recovery_are_never_proven() {
        let mut data = claims_data(100, 3, 4);
        data[0].1[64] = 29; // bad v
        data[1].1[32..64].copy_from_slice(&[0xff; 32]); // s above the order
        data[2].1[..32].copy_from_slice(&[0; 32]); // r = 0
        let proven = run(&data, 3);
        assert!(!proven[0] && !proven[1] && !proven[2]);
        assert!(proven[3..].iter().all(|p| *p));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// Whatever is tampered with, a proven claim is one whose recovery gives its key.
        #[test]
        fn proven_means_recovery_gives_the_key(
            seed in any::<u64>(),
            tamper in proptest::collection::vec((0usize..80, 0u8..4, any::<u8>()), 0..6),
        ) {
            let mut data = claims_data(80, 4, seed);
            for (i, how, byte) in tamper {
                match how {
                    0 => data[i].1[byte as usize % 64] ^= 1 << (byte % 8),
                    1 => data[i].1[64] ^= 1,
                    2 => data[i].0[byte as usize % 32] ^= 1,
                    _ => data[i].2 = (data[i].2 + 1) % 4,
                }
            }
            let proven = run(&data, 4);
            for (i, (digest, sig, w)) in data.iter().enumerate() {
                let recovered = recover_public_key(digest, sig).ok();
                let genuine = recovered == Some(wallet(*w).1);
                prop_assert!(!proven[i] || genuine, "claim {} proven but recovers to {:?}", i, recovered.map(hex::encode));
            }
        }
    }
}
