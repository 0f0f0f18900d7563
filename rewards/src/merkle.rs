//! OpenZeppelin's `StandardMerkleTree` (`@openzeppelin/merkle-tree` 1.x) for reward leaves
//! `["address", "uint256"]`: same leaf hashes, same layout, same root and proofs.
//!
//! - A leaf is `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))` (hashed twice,
//!   so no 64-byte leaf can pass for an inner node).
//! - The leaf hashes are sorted ascending (a stable sort: equal leaves keep their input order)
//!   and laid out as a complete binary tree in one array of `2n − 1` hashes: the sorted leaves
//!   fill the array from its end backwards (`tree[2n − 2 − i]` = leaf `i`), and every inner node
//!   `i` (from `n − 2` down to 0) is the hash of its children `2i + 1` and `2i + 2`.
//! - An inner node is `keccak256` of its two children in ascending order (OpenZeppelin's
//!   commutative `_hashPair`), so a proof is just the siblings on the way up, and `MerkleProof`
//!   verifies it without positions.
//!
//! Hashing runs on several threads: the leaves in chunks, the inner nodes one tree level at a
//! time (the nodes of a level only read the level below).

use std::fmt::Write as _;

use serde_json::{json, Value};
use sha3::{Digest, Keccak256};

use crate::amount::{Amount, AmountError};

/// A Keccak-256 hash.
pub type Hash = [u8; 32];
/// An Ethereum address.
pub type Account = [u8; 20];

/// One reward leaf: an account and its cumulative amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    pub account: Account,
    pub amount: Amount,
}

/// Why a tree could not be built or a leaf file read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("a Merkle tree needs at least one leaf")]
    Empty,
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
}

fn keccak(bytes: &[u8]) -> Hash {
    Keccak256::digest(bytes).into()
}

impl Leaf {
    /// `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))`.
    pub fn hash(&self) -> Hash {
        let mut encoded = [0u8; 64];
        encoded[12..32].copy_from_slice(&self.account);
        encoded[32..].copy_from_slice(&self.amount.0);
        keccak(&keccak(&encoded))
    }
}

/// OpenZeppelin's `Hashes.commutativeKeccak256`: the two hashes in ascending order, hashed.
pub fn hash_pair(a: &Hash, b: &Hash) -> Hash {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut both = [0u8; 64];
    both[..32].copy_from_slice(lo);
    both[32..].copy_from_slice(hi);
    keccak(&both)
}

/// `MerkleProof.verify`: whether `proof` leads from `leaf` to `root`.
pub fn verify(root: &Hash, leaf: &Hash, proof: &[Hash]) -> bool {
    proof
        .iter()
        .fold(*leaf, |node, sibling| hash_pair(&node, sibling))
        == *root
}

/// A reward tree: leaves in their input order, each with its place in the tree.
#[derive(Debug, Clone)]
pub struct StandardMerkleTree {
    tree: Vec<Hash>,
    leaves: Vec<Leaf>,
    tree_index: Vec<usize>,
}

/// Below this many hashes a level is hashed on one thread.
const PARALLEL_MIN: usize = 8192;

impl StandardMerkleTree {
    /// The tree of `leaves`, hashed on every available core.
    pub fn of(leaves: Vec<Leaf>) -> Result<Self, MerkleError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(leaves, threads)
    }

    /// The tree of `leaves`, hashed on `threads` threads.
    pub fn with_threads(leaves: Vec<Leaf>, threads: usize) -> Result<Self, MerkleError> {
        let n = leaves.len();
        if n == 0 {
            return Err(MerkleError::Empty);
        }
        let threads = threads.max(1);
        let mut hashes = vec![[0u8; 32]; n];
        fill(&mut hashes, threads, |i| leaves[i].hash());
        let (tree, tree_index) = build(hashes, threads);
        Ok(Self {
            tree,
            leaves,
            tree_index,
        })
    }

    /// The root, `tree[0]`.
    pub fn root(&self) -> Hash {
        self.tree[0]
    }

    /// The leaves, in input order.
    pub fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    /// The input index of the first leaf of `account`.
    pub fn position(&self, account: &Account) -> Option<usize> {
        self.leaves.iter().position(|l| &l.account == account)
    }

    /// The proof of leaf `index` (input order): the siblings from the leaf up to the root.
    pub fn proof(&self, index: usize) -> Option<Vec<Hash>> {
        Some(proof_at(&self.tree, *self.tree_index.get(index)?))
    }

    /// The tree in `@openzeppelin/merkle-tree`'s dump format (`StandardMerkleTree.load` reads
    /// it): `format`, `leafEncoding`, every node, and each value with its tree index.
    pub fn dump(&self) -> Value {
        json!({
            "format": "standard-v1",
            "leafEncoding": ["address", "uint256"],
            "tree": self.tree.iter().map(hex0x).collect::<Vec<_>>(),
            "values": self.leaves.iter().zip(&self.tree_index).map(|(leaf, &i)| json!({
                "value": [checksum_address(&leaf.account), leaf.amount.to_string()],
                "treeIndex": i,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The tree array of StandardMerkleTree over leaf hashes `hashes` (input order): leaves sorted
/// by hash (stably) at the end of a `2n − 1` array, inner nodes the sorted-pair hash of their
/// children. Returns the array and each leaf's index in it.
fn build(hashes: Vec<Hash>, threads: usize) -> (Vec<Hash>, Vec<usize>) {
    let n = hashes.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| hashes[a].cmp(&hashes[b])); // stable, as JavaScript's sort
    let mut tree = vec![[0u8; 32]; 2 * n - 1];
    let mut tree_index = vec![0; n];
    for (i, &v) in order.iter().enumerate() {
        tree[2 * n - 2 - i] = hashes[v];
        tree_index[v] = 2 * n - 2 - i;
    }
    drop(hashes);
    // Inner nodes 0..n-1, deepest level first; level d holds nodes 2^d - 1 .. 2^(d+1) - 1,
    // whose children all lie at 2^(d+1) - 1 or later.
    if n > 1 {
        let deepest = usize::BITS - 1 - (n - 1).leading_zeros(); // floor(log2(n - 1))
        for d in (0..=deepest).rev() {
            let start = (1usize << d) - 1;
            let children_from = (1usize << (d + 1)) - 1;
            let end = children_from.min(n - 1);
            let (head, below) = tree.split_at_mut(children_from);
            fill_from(&mut head[start..end], threads, |k| {
                let i = start + k;
                hash_pair(
                    &below[2 * i + 1 - children_from],
                    &below[2 * i + 2 - children_from],
                )
            });
        }
    }
    (tree, tree_index)
}

/// The proof of the leaf at `tree_index` in a tree array: siblings from the leaf to the root.
fn proof_at(tree: &[Hash], mut i: usize) -> Vec<Hash> {
    let mut proof = Vec::new();
    while i > 0 {
        let sibling = if i % 2 == 1 { i + 1 } else { i - 1 };
        proof.push(tree[sibling]);
        i = (i - 1) / 2;
    }
    proof
}

/// StandardMerkleTree with leaf encoding `["bytes32"]` — what `DatanetRegistry` anchors per
/// Datanet and epoch: the content hashes it accepted.
#[derive(Debug, Clone)]
pub struct Bytes32Tree {
    tree: Vec<Hash>,
    values: Vec<Hash>,
    tree_index: Vec<usize>,
}

/// `keccak256(bytes.concat(keccak256(abi.encode(value))))` for a `bytes32` value.
pub fn bytes32_leaf_hash(value: &Hash) -> Hash {
    keccak(&keccak(value))
}

impl Bytes32Tree {
    pub fn of(values: Vec<Hash>) -> Result<Self, MerkleError> {
        if values.is_empty() {
            return Err(MerkleError::Empty);
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut hashes = vec![[0u8; 32]; values.len()];
        fill(&mut hashes, threads, |i| bytes32_leaf_hash(&values[i]));
        let (tree, tree_index) = build(hashes, threads);
        Ok(Self {
            tree,
            values,
            tree_index,
        })
    }

    pub fn root(&self) -> Hash {
        self.tree[0]
    }

    /// The input index of `value`.
    pub fn position(&self, value: &Hash) -> Option<usize> {
        self.values.iter().position(|v| v == value)
    }

    /// The proof of value `index` (input order).
    pub fn proof(&self, index: usize) -> Option<Vec<Hash>> {
        Some(proof_at(&self.tree, *self.tree_index.get(index)?))
    }

    /// The tree in `@openzeppelin/merkle-tree`'s dump format.
    pub fn dump(&self) -> Value {
        json!({
            "format": "standard-v1",
            "leafEncoding": ["bytes32"],
            "tree": self.tree.iter().map(hex0x).collect::<Vec<_>>(),
            "values": self.values.iter().zip(&self.tree_index).map(|(v, &i)| json!({
                "value": [hex0x(v)],
                "treeIndex": i,
            })).collect::<Vec<_>>(),
        })
    }
}

/// `out[i] = f(i)` for every `i`, on up to `threads` threads.
fn fill(out: &mut [Hash], threads: usize, f: impl Fn(usize) -> Hash + Sync) {
    fill_from(out, threads, f)
}

fn fill_from(out: &mut [Hash], threads: usize, f: impl Fn(usize) -> Hash + Sync) {
    if threads == 1 || out.len() < PARALLEL_MIN {
        out.iter_mut().enumerate().for_each(|(i, h)| *h = f(i));
        return;
    }
    let chunk = out.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (k, h) in part.iter_mut().enumerate() {
                    *h = f(c * chunk + k);
                }
            });
        }
    });
}

/// `0x`-prefixed lowercase hex.
pub fn hex0x(bytes: impl AsRef<[u8]>) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// The EIP-55 mixed-case checksum form of an address.
pub fn checksum_address(account: &Account) -> String {
    let lower = hex::encode(account);
    let digest = keccak(lower.as_bytes());
    let mut out = String::with_capacity(42);
    out.push_str("0x");
    for (i, c) in lower.chars().enumerate() {
        let nibble = (digest[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0xf;
        let _ = out.write_char(if nibble >= 8 {
            c.to_ascii_uppercase()
        } else {
            c
        });
    }
    out
}

/// Parses an address: `0x` and 40 hex digits; a mixed-case one must carry a valid EIP-55
/// checksum (as ethers requires).
pub fn parse_address(text: &str) -> Result<Account, String> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .ok_or_else(|| format!("address {t:?} does not start with 0x"))?;
    let mut account = [0u8; 20];
    if digits.len() != 40 {
        return Err(format!("address {t:?} is not 20 bytes (40 hex digits)"));
    }
    hex::decode_to_slice(digits, &mut account).map_err(|_| format!("address {t:?} is not hex"))?;
    let mixed = digits.bytes().any(|b| b.is_ascii_lowercase())
        && digits.bytes().any(|b| b.is_ascii_uppercase());
    if mixed && checksum_address(&account)[2..] != *digits {
        return Err(format!("address {t:?} has a wrong EIP-55 checksum"));
    }
    Ok(account)
}

/// Reads reward leaves from CSV text: one `address,amount` per line (amount a decimal or `0x`
/// integer in the token's smallest unit), an optional `address,amount` header, blank lines
/// skipped. Errors name the 1-based line. Large files are parsed on every core, in line order.
pub fn parse_leaves_csv(text: &str) -> Result<Vec<Leaf>, MerkleError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Pieces that end at line ends, each with the number of its first line.
    let mut pieces = Vec::new();
    let (mut start, mut first_line) = (0usize, 1usize);
    let target = (text.len() / threads).max(1 << 20);
    while start < text.len() {
        let mut end = (start + target).min(text.len());
        end = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
        pieces.push((first_line, &text[start..end]));
        first_line += text[start..end].bytes().filter(|&b| b == b'\n').count();
        start = end;
    }
    let parsed: Vec<Result<Vec<Leaf>, MerkleError>> = std::thread::scope(|s| {
        let handles: Vec<_> = pieces
            .iter()
            .enumerate()
            .map(|(k, &(line, piece))| s.spawn(move || parse_lines(piece, line, k == 0)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("parser thread"))
            .collect()
    });
    let mut leaves = Vec::new();
    for piece in parsed {
        leaves.extend(piece?);
    }
    if leaves.is_empty() {
        return Err(MerkleError::Empty);
    }
    Ok(leaves)
}

/// The leaves of `text`, whose first line is line `first_line`; a header is allowed only when
/// `may_have_header` (the file's first piece) and before any leaf.
fn parse_lines(
    text: &str,
    first_line: usize,
    may_have_header: bool,
) -> Result<Vec<Leaf>, MerkleError> {
    let mut leaves = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = first_line + n;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fail = |reason: String| MerkleError::Line {
            line: line_no,
            reason,
        };
        let mut fields = line.split(',');
        let (Some(address), Some(amount), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(fail(format!(
                "expected two fields `address,amount`, got {line:?}"
            )));
        };
        if may_have_header && leaves.is_empty() && address.trim().eq_ignore_ascii_case("address") {
            continue; // header
        }
        let account = parse_address(address).map_err(fail)?;
        let amount = Amount::parse(amount).map_err(|e: AmountError| fail(e.to_string()))?;
        leaves.push(Leaf { account, amount });
    }
    Ok(leaves)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(i: u64, amount: u128) -> Leaf {
        let mut account = [0u8; 20];
        account[..8].copy_from_slice(&keccak(&i.to_le_bytes())[..8]);
        Leaf {
            account,
            amount: Amount::from(amount),
        }
    }

    #[test]
    fn every_proof_verifies_and_threads_do_not_change_the_tree() {
        for n in [1usize, 2, 3, 4, 5, 7, 8, 9, 100, 20_000] {
            let leaves: Vec<Leaf> = (0..n as u64).map(|i| leaf(i % 97, i as u128 * 7)).collect();
            let one = StandardMerkleTree::with_threads(leaves.clone(), 1).unwrap();
            let four = StandardMerkleTree::with_threads(leaves.clone(), 4).unwrap();
            assert_eq!(one.tree, four.tree, "{n} leaves");
            for (i, l) in leaves.iter().enumerate() {
                let proof = one.proof(i).unwrap();
                assert!(verify(&one.root(), &l.hash(), &proof), "leaf {i} of {n}");
                // One sibling per level above the leaf: its depth, floor(log2(index + 1)).
                assert_eq!(proof.len(), (one.tree_index[i] + 1).ilog2() as usize);
            }
            let mut wrong = leaves[0];
            wrong.amount = Amount::from(u128::MAX);
            assert!(!verify(&one.root(), &wrong.hash(), &one.proof(0).unwrap()));
        }
        assert_eq!(
            StandardMerkleTree::of(vec![]).unwrap_err(),
            MerkleError::Empty
        );
    }

    #[test]
    fn one_leaf_is_its_own_root_and_pairs_commute() {
        let l = leaf(1, 5);
        let t = StandardMerkleTree::of(vec![l]).unwrap();
        assert_eq!(t.root(), l.hash());
        assert_eq!(t.proof(0).unwrap(), Vec::<Hash>::new());
        let (a, b) = (leaf(1, 1).hash(), leaf(2, 2).hash());
        assert_eq!(hash_pair(&a, &b), hash_pair(&b, &a));
    }

    #[test]
    fn large_files_parse_in_pieces_in_line_order() {
        let mut csv = String::from("address,amount\n");
        for i in 0..120_000u64 {
            csv.push_str(&format!("0x{:040x},{}\n", i + 1, i * 7));
        }
        assert!(csv.len() > 4 << 20, "several pieces");
        let leaves = parse_leaves_csv(&csv).unwrap();
        assert_eq!(leaves, parse_lines(&csv, 1, true).unwrap());
        assert_eq!(leaves.len(), 120_000);
        assert_eq!(leaves[119_999].amount, Amount::from(119_999 * 7));
        let bad = csv.replace(&format!("0x{:040x},{}\n", 100_001, 100_000 * 7), "0x1,2\n");
        assert!(parse_leaves_csv(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("line 100002: "));
    }

    #[test]
    fn csv_leaves_and_addresses() {
        let csv = "address,amount\n\n0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed,1000\n0xfb6916095ca1df60bb79ce92ce3ea74c37c5d359,0x10\n";
        let leaves = parse_leaves_csv(csv).unwrap();
        assert_eq!(leaves.len(), 2);
        assert_eq!(
            checksum_address(&leaves[1].account),
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
        );
        assert_eq!(leaves[1].amount, Amount::from(16));
        let err = |csv: &str| parse_leaves_csv(csv).unwrap_err().to_string();
        assert_eq!(
            err("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed,1\n0x5aaeb6053F3E94C9b9A09f33669435E7Ef1BeAed,1"),
            "line 2: address \"0x5aaeb6053F3E94C9b9A09f33669435E7Ef1BeAed\" has a wrong EIP-55 checksum"
        );
        assert!(err("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed,-1").starts_with("line 1: "));
        assert!(err("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed")
            .starts_with("line 1: expected two fields"));
        assert!(err("0x1234,5").contains("not 20 bytes"));
        assert_eq!(
            parse_leaves_csv("address,amount\n"),
            Err(MerkleError::Empty)
        );
    }
}
