//! The plugin author's side: implement [`Transport`], call [`export_transport!`](crate::export_transport).
//!
//! The adapter here is why no plugin can take the host down by panicking: every call into
//! the plugin runs under `catch_unwind`, a panic becomes a typed error, and the instance is
//! disabled afterwards (its state may be broken, so it is not trusted again). It also
//! enforces the MTU rule for every plugin: an oversized frame is refused, never truncated.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RNone, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};

use crate::addr::LinkAddr;
use crate::caps::Capabilities;
use crate::contract::{
    BatchResult, HostHandleBox, InFrame, LogLevel, OutFrame, RecvSlot, TransportInstance, TransportInstanceBox,
    TransportInstance_TO,
};
use crate::error::{PluginError, PluginErrorKind, SendError};

/// A transport instance as a plugin author writes it: plain Rust, no FFI types to juggle.
pub trait Transport: Send + Sync + 'static {
    /// Declared capabilities (read once, at open).
    fn capabilities(&self) -> Capabilities;

    /// Canonical text addresses peers reach this instance at.
    fn local_addresses(&self) -> Vec<String>;

    /// Queues one frame; never blocks. The adapter has already checked the MTU.
    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError>;

    /// Queues frames in order; override when the plugin can do better than one at a time.
    fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult {
        for (i, f) in frames.iter().enumerate() {
            if let Err(e) = self.send(&f.to, f.data.as_slice()) {
                return BatchResult { accepted: i as u32, error: ROption::RSome(e) };
            }
        }
        BatchResult { accepted: frames.len() as u32, error: RNone }
    }

    /// Stops threads and releases descriptors; no host callback may run after it returns.
    fn close(&self) -> Result<(), PluginError>;

    /// Pull receiving, for plugins that can read in place (see
    /// [`TransportInstance::recv_pull`]):
    /// `None` (the default) if not supported, else how many slots were filled, `Some(0)`
    /// promising a [`Host::readable`] once something arrives.
    fn recv_pull(&self, slots: &mut [RecvSlot<'_>]) -> Option<usize> {
        let _ = slots;
        None
    }
}

/// Extracts a readable message from a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs `f`, turning a panic into `Err(message)`. Plugin threads wrap their bodies in this
/// so a bug in one thread is reported instead of aborting the process.
pub fn guard<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// The host's callbacks, as the plugin sees them.
#[derive(Clone)]
pub struct Host(HostHandleBox);

impl Host {
    /// Wraps the handle received in `open`.
    pub fn new(handle: HostHandleBox) -> Self {
        Host(handle)
    }

    /// Delivers a batch of received frames.
    pub fn deliver(&self, frames: &[InFrame<'_>]) {
        if !frames.is_empty() {
            self.0.deliver(RSlice::from_slice(frames));
        }
    }

    /// Delivers one received frame.
    pub fn deliver_one(&self, from: LinkAddr, data: &[u8]) {
        self.deliver(&[InFrame { from, data: RSlice::from_slice(data) }]);
    }

    /// Reports a peer reachable.
    pub fn link_up(&self, peer: &LinkAddr) {
        self.0.link_up(peer);
    }

    /// Reports a peer unreachable.
    pub fn link_down(&self, peer: &LinkAddr, reason: &str) {
        self.0.link_down(peer, RStr::from_str(reason));
    }

    /// Signals room after a `WouldBlock`.
    pub fn writable(&self) {
        self.0.writable();
    }

    /// Pull mode: signals that something arrived after `recv_pull` found nothing.
    pub fn readable(&self) {
        self.0.readable();
    }

    /// Logs a line at `level`.
    pub fn log(&self, level: LogLevel, message: &str) {
        self.0.log(level, RStr::from_str(message));
    }

    /// Logs at debug level.
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message);
    }

    /// Logs at info level.
    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message);
    }
}

struct Guarded<T> {
    inner: T,
    caps: Capabilities,
    disabled: AtomicBool,
    /// For reporting what a return value cannot carry (a panic inside `recv_pull`).
    host: Host,
}

impl<T: Transport> Guarded<T> {
    fn call<R>(&self, on_panic: impl FnOnce(RString) -> R, f: impl FnOnce(&T) -> R) -> Result<R, R> {
        match guard(|| f(&self.inner)) {
            Ok(r) => Ok(r),
            Err(msg) => {
                self.disabled.store(true, Ordering::SeqCst);
                Err(on_panic(RString::from(msg)))
            }
        }
    }

    fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::SeqCst)
    }

    fn check_size(&self, len: usize) -> Result<(), SendError> {
        if len > self.caps.mtu as usize {
            return Err(SendError::TooLarge { size: u32::try_from(len).unwrap_or(u32::MAX), mtu: self.caps.mtu });
        }
        Ok(())
    }
}

impl<T: Transport> TransportInstance for Guarded<T> {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addresses(&self) -> RVec<RString> {
        if self.is_disabled() {
            return RVec::new();
        }
        self.call(|_| Vec::new(), |t| t.local_addresses())
            .unwrap_or_else(|e| e)
            .into_iter()
            .map(RString::from)
            .collect()
    }

    fn send(&self, to: &LinkAddr, frame: RSlice<'_, u8>) -> RResult<(), SendError> {
        if self.is_disabled() {
            return RResult::RErr(SendError::Closed);
        }
        if let Err(e) = self.check_size(frame.len()) {
            return RResult::RErr(e);
        }
        self.call(|m| Err(SendError::Panicked(m)), |t| t.send(to, frame.as_slice()))
            .unwrap_or_else(|e| e)
            .into()
    }

    fn send_batch(&self, frames: RSlice<'_, OutFrame<'_>>) -> BatchResult {
        if self.is_disabled() {
            return BatchResult { accepted: 0, error: ROption::RSome(SendError::Closed) };
        }
        // Oversized frames stop the batch at their index; the ones before still go.
        let frames = frames.as_slice();
        let ok_prefix = frames.iter().position(|f| f.data.len() > self.caps.mtu as usize).unwrap_or(frames.len());
        let mut result = self
            .call(
                |m| BatchResult { accepted: 0, error: ROption::RSome(SendError::Panicked(m)) },
                |t| t.send_batch(&frames[..ok_prefix]),
            )
            .unwrap_or_else(|e| e);
        if result.error.is_none() && ok_prefix < frames.len() {
            if let Err(e) = self.check_size(frames[ok_prefix].data.len()) {
                result.error = ROption::RSome(e);
            }
        }
        result
    }

    fn recv_pull(&self, mut slots: RSliceMut<'_, RecvSlot<'_>>) -> ROption<u32> {
        if self.is_disabled() {
            // Nothing more comes from a disabled instance; "nothing now" keeps the host
            // from falling back to a delivery path that is just as dead.
            return ROption::RSome(0);
        }
        let n = slots.len();
        let on_panic = |m: RString| {
            // "Nothing now" is all the return value can say; the host must still learn why
            // its socket went quiet.
            self.host.log(LogLevel::Error, &format!("plugin panicked in recv_pull, instance disabled: {m}"));
            Some(0)
        };
        self.call(on_panic, |t| t.recv_pull(slots.as_mut_slice()))
            .unwrap_or_else(|e| e)
            .map(|filled| u32::try_from(filled.min(n)).unwrap_or(u32::MAX))
            .into()
    }

    fn close(&self) -> RResult<(), PluginError> {
        // A disabled instance still gets its close: threads and descriptors must go.
        self.call(|m| Err(PluginError { kind: PluginErrorKind::Panicked, message: m }), |t| t.close())
            .unwrap_or_else(|e| e)
            .into()
    }
}

/// The body of the generated `open` export: parses nothing itself, runs the plugin's
/// opener under `catch_unwind`, and wraps the result in the guarded adapter.
pub fn open_guarded<T: Transport>(
    config: RStr<'_>,
    host: HostHandleBox,
    open: fn(&str, Host) -> Result<T, PluginError>,
) -> RResult<TransportInstanceBox, PluginError> {
    let report = Host::new(host.clone());
    let opened = guard(|| {
        let t = open(config.as_str(), Host::new(host))?;
        let caps = t.capabilities();
        Ok::<_, PluginError>(Guarded { inner: t, caps, disabled: AtomicBool::new(false), host: report })
    });
    match opened {
        Ok(Ok(g)) => RResult::ROk(TransportInstance_TO::from_value(g, TD_Opaque)),
        Ok(Err(e)) => RResult::RErr(e),
        Err(msg) => RResult::RErr(PluginError::new(PluginErrorKind::Panicked, format!("panic in open: {msg}"))),
    }
}

/// Parses an instance config from RON, reporting line and column on error.
pub fn parse_config<C: serde::de::DeserializeOwned>(text: &str) -> Result<C, PluginError> {
    ron::Options::default()
        .from_str::<C>(text)
        .map_err(|e| PluginError::bad_config(format!("{}:{}: {}", e.span.start.line, e.span.start.col, e.code)))
}

/// Exports a transport plugin's root module.
///
/// ```ignore
/// antmesh_plugin_api::export_transport! {
///     name: "udp",
///     description: "UDP datagrams",
///     schemes: ["udp"],
///     capabilities: default_capabilities(), // what the default config declares
///     open: my_open, // fn(&str, Host) -> Result<MyTransport, PluginError>
/// }
/// ```
/// The plugin crate must depend on `abi_stable` directly (the export attribute names it).
#[macro_export]
macro_rules! export_transport {
    (
        name: $name:expr,
        description: $desc:expr,
        schemes: [$($scheme:expr),* $(,)?],
        capabilities: $caps:expr,
        open: $open:path $(,)?
    ) => {
        extern "C" fn __antmesh_plugin_info() -> $crate::PluginInfo {
            $crate::PluginInfo {
                name: $crate::abi_stable::std_types::RString::from($name),
                version: $crate::abi_stable::std_types::RString::from(env!("CARGO_PKG_VERSION")),
                abi_version: $crate::ABI_VERSION,
                schemes: $crate::abi_stable::std_types::RVec::from(vec![
                    $($crate::abi_stable::std_types::RString::from($scheme)),*
                ]),
                description: $crate::abi_stable::std_types::RString::from($desc),
                capabilities: $caps,
            }
        }

        extern "C" fn __antmesh_plugin_open(
            config: $crate::abi_stable::std_types::RStr<'_>,
            host: $crate::HostHandleBox,
        ) -> $crate::abi_stable::std_types::RResult<$crate::TransportInstanceBox, $crate::PluginError> {
            $crate::export::open_guarded(config, host, $open)
        }

        /// The plugin's root module (generated by `export_transport!`).
        #[$crate::abi_stable::export_root_module]
        pub fn antmesh_transport_root_module() -> $crate::TransportModRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::TransportMod { info: __antmesh_plugin_info, open: __antmesh_plugin_open }.leak_into_prefix()
        }
    };
}
