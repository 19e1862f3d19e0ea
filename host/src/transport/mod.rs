//! The host's single view of a transport instance, whatever its backend.
//!
//! Session engines and the router only ever see [`Transport`] and the [`TransportEvent`]
//! stream it produces. The native `abi_stable` backend ([`crate::plugin::native`]) is the
//! first implementation; a WASM component backend (sandboxed framing plugins over a byte
//! stream the host lends) implements the same trait and slots in beside it.

use std::sync::Arc;

use antmesh_plugin_api::{
    BatchResult, Capabilities, LinkAddr, OutFrame, PluginError, RecvSlot, SendError, TransportAddr,
};

/// Something a transport instance reports to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// Frames received, in arrival order.
    Frames(FrameBatch),
    /// A peer became reachable.
    LinkUp(LinkAddr),
    /// A peer became unreachable.
    LinkDown {
        /// The peer.
        peer: LinkAddr,
        /// Why, for operators.
        reason: String,
    },
    /// The instance has room again after `WouldBlock`.
    Writable,
    /// Pull mode: something arrived after [`Transport::recv_pull`] found nothing.
    Readable,
}

/// The frames of one delivery, in arrival order, copied into one buffer.
///
/// A plugin lends the host a batch of frames per `deliver` call; the host keeps them as one
/// allocation for the bytes and one for the senders, not one per frame: a bulk QUIC
/// transfer through the udp plugin delivers ~750,000 datagrams per GiB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameBatch {
    bytes: Vec<u8>,
    /// Each frame's sender and the end of its bytes in `bytes`.
    frames: Vec<(LinkAddr, usize)>,
}

impl FrameBatch {
    /// An empty batch with room for `frames` frames of `bytes` bytes in all.
    pub fn with_capacity(frames: usize, bytes: usize) -> FrameBatch {
        FrameBatch { bytes: Vec::with_capacity(bytes), frames: Vec::with_capacity(frames) }
    }

    /// Appends a frame (its bytes are copied).
    pub fn push(&mut self, from: LinkAddr, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        self.frames.push((from, self.bytes.len()));
    }

    /// Frames in the batch.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the batch holds no frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame `i`: its sender and its bytes.
    pub fn get(&self, i: usize) -> Option<(&LinkAddr, &[u8])> {
        let (from, end) = self.frames.get(i)?;
        let start = if i == 0 { 0 } else { self.frames[i - 1].1 };
        Some((from, self.bytes.get(start..*end)?))
    }

    /// Keeps the first `n` frames.
    pub fn truncate(&mut self, n: usize) {
        if n < self.frames.len() {
            self.frames.truncate(n);
            self.bytes.truncate(self.frames.last().map_or(0, |f| f.1));
        }
    }

    /// The frames in order.
    pub fn iter(&self) -> impl Iterator<Item = (&LinkAddr, &[u8])> + '_ {
        let mut start = 0;
        self.frames.iter().map(move |(from, end)| {
            let data = self.bytes.get(start..*end).unwrap_or_default();
            start = *end;
            (from, data)
        })
    }
}

impl<'a> IntoIterator for &'a FrameBatch {
    type Item = (&'a LinkAddr, &'a [u8]);
    type IntoIter = Box<dyn Iterator<Item = (&'a LinkAddr, &'a [u8])> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<D: AsRef<[u8]>> FromIterator<(LinkAddr, D)> for FrameBatch {
    fn from_iter<I: IntoIterator<Item = (LinkAddr, D)>>(iter: I) -> FrameBatch {
        let mut batch = FrameBatch::default();
        for (from, data) in iter {
            batch.push(from, data.as_ref());
        }
        batch
    }
}

/// Why closing an instance failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseError {
    /// The plugin reported an error (it is closed regardless).
    #[error("plugin reported an error while closing: {0}")]
    Plugin(PluginError),
}

/// An open transport instance as the host uses it.
pub trait Transport: Send + Sync {
    /// The interface name from the node config (used in logs and metrics).
    fn interface(&self) -> &str;

    /// The address scheme this instance serves, e.g. `udp`.
    fn scheme(&self) -> &str;

    /// Declared capabilities.
    fn capabilities(&self) -> Capabilities;

    /// Addresses peers can reach this instance at.
    fn local_addresses(&self) -> Vec<TransportAddr>;

    /// Queues one frame; never blocks.
    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError>;

    /// Queues frames in order until one cannot be queued; never blocks.
    fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult;

    /// Stops the instance; no event is produced after this returns. Idempotent.
    fn close(&self) -> Result<(), CloseError>;

    /// Reads received datagrams into `slots` on the caller's thread, if the instance can
    /// (the plugin contract's optional `recv_pull`): `None` if it cannot (frames keep coming
    /// as [`TransportEvent::Frames`]); `Some(n)`, `n` slots filled; `Some(0)`, nothing now and
    /// a [`TransportEvent::Readable`] follows once something arrives. The first call switches
    /// the instance to pull mode for good.
    fn recv_pull(&self, slots: &mut [RecvSlot<'_>]) -> Option<usize> {
        let _ = slots;
        None
    }
}

/// A shared transport handle.
pub type SharedTransport = Arc<dyn Transport>;

/// The receiving end of an instance's events. Ends (returns `Err`) once the instance is
/// closed.
pub type EventReceiver = async_channel::Receiver<TransportEvent>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use proptest::prelude::*;

    fn addr(port: u16) -> LinkAddr {
        LinkAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    proptest! {
        /// A batch gives back exactly the frames pushed, in order, by `iter` and by `get`,
        /// empty frames included; `truncate` keeps a prefix.
        #[test]
        fn a_batch_keeps_frames_and_order(frames in proptest::collection::vec((0u16..4, proptest::collection::vec(any::<u8>(), 0..40)), 0..20), keep in 0usize..25) {
            let batch: FrameBatch = frames.iter().map(|(p, d)| (addr(*p), d.clone())).collect();
            prop_assert_eq!(batch.len(), frames.len());
            prop_assert_eq!(batch.is_empty(), frames.is_empty());
            let got: Vec<(LinkAddr, Vec<u8>)> = batch.iter().map(|(a, d)| (a.clone(), d.to_vec())).collect();
            let want: Vec<(LinkAddr, Vec<u8>)> = frames.iter().map(|(p, d)| (addr(*p), d.clone())).collect();
            prop_assert_eq!(&got, &want);
            for (i, (a, d)) in want.iter().enumerate() {
                prop_assert_eq!(batch.get(i), Some((a, d.as_slice())));
            }
            prop_assert_eq!(batch.get(want.len()), None);
            let mut cut = batch.clone();
            cut.truncate(keep);
            let kept: Vec<(LinkAddr, Vec<u8>)> = (&cut).into_iter().map(|(a, d)| (a.clone(), d.to_vec())).collect();
            prop_assert_eq!(&kept[..], &want[..keep.min(want.len())]);
            // What was cut is gone for good: a frame pushed after it starts fresh.
            cut.push(addr(9), b"next");
            prop_assert_eq!(cut.get(cut.len() - 1), Some((&addr(9), &b"next"[..])));
        }
    }
}
