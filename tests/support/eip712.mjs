// The outside wallet library (ethers v6, from npm) for the EIP-712 cross-check:
//   node eip712.mjs verify FILE [CHAIN_ID] [VERIFYING_CONTRACT]
//       checks every contribution's signature with ethers.verifyTypedData; prints "ok N bad M"
//       and one "bad LINE REASON" per failure
//   node eip712.mjs sign FILE OUT [CHAIN_ID] [VERIFYING_CONTRACT]
//       re-signs every contribution of FILE with TEST wallets derived by ethers from a public
//       mnemonic (never use them for real funds), setting `contributor` to the signer
// NODE_PATH must point at a node_modules with ethers and canonicalize (scripts/test.sh does).
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const { ethers } = require("ethers");
const canonicalize = require("canonicalize");

const [cmd, file, a, b, c] = process.argv.slice(2);
const domainOf = (chainId, contract) => ({
  name: "ledgerflow",
  version: "1",
  chainId: BigInt(chainId || 31337),
  verifyingContract: contract || ethers.ZeroAddress,
});
const types = {
  Contribution: [
    { name: "datanet", type: "string" },
    { name: "contentHash", type: "bytes32" },
    { name: "metadataHash", type: "bytes32" },
    { name: "nonce", type: "uint256" },
    { name: "issuedAt", type: "uint64" },
    { name: "expiresAt", type: "uint64" },
  ],
};
const valueOf = (m) => ({
  datanet: m.datanet,
  contentHash: ethers.keccak256(ethers.toUtf8Bytes(m.content)),
  metadataHash:
    m.metadata === undefined || m.metadata === null
      ? ethers.ZeroHash
      : ethers.keccak256(ethers.toUtf8Bytes(canonicalize(m.metadata))),
  nonce: BigInt(m.nonce),
  issuedAt: BigInt(m.issued_at),
  expiresAt: BigInt(m.expires_at),
});
// Nonces can exceed 2^53: parse them as strings first.
const parse = (line) => JSON.parse(line.replace(/"(nonce|issued_at|expires_at)":(\d+)/g, '"$1":"$2"'));
const lines = fs.readFileSync(file, "utf8").split("\n").filter((l) => l.length > 0);

if (cmd === "verify") {
  const domain = domainOf(a, b);
  let ok = 0;
  const bad = [];
  lines.forEach((line, i) => {
    try {
      const m = parse(line);
      const signer = ethers.verifyTypedData(domain, types, valueOf(m), m.signature);
      if (signer.toLowerCase() === m.contributor.toLowerCase()) ok++;
      else bad.push(`bad ${i + 1} signer ${signer.toLowerCase()} != ${m.contributor}`);
    } catch (e) {
      bad.push(`bad ${i + 1} ${String(e.shortMessage || e.message).split("\n")[0]}`);
    }
  });
  console.log(`ok ${ok} bad ${bad.length}`);
  bad.forEach((l) => console.log(l));
} else if (cmd === "sign") {
  const domain = domainOf(b, c);
  const mnemonic = ethers.Mnemonic.fromPhrase("test test test test test test test test test test test junk");
  const wallets = [0, 1, 2, 3].map((k) => ethers.HDNodeWallet.fromMnemonic(mnemonic, `m/44'/60'/0'/0/${k}`));
  const out = [];
  for (const [i, line] of lines.entries()) {
    const m = parse(line);
    const w = wallets[i % wallets.length];
    m.contributor = w.address.toLowerCase();
    m.signature = await w.signTypedData(domain, types, valueOf(m));
    out.push(JSON.stringify(m).replace(/"(nonce|issued_at|expires_at)":"(\d+)"/g, '"$1":$2'));
  }
  fs.writeFileSync(a, out.join("\n") + "\n");
  console.log(`signed ${out.length}`);
} else {
  console.error("usage: eip712.mjs verify FILE [CHAIN_ID] [CONTRACT] | sign FILE OUT [CHAIN_ID] [CONTRACT]");
  process.exit(2);
}
