//! `antmesh`: the node daemon and its operator commands.

use std::path::PathBuf;
use std::process::ExitCode;

use antmesh_host::config::NodeConfig;
use antmesh_host::daemon;
use antmesh_host::plugin::loader;
use clap::{Parser, Subcommand};
use serde_json::json;

mod cli;

#[derive(Parser)]
#[command(name = "antmesh", version, about = "Post-quantum multi-hop mesh node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node until Ctrl-C or SIGTERM.
    Up {
        /// Node configuration (RON); the embedded default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Identity file (default: the config's, else the data directory's identity.key;
        /// created on first start).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Where to load plugins from (overrides the config).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
    },
    /// List plugins with versions, what they provide, and load errors.
    Plugins {
        /// Where to look (default: the config's plugin_dir, else beside this executable).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The node's ML-DSA-65 identity.
    Id {
        #[command(subcommand)]
        command: cli::id::IdCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// A running node's identity, node destination and neighbours.
    Status {
        #[command(flatten)]
        node: cli::mesh::NodeArgs,
    },
    /// A running node's path table.
    Paths {
        #[command(flatten)]
        node: cli::mesh::NodeArgs,
    },
    /// Find a path to a destination (asking the mesh if needed) and time a round trip.
    Probe {
        /// Destination (32 hex characters).
        dest: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        node: cli::mesh::NodeArgs,
    },
    /// Send a text message to a node destination over an end-to-end link.
    Send {
        /// Destination (32 hex characters).
        dest: String,
        /// The message.
        text: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// One sealed packet (ML-KEM to the destination's key) instead of a link: no
        /// handshake, but the sender is not authenticated.
        #[arg(long)]
        packet: bool,
        #[command(flatten)]
        node: cli::mesh::NodeArgs,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (the embedded default when no file is given).
    Check {
        /// The file.
        file: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn load_config(path: Option<&PathBuf>) -> Result<NodeConfig, antmesh_host::config::ConfigError> {
    match path {
        Some(p) => NodeConfig::load(p),
        None => NodeConfig::embedded_default(),
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Up { config, identity, plugin_dir } => up(config, identity, plugin_dir),
        Command::Id { command } => cli::id::run(command),
        Command::Plugins { plugin_dir, json } => plugins(plugin_dir, json),
        Command::Config { command: ConfigCommand::Check { file, json } } => config_check(file, json),
        Command::Status { node } => cli::mesh::status(node),
        Command::Paths { node } => cli::mesh::paths(node),
        Command::Probe { dest, timeout, node } => cli::mesh::probe(node, dest, timeout),
        Command::Send { dest, text, timeout, packet, node } => cli::mesh::send(node, dest, text, timeout, packet),
    }
}

fn up(config: Option<PathBuf>, identity: Option<PathBuf>, plugin_dir: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("antmesh: config error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&cfg.log);
    // A write past RLIMIT_FSIZE then fails with EFBIG (the store reports it and retries)
    // instead of SIGXFSZ killing the node.
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("antmesh: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let from_data_dir = cfg.data_dir.as_ref().map(|d| d.join("identity.key"));
    let Some(id_path) = identity.or(cfg.identity.clone()).or(from_data_dir).or_else(antmesh_host::identity::default_identity_path) else {
        tracing::error!("no identity path: pass --identity, set identity in the config, or set ANTMESH_HOME");
        return ExitCode::from(2);
    };
    let id = match antmesh_host::identity::Identity::load_or_create(&id_path) {
        Ok((id, created)) => {
            if created {
                tracing::info!(peer_id = %id.peer_id(), file = %id_path.display(), "created a new identity");
            }
            id
        }
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(peer_id = %id.peer_id(), "identity loaded");
    match rt.block_on(daemon::run(cfg, plugin_dir, std::sync::Arc::new(id), daemon::shutdown_signal())) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn plugins(plugin_dir: Option<PathBuf>, as_json: bool) -> ExitCode {
    let Some(dir) = plugin_dir.or_else(loader::default_plugin_dir) else {
        eprintln!("antmesh: no plugin directory; pass --plugin-dir");
        return ExitCode::from(2);
    };
    let set = match loader::load_dir(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("antmesh: {e}");
            return ExitCode::FAILURE;
        }
    };
    if as_json {
        let plugins: Vec<_> = set
            .plugins
            .iter()
            .map(|p| {
                json!({
                    "name": p.name(),
                    "version": p.info.version.as_str(),
                    "abi_version": p.info.abi_version.to_string(),
                    "kinds": ["transport"],
                    "schemes": p.info.schemes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                    "description": p.info.description.as_str(),
                    "capabilities": p.info.capabilities,
                    "file": p.path.display().to_string(),
                    "manifest": p.manifest.is_some(),
                })
            })
            .collect();
        let errors: Vec<_> = set.errors.iter().map(|e| json!({ "error": e.to_string() })).collect();
        println!("{}", json!({ "dir": dir.display().to_string(), "host_abi": antmesh_plugin_api::ABI_VERSION.to_string(), "plugins": plugins, "errors": errors }));
    } else {
        println!("plugin directory: {} (host ABI {})", dir.display(), antmesh_plugin_api::ABI_VERSION);
        for p in &set.plugins {
            let schemes: Vec<_> = p.info.schemes.iter().map(|s| format!("{s}://")).collect();
            println!(
                "  {:<10} {:<8} abi {:<7} transport {:<14} {}",
                p.name(),
                p.info.version.as_str(),
                p.info.abi_version.to_string(),
                schemes.join(" "),
                p.info.description.as_str()
            );
            println!("  {:<10} default instance: {}", "", describe_caps(&p.info.capabilities));
        }
        if set.plugins.is_empty() {
            println!("  (no plugins loaded)");
        }
        for e in &set.errors {
            println!("  refused: {e}");
        }
    }
    ExitCode::SUCCESS
}

fn describe_caps(c: &antmesh_plugin_api::Capabilities) -> String {
    let yes = |b: bool, s: &'static str| if b { Some(s) } else { None };
    let flags: Vec<&str> = [
        yes(c.broadcast, "broadcast"),
        yes(c.link_layer_acks, "link-acks"),
        yes(c.metered, "metered"),
        yes(c.power_constrained, "power-constrained"),
        yes(c.peer_liveness, "peer-liveness"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let rate = if c.bitrate_bps == 0 { "rate unknown".to_owned() } else { format!("{} bit/s", c.bitrate_bps) };
    format!(
        "mtu {}, {}, {:?} latency, {:?}/{:?}/{:?} duplex, {}{}{}",
        c.mtu,
        rate,
        c.latency,
        c.reliability,
        c.framing,
        c.duplex,
        if c.suits_quic() { "QUIC engine" } else { "constrained engine" },
        if flags.is_empty() { "" } else { ", " },
        flags.join(", ")
    )
}

fn config_check(file: Option<PathBuf>, as_json: bool) -> ExitCode {
    let origin = file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "<default>".to_owned());
    match load_config(file.as_ref()) {
        Ok(cfg) => {
            if as_json {
                println!("{}", json!({ "file": origin, "ok": true, "interfaces": cfg.interfaces.len() }));
            } else {
                println!("{origin}: ok ({} interfaces)", cfg.interfaces.len());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if as_json {
                println!("{}", json!({ "file": origin, "ok": false, "error": e.to_string() }));
            } else {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}
