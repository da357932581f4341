/* Map layouts shared between the BPF programs (redirect.c) and the agent.
 *
 * The Python mirror is ztunnel/redirect/ebpf/layout.py; tests/test_ebpf_layout.py parses this
 * file and fails when the two drift apart. Keep every field naturally aligned and the struct
 * free of implicit padding (explicit _pad fields), so both sides agree without asking clang.
 */
#ifndef ZTUNNEL_REDIRECT_H
#define ZTUNNEL_REDIRECT_H

/* zt_config.flags */
#define ZT_F_CAPTURE_OUTBOUND 0x1
#define ZT_F_CAPTURE_INBOUND 0x2
#define ZT_F_IPV6 0x4 /* capture IPv6 too (needs the IPv6 ip rule and local route) */

/* One entry (key 0): what the programs redirect where. All zero = pass everything. */
struct zt_config {
	__u32 agent_mark;             /* SO_MARK of the agent's own sockets, never captured (0x539) */
	__u32 mark_mask;              /* bits of skb->mark that carry our marks (0xfff) */
	__u32 loop_mark;              /* put on packets looped back to the pod's own stack (0x111) */
	__u32 lo_ifindex;             /* the pod's loopback device (always 1) */
	__u16 outbound_port;          /* 15001: new outbound connections */
	__u16 inbound_plaintext_port; /* 15006: inbound plaintext connections */
	__u16 inbound_port;           /* 15008: HBONE, reaches its listener untouched */
	__u16 flags;                  /* ZT_F_* */
	__u8 probe_v4[4];             /* kubelet probe source (169.254.7.127), network order */
	__u8 probe_v6[16];            /* its IPv6 twin */
};

/* Per-CPU counters (array index = enum value), read by describe(). */
enum zt_stat {
	ZT_STAT_INBOUND_CAPTURED = 0,  /* SYN from outside assigned to the plaintext listener */
	ZT_STAT_OUTBOUND_CAPTURED,     /* SYN from the app assigned to the outbound listener */
	ZT_STAT_LOOPED,                /* packets looped back to a local socket (replies, captured flows) */
	ZT_STAT_NO_LISTENER,           /* SYN dropped: the agent's listener is not there (fail closed) */
	ZT_STAT_ASSIGN_FAILED,         /* SYN dropped: bpf_sk_assign refused the listener */
	ZT_STAT_HANDOFF,               /* SYN on a TIME_WAIT tuple handed over via zt_sk_lookup */
	ZT_STAT_OPAQUE_DROPPED,        /* inbound TCP we cannot parse (fragment, long IPv6 chain) */
	ZT_STAT_MAX,
};

/* zt_handoff key (kernel only, never read by the agent): one new connection whose SYN met a
 * TIME_WAIT socket of ours, as the sk_lookup program sees it. Addresses in network order
 * (IPv4 in the first word, the rest zero), ports in host order. Both ends are in the key and
 * one end is always the pod's own IP, so pods sharing the map never match each other's. */
struct zt_handoff_key {
	__u32 remote[4];
	__u32 local[4];
	__u16 remote_port;
	__u16 local_port;
	__u32 family; /* AF_INET or AF_INET6 */
};

#endif
