//! Under attack: for each attack of the hostile-peer suite, the attacker's rate, the
//! victim node's CPU and memory, and the honest peer's probe round trips with and without
//! the attack. Real `antmesh up` processes; the attacker is one `antmesh-hostile` process,
//! as fast as it goes on this machine.
//!
//! ```text
//! cargo build --release --workspace
//! cargo bench -p antmesh-conformance --bench hostile
//! ```
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ANTMESH_BENCH_SECS` | 20 | seconds of each attack (and of its baseline) |
//! | `ANTMESH_BENCH_ONLY` | all | run only the attacks whose name contains this |
//!
//! It prints figures and asserts nothing; the suite (`tests/hostile.rs`) asserts. The
//! attack with spoofed sources runs only as root. See docs/performance.md, "Under attack".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/scene.rs"]
mod scene;

use std::time::Duration;

use scene::{attack, is_root, percentile, spoofed_stage, stage, under_attack_every, Netns, Outcome, Stage};
use serde_json::{json, Value};

struct Row {
    name: &'static str,
    rate: f64,
    cpu: f64,
    rss0: u64,
    max_rss: u64,
    /// RSS growth over the attack's second half, KiB: memory bounded independent of
    /// duration keeps this near zero.
    late_growth: i64,
    base: (f64, f64),
    under: (f64, f64),
    lost: usize,
}

fn figures(name: &'static str, base: &Outcome, o: &Outcome) -> Row {
    let half = o.rss.len() / 2;
    let late_growth = match (o.rss.get(half), o.rss.last()) {
        (Some(mid), Some(end)) => *end as i64 - *mid as i64,
        _ => 0,
    };
    Row {
        name,
        rate: o.report["rate"].as_f64().unwrap_or(0.0),
        cpu: o.cpu / o.secs,
        rss0: o.rss0,
        max_rss: o.max_rss,
        late_growth,
        base: (percentile(&base.honest.rtts, 50.0), percentile(&base.honest.rtts, 99.0)),
        under: (o.honest.percentile(50.0), o.honest.percentile(99.0)),
        lost: o.honest.probe_failures.len() + o.honest.send_failures.len(),
    }
}

fn print(r: &Row) {
    println!(
        "{:<24} {:>10.0}/s  {:>5.0}%  {:>7} {:>7} {:>+7}  {:>6.2} {:>6.2}  {:>6.2} {:>6.2}  {:>5.2}x  {:>4}",
        r.name,
        r.rate,
        r.cpu * 100.0,
        r.rss0,
        r.max_rss,
        r.late_growth,
        r.base.0,
        r.base.1,
        r.under.0,
        r.under.1,
        r.under.1 / r.base.1,
        r.lost
    );
}

/// The baseline (the honest peer alone), then the attack, on a fresh stage.
fn run(name: &'static str, s: &Stage, secs: u64, during: impl FnOnce() -> Value) -> Row {
    let every = Duration::from_millis(50);
    let base = under_attack_every(s, every, || {
        std::thread::sleep(Duration::from_secs(secs));
        json!({"rate": 0.0})
    });
    let o = under_attack_every(s, every, during);
    figures(name, &base, &o)
}

fn main() {
    let secs: u64 = std::env::var("ANTMESH_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let only = std::env::var("ANTMESH_BENCH_ONLY").unwrap_or_default();
    let s_arg = secs.to_string();
    println!("antmesh under attack: {secs} s per attack, honest probes every 50 ms (RTT in ms; RSS in KiB)");
    println!(
        "{:<24} {:>12}  {:>6}  {:>7} {:>7} {:>7}  {:>13}  {:>13}  {:>6}  {:>4}",
        "attack", "attacker", "A CPU", "RSS", "max", "late", "RTT p50/p99", "under attack", "p99 x", "lost"
    );
    if "control: one core busy".contains(&only) {
        // Not an attack: a busy loop on one core for the same time, so that the machine's
        // own contention (two cores; the attacker takes one) can be told apart from what an
        // attack makes the node do.
        let s = stage(false, "");
        print(&run("control: one core busy", &s, secs, || {
            let mut hog = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
            std::thread::sleep(Duration::from_secs(secs));
            let _ = hog.kill();
            let _ = hog.wait();
            json!({"rate": 0.0})
        }));
    }
    let quic: [(&'static str, Vec<&str>); 15] = [
        ("control: junk datagrams", vec!["junk"]),
        ("control: junk, new ports", vec!["junk", "--new-ports"]),
        ("control: junk, 10k/s", vec!["junk", "--new-ports", "--rate", "10000"]),
        ("streams", vec!["streams"]),
        ("connections, one id", vec!["connections"]),
        ("connections, fresh ids", vec!["connections", "--fresh"]),
        ("initials", vec!["initials"]),
        ("initials, 4k/s", vec!["initials", "--rate", "4000"]),
        ("compact announces", vec!["flood", "compact"]),
        ("compact announces, 50k/s", vec!["flood", "compact", "--rate", "50000"]),
        ("forged announces", vec!["flood", "forged"]),
        ("key records", vec!["flood", "key-records"]),
        ("sealed packets", vec!["flood", "sealed"]),
        ("spoofed reply-to probes", vec!["flood", "probes"]),
        ("event burst", vec!["flood", "burst"]),
    ];
    for (name, args) in quic {
        if !name.contains(&only) {
            continue;
        }
        let s = stage(false, "");
        let target = format!("127.0.0.1:{}", s.a_udp);
        let mut all = args.clone();
        all.extend_from_slice(&["--target", &target, "--seconds", &s_arg]);
        print(&run(name, &s, secs, || attack(&all, None)));
    }
    if "link hellos (tcp)".contains(&only) {
        let s = stage(true, "");
        let target = format!("127.0.0.1:{}", s.a_tcp.unwrap());
        print(&run("link hellos (tcp)", &s, secs, || attack(&["hellos", "--target", &target, "--source", "127.0.0.9", "--seconds", &s_arg], None)));
    }
    if "initials, spoofed".contains(&only) {
        if !is_root() {
            println!("{:<24} (needs root: network namespaces and a raw socket)", "initials, spoofed");
            return;
        }
        let ns = Netns::new("b");
        let s = spoofed_stage(&ns);
        let outside = ns.outside.clone();
        print(&run("initials, spoofed", &s, secs, || {
            attack(&["initials", "--target", "10.77.1.1:4242", "--spoof", "10.77.0.0", "--seconds", &s_arg], Some(&outside))
        }));
    }
}
