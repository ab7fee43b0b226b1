//! The clsact qdisc that tc programs attached through netlink hang from
//! (kernels without TCX, before 6.6, or `FERRY_TC_ATTACH=netlink`). aya adds
//! one (`qdisc_add_clsact`) but can neither list what is left on it nor
//! delete it; this is the little rtnetlink that does, so Ferry removes a
//! qdisc it added once the last filter on it is gone.
//!
//! Every call works in the calling thread's network namespace.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use aya::programs::tc::{self, TcError};

/// `TC_H_CLSACT` (== `TC_H_INGRESS`): the clsact qdisc's parent.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
/// The clsact qdisc's handle, `ffff:`.
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
/// The parents of its ingress and egress filters (`ffff:fff2`, `ffff:fff3`).
const CLSACT_PARENTS: [u32; 2] = [0xFFFF_FFF2, 0xFFFF_FFF3];
const TCA_KIND: u16 = 1;

/// Adds a clsact qdisc to `ifname`; false if it already had one.
pub(super) fn add(ifname: &str) -> io::Result<bool> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(true),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(TcError::IoError(e)) => Err(e),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// How many filters (of anyone) hang from `ifindex`'s clsact, ingress and
/// egress together; 0 without the qdisc.
pub(super) fn filters(ifindex: u32) -> io::Result<usize> {
    let mut n = 0;
    for parent in CLSACT_PARENTS {
        let req = request(
            libc::RTM_GETTFILTER,
            libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
            ifindex,
            0,
            parent,
            None,
        );
        n += Socket::open()?.exchange(&req, true)?;
    }
    Ok(n)
}

/// Deletes `ifindex`'s clsact qdisc (and whatever still hangs from it).
pub(super) fn delete(ifindex: u32) -> io::Result<()> {
    let req = request(
        libc::RTM_DELQDISC,
        libc::NLM_F_REQUEST | libc::NLM_F_ACK,
        ifindex,
        CLSACT_HANDLE,
        TC_H_CLSACT,
        Some(b"clsact\0"),
    );
    Socket::open()?.exchange(&req, false).map(drop)
}

/// `struct tcmsg`.
#[repr(C)]
struct TcMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

fn request(ty: u16, flags: libc::c_int, ifindex: u32, handle: u32, parent: u32, kind: Option<&[u8]>) -> Vec<u8> {
    let hdr = size_of::<libc::nlmsghdr>();
    let mut b = vec![0u8; hdr];
    let tcm = TcMsg {
        family: libc::AF_UNSPEC as u8,
        pad1: 0,
        pad2: 0,
        ifindex: ifindex as i32,
        handle,
        parent,
        info: 0,
    };
    b.extend_from_slice(&[tcm.family, tcm.pad1]);
    b.extend_from_slice(&tcm.pad2.to_ne_bytes());
    b.extend_from_slice(&tcm.ifindex.to_ne_bytes());
    b.extend_from_slice(&tcm.handle.to_ne_bytes());
    b.extend_from_slice(&tcm.parent.to_ne_bytes());
    b.extend_from_slice(&tcm.info.to_ne_bytes());
    if let Some(kind) = kind {
        let len = 4 + kind.len();
        b.extend_from_slice(&(len as u16).to_ne_bytes());
        b.extend_from_slice(&TCA_KIND.to_ne_bytes());
        b.extend_from_slice(kind);
        b.resize(b.len().next_multiple_of(4), 0);
    }
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&ty.to_ne_bytes());
    b[6..8].copy_from_slice(&(flags as u16).to_ne_bytes());
    b[8..12].copy_from_slice(&1u32.to_ne_bytes());
    b
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
        let s = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        // A kernel that never answers must not hang the agent.
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: a valid socket and a properly sized timeval that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    /// Sends `req`; with `dump`, counts the messages of the answer up to
    /// NLMSG_DONE, else waits for the acknowledgement. A netlink error is
    /// returned as the OS error it carries.
    fn exchange(&self, req: &[u8], dump: bool) -> io::Result<usize> {
        let mut n = 0;
        let done = self.each(req, |_, _| n += 1)?;
        if !dump && !done {
            return Err(io::Error::other("rtnetlink: no acknowledgement"));
        }
        Ok(n)
    }

    /// Sends `req` and calls `f(type, body)` for every message of the
    /// answer that is neither an error nor its end; true once acknowledged
    /// or done.
    fn each(&self, req: &[u8], mut f: impl FnMut(u16, &[u8])) -> io::Result<bool> {
        // SAFETY: req is a valid buffer for its length; the fd is open.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 * 1024];
        let hdr = size_of::<libc::nlmsghdr>();
        loop {
            // SAFETY: buf is writable for its length; the fd is open.
            let got = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..got as usize];
            while rest.len() >= hdr {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap_or_default());
                if len < hdr || len > rest.len() {
                    return Err(io::Error::other("rtnetlink: truncated message"));
                }
                let body = &rest[hdr..len];
                match ty as libc::c_int {
                    libc::NLMSG_DONE => return Ok(true),
                    libc::NLMSG_ERROR => {
                        let code = body
                            .get(0..4)
                            .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap_or_default()));
                        return match code {
                            0 => Ok(true),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    _ => f(ty, body),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }
}
