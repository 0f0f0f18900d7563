"""Python baseline of the ingest job, for context: confluent-kafka consumer, json decode,
pyarrow table, zstd Parquet per partition. Same topic, same broker, same shape of output.

    python_ingest.py --brokers B --topic T --expect N --out DIR
"""
import argparse
import hashlib
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer, TopicPartition


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=50000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": f"py-{time.time()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    md = c.list_topics(args.topic, timeout=10)
    parts = [TopicPartition(args.topic, p, 0) for p in md.topics[args.topic].partitions]
    c.assign(parts)
    cols = {k: [] for k in ["content_hash", "datanet", "contributor", "content", "metadata", "nonce",
                            "issued_at", "expires_at", "signature", "kafka_partition", "kafka_offset"]}
    seen = 0
    files = 0

    def flush():
        nonlocal files, cols
        if cols["content"]:
            pq.write_table(pa.table(cols), f"{args.out}/part-{files:05}.parquet", compression="zstd",
                           compression_level=1)
            files += 1
            cols = {k: [] for k in cols}

    while seen < args.expect:
        for m in c.consume(10000, 1.0):
            if m.error():
                continue
            seen += 1
            try:
                d = json.loads(m.value())
                content = d["content"]
                # sha3_256 stands in for keccak256 (same sponge, same cost; hashlib has no keccak)
                cols["content_hash"].append("0x" + hashlib.sha3_256(content.encode()).hexdigest())
                cols["datanet"].append(d["datanet"])
                cols["contributor"].append(d["contributor"].lower())
                cols["content"].append(content)
                cols["metadata"].append(json.dumps(d.get("metadata"), sort_keys=True, separators=(",", ":")))
                cols["nonce"].append(d["nonce"])
                cols["issued_at"].append(d["issued_at"])
                cols["expires_at"].append(d["expires_at"])
                cols["signature"].append(d["signature"].lower())
                cols["kafka_partition"].append(m.partition())
                cols["kafka_offset"].append(m.offset())
            except Exception:
                pass
            if len(cols["content"]) >= args.batch:
                flush()
    flush()
    c.close()
    print(seen)


if __name__ == "__main__":
    main()
