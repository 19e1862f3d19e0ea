//! Three `antmesh up` processes, A —UDP/QUIC— B —serial pty— C, with no static knowledge of
//! C at A: A finds C's node destination through the mesh, probes it, and the two exchange
//! messages over an end-to-end link that B relays without being able to read. Then B is
//! killed with SIGKILL and its paths come back from its store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{free_udp_port, serial, Node, PtyPair};

/// Prints every node's log, for a failure report.
fn dump(nodes: &mut [(&str, &mut Node)]) {
    for (name, n) in nodes.iter_mut() {
        n.drain();
        eprintln!("==== {name}\n{}", n.seen.join("\n"));
    }
}

#[test]
fn a_destination_two_hops_away_over_mixed_transports() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::new(dir.path());
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let udp = |port: u16, connect: &str| format!(r#"(name: "udp0", plugin: "udp", config: "(bind: \"127.0.0.1:{port}\")", connect: [{connect}])"#);
    // B relays and logs every payload it forwards (trace), so the test can look at what it
    // had in hand.
    let mut b = Node::start_with(
        dir.path(),
        "b",
        "info,antmesh_host=debug,antmesh_host::daemon::hub=trace",
        &format!("{}, {}", udp(pb, ""), serial("ser", &pty.a)),
    );
    let mut c = Node::start(dir.path(), "c", &serial("ser", &pty.b));
    // A knows only B's address.
    let mut a = Node::start(dir.path(), "a", &udp(pa, &format!("\"udp://127.0.0.1:{pb}\"")));

    for n in [&mut a, &mut b, &mut c] {
        n.wait(&["node up"]);
    }
    let (_, status) = c.cli(&["status"]);
    let c_dest = status["node_dest"].as_str().unwrap().to_owned();
    let (_, status) = a.cli(&["status"]);
    let a_dest = status["node_dest"].as_str().unwrap().to_owned();
    b.wait(&["link session up", &c.id.to_hex()]);
    b.wait(&["peer connected", &a.id.to_hex()]);

    // A resolves C's destination (path request if the announce has not come yet) and probes it.
    let (ok, probe) = a.cli(&["probe", &c_dest, "--timeout", "20"]);
    if !ok {
        dump(&mut [("A", &mut a), ("B", &mut b), ("C", &mut c)]);
    }
    assert!(ok, "{probe}");
    assert_eq!(probe["hops"], 2, "{probe}");
    let (ok, paths) = a.cli(&["paths"]);
    assert!(ok);
    let entry = paths["paths"].as_array().unwrap().iter().find(|p| p["dest"] == c_dest.as_str()).unwrap().clone();
    assert_eq!(entry["peer"], c.id.to_hex());
    assert_eq!(entry["next_hop"], b.id.to_hex());
    assert_eq!(entry["interface"], "udp0");

    // An end-to-end link, both ways.
    let marker = "end-to-end secret 7f3a";
    let (ok, sent) = a.cli(&["send", &c_dest, marker, "--timeout", "60"]);
    assert!(ok, "{sent}");
    assert_eq!(sent["peer"], c.id.to_hex());
    let got = c.wait(&["end-to-end message received", marker]);
    assert!(got.contains(&a.id.to_hex()), "{got}");
    c.wait(&["end-to-end link up", &a.id.to_hex()]);
    let (ok, sent) = c.cli(&["send", &a_dest, "and back", "--timeout", "60"]);
    assert!(ok, "{sent}");
    a.wait(&["end-to-end message received", "and back", &c.id.to_hex()]);

    // One sealed packet (no link): C's signed sealing key is fetched, then the packet goes.
    let sealed_marker = "sealed secret 41c9";
    let (ok, sent) = a.cli(&["send", &c_dest, sealed_marker, "--packet", "--timeout", "60"]);
    assert!(ok, "{sent}");
    assert_eq!(sent["sealed"], true);
    c.wait(&["sealed packet received", sealed_marker]);

    // B relayed the link's frames and the sealed packet and never held a plaintext.
    b.drain();
    let forwarded: Vec<&String> = b.seen.iter().filter(|l| l.contains("forwarded")).collect();
    assert!(forwarded.iter().any(|l| l.contains(&c_dest)), "B forwarded nothing to C: {:?}", b.seen);
    for m in [marker, sealed_marker] {
        let hex_marker = hex::encode(m);
        for l in &b.seen {
            assert!(!l.contains(m) && !l.contains(&hex_marker), "B saw the plaintext: {l}");
        }
    }
    // The sealed packet (0x06 + 1,088-byte ciphertext + text + tag) went through B.
    assert!(forwarded.iter().any(|l| l.contains(&c_dest) && l.contains("payload=06")), "no sealed packet relayed");
    assert!(!b.seen.iter().any(|l| l.contains("end-to-end link up")), "B has an end-to-end session");

    // kill -9 B: its paths come back from the store, and the route works again.
    std::thread::sleep(Duration::from_secs(3)); // past the store's 2 s debounce
    b.kill9_and_restart();
    let loaded = b.wait(&["mesh state loaded"]);
    b.wait(&["node up"]);
    assert!(loaded.contains("paths=2") || loaded.contains("paths=3"), "{loaded}");
    b.wait(&["link session up", &c.id.to_hex()]);
    let (ok, paths) = b.cli(&["paths"]);
    assert!(ok);
    let dests: Vec<&str> = paths["paths"].as_array().unwrap().iter().filter_map(|p| p["dest"].as_str()).collect();
    assert!(dests.contains(&c_dest.as_str()), "{paths}");
    let (ok, probe) = a.cli(&["probe", &c_dest, "--timeout", "20"]);
    if !ok {
        dump(&mut [("A", &mut a), ("B", &mut b), ("C", &mut c)]);
    }
    assert!(ok, "{probe}");

    let stopped = a.stop();
    assert!(stopped.contains("e2e_sessions=1"), "{stopped}");
    drop(c);
}
