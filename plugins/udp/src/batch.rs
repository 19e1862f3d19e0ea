//! Batched socket I/O for the I/O thread.
//!
//! On Linux: `sendmmsg` of several messages per call, each message optionally one UDP
//! segmentation offload send (`UDP_SEGMENT`: the kernel cuts one buffer into equal-size
//! datagrams), and `recvmmsg` into several slots per call with receive offload
//! (`UDP_GRO`: the kernel hands over a train of datagrams from one sender in one slot and
//! says where to cut). Elsewhere: one `send_to` / `recv_from` per datagram, same interface.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use socket2::SockAddr;

/// Messages per `sendmmsg` call.
pub const MAX_MSGS: usize = 32;
/// Buffers (pieces of messages) per `sendmmsg` call.
pub const MAX_IOVS: usize = 128;
/// Most datagrams one segmentation offload send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes one segmentation offload send may carry (the UDP payload of a maximal IPv4
/// datagram; the kernel refuses more).
pub const GSO_MAX_BYTES: usize = 65507;
/// Receive slots per `recvmmsg` call when each slot takes one datagram.
const PLAIN_SLOTS: usize = 64;
/// Receive slots per call with receive offload; each holds a whole train (up to 64 KiB).
/// Few on purpose: a `deliver` of at most 128 KiB reaches the host sooner than one of a
/// megabyte, and QUIC bulk on loopback was no slower with 2 than with 4 or 16, at a
/// fraction of the memory.
const GRO_SLOTS: usize = 2;
/// A receive offload train never reaches 64 KiB (the kernel's GRO limit for UDP).
const GRO_SLOT_BYTES: usize = 65536;

/// One outbound message: `iov_len` buffers from `iov_start` in the caller's buffer list,
/// sent back to back to `to`, cut into `seg`-byte datagrams by the kernel when `seg` is set.
pub struct OutMsg {
    pub to: SockAddr,
    pub iov_start: usize,
    pub iov_len: usize,
    pub seg: Option<u16>,
}

/// One received message: `len` bytes in receive buffer number `slot`, datagrams of `seg`
/// bytes (the last may be shorter; `seg == len` without offload).
#[derive(Debug, Clone, Copy)]
pub struct Got {
    pub from: SocketAddr,
    pub slot: usize,
    pub len: usize,
    pub seg: usize,
    /// The slot was too small: the datagram is incomplete and must be dropped.
    pub truncated: bool,
}

/// Which offloads the socket takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Offloads {
    pub gso: bool,
    pub gro: bool,
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::mem::{self, size_of};
    use std::os::fd::AsRawFd;
    use std::ptr;

    use mio::net::UdpSocket;
    use socket2::SockAddr;

    use super::{Got, OutMsg, MAX_IOVS, MAX_MSGS};

    // From linux/udp.h (not in every libc target's constants).
    const UDP_SEGMENT: libc::c_int = 103;
    const UDP_GRO: libc::c_int = 104;

    /// Room for one control message of an `int` (the largest we send or expect).
    const CMSG_BYTES: usize = 32;

    #[derive(Clone, Copy)]
    #[repr(C, align(8))]
    pub struct CmsgBuf([u8; CMSG_BYTES]);

    impl Default for CmsgBuf {
        fn default() -> Self {
            CmsgBuf([0; CMSG_BYTES])
        }
    }

    /// EIO is how the kernel says a device cannot segment (as quinn-udp reads it); EINVAL
    /// also comes from a segment too large for the path, which concerns one message only.
    pub fn offload_refused(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::EIO)
    }

    fn set_int(sock: &UdpSocket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: a valid descriptor, and a pointer to an int with its exact size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Don't-fragment without the kernel's path MTU cache (as quinn's own socket does):
    /// datagrams up to the interface MTU go out with DF, larger ones fail with EMSGSIZE.
    pub fn set_dont_fragment(sock: &UdpSocket, ipv6: bool) -> io::Result<()> {
        if ipv6 {
            set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE)?;
            // IPv4 peers of a dual-stack socket; refused on an IPv6-only socket, harmlessly.
            let _ = set_int(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE);
            Ok(())
        } else {
            set_int(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE)
        }
    }

    /// Puts the calling thread under `SCHED_BATCH` (no wakeup preemption), nice unchanged.
    pub fn set_batch_scheduling() -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Turns receive offload on; false if the kernel does not have it.
    pub fn enable_gro(sock: &UdpSocket) -> bool {
        set_int(sock, libc::SOL_UDP, UDP_GRO, 1).is_ok()
    }

    /// Whether the kernel knows segmentation offload (it can still refuse a send, e.g. on
    /// a device without checksum offload: the caller then falls back).
    pub fn gso_supported(sock: &UdpSocket) -> bool {
        let mut val: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor, an int-sized output buffer and its length.
        let rc = unsafe {
            libc::getsockopt(sock.as_raw_fd(), libc::SOL_UDP, UDP_SEGMENT, (&mut val as *mut libc::c_int).cast(), &mut len)
        };
        rc == 0
    }

    pub fn send(sock: &UdpSocket, msgs: &[OutMsg], bufs: &[&[u8]]) -> io::Result<usize> {
        let n = msgs.len().min(MAX_MSGS);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid value of these plain C structs (null pointers, zero
        // lengths).
        let mut hdrs: [libc::mmsghdr; MAX_MSGS] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; MAX_IOVS] = unsafe { mem::zeroed() };
        let mut cmsgs = [CmsgBuf::default(); MAX_MSGS];
        for (i, b) in bufs.iter().take(MAX_IOVS).enumerate() {
            // The kernel only reads send buffers; the `*mut` is the C signature's.
            iovs[i] = libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() };
        }
        for (i, m) in msgs.iter().take(n).enumerate() {
            if m.iov_start + m.iov_len > bufs.len().min(MAX_IOVS) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "message buffers out of range"));
            }
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = m.to.as_ptr() as *mut libc::c_void;
            h.msg_namelen = m.to.len();
            h.msg_iov = iovs[m.iov_start..].as_mut_ptr();
            h.msg_iovlen = m.iov_len as _;
            if let Some(seg) = m.seg {
                h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE only computes a size.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as libc::c_uint) } as _;
                // SAFETY: msg_control points at CMSG_BYTES (≥ CMSG_SPACE(2)) aligned bytes
                // owned by `cmsgs[i]`, so CMSG_FIRSTHDR returns a header inside them, and its
                // data area holds the u16 (written unaligned to be safe).
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    if c.is_null() {
                        return Err(io::Error::other("no room for the segmentation control message"));
                    }
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as libc::c_uint) as _;
                    ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
        }
        loop {
            // SAFETY: `hdrs[..n]` are initialised message headers whose name, iovec and
            // control pointers refer to `msgs`, `iovs`, `bufs` and `cmsgs`, all alive and
            // unmoved for the duration of the call.
            let rc = unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receive slots' addresses and control buffers, kept between calls.
    pub struct Meta {
        names: Vec<libc::sockaddr_storage>,
        cmsgs: Vec<CmsgBuf>,
    }

    impl Meta {
        pub fn new(slots: usize) -> Meta {
            // SAFETY: all-zero is a valid sockaddr_storage (family AF_UNSPEC).
            let blank: libc::sockaddr_storage = unsafe { mem::zeroed() };
            Meta { names: vec![blank; slots], cmsgs: vec![CmsgBuf::default(); slots] }
        }
    }

    pub const MAX_SLOTS: usize = 64;

    pub fn recv<'a>(
        sock: &UdpSocket,
        bufs: impl Iterator<Item = &'a mut [u8]>,
        meta: &mut Meta,
        gro: bool,
        out: &mut Vec<Got>,
    ) -> io::Result<usize> {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut hdrs: [libc::mmsghdr; MAX_SLOTS] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; MAX_SLOTS] = unsafe { mem::zeroed() };
        let mut n = 0;
        for (i, chunk) in bufs.take(meta.names.len().min(MAX_SLOTS)).enumerate() {
            n = i + 1;
            iovs[i] = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut meta.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if gro {
                h.msg_control = meta.cmsgs[i].0.as_mut_ptr().cast();
                h.msg_controllen = CMSG_BYTES as _;
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let got = loop {
            // SAFETY: `hdrs[..n]` point at `n` disjoint buffers (exclusively borrowed for
            // `'a`, which outlives the call), address and control buffers of the sizes
            // given, all alive for the call.
            // The socket is non-blocking; no timeout.
            let rc = unsafe { libc::recvmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, 0, ptr::null_mut()) };
            if rc >= 0 {
                break rc as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        for (i, h) in hdrs.iter().take(got).enumerate() {
            let len = h.msg_len as usize;
            // SAFETY: the kernel filled `names[i]` and set msg_namelen to its length.
            let from = unsafe { SockAddr::new(meta.names[i], h.msg_hdr.msg_namelen) }.as_socket();
            let Some(from) = from else { continue };
            let mut seg = len;
            if gro {
                // SAFETY: the kernel set msg_control/msg_controllen to the control messages
                // it wrote into `cmsgs[i]`; CMSG_FIRSTHDR/NXTHDR stay within them, and the
                // int is read unaligned.
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                            let v = ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                            if v > 0 {
                                seg = v as usize;
                            }
                        }
                        c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                    }
                }
            }
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            out.push(Got { from, slot: i, len: len.min(iovs[i].iov_len), seg, truncated });
        }
        Ok(got)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;

    use mio::net::UdpSocket;

    use super::{Got, OutMsg};

    pub fn offload_refused(_: &io::Error) -> bool {
        false
    }

    /// No `SCHED_BATCH` outside Linux.
    pub fn set_batch_scheduling() -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "SCHED_BATCH is Linux-only"))
    }

    /// Not set outside Linux: fragmentation stays the system's default.
    pub fn set_dont_fragment(_: &UdpSocket, _: bool) -> io::Result<()> {
        Ok(())
    }

    pub fn enable_gro(_: &UdpSocket) -> bool {
        false
    }

    pub fn gso_supported(_: &UdpSocket) -> bool {
        false
    }

    pub fn send(sock: &UdpSocket, msgs: &[OutMsg], bufs: &[&[u8]]) -> io::Result<usize> {
        let mut sent = 0;
        for m in msgs {
            // Without segmentation offload every message is one datagram in one buffer.
            let (Some(to), Some(data), 1, None) = (m.to.as_socket(), bufs.get(m.iov_start), m.iov_len, m.seg) else {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "message needs segmentation offload"));
            };
            // Retry the same message on EINTR: skipping it would count it as sent.
            let r = loop {
                match sock.send_to(data, to) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            match r {
                Ok(_) => sent += 1,
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(sent)
    }

    pub struct Meta;

    impl Meta {
        pub fn new(_: usize) -> Meta {
            Meta
        }
    }

    pub const MAX_SLOTS: usize = 64;

    pub fn recv<'a>(
        sock: &UdpSocket,
        bufs: impl Iterator<Item = &'a mut [u8]>,
        _: &mut Meta,
        _: bool,
        out: &mut Vec<Got>,
    ) -> io::Result<usize> {
        let mut got = 0;
        for (i, buf) in bufs.take(MAX_SLOTS).enumerate() {
            let size = buf.len();
            match sock.recv_from(buf) {
                Ok((n, from)) => {
                    got += 1;
                    // recv_from cannot tell a datagram that just fits from a cut one.
                    out.push(Got { from, slot: i, len: n.min(size), seg: n, truncated: n >= size });
                }
                Err(e) if got == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(got)
    }
}

/// Probes and enables what the kernel offers on `sock`.
pub fn offloads(sock: &UdpSocket) -> Offloads {
    Offloads { gso: imp::gso_supported(sock), gro: imp::enable_gro(sock) }
}

/// Puts the calling thread under `SCHED_BATCH` where the system has it (Linux).
pub fn set_batch_scheduling() -> io::Result<()> {
    imp::set_batch_scheduling()
}

/// Sends with the don't-fragment bit where the system allows choosing (Linux).
pub fn set_dont_fragment(sock: &UdpSocket, ipv6: bool) -> io::Result<()> {
    imp::set_dont_fragment(sock, ipv6)
}

/// Sends up to [`MAX_MSGS`] messages in one call. Returns how many went (at least one),
/// or the error of the first.
pub fn send(sock: &UdpSocket, msgs: &[OutMsg], bufs: &[&[u8]]) -> io::Result<usize> {
    imp::send(sock, msgs, bufs)
}

/// Whether a failed segmentation offload send means the path cannot take offload (the
/// kernel answers EIO for a device without checksum offload, EINVAL for a segment over the
/// path MTU) rather than that the destination failed.
pub fn offload_refused(e: &io::Error) -> bool {
    imp::offload_refused(e)
}

/// The receive side: an arena of slots and what each call found.
pub struct Receiver {
    arena: Vec<u8>,
    slot: usize,
    gro: bool,
    meta: imp::Meta,
}

impl Receiver {
    /// Slots for datagrams up to `mtu` bytes (one spare byte detects longer ones), or for
    /// whole offload trains with `gro`.
    pub fn new(mtu: usize, gro: bool) -> Receiver {
        let (slot, slots) = if gro { (GRO_SLOT_BYTES.max(mtu + 1), GRO_SLOTS) } else { (mtu + 1, PLAIN_SLOTS) };
        let slots = slots.min(imp::MAX_SLOTS);
        Receiver { arena: vec![0; slot * slots], slot, gro, meta: imp::Meta::new(slots) }
    }

    /// Reads what the socket holds, up to one call's worth, into `out` (cleared first).
    /// `WouldBlock` when there was nothing. Fewer messages than [`slots`](Self::slots)
    /// means the socket was emptied.
    pub fn recv(&mut self, sock: &UdpSocket, out: &mut Vec<Got>) -> io::Result<usize> {
        out.clear();
        let slots = (self.arena.len() / self.slot.max(1)).min(imp::MAX_SLOTS);
        imp::recv(sock, self.arena.chunks_exact_mut(self.slot).take(slots), &mut self.meta, self.gro, out)
    }

    /// Messages one call can return.
    pub fn slots(&self) -> usize {
        (self.arena.len() / self.slot).min(imp::MAX_SLOTS)
    }

    /// The bytes of a received message.
    pub fn bytes(&self, g: &Got) -> &[u8] {
        let off = g.slot * self.slot;
        self.arena.get(off..off + g.len).unwrap_or(&[])
    }
}

/// Reads into buffers the caller lends (pull mode: the host's own), with the socket's
/// receive offload if on, into `out` (cleared first). `WouldBlock` when there was nothing.
pub fn recv_into<'a>(
    sock: &UdpSocket,
    bufs: impl Iterator<Item = &'a mut [u8]>,
    meta: &mut Meta,
    gro: bool,
    out: &mut Vec<Got>,
) -> io::Result<usize> {
    out.clear();
    imp::recv(sock, bufs, &mut meta.0, gro, out)
}

/// Address and control buffers for [`recv_into`], kept between calls.
pub struct Meta(imp::Meta);

impl Meta {
    /// Room for the most slots one call reads.
    pub fn new() -> Meta {
        Meta(imp::Meta::new(imp::MAX_SLOTS))
    }
}

impl Default for Meta {
    fn default() -> Self {
        Meta::new()
    }
}
