//! `antmesh up` as an operator runs it: the embedded default config, a real UDP socket,
//! a clean exit on SIGINT; config errors with line and column.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use antmesh_host::identity::Identity;
use antmesh_host::quic::endpoint::{P2pConfig, P2pEndpoint};
use std::sync::Arc;
use zeroize::Zeroizing;

const ANTMESH: &str = env!("CARGO_BIN_EXE_antmesh");

fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, needle: &str) -> String {
    // Generous: CI runs this beside CPU-heavy handshake tests on two cores.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(_) => panic!("no log line containing {needle:?}; saw:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn up_without_flags_opens_the_default_udp_interface_and_exits_0_on_sigint() {
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(ANTMESH)
        .arg("up")
        .env("RUST_LOG", "debug")
        .env("ANTMESH_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A failed assertion must not leave a node holding port 4242 for the next run.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    let mut child = KillOnDrop(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    // First start: an identity is created, 0600, in the data directory.
    let created = wait_line(&rx, &mut seen, "created a new identity");
    let key = home.path().join("identity.key");
    assert!(created.contains(&key.display().to_string()), "{created}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let iface = wait_line(&rx, &mut seen, "interface up");
    assert!(iface.contains("udp://0.0.0.0:4242") && iface.contains("engine=\"quic\""), "{iface}");
    let up = wait_line(&rx, &mut seen, "node up");

    // The default interface is a post-quantum QUIC endpoint: dial it, check it is the node
    // whose identity file was just created, and send it a message.
    let node_id = Identity::load(&key).unwrap().peer_id();
    assert!(up.contains(&node_id.to_hex()), "{up}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let me = rt.block_on(async {
        let me = P2pEndpoint::new(P2pConfig::new(
            Arc::new(Identity::from_seed(Zeroizing::new([9; 32]))),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
        .unwrap();
        let peer = tokio::time::timeout(Duration::from_secs(20), me.connect_addr("127.0.0.1:4242".parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(peer, node_id);
        me.send(&peer, b"hello node").await.unwrap();
        me
    });
    let connected = wait_line(&rx, &mut seen, "peer connected");
    assert!(connected.contains(&me.peer_id().to_hex()), "{connected}");
    let got = wait_line(&rx, &mut seen, "message received");
    assert!(got.contains("bytes=10") && got.contains(&me.peer_id().to_hex()), "{got}");

    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) }, 0);
    let stopped = wait_line(&rx, &mut seen, "node stopped");
    assert!(stopped.contains("quic_peers=1"), "{stopped}");
    rt.block_on(me.shutdown());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            panic!("antmesh did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_config_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.ron");
    std::fs::write(&file, "(\n  interfaces: [\n    (name: \"u\" plugin: \"udp\"),\n  ],\n)\n").unwrap();
    let out = Command::new(ANTMESH).arg("up").arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:", file.display())), "{err}");

    let out = Command::new(ANTMESH).args(["config", "check", "--json"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn an_interface_naming_a_missing_plugin_fails_startup_when_nothing_opens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.ron");
    std::fs::write(&file, "(interfaces: [(name: \"x\", plugin: \"no-such-plugin\")])").unwrap();
    let out = Command::new(ANTMESH).arg("up").arg("--config").arg(&file).env("ANTMESH_HOME", dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no plugin named `no-such-plugin`"), "{err}");
}

#[test]
fn up_refuses_a_group_or_world_readable_identity() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id.key");
    let out = Command::new(ANTMESH).args(["id", "new", "--identity"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(ANTMESH).args(["up", "--identity"]).arg(&key).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too open") && err.contains("0644"), "{err}");
}
