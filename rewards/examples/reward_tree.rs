//! `ledgerflow rewards tree --leaves FILE.csv` without the rest of the CLI (what
//! `benchmarks/merkle.sh` times, so the benchmark builds only this crate): reads the leaves,
//! builds the tree, prints the root.
//!
//! usage: reward_tree FILE.csv

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: reward_tree FILE.csv");
    let text = std::fs::read_to_string(&path).expect("read the leaves");
    let leaves = ledgerflow_rewards::merkle::parse_leaves_csv(&text).expect("leaves");
    let tree = ledgerflow_rewards::StandardMerkleTree::of(leaves).expect("tree");
    println!("{}", ledgerflow_rewards::merkle::hex0x(tree.root()));
}
