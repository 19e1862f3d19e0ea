//! Addresses: the canonical text form ([`TransportAddr`]) used in config, CLI and logs, and
//! the compact form ([`LinkAddr`]) that crosses the plugin boundary on every frame.
//!
//! Canonical forms (one per address; `format(parse(s)) == s` for canonical `s`):
//!
//! | scheme | example |
//! |---|---|
//! | `udp` | `udp://192.0.2.1:9000`, `udp://[2001:db8::1]:9000` |
//! | `tcp` | `tcp://192.0.2.1:4242` |
//! | `serial` | `serial:///dev/ttyUSB0?baud=115200` |
//! | `pipe` | `pipe://radio-bridge` |
//! | `kiss+tcp` | `kiss+tcp://127.0.0.1:8001` |
//! | `kiss+serial` | `kiss+serial:///dev/ttyS0?baud=9600` |
//! | `ax25` | `ax25://N0CALL-7` |
//! | `rnode` | `rnode:///dev/ttyACM0?freq=868000000&sf=8` |
//! | `i2p` | `i2p://<52 base32 chars>.b32.i2p` |
//! | `ygg` | `ygg://[200::1]:9000` |
//! | `ble` | `ble://AA:BB:CC:DD:EE:FF` |
//!
//! Paths and names are percent-encoded where they contain bytes outside
//! `A-Z a-z 0-9 - . _ ~ /` (paths) or `A-Z a-z 0-9 - . _ ~` (names).

use abi_stable::std_types::RString;
use abi_stable::StableAbi;
use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// An IP socket address in a layout that can cross the plugin boundary without allocation.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPort {
    /// IPv6 octets; IPv4 is stored mapped (`::ffff:a.b.c.d`) with `v4 = true`.
    pub octets: [u8; 16],
    /// Port number.
    pub port: u16,
    /// Whether this is an IPv4 address.
    pub v4: bool,
    /// IPv6 scope id (0 for IPv4 and global IPv6).
    pub scope_id: u32,
}

impl From<SocketAddr> for IpPort {
    fn from(sa: SocketAddr) -> Self {
        match sa {
            SocketAddr::V4(v4) => IpPort {
                octets: v4.ip().to_ipv6_mapped().octets(),
                port: v4.port(),
                v4: true,
                scope_id: 0,
            },
            SocketAddr::V6(v6) => IpPort {
                octets: v6.ip().octets(),
                port: v6.port(),
                v4: false,
                scope_id: v6.scope_id(),
            },
        }
    }
}

impl From<IpPort> for SocketAddr {
    fn from(a: IpPort) -> Self {
        let v6 = Ipv6Addr::from(a.octets);
        match (a.v4, v6.to_ipv4_mapped()) {
            (true, Some(v4)) => SocketAddr::new(IpAddr::V4(v4), a.port),
            (true, None) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), a.port),
            (false, _) => SocketAddr::V6(SocketAddrV6::new(v6, a.port, 0, a.scope_id)),
        }
    }
}

/// A peer address as a transport instance sees it (the scheme is the instance's own).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkAddr {
    /// An IP endpoint (UDP, TCP).
    Ip(IpPort),
    /// A named endpoint: a device path, a pipe name, a callsign, an overlay destination.
    Named(RString),
    /// Every peer on the medium (only where `Capabilities::broadcast` is declared).
    Broadcast,
}

impl LinkAddr {
    /// The IP endpoint, if this is one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            LinkAddr::Ip(ip) => Some(SocketAddr::from(*ip)),
            _ => None,
        }
    }
}

impl From<SocketAddr> for LinkAddr {
    fn from(sa: SocketAddr) -> Self {
        LinkAddr::Ip(IpPort::from(sa))
    }
}

impl fmt::Display for LinkAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkAddr::Ip(ip) => write!(f, "{}", SocketAddr::from(*ip)),
            LinkAddr::Named(n) => f.write_str(n),
            LinkAddr::Broadcast => f.write_str("*"),
        }
    }
}

/// Why an address did not parse.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrParseError {
    /// No `scheme://` prefix.
    #[error("missing scheme (expected e.g. udp://192.0.2.1:9000)")]
    MissingScheme,
    /// The scheme is not one antmesh knows.
    #[error("unknown address scheme `{0}`")]
    UnknownScheme(String),
    /// The socket address part did not parse.
    #[error("bad socket address `{0}`")]
    BadSocketAddr(String),
    /// A required path or name is empty.
    #[error("empty {0}")]
    Empty(&'static str),
    /// A percent escape or character is invalid.
    #[error("invalid character or escape in `{0}`")]
    BadEncoding(String),
    /// A query parameter is malformed or not allowed for the scheme.
    #[error("bad parameter `{0}`")]
    BadParam(String),
    /// An AX.25 callsign is malformed.
    #[error("bad AX.25 callsign `{0}` (1-6 letters/digits, optional -SSID 0-15)")]
    BadCallsign(String),
    /// An I2P destination is malformed.
    #[error("bad I2P destination `{0}` (expected 52 base32 chars + .b32.i2p)")]
    BadI2p(String),
    /// A BLE address is malformed.
    #[error("bad BLE address `{0}` (expected AA:BB:CC:DD:EE:FF)")]
    BadBle(String),
}

/// A device path plus ordered `key=value` parameters (`serial`, `kiss+serial`, `rnode`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DevicePath {
    /// Absolute device path, e.g. `/dev/ttyUSB0`.
    pub path: String,
    /// Parameters in the order given, e.g. `[("baud", "115200")]`.
    pub params: Vec<(String, String)>,
}

impl DevicePath {
    /// The value of parameter `key`, if present.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// An address in its canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportAddr {
    /// `udp://ip:port`
    Udp(SocketAddr),
    /// `tcp://ip:port`
    Tcp(SocketAddr),
    /// `serial:///dev/x?baud=N`
    Serial(DevicePath),
    /// `pipe://name`
    Pipe(String),
    /// `kiss+tcp://ip:port` (a KISS TNC reached over TCP)
    KissTcp(SocketAddr),
    /// `kiss+serial:///dev/x?baud=N`
    KissSerial(DevicePath),
    /// `ax25://CALL-SSID`
    Ax25 {
        /// Upper-case callsign.
        callsign: String,
        /// SSID 0-15.
        ssid: u8,
    },
    /// `rnode:///dev/x?freq=…&sf=…`
    Rnode(DevicePath),
    /// `i2p://<b32>.b32.i2p`
    I2p(String),
    /// `ygg://[200::/7 address]:port`
    Ygg(SocketAddrV6),
    /// `ble://AA:BB:CC:DD:EE:FF`
    Ble([u8; 6]),
}

impl TransportAddr {
    /// The scheme, e.g. `"udp"`.
    pub fn scheme(&self) -> &'static str {
        match self {
            TransportAddr::Udp(_) => "udp",
            TransportAddr::Tcp(_) => "tcp",
            TransportAddr::Serial(_) => "serial",
            TransportAddr::Pipe(_) => "pipe",
            TransportAddr::KissTcp(_) => "kiss+tcp",
            TransportAddr::KissSerial(_) => "kiss+serial",
            TransportAddr::Ax25 { .. } => "ax25",
            TransportAddr::Rnode(_) => "rnode",
            TransportAddr::I2p(_) => "i2p",
            TransportAddr::Ygg(_) => "ygg",
            TransportAddr::Ble(_) => "ble",
        }
    }

    /// The boundary form of this address for the instance that owns the scheme.
    pub fn to_link(&self) -> LinkAddr {
        match self {
            TransportAddr::Udp(sa) | TransportAddr::Tcp(sa) | TransportAddr::KissTcp(sa) => {
                LinkAddr::from(*sa)
            }
            TransportAddr::Ygg(sa) => LinkAddr::from(SocketAddr::V6(*sa)),
            other => {
                // Everything after "scheme://" names the peer.
                let text = other.to_string();
                let rest = text.split_once("://").map(|(_, r)| r.to_owned()).unwrap_or(text);
                LinkAddr::Named(RString::from(rest))
            }
        }
    }

    /// Rebuilds the canonical address from an instance's scheme and a boundary address.
    /// `None` for `Broadcast` or a mismatched kind.
    pub fn from_link(scheme: &str, link: &LinkAddr) -> Option<TransportAddr> {
        match link {
            LinkAddr::Broadcast => None,
            LinkAddr::Ip(ip) => {
                let sa = SocketAddr::from(*ip);
                match scheme {
                    "udp" => Some(TransportAddr::Udp(sa)),
                    "tcp" => Some(TransportAddr::Tcp(sa)),
                    "kiss+tcp" => Some(TransportAddr::KissTcp(sa)),
                    "ygg" => match sa {
                        SocketAddr::V6(v6) => Some(TransportAddr::Ygg(v6)),
                        SocketAddr::V4(_) => None,
                    },
                    _ => None,
                }
            }
            LinkAddr::Named(n) => format!("{scheme}://{n}").parse().ok(),
        }
    }
}

fn is_unreserved(b: u8, allow_slash: bool) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (allow_slash && b == b'/')
}

fn encode(s: &str, allow_slash: bool, out: &mut String) {
    for &b in s.as_bytes() {
        if is_unreserved(b, allow_slash) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn decode(s: &str, allow_slash: bool) -> Result<String, AddrParseError> {
    let bad = || AddrParseError::BadEncoding(s.to_owned());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            // Upper-case hex only, so each byte string has exactly one encoding.
            if !hex.bytes().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)) {
                return Err(bad());
            }
            let v = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
            if is_unreserved(v, allow_slash) {
                return Err(bad()); // must not be escaped: keeps the text form canonical
            }
            out.push(v);
            i += 3;
        } else if is_unreserved(b, allow_slash) {
            out.push(b);
            i += 1;
        } else {
            return Err(bad());
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn parse_sock(s: &str) -> Result<SocketAddr, AddrParseError> {
    let sa: SocketAddr = s.parse().map_err(|_| AddrParseError::BadSocketAddr(s.to_owned()))?;
    // Scope ids and flow info have no canonical text here; refuse rather than lose them.
    if let SocketAddr::V6(v6) = sa {
        if v6.scope_id() != 0 || v6.flowinfo() != 0 {
            return Err(AddrParseError::BadSocketAddr(s.to_owned()));
        }
    }
    if sa.to_string() != s {
        return Err(AddrParseError::BadSocketAddr(s.to_owned()));
    }
    Ok(sa)
}

fn parse_device(rest: &str) -> Result<DevicePath, AddrParseError> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() || path == "/" {
        return Err(AddrParseError::Empty("device path"));
    }
    if !path.starts_with('/') {
        return Err(AddrParseError::BadEncoding(path.to_owned()));
    }
    let path = decode(path, true)?;
    let mut params = Vec::new();
    if let Some(q) = query {
        for kv in q.split('&') {
            let (k, v) = kv.split_once('=').ok_or_else(|| AddrParseError::BadParam(kv.to_owned()))?;
            if k.is_empty() {
                return Err(AddrParseError::BadParam(kv.to_owned()));
            }
            params.push((decode(k, false)?, decode(v, false)?));
        }
    }
    Ok(DevicePath { path, params })
}

fn fmt_device(scheme: &str, d: &DevicePath) -> String {
    let mut s = format!("{scheme}://");
    encode(&d.path, true, &mut s);
    for (i, (k, v)) in d.params.iter().enumerate() {
        s.push(if i == 0 { '?' } else { '&' });
        encode(k, false, &mut s);
        s.push('=');
        encode(v, false, &mut s);
    }
    s
}

fn parse_callsign(s: &str) -> Result<(String, u8), AddrParseError> {
    let bad = || AddrParseError::BadCallsign(s.to_owned());
    let (call, ssid) = match s.split_once('-') {
        Some((c, n)) => {
            let n: u8 = n.parse().map_err(|_| bad())?;
            if n == 0 || n > 15 || n.to_string() != s.split_once('-').map(|x| x.1).unwrap_or_default() {
                return Err(bad());
            }
            (c, n)
        }
        None => (s, 0),
    };
    if call.is_empty() || call.len() > 6 || !call.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) {
        return Err(bad());
    }
    Ok((call.to_owned(), ssid))
}

impl FromStr for TransportAddr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or(AddrParseError::MissingScheme)?;
        match scheme {
            "udp" => Ok(TransportAddr::Udp(parse_sock(rest)?)),
            "tcp" => Ok(TransportAddr::Tcp(parse_sock(rest)?)),
            "kiss+tcp" => Ok(TransportAddr::KissTcp(parse_sock(rest)?)),
            "serial" => Ok(TransportAddr::Serial(parse_device(rest)?)),
            "kiss+serial" => Ok(TransportAddr::KissSerial(parse_device(rest)?)),
            "rnode" => Ok(TransportAddr::Rnode(parse_device(rest)?)),
            "pipe" => {
                if rest.is_empty() {
                    return Err(AddrParseError::Empty("pipe name"));
                }
                Ok(TransportAddr::Pipe(decode(rest, false)?))
            }
            "ax25" => {
                let (callsign, ssid) = parse_callsign(rest)?;
                Ok(TransportAddr::Ax25 { callsign, ssid })
            }
            "i2p" => {
                let b32 = rest.strip_suffix(".b32.i2p").ok_or_else(|| AddrParseError::BadI2p(rest.to_owned()))?;
                if b32.len() != 52 || !b32.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)) {
                    return Err(AddrParseError::BadI2p(rest.to_owned()));
                }
                Ok(TransportAddr::I2p(rest.to_owned()))
            }
            "ygg" => match parse_sock(rest)? {
                SocketAddr::V6(v6) if (v6.ip().octets()[0] & 0xfe) == 0x02 => Ok(TransportAddr::Ygg(v6)),
                _ => Err(AddrParseError::BadSocketAddr(rest.to_owned())),
            },
            "ble" => {
                let bad = || AddrParseError::BadBle(rest.to_owned());
                let mut mac = [0u8; 6];
                let parts: Vec<&str> = rest.split(':').collect();
                if parts.len() != 6 {
                    return Err(bad());
                }
                for (i, p) in parts.iter().enumerate() {
                    if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)) {
                        return Err(bad());
                    }
                    mac[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
                }
                Ok(TransportAddr::Ble(mac))
            }
            other => Err(AddrParseError::UnknownScheme(other.to_owned())),
        }
    }
}

impl fmt::Display for TransportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportAddr::Udp(sa) => write!(f, "udp://{sa}"),
            TransportAddr::Tcp(sa) => write!(f, "tcp://{sa}"),
            TransportAddr::KissTcp(sa) => write!(f, "kiss+tcp://{sa}"),
            TransportAddr::Serial(d) => f.write_str(&fmt_device("serial", d)),
            TransportAddr::KissSerial(d) => f.write_str(&fmt_device("kiss+serial", d)),
            TransportAddr::Rnode(d) => f.write_str(&fmt_device("rnode", d)),
            TransportAddr::Pipe(name) => {
                let mut s = String::from("pipe://");
                encode(name, false, &mut s);
                f.write_str(&s)
            }
            TransportAddr::Ax25 { callsign, ssid: 0 } => write!(f, "ax25://{callsign}"),
            TransportAddr::Ax25 { callsign, ssid } => write!(f, "ax25://{callsign}-{ssid}"),
            TransportAddr::I2p(d) => write!(f, "i2p://{d}"),
            TransportAddr::Ygg(sa) => write!(f, "ygg://{sa}"),
            TransportAddr::Ble(m) => write!(
                f,
                "ble://{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        }
    }
}
