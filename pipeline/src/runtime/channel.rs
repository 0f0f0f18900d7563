//! A channel bounded by rows, not by message count (so one huge batch cannot hide behind a
//! small count, and many tiny ones do not stall): a sender waits until the receiver has released
//! enough rows. Signals cost one row, so a stream of signals is bounded too.

use std::sync::Arc;

use ledgerflow_operators::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// The receiving half gets each message with the permit that holds its rows; dropping the permit
/// (after processing) lets the sender go on.
pub struct Permitted {
    pub message: Message,
    _permit: OwnedSemaphorePermit,
}

pub struct RowSender {
    rows: Arc<Semaphore>,
    capacity: u32,
    tx: mpsc::UnboundedSender<Permitted>,
}

pub struct RowReceiver {
    rx: mpsc::UnboundedReceiver<Permitted>,
}

/// Receiver is gone.
#[derive(Debug)]
pub struct Closed;

/// A channel holding at most `capacity_rows` rows in flight.
pub fn row_channel(capacity_rows: usize) -> (RowSender, RowReceiver) {
    let capacity = capacity_rows.clamp(1, Semaphore::MAX_PERMITS) as u32;
    let (tx, rx) = mpsc::unbounded_channel();
    (
        RowSender {
            rows: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            tx,
        },
        RowReceiver { rx },
    )
}

impl RowSender {
    fn cost(&self, m: &Message) -> u32 {
        (m.rows().max(1) as u32).min(self.capacity)
    }

    /// Sends, waiting for room.
    pub async fn send(&self, message: Message) -> Result<(), Closed> {
        let permit = self
            .rows
            .clone()
            .acquire_many_owned(self.cost(&message))
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Permitted {
                message,
                _permit: permit,
            })
            .map_err(|_| Closed)
    }

    /// Sends from a thread outside any runtime, blocking it while there is no room.
    pub fn blocking_send(
        &self,
        handle: &tokio::runtime::Handle,
        message: Message,
    ) -> Result<(), Closed> {
        handle.block_on(self.send(message))
    }

    /// Rows currently in flight.
    pub fn in_flight(&self) -> usize {
        self.capacity as usize - self.rows.available_permits()
    }
}

impl RowReceiver {
    pub async fn recv(&mut self) -> Option<Permitted> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, RecordBatch};
    use ledgerflow_operators::Signal;
    use std::time::Duration;

    fn batch(n: i32) -> Message {
        let a = Int32Array::from((0..n).collect::<Vec<_>>());
        Message::Data(RecordBatch::try_from_iter([("a", Arc::new(a) as _)]).unwrap())
    }

    #[tokio::test]
    async fn bounded_by_rows() {
        let (tx, mut rx) = row_channel(100);
        tx.send(batch(60)).await.unwrap();
        assert_eq!(tx.in_flight(), 60);
        // 60 + 50 > 100: the second send waits until the first is released.
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.send(batch(50))).await;
        assert!(blocked.is_err());
        let first = rx.recv().await.unwrap();
        assert_eq!(first.message.rows(), 60);
        drop(first);
        tx.send(batch(50)).await.unwrap();
        // Larger than the capacity: takes the whole capacity, still goes through.
        drop(rx.recv().await.unwrap());
        tx.send(batch(500)).await.unwrap();
        drop(rx.recv().await.unwrap());
        tx.send(Message::Signal(Signal::EndOfData)).await.unwrap();
        assert_eq!(tx.in_flight(), 1);
    }
}
