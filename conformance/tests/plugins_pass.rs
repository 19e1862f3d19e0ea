//! The acceptance run: every workspace plugin passes the suite with its fixture, and the
//! suite does fail a plugin that misbehaves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

fn run(plugin: &std::path::Path, fixture: &str) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_antmesh-conformance"))
        .args(["run", "--json", "--fixture", fixture, "--plugin"])
        .arg(plugin)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

fn names(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

fn assert_passes(plugin: &str, fixture: &str, must_pass: &[&str], unsupported: &[&str]) {
    let (code, v) = run(&common::plugin_file(plugin), fixture);
    assert_eq!(names(&v, "failed"), Vec::<String>::new(), "{plugin}: {v:#}");
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["plugin"], plugin);
    let passed = names(&v, "passed");
    for check in must_pass {
        assert!(passed.iter().any(|p| p == check), "{plugin}: {check} not passed: {v:#}");
    }
    assert_eq!(names(&v, "unsupported"), unsupported, "{plugin}: {v:#}");
}

const COMMON: &[&str] = &[
    "metadata",
    "bad_config",
    "open_close_cycles",
    "round_trip",
    "round_trip_swapped",
    "mtu_boundary",
    "backpressure",
    "concurrent_senders",
    "garbage",
];

#[test]
fn udp_passes() {
    let mut checks = COMMON.to_vec();
    checks.extend(["broadcast", "pull_receive"]);
    assert_passes("udp", "udp-loopback", &checks, &["ordered_burst", "peer_vanishes"]);
}

#[test]
fn tcp_passes() {
    let mut checks = COMMON.to_vec();
    checks.extend(["ordered_burst", "peer_vanishes"]);
    assert_passes("tcp", "tcp-loopback", &checks, &["broadcast", "pull_receive"]);
}

#[test]
fn pipe_passes() {
    let mut checks = COMMON.to_vec();
    checks.extend(["broadcast", "ordered_burst", "peer_vanishes"]);
    assert_passes("pipe", "pipe", &checks, &["pull_receive"]);
}

#[test]
fn serial_passes() {
    let mut checks = COMMON.to_vec();
    checks.extend(["broadcast", "peer_vanishes"]);
    assert_passes("serial", "serial-pty", &checks, &["ordered_burst", "pull_receive"]);
}

#[test]
fn the_suite_fails_a_misbehaving_plugin() {
    let (code, v) = run(&common::test_plugin_file("test_panicking"), "udp-loopback");
    assert_eq!(code, 1, "{v:#}");
    let failed = names(&v, "failed");
    assert!(failed.contains(&"bad_config".to_owned()), "{v:#}");
    assert!(failed.contains(&"round_trip".to_owned()), "{v:#}");
    assert!(v["details"]["round_trip"].as_str().unwrap().contains("panicked"), "{v:#}");
}

#[test]
fn an_unloadable_plugin_fails_metadata() {
    let (code, v) = run(&common::test_plugin_file("test_abi_next"), "pipe");
    assert_eq!(code, 1);
    assert_eq!(names(&v, "failed"), vec!["metadata".to_owned()]);
    assert!(v["details"]["metadata"].as_str().unwrap().contains("incompatible"), "{v:#}");
}
