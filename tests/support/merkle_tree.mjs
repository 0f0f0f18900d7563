// The reference for `ledgerflow rewards tree`: OpenZeppelin's StandardMerkleTree from npm
// (@openzeppelin/merkle-tree), leaves ["address", "uint256"], read from a CSV of
// `address,amount` lines (optional `address,amount` header); a file of single values (0x… 32-byte
// hex, one per line) is read as leaves ["bytes32"] instead (DatanetRegistry's content roots).
//   node merkle_tree.mjs FILE.csv          prints {"root", "proofs" (one per leaf, file order), "dump"}
//   node merkle_tree.mjs --time FILE.csv   prints "leaves N build_ms T root R" (benchmarks/merkle.sh)
// NODE_PATH must point at a node_modules holding @openzeppelin/merkle-tree (scripts/test.sh).
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const { StandardMerkleTree } = require("@openzeppelin/merkle-tree");

const args = process.argv.slice(2);
const time = args[0] === "--time";
const file = time ? args[1] : args[0];
const values = fs
  .readFileSync(file, "utf8")
  .split("\n")
  .map((l) => l.trim())
  .filter((l) => l && !/^address,/i.test(l))
  .map((l) => l.split(","));

const encoding = values.length && values[0].length === 1 ? ["bytes32"] : ["address", "uint256"];

if (time) {
  const t0 = process.hrtime.bigint();
  const tree = StandardMerkleTree.of(values, ["address", "uint256"]);
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`leaves ${values.length} build_ms ${ms.toFixed(1)} root ${tree.root}`);
} else {
  const tree = StandardMerkleTree.of(values, encoding);
  const proofs = values.map((_, i) => tree.getProof(i));
  console.log(JSON.stringify({ root: tree.root, proofs, dump: tree.dump() }));
}
