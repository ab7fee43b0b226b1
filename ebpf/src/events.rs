//! The eBPF ring buffer, turned into `tracing` events (Ferry's replacement for
//! aya-log, whose record format needs Rust eBPF).

use std::net::Ipv4Addr;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::maps::{Event, EV_ERROR, EV_INBOUND, EV_REDIRECT};

/// Decodes one ring-buffer record; None for a short or unknown record.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is repr(C) with only integer fields, the slice holds at
    // least size_of::<Event>() bytes, and read_unaligned has no alignment need.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

pub fn log(ev: &Event, node: &str) {
    let ip = Ipv4Addr::from(u32::from_be(ev.ip4));
    match ev.kind {
        EV_REDIRECT => {
            tracing::debug!(target: "ferry::ebpf", node, pod_id = ev.pod_id, orig_dst = %format!("{ip}:{}", ev.port), "connect redirected to agent")
        }
        EV_INBOUND => {
            tracing::debug!(target: "ferry::ebpf", node, client = %format!("{ip}:{}", ev.port), "inbound connection handed to agent")
        }
        EV_ERROR => {
            tracing::warn!(target: "ferry::ebpf", node, pod_id = ev.pod_id, addr = %format!("{ip}:{}", ev.port), err = ev.err, "eBPF error")
        }
        k => tracing::warn!(target: "ferry::ebpf", node, kind = k, "unknown eBPF event"),
    }
}

/// Drains the ring buffer for as long as the agent runs.
pub async fn run(ring: RingBuf<MapData>, node: String) {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the
    // RingBuf, and as_raw_fd always returns that same fd.
    let registered = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e.into_parts().1, "eBPF events unavailable");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "eBPF event ring failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item) {
                log(&ev, &node);
            }
        }
        guard.clear_ready();
    }
}
