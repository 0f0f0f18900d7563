"""Turns generated contributions into infini-gram's tokenized input, plus count queries.

usage: index_tokenize.py CONTRIBUTIONS.jsonl OUT_DIR QUERIES
Word-level tokens (ids in order of first appearance, folded into [0, 65534) beyond that), every
document preceded by the separator 0xFFFF, as infini-gram's tokenizing step writes them:
OUT_DIR/tokenized.0 and OUT_DIR/offset.0. Writes QUERIES n-grams (1 to 20 tokens) sampled from
the corpus with a fixed seed to OUT_DIR/queries.txt, one comma-separated query per line, and
100 "model outputs" of 200 tokens (pieces of 10-60 tokens of random documents joined by random
tokens) to OUT_DIR/outputs.txt.
"""
import array
import json
import os
import random
import sys

src, out, nq = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(out, exist_ok=True)
vocab = {}
tokens = array.array("H")
offsets = array.array("Q")
docs = []
with open(src) as f:
    for line in f:
        try:
            text = json.loads(line)["content"]
        except (ValueError, KeyError):
            continue
        ids = []
        for w in text.split():
            i = vocab.setdefault(w, len(vocab))
            ids.append(i if i < 65534 else hash(w) % 65534)
        offsets.append(len(tokens) * 2)
        tokens.append(0xFFFF)
        tokens.extend(ids)
        docs.append(ids)
with open(os.path.join(out, "tokenized.0"), "wb") as f:
    tokens.tofile(f)
with open(os.path.join(out, "offset.0"), "wb") as f:
    offsets.tofile(f)
rng = random.Random(7)
with open(os.path.join(out, "queries.txt"), "w") as f:
    for _ in range(nq):
        d = docs[rng.randrange(len(docs))]
        a = rng.randrange(len(d))
        f.write(",".join(map(str, d[a:a + rng.randint(1, 20)])) + "\n")
with open(os.path.join(out, "outputs.txt"), "w") as f:
    for _ in range(100):
        ids = []
        while len(ids) < 200:
            d = docs[rng.randrange(len(docs))]
            a = rng.randrange(len(d))
            ids.extend(d[a:a + rng.randint(10, 60)])
            ids.append(rng.randrange(65534))
        f.write(",".join(map(str, ids[:200])) + "\n")
print(f"{len(docs)} documents, {len(tokens)} tokens, {len(vocab)} distinct words")
