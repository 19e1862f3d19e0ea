//! `antmesh-hostile`: one attack from the hostile-peer suite against a running node, as
//! fast as this process manages; prints what it did as JSON. See
//! `antmesh_conformance::hostile` for what each attack is, and docs/performance.md
//! ("Under attack") for what a node does under each.
//!
//! ```text
//! antmesh-hostile streams --target 127.0.0.1:4242 --seconds 10
//! antmesh-hostile flood compact --target 127.0.0.1:4242 --seconds 10
//! antmesh-hostile initials --target 10.77.1.1:4242 --spoof 10.77.0.0 --seconds 10
//! antmesh-hostile hellos --target 127.0.0.1:4243 --source 127.0.0.9 --seconds 10
//! ```
//! Exit status: 0 when the attack ran (whatever the node made of it), 2 when it could not.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use antmesh_conformance::hostile::{self, Flood, Report};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "antmesh-hostile", version, about = "Attacks an antmesh node the way a stranger could (for testing your own nodes)")]
struct Cli {
    #[command(subcommand)]
    attack: Attack,
    /// The node's QUIC (UDP) or TCP address.
    #[arg(long, global = true)]
    target: Option<SocketAddr>,
    /// How long to attack.
    #[arg(long, global = true, default_value_t = 10.0)]
    seconds: f64,
}

#[derive(Subcommand)]
enum Attack {
    /// Every stream one connection may open, written and never finished.
    Streams,
    /// Connections as fast as the node takes them, each stuffing its streams.
    Connections {
        /// A fresh identity per connection (default: one identity for all).
        #[arg(long)]
        fresh: bool,
    },
    /// Random UDP datagrams (not QUIC): the cost of receiving packets at all.
    Junk {
        /// Each from a new source port, 1,200 bytes (as Initials are).
        #[arg(long)]
        new_ports: bool,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// QUIC Initials never continued, each from a new source port.
    Initials {
        /// Spoof sources from this /16 (raw socket: root, in a network namespace).
        #[arg(long)]
        spoof: Option<Ipv4Addr>,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// A neighbour flooding mesh packets.
    Flood {
        /// What to flood.
        #[arg(value_enum)]
        kind: Flood,
        /// At most this many packets per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Link Hellos on new TCP connections, never continued.
    Hellos {
        /// The local address to connect from.
        #[arg(long)]
        source: Option<IpAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(target) = cli.target else {
        eprintln!("antmesh-hostile: --target is required");
        return ExitCode::from(2);
    };
    let duration = Duration::from_secs_f64(cli.seconds.max(0.0));
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("antmesh-hostile: {e}");
            return ExitCode::from(2);
        }
    };
    let result: Result<Report, hostile::AttackError> = match cli.attack {
        Attack::Streams => rt.block_on(hostile::streams(target, duration)),
        Attack::Connections { fresh } => rt.block_on(hostile::connections(target, duration, fresh)),
        Attack::Junk { new_ports, rate } => hostile::junk(target, duration, new_ports, rate),
        Attack::Initials { spoof, rate } => hostile::initials(target, duration, spoof, rate),
        Attack::Flood { kind, rate } => rt.block_on(hostile::flood(target, duration, kind, rate)),
        Attack::Hellos { source } => rt.block_on(hostile::hellos(target, source, duration)),
    };
    match result {
        Ok(r) => {
            println!("{}", serde_json::json!({ "attack": r.attack, "sent": r.sent, "bytes": r.bytes, "sessions": r.sessions, "refused": r.refused, "seconds": r.seconds, "rate": r.rate() }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("antmesh-hostile: {e}");
            ExitCode::from(2)
        }
    }
}
