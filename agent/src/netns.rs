//! Network namespaces: entering a pod's netns on the current thread to create
//! a socket there (as ztunnel's in-pod mode does), then returning home. A
//! socket keeps the namespace it was created in, so only socket() (and netlink
//! set-up) needs to run inside; connect/accept/read/write happen anywhere.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The agent's own network namespace, captured once at start-up.
static HOME: OnceLock<OwnedFd> = OnceLock::new();

fn home() -> io::Result<&'static OwnedFd> {
    if let Some(fd) = HOME.get() {
        return Ok(fd);
    }
    let fd: OwnedFd = File::open("/proc/self/ns/net")?.into();
    Ok(HOME.get_or_init(|| fd))
}

#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Self> {
        home()?;
        let fd = File::open(path)?.into();
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// The netns of a process (e.g. a pod's sandbox process).
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        Self::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this netns, then switches back
    /// (also when `f` panics: a guard switches back while unwinding).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home()?;
        setns(self.fd.as_fd())?;
        let _back = GoHome(home);
        Ok(f())
    }

    /// The kernel's cookie for this netns (what bpf_get_netns_cookie returns).
    pub fn cookie(&self) -> io::Result<u64> {
        let sock = self.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))??;
        netns_cookie_of(&sock)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Returns the thread to the agent's netns when dropped.
struct GoHome(&'static OwnedFd);

impl Drop for GoHome {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd()) {
            // A worker thread stuck in a pod's netns would create later
            // sockets in the wrong place: that is not recoverable.
            tracing::error!(error = %e, "cannot return to the agent's network namespace");
            std::process::abort();
        }
    }
}

fn setns(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns(2) with a valid, open netns fd only changes the calling
    // thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// SO_NETNS_COOKIE of the netns a socket lives in.
pub fn netns_cookie_of(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is a
    // live u64 of that size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
