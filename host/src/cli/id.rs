//! `antmesh id …`: create, show and use the node's ML-DSA-65 identity.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use antmesh_host::identity::{default_identity_path, Identity, PeerId, PublicIdentity, CLI_SIGNATURE_CONTEXT};
use clap::Subcommand;
use serde_json::json;

/// The `id` subcommands.
#[derive(Subcommand)]
pub enum IdCommand {
    /// Create a new identity (refuses to replace one without --force).
    New {
        /// Identity file (default: the data directory's identity.key).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Replace an existing identity; its PeerId is lost.
        #[arg(long)]
        force: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the PeerId and key file.
    Show {
        /// Identity file.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write the 1952-byte public key (raw to --out, else hex on stdout).
    ExportPublic {
        /// Identity file.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Where to write the raw key.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Sign a file (ML-DSA-65, context "antmesh/v1/detached-signature").
    Sign {
        /// Identity file.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The file to sign.
        #[arg(long = "in")]
        input: PathBuf,
        /// Where to write the raw 3309-byte signature (else hex on stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Verify a detached signature; exit 0 if valid, 1 if not.
    Verify {
        /// Identity whose public key to use when --public-key is absent.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The signer's public key (raw or hex file).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Also require the key to belong to this PeerId.
        #[arg(long)]
        peer_id: Option<String>,
        /// The signed file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The signature (raw or hex file).
        #[arg(long)]
        sig: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl std::fmt::Display) -> Failure {
    Failure { code, message: message.to_string() }
}

fn identity_path(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    given.or_else(default_identity_path).ok_or_else(|| fail(2, "no identity path: pass --identity or set ANTMESH_HOME"))
}

fn load(given: Option<PathBuf>) -> Result<(PathBuf, Identity), Failure> {
    let path = identity_path(given)?;
    let id = Identity::load(&path).map_err(|e| fail(1, e))?;
    Ok((path, id))
}

/// Reads a key or signature file given raw or as hex text.
fn read_blob(path: &Path, raw_len: usize) -> Result<Vec<u8>, Failure> {
    let bytes = std::fs::read(path).map_err(|e| fail(1, format!("{}: {e}", path.display())))?;
    if bytes.len() == raw_len {
        return Ok(bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    hex::decode(text.trim())
        .map_err(|_| fail(1, format!("{}: neither {raw_len} raw bytes nor hex", path.display())))
}

fn write_out(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes).map_err(|e| fail(1, format!("{}: {e}", path.display())))
}

/// Runs an `id` subcommand.
pub fn run(cmd: IdCommand) -> ExitCode {
    let (json, result) = match cmd {
        IdCommand::New { identity, force, json } => (json, new(identity, force, json)),
        IdCommand::Show { identity, json } => (json, show(identity, json)),
        IdCommand::ExportPublic { identity, out, json } => (json, export_public(identity, out, json)),
        IdCommand::Sign { identity, input, out, json } => (json, sign(identity, &input, out, json)),
        IdCommand::Verify { identity, public_key, peer_id, input, sig, json } => {
            (json, verify(identity, public_key, peer_id, &input, &sig, json))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                println!("{}", json!({ "ok": false, "error": f.message }));
            } else {
                eprintln!("antmesh: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn new(identity: Option<PathBuf>, force: bool, json: bool) -> Result<(), Failure> {
    let path = identity_path(identity)?;
    let id = Identity::generate().map_err(|e| fail(1, e))?;
    id.save(&path, force).map_err(|e| fail(1, e))?;
    if json {
        println!("{}", json!({ "ok": true, "peer_id": id.peer_id().to_hex(), "identity": path.display().to_string() }));
    } else {
        println!("created identity {} in {}", id.peer_id(), path.display());
    }
    Ok(())
}

fn show(identity: Option<PathBuf>, json: bool) -> Result<(), Failure> {
    let (path, id) = load(identity)?;
    if json {
        println!(
            "{}",
            json!({
                "ok": true,
                "peer_id": id.peer_id().to_hex(),
                "identity": path.display().to_string(),
                "algorithm": "ML-DSA-65",
                "public_key_len": id.public().as_bytes().len(),
            })
        );
    } else {
        println!("peer id:   {}\nidentity:  {}\nalgorithm: ML-DSA-65", id.peer_id(), path.display());
    }
    Ok(())
}

fn export_public(identity: Option<PathBuf>, out: Option<PathBuf>, json: bool) -> Result<(), Failure> {
    let (_, id) = load(identity)?;
    let key = id.public().as_bytes();
    if let Some(out) = &out {
        write_out(out, key)?;
    }
    if json {
        println!("{}", json!({ "ok": true, "peer_id": id.peer_id().to_hex(), "public_key": hex::encode(key) }));
    } else if out.is_none() {
        println!("{}", hex::encode(key));
    }
    Ok(())
}

fn sign(identity: Option<PathBuf>, input: &Path, out: Option<PathBuf>, json: bool) -> Result<(), Failure> {
    let (_, id) = load(identity)?;
    let msg = std::fs::read(input).map_err(|e| fail(1, format!("{}: {e}", input.display())))?;
    let sig = id.sign(&msg, CLI_SIGNATURE_CONTEXT).map_err(|e| fail(1, e))?;
    if let Some(out) = &out {
        write_out(out, &sig)?;
    }
    if json {
        println!("{}", json!({ "ok": true, "peer_id": id.peer_id().to_hex(), "signature": hex::encode(sig) }));
    } else if out.is_none() {
        println!("{}", hex::encode(sig));
    }
    Ok(())
}

fn verify(
    identity: Option<PathBuf>,
    public_key: Option<PathBuf>,
    peer_id: Option<String>,
    input: &Path,
    sig: &Path,
    json: bool,
) -> Result<(), Failure> {
    let signer: PublicIdentity = match public_key {
        Some(p) => PublicIdentity::from_bytes(&read_blob(&p, antmesh_host::identity::PUBLIC_KEY_LEN)?).map_err(|e| fail(1, e))?,
        None => load(identity)?.1.public().clone(),
    };
    if let Some(expected) = peer_id {
        let expected: PeerId = expected.parse().map_err(|e| fail(2, e))?;
        PublicIdentity::from_bytes_for(signer.as_bytes(), &expected).map_err(|e| fail(1, e))?;
    }
    let msg = std::fs::read(input).map_err(|e| fail(1, format!("{}: {e}", input.display())))?;
    let sig = read_blob(sig, antmesh_host::identity::SIGNATURE_LEN)?;
    signer.verify(&msg, &sig, CLI_SIGNATURE_CONTEXT).map_err(|e| fail(1, e))?;
    if json {
        println!("{}", json!({ "ok": true, "valid": true, "peer_id": signer.peer_id().to_hex() }));
    } else {
        println!("valid signature by {}", signer.peer_id());
    }
    Ok(())
}
