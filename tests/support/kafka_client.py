"""An outside Kafka client for the integration tests and benchmarks (confluent-kafka).

    kafka_client.py create   --brokers B --topic T --partitions N
    kafka_client.py produce  --brokers B --topic T --file F     # one record per line, keyed by a hash of its content
    kafka_client.py consume  --brokers B --topic T --expect N   # prints one JSON object per record: key, value, headers
"""
import argparse
import hashlib
import json
import sys
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic


def create(args):
    admin = AdminClient({"bootstrap.servers": args.brokers})
    futures = admin.create_topics([NewTopic(args.topic, num_partitions=args.partitions, replication_factor=1)])
    for topic, f in futures.items():
        try:
            f.result(30)
        except Exception as e:  # already exists is fine
            if "TOPIC_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
                raise
    # Wait until the metadata shows every partition.
    deadline = time.time() + 30
    while time.time() < deadline:
        md = admin.list_topics(args.topic, timeout=5)
        t = md.topics.get(args.topic)
        if t is not None and t.error is None and len(t.partitions) == args.partitions:
            return
        time.sleep(0.2)
    sys.exit(f"topic {args.topic} did not show {args.partitions} partitions")


def content_key(line: bytes) -> bytes:
    # Key by a hash of the content so exact duplicates meet in one partition; any stable hash
    # works for partitioning (ledgerflow's own producer uses keccak256).
    try:
        content = json.loads(line)["content"].encode()
    except Exception:
        content = line
    return hashlib.sha256(content).hexdigest().encode()


def produce(args):
    p = Producer({"bootstrap.servers": args.brokers, "linger.ms": 10, "batch.size": 1000000,
                  "queue.buffering.max.messages": 1000000, "acks": "all"})
    failed = []

    def report(err, msg):
        if err is not None:
            failed.append(str(err))

    n = 0
    with open(args.file, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if not line:
                continue
            while True:
                try:
                    p.produce(args.topic, value=line, key=content_key(line), on_delivery=report)
                    break
                except BufferError:
                    p.poll(0.05)
            n += 1
            if n % 10000 == 0:
                p.poll(0)
    left = p.flush(120)
    if left or failed:
        sys.exit(f"{left} undelivered, {len(failed)} failed: {failed[:3]}")
    print(n)


def consume(args):
    c = Consumer({"bootstrap.servers": args.brokers, "group.id": f"check-{time.time()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([args.topic])
    got = 0
    deadline = time.time() + args.timeout
    while time.time() < deadline and (args.expect is None or got < args.expect):
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        got += 1
        headers = {k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in (m.headers() or [])}
        print(json.dumps({"key": (m.key() or b"").decode("utf-8", "replace"),
                          "value": m.value().decode("utf-8", "replace"), "headers": headers}))
    c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["create", "produce", "consume"])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--file")
    ap.add_argument("--expect", type=int)
    ap.add_argument("--timeout", type=float, default=30)
    args = ap.parse_args()
    {"create": create, "produce": produce, "consume": consume}[args.command](args)


if __name__ == "__main__":
    main()
