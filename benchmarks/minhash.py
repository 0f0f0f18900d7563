"""MinHash signatures per second on one core for rensa (R-MinHash) and datasketch, on the
contents of a contributions file: word 5-gram shingles, NUM_PERM permutations, best of ROUNDS.

    python benchmarks/minhash.py FILE [ROUNDS] [NUM_PERM]

Rows: rensa end to end (Python shingling + its bulk digest call), rensa's digest call alone on
shingles built beforehand (what rensa itself costs), datasketch end to end (update_batch)."""
import json
import re
import sys
import time

import datasketch
import rensa

WORD = re.compile(r"\w+")


def shingles(text, n=5):
    words = WORD.findall(text.lower())
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def best_of(rounds, f):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    path = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    num_perm = int(sys.argv[3]) if len(sys.argv) > 3 else 112
    docs = []
    with open(path) as f:
        for line in f:
            try:
                docs.append(json.loads(line)["content"])
            except (ValueError, KeyError, TypeError):
                pass
    n = len(docs)

    def rensa_all():
        rensa.RMinHash.digest_matrix_from_token_sets(
            [shingles(d) for d in docs], num_perm=num_perm, seed=42
        )

    pre = [shingles(d) for d in docs]

    def rensa_digest_only():
        rensa.RMinHash.digest_matrix_from_token_sets(pre, num_perm=num_perm, seed=42)

    def datasketch_all():
        for d in docs:
            m = datasketch.MinHash(num_perm=num_perm, seed=42)
            m.update_batch([s.encode() for s in shingles(d)])
            m.digest()

    print(f"rensa {n} docs {n / best_of(rounds, rensa_all):.0f} docs/s")
    print(f"rensa-digest-only {n} docs {n / best_of(rounds, rensa_digest_only):.0f} docs/s")
    print(f"datasketch {n} docs {n / best_of(max(1, rounds // 2), datasketch_all):.0f} docs/s")


if __name__ == "__main__":
    main()
