//! Finding and checking native plugins.
//!
//! A plugin directory holds either bare libraries (what `cargo build` leaves in its output
//! directory; they describe themselves through their root module) or installed plugins as
//! `<dir>/<name>/plugin.ron` beside their library (the manifest adds a SHA-256 checksum,
//! verified before the library is opened). Every library is checked in this order, and the
//! first failure refuses that plugin with a typed error while the others load:
//!
//! 1. manifest parses, its `abi_version` is accepted by this host, the checksum matches;
//! 2. the library opens and exports an `abi_stable` header;
//! 3. the ABI version it was built against is accepted by this host ([`ABI_VERSION`]);
//! 4. the layout of every type crossing the boundary matches (abi_stable's check);
//! 5. what the library reports matches its manifest, and no other plugin has its name.
//!
//! A node loads only the plugins its configuration names ([`load_named`]): opening a
//! library runs its constructors, so a stray file in the plugin directory must not get
//! that far. `antmesh plugins` lists a whole directory ([`load_dir`]) on request. A
//! manifest's checksum is verified on the bytes that are then loaded (a private in-memory
//! copy on Linux), so the file cannot be swapped between the check and `dlopen`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use antmesh_plugin_api::{AbiVersion, ManifestError, PluginInfo, PluginManifest, TransportModRef, ABI_VERSION};
use sha2::{Digest, Sha256};

/// Why one plugin was refused. The message always names the file.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum PluginLoadError {
    /// `plugin.ron` did not parse.
    #[error("{file}:{source}")]
    Manifest {
        /// The manifest file.
        file: PathBuf,
        /// Line, column and message.
        source: ManifestError,
    },
    /// The plugin was built against an incompatible ABI.
    #[error("{file}: plugin ABI {found} is incompatible with this host's ABI {expected} (rebuild the plugin against antmesh-plugin-api {expected}, or a later {expected_major})", expected_major = major_series(*expected))]
    AbiMismatch {
        /// The library or manifest.
        file: PathBuf,
        /// What this host speaks.
        expected: AbiVersion,
        /// What the plugin was built against.
        found: AbiVersion,
    },
    /// A version string did not parse.
    #[error("{file}: unparseable ABI version `{version}`")]
    BadVersion {
        /// The library or manifest.
        file: PathBuf,
        /// The text.
        version: String,
    },
    /// The library's SHA-256 differs from the manifest's.
    #[error("{file}: checksum mismatch (manifest says {expected}, file is {found})")]
    Checksum {
        /// The library.
        file: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        found: String,
    },
    /// The library could not be opened or is not an antmesh plugin.
    #[error("{file}: not a loadable antmesh plugin: {detail}")]
    Open {
        /// The library.
        file: PathBuf,
        /// The loader's explanation.
        detail: String,
    },
    /// Type layouts differ although the version matches (a plugin built from a modified
    /// contract).
    #[error("{file}: plugin ABI layout differs from this host's: {detail}")]
    Layout {
        /// The library.
        file: PathBuf,
        /// abi_stable's explanation.
        detail: String,
    },
    /// The library and its manifest disagree.
    #[error("{file}: manifest says {field} `{manifest}` but the library reports `{library}`")]
    ManifestMismatch {
        /// The library.
        file: PathBuf,
        /// Which field.
        field: &'static str,
        /// Manifest value.
        manifest: String,
        /// Library value.
        library: String,
    },
    /// Another plugin already has this name.
    #[error("{file}: plugin name `{name}` is already provided by {first}")]
    Duplicate {
        /// The refused library.
        file: PathBuf,
        /// The name.
        name: String,
        /// The library that keeps it.
        first: PathBuf,
    },
    /// The configuration names a plugin the directory does not hold.
    #[error("no plugin named `{name}` in {dir} (looked for {name}/plugin.ron and {library})")]
    NotFound {
        /// The directory.
        dir: PathBuf,
        /// The name.
        name: String,
        /// The bare library file name looked for.
        library: String,
    },
    /// A plugin name that cannot be a file name (empty, or not `[a-z0-9_-]`).
    #[error("`{0}` is not a plugin name (lowercase letters, digits, `_` and `-`)")]
    BadName(String),
    /// The library found under a name reports another.
    #[error("{file}: found as plugin `{wanted}` but reports the name `{reported}`")]
    NameMismatch {
        /// The library.
        file: PathBuf,
        /// The name it was looked up by.
        wanted: String,
        /// The name it reports.
        reported: String,
    },
    /// Reading a file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn major_series(v: AbiVersion) -> String {
    if v.major == 0 {
        format!("0.{}.x", v.minor)
    } else {
        format!("{}.x", v.major)
    }
}

/// A plugin that passed every check.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// The library file.
    pub path: PathBuf,
    /// What the plugin reports about itself.
    pub info: PluginInfo,
    /// Whether it came with a verified `plugin.ron`.
    pub manifest: Option<PluginManifest>,
    pub(crate) module: TransportModRef,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("path", &self.path).field("info", &self.info).finish()
    }
}

impl LoadedPlugin {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        self.info.name.as_str()
    }
}

/// The outcome of scanning a plugin directory.
#[derive(Debug, Default)]
pub struct PluginSet {
    /// The directory scanned.
    pub dir: PathBuf,
    /// Plugins that loaded.
    pub plugins: Vec<LoadedPlugin>,
    /// Plugins that were refused, each with its reason.
    pub errors: Vec<PluginLoadError>,
}

impl PluginSet {
    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<&LoadedPlugin> {
        self.plugins.iter().find(|p| p.name() == name)
    }
}

/// Why a plugin directory could not be scanned at all.
#[derive(thiserror::Error, Debug)]
#[error("cannot read plugin directory {dir}: {source}")]
pub struct PluginDirError {
    /// The directory.
    pub dir: PathBuf,
    /// The error.
    pub source: std::io::Error,
}

/// The default plugin directory: the directory of the running executable (so the output
/// directory of a `cargo build`, where the plugin libraries land beside `antmesh`). Test
/// executables live one level deeper, in `deps/`, and look in its parent.
pub fn default_plugin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf);
    }
    Some(dir)
}

fn is_library(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(std::env::consts::DLL_SUFFIX) && n.starts_with(std::env::consts::DLL_PREFIX))
}

/// Whether `name` can name a plugin (and so a file in the plugin directory).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The file name of plugin `name`'s bare library (`libantmesh_<name>.so` on Linux).
pub fn library_file_name(name: &str) -> String {
    format!("{}antmesh_{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// Loads the plugins called `names` from `dir`, and nothing else: each from
/// `<dir>/<name>/plugin.ron` if installed, else from its bare library
/// ([`library_file_name`]). Refused or missing plugins are listed in
/// [`PluginSet::errors`].
pub fn load_named(dir: &Path, names: &[&str]) -> Result<PluginSet, PluginDirError> {
    std::fs::read_dir(dir).map_err(|source| PluginDirError { dir: dir.to_path_buf(), source })?;
    let mut set = PluginSet { dir: dir.to_path_buf(), ..PluginSet::default() };
    let mut done = std::collections::HashSet::new();
    for &name in names {
        if !done.insert(name) {
            continue;
        }
        if !valid_name(name) {
            set.errors.push(PluginLoadError::BadName(name.to_owned()));
            continue;
        }
        let manifest = dir.join(name).join("plugin.ron");
        let bare = dir.join(library_file_name(name));
        let result = if manifest.is_file() {
            load_installed(&manifest)
        } else if bare.is_file() {
            load_library(&bare, None)
        } else {
            Err(PluginLoadError::NotFound { dir: dir.to_path_buf(), name: name.to_owned(), library: library_file_name(name) })
        };
        match result {
            Ok(p) if p.name() != name => set.errors.push(PluginLoadError::NameMismatch {
                file: p.path.clone(),
                wanted: name.to_owned(),
                reported: p.name().to_owned(),
            }),
            Ok(p) => set.plugins.push(p),
            Err(e) => set.errors.push(e),
        }
    }
    Ok(set)
}

/// Loads every plugin in `dir`. Refused plugins are listed in [`PluginSet::errors`].
pub fn load_dir(dir: &Path) -> Result<PluginSet, PluginDirError> {
    let rd = std::fs::read_dir(dir).map_err(|source| PluginDirError { dir: dir.to_path_buf(), source })?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    let mut set = PluginSet { dir: dir.to_path_buf(), ..PluginSet::default() };
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for path in entries {
        let result = if path.is_dir() {
            let manifest = path.join("plugin.ron");
            if !manifest.is_file() {
                continue; // build/, deps/, incremental/ … in a cargo output directory
            }
            load_installed(&manifest)
        } else if is_library(&path) {
            load_library(&path, None)
        } else {
            continue;
        };
        match result {
            Ok(p) => match seen.get(p.name()) {
                Some(first) => set.errors.push(PluginLoadError::Duplicate {
                    file: p.path.clone(),
                    name: p.name().to_owned(),
                    first: first.clone(),
                }),
                None => {
                    seen.insert(p.name().to_owned(), p.path.clone());
                    set.plugins.push(p);
                }
            },
            Err(e) => set.errors.push(e),
        }
    }
    Ok(set)
}

/// Loads an installed plugin from its `plugin.ron`.
pub fn load_installed(manifest_path: &Path) -> Result<LoadedPlugin, PluginLoadError> {
    let text = std::fs::read_to_string(manifest_path)
        .map_err(|source| PluginLoadError::Io { file: manifest_path.to_path_buf(), source })?;
    let manifest = PluginManifest::parse(&text)
        .map_err(|source| PluginLoadError::Manifest { file: manifest_path.to_path_buf(), source })?;
    let found = AbiVersion::parse(&manifest.abi_version).ok_or_else(|| PluginLoadError::BadVersion {
        file: manifest_path.to_path_buf(),
        version: manifest.abi_version.clone(),
    })?;
    if !ABI_VERSION.accepts(found) {
        return Err(PluginLoadError::AbiMismatch { file: manifest_path.to_path_buf(), expected: ABI_VERSION, found });
    }
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let lib = dir.join(&manifest.library);
    let Some(expected) = manifest.checksum.clone() else { return load_library(&lib, Some(manifest)) };
    let bytes = std::fs::read(&lib).map_err(|source| PluginLoadError::Io { file: lib.clone(), source })?;
    let found = hex::encode(Sha256::digest(&bytes));
    if !found.eq_ignore_ascii_case(&expected) {
        return Err(PluginLoadError::Checksum { file: lib, expected, found });
    }
    load_verified_bytes(&lib, &bytes, manifest)
}

/// Loads a library whose bytes were just checked: from a private in-memory copy of exactly
/// those bytes, so that what runs is what was hashed even if the file changes meanwhile.
/// The copy stays open for the process's life, as native plugins are never unloaded.
#[cfg(target_os = "linux")]
fn load_verified_bytes(lib: &Path, bytes: &[u8], manifest: PluginManifest) -> Result<LoadedPlugin, PluginLoadError> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    let io = |source| PluginLoadError::Io { file: lib.to_path_buf(), source };
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned by `file`.
    let fd = unsafe { libc::memfd_create(c"antmesh-plugin".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes).map_err(io)?;
    let copy = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let mut p = load_library(&copy, Some(manifest)).map_err(|e| match e {
        PluginLoadError::Open { detail, .. } => PluginLoadError::Open { file: lib.to_path_buf(), detail },
        other => other,
    })?;
    p.path = lib.to_path_buf();
    std::mem::forget(file);
    Ok(p)
}

/// Elsewhere the checked file is loaded by path (a window remains between check and load).
#[cfg(not(target_os = "linux"))]
fn load_verified_bytes(lib: &Path, _bytes: &[u8], manifest: PluginManifest) -> Result<LoadedPlugin, PluginLoadError> {
    load_library(lib, Some(manifest))
}

fn describe(err: &LibraryError) -> String {
    match err {
        LibraryError::OpenError { err, .. } => format!("cannot open library: {err}"),
        LibraryError::GetSymbolError { .. } => {
            "exports no abi_stable root module (not built with antmesh_plugin_api::export_transport!)".to_owned()
        }
        other => other.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// Loads one library, optionally checking it against its manifest.
pub fn load_library(path: &Path, manifest: Option<PluginManifest>) -> Result<LoadedPlugin, PluginLoadError> {
    let file = path.to_path_buf();
    let header = lib_header_from_path(path).map_err(|e| PluginLoadError::Open { file: file.clone(), detail: describe(&e) })?;
    let vs = header.version_strings();
    let parsed = vs
        .parsed()
        .map_err(|_| PluginLoadError::BadVersion { file: file.clone(), version: vs.version.as_str().to_owned() })?;
    let found = AbiVersion { major: parsed.major, minor: parsed.minor, patch: parsed.patch };
    if !ABI_VERSION.accepts(found) {
        return Err(PluginLoadError::AbiMismatch { file, expected: ABI_VERSION, found });
    }
    let module = header.init_root_module::<TransportModRef>().map_err(|e| match e {
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => PluginLoadError::AbiMismatch {
            file: file.clone(),
            expected: ABI_VERSION,
            found: AbiVersion { major: actual_version.major, minor: actual_version.minor, patch: actual_version.patch },
        },
        LibraryError::AbiInstability(_) => PluginLoadError::Layout { file: file.clone(), detail: describe(&e) },
        other => PluginLoadError::Open { file: file.clone(), detail: describe(&other) },
    })?;
    let info = (module.info())();
    if let Some(m) = &manifest {
        for (field, want, got) in [
            ("name", m.name.as_str(), info.name.as_str()),
            ("version", m.version.as_str(), info.version.as_str()),
        ] {
            if want != got {
                return Err(PluginLoadError::ManifestMismatch {
                    file,
                    field,
                    manifest: want.to_owned(),
                    library: got.to_owned(),
                });
            }
        }
    }
    Ok(LoadedPlugin { path: file, info, manifest, module })
}
