//! `antmesh-conformance`: run the transport conformance suite against a plugin file.
//!
//! ```text
//! antmesh-conformance run --plugin target/release/libantmesh_udp.so --fixture udp-loopback --json
//! antmesh-conformance fixtures
//! ```
//! Exit status: 0 when nothing failed, 1 when a check failed, 2 when the run could not start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use antmesh_conformance::{run_suite, Outcome, Report, FIXTURES};
use antmesh_host::plugin::loader;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "antmesh-conformance", version, about = "antmesh transport plugin conformance suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every check against one plugin.
    Run {
        /// The plugin library, or an installed plugin's plugin.ron.
        #[arg(long)]
        plugin: PathBuf,
        /// How to make instances and pairs (see `fixtures`).
        #[arg(long)]
        fixture: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the fixtures.
    Fixtures,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Fixtures => {
            for (name, scheme, desc) in FIXTURES {
                println!("{name:<14} {scheme:<8} {desc}");
            }
            ExitCode::SUCCESS
        }
        Command::Run { plugin, fixture, json } => run(&plugin, &fixture, json),
    }
}

fn run(plugin_path: &Path, fixture: &str, json: bool) -> ExitCode {
    let loaded = if plugin_path.file_name().is_some_and(|n| n == "plugin.ron") {
        loader::load_installed(plugin_path)
    } else {
        loader::load_library(plugin_path, None)
    };
    let report = match loaded {
        Ok(plugin) => match run_suite(&plugin, fixture) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("antmesh-conformance: {e}");
                return ExitCode::from(2);
            }
        },
        Err(e) => {
            // A plugin that cannot be loaded fails the metadata check; nothing else can run.
            let mut r = Report { plugin: plugin_path.display().to_string(), fixture: fixture.to_owned(), ..Report::default() };
            r.record("metadata", Outcome::Failed(e.to_string()));
            r
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("antmesh-conformance: cannot encode report: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.any_failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
