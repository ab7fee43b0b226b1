//! Where an outbound connection was going before eBPF steered it to the
//! agent, behind one seam: the eBPF map (`ferry_orig_dst`, written by
//! connect4/sockops) is one source; an in-memory map is the other, for
//! in-process tests (as linkerd's `MockOrigDst`).

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use ferry_ebpf::{maps::SockKey, OrigDstTable};

/// An accepted outbound connection as both of its ends name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The netns of the pod the connection comes from.
    pub netns_cookie: u64,
    /// The app's end (the peer of the accepted socket).
    pub app: SocketAddrV4,
    /// The agent's end (the outbound listener's address).
    pub proxy: SocketAddrV4,
}

/// Source of original destinations.
pub trait OrigDstSource: Send + Sync + 'static {
    /// Takes (reads and forgets) the original destination of `key`.
    fn take(&self, key: &ConnKey) -> Option<SocketAddrV4>;
}

/// The eBPF map. The app's socket recorded the key from its side: its own
/// address local, the agent's remote.
pub struct Ebpf(pub Arc<OrigDstTable>);

impl OrigDstSource for Ebpf {
    fn take(&self, key: &ConnKey) -> Option<SocketAddrV4> {
        self.0
            .take(&SockKey::new(key.netns_cookie, key.app, key.proxy))
            .map(|o| o.addr())
    }
}

/// An in-memory table: what a test's "connect4" records.
#[derive(Default)]
pub struct Table(Mutex<HashMap<ConnKey, SocketAddrV4>>);

impl Table {
    pub fn insert(&self, key: ConnKey, orig: SocketAddrV4) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key, orig);
    }
}

impl OrigDstSource for Table {
    fn take(&self, key: &ConnKey) -> Option<SocketAddrV4> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key)
    }
}
