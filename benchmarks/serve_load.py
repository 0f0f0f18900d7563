"""Load for `ledgerflow serve`: N completions from C client threads (keep-alive HTTP/1.1),
models drawn uniformly from a list or Zipf(s) over it by rank. Prints one JSON line: requests,
completion tokens, wall seconds, tokens/s, latency p50/p99.

    python3 serve_load.py ADDR MODELS_FILE --requests N --clients C --max-tokens T [--zipf S]
"""
import argparse
import http.client
import json
import random
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("models")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=0.0)
    ap.add_argument("--prompt", default="The parties agree that")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    models = [m for m in open(a.models).read().split() if m]
    rng = random.Random(a.seed)
    if a.zipf > 0:
        weights = [1.0 / (r + 1) ** a.zipf for r in range(len(models))]
        picks = rng.choices(models, weights=weights, k=a.requests)
    else:
        picks = [rng.choice(models) for _ in range(a.requests)]
    host, port = a.addr.split(":")
    lock = threading.Lock()
    latencies, tokens, errors, samples = [], [0], [0], {}
    queue = list(enumerate(picks))

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        while True:
            with lock:
                if not queue:
                    return
                i, model = queue.pop()
            body = json.dumps({"model": model, "prompt": a.prompt, "max_tokens": a.max_tokens,
                               "temperature": 0.8, "seed": i, "stop": []})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            dt = time.perf_counter() - t0
            with lock:
                if r.status != 200:
                    errors[0] += 1
                    # A few distinct failures, to say what went wrong.
                    key = (r.status, data[:200].decode("utf-8", "replace"))
                    if len(samples) < 3 or key in samples:
                        samples[key] = samples.get(key, 0) + 1
                else:
                    tokens[0] += json.loads(data)["usage"]["completion_tokens"]
                    latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * (len(latencies) - 1)))] if latencies else None
    print(json.dumps({
        "requests": a.requests, "errors": errors[0], "completion_tokens": tokens[0],
        "wall_s": round(wall, 3), "tokens_per_s": round(tokens[0] / wall, 1),
        "latency_p50_s": q(0.5), "latency_p99_s": q(0.99), "distinct_models": len(set(picks)),
        **({"error_samples": [{"status": k[0], "body": k[1], "count": n} for k, n in samples.items()]}
           if samples else {}),
    }))


if __name__ == "__main__":
    main()
