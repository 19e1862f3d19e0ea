//! Constrained link engine benchmark: bytes on air per handshake mode against the byte
//! minimum, handshake time and goodput on simulated slow links with loss, and CPU per
//! handshake. Links are the deterministic simulation (`antmesh_host::link::sim`): virtual
//! time, so a 1,200 bit/s transfer of minutes takes milliseconds of real time.
//!
//! ```text
//! cargo bench -p antmesh-host --bench link
//! ```
//!
//! It prints figures; it asserts nothing about them. See docs/performance.md.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ANTMESH_BENCH_SEEDS` | 8 | simulated runs (seeds) per lossy row; figures are their mean |
//! | `ANTMESH_BENCH_GOODPUT_KB` | 24 | KiB sent one way for each goodput figure |
//! | `ANTMESH_BENCH_HANDSHAKES` | 50 | handshakes per mode for the CPU figure |
//!
//! Definitions:
//! - *bytes on air*: every frame both nodes hand to the link during the handshake,
//!   fragment headers, acknowledgements and retransmissions included, until both have
//!   the session and nothing is left to acknowledge.
//! - *byte minimum*: ML-KEM-768 encapsulation key + ciphertext + two ML-DSA-65 signatures
//!   (8,890 B), plus two ML-DSA-65 public keys when cold (12,794 B).
//! - *goodput*: application bytes delivered × 8 / time from the first send to the last
//!   delivery / the link rate. Each direction is its own line at the rate (full duplex,
//!   like a serial port), so acknowledgements do not take the data direction's airtime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::identity::Identity;
use antmesh_host::link::sim::{Sim, SimLink};
use antmesh_host::link::{LinkConfig, LinkEngine, LinkEvent, Mode};
use zeroize::Zeroizing;

const COLD_MIN: f64 = 12_794.0;
const WARM_MIN: f64 = 8_890.0;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ident(n: u8) -> Arc<Identity> {
    Arc::new(Identity::from_seed(Zeroizing::new([n; 32])))
}

fn pair(link: SimLink) -> Sim {
    let cfg = LinkConfig::for_link(link.mtu, link.bitrate_bps);
    let seed = link.seed.to_be_bytes();
    let mut sa = [1u8; 32];
    let mut sb = [2u8; 32];
    sa[..8].copy_from_slice(&seed);
    sb[24..].copy_from_slice(&seed);
    Sim::new(LinkEngine::with_seed(ident(1), cfg.clone(), sa), LinkEngine::with_seed(ident(2), cfg, sb), link, Instant::now())
}

fn mode_of(sim: &Sim) -> Option<Mode> {
    sim.events.iter().rev().find_map(|(k, e)| match e {
        LinkEvent::Connected { mode, .. } if *k == 0 => Some(*mode),
        _ => None,
    })
}

/// Dials from node 0; returns (bytes on air, virtual time) once both ends have the session
/// and are idle.
fn handshake(sim: &mut Sim) -> (u64, Duration) {
    let before = sim.bytes_sent[0] + sim.bytes_sent[1];
    let t = sim.now;
    let now = sim.now;
    sim.nodes[0].connect(now, Sim::peer_addr(0), None).unwrap();
    assert!(sim.run_until(Duration::from_secs(100_000), |s| s.connected() && s.nodes[0].is_idle() && s.nodes[1].is_idle()));
    (sim.bytes_sent[0] + sim.bytes_sent[1] - before, sim.now - t)
}

fn close(sim: &mut Sim) {
    let now = sim.now;
    sim.nodes[0].close(now, &Sim::peer_addr(0));
    sim.run_until(Duration::from_secs(100_000), |s| s.nodes[1].sessions().is_empty());
}

/// (cold, warm, resumed) bytes on air and times, in that order.
fn three_modes(link: SimLink) -> [(u64, Duration); 3] {
    let mut sim = pair(link);
    let cold = handshake(&mut sim);
    assert_eq!(mode_of(&sim), Some(Mode::Cold));
    close(&mut sim);
    let resumed = handshake(&mut sim);
    assert_eq!(mode_of(&sim), Some(Mode::Resumed));
    close(&mut sim);
    sim.nodes[0].forget_tickets();
    let warm = handshake(&mut sim);
    assert_eq!(mode_of(&sim), Some(Mode::Warm));
    [cold, warm, resumed]
}

/// Sends `bytes` from node 0 to node 1 in 16 KiB messages over an established session;
/// returns the goodput as a fraction of the link rate.
fn goodput(sim: &mut Sim, bytes: usize) -> f64 {
    let p1 = sim.nodes[1].peer_id();
    let msg = 16 << 10;
    let n = bytes.div_ceil(msg);
    let already = sim.messages(1).len();
    let t = sim.now;
    for i in 0..n {
        let len = msg.min(bytes - i * msg);
        sim.nodes[0].send(&p1, vec![i as u8; len]).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(1_000_000), |s| s.messages(1).len() >= already + n));
    let secs = (sim.now - t).as_secs_f64();
    bytes as f64 * 8.0 / secs / sim.link.bitrate_bps as f64
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let seeds = env_u64("ANTMESH_BENCH_SEEDS", 8).max(1);
    let kb = env_u64("ANTMESH_BENCH_GOODPUT_KB", 24).max(1) as usize;
    let hs_n = env_u64("ANTMESH_BENCH_HANDSHAKES", 50).max(1);
    println!("antmesh constrained link benchmark (simulated links, virtual time)");

    println!("\nBytes on air per handshake, no loss (both directions, all framing and acks):");
    println!("  {:>5}  {:>18}  {:>18}  {:>9}", "MTU", "cold B (× min)", "warm B (× min)", "resumed B");
    for mtu in [64usize, 200, 255, 1024] {
        let [cold, warm, resumed] = three_modes(SimLink::clean(0, mtu));
        println!(
            "  {mtu:>5}  {:>9} ({:.3}×)  {:>9} ({:.3}×)  {:>9}",
            cold.0,
            cold.0 as f64 / COLD_MIN,
            warm.0,
            warm.0 as f64 / WARM_MIN,
            resumed.0
        );
    }

    println!("\nHandshake time and goodput (mean of {seeds} seeds; goodput over {kb} KiB one way):");
    println!(
        "  {:>11} {:>5} {:>5}  {:>9} {:>9} {:>9}  {:>8}",
        "rate bit/s", "MTU", "loss", "cold s", "warm s", "resumed s", "goodput"
    );
    for (rate, mtu) in [(1_200u64, 200usize), (115_200, 1024)] {
        for loss in [0.0, 0.05, 0.10] {
            let runs = if loss == 0.0 { 1 } else { seeds };
            let (mut c, mut w, mut r, mut g) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for seed in 0..runs {
                let link = SimLink { bitrate_bps: rate, mtu, latency: Duration::from_millis(20), loss, duplicate: 0.0, reorder: 0.0, seed: seed + 1 };
                let [cold, warm, resumed] = three_modes(link.clone());
                c.push(cold.1.as_secs_f64());
                w.push(warm.1.as_secs_f64());
                r.push(resumed.1.as_secs_f64());
                let mut sim = pair(link);
                handshake(&mut sim);
                g.push(goodput(&mut sim, kb << 10));
            }
            println!(
                "  {rate:>11} {mtu:>5} {:>4.0}%  {:>9.1} {:>9.1} {:>9.2}  {:>7.1}%",
                loss * 100.0,
                mean(&c),
                mean(&w),
                mean(&r),
                mean(&g) * 100.0
            );
        }
    }

    println!("\nCPU per handshake (both ends, one thread, no link delay; mean of {hs_n}):");
    for (name, warm, resume) in [("cold", false, false), ("warm", true, false), ("resumed", true, true)] {
        let mut total = Duration::ZERO;
        for i in 0..hs_n {
            let mut sim = pair(SimLink { seed: i, ..SimLink::clean(0, 1500) });
            if warm {
                handshake(&mut sim);
                close(&mut sim);
                if !resume {
                    sim.nodes[0].forget_tickets();
                }
            }
            let t = thread_cpu();
            handshake(&mut sim);
            total += thread_cpu() - t;
        }
        println!("  {name:<8} {:>8.2} ms", total.as_secs_f64() * 1e3 / hs_n as f64);
    }
}
