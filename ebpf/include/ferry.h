/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * ferry.h: every map Ferry's eBPF programs use, and the layout of every key
 * and value. This header is the single source of truth: agent/src/redirect/maps.rs
 * mirrors these structs once, and a test checks sizes and field offsets against
 * the BTF of the compiled object.
 *
 * Rules for layouts: fixed-width fields, explicit padding, no bool or bitfields.
 * Ports are in host byte order, IPv4 addresses in network byte order (as the
 * kernel hands them to us). Bump FERRY_ABI when a layout changes: pinned maps of
 * an older layout are then replaced rather than reused.
 */
#ifndef FERRY_H
#define FERRY_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#define FERRY_ABI 1

#define FERRY_MAX_PODS 4096
#define FERRY_MAX_MESH_DST 65536
#define FERRY_MAX_CONNS 65536
#define FERRY_RINGBUF_BYTES (256 * 1024)

/* ferry_config.flags */
#define FERRY_F_SPLICE 0x1 /* sk_msg splicing of app <-> agent loopback pairs */
#define FERRY_F_EVENTS 0x2 /* per-connection events on the ring buffer */

/* Singleton runtime settings, written by the agent (array map, key 0). */
struct ferry_config {
	__u32 flags;
	__u32 agent_mark;   /* SO_MARK bits the agent puts on its own sockets */
	__u16 outbound_port; /* agent's in-pod outbound listener (127.0.0.1) */
	__u16 inbound_port;  /* agent's in-pod plaintext inbound listener */
	__u16 tunnel_port;   /* agent's in-pod tunnel listener (pod IP) */
	__u16 admin_port;    /* never captured inbound */
	/* Legacy: the delivery source-port range of agents before ferry_delivery.
	 * Today's programs ignore it; the agent still writes 15100-15999 so an
	 * older agent's programs, attached until the new agent swaps them during
	 * an upgrade, keep recognising the older agent's deliveries. */
	__u16 deliver_port_lo;
	__u16 deliver_port_hi;
	__u32 deliver_mark; /* SO_MARK of the agent's delivery sockets; put on their SYNs */
};
_Static_assert(sizeof(struct ferry_config) == 24, "ferry_config layout");

/* ferry_pods: key = netns cookie (__u64) of an enrolled pod. */
struct ferry_pod {
	__u32 pod_id; /* agent-assigned, stable while enrolled */
	__u32 flags;  /* reserved, 0 */
};
_Static_assert(sizeof(struct ferry_pod) == 8, "ferry_pod layout");

/* ferry_mesh_dst: destinations whose connections are steered. port 0 = any port. */
struct ferry_dst_key {
	__u32 ip4;
	__u16 port;
	__u16 pad;
};
_Static_assert(sizeof(struct ferry_dst_key) == 8, "ferry_dst_key layout");

#define FERRY_DST_SERVICE 1
#define FERRY_DST_POD 2
struct ferry_dst {
	__u32 kind;
	__u32 pad;
};
_Static_assert(sizeof(struct ferry_dst) == 8, "ferry_dst layout");

/* A TCP connection as seen from one of its sockets, within one netns. */
struct ferry_sock_key {
	__u64 netns_cookie;
	__u32 local_ip4;
	__u32 remote_ip4;
	__u32 local_port;
	__u32 remote_port;
};
_Static_assert(sizeof(struct ferry_sock_key) == 24, "ferry_sock_key layout");

/*
 * ferry_delivery: the handshakes of the agent's delivery connections (agent ->
 * app, from the client's own address) in progress. Key: the connection as the
 * app sees its SYN (client = remote, pod = local); no netns cookie, because
 * sk_lookup cannot read one, and the pod IP makes the key node-unique.
 * Written only by ferry_agent_ops (attached to the agent's own cgroup) at
 * TCP_CONNECT_CB, for a socket whose SO_MARK is exactly deliver_mark, which
 * only a CAP_NET_ADMIN process can set; deleted by it when the handshake
 * ends (established or closed). Read by sk_lookup (a delivery is passed to
 * the app, never captured) and ferry_mark_delivery (its SYN gets the mark).
 */
struct ferry_delivery_key {
	__u32 client_ip4;
	__u32 pod_ip4;
	__u16 client_port;
	__u16 pod_port;
};
_Static_assert(sizeof(struct ferry_delivery_key) == 12, "ferry_delivery_key layout");

struct ferry_delivery {
	__u64 cookie; /* socket cookie of the agent's delivery socket (only it removes the entry) */
	__u64 ts_ns;  /* bpf_ktime_get_ns() at connect() */
};
_Static_assert(sizeof(struct ferry_delivery) == 16, "ferry_delivery layout");

/* Original destination of a steered connection. */
struct ferry_orig_dst {
	__u32 ip4;
	__u16 port;
	__u16 pad;
	__u32 pod_id;
	__u32 pad2;
	__u64 ts_ns; /* bpf_ktime_get_ns() at connect() */
};
_Static_assert(sizeof(struct ferry_orig_dst) == 24, "ferry_orig_dst layout");

/* ferry_inbound: key = pod IPv4 (network order), value = agent's inbound listener. */
struct ferry_inbound_key {
	__u32 ip4;
};
_Static_assert(sizeof(struct ferry_inbound_key) == 4, "ferry_inbound_key layout");

/*
 * ferry_inbound_policy: key = pod IPv4 (struct ferry_inbound_key, as
 * ferry_inbound), value = the pod's inbound mode, which sk_lookup applies when
 * the pod has no working inbound listener (agent down, restarting, not yet
 * enrolled). Keyed by the pod IP rather than the netns cookie: sk_lookup runs
 * in softirq for every lookup in the netns, loopback included, and only
 * connections to the pod's own IP are the mesh's business.
 * Written by the agent before it turns a pod's steering on and whenever its
 * PeerAuthentication changes; removed when the pod is unenrolled. Pinned, so
 * it outlives the agent: that is the point. Absent = not captured.
 */
#define FERRY_INBOUND_NONE 0       /* not captured: pass, as if absent */
#define FERRY_INBOUND_PERMISSIVE 1 /* no listener: pass to the app */
#define FERRY_INBOUND_STRICT 2     /* no listener: drop (RST), probes excepted */
struct ferry_inbound_policy {
	__u32 mode;
	__u32 flags; /* reserved, 0 */
};
_Static_assert(sizeof(struct ferry_inbound_policy) == 8, "ferry_inbound_policy layout");

/*
 * Kubelet probes: connections from this link-local source (169.254.7.127,
 * Istio ambient's probe address; host byte order here) go straight to the
 * app, whatever the mode and whatever the agent is doing. Only the node's own
 * stack can complete a handshake from it (the pod's reply is routed to the
 * node, which owns the address). docs/identity.md, "Fail closed".
 */
#define FERRY_PROBE_IP4 0xa9fe077f

/* ferry_traffic: per-CPU counters, key = ifindex of a pod's host-side veth.
 * "rx" and "tx" are from the pod's point of view. */
struct ferry_traffic {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
};
_Static_assert(sizeof(struct ferry_traffic) == 32, "ferry_traffic layout");

/* ferry_stats: per-CPU array of counters, indexed by these. */
enum ferry_stat {
	FERRY_STAT_REDIRECTS = 0,      /* connect() rewritten to the agent */
	FERRY_STAT_ORIG_DST_SAVED = 1, /* original destination keyed by 4-tuple */
	FERRY_STAT_ORIG_DST_LOST = 2,  /* connect rewritten but no cookie entry at sockops */
	FERRY_STAT_INBOUND_ASSIGNED = 3,
	FERRY_STAT_INBOUND_ASSIGN_ERR = 4,
	FERRY_STAT_SPLICE_SOCKS = 5,   /* sockets added to the splice sockhash */
	FERRY_STAT_SPLICE_MSGS = 6,    /* sk_msg redirects done */
	FERRY_STAT_SPLICE_MISS = 7,    /* no peer yet: this connection falls back to the normal path */
	FERRY_STAT_EVENTS_DROPPED = 8, /* ring buffer full */
	FERRY_STAT_AGENT_SKIPPED = 9,  /* connect() by a socket carrying the agent mark */
	FERRY_STAT_INBOUND_DROPPED = 10, /* STRICT pod, no working listener: refused (fail closed) */
	FERRY_STAT_PROBES = 11,          /* probe-source connections passed to the app */
	FERRY_STAT_DELIVERY_SAVED = 12,  /* agent delivery recorded at connect (ferry_delivery) */
	FERRY_STAT_DELIVERY_LOST = 13,   /* agent delivery that could not be recorded */
	FERRY_STAT_DELIVERY_PASSED = 14, /* delivery SYN passed to the app by sk_lookup */
	FERRY_STAT_MAX = 16,
};

/* Events on the ring buffer. */
#define FERRY_EV_REDIRECT 1
#define FERRY_EV_INBOUND 2
#define FERRY_EV_ERROR 3
struct ferry_event {
	__u64 ts_ns;
	__u64 netns_cookie;
	__u32 kind;
	__u32 pod_id;
	__u32 ip4;   /* original destination (redirect) or client (inbound) */
	__u16 port;
	__u16 pad;
	__s32 err;
	__u32 pad2;
};
_Static_assert(sizeof(struct ferry_event) == 40, "ferry_event layout");

/* ---- Maps (names are what gets pinned under /sys/fs/bpf/ferry/<node>/) ---- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ferry_config);
} ferry_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_PODS);
	__type(key, __u64);
	__type(value, struct ferry_pod);
} ferry_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_MESH_DST);
	__type(key, struct ferry_dst_key);
	__type(value, struct ferry_dst);
} ferry_mesh_dst SEC(".maps");

/* connect() -> sockops handoff, keyed by socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_CONNS);
	__type(key, __u64);
	__type(value, struct ferry_orig_dst);
} ferry_orig_cookie SEC(".maps");

/* Read (and deleted) by the agent for each connection it accepts. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_CONNS);
	__type(key, struct ferry_sock_key);
	__type(value, struct ferry_orig_dst);
} ferry_orig_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_PODS);
	__type(key, struct ferry_inbound_key);
	__type(value, __u32);
} ferry_inbound SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_PODS);
	__type(key, struct ferry_inbound_key);
	__type(value, struct ferry_inbound_policy);
} ferry_inbound_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_CONNS);
	__type(key, struct ferry_sock_key);
	__type(value, __u32);
} ferry_splice SEC(".maps");

/* Agent deliveries whose handshake is in progress (see struct ferry_delivery_key).
 * LRU: an entry outliving its socket (a missed close) is evicted in time. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_CONNS);
	__type(key, struct ferry_delivery_key);
	__type(value, struct ferry_delivery);
} ferry_delivery SEC(".maps");

/* Sockets of ferry_splice whose first message found no peer: they stay on the
 * normal path for good (see ferry_sk_msg). Value unused. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_CONNS);
	__type(key, struct ferry_sock_key);
	__type(value, __u32);
} ferry_splice_off SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_MAX_PODS);
	__type(key, __u32);
	__type(value, struct ferry_traffic);
} ferry_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ferry_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__uint(max_entries, FERRY_RINGBUF_BYTES);
} ferry_events SEC(".maps");

#endif /* FERRY_H */
