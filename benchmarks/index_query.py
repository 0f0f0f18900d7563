"""count and attribute queries with infini-gram's engine (PyPI wheel), one thread of queries.

usage: index_query.py INDEX_DIR QUERIES.txt OUTPUTS.txt ROUNDS
prints "infini-gram count QPS queries/s median_us P50 p99_us P99 total N" (each query timed on
its own, best round) and "infini-gram attribute median_ms M spans S" (maximal spans of each
200-token output, min_len 4, max_cnt 1000).
"""
import statistics
import sys
import time

from infini_gram.engine import InfiniGramEngine

index_dir, path, outputs_path, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
read = lambda p: [[int(t) for t in line.split(",")] for line in open(p) if line.strip()]
queries, outputs = read(path), read(outputs_path)
engine = InfiniGramEngine(index_dir=index_dir, eos_token_id=0)
best, lat, total = 0.0, None, 0
for _ in range(rounds):
    times, total = [], 0
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        total += engine.count(input_ids=q)["count"]
        times.append(time.perf_counter() - t)
    qps = len(queries) / (time.perf_counter() - t0)
    if qps > best:
        best, lat = qps, sorted(times)
p50, p99 = lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6
print(f"infini-gram count {best:.0f} queries/s median_us {p50:.1f} p99_us {p99:.1f} total {total}")
best_att, spans = None, 0
for _ in range(rounds):
    times, spans = [], 0
    for ids in outputs:
        t = time.perf_counter()
        r = engine.attribute(input_ids=ids, delim_ids=[], min_len=4, max_cnt=1000, enforce_bow=False)
        times.append(time.perf_counter() - t)
        spans += len(r["spans"])
    m = statistics.median(times) * 1e3
    best_att = m if best_att is None else min(best_att, m)
print(f"infini-gram attribute median_ms {best_att:.3f} spans {spans}")
