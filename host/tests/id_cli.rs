//! `antmesh id …` end to end: create, show, export, sign, verify, and refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

const ANTMESH: &str = env!("CARGO_BIN_EXE_antmesh");

fn id(args: &[&str], identity: &Path) -> Output {
    Command::new(ANTMESH).arg("id").args(args).arg("--identity").arg(identity).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn create_show_export_sign_verify() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let created = json(&id(&["new", "--json"], &key));
    let peer = created["peer_id"].as_str().unwrap().to_owned();
    assert_eq!(peer.len(), 64);

    // A second `new` would lose the PeerId: refused without --force.
    let again = id(&["new", "--json"], &key);
    assert_eq!(again.status.code(), Some(1));
    assert!(json(&again)["error"].as_str().unwrap().contains("--force"));

    assert_eq!(json(&id(&["show", "--json"], &key))["peer_id"], peer.as_str());

    let pk = dir.path().join("node.pub");
    let exported = json(&id(&["export-public", "--json", "--out", pk.to_str().unwrap()], &key));
    assert_eq!(exported["public_key"].as_str().unwrap().len(), 1952 * 2);
    assert_eq!(std::fs::read(&pk).unwrap().len(), 1952);

    let msg = dir.path().join("msg.txt");
    std::fs::write(&msg, b"route 42 via relay 7").unwrap();
    let sig = dir.path().join("msg.sig");
    let signed = id(&["sign", "--in", msg.to_str().unwrap(), "--out", sig.to_str().unwrap()], &key);
    assert!(signed.status.success());
    assert_eq!(std::fs::read(&sig).unwrap().len(), 3309);

    // Verify with the exported key and the expected PeerId, from another "machine"
    // (no identity file of its own).
    let stranger = dir.path().join("absent.key");
    let ok = id(
        &["verify", "--json", "--public-key", pk.to_str().unwrap(), "--peer-id", &peer, "--in", msg.to_str().unwrap(), "--sig", sig.to_str().unwrap()],
        &stranger,
    );
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert_eq!(json(&ok)["valid"], true);

    // A changed message, a flipped signature bit, or the wrong PeerId are refused.
    std::fs::write(&msg, b"route 42 via relay 8").unwrap();
    let bad = id(&["verify", "--in", msg.to_str().unwrap(), "--sig", sig.to_str().unwrap()], &key);
    assert_eq!(bad.status.code(), Some(1));
    std::fs::write(&msg, b"route 42 via relay 7").unwrap();
    let mut s = std::fs::read(&sig).unwrap();
    s[1000] ^= 0x40;
    std::fs::write(&sig, &s).unwrap();
    assert_eq!(id(&["verify", "--in", msg.to_str().unwrap(), "--sig", sig.to_str().unwrap()], &key).status.code(), Some(1));
    s[1000] ^= 0x40;
    std::fs::write(&sig, &s).unwrap();
    let other = "00".repeat(32);
    let wrong = id(
        &["verify", "--json", "--public-key", pk.to_str().unwrap(), "--peer-id", &other, "--in", msg.to_str().unwrap(), "--sig", sig.to_str().unwrap()],
        &stranger,
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(json(&wrong)["error"].as_str().unwrap().contains("belongs to"));
}

#[test]
fn show_without_identity_says_how_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = id(&["show"], &dir.path().join("none.key"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("antmesh id new"));
}
