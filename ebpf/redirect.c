/* ztunnel-py eBPF redirection: three tc programs inside an enrolled pod's network namespace.
 *
 * They do what istio-cni's in-pod iptables rules do (reference §3.1), without netfilter:
 *
 *   zt_ingress   pod interface, ingress   SYN from outside to any port but 15008 is assigned
 *                                         (bpf_sk_assign) to the agent's plaintext listener
 *                                         15006; the accepted socket's local address is the
 *                                         original destination, the source IP is untouched.
 *   zt_egress    pod interface, egress    a packet that belongs to a socket of this netns
 *                                         (an agent socket the app talks to: a captured
 *                                         outbound connection, or the spoofed-source
 *                                         connection of the inbound path), or a new outbound
 *                                         SYN of the app, is looped back into the pod's own
 *                                         stack: loop mark + bpf_redirect to lo ingress.
 *   zt_loopback  lo, ingress              a looped-back SYN is assigned to the agent's
 *                                         outbound listener 15001 (its accepted socket's local
 *                                         address is the original destination).
 *   zt_sk_lookup the pod netns (sk_lookup)  completes the one case tc cannot: a SYN whose tuple
 *                                         still has a TIME_WAIT socket of the agent. The stack
 *                                         must see that SYN to retire the TIME_WAIT socket, and
 *                                         then looks a listener up by port, which would be the
 *                                         app's. So tc records the agent's listener for exactly
 *                                         that tuple in zt_handoff and lets the SYN through;
 *                                         this program answers the lookup with it.
 *
 * Looped-back packets carry a non-local destination; the ip rule "fwmark 0x111/0xfff lookup
 * 100" with "local default dev lo table 100" (the same rule the iptables mode adds) delivers
 * them locally, and accept_local on lo lets the pod's own source address in.
 *
 * Never touched: the agent's own packets (skb->mark 0x539), anything that is not TCP, traffic
 * on lo that we did not loop back (127.0.0.1, the pod's own IP), port 15008 inbound, kubelet
 * probes (169.254.7.127). Fail closed: inbound TCP we cannot parse (fragments, long IPv6
 * header chains) is dropped, since the stack would reassemble it and deliver it past the agent;
 * a SYN that should be captured while the agent's listener is absent is dropped (the client
 * retries), never delivered elsewhere. Only a listener carrying the agent's mark qualifies, so
 * an app cannot stand in for the agent.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#include "ztunnel_redirect.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

BPF_ARRAY(zt_config, struct zt_config, 1);
BPF_PERCPU_ARRAY(zt_stats, u64, ZT_STAT_MAX);
/* Entries live for one packet's trip through the stack; a listener that closes leaves it. */
BPF_TABLE("sockhash", struct zt_handoff_key, int, zt_handoff, 1024);

#define ZT_NO_SOCKET (-1)

struct zt_flow {
	struct bpf_sock_tuple tuple; /* as the receiving socket sees it: saddr = remote end */
	u16 dport; /* host order */
	u8 v6;
	u8 syn; /* SYN without ACK: a new connection */
};

static __always_inline void zt_count(int idx)
{
	u64 *value = zt_stats.lookup(&idx);
	if (value)
		*value += 1;
}

static __always_inline struct zt_config *zt_cfg(void)
{
	int zero = 0;
	return zt_config.lookup(&zero);
}

/* What a packet is to us. OPAQUE: it may carry TCP we cannot see (a fragment, a malformed
 * header, an IPv6 header chain longer than we walk); inbound, such packets are dropped, since
 * the stack would reassemble or parse them and deliver them past the agent. */
enum zt_parsed { ZT_TCP, ZT_OTHER, ZT_OPAQUE, ZT_SHORT };

#define ZT_IPV6_MAX_EXT 4
#define ZT_PULL_MAX 256

static __always_inline int zt_parse_l4(void *l4, void *end, struct zt_flow *f)
{
	struct tcphdr *tcp = l4;
	if ((void *)(tcp + 1) > end)
		return ZT_SHORT;
	f->dport = bpf_ntohs(tcp->dest);
	f->syn = tcp->syn && !tcp->ack;
	if (f->v6) {
		f->tuple.ipv6.sport = tcp->source;
		f->tuple.ipv6.dport = tcp->dest;
	} else {
		f->tuple.ipv4.sport = tcp->source;
		f->tuple.ipv4.dport = tcp->dest;
	}
	return ZT_TCP;
}

static __always_inline int zt_ipv6_ext(u8 next)
{
	return next == 0 /* hop-by-hop */ || next == 43 /* routing */ || next == 60 /* dst opts */ ||
	       next == 51 /* AH */;
}

/* TCP over IPv4 (options allowed) or IPv6 (up to ZT_IPV6_MAX_EXT extension headers). */
static __always_inline int zt_parse(struct __sk_buff *skb, struct zt_flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return ZT_SHORT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		f->v6 = 0;
		if ((void *)(ip + 1) > end)
			return ZT_SHORT;
		if (ip->protocol != IPPROTO_TCP)
			return ZT_OTHER;
		if (ip->ihl < 5 || (ip->frag_off & bpf_htons(0x3fff))) /* MF or an offset */
			return ZT_OPAQUE;
		f->tuple.ipv4.saddr = ip->saddr;
		f->tuple.ipv4.daddr = ip->daddr;
		return zt_parse_l4((void *)ip + ip->ihl * 4, end, f);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		f->v6 = 1;
		if ((void *)(ip6 + 1) > end)
			return ZT_SHORT;
		u8 next = ip6->nexthdr;
		void *cursor = (void *)(ip6 + 1);
#pragma unroll
		for (int i = 0; i < ZT_IPV6_MAX_EXT; i++) {
			if (!zt_ipv6_ext(next))
				break;
			struct ipv6_opt_hdr *opt = cursor;
			if ((void *)(opt + 1) > end)
				return ZT_SHORT;
			cursor += next == 51 ? (opt->hdrlen + 2) * 4 : (opt->hdrlen + 1) * 8;
			next = opt->nexthdr;
		}
		if (next == 44 /* fragment */ || zt_ipv6_ext(next))
			return ZT_OPAQUE;
		if (next != IPPROTO_TCP)
			return ZT_OTHER; /* as ip6tables -p tcp: ESP, UDP, ICMPv6, ... are not TCP */
		__builtin_memcpy(f->tuple.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->tuple.ipv6.daddr, &ip6->daddr, 16);
		return zt_parse_l4(cursor, end, f);
	}
	return ZT_OTHER;
}

/* zt_parse, with the headers pulled into the linear part when they sit in paged data
 * (ingress), and IPv6 left alone unless IPv6 capture is on. A packet still too short to show
 * its TCP header is OPAQUE. */
static __always_inline int zt_parse_for(struct zt_config *cfg, struct __sk_buff *skb,
					struct zt_flow *f, int pull)
{
	int parsed = zt_parse(skb, f);
	if (parsed == ZT_SHORT && pull) {
		u32 len = skb->len < ZT_PULL_MAX ? skb->len : ZT_PULL_MAX;
		if (bpf_skb_pull_data(skb, len) == 0)
			parsed = zt_parse(skb, f);
	}
	if (parsed == ZT_SHORT)
		parsed = ZT_OPAQUE;
	if (f->v6 && !(cfg->flags & ZT_F_IPV6))
		return ZT_OTHER;
	return parsed;
}

static __always_inline int zt_is_probe(struct zt_config *cfg, struct zt_flow *f, int src)
{
	if (f->v6) {
		u32 *addr = src ? f->tuple.ipv6.saddr : f->tuple.ipv6.daddr;
		u32 *probe = (u32 *)cfg->probe_v6;
		return addr[0] == probe[0] && addr[1] == probe[1] && addr[2] == probe[2] &&
		       addr[3] == probe[3];
	}
	u32 addr = src ? f->tuple.ipv4.saddr : f->tuple.ipv4.daddr;
	return addr == *(u32 *)cfg->probe_v4;
}

/* The verifier wants a constant tuple size: one call per family. */
static __always_inline struct bpf_sock *zt_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *t,
						 int v6)
{
	if (v6)
		return bpf_skc_lookup_tcp(skb, t, sizeof(t->ipv6), BPF_F_CURRENT_NETNS, 0);
	return bpf_skc_lookup_tcp(skb, t, sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
}

/* State of the socket this packet would be delivered to (BPF_TCP_*), or ZT_NO_SOCKET. */
static __always_inline int zt_socket_state(struct __sk_buff *skb, struct zt_flow *f)
{
	struct bpf_sock *sk = zt_lookup(skb, &f->tuple, f->v6);
	if (!sk)
		return ZT_NO_SOCKET;
	int state = sk->state;
	bpf_sk_release(sk);
	return state;
}

/* A connection of this netns owns the packet. A listener does not (it matched by port only),
 * and neither does TIME_WAIT: a new SYN on that tuple is a new connection (see zt_capture). */
static __always_inline int zt_owned(int state)
{
	return state != ZT_NO_SOCKET && state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT;
}

/* The agent's listener on `port` for this flow (a reference the caller releases), or NULL.
 * Only a listener carrying the agent's mark qualifies. */
static __always_inline struct bpf_sock *zt_listener(struct __sk_buff *skb, struct zt_config *cfg,
						    struct zt_flow *f, u16 port)
{
	struct bpf_sock_tuple t = f->tuple;
	if (f->v6)
		t.ipv6.dport = bpf_htons(port);
	else
		t.ipv4.dport = bpf_htons(port);

	struct bpf_sock *sk = zt_lookup(skb, &t, f->v6);
	if (!sk)
		return NULL;
	struct bpf_sock *full = bpf_sk_fullsock(sk);
	if (!full || full->state != BPF_TCP_LISTEN ||
	    (full->mark & cfg->mark_mask) != cfg->agent_mark) {
		bpf_sk_release(sk);
		return NULL;
	}
	return full;
}

static __always_inline void zt_handoff_key_of(struct zt_flow *f, struct zt_handoff_key *key)
{
	if (f->v6) {
		key->family = AF_INET6;
		__builtin_memcpy(key->remote, f->tuple.ipv6.saddr, 16);
		__builtin_memcpy(key->local, f->tuple.ipv6.daddr, 16);
		key->remote_port = bpf_ntohs(f->tuple.ipv6.sport);
		key->local_port = bpf_ntohs(f->tuple.ipv6.dport);
	} else {
		key->family = AF_INET;
		key->remote[0] = f->tuple.ipv4.saddr;
		key->local[0] = f->tuple.ipv4.daddr;
		key->remote_port = bpf_ntohs(f->tuple.ipv4.sport);
		key->local_port = bpf_ntohs(f->tuple.ipv4.dport);
	}
}

/* Hand a new connection to the agent's listener on `port`; drop it when there is none.
 * `state` is what already holds the tuple: TIME_WAIT goes through zt_handoff (the stack has
 * to retire it first), anything else is assigned here. */
static __always_inline int zt_capture(struct __sk_buff *skb, struct zt_config *cfg,
				      struct zt_flow *f, u16 port, int stat, int state)
{
	struct bpf_sock *sk = zt_listener(skb, cfg, f, port);
	if (!sk) {
		zt_count(ZT_STAT_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	long err;
	if (state == BPF_TCP_TIME_WAIT) {
		struct zt_handoff_key key = {};
		zt_handoff_key_of(f, &key);
		err = zt_handoff.update(&key, (int *)sk);
	} else {
		err = bpf_sk_assign(skb, sk, 0);
	}
	bpf_sk_release(sk);
	if (err) {
		zt_count(ZT_STAT_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	zt_count(stat);
	return TC_ACT_OK;
}

/* Pod interface, ingress: new connections from the pod network go to 15006 (15008 excepted). */
int zt_ingress(struct __sk_buff *skb)
{
	struct zt_config *cfg = zt_cfg();
	struct zt_flow f = {};

	if (!cfg || !(cfg->flags & ZT_F_CAPTURE_INBOUND))
		return TC_ACT_OK;
	int parsed = zt_parse_for(cfg, skb, &f, 1);
	if (parsed == ZT_OPAQUE) {
		zt_count(ZT_STAT_OPAQUE_DROPPED);
		return TC_ACT_SHOT;
	}
	if (parsed != ZT_TCP || !f.syn)
		return TC_ACT_OK; /* established flows find their socket by themselves */
	if (f.dport == cfg->inbound_port || zt_is_probe(cfg, &f, 1))
		return TC_ACT_OK;
	int state = zt_socket_state(skb, &f);
	if (zt_owned(state))
		return TC_ACT_OK; /* a retransmitted SYN of a connection being accepted */
	return zt_capture(skb, cfg, &f, cfg->inbound_plaintext_port, ZT_STAT_INBOUND_CAPTURED,
			  state);
}

/* Pod interface, egress: packets for the pod's own sockets, and new app connections, go back
 * into the pod's stack through lo. */
int zt_egress(struct __sk_buff *skb)
{
	struct zt_config *cfg = zt_cfg();
	struct zt_flow f = {};

	if (!cfg || !(cfg->flags & ZT_F_CAPTURE_OUTBOUND))
		return TC_ACT_OK;
	if ((skb->mark & cfg->mark_mask) == cfg->agent_mark)
		return TC_ACT_OK; /* the agent's own sockets are never captured */
	if (zt_parse_for(cfg, skb, &f, 0) != ZT_TCP || zt_is_probe(cfg, &f, 0))
		return TC_ACT_OK;
	/* The tuple as a local receiver would see it: exactly this packet's addresses. */
	int state = zt_socket_state(skb, &f);
	if (state == ZT_NO_SOCKET || state == BPF_TCP_LISTEN) {
		if (!f.syn)
			return TC_ACT_OK; /* a flow that existed before enrollment keeps going out */
	} else if (!f.syn) {
		zt_count(ZT_STAT_LOOPED);
	}
	/* A looped packet must look addressed to lo, or ip_rcv drops it as PACKET_OTHERHOST. */
	u8 lo_mac[ETH_ALEN] = {};
	if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0) != 0)
		return TC_ACT_SHOT;
	skb->mark = (skb->mark & ~cfg->mark_mask) | cfg->loop_mark;
	return bpf_redirect(cfg->lo_ifindex, BPF_F_INGRESS);
}

/* lo, ingress: a looped-back new connection goes to the agent's outbound listener 15001. */
int zt_loopback(struct __sk_buff *skb)
{
	struct zt_config *cfg = zt_cfg();
	struct zt_flow f = {};

	if (!cfg || (skb->mark & cfg->mark_mask) != cfg->loop_mark || cfg->loop_mark == 0)
		return TC_ACT_OK; /* ordinary loopback traffic */
	if (zt_parse_for(cfg, skb, &f, 0) != ZT_TCP || !f.syn)
		return TC_ACT_OK;
	int state = zt_socket_state(skb, &f);
	if (zt_owned(state))
		return TC_ACT_OK;
	return zt_capture(skb, cfg, &f, cfg->outbound_port, ZT_STAT_OUTBOUND_CAPTURED, state);
}

/* The pod netns's socket lookup: answers a lookup zt_capture prepared in zt_handoff. */
int zt_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct zt_handoff_key key = {};

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	key.family = ctx->family;
	if (ctx->family == AF_INET6) {
		key.remote[0] = ctx->remote_ip6[0];
		key.remote[1] = ctx->remote_ip6[1];
		key.remote[2] = ctx->remote_ip6[2];
		key.remote[3] = ctx->remote_ip6[3];
		key.local[0] = ctx->local_ip6[0];
		key.local[1] = ctx->local_ip6[1];
		key.local[2] = ctx->local_ip6[2];
		key.local[3] = ctx->local_ip6[3];
	} else {
		key.remote[0] = ctx->remote_ip4;
		key.local[0] = ctx->local_ip4;
	}
	key.remote_port = bpf_ntohs(ctx->remote_port);
	key.local_port = ctx->local_port;

	struct bpf_sock *sk = (struct bpf_sock *)zt_handoff.lookup(&key);
	if (!sk)
		return SK_PASS; /* not ours: the stack's own lookup decides */
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	zt_handoff.delete(&key);
	if (err) {
		zt_count(ZT_STAT_ASSIGN_FAILED);
		return SK_DROP; /* never fall back to the app's listener */
	}
	zt_count(ZT_STAT_HANDOFF);
	return SK_PASS;
}
