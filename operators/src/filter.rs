//! An in-memory Bloom filter in front of a stage's on-disk keys: a key it has never seen costs
//! no disk lookup. Most contributions are new (a fresh nonce, a text no one sent, band keys no
//! document has), so most lookups end here; a "maybe" goes on to the authoritative store, which
//! decides: the filter never changes a decision, only what it costs.
//!
//! Keys are hashes already (xxh3 of a nonce or a normalised text, MinHash band keys), so 64
//! bits of them are used as they are. 16 bits and 7 probes per key, all in one 64-byte block
//! (one cache line): about 0.1 % false positives per part. When the newest part holds as many
//! keys as it was sized for, a part four times as large takes the new keys and the older parts
//! stay: growing never stops decisions to read the store back, and a lookup probes a few parts
//! (three at 16 million keys). Keys removed from the store stay in the filter (false
//! positives).

/// The smallest part, in keys (2 MiB).
pub const MIN_KEYS: u64 = 1 << 20;

/// A growing blocked Bloom filter of 64-bit keys.
pub struct KeyFilter {
    parts: Vec<Part>,
}

struct Part {
    blocks: Vec<[u64; 8]>,
    keys: u64,
    capacity: u64,
}

impl Part {
    fn with_capacity(keys: u64) -> Self {
        let capacity = keys.max(MIN_KEYS).next_power_of_two();
        // 16 bits per key: a 512-bit block per 32 keys.
        Self {
            blocks: vec![[0u64; 8]; (capacity / 32) as usize],
            keys: 0,
            capacity,
        }
    }

    fn probes(&self, key: u64) -> (usize, u64) {
        let block = ((key >> 32) * self.blocks.len() as u64) >> 32;
        (block as usize, key.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn insert(&mut self, key: u64) {
        let (b, h) = self.probes(key);
        let block = &mut self.blocks[b];
        for i in 0..7 {
            let bit = (h >> (9 * i)) & 511;
            block[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        self.keys += 1;
    }

    fn may_contain(&self, key: u64) -> bool {
        let (b, h) = self.probes(key);
        let block = &self.blocks[b];
        (0..7).all(|i| {
            let bit = (h >> (9 * i)) & 511;
            block[(bit >> 6) as usize] & (1 << (bit & 63)) != 0
        })
    }
}

impl KeyFilter {
    /// An empty filter whose first part is sized for `keys`.
    pub fn with_capacity(keys: u64) -> Self {
        Self {
            parts: vec![Part::with_capacity(keys)],
        }
    }

    pub fn insert(&mut self, key: u64) {
        let last = self.parts.last().expect("a filter has a part");
        if last.keys >= last.capacity {
            let next = Part::with_capacity(4 * last.capacity);
            self.parts.push(next);
        }
        self.parts.last_mut().expect("a part").insert(key);
    }

    /// False only if `key` was never inserted.
    pub fn may_contain(&self, key: u64) -> bool {
        self.parts.iter().any(|p| p.may_contain(key))
    }

    /// Keys inserted.
    pub fn keys(&self) -> u64 {
        self.parts.iter().map(|p| p.keys).sum()
    }

    /// The capacity of each part, oldest first.
    pub fn capacities(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.capacity).collect()
    }
}

/// The 64 bits of a 16-byte hash key that the filter uses.
pub fn key64(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn keeps_every_key_as_it_grows_and_rarely_errs() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let mut f = KeyFilter::with_capacity(0);
        // Past the first part (2^20 keys) and the second (2^22): a third takes the rest.
        let keys: Vec<u64> = (0..6 * MIN_KEYS).map(|_| rng.gen()).collect();
        for k in &keys {
            f.insert(*k);
        }
        assert_eq!(f.capacities(), [1, 4, 16].map(|m| m * MIN_KEYS).to_vec());
        assert_eq!(f.keys(), 6 * MIN_KEYS);
        assert!(keys.iter().all(|k| f.may_contain(*k)));
        let false_positives = (0..100_000).filter(|_| f.may_contain(rng.gen())).count();
        assert!(false_positives < 500, "{false_positives} of 100000");
    }
}
