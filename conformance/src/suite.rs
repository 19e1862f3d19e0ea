//! The checks. Each proves one promise of the contract; "unsupported" is only derived from
//! what the instance declares.
//!
//! | check | promise |
//! |---|---|
//! | `metadata` | the library loads, its ABI is accepted, it names itself and the scheme the fixture drives |
//! | `bad_config` | unparseable or unknown config → `PluginErrorKind::BadConfig`, no panic |
//! | `open_close_cycles` | 100 open/close cycles leave no extra fds, threads or zombie children |
//! | `round_trip` / `round_trip_swapped` | A→B and a reply to the sender's address, then with roles swapped |
//! | `mtu_boundary` | exactly MTU bytes arrive unchanged; MTU+1 is refused with `TooLarge`, never truncated |
//! | `broadcast` | `Broadcast` reaches the peer if declared, is refused with `BroadcastUnsupported` if not |
//! | `ordered_burst` | reliable-ordered transports deliver a 10,000-frame burst complete and in order |
//! | `backpressure` | a flood gets `WouldBlock`, then a `writable` event, then sends succeed again |
//! | `concurrent_senders` | four threads sending at once: every frame intact, every sender heard; all frames, per-sender order kept when reliable-ordered is declared |
//! | `garbage` | garbage from the peer's side does not crash or wedge the instance |
//! | `pull_receive` | where `recv_pull` is implemented (optional): frames are read in place, none delivered the push way any more, and a pull that found nothing is answered by `readable` once a frame arrives |
//! | `peer_vanishes` | with declared peer liveness, closing B makes A report `link_down` for B |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::plugin::{LoadedPlugin, OpenError};
use antmesh_host::transport::Transport;
use antmesh_plugin_api::abi_stable::std_types::RSlice;
use antmesh_plugin_api::{
    Capabilities, LinkAddr, OutFrame, PluginErrorKind, RecvSlot, Reliability, SendError, ABI_VERSION,
};

use crate::fixture::{self, Fixture, Pair, FIXTURES};
use crate::harness::{resource_counts, zombie_children, Endpoint, Ev};
use crate::report::{Outcome, Report};

const WAIT: Duration = Duration::from_secs(10);
static NONCE: AtomicU64 = AtomicU64::new(1);

fn fail<T>(msg: impl Into<String>) -> Result<T, Outcome> {
    Err(Outcome::Failed(msg.into()))
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn unique(tag: &str) -> Vec<u8> {
    format!("{tag}:{}", NONCE.fetch_add(1, Ordering::Relaxed)).into_bytes()
}

/// Sends `payload` from `src` to `to` until `dst` has it (resending for lossy media or
/// across a reconnect), returning the sender address `dst` saw.
fn deliver(src: &Endpoint, to: &LinkAddr, dst: &Endpoint, payload: &[u8], deadline: Duration) -> Result<LinkAddr, Outcome> {
    let end = Instant::now() + deadline;
    loop {
        match src.send_patiently(to, payload, end.saturating_duration_since(Instant::now())) {
            Ok(()) => {}
            Err(SendError::UnknownPeer(_)) | Err(SendError::WouldBlock) if Instant::now() < end => {}
            Err(e) => return fail(format!("send to {to} failed: {e}")),
        }
        let slice = Duration::from_millis(500).min(end.saturating_duration_since(Instant::now()));
        if let Some(Ev::Frame(from, _)) = dst.events.take(slice, |e| matches!(e, Ev::Frame(_, d) if d == payload)) {
            return Ok(from);
        }
        if Instant::now() >= end {
            return fail(format!("{} bytes sent to {to} never arrived within {deadline:?}", payload.len()));
        }
    }
}

/// Waits until everything A queued before now has reached B (a marker sent after it has
/// arrived; on a lossy medium, as close as it gets), then forgets B's frames, so one check's
/// backlog cannot be mistaken for the next check's traffic.
fn quiesce(p: &Pair, b: &Endpoint) {
    let marker = unique("quiesce");
    let _ = deliver(&p.a, &p.a_to_b, b, &marker, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(100));
    b.events.clear();
}

fn round_trip(x: &Endpoint, x_to_y: &LinkAddr, y: &Endpoint) -> Result<(), Outcome> {
    let ping = unique("ping");
    let from = deliver(x, x_to_y, y, &ping, WAIT)?;
    let mut pong = b"re:".to_vec();
    pong.extend_from_slice(&ping);
    deliver(y, &from, x, &pong, WAIT).map_err(|o| match o {
        Outcome::Failed(m) => Outcome::Failed(format!("reply to the sender's address {from}: {m}")),
        other => other,
    })?;
    Ok(())
}

fn check_metadata(plugin: &LoadedPlugin, scheme: &str) -> Outcome {
    let info = &plugin.info;
    if info.name.is_empty() || info.version.is_empty() {
        return Outcome::Failed("plugin reports an empty name or version".into());
    }
    if !ABI_VERSION.accepts(info.abi_version) {
        return Outcome::Failed(format!("plugin reports ABI {} but host speaks {}", info.abi_version, ABI_VERSION));
    }
    if !info.schemes.iter().any(|s| s.as_str() == scheme) {
        let schemes: Vec<_> = info.schemes.iter().map(|s| s.to_string()).collect();
        return Outcome::Failed(format!("fixture drives `{scheme}` but the plugin serves {schemes:?}"));
    }
    Outcome::Passed
}

fn check_bad_config(plugin: &LoadedPlugin) -> Outcome {
    for text in ["(this is not ron", "(no_such_option_xyzzy: 1)", "[1, 2, 3]"] {
        match Endpoint::open(plugin, "bad", text) {
            Ok(e) => {
                let _ = e.close();
                return Outcome::Failed(format!("config `{text}` was accepted"));
            }
            Err(OpenError::Plugin { source, .. }) if source.kind == PluginErrorKind::BadConfig && !source.message.is_empty() => {}
            Err(e) => return Outcome::Failed(format!("config `{text}`: expected a BadConfig error, got: {e}")),
        }
    }
    Outcome::Passed
}

fn check_open_close(plugin: &LoadedPlugin, fixture: &mut dyn Fixture) -> Outcome {
    let config = match fixture.single_config() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    // One warm-up cycle so lazily created process-wide state is not counted as a leak.
    match Endpoint::open(plugin, "cycle", &config) {
        Ok(e) => {
            if let Err(m) = e.close() {
                return Outcome::Failed(format!("close: {m}"));
            }
        }
        Err(e) => return Outcome::Failed(format!("open: {e}")),
    }
    let (fds0, threads0) = resource_counts();
    let zombies0 = zombie_children();
    for i in 0..100 {
        match Endpoint::open(plugin, "cycle", &config) {
            Ok(e) => {
                if let Err(m) = e.close() {
                    return Outcome::Failed(format!("cycle {i}: close: {m}"));
                }
            }
            Err(e) => return Outcome::Failed(format!("cycle {i}: open: {e}")),
        }
    }
    // Threads may take a moment to be reaped by the kernel after join.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (fds, threads) = resource_counts();
        let zombies = zombie_children();
        if fds <= fds0 && threads <= threads0 && zombies <= zombies0 {
            return Outcome::Passed;
        }
        if Instant::now() > deadline {
            return Outcome::Failed(format!(
                "after 100 cycles: fds {fds0} → {fds}, threads {threads0} → {threads}, zombie children {zombies0} → {zombies}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_mtu(p: &Pair, b: &Endpoint, caps: &Capabilities) -> Result<(), Outcome> {
    let mtu = caps.mtu as usize;
    let exact = pattern(mtu, 7);
    deliver(&p.a, &p.a_to_b, b, &exact, WAIT)?;
    let over = pattern(mtu + 1, 8);
    match p.a.transport.send(&p.a_to_b, &over) {
        Err(SendError::TooLarge { size, mtu: m }) if size as usize == mtu + 1 && m as usize == mtu => {}
        Err(SendError::TooLarge { size, mtu: m }) => return fail(format!("TooLarge reported size {size}, mtu {m}")),
        Ok(()) => return fail(format!("a {}-byte frame (MTU {mtu}) was accepted", mtu + 1)),
        Err(e) => return fail(format!("MTU+1 refused with {e}, expected TooLarge")),
    }
    let m1 = unique("before");
    let batch = [
        OutFrame { to: p.a_to_b.clone(), data: RSlice::from_slice(&m1) },
        OutFrame { to: p.a_to_b.clone(), data: RSlice::from_slice(&over) },
    ];
    let r = p.a.transport.send_batch(&batch);
    if r.accepted != 1 || !matches!(r.error.as_ref().into_option(), Some(SendError::TooLarge { .. })) {
        return fail(format!("send_batch [ok, MTU+1] gave accepted={} error={:?}", r.accepted, r.error));
    }
    let marker = unique("marker");
    deliver(&p.a, &p.a_to_b, b, &marker, WAIT)?;
    if let Some((_, f)) = b.events.drain_frames().into_iter().find(|(_, f)| f.len() >= mtu.min(over.len() - 1) && f[..] == over[..f.len()]) {
        return fail(format!("a truncated {}-byte prefix of the oversized frame arrived", f.len()));
    }
    Ok(())
}

fn check_broadcast(p: &Pair, b: &Endpoint, caps: &Capabilities) -> Outcome {
    let payload = unique("broadcast");
    if !caps.broadcast {
        return match p.a.transport.send(&LinkAddr::Broadcast, &payload) {
            Err(SendError::BroadcastUnsupported) => Outcome::Unsupported("instance does not declare broadcast".into()),
            Ok(()) => Outcome::Failed("broadcast accepted although not declared".into()),
            Err(e) => Outcome::Failed(format!("undeclared broadcast refused with {e}, expected BroadcastUnsupported")),
        };
    }
    match deliver(&p.a, &LinkAddr::Broadcast, b, &payload, WAIT) {
        Ok(_) => Outcome::Passed,
        Err(o) => o,
    }
}

fn check_ordered_burst(p: &Pair, b: &Endpoint, caps: &Capabilities) -> Result<Outcome, Outcome> {
    if caps.reliability != Reliability::ReliableOrdered {
        return Ok(Outcome::Unsupported("instance declares lossy delivery".into()));
    }
    const N: u32 = 10_000;
    b.events.clear();
    let pad = pattern(60.min(caps.mtu as usize - 4), 9);
    for i in 0..N {
        let mut f = i.to_be_bytes().to_vec();
        f.extend_from_slice(&pad);
        if let Err(e) = p.a.send_patiently(&p.a_to_b, &f, WAIT) {
            return fail(format!("frame {i}: {e}"));
        }
    }
    let end = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::with_capacity(N as usize);
    while got.len() < N as usize {
        match b.events.next_frame(end.saturating_duration_since(Instant::now())) {
            // Late duplicates of earlier checks' probes have other sizes; skip them.
            Some((_, f)) if f.len() == 4 + pad.len() => got.push(f),
            Some(_) => {}
            None => return fail(format!("only {} of {N} frames arrived", got.len())),
        }
    }
    for (i, f) in got.iter().enumerate() {
        if f[4..] != pad[..] {
            return fail(format!("frame {i} arrived corrupted"));
        }
        let seq = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
        if seq as usize != i {
            return fail(format!("frame {i} carried sequence {seq}: out of order or lost"));
        }
    }
    Ok(Outcome::Passed)
}

fn check_backpressure(p: &Pair, b: &Endpoint, caps: &Capabilities) -> Result<(), Outcome> {
    let frame = pattern(512.min(caps.mtu as usize), 10);
    p.a.events.clear();
    let end = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    loop {
        match p.a.transport.send(&p.a_to_b, &frame) {
            Ok(()) => sent += 1,
            Err(SendError::WouldBlock) => break,
            Err(e) => return fail(format!("after {sent} frames: {e}")),
        }
        if sent.is_multiple_of(4096) {
            // Keep the receiver's memory bounded; its frames are not examined.
            b.events.clear();
        }
        if sent >= 2_000_000 || Instant::now() > end {
            return fail(format!("{sent} frames accepted without ever returning WouldBlock"));
        }
    }
    if p.a.events.take(Duration::from_secs(20), |e| *e == Ev::Writable).is_none() {
        return fail(format!("WouldBlock after {sent} frames, but no writable event followed within 20 s"));
    }
    if let Err(e) = p.a.send_patiently(&p.a_to_b, &frame, WAIT) {
        return fail(format!("send after writable failed: {e}"));
    }
    quiesce(p, b);
    Ok(())
}

fn check_concurrent(p: &Pair, b: &Endpoint, caps: &Capabilities) -> Result<(), Outcome> {
    const THREADS: u8 = 4;
    const PER: u32 = 250;
    b.events.clear();
    let pad = pattern(27.min(caps.mtu as usize - 5), 11);
    let transport = Arc::clone(&p.a.transport);
    let reliable = caps.reliability == Reliability::ReliableOrdered;
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let tr = Arc::clone(&transport);
        let to = p.a_to_b.clone();
        let pad = pad.clone();
        handles.push(std::thread::spawn(move || -> Result<(), String> {
            for i in 0..PER {
                let mut f = vec![t];
                f.extend_from_slice(&i.to_be_bytes());
                f.extend_from_slice(&pad);
                let end = Instant::now() + WAIT;
                if !reliable && i % 16 == 15 {
                    // A lossy medium drops what the receiver cannot keep up with; pace so
                    // the check measures interleaving, not the receive buffer size.
                    std::thread::sleep(Duration::from_millis(2));
                }
                loop {
                    match tr.send(&to, &f) {
                        Ok(()) => break,
                        Err(SendError::WouldBlock) if Instant::now() < end => std::thread::sleep(Duration::from_millis(1)),
                        Err(e) => return Err(format!("sender {t} frame {i}: {e}")),
                    }
                }
            }
            Ok(())
        }));
    }
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(m)) => return fail(m),
            Err(_) => return fail("a sender thread panicked"),
        }
    }
    let total = usize::from(THREADS) * PER as usize;
    let end = Instant::now() + Duration::from_secs(30);
    let mut frames = Vec::new();
    while frames.len() < total && Instant::now() < end {
        let quiet = if reliable { end.saturating_duration_since(Instant::now()) } else { Duration::from_secs(1) };
        match b.events.next_frame(quiet) {
            Some((_, f)) if f.len() == 5 + pad.len() => frames.push(f),
            Some(_) => {} // a late probe from an earlier check
            None => break,
        }
    }
    let mut last: Vec<Option<u32>> = vec![None; usize::from(THREADS)];
    let mut seen = std::collections::HashSet::new();
    for f in &frames {
        if f[5..] != pad[..] || f[0] >= THREADS {
            return fail("a frame arrived corrupted (interleaved writes?)".to_owned());
        }
        let seq = u32::from_be_bytes([f[1], f[2], f[3], f[4]]);
        let slot = &mut last[usize::from(f[0])];
        if reliable && slot.is_some_and(|l| seq <= l) {
            return fail(format!("sender {} frame {seq} arrived after frame {:?}", f[0], slot));
        }
        *slot = Some(seq);
        seen.insert((f[0], seq));
    }
    if reliable && seen.len() != total {
        return fail(format!("{} of {total} frames arrived", seen.len()));
    }
    if let Some(t) = last.iter().position(Option::is_none) {
        return fail(format!("no frame from sender {t} arrived ({} of {total} in all)", seen.len()));
    }
    Ok(())
}

fn check_garbage(p: &Pair, b: &Endpoint) -> Result<(), Outcome> {
    let mut junk = pattern(64 * 1024, 12);
    // Sequences that look like frame starts to each framing: length prefixes, HDLC and
    // KISS flags and escapes.
    junk.extend_from_slice(&[0x7E, 0x7D, 0x7E, 0xC0, 0xDB, 0xC0, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0x7E]);
    p.inject_garbage(&junk).map_err(|e| Outcome::Failed(format!("fixture could not inject: {e}")))?;
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Duration::from_secs(20);
    let ping = unique("after-garbage");
    let from = deliver(&p.a, &p.a_to_b, b, &ping, deadline)?;
    let pong = unique("after-garbage-reply");
    deliver(b, &from, &p.a, &pong, deadline)?;
    Ok(())
}

/// Pulls from `b` until `payload` is among the frames read (each slot cut at its stride), or
/// `wait` passes. Returns whether it was, and fails on a slot the plugin filled badly.
fn pull_until(b: &Endpoint, payload: &[u8], wait: Duration) -> Result<bool, Outcome> {
    let end = Instant::now() + wait;
    // Slots as large as a receive-offload train, whatever the MTU.
    let mut bufs = vec![vec![0u8; 65536]; 4];
    while Instant::now() < end {
        let mut slots: Vec<RecvSlot<'_>> = bufs
            .iter_mut()
            .map(|buf| RecvSlot { buf: buf.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 })
            .collect();
        let Some(n) = b.transport.recv_pull(&mut slots) else {
            return fail("recv_pull answered \"unsupported\" after it had pulled");
        };
        for s in slots.iter().take(n) {
            let len = s.len as usize;
            if len > s.buf.len() || (len > 0 && s.stride == 0) {
                return fail(format!("slot filled with len {len}, stride {} in a {}-byte buffer", s.stride, s.buf.len()));
            }
            if len > 0 && s.buf.as_slice()[..len].chunks(s.stride as usize).any(|d| d == payload) {
                return Ok(true);
            }
        }
        if n == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(false)
}

fn check_pull(p: &Pair, b: &Endpoint) -> Result<Outcome, Outcome> {
    quiesce(p, b);
    // The first pull switches B to pull mode for good (this check runs last on B).
    if b.transport.recv_pull(&mut []).is_none() {
        return Ok(Outcome::Unsupported("recv_pull not implemented (optional; frames are delivered)".into()));
    }
    // Resent until read: lossy media may drop some.
    let payload = unique("pulled");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Err(e) = p.a.send_patiently(&p.a_to_b, &payload, WAIT) {
            return fail(format!("send to {}: {e}", p.a_to_b));
        }
        if pull_until(b, &payload, Duration::from_millis(500))? {
            break;
        }
        if Instant::now() >= end {
            return fail("a frame sent to the pulling instance was never read by recv_pull");
        }
    }
    if b.events.take(Duration::from_millis(300), |e| matches!(e, Ev::Frame(_, d) if *d == payload)).is_some() {
        return fail("a pulled frame was delivered too");
    }
    // Drain (pull for a moment, for a frame never sent), arm (a pull that finds nothing),
    // then one frame: `readable` must follow.
    pull_until(b, b"\0never sent", Duration::from_millis(50))?;
    b.events.clear();
    let mut buf = vec![0u8; 65536];
    let mut one = [RecvSlot { buf: buf.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 }];
    match b.transport.recv_pull(&mut one) {
        Some(0) => {}
        Some(_) => return fail("a frame arrived that nobody sent (after draining)"),
        None => return fail("recv_pull answered \"unsupported\" after it had pulled"),
    }
    let late = unique("after-arming");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Err(e) = p.a.send_patiently(&p.a_to_b, &late, WAIT) {
            return fail(format!("send to {}: {e}", p.a_to_b));
        }
        if b.events.take(Duration::from_millis(500), |e| matches!(e, Ev::Readable)).is_some() {
            break;
        }
        if Instant::now() >= end {
            return fail("no readable event after a pull found nothing and a frame arrived");
        }
    }
    if !pull_until(b, &late, Duration::from_secs(5))? {
        return fail("readable was signalled but the frame could not be pulled");
    }
    Ok(Outcome::Passed)
}

fn check_vanish(p: &mut Pair, caps: &Capabilities) -> Outcome {
    if !caps.peer_liveness {
        return Outcome::Unsupported("instance does not declare peer liveness (connectionless)".into());
    }
    let Some(b) = p.b.take() else { return Outcome::Failed("peer instance already gone".into()) };
    p.a.events.clear();
    if let Err(m) = b.close() {
        return Outcome::Failed(format!("closing the peer: {m}"));
    }
    let target = p.a_to_b.clone();
    match p.a.events.take(Duration::from_secs(15), |e| matches!(e, Ev::Down(peer, _) if *peer == target)) {
        Some(_) => Outcome::Passed,
        None => Outcome::Failed(format!("no link_down for {target} within 15 s of the peer closing")),
    }
}

/// Runs every check against `plugin` with the fixture called `fixture_name`.
pub fn run_suite(plugin: &LoadedPlugin, fixture_name: &str) -> Result<Report, fixture::FixtureError> {
    let scheme = FIXTURES
        .iter()
        .find(|(n, _, _)| *n == fixture_name)
        .map(|(_, s, _)| *s)
        .ok_or_else(|| fixture::FixtureError::Unknown(fixture_name.to_owned()))?;
    let mut fixture = fixture::make(fixture_name)?;
    let mut report = Report {
        plugin: plugin.name().to_owned(),
        version: plugin.info.version.to_string(),
        fixture: fixture_name.to_owned(),
        ..Report::default()
    };
    report.record("metadata", check_metadata(plugin, scheme));
    report.record("bad_config", check_bad_config(plugin));
    report.record("open_close_cycles", check_open_close(plugin, fixture.as_mut()));

    let pair_checks = [
        "round_trip",
        "round_trip_swapped",
        "mtu_boundary",
        "broadcast",
        "ordered_burst",
        "backpressure",
        "concurrent_senders",
        "garbage",
        "pull_receive",
        "peer_vanishes",
    ];
    let mut pair = match fixture.open_pair(plugin) {
        Ok(p) => p,
        Err(e @ fixture::FixtureError::Setup(_)) => return Err(e),
        Err(e) => {
            for c in pair_checks {
                report.record(c, Outcome::Failed(format!("no connected pair: {e}")));
            }
            return Ok(report);
        }
    };
    let caps = pair.a.transport.capabilities();
    let as_outcome = |r: Result<(), Outcome>| r.err().unwrap_or(Outcome::Passed);
    {
        let p = &pair;
        let Some(b) = p.b.as_ref() else { return Ok(report) };
        report.record("round_trip", as_outcome(round_trip(&p.a, &p.a_to_b, b)));
        report.record("round_trip_swapped", as_outcome(round_trip(b, &p.b_to_a, &p.a)));
        report.record("mtu_boundary", as_outcome(check_mtu(p, b, &caps)));
        report.record("broadcast", check_broadcast(p, b, &caps));
        report.record("ordered_burst", check_ordered_burst(p, b, &caps).unwrap_or_else(|e| e));
        report.record("backpressure", as_outcome(check_backpressure(p, b, &caps)));
        report.record("concurrent_senders", as_outcome(check_concurrent(p, b, &caps)));
        report.record("garbage", as_outcome(check_garbage(p, b)));
        report.record("pull_receive", check_pull(p, b).unwrap_or_else(|e| e));
    }
    report.record("peer_vanishes", check_vanish(&mut pair, &caps));
    Ok(report)
}
