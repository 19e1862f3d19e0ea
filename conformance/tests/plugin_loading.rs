//! The loader refuses what it must and keeps serving the rest; a panicking plugin is an
//! error, not a crash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use antmesh_conformance::harness::Endpoint;
use antmesh_host::plugin::loader::{self, PluginLoadError};
use antmesh_host::transport::Transport;
use antmesh_plugin_api::{AbiVersion, LinkAddr, SendError, TransportAddr, ABI_VERSION};

fn copy_into(dir: &std::path::Path, file: &std::path::Path) {
    std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
}

/// Loads a plugin directory holding test plugin `name` and the workspace's udp plugin.
fn load_beside_udp(name: &str) -> loader::PluginSet {
    let dir = tempfile::tempdir().unwrap();
    copy_into(dir.path(), &common::test_plugin_file(name));
    copy_into(dir.path(), &common::plugin_file("udp"));
    loader::load_dir(dir.path()).unwrap()
}

#[test]
fn plugin_built_against_another_major_abi_is_refused_and_others_keep_serving() {
    let set = load_beside_udp("test_abi_next");
    assert_eq!(set.plugins.len(), 1, "only udp loads: {:?}", set.errors);
    assert_eq!(set.plugins[0].name(), "udp");
    assert_eq!(set.errors.len(), 1);
    match &set.errors[0] {
        PluginLoadError::AbiMismatch { file, expected, found } => {
            assert!(file.ends_with(common::test_plugin_file("test_abi_next").file_name().unwrap()));
            assert_eq!(*expected, ABI_VERSION);
            assert_eq!(*found, AbiVersion { major: 1, minor: 0, patch: 0 });
        }
        other => panic!("expected AbiMismatch, got {other}"),
    }
    let msg = set.errors[0].to_string();
    assert!(msg.contains("libantmesh_test_abi_next") && msg.contains("1.0.0") && msg.contains(&ABI_VERSION.to_string()), "{msg}");

    // The host keeps serving the good plugin: a UDP instance still exchanges frames.
    let udp = set.get("udp").unwrap();
    let e = Endpoint::open(udp, "udp-test", r#"(bind: "127.0.0.1:0")"#).unwrap();
    let me = match e.transport.local_addresses()[0] {
        TransportAddr::Udp(sa) => sa,
        ref other => panic!("{other}"),
    };
    e.transport.send(&LinkAddr::from(me), b"still serving").unwrap();
    let (_, data) = e.events.next_frame(Duration::from_secs(5)).expect("frame to self");
    assert_eq!(data, b"still serving");
    e.close().unwrap();
}

#[test]
fn antmesh_plugins_lists_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    copy_into(dir.path(), &common::test_plugin_file("test_abi_next"));
    copy_into(dir.path(), &common::plugin_file("udp"));
    let antmesh = common::plugin_dir().join("antmesh");
    let out = std::process::Command::new(antmesh).args(["plugins", "--json", "--plugin-dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plugins"][0]["name"], "udp");
    assert_eq!(v["plugins"][0]["capabilities"]["mtu"], 1472);
    assert_eq!(v["plugins"][0]["capabilities"]["reliability"], "Lossy");
    assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
    assert!(v["errors"][0]["error"].as_str().unwrap().contains("incompatible"), "{v}");
}

#[test]
fn panic_inside_send_is_an_error_and_disables_the_instance() {
    let plugin = loader::load_library(&common::test_plugin_file("test_panicking"), None).unwrap();
    let e = Endpoint::open(&plugin, "panicky", "()").unwrap();
    let to = LinkAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 9)));
    match e.transport.send(&to, b"boom") {
        Err(SendError::Panicked(msg)) => assert!(msg.contains("deliberate panic in send"), "{msg}"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    // Its state may be broken: the instance stays disabled rather than being trusted again.
    assert_eq!(e.transport.send(&to, b"again"), Err(SendError::Closed));
    e.close().unwrap();
    // And the host process is still here to open another instance.
    let again = Endpoint::open(&plugin, "panicky2", "()").unwrap();
    assert!(matches!(again.transport.send(&to, b"x"), Err(SendError::Panicked(_))));
}

/// A panic inside `recv_pull` cannot travel in its return value ("nothing now"): the
/// adapter logs it through the host, so an operator learns why the socket went quiet, and
/// disables the instance as for any other panic.
#[test]
fn panic_inside_recv_pull_is_logged_and_disables_the_instance() {
    use antmesh_plugin_api::RecvSlot;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let plugin = loader::load_library(&common::test_plugin_file("test_panicking"), None).unwrap();
    let e = Endpoint::open(&plugin, "panicky-pull", "()").unwrap();
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let mut buf = [0u8; 64];
    let mut slots = [RecvSlot { buf: buf.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 }];
    let got = tracing::subscriber::with_default(subscriber, || e.transport.recv_pull(&mut slots));
    assert_eq!(got, Some(0));
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("ERROR") && text.contains("panicked in recv_pull") && text.contains("deliberate panic in recv_pull"), "{text}");
    let to = LinkAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 9)));
    assert_eq!(e.transport.send(&to, b"after"), Err(SendError::Closed));
    assert_eq!(e.transport.recv_pull(&mut slots), Some(0));
    e.close().unwrap();
}

#[test]
fn installed_plugin_manifest_is_checked() {
    use sha2_free::hex_sha256;
    let udp = common::plugin_file("udp");
    let lib_name = udp.file_name().unwrap().to_str().unwrap().to_owned();
    let root = tempfile::tempdir().unwrap();
    let write = |sub: &str, manifest: &str| {
        let d = root.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&udp, d.join(&lib_name)).unwrap();
        std::fs::write(d.join("plugin.ron"), manifest).unwrap();
        d.join("plugin.ron")
    };
    let sum = hex_sha256(&std::fs::read(&udp).unwrap());
    let good = write(
        "good",
        &format!("(name: \"udp\", version: \"0.1.0\", abi_version: \"{ABI_VERSION}\", kinds: [\"transport\"], library: \"{lib_name}\", checksum: Some(\"{sum}\"))"),
    );
    let p = loader::load_installed(&good).unwrap();
    assert!(p.manifest.is_some());
    // Loaded from an in-memory copy of the bytes that were hashed, reported by its file,
    // and it works.
    assert_eq!(p.path, good.parent().unwrap().join(&lib_name));
    let e = Endpoint::open(&p, "checked", r#"(bind: "127.0.0.1:0")"#).unwrap();
    let me = match e.transport.local_addresses()[0] {
        TransportAddr::Udp(sa) => sa,
        ref other => panic!("{other}"),
    };
    e.transport.send(&LinkAddr::from(me), b"checked bytes").unwrap();
    assert_eq!(e.events.next_frame(Duration::from_secs(5)).expect("frame to self").1, b"checked bytes");
    e.close().unwrap();

    let bad_sum = write(
        "bad-sum",
        &format!("(name: \"udp\", version: \"0.1.0\", abi_version: \"{ABI_VERSION}\", kinds: [\"transport\"], library: \"{lib_name}\", checksum: Some(\"{}\"))", "0".repeat(64)),
    );
    assert!(matches!(loader::load_installed(&bad_sum), Err(PluginLoadError::Checksum { .. })));

    let future = write(
        "future",
        &format!("(name: \"udp\", version: \"0.1.0\", abi_version: \"7.0.0\", kinds: [\"transport\"], library: \"{lib_name}\")"),
    );
    assert!(matches!(loader::load_installed(&future), Err(PluginLoadError::AbiMismatch { .. })));

    let renamed = write(
        "renamed",
        &format!("(name: \"udp-fork\", version: \"0.1.0\", abi_version: \"{ABI_VERSION}\", kinds: [\"transport\"], library: \"{lib_name}\")"),
    );
    assert!(matches!(loader::load_installed(&renamed), Err(PluginLoadError::ManifestMismatch { field: "name", .. })));

    let broken = write("broken", "(name: \"udp\",\n  version: 3)");
    let err = loader::load_installed(&broken).unwrap_err();
    assert!(matches!(err, PluginLoadError::Manifest { .. }));
    assert!(err.to_string().contains(":2:"), "{err}");
}

#[test]
fn a_node_loads_only_the_plugins_it_names() {
    let dir = tempfile::tempdir().unwrap();
    copy_into(dir.path(), &common::plugin_file("udp"));
    // Strays: one that is no library at all, one that is a plugin nobody asked for.
    std::fs::write(dir.path().join(loader::library_file_name("stray")), b"\x7fELF garbage").unwrap();
    copy_into(dir.path(), &common::test_plugin_file("test_panicking"));
    let set = loader::load_named(dir.path(), &["udp"]).unwrap();
    assert_eq!(set.plugins.iter().map(|p| p.name()).collect::<Vec<_>>(), ["udp"]);
    assert!(set.errors.is_empty(), "the strays were opened: {:?}", set.errors);
    // Missing, misnamed and path-like names are refused by name.
    std::fs::copy(common::plugin_file("udp"), dir.path().join(loader::library_file_name("impostor"))).unwrap();
    let set = loader::load_named(dir.path(), &["nothere", "impostor", "../udp"]).unwrap();
    assert!(set.plugins.is_empty());
    assert!(
        matches!(&set.errors[..], [PluginLoadError::NotFound { .. }, PluginLoadError::NameMismatch { .. }, PluginLoadError::BadName(_)]),
        "{:?}",
        set.errors
    );
}

#[test]
fn a_non_plugin_library_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libnot_a_plugin.so"), b"\x7fELF garbage").unwrap();
    let set = loader::load_dir(dir.path()).unwrap();
    assert!(set.plugins.is_empty());
    assert!(matches!(&set.errors[0], PluginLoadError::Open { file, .. } if file.ends_with("libnot_a_plugin.so")));
}

mod sha2_free {
    /// SHA-256 via the `sha256sum` tool, so the test checks the loader against an
    /// independent implementation.
    pub fn hex_sha256(bytes: &[u8]) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
    }
}

/// A plugin built against the contract as released at ABI 0.1.0 (frozen in
/// `test-plugins/abi-prev-api`), before 0.1.1 appended `recv_pull` and `readable`. abi_stable
/// cannot take it (its vtables lack fields the host's types declare: "too many fields,
/// expected 8, found 7"), so the host refuses it by version first, with an error that says
/// what to rebuild against, and keeps serving the rest.
#[test]
fn plugin_built_against_an_older_abi_of_the_series_is_refused_with_what_to_rebuild_against() {
    let set = load_beside_udp("test_abi_prev");
    assert_eq!(set.plugins.len(), 1, "only udp loads: {:?}", set.errors);
    match &set.errors[..] {
        [PluginLoadError::AbiMismatch { expected, found, .. }] => {
            assert_eq!(*expected, ABI_VERSION);
            assert_eq!(*found, AbiVersion { major: 0, minor: 1, patch: 0 });
        }
        other => panic!("expected one AbiMismatch, got {other:?}"),
    }
    let msg = set.errors[0].to_string();
    assert!(msg.contains(&format!("rebuild the plugin against antmesh-plugin-api {ABI_VERSION}")), "{msg}");
    assert!(set.get("udp").is_some());
}
