"""count queries per second with infini-gram's engine (PyPI wheel), one thread of queries.

usage: index_query.py INDEX_DIR QUERIES.txt ROUNDS → "infini-gram N queries/s total_count"
"""
import sys
import time

from infini_gram.engine import InfiniGramEngine

index_dir, path, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
queries = [[int(t) for t in line.split(",")] for line in open(path) if line.strip()]
engine = InfiniGramEngine(index_dir=index_dir, eos_token_id=0)
best, total = 0.0, 0
for _ in range(rounds):
    t = time.perf_counter()
    total = sum(engine.count(input_ids=q)["count"] for q in queries)
    best = max(best, len(queries) / (time.perf_counter() - t))
print(f"infini-gram {best:.0f} queries/s {total}")
