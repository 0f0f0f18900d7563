//! A channel bounded by rows, not by message count (so one huge batch cannot hide behind a
//! small count, and many tiny ones do not stall): a sender waits until the receiver has released
//! enough rows. Signals cost one row, so a stream of signals is bounded too.
//!
//! Every channel of a process also draws on one shared [`ByteBudget`]: the Arrow memory of the
//! batches in flight over all partitions, so memory stays bounded however many partitions a
//! process is given (a per-channel row bound alone multiplies with the partition count).

use std::sync::Arc;

use ledgerflow_operators::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// The receiving half gets each message with the permit that holds its rows; dropping the permit
/// (after processing) lets the sender go on.
pub struct Permitted {
    pub message: Message,
    _permit: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Bytes of batches in flight, shared by every channel of a process (counted in KiB).
#[derive(Clone)]
pub struct ByteBudget {
    kib: Arc<Semaphore>,
    capacity_kib: u32,
}

impl ByteBudget {
    pub fn new(bytes: u64) -> Self {
        let capacity_kib = (bytes / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        Self {
            kib: Arc::new(Semaphore::new(capacity_kib as usize)),
            capacity_kib,
        }
    }

    /// What `message` costs: its Arrow memory, rounded up to KiB; a batch larger than the whole
    /// budget takes all of it (and so travels alone).
    fn cost(&self, message: &Message) -> u32 {
        match message {
            Message::Data(b) => {
                let kib = (b.get_array_memory_size() as u64).div_ceil(1024);
                kib.min(u64::from(self.capacity_kib)) as u32
            }
            _ => 0,
        }
    }

    /// Bytes (KiB granularity) currently in flight.
    pub fn in_flight(&self) -> u64 {
        (u64::from(self.capacity_kib) - self.kib.available_permits() as u64) * 1024
    }
}

pub struct RowSender {
    rows: Arc<Semaphore>,
    capacity: u32,
    bytes: ByteBudget,
    tx: mpsc::UnboundedSender<Permitted>,
}

pub struct RowReceiver {
    rx: mpsc::UnboundedReceiver<Permitted>,
}

/// Receiver is gone.
#[derive(Debug)]
pub struct Closed;

/// A channel holding at most `capacity_rows` rows in flight, drawing on `bytes` for their memory.
pub fn row_channel(capacity_rows: usize, bytes: ByteBudget) -> (RowSender, RowReceiver) {
    let capacity = capacity_rows.clamp(1, u32::MAX as usize) as u32;
    let (tx, rx) = mpsc::unbounded_channel();
    (
        RowSender {
            rows: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            bytes,
            tx,
        },
        RowReceiver { rx },
    )
}

impl RowSender {
    fn cost(&self, m: &Message) -> u32 {
        (m.rows().max(1) as u32).min(self.capacity)
    }

    /// Sends, waiting for room (rows in this channel, then bytes in the process).
    pub async fn send(&self, message: Message) -> Result<(), Closed> {
        let permit = self
            .rows
            .clone()
            .acquire_many_owned(self.cost(&message))
            .await
            .map_err(|_| Closed)?;
        let bytes = self
            .bytes
            .kib
            .clone()
            .acquire_many_owned(self.bytes.cost(&message))
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Permitted {
                message,
                _permit: permit,
                _bytes: bytes,
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
        let (tx, mut rx) = row_channel(100, ByteBudget::new(1 << 30));
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

    #[tokio::test]
    async fn channels_share_one_byte_budget() {
        let budget = ByteBudget::new(64 * 1024);
        let (a, mut ra) = row_channel(1 << 20, budget.clone());
        let (b, rb) = row_channel(1 << 20, budget.clone());
        // 10,000 i32 ≈ 40 KiB of Arrow memory.
        a.send(batch(10_000)).await.unwrap();
        assert!(budget.in_flight() >= 39 * 1024, "{}", budget.in_flight());
        // Another channel of the same process must wait for the first batch to be processed.
        let blocked = tokio::time::timeout(Duration::from_millis(50), b.send(batch(10_000))).await;
        assert!(blocked.is_err());
        // Signals cost no bytes.
        b.send(Message::Signal(Signal::EndOfData)).await.unwrap();
        drop(ra.recv().await.unwrap());
        b.send(batch(10_000)).await.unwrap();
        // Larger than the whole budget: waits until everything else is released, then goes
        // alone.
        drop(ra);
        let (c, mut rc) = row_channel(1 << 20, budget.clone());
        let big = tokio::spawn(async move { c.send(batch(100_000)).await.map(|()| c) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!big.is_finished(), "b's batch still holds its bytes");
        drop(rb); // drops b's queued batch, and with it its bytes
        let c = big.await.unwrap().unwrap();
        assert_eq!(budget.in_flight(), 64 * 1024);
        drop(rc.recv().await.unwrap());
        assert_eq!(budget.in_flight(), 0);
        drop(c);
    }
}
