//! How the ring moves buffers between ranks: a trait the ring driver is written against, and
//! [`SimRing`], threads joined by channels, which runs the driver for any number of ranks on the CPU.

use crate::error::DistError;
use std::sync::mpsc::{channel, Receiver, Sender};

/// One rank's end of a ring of `ranks()` ranks.
pub trait Transport {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    /// Starts sending `send` to rank + 1 and receiving `recv_len` elements from rank - 1; the caller
    /// computes meanwhile. Every rank starts its shifts in the same order.
    fn start_shift(&mut self, send: &[f64], recv_len: usize) -> Result<(), DistError>;
    /// Waits for the shift started last and returns what rank - 1 sent.
    fn finish_shift(&mut self) -> Result<Vec<f64>, DistError>;
}

/// A ring of threads in one process: each shift is a channel send to the next rank and a receive
/// from the previous one.
pub struct SimRing;

/// A rank of a [`SimRing`].
pub struct SimTransport {
    rank: usize,
    ranks: usize,
    to_next: Sender<Vec<f64>>,
    from_prev: Receiver<Vec<f64>>,
    expected: Option<usize>,
    /// Elements sent so far.
    pub sent: usize,
}

impl SimRing {
    /// Runs `body` once per rank, each on its own thread, and returns the results in rank order.
    pub fn run<R: Send>(ranks: usize, body: impl Fn(&mut SimTransport) -> R + Sync) -> Vec<R> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel::<Vec<f64>>()).unzip();
        // Rank r sends into channel r + 1 and receives from channel r.
        let ends: Vec<SimTransport> = receivers
            .into_iter()
            .enumerate()
            .map(|(rank, from_prev)| SimTransport {
                rank,
                ranks,
                to_next: senders[(rank + 1) % ranks].clone(),
                from_prev,
                expected: None,
                sent: 0,
            })
            .collect();
        drop(senders);
        let body = &body;
        std::thread::scope(|scope| {
            // Each thread owns its end, so a rank that stops drops its sender and its neighbour's
            // receive fails instead of waiting for ever.
            let handles: Vec<_> = ends.into_iter().map(|mut end| scope.spawn(move || body(&mut end))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        })
    }
}

impl Transport for SimTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn start_shift(&mut self, send: &[f64], recv_len: usize) -> Result<(), DistError> {
        if self.expected.is_some() {
            return Err(self.error("a shift was started before the last one finished".into()));
        }
        self.to_next.send(send.to_vec()).map_err(|_| self.error("rank + 1 has stopped".into()))?;
        self.sent += send.len();
        self.expected = Some(recv_len);
        Ok(())
    }

    fn finish_shift(&mut self) -> Result<Vec<f64>, DistError> {
        let expected = self.expected.take().ok_or_else(|| self.error("no shift was started".into()))?;
        let got = self.from_prev.recv().map_err(|_| self.error("rank - 1 has stopped".into()))?;
        if got.len() != expected {
            return Err(self.error(format!("received {} elements, expected {expected}", got.len())));
        }
        Ok(got)
    }
}

impl SimTransport {
    fn error(&self, reason: String) -> DistError {
        DistError::Transport { rank: self.rank, reason }
    }
}
