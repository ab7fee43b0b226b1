// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Ferry's data-path programs. One object, so every program shares the maps
 * declared in include/ferry.h. See ebpf/README.md for where each one attaches.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#define SOCK_STREAM 1
#define SOL_SOCKET 1
#define SO_MARK 36
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ferry.h"

#define LOOPBACK_IP4 0x7f000001

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ferry_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline struct ferry_config *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ferry_config, &zero);
}

static __always_inline void emit(__u32 kind, __u64 netns, __u32 pod_id, __u32 ip4,
				 __u16 port, __s32 err)
{
	struct ferry_event *ev = bpf_ringbuf_reserve(&ferry_events, sizeof(*ev), 0);
	if (!ev) {
		stat_inc(FERRY_STAT_EVENTS_DROPPED);
		return;
	}
	ev->ts_ns = bpf_ktime_get_ns();
	ev->netns_cookie = netns;
	ev->kind = kind;
	ev->pod_id = pod_id;
	ev->ip4 = ip4;
	ev->port = port;
	ev->pad = 0;
	ev->err = err;
	ev->pad2 = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* Is (ip4, port) a mesh destination? An exact port entry wins over "any port". */
static __always_inline int is_mesh_dst(__u32 ip4, __u16 port)
{
	struct ferry_dst_key k = { .ip4 = ip4, .port = port, .pad = 0 };
	if (bpf_map_lookup_elem(&ferry_mesh_dst, &k))
		return 1;
	k.port = 0;
	return bpf_map_lookup_elem(&ferry_mesh_dst, &k) != NULL;
}

/*
 * Shared by connect4 and connect6: decide whether this connect() is steered,
 * and if so record the original destination under the socket cookie.
 * Returns the agent's outbound port, or 0 to leave the connect() alone.
 */
static __always_inline __u16 steer(struct bpf_sock_addr *ctx, __u32 ip4, __u16 port)
{
	if (ctx->type != SOCK_STREAM)
		return 0;
	struct ferry_config *cfg = config();
	if (!cfg || !cfg->outbound_port)
		return 0;
	/* The agent's sockets live in the agent's cgroup, so this program does
	 * not run for them; the mark is a second guard. */
	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->agent_mark && (sk->mark & cfg->agent_mark) == cfg->agent_mark) {
		stat_inc(FERRY_STAT_AGENT_SKIPPED);
		return 0;
	}
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct ferry_pod *pod = bpf_map_lookup_elem(&ferry_pods, &netns);
	if (!pod)
		return 0; /* not (or no longer) enrolled */
	if (!is_mesh_dst(ip4, port))
		return 0;

	struct ferry_orig_dst od = {
		.ip4 = ip4,
		.port = port,
		.pod_id = pod->pod_id,
		.ts_ns = bpf_ktime_get_ns(),
	};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&ferry_orig_cookie, &cookie, &od, BPF_ANY)) {
		/* Without a record the agent could not route it: fail open. */
		emit(FERRY_EV_ERROR, netns, pod->pod_id, ip4, port, -1);
		return 0;
	}
	stat_inc(FERRY_STAT_REDIRECTS);
	if (cfg->flags & FERRY_F_EVENTS)
		emit(FERRY_EV_REDIRECT, netns, pod->pod_id, ip4, port, 0);
	return cfg->outbound_port;
}

SEC("cgroup/connect4")
int ferry_connect4(struct bpf_sock_addr *ctx)
{
	__u16 to = steer(ctx, ctx->user_ip4, bpf_ntohs(ctx->user_port));
	if (to) {
		ctx->user_ip4 = bpf_htonl(LOOPBACK_IP4);
		ctx->user_port = bpf_htons(to);
	}
	return 1;
}

/* IPv6 sockets connecting to IPv4-mapped addresses (::ffff:a.b.c.d) are
 * normalised to their IPv4 form; native IPv6 is not meshed yet. */
SEC("cgroup/connect6")
int ferry_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
	    ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
		return 1;
	__u16 to = steer(ctx, ctx->user_ip6[3], bpf_ntohs(ctx->user_port));
	if (to) {
		ctx->user_ip6[3] = bpf_htonl(LOOPBACK_IP4);
		ctx->user_port = bpf_htons(to);
	}
	return 1;
}

/* IPv4 address of a sockops socket, also for IPv4-mapped IPv6 sockets. */
static __always_inline int sockops_v4(struct bpf_sock_ops *s, __u32 *local, __u32 *remote)
{
	/* The barriers stop clang from merging the two branches' loads into one
	 * load through a computed ctx pointer, which the verifier rejects. */
	if (s->family == 2 /* AF_INET */) {
		*local = s->local_ip4;
		asm volatile("" ::: "memory");
		*remote = s->remote_ip4;
		asm volatile("" ::: "memory");
		return 1;
	}
	if (s->family == 10 /* AF_INET6 */ && s->local_ip6[0] == 0 && s->local_ip6[1] == 0 &&
	    s->local_ip6[2] == bpf_htonl(0x0000ffff) && s->remote_ip6[2] == bpf_htonl(0x0000ffff)) {
		*local = s->local_ip6[3];
		asm volatile("" ::: "memory");
		*remote = s->remote_ip6[3];
		asm volatile("" ::: "memory");
		return 1;
	}
	return 0;
}

/* With splicing on, put both ends of an app <-> agent loopback pair into
 * ferry_splice as each is established. The agent's end goes in here (not from
 * user space after accept) so no byte can take the normal path first and be
 * overtaken by spliced ones. */
static __always_inline void splice_established(struct bpf_sock_ops *skops, struct ferry_sock_key *key,
					       __u32 local, __u32 remote)
{
	struct ferry_config *cfg = config();
	if (!cfg || !(cfg->flags & FERRY_F_SPLICE))
		return;
	if (local != bpf_htonl(LOOPBACK_IP4) || remote != bpf_htonl(LOOPBACK_IP4))
		return;
	if (key->local_port != cfg->outbound_port && key->remote_port != cfg->outbound_port)
		return;
	bpf_map_delete_elem(&ferry_splice_off, key); /* a stale entry of a reused 4-tuple */
	if (bpf_sock_hash_update(skops, &ferry_splice, key, BPF_NOEXIST) == 0)
		stat_inc(FERRY_STAT_SPLICE_SOCKS);
}

static __always_inline int sock_key(struct bpf_sock_ops *skops, struct ferry_sock_key *key,
				    __u32 *local, __u32 *remote)
{
	if (!sockops_v4(skops, local, remote))
		return 0;
	key->netns_cookie = bpf_get_netns_cookie(skops);
	key->local_ip4 = *local;
	key->remote_ip4 = *remote;
	key->local_port = skops->local_port;
	key->remote_port = bpf_ntohl(skops->remote_port);
	return 1;
}

/*
 * Attached to enrolled pods' cgroups.
 * - TCP_CONNECT_CB: the source port is now known, so move the original
 *   destination from the cookie key to the 4-tuple key the agent can rebuild
 *   from its accepted socket.
 * - *_ESTABLISHED_CB: splicing (splice_established).
 */
SEC("sockops")
int ferry_sockops(struct bpf_sock_ops *skops)
{
	__u32 local, remote;
	struct ferry_sock_key key = {};
	if (!sock_key(skops, &key, &local, &remote))
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct ferry_orig_dst *od = bpf_map_lookup_elem(&ferry_orig_cookie, &cookie);
		if (!od)
			break;
		if (bpf_map_update_elem(&ferry_orig_dst, &key, od, BPF_ANY) == 0)
			stat_inc(FERRY_STAT_ORIG_DST_SAVED);
		else
			stat_inc(FERRY_STAT_ORIG_DST_LOST);
		bpf_map_delete_elem(&ferry_orig_cookie, &cookie);
		break;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		splice_established(skops, &key, local, remote);
		break;
	default:
		break;
	}
	return 1;
}

/* The delivery key of a socket the agent connects from the client's address:
 * local = client, remote = pod (the reverse of what the app's SYN shows). */
static __always_inline struct ferry_delivery_key delivery_key(struct ferry_sock_key *k)
{
	struct ferry_delivery_key d = {
		.client_ip4 = k->local_ip4,
		.pod_ip4 = k->remote_ip4,
		.client_port = (__u16)k->local_port,
		.pod_port = (__u16)k->remote_port,
	};
	return d;
}

/* Removes this socket's delivery entry (only its own: a later socket may
 * already hold the same 4-tuple). */
static __always_inline void delivery_done(struct bpf_sock_ops *skops, struct ferry_sock_key *key)
{
	struct ferry_delivery_key dk = delivery_key(key);
	struct ferry_delivery *d = bpf_map_lookup_elem(&ferry_delivery, &dk);
	if (d && d->cookie == bpf_get_socket_cookie(skops))
		bpf_map_delete_elem(&ferry_delivery, &dk);
}

/*
 * Attached to the agent's own cgroup only (its sockets belong to it even when
 * created in a pod's netns), so no pod's socket ever runs it.
 * - TCP_CONNECT_CB of a socket whose SO_MARK is exactly the delivery mark (an
 *   agent delivery: setting a mark needs CAP_NET_ADMIN): its 4-tuple, chosen
 *   by the kernel and unique, goes into ferry_delivery before its SYN is
 *   sent, so sk_lookup and ferry_mark_delivery recognise the SYN. The state
 *   callback is turned on for it, to remove the entry if the handshake fails.
 * - ACTIVE_ESTABLISHED_CB: the handshake is over (no SYN of this connection
 *   will be looked up again): the entry goes.
 * - STATE_CB to CLOSE (refused, timed out, aborted): the entry goes.
 * - *_ESTABLISHED_CB: splicing (splice_established), the agent's end.
 */
SEC("sockops")
int ferry_agent_ops(struct bpf_sock_ops *skops)
{
	__u32 local, remote;
	struct ferry_sock_key key = {};
	if (!sock_key(skops, &key, &local, &remote))
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		struct ferry_config *cfg = config();
		if (!cfg || !cfg->deliver_mark)
			break;
		int mark = 0;
		if (bpf_getsockopt(skops, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) ||
		    (__u32)mark != cfg->deliver_mark)
			break;
		struct ferry_delivery_key dk = delivery_key(&key);
		struct ferry_delivery d = {
			.cookie = bpf_get_socket_cookie(skops),
			.ts_ns = bpf_ktime_get_ns(),
		};
		if (bpf_map_update_elem(&ferry_delivery, &dk, &d, BPF_ANY) == 0) {
			stat_inc(FERRY_STAT_DELIVERY_SAVED);
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
		} else {
			stat_inc(FERRY_STAT_DELIVERY_LOST);
			emit(FERRY_EV_ERROR, key.netns_cookie, 0, remote, (__u16)key.remote_port, -12);
		}
		break;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG) {
			delivery_done(skops, &key);
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
							 ~BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		splice_established(skops, &key, local, remote);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		splice_established(skops, &key, local, remote);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			delivery_done(skops, &key);
		break;
	default:
		break;
	}
	return 1;
}

/*
 * Attached to ferry_splice: hand each message straight to the peer socket's
 * receive queue. A connection splices from its first byte or not at all: if
 * the peer is not in the map yet (the app wrote before the agent's end was
 * established), this socket leaves the map, so every later byte also takes
 * the normal path and nothing can overtake bytes already queued there.
 * (Programs cannot delete from a sockhash here, so a side map says so.)
 */
SEC("sk_msg")
int ferry_sk_msg(struct sk_msg_md *msg)
{
	if (msg->family != 2 /* AF_INET */)
		return SK_PASS;
	__u64 netns = bpf_get_netns_cookie(msg);
	struct ferry_sock_key self = {
		.netns_cookie = netns,
		.local_ip4 = msg->local_ip4,
		.remote_ip4 = msg->remote_ip4,
		.local_port = msg->local_port,
		.remote_port = bpf_ntohl(msg->remote_port),
	};
	if (bpf_map_lookup_elem(&ferry_splice_off, &self))
		return SK_PASS;
	struct ferry_sock_key peer = {
		.netns_cookie = netns,
		.local_ip4 = msg->remote_ip4,
		.remote_ip4 = msg->local_ip4,
		.local_port = bpf_ntohl(msg->remote_port),
		.remote_port = msg->local_port,
	};
	if (bpf_msg_redirect_hash(msg, &ferry_splice, &peer, BPF_F_INGRESS) == SK_PASS) {
		stat_inc(FERRY_STAT_SPLICE_MSGS);
		return SK_PASS;
	}
	__u32 one = 1;
	bpf_map_update_elem(&ferry_splice_off, &self, &one, BPF_ANY);
	stat_inc(FERRY_STAT_SPLICE_MISS);
	return SK_PASS;
}

/*
 * What to do with a connection to the pod at ip4 that the agent cannot take
 * (no listener in ferry_inbound, or assigning to it failed): the pod's
 * inbound mode decides. STRICT refuses it (SK_DROP: the lookup fails and TCP
 * answers RST), so plaintext never reaches a STRICT app while the agent is
 * down; PERMISSIVE and pods without an entry pass it to the app.
 */
static __always_inline int no_listener(__u32 ip4, __u32 lport)
{
	struct ferry_inbound_key k = { .ip4 = ip4 };
	struct ferry_inbound_policy *pol = bpf_map_lookup_elem(&ferry_inbound_policy, &k);
	if (pol && pol->mode == FERRY_INBOUND_STRICT) {
		stat_inc(FERRY_STAT_INBOUND_DROPPED);
		emit(FERRY_EV_ERROR, 0, 0, ip4, lport, -111 /* ECONNREFUSED */);
		return SK_DROP;
	}
	return SK_PASS;
}

/* Is this SYN (client -> pod) one of the agent's deliveries? */
static __always_inline int is_delivery(__u32 client_ip4, __u16 client_port, __u32 pod_ip4, __u16 pod_port)
{
	struct ferry_delivery_key k = {
		.client_ip4 = client_ip4,
		.pod_ip4 = pod_ip4,
		.client_port = client_port,
		.pod_port = pod_port,
	};
	return bpf_map_lookup_elem(&ferry_delivery, &k) != NULL;
}

/*
 * Attached to each enrolled pod's netns: a TCP connection to the pod's IP on
 * an application port goes to the agent's inbound listener in that pod, with
 * its destination (local) address intact. Never captured: the agent's own
 * ports, the agent's deliveries to the app (4-tuple in ferry_delivery), the pod talking to itself, and kubelet probes
 * (source FERRY_PROBE_IP4), which reach the app whatever the agent is doing.
 * Without a working listener the pod's ferry_inbound_policy decides
 * (no_listener): a STRICT pod fails closed.
 */
SEC("sk_lookup")
int ferry_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->family != 2 /* AF_INET */ || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	struct ferry_config *cfg = config();
	if (!cfg)
		return SK_PASS;
	__u32 lport = ctx->local_port;
	if (lport == cfg->inbound_port || lport == cfg->tunnel_port ||
	    lport == cfg->outbound_port || lport == cfg->admin_port)
		return SK_PASS;
	__u32 rport = bpf_ntohs(ctx->remote_port);
	if (is_delivery(ctx->remote_ip4, rport, ctx->local_ip4, lport)) {
		stat_inc(FERRY_STAT_DELIVERY_PASSED);
		return SK_PASS;
	}
	if (ctx->remote_ip4 == ctx->local_ip4)
		return SK_PASS; /* the pod talking to itself */
	if (ctx->remote_ip4 == bpf_htonl(FERRY_PROBE_IP4)) {
		stat_inc(FERRY_STAT_PROBES);
		return SK_PASS; /* a kubelet probe: straight to the app */
	}

	struct ferry_inbound_key k = { .ip4 = ctx->local_ip4 };
	struct bpf_sock *sk = bpf_map_lookup_elem(&ferry_inbound, &k);
	if (!sk)
		return no_listener(ctx->local_ip4, lport); /* agent down */
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		stat_inc(FERRY_STAT_INBOUND_ASSIGN_ERR);
		emit(FERRY_EV_ERROR, 0, 0, ctx->local_ip4, lport, err);
		return no_listener(ctx->local_ip4, lport);
	}
	stat_inc(FERRY_STAT_INBOUND_ASSIGNED);
	if (cfg->flags & FERRY_F_EVENTS)
		emit(FERRY_EV_INBOUND, 0, 0, ctx->remote_ip4, rport, 0);
	return SK_PASS;
}

/*
 * cgroup_skb/ingress on each enrolled pod's cgroup: the SYN of an agent
 * delivery (its 4-tuple in ferry_delivery) gets the delivery mark before
 * the app's listener makes its request socket, so (with tcp_fwmark_accept)
 * the app's SYN-ACK is routed back to the agent's transparent socket by the
 * pod's `fwmark -> local` policy route. A socket mark set by the agent does
 * not survive the loopback hop on this path, hence this program.
 */
SEC("cgroup_skb/ingress")
int ferry_mark_delivery(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(0x0800 /* ETH_P_IP */))
		return 1;
	struct iphdr iph;
	if (bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)) || iph.protocol != IPPROTO_TCP)
		return 1;
	struct tcphdr th;
	if (bpf_skb_load_bytes(skb, iph.ihl * 4, &th, sizeof(th)))
		return 1;
	if (!th.syn || th.ack)
		return 1;
	struct ferry_config *cfg = config();
	if (!cfg)
		return 1;
	if (is_delivery(iph.saddr, bpf_ntohs(th.source), iph.daddr, bpf_ntohs(th.dest)))
		skb->mark = cfg->deliver_mark;
	return 1;
}

/* tc on a pod's host-side veth: ingress there is what the pod sent. */
static __always_inline int count(struct __sk_buff *skb, int pod_tx)
{
	__u32 ifindex = skb->ifindex;
	struct ferry_traffic *t = bpf_map_lookup_elem(&ferry_traffic, &ifindex);
	if (!t) {
		struct ferry_traffic zero = {};
		bpf_map_update_elem(&ferry_traffic, &ifindex, &zero, BPF_NOEXIST);
		t = bpf_map_lookup_elem(&ferry_traffic, &ifindex);
		if (!t)
			return TC_ACT_UNSPEC;
	}
	if (pod_tx) {
		t->tx_packets += 1;
		t->tx_bytes += skb->len;
	} else {
		t->rx_packets += 1;
		t->rx_bytes += skb->len;
	}
	/* TC_ACT_UNSPEC (TCX_NEXT): let the CNI's own programs run after us. */
	return TC_ACT_UNSPEC;
}

SEC("classifier")
int ferry_tc_ingress(struct __sk_buff *skb)
{
	return count(skb, 1);
}

SEC("classifier")
int ferry_tc_egress(struct __sk_buff *skb)
{
	return count(skb, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
