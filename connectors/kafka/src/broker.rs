//! The embedded broker: librdkafka's in-process mock cluster, reachable on a fixed port.
//!
//! The mock cluster listens on an ephemeral port; a forwarder on the requested port relays
//! bootstrap connections to it (clients then follow the advertised broker address as usual).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use tokio::net::{TcpListener, TcpStream};

use crate::KafkaError;

/// A running embedded broker. Dropping it stops the cluster.
pub struct EmbeddedBroker {
    /// The client that owns the mock cluster (`test.mock.num.brokers`): the cluster lives
    /// exactly as long as it.
    owner: BaseProducer,
    bootstrap: String,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

/// Sets the mock coordinator's `group.initial.rebalance.delay.ms` to zero. Its default (3 s, as
/// on a real broker) holds every first consumer of a group for 3 s, which on a one-process
/// development broker only delays the quick start; rdkafka has no safe wrapper for it.
#[allow(unsafe_code)]
fn no_initial_rebalance_delay(owner: &BaseProducer) -> Result<(), KafkaError> {
    // SAFETY: `native_ptr` is the live handle of `owner`, borrowed for this call; librdkafka
    // returns the mock cluster that handle owns (or null, checked), valid while `owner` lives,
    // and the setter only stores an integer under the cluster's lock.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        if cluster.is_null() {
            return Err(KafkaError::Broker("the mock cluster did not start".into()));
        }
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
    }
    Ok(())
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster. With `port`, a forwarder on `127.0.0.1:port` is started on the
    /// current tokio runtime and becomes the bootstrap address.
    pub async fn start(port: Option<u16>) -> Result<Self, KafkaError> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .create()
            .map_err(KafkaError::client("starting the mock cluster"))?;
        no_initial_rebalance_delay(&owner)?;
        let inner = owner
            .client()
            .mock_cluster()
            .ok_or_else(|| KafkaError::Broker("the mock cluster did not start".into()))?
            .bootstrap_servers();
        let (bootstrap, forwarder) = match port {
            None => (inner, None),
            Some(port) => {
                let listener = TcpListener::bind(("127.0.0.1", port)).await.map_err(|e| {
                    KafkaError::Broker(format!("cannot listen on 127.0.0.1:{port}: {e}"))
                })?;
                let port = listener
                    .local_addr()
                    .map_err(|e| KafkaError::Broker(e.to_string()))?
                    .port();
                let target = inner.clone();
                let task = tokio::spawn(async move {
                    while let Ok((mut client, _)) = listener.accept().await {
                        let target = target.clone();
                        // The relay lives as long as the connection; it is owned by the runtime.
                        tokio::spawn(async move {
                            if let Ok(mut upstream) = TcpStream::connect(&target).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            }
                        });
                    }
                });
                (format!("127.0.0.1:{port}"), Some(task))
            }
        };
        Ok(Self {
            owner,
            bootstrap,
            forwarder,
        })
    }

    /// The address clients bootstrap from.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates `topic` with `partitions` partitions (the mock broker has no CreateTopics API).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        self.owner
            .client()
            .mock_cluster()
            .ok_or_else(|| KafkaError::Broker("the mock cluster is gone".into()))?
            .create_topic(topic, partitions, 1)
            .map_err(KafkaError::client(format!("creating topic {topic}")))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(t) = self.forwarder.take() {
            t.abort();
        }
    }
}

/// Waits until `bootstrap` accepts TCP connections, at most `timeout`.
pub async fn wait_reachable(bootstrap: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let first = bootstrap.split(',').next().unwrap_or(bootstrap).to_string();
    while tokio::time::Instant::now() < deadline {
        if TcpStream::connect(&first).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
