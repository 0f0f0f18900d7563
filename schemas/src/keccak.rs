//! Keccak-256 of many messages at once.
//!
//! Every contribution's content is hashed (its EIP-712 `contentHash`): about eight Keccak-f[1600]
//! permutations for a kilobyte, ~2.8 µs with the `sha3` crate here, a few per cent of the whole
//! cleaning pipeline. With AVX-512 the permutation runs on eight messages side by side, each
//! 64-bit word of the state one vector register of eight lanes (rotations and the χ step are
//! single instructions there): ~0.9 µs a kilobyte. The permutation is written once, on arrays of
//! eight words, and compiled for AVX-512 (where the compiler turns those arrays into vector
//! registers) and plainly; without AVX-512 the `sha3` crate hashes one message at a time, which
//! beats the plain eight-lane code. The digests are the same bits either way.

use sha3::{Digest, Keccak256};

/// Bytes absorbed per permutation (Keccak-256's rate).
const RATE: usize = 136;
/// Messages hashed side by side.
const LANES: usize = 8;

type Lanes = [u64; LANES];

const ROUND_CONSTANTS: [u64; 24] = [
    0x0000_0000_0000_0001,
    0x0000_0000_0000_8082,
    0x8000_0000_0000_808A,
    0x8000_0000_8000_8000,
    0x0000_0000_0000_808B,
    0x0000_0000_8000_0001,
    0x8000_0000_8000_8081,
    0x8000_0000_0000_8009,
    0x0000_0000_0000_008A,
    0x0000_0000_0000_0088,
    0x0000_0000_8000_8009,
    0x0000_0000_8000_000A,
    0x0000_0000_8000_808B,
    0x8000_0000_0000_008B,
    0x8000_0000_0000_8089,
    0x8000_0000_0000_8003,
    0x8000_0000_0000_8002,
    0x8000_0000_0000_0080,
    0x0000_0000_0000_800A,
    0x8000_0000_8000_000A,
    0x8000_0000_8000_8081,
    0x8000_0000_0000_8080,
    0x0000_0000_8000_0001,
    0x8000_0000_8000_8008,
];

/// ρ: the rotation of each word, by index `x + 5y`.
const RHO: [u32; 25] = [
    0, 1, 62, 28, 27, 36, 44, 6, 55, 20, 3, 10, 43, 25, 39, 41, 45, 15, 21, 8, 18, 2, 61, 56, 14,
];

/// keccak256 of each input, in order.
pub fn keccak256_many(inputs: &[&[u8]]) -> Vec<[u8; 32]> {
    let mut out = vec![[0u8; 32]; inputs.len()];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && inputs.len() >= LANES {
        // Messages of about the same length side by side: a lane that is done idles until the
        // longest of its group is.
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let mut groups = order.chunks_exact(LANES);
        for group in groups.by_ref() {
            let group: &[usize; LANES] = group.try_into().expect("LANES indices");
            let digests = keccak8_avx512(&group.map(|i| inputs[i]));
            for (i, d) in group.iter().zip(digests) {
                out[*i] = d;
            }
        }
        for &i in groups.remainder() {
            out[i] = Keccak256::digest(inputs[i]).into();
        }
        return out;
    }
    for (o, input) in out.iter_mut().zip(inputs) {
        *o = Keccak256::digest(input).into();
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn keccak8_avx512(inputs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
    // SAFETY: called only where the CPU has AVX-512F (checked by the caller).
    unsafe { keccak8_avx512_inner(inputs) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn keccak8_avx512_inner(inputs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
    keccak8(inputs)
}

/// keccak256 of eight messages, absorbing one block of each per permutation.
#[inline(always)]
fn keccak8(inputs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
    // Blocks per message, the last one padded (pad10*1 with Keccak's 0x01 domain byte).
    let blocks: [usize; LANES] = std::array::from_fn(|l| inputs[l].len() / RATE + 1);
    let most = blocks.iter().copied().max().unwrap_or(0);
    let mut state = [[0u64; LANES]; 25];
    let mut out = [[0u8; 32]; LANES];
    let mut block = [0u8; RATE];
    for b in 0..most {
        for l in 0..LANES {
            if b >= blocks[l] {
                continue;
            }
            let rest = &inputs[l][b * RATE..];
            if rest.len() >= RATE && b + 1 < blocks[l] {
                block.copy_from_slice(&rest[..RATE]);
            } else {
                block.fill(0);
                block[..rest.len()].copy_from_slice(rest);
                block[rest.len()] ^= 0x01;
                block[RATE - 1] ^= 0x80;
            }
            for (w, word) in block.chunks_exact(8).enumerate() {
                state[w][l] ^= u64::from_le_bytes(word.try_into().expect("8 bytes"));
            }
        }
        permute(&mut state);
        for l in 0..LANES {
            if b + 1 == blocks[l] {
                for (w, chunk) in out[l].chunks_exact_mut(8).enumerate() {
                    chunk.copy_from_slice(&state[w][l].to_le_bytes());
                }
            }
        }
    }
    out
}

// The lane operations are plain loops over the eight words: the compiler makes one vector
// instruction of each (with `std::array::from_fn` it did not, and the kernel ran 3× slower).

#[inline(always)]
fn xor(a: Lanes, b: Lanes) -> Lanes {
    let mut r = [0u64; LANES];
    for i in 0..LANES {
        r[i] = a[i] ^ b[i];
    }
    r
}

#[inline(always)]
fn rotate(a: Lanes, n: u32) -> Lanes {
    let mut r = [0u64; LANES];
    for i in 0..LANES {
        r[i] = a[i].rotate_left(n);
    }
    r
}

/// χ on one word: `a ^ (!b & c)`.
#[inline(always)]
fn chi(a: Lanes, b: Lanes, c: Lanes) -> Lanes {
    let mut r = [0u64; LANES];
    for i in 0..LANES {
        r[i] = a[i] ^ (!b[i] & c[i]);
    }
    r
}

/// Keccak-f[1600] on eight states at once; `state[x + 5y][lane]`.
#[inline(always)]
fn permute(state: &mut [Lanes; 25]) {
    for rc in ROUND_CONSTANTS {
        // θ
        let mut c = [[0u64; LANES]; 5];
        for x in 0..5 {
            c[x] = xor(
                xor(
                    xor(state[x], state[x + 5]),
                    xor(state[x + 10], state[x + 15]),
                ),
                state[x + 20],
            );
        }
        for x in 0..5 {
            let d = xor(c[(x + 4) % 5], rotate(c[(x + 1) % 5], 1));
            for y in 0..5 {
                state[x + 5 * y] = xor(state[x + 5 * y], d);
            }
        }
        // ρ and π: word (x, y) moves to (y, 2x + 3y).
        let mut b = [[0u64; LANES]; 25];
        for x in 0..5 {
            for y in 0..5 {
                let i = x + 5 * y;
                b[y + 5 * ((2 * x + 3 * y) % 5)] = rotate(state[i], RHO[i]);
            }
        }
        // χ
        for y in 0..5 {
            for x in 0..5 {
                state[x + 5 * y] =
                    chi(b[x + 5 * y], b[(x + 1) % 5 + 5 * y], b[(x + 2) % 5 + 5 * y]);
            }
        }
        // ι
        for lane in &mut state[0] {
            *lane ^= rc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_by_one(inputs: &[Vec<u8>]) -> Vec<[u8; 32]> {
        inputs.iter().map(|i| Keccak256::digest(i).into()).collect()
    }

    #[test]
    fn the_eight_lane_permutation_gives_sha3s_digests_at_every_padding_edge() {
        // Lengths around the rate (one or two blocks, the padding bytes in one byte or two).
        let lens = [0, 1, 134, 135, 136, 137, 271, 272, 273, 1000, 5000, 7];
        let inputs: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|j| (j * 31 + k * 7) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        // The portable code (every CPU) and the dispatching entry point.
        for group in refs.chunks_exact(LANES) {
            let group: &[&[u8]; LANES] = group.try_into().unwrap();
            let want = one_by_one(&group.iter().map(|g| g.to_vec()).collect::<Vec<_>>());
            assert_eq!(keccak8(group).to_vec(), want);
        }
        assert_eq!(keccak256_many(&refs), one_by_one(&inputs));
        assert_eq!(
            hex::encode(keccak256_many(&[b"".as_slice(); 9])[8]),
            "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
        );
    }

    proptest! {
        #[test]
        fn many_digests_equal_one_by_one(
            inputs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..30)
        ) {
            let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(keccak256_many(&refs), one_by_one(&inputs));
        }
    }
}
