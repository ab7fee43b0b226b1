//! Per-pod network set-up done once at enrollment, inside the pod's netns,
//! so the agent can deliver to the app from the client's own address and get
//! the replies back (no iptables):
//! - `tcp_fwmark_accept=1`: the app's accepted socket takes the mark of the SYN;
//!   `fwmark_reflect=1`: so do the kernel's RSTs and ICMP replies to it;
//! - `ip rule fwmark DELIVER_MARK lookup DELIVER_TABLE` and
//!   `ip route add local 0.0.0.0/0 dev lo table DELIVER_TABLE`: replies to a
//!   delivery connection route back to the agent's transparent socket;
//! - the delivery SYNs get their mark from `ferry_mark_delivery` (cgroup_skb).
//!
//! The sysctls are written through a procfs given by the agent's
//! `--proc-root` (`/proc` by default): `/proc/sys/net` shows the netns of
//! the thread that opens a file, whichever procfs mount it is opened
//! through. Container runtimes mount the container's own `/proc/sys`
//! read-only unless it is privileged, so the chart mounts the node's
//! `/proc/sys/net` at `/host/proc/sys/net` and passes `/host/proc`
//! (`agent/tests/podnet.rs` tests both ways).

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use netlink_packet_route::{
    route::{RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute},
};
use rtnetlink::RouteMessageBuilder;

use crate::{
    netns::Netns,
    sockets::{DELIVER_MARK, DELIVER_TABLE},
};

const RULE_PRIORITY: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("sysctl {name} in the pod, through {}: {source}{}", path.display(), read_only_hint(source))]
    Sysctl {
        name: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("netlink in the pod: {0}")]
    Netlink(String),
}

fn read_only_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EROFS) {
        " (a read-only /proc/sys, as in an unprivileged container: give the agent the node's /proc, --proc-root)"
    } else {
        ""
    }
}

/// The pod's sysctls, written in netns `ns` through the procfs at `proc_root`.
pub fn set_sysctls(ns: &Netns, proc_root: &Path) -> Result<(), PodNetError> {
    // /proc/sys/net follows the netns of the thread that opens it.
    // tcp_fwmark_accept: the app's accepted socket takes the SYN's mark.
    // fwmark_reflect: so do the kernel's own replies (the RST to a delivery
    // SYN when nothing listens): without it that RST routes out of the pod
    // instead of back to the agent, whose connect then hangs for minutes.
    for name in ["net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"] {
        let path = proc_root.join("sys").join(name);
        ns.run(|| std::fs::write(&path, "1"))
            .and_then(|r| r)
            .map_err(|source| PodNetError::Sysctl { name, path, source })?;
    }
    Ok(())
}

pub async fn setup(ns: &Netns, proc_root: &Path) -> Result<(), PodNetError> {
    set_sysctls(ns, proc_root)?;

    let nl = |e: rtnetlink::Error| PodNetError::Netlink(e.to_string());
    let (conn, handle, _) = ns
        .run(rtnetlink::new_connection)
        .and_then(|r| r)
        .map_err(|e| PodNetError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);

    let have_rule = handle
        .rule()
        .get(rtnetlink::IpVersion::V4)
        .execute()
        .try_filter(|r| {
            futures::future::ready(
                r.attributes
                    .iter()
                    .any(|a| matches!(a, RuleAttribute::FwMark(m) if *m == DELIVER_MARK)),
            )
        })
        .try_next()
        .await
        .map_err(nl)?
        .is_some();
    if !have_rule {
        let mut req = handle
            .rule()
            .add()
            .v4()
            .fw_mark(DELIVER_MARK)
            .table_id(DELIVER_TABLE)
            .action(RuleAction::ToTable)
            .priority(RULE_PRIORITY);
        req.message_mut().attributes.push(RuleAttribute::FwMask(DELIVER_MARK));
        req.execute().await.map_err(nl)?;
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .table_id(DELIVER_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(1) // lo is ifindex 1 in every netns
        .build();
    handle.route().add(route).replace().execute().await.map_err(nl)?;
    task.abort();
    Ok(())
}

/// The node-side name of the pod's veth (for per-pod tc counters), found
/// from the pod's end: an interface whose peer lives in another netns,
/// looked up by index in the agent's own netns (the node's).
pub async fn host_veth(ns: &Netns) -> Option<String> {
    use netlink_packet_route::link::LinkAttribute;
    let (conn, handle, _) = ns.run(rtnetlink::new_connection).ok()?.ok()?;
    let task = tokio::spawn(conn);
    let links: Vec<_> = handle.link().get().execute().try_collect().await.ok()?;
    task.abort();
    let peer = links.iter().find_map(|l| {
        let peer = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        })?;
        let other_ns = l.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        other_ns.then_some(peer)
    })?;
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    let task = tokio::spawn(conn);
    let link = handle
        .link()
        .get()
        .match_index(peer)
        .execute()
        .try_next()
        .await
        .ok()
        .flatten();
    task.abort();
    link?.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n),
        _ => None,
    })
}
