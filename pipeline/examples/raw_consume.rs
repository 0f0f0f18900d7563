//! The raw-consume baseline of `benchmarks/ingest.sh`: a plain librdkafka consumer that reads
//! every partition of a topic from the beginning and throws the records away, as
//! `kcat -C -o beginning -e > /dev/null` does (kcat's librdkafka cannot talk to Tansu).
//!
//!     cargo run --release -p ledgerflow --example raw_consume -- BROKERS TOPIC COUNT

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, count] = args.as_slice() else {
        return Err("usage: raw_consume BROKERS TOPIC COUNT".into());
    };
    let want: u64 = count.parse()?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "raw-consume")
        .set("enable.auto.commit", "false")
        // The same fetch settings as ledgerflow's source, so both wait on the broker alike.
        .set("queued.max.messages.kbytes", "65536")
        .set("fetch.wait.max.ms", "50")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    while n < want {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
            bytes += m.payload_len() as u64;
        }
        if started.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
    eprintln!(
        "{n} records, {bytes} bytes in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    println!("{n}");
    Ok(())
}
