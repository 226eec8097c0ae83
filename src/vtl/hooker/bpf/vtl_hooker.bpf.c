// SPDX-License-Identifier: GPL-2.0
/* The Hooker's socket-level programs (docs/hooker.md, "Kernel side").
 *
 * A hooked TCP connection is cut in two at the client host and again at
 * the server host; the bytes cross the network over VTL in between:
 *
 *   app --connect4 rewrite--> local Hooker ==VTL==> peer Hooker --> server
 *
 * vtl_connect4     sends a matching connect() to the local Hooker and
 *                  remembers the original destination by socket cookie.
 * vtl_getpeername4 makes getpeername()/accept() show the real peer on both
 *                  hosts (the app sees the server, the server sees the app).
 * vtl_sockops      puts both ends of each app<->Hooker connection into the
 *                  SOCKHASH when they are established and hands the Hooker
 *                  the original destination keyed by the app's address.
 * vtl_skmsg        splices those local pairs: a sendmsg() on one end goes
 *                  straight into the other end's receive queue, skipping
 *                  the loopback TCP stack.  FIN and RST still travel over
 *                  the real (local) TCP connection, after the data.
 *
 * Every program first checks the network namespace: one Hooker per
 * namespace loads its own copy with its own maps, and all of them see
 * every socket of the machine (cgroup hooks ignore namespaces).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <sys/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vtl_hooker.h"

#define MAX_SOCKS 65536

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vtl_config);
} vtl_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VTL_C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} vtl_counters SEC(".maps");

/* Policy: destination port -> rule, destination prefix -> rule,
 * cgroup id -> rule (`vtl run -- CMD`).  A rule number is opaque here. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} vtl_hook_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vtl_prefix_key);
	__type(value, __u32);
} vtl_hook_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u32);
} vtl_hook_cgroups SEC(".maps");

/* Peer hosts known to run no VTL: connect()s to them stay plain TCP. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} vtl_peers SEC(".maps");

/* socket cookie of a redirected app socket -> original destination */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct vtl_orig);
} vtl_orig_dst SEC(".maps");

/* app socket's local address -> original destination (read by the Hooker
 * when it accepts the redirected connection) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, struct vtl_addr);
	__type(value, struct vtl_orig);
} vtl_flows SEC(".maps");

/* Server host: the peer Hooker's source address for a flow -> the real
 * client's address, which the server must see as its peer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, struct vtl_addr);
	__type(value, struct vtl_addr);
} vtl_peer_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, struct vtl_sock_key);
	__type(value, __u64);
} vtl_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_SOCKS);
	__type(key, struct vtl_sock_key);
	__type(value, struct vtl_splice);
} vtl_splice SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&vtl_counters, &idx);

	if (c)
		__sync_fetch_and_add(c, n);
}

static __always_inline struct vtl_config *config(void)
{
	__u32 zero = 0;
	struct vtl_config *cfg = bpf_map_lookup_elem(&vtl_config, &zero);

	if (!cfg || !cfg->enabled)
		return 0;
	return cfg;
}

/* Which rule hooks this connect(), or 0: the caller's cgroup first (an
 * explicit `vtl run`), then the destination port, then the prefix. */
static __always_inline __u32 match_rule(__u32 dip, __u32 dport)
{
	__u64 cg = bpf_get_current_cgroup_id();
	__u32 *rule = bpf_map_lookup_elem(&vtl_hook_cgroups, &cg);

	if (rule)
		return *rule;
	rule = bpf_map_lookup_elem(&vtl_hook_ports, &dport);
	if (rule)
		return *rule;
	struct vtl_prefix_key pk = { .prefixlen = 32, .ip4 = dip };
	rule = bpf_map_lookup_elem(&vtl_hook_prefixes, &pk);
	if (rule)
		return *rule;
	return 0;
}

SEC("cgroup/connect4")
int vtl_connect4(struct bpf_sock_addr *ctx)
{
	struct vtl_config *cfg = config();

	if (!cfg || ctx->type != SOCK_STREAM)
		return 1;
	if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
		return 1;
	if ((bpf_get_current_pid_tgid() >> 32) == cfg->hooker_tgid)
		return 1;
	count(VTL_C_CONNECT_SEEN, 1);

	__u32 dip = ctx->user_ip4;
	__u32 dport = bpf_ntohs((__u16)ctx->user_port);

	/* Never hook loopback or the Hooker itself. */
	if ((bpf_ntohl(dip) >> 24) == 127)
		return 1;
	if (dip == cfg->listen_ip4 && dport == cfg->listen_port)
		return 1;

	__u32 rule = match_rule(dip, dport);
	if (!rule)
		return 1;
	__u32 *peer = bpf_map_lookup_elem(&vtl_peers, &dip);
	if (peer && *peer == VTL_PEER_INCAPABLE) {
		count(VTL_C_CONNECT_INCAPABLE, 1);
		return 1;
	}

	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct vtl_orig orig = { .ip4 = dip, .port = dport, .rule = rule };
	if (bpf_map_update_elem(&vtl_orig_dst, &cookie, &orig, BPF_ANY))
		return 1; /* cannot remember it: better plain TCP than lost */

	ctx->user_ip4 = cfg->listen_ip4;
	ctx->user_port = bpf_htons((__u16)cfg->listen_port);
	count(VTL_C_CONNECT_REDIRECTED, 1);
	return 1;
}

SEC("cgroup/getpeername4")
int vtl_getpeername4(struct bpf_sock_addr *ctx)
{
	struct vtl_config *cfg = config();

	if (!cfg || bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
		return 1;

	/* Client host: an app socket we redirected shows the real server. */
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct vtl_orig *orig = bpf_map_lookup_elem(&vtl_orig_dst, &cookie);
	if (orig) {
		ctx->user_ip4 = orig->ip4;
		ctx->user_port = bpf_htons((__u16)orig->port);
		count(VTL_C_PEERNAME_REWRITTEN, 1);
		return 1;
	}
	/* Server host: a socket whose peer is the Hooker shows the real client. */
	struct vtl_addr peer = {
		.ip4 = ctx->user_ip4,
		.port = bpf_ntohs((__u16)ctx->user_port),
	};
	struct vtl_addr *real = bpf_map_lookup_elem(&vtl_peer_names, &peer);
	if (real) {
		ctx->user_ip4 = real->ip4;
		ctx->user_port = bpf_htons((__u16)real->port);
		count(VTL_C_PEERNAME_REWRITTEN, 1);
	}
	return 1;
}

static __always_inline void sock_key(struct bpf_sock_ops *skops, struct vtl_sock_key *k)
{
	k->local_ip4 = skops->local_ip4;
	k->remote_ip4 = skops->remote_ip4;
	k->local_port = skops->local_port;
	k->remote_port = bpf_ntohl(skops->remote_port);
}

static __always_inline void add_sock(struct bpf_sock_ops *skops, struct vtl_config *cfg,
				     struct vtl_sock_key *k, __u32 ctr)
{
	/* the close callback drops this socket's entries in our maps */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	/* Splicing is opt-in (splice_budget > 0): a socket in a SOCKHASH reads
	 * through tcp_bpf_recvmsg, where a reader blocked when a RST arrives gets
	 * EAGAIN instead of ECONNRESET (seen on this kernel), and a redirect
	 * ignores the receiver's buffer limit.  See docs/hooker.md. */
	if (!cfg->splice_budget)
		return;
	if (bpf_sock_hash_update(skops, &vtl_socks, k, BPF_ANY) == 0)
		count(ctr, 1);
}

SEC("sockops")
int vtl_sockops(struct bpf_sock_ops *skops)
{
	struct vtl_config *cfg = config();
	struct vtl_sock_key key = {};

	if (!cfg || skops->family != AF_INET)
		return 1;
	if (bpf_get_netns_cookie(skops) != cfg->netns_cookie)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		sock_key(skops, &key);
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct vtl_orig *orig = bpf_map_lookup_elem(&vtl_orig_dst, &cookie);
		if (orig) {
			/* an app socket we sent to the Hooker */
			struct vtl_addr app = { .ip4 = key.local_ip4, .port = key.local_port };
			bpf_map_update_elem(&vtl_flows, &app, orig, BPF_ANY);
			add_sock(skops, cfg, &key, VTL_C_SOCK_APP);
			break;
		}
		/* the peer Hooker's socket to the local server */
		struct vtl_addr me = { .ip4 = key.local_ip4, .port = key.local_port };
		if (bpf_map_lookup_elem(&vtl_peer_names, &me))
			add_sock(skops, cfg, &key, VTL_C_SOCK_HOOKER);
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		sock_key(skops, &key);
		if (key.local_ip4 == cfg->listen_ip4 && key.local_port == cfg->listen_port) {
			/* the Hooker's end of a redirected connection */
			add_sock(skops, cfg, &key, VTL_C_SOCK_HOOKER);
			break;
		}
		/* the server's end of a connection from the peer Hooker */
		struct vtl_addr peer = { .ip4 = key.remote_ip4, .port = key.remote_port };
		if (bpf_map_lookup_elem(&vtl_peer_names, &peer))
			add_sock(skops, cfg, &key, VTL_C_SOCK_APP);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			sock_key(skops, &key);
			bpf_map_delete_elem(&vtl_splice, &key);
			__u64 cookie = bpf_get_socket_cookie(skops);
			bpf_map_delete_elem(&vtl_orig_dst, &cookie);
		}
		break;
	}
	return 1;
}

SEC("sk_msg")
int vtl_skmsg(struct sk_msg_md *msg)
{
	struct vtl_config *cfg = config();
	struct vtl_sock_key self = {
		.local_ip4 = msg->local_ip4,
		.remote_ip4 = msg->remote_ip4,
		.local_port = msg->local_port,
		.remote_port = bpf_ntohl(msg->remote_port),
	};
	struct vtl_sock_key peer = {
		.local_ip4 = self.remote_ip4,
		.remote_ip4 = self.local_ip4,
		.local_port = self.remote_port,
		.remote_port = self.local_port,
	};
	struct vtl_splice *sp = bpf_map_lookup_elem(&vtl_splice, &self);
	__u32 size = msg->size;

	if (!sp) {
		/* First message: splice only if the other end is there now. */
		struct vtl_splice init = { .mode = VTL_SPLICE_PASS };
		if (cfg && size <= cfg->splice_budget &&
		    bpf_msg_redirect_hash(msg, &vtl_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
			init.mode = VTL_SPLICE_REDIRECT;
			init.spliced = size;
			bpf_map_update_elem(&vtl_splice, &self, &init, BPF_NOEXIST);
			count(VTL_C_MSG_REDIRECTED, 1);
			count(VTL_C_MSG_REDIRECTED_BYTES, size);
			return SK_PASS;
		}
		bpf_map_update_elem(&vtl_splice, &self, &init, BPF_NOEXIST);
		goto pass;
	}
	if (sp->mode != VTL_SPLICE_REDIRECT)
		goto pass;
	if (!cfg || sp->spliced + size > cfg->splice_budget) {
		sp->mode = VTL_SPLICE_PASS; /* for good: see struct vtl_splice */
		count(VTL_C_SPLICE_EXHAUSTED, 1);
		goto pass;
	}
	if (bpf_msg_redirect_hash(msg, &vtl_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		__sync_fetch_and_add(&sp->spliced, size);
		count(VTL_C_MSG_REDIRECTED, 1);
		count(VTL_C_MSG_REDIRECTED_BYTES, size);
		return SK_PASS;
	}
	/* The other end left the map (it closed): TCP answers with a reset. */
	sp->mode = VTL_SPLICE_PASS;
pass:
	count(VTL_C_MSG_PASSED, 1);
	count(VTL_C_MSG_PASSED_BYTES, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
