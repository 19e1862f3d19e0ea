//! `antmesh status | paths | probe | send`: clients of a running node's control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use antmesh_host::daemon::control;
use clap::Args;
use serde_json::{json, Value};

/// Where the node is.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The node's data directory (default: $ANTMESH_HOME, else the XDG data directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

fn ask(node: &NodeArgs, req: Value, wait: Duration) -> Result<Value, String> {
    let dir = node
        .data_dir
        .clone()
        .or_else(antmesh_host::identity::default_data_dir)
        .ok_or("no data directory: pass --data-dir or set ANTMESH_HOME")?;
    let path = dir.join(control::SOCKET_NAME);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(control::request(&path, &req, wait)).map_err(|e| format!("{e} (is `antmesh up` running with this data directory?)"))
}

fn finish(node: &NodeArgs, r: Result<Value, String>, human: impl Fn(&Value) -> String) -> ExitCode {
    match r {
        Ok(v) => {
            let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
            if node.json {
                println!("{v}");
            } else if ok {
                println!("{}", human(&v));
            } else {
                eprintln!("antmesh: {}", v.get("error").and_then(Value::as_str).unwrap_or("failed"));
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            if node.json {
                println!("{}", json!({"ok": false, "error": e}));
            } else {
                eprintln!("antmesh: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `antmesh status`.
pub fn status(node: NodeArgs) -> ExitCode {
    let r = ask(&node, json!({"cmd": "status"}), Duration::from_secs(10));
    finish(&node, r, |v| {
        let mut out = format!("peer id   {}\nnode dest {}\nneighbours:", v["peer_id"].as_str().unwrap_or(""), v["node_dest"].as_str().unwrap_or(""));
        for n in v["neighbours"].as_array().into_iter().flatten() {
            out.push_str(&format!("\n  {} on {}", n["peer"].as_str().unwrap_or(""), n["interface"].as_str().unwrap_or("")));
        }
        out
    })
}

/// `antmesh paths`.
pub fn paths(node: NodeArgs) -> ExitCode {
    let r = ask(&node, json!({"cmd": "paths"}), Duration::from_secs(10));
    finish(&node, r, |v| {
        let mut out = format!("{:<32}  {:>4}  {:>5}  {:<10}  {:<16}  {:>8}  {:>8}  {:>5}", "destination", "hops", "cost", "interface", "next hop", "expires", "rtt", "loss");
        for p in v["paths"].as_array().into_iter().flatten() {
            let rtt = p["rtt_ms"].as_f64().map_or("-".to_owned(), |r| format!("{r:.1}ms"));
            let loss = p["loss_permille"].as_u64().map_or("-".to_owned(), |l| format!("{:.0}%", l as f64 / 10.0));
            out.push_str(&format!(
                "\n{:<32}  {:>4}  {:>5}  {:<10}  {:<16}  {:>7}s  {:>8}  {:>5}{}",
                p["dest"].as_str().unwrap_or(""),
                p["hops"],
                p["cost"],
                p["interface"].as_str().unwrap_or("-"),
                p["next_hop"].as_str().map(|s| &s[..16.min(s.len())]).unwrap_or("-"),
                p["expires_in_s"],
                rtt,
                loss,
                if p["verified"].as_bool() == Some(true) { "" } else { "  (compact, unverified)" }
            ));
        }
        out
    })
}

/// `antmesh probe <dest>`.
pub fn probe(node: NodeArgs, dest: String, timeout_s: u64) -> ExitCode {
    let r = ask(&node, json!({"cmd": "probe", "dest": dest, "timeout_s": timeout_s}), Duration::from_secs(timeout_s + 5));
    finish(&node, r, |v| format!("{}: {} hops, round trip {:.1} ms", v["dest"].as_str().unwrap_or(""), v["hops"], v["rtt_ms"].as_f64().unwrap_or(0.0)))
}

/// `antmesh send <dest> <text> [--packet]`.
pub fn send(node: NodeArgs, dest: String, text: String, timeout_s: u64, packet: bool) -> ExitCode {
    let req = json!({"cmd": "send", "dest": dest, "data": text, "timeout_s": timeout_s, "sealed": packet});
    let r = ask(&node, req, Duration::from_secs(timeout_s + 5));
    finish(&node, r, |v| {
        if v["sealed"].as_bool() == Some(true) {
            format!("sent to {} as one sealed packet ({} bytes)", v["dest"].as_str().unwrap_or(""), v["bytes"])
        } else {
            format!("sent to {} (peer {}) over an end-to-end link", v["dest"].as_str().unwrap_or(""), v["peer"].as_str().unwrap_or(""))
        }
    })
}
