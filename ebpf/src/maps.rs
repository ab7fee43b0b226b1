//! Rust mirror of the layouts in `ebpf/include/ferry.h` (the one source of
//! truth). `tests::layouts_match_btf` checks size and field offsets of each
//! struct against the BTF of the compiled object, so the two cannot drift.
//! ferryctl reads pinned maps with these same types.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::Serialize;

pub const FLAG_SPLICE: u32 = 0x1;
pub const FLAG_EVENTS: u32 = 0x2;

pub const DST_SERVICE: u32 = 1;
pub const DST_POD: u32 = 2;

/// `ferry_inbound_policy` modes (FERRY_INBOUND_*): what `sk_lookup` does with
/// a connection to a pod whose inbound listener is missing (agent down).
pub const INBOUND_NONE: u32 = 0;
pub const INBOUND_PERMISSIVE: u32 = 1;
pub const INBOUND_STRICT: u32 = 2;

/// FERRY_PROBE_IP4: the kubelet probe source `sk_lookup` always passes to the
/// app (169.254.7.127, Istio ambient's).
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// FERRY_MAX_PODS: `max_entries` of every per-pod map (`ferry_pods`,
/// `ferry_inbound`, `ferry_inbound_policy`, `ferry_traffic`).
pub const MAX_PODS: u32 = 4096;
/// FERRY_MAX_MESH_DST: `max_entries` of `ferry_mesh_dst`.
pub const MAX_MESH_DST: u32 = 65536;

/// The maps the agent fills from desired state, with their `max_entries` as
/// declared in ferry.h (`capacity_tests` checks them against the object's BTF).
pub const MAP_CAPACITY: &[(&str, u32)] = &[
    ("ferry_pods", MAX_PODS),
    ("ferry_inbound", MAX_PODS),
    ("ferry_inbound_policy", MAX_PODS),
    ("ferry_traffic", MAX_PODS),
    ("ferry_mesh_dst", MAX_MESH_DST),
];

/// Names of the pinned maps, as declared in ferry.h.
pub const MAP_NAMES: &[&str] = &[
    "ferry_config",
    "ferry_pods",
    "ferry_mesh_dst",
    "ferry_orig_cookie",
    "ferry_orig_dst",
    "ferry_inbound",
    "ferry_inbound_policy",
    "ferry_delivery",
    "ferry_splice",
    "ferry_splice_off",
    "ferry_traffic",
    "ferry_stats",
    "ferry_events",
];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Config {
    pub flags: u32,
    pub agent_mark: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub admin_port: u16,
    /// Legacy (ferry.h): the delivery port range of agents before
    /// `ferry_delivery`, for their programs during an upgrade; ignored today.
    pub deliver_port_lo: u16,
    pub deliver_port_hi: u16,
    pub deliver_mark: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub pod_id: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DstKey {
    /// Network byte order.
    pub ip4: u32,
    /// Host byte order; 0 means any port.
    pub port: u16,
    pub pad: u16,
}

impl DstKey {
    pub fn new(ip: Ipv4Addr, port: u16) -> Self {
        Self {
            ip4: u32::from(ip).to_be(),
            port,
            pad: 0,
        }
    }
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.ip4))
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dst {
    pub kind: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    pub fn new(netns_cookie: u64, local: SocketAddrV4, remote: SocketAddrV4) -> Self {
        Self {
            netns_cookie,
            local_ip4: u32::from(*local.ip()).to_be(),
            remote_ip4: u32::from(*remote.ip()).to_be(),
            local_port: local.port().into(),
            remote_port: remote.port().into(),
        }
    }
    pub fn local(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(self.local_ip4)), self.local_port as u16)
    }
    pub fn remote(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(self.remote_ip4)), self.remote_port as u16)
    }
}

/// Key of `ferry_delivery`: an agent delivery as the app sees its SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// Network byte order.
    pub client_ip4: u32,
    /// Network byte order.
    pub pod_ip4: u32,
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub pod_port: u16,
}

impl DeliveryKey {
    pub fn new(client: SocketAddrV4, pod: SocketAddrV4) -> Self {
        Self {
            client_ip4: u32::from(*client.ip()).to_be(),
            pod_ip4: u32::from(*pod.ip()).to_be(),
            client_port: client.port(),
            pod_port: pod.port(),
        }
    }
    pub fn client(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(self.client_ip4)), self.client_port)
    }
    pub fn pod(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(self.pod_ip4)), self.pod_port)
    }
}

/// Value of `ferry_delivery`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Socket cookie of the agent's delivery socket.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` at connect().
    pub ts_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip4: u32,
    pub port: u16,
    pub pad: u16,
    pub pod_id: u32,
    pub pad2: u32,
    pub ts_ns: u64,
}

impl OrigDst {
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(self.ip4)), self.port)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundKey {
    pub ip4: u32,
}

impl InboundKey {
    pub fn new(ip: Ipv4Addr) -> Self {
        Self {
            ip4: u32::from(ip).to_be(),
        }
    }
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.ip4))
    }
}

/// Value of `ferry_inbound_policy` (key: [`InboundKey`], the pod IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InboundPolicy {
    /// One of `INBOUND_*`.
    pub mode: u32,
    /// Reserved, 0.
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Self) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
    }
}

/// Indexes of `ferry_stats` (enum ferry_stat).
pub const STAT_NAMES: &[(u32, &str)] = &[
    (0, "redirects"),
    (1, "orig_dst_saved"),
    (2, "orig_dst_lost"),
    (3, "inbound_assigned"),
    (4, "inbound_assign_errors"),
    (5, "splice_sockets"),
    (6, "splice_msgs"),
    (7, "splice_fallbacks"),
    (8, "events_dropped"),
    (9, "agent_skipped"),
    (10, "inbound_dropped"),
    (11, "probes_passed"),
    (12, "delivery_saved"),
    (13, "delivery_lost"),
    (14, "delivery_passed"),
];
pub const STAT_MAX: u32 = 16;

pub const EV_REDIRECT: u32 = 1;
pub const EV_INBOUND: u32 = 2;
pub const EV_ERROR: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub netns_cookie: u64,
    pub kind: u32,
    pub pod_id: u32,
    pub ip4: u32,
    pub port: u16,
    pub pad: u16,
    pub err: i32,
    pub pad2: u32,
}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: repr(C), only integer fields, explicit padding: every bit
        // pattern is valid and there are no implicit padding bytes.
        unsafe impl aya::Pod for $t {}
    )*};
}
pod!(
    Config,
    Pod,
    DstKey,
    Dst,
    SockKey,
    DeliveryKey,
    Delivery,
    OrigDst,
    InboundKey,
    InboundPolicy,
    Traffic
);

/// ferry.h spells the probe source in host byte order.
const _: () = assert!(PROBE_SOURCE.to_bits() == 0xa9fe_077f);

/// ferry_event only travels through the ring buffer, so it has no BTF in the
/// object; ferry.h asserts its size, and so does this.
const _: () = assert!(std::mem::size_of::<Event>() == 40);

/// A struct's name in ferry.h, its Rust size and (field, offset) pairs.
pub type Layout = (&'static str, usize, Vec<(&'static str, usize)>);

/// The struct name in ferry.h, its Rust size and field offsets, for the BTF check.
pub fn layouts() -> Vec<Layout> {
    use std::mem::{offset_of, size_of};
    macro_rules! layout {
        ($c:literal, $t:ty, [$($f:ident),*]) => {
            ($c, size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f))),*])
        };
    }
    vec![
        layout!(
            "ferry_config",
            Config,
            [
                flags,
                agent_mark,
                outbound_port,
                inbound_port,
                tunnel_port,
                admin_port,
                deliver_port_lo,
                deliver_port_hi,
                deliver_mark
            ]
        ),
        layout!("ferry_pod", Pod, [pod_id, flags]),
        layout!("ferry_dst_key", DstKey, [ip4, port, pad]),
        layout!("ferry_dst", Dst, [kind, pad]),
        layout!(
            "ferry_sock_key",
            SockKey,
            [netns_cookie, local_ip4, remote_ip4, local_port, remote_port]
        ),
        layout!(
            "ferry_delivery_key",
            DeliveryKey,
            [client_ip4, pod_ip4, client_port, pod_port]
        ),
        layout!("ferry_delivery", Delivery, [cookie, ts_ns]),
        layout!("ferry_orig_dst", OrigDst, [ip4, port, pad, pod_id, pad2, ts_ns]),
        layout!("ferry_inbound_key", InboundKey, [ip4]),
        layout!("ferry_inbound_policy", InboundPolicy, [mode, flags]),
        layout!("ferry_traffic", Traffic, [rx_packets, rx_bytes, tx_packets, tx_bytes]),
    ]
}

#[cfg(test)]
mod capacity_tests {
    //! `max_entries` of each map in the object's BTF: a map definition is a
    //! VAR whose struct has a member `max_entries` of type `int (*)[N]`.

    use std::collections::HashMap;

    use object::{Object, ObjectSection};

    fn max_entries(obj: &[u8]) -> HashMap<String, u32> {
        let file = object::File::parse(obj).expect("ELF");
        let btf = file.section_by_name(".BTF").expect(".BTF").data().expect("BTF data");
        let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
        let hdr = u32_at(4) as usize;
        let (types, len, strs) = (hdr + u32_at(8) as usize, u32_at(12) as usize, hdr + u32_at(16) as usize);
        let name = |off: u32| {
            let s = &btf[strs + off as usize..];
            String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap()]).into_owned()
        };
        // By type id (from 1): kind, name, size-or-type, members' offset, member count.
        let mut all = vec![(0u32, String::new(), 0u32, 0usize, 0usize)];
        let mut p = types;
        while p < types + len {
            let (name_off, info, size) = (u32_at(p), u32_at(p + 4), u32_at(p + 8));
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            all.push((kind, name(name_off), size, p + 12, vlen));
            p += 12
                + match kind {
                    1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
                    3 => 12,              // ARRAY
                    4 | 5 => 12 * vlen,   // STRUCT, UNION
                    6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
                    15 | 19 => 12 * vlen, // DATASEC, ENUM64
                    _ => 0,
                };
        }
        let mut out = HashMap::new();
        for (_, var, ty, _, _) in all.iter().filter(|t| t.0 == 14) {
            let &(kind, _, _, members, vlen) = &all[*ty as usize];
            if kind != 4 {
                continue; // not a map definition
            }
            for m in (0..vlen).map(|i| members + 12 * i) {
                if name(u32_at(m)) != "max_entries" {
                    continue;
                }
                let (ptr, _, arr, _, _) = &all[u32_at(m + 4) as usize];
                assert_eq!(*ptr, 2, "max_entries of {var} is a pointer");
                let (array, _, _, data, _) = &all[*arr as usize];
                assert_eq!(*array, 3, "max_entries of {var} points to an array");
                out.insert(var.clone(), u32_at(data + 8)); // btf_array.nelems
            }
        }
        out
    }

    #[test]
    fn capacities_match_btf() {
        let got = max_entries(crate::loader::object());
        assert!(
            got.len() >= super::MAP_NAMES.len() - 1,
            "map definitions found: {got:?}"
        );
        for (map, want) in super::MAP_CAPACITY {
            assert_eq!(got.get(*map), Some(want), "max_entries of {map} in ferry.h vs maps.rs");
        }
    }
}
