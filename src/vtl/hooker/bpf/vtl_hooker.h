/* Types shared by the Hooker's BPF programs and its Python loader
 * (src/vtl/hooker/kernel.py mirrors every struct with ctypes: keep them
 * in sync, fields naturally aligned, no implicit padding).
 *
 * Addresses are IPv4 in network byte order; ports are host byte order.
 */
#ifndef VTL_HOOKER_H
#define VTL_HOOKER_H

#include <linux/types.h>

/* config[0]: written by the Hooker before attaching anything. */
struct vtl_config {
	__u64 netns_cookie;   /* only sockets in the Hooker's network namespace */
	__u32 hooker_tgid;    /* the Hooker's own connect()s are never redirected */
	__u32 listen_ip4;     /* where connect4 sends hooked connections */
	__u32 listen_port;
	__u32 enabled;        /* 0: pass everything (the Hooker is stopping) */
	__u32 splice_budget;  /* bytes one socket may splice before it uses TCP */
	__u32 pad;
};

/* The original destination of a redirected connect(), and the policy rule
 * that matched it (user space maps the rule to a composition). */
struct vtl_orig {
	__u32 ip4;
	__u32 port;
	__u32 rule;
	__u32 pad;
};

/* An IPv4 endpoint of a TCP connection in the Hooker's namespace. */
struct vtl_addr {
	__u32 ip4;
	__u32 port;
};

/* SOCKHASH key: a TCP connection seen from one of its two sockets.  One
 * Hooker's maps hold sockets of one namespace only (the programs check the
 * namespace cookie), so the 4-tuple is unique. */
struct vtl_sock_key {
	__u32 local_ip4;
	__u32 remote_ip4;
	__u32 local_port;
	__u32 remote_port;
};

/* LPM trie key for destination-prefix rules. */
struct vtl_prefix_key {
	__u32 prefixlen;
	__u32 ip4;
};

/* Which path a socket's sendmsg() data takes.  A socket starts on the
 * splice (if its peer is in the SOCKHASH at its first message) and may move
 * once, to TCP, never back: the receiver reads the spliced queue before the
 * TCP queue, so one switch in that direction keeps the byte order.
 *
 * Why a budget: a redirect into another socket's ingress queue is not
 * limited by that socket's receive buffer (measured here: 200 MB queued
 * into a socket nobody read).  After `splice_budget` bytes the socket goes
 * over loopback TCP, whose flow control stops a fast sender. */
struct vtl_splice {
	__u32 mode;
	__u32 pad;
	__u64 spliced;
};
#define VTL_SPLICE_REDIRECT 1
#define VTL_SPLICE_PASS 2

/* peers map values */
#define VTL_PEER_CAPABLE 1
#define VTL_PEER_INCAPABLE 2

/* counters array indexes */
enum vtl_counter {
	VTL_C_CONNECT_SEEN,        /* TCP connect()s in our namespace */
	VTL_C_CONNECT_REDIRECTED,  /* ... sent to the Hooker */
	VTL_C_CONNECT_INCAPABLE,   /* ... left alone: the peer has no VTL */
	VTL_C_SOCK_APP,            /* app sockets put in the SOCKHASH */
	VTL_C_SOCK_HOOKER,         /* Hooker-side sockets put in the SOCKHASH */
	VTL_C_MSG_REDIRECTED,      /* sendmsg() calls spliced by sk_msg */
	VTL_C_MSG_REDIRECTED_BYTES,
	VTL_C_MSG_PASSED,          /* sendmsg() calls left to TCP */
	VTL_C_MSG_PASSED_BYTES,
	VTL_C_PEERNAME_REWRITTEN,  /* getpeername()/accept() addresses restored */
	VTL_C_SPLICE_EXHAUSTED,    /* sockets moved from the splice to TCP */
	VTL_C_MAX,
};

#endif
