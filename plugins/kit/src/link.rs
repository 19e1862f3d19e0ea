//! The `send` checks and the `close` sequence shared by point-to-point stream transports
//! (a pipe to a child process, a serial line): one peer, frames queued in an [`Outbox`],
//! I/O threads organised as a [`Crew`] that watches a [`StopSignal`].

use std::sync::{Mutex, PoisonError};

use abi_stable::std_types::RString;
use antmesh_plugin_api::{LinkAddr, SendError};

use crate::outbox::Outbox;
use crate::sys::{Crew, StopSignal};

/// Checks that a frame of `len` bytes may go to `to` on a medium whose single peer is
/// `peer` (also reached by `Broadcast`) and whose MTU is `mtu`.
pub fn check_point_to_point(to: &LinkAddr, peer: &RString, len: usize, mtu: u32) -> Result<(), SendError> {
    match to {
        LinkAddr::Broadcast => {}
        LinkAddr::Named(n) if n == peer => {}
        LinkAddr::Named(n) => return Err(SendError::UnknownPeer(n.clone())),
        LinkAddr::Ip(_) => return Err(SendError::BadAddress(RString::from(to.to_string()))),
    }
    if len > mtu as usize {
        return Err(SendError::TooLarge { size: u32::try_from(len).unwrap_or(u32::MAX), mtu });
    }
    Ok(())
}

/// Stops a crew-run instance; see `Transport::close`. `closing` is held by a close from
/// outside the instance's threads for as long as it waits, so that a second, concurrent
/// close returns only when the first is done.
pub fn close_crew<T>(stop: &StopSignal, outbox: &Outbox<T>, crew: &Crew, closing: &Mutex<()>) {
    // First, so that no callback starts from here on (the host is gated on it) and every
    // thread's waits end.
    stop.trigger();
    outbox.close();
    if crew.is_member() {
        // Called from a host callback on one of the instance's own threads: it cannot wait
        // for itself. Wait for the others (the crew keeps them from waiting for each
        // other); this one stops once the callback returns, and the gate silences whatever
        // it would still report.
        crew.finish();
        return;
    }
    let _closing = closing.lock().unwrap_or_else(PoisonError::into_inner);
    if crew.finish() {
        // No thread is left to poll the signal: its pipe can go now rather than when the
        // host drops the instance.
        stop.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_to_point_checks() {
        let peer = RString::from("radio");
        assert_eq!(check_point_to_point(&LinkAddr::Broadcast, &peer, 10, 10), Ok(()));
        assert_eq!(check_point_to_point(&LinkAddr::Named(peer.clone()), &peer, 10, 10), Ok(()));
        assert!(matches!(
            check_point_to_point(&LinkAddr::Named("other".into()), &peer, 1, 10),
            Err(SendError::UnknownPeer(_))
        ));
        let ip = LinkAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
        assert!(matches!(check_point_to_point(&ip, &peer, 1, 10), Err(SendError::BadAddress(_))));
        assert_eq!(
            check_point_to_point(&LinkAddr::Broadcast, &peer, 11, 10),
            Err(SendError::TooLarge { size: 11, mtu: 10 })
        );
    }
}
