//! Reading and writing the identity key file, with ssh's permission rule.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::Identity;

const MAGIC: &[u8; 4] = b"AMID";
const VERSION: u8 = 1;
const FILE_LEN: usize = 4 + 1 + 32 + 32;

/// Why an identity could not be created, read or written.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No identity file exists there.
    #[error("{path}: no identity (create one with `antmesh id new`)")]
    Missing {
        /// The key file.
        path: PathBuf,
    },
    /// Group or others may read the key (ssh refuses such keys too).
    #[error("{path}: permissions {mode:04o} are too open; the key must not be readable by group or others (chmod 600 {path})")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Not an antmesh identity file, a version this build does not read, or corrupted.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file is a symbolic link: followed, it could be swapped under the node
    /// between the permission check and the read; dangling, it would be replaced by a new
    /// identity.
    #[error("{path}: is a symbolic link; point the node at the key file itself")]
    Symlink {
        /// The key file.
        path: PathBuf,
    },
    /// Refusing to overwrite an existing identity.
    #[error("{path}: an identity already exists (its PeerId would be lost); pass --force to replace it")]
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// The operating system RNG failed.
    #[error("random number generator failed: {0}")]
    Rng(String),
}

/// `$ANTMESH_HOME/identity.key`, else `$XDG_DATA_HOME/antmesh/identity.key`, else
/// `~/.local/share/antmesh/identity.key`.
pub fn default_identity_path() -> Option<PathBuf> {
    Some(default_data_dir()?.join("identity.key"))
}

/// The node's data directory: `$ANTMESH_HOME`, else `$XDG_DATA_HOME/antmesh`, else
/// `~/.local/share/antmesh`.
pub fn default_data_dir() -> Option<PathBuf> {
    let env_dir = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env_dir("ANTMESH_HOME")
        .or_else(|| env_dir("XDG_DATA_HOME").map(|d| d.join("antmesh")))
        .or_else(|| env_dir("HOME").map(|h| h.join(".local/share/antmesh")))
}

impl Identity {
    /// Reads an identity, refusing a key file readable by group or others, and a symbolic
    /// link. The permissions checked are those of the very file read (one open, no
    /// following of links), so nothing can be swapped in between.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let io = |source| IdentityError::Io { path: path.to_path_buf(), source };
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_NOFOLLOW);
        }
        let mut file = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IdentityError::Missing { path: path.to_path_buf() }),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(IdentityError::Symlink { path: path.to_path_buf() }),
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions { path: path.to_path_buf(), mode });
            }
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
        // One byte more than a key file holds, to tell a longer file apart.
        (&mut file).take(FILE_LEN as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
        let corrupt = |reason: &str| IdentityError::Corrupt { path: path.to_path_buf(), reason: reason.to_owned() };
        if bytes.len() != FILE_LEN || &bytes[..4] != MAGIC {
            return Err(corrupt("not an antmesh identity file"));
        }
        if bytes[4] != VERSION {
            return Err(corrupt(&format!("identity file version {} is not supported (this build reads {VERSION})", bytes[4])));
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[5..37]);
        let id = Identity::from_seed(seed);
        if id.peer_id().0[..] != bytes[37..69] {
            return Err(corrupt("check value mismatch: the file is damaged"));
        }
        Ok(id)
    }

    /// Writes the identity to `path` with mode 0600 (atomically: a temporary file in the same
    /// directory, then rename). Refuses to replace an existing file unless `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io { path: path.to_path_buf(), source };
        // `symlink_metadata`: a dangling link is something that exists, not room for a key.
        if !force && std::fs::symlink_metadata(path).is_ok() {
            return Err(IdentityError::Exists { path: path.to_path_buf() });
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // Created owner-only, like the data directory the node makes (it usually is one).
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(io)?;
        let mut content = Zeroizing::new(Vec::with_capacity(FILE_LEN));
        content.extend_from_slice(MAGIC);
        content.push(VERSION);
        content.extend_from_slice(self.seed());
        content.extend_from_slice(&self.peer_id().0);
        let tmp = dir.join(format!(".identity.{}.tmp", std::process::id()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let _ = std::fs::remove_file(&tmp);
        let mut f = opts.open(&tmp).map_err(io)?;
        let written = f.write_all(&content).and_then(|_| f.sync_all());
        drop(f);
        if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        // The rename is durable only once the directory is: without this a power cut can
        // lose a key the node already used, and a new one would be made on restart.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Loads the identity at `path`, creating a new one if none exists. The bool says
    /// whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Identity, bool), IdentityError> {
        match Identity::load(path) {
            Ok(id) => Ok((id, false)),
            Err(IdentityError::Missing { .. }) => {
                let id = Identity::generate()?;
                id.save(path, false)?;
                Ok((id, true))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_load_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let id = Identity::generate().unwrap();
        id.save(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Identity::load(&path).unwrap();
        assert_eq!(back.peer_id(), id.peer_id());
        assert!(matches!(Identity::generate().unwrap().save(&path, false), Err(IdentityError::Exists { .. })));
    }

    #[test]
    fn group_or_world_readable_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        Identity::generate().unwrap().save(&path, false).unwrap();
        for mode in [0o640, 0o604, 0o644, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match Identity::load(&path) {
                Err(IdentityError::Permissions { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Identity::load(&path).unwrap();
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let id = Identity::generate().unwrap();
        id.save(&path, false).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Identity::load(&path), Err(IdentityError::Corrupt { .. })));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(Identity::load(&path), Err(IdentityError::Corrupt { .. })));
        assert!(matches!(Identity::load(&dir.path().join("none")), Err(IdentityError::Missing { .. })));
    }

    #[test]
    fn a_missing_directory_is_created_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home").join("identity.key");
        Identity::generate().unwrap().save(&path, false).unwrap();
        let mode = std::fs::metadata(dir.path().join("home")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn symbolic_links_are_refused_and_a_dangling_one_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        let id = Identity::generate().unwrap();
        id.save(&real, false).unwrap();
        let link = dir.path().join("identity.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(Identity::load(&link), Err(IdentityError::Symlink { .. })));
        let dangling = dir.path().join("dangling.key");
        std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
        assert!(matches!(Identity::load_or_create(&dangling), Err(IdentityError::Symlink { .. })));
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink(), "the link was not replaced");
        assert!(matches!(Identity::generate().unwrap().save(&dangling, false), Err(IdentityError::Exists { .. })));
    }
}
