// SPDX-License-Identifier: GPL-2.0 OR MIT
/* The Hooker's XDP ingress filter for VTL datagrams (docs/hooker.md, "XDP").
 *
 * Runs on every frame an interface receives, before the kernel allocates
 * anything for it.  Only UDP datagrams whose destination port is in
 * vtl_ports (the VTL endpoints this host serves) are looked at; everything
 * else leaves with XDP_PASS untouched.  A VTL datagram is checked against
 * the common header rules of docs/wire-format.md, in the codec's order, and
 * dropped with a per-reason counter when one fails:
 *
 *   short         UDP payload < 32 bytes (header + CRC)
 *   version       version != 1
 *   length        28 + optlen + bodylen + 4 != UDP payload length
 *   type          packet type not 1..11
 *   zero_dcid     dcid == 0 but not an OFFER (nor the RESET that aborts a
 *                 half-open handshake, which the endpoint accepts), or an
 *                 OFFER with dcid != 0
 *   unknown_conn  dcid is not a connection ID served here (vtl_conns)
 *
 * In generic (SKB) mode the program runs after GRO, and a UDP GSO batch
 * from a local sender (veth) arrives whole, so one frame may hold several
 * equal-sized VTL datagrams behind one UDP header.  There (config
 * `aggregates`) a payload longer than its first datagram passes once that
 * first datagram passes every check (counter `aggregates`); user space
 * splits and checks the rest.  Native mode sees single datagrams only.
 *
 * No CRC: user space checks it (a CRC32C over 1.4 kB per packet is the
 * expensive part of validation and needs no early drop).  Options, bodies
 * and everything connection-level stay in user space too.
 *
 * vtl_conns maps a connection ID to 0 while it is live, or to the
 * CLOCK_MONOTONIC time (ns) until which a just-forgotten ID is still let
 * through, so that the endpoint can answer late packets of a finished
 * connection with a stateless RESET as the wire format promises.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define VTL_VERSION 1
#define VTL_HEADER 28           /* common header */
#define VTL_MIN (VTL_HEADER + 4) /* header + CRC32C */
#define VTL_T_OFFER 1
#define VTL_T_RESET 8
#define VTL_T_MAX 11            /* FORWARD: the highest known type */

/* Counter slots (src/vtl/hooker/xdp.py COUNTERS lists them in this order). */
enum vtl_xdp_counter {
	VTL_X_PASSED,       /* VTL datagrams that passed every check */
	VTL_X_NON_VTL,      /* frames left alone: not UDP to a VTL port */
	VTL_X_SHORT,
	VTL_X_VERSION,
	VTL_X_LENGTH,
	VTL_X_TYPE,
	VTL_X_ZERO_DCID,
	VTL_X_UNKNOWN_CONN,
	VTL_X_AGGREGATES,   /* generic mode: GRO/GSO frames passed (also in passed) */
	VTL_X_MAX,
};

struct vtl_xdp_count {
	__u64 packets;
	__u64 bytes; /* whole frames, Ethernet header included */
};

/* The VTL common header (big-endian on the wire). */
struct vtl_hdr {
	__u8 version;
	__u8 type;
	__u8 flags;
	__u8 reserved;
	__u64 dcid; /* compared as raw bytes: user space stores keys in wire order */
	__u64 scid;
	__be32 pn;
	__be16 optlen;
	__be16 bodylen;
} __attribute__((packed));

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* UDP destination ports (network byte order) of the VTL endpoints served here. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __be16);
	__type(value, __u32);
} vtl_ports SEC(".maps");

/* Live local connection IDs (raw wire bytes) -> 0, or expiry time (ns). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} vtl_conns SEC(".maps");

/* [0].check_conns: 0 turns the unknown-connection check off (fail open:
 * user space sets it when vtl_conns is full or it lost track).
 * [0].aggregates: 1 in generic mode (see the top of this file). */
struct vtl_xdp_config {
	__u32 check_conns;
	__u32 aggregates;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vtl_xdp_config);
} vtl_xdp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VTL_X_MAX);
	__type(key, __u32);
	__type(value, struct vtl_xdp_count);
} vtl_xdp_stats SEC(".maps");

static __always_inline int count(__u32 slot, __u64 bytes, int verdict)
{
	struct vtl_xdp_count *c = bpf_map_lookup_elem(&vtl_xdp_stats, &slot);

	if (c) { /* per-CPU slot: no atomics needed */
		c->packets++;
		c->bytes += bytes;
	}
	return verdict;
}

static __always_inline int pass(__u64 frame, int aggregate)
{
	if (aggregate)
		count(VTL_X_AGGREGATES, frame, XDP_PASS);
	return count(VTL_X_PASSED, frame, XDP_PASS);
}

#define DROP(slot) count((slot), frame, XDP_DROP)
#define LEAVE() count(VTL_X_NON_VTL, frame, XDP_PASS)

SEC("xdp")
int vtl_xdp_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 frame = data_end - data;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	void *l3;
	__u16 proto;

	if ((void *)(eth + 1) > data_end)
		return LEAVE();
	proto = eth->h_proto;
	l3 = eth + 1;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vh = l3; /* one VLAN tag */

		if ((void *)(vh + 1) > data_end)
			return LEAVE();
		proto = vh->proto;
		l3 = vh + 1;
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		__u32 ihl;

		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP)
			return LEAVE();
		/* fragments: only the reassembled datagram can be judged (user space) */
		if (ip->frag_off & bpf_htons(0x3fff))
			return LEAVE();
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return LEAVE();
		udp = l3 + ihl;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;

		/* extension headers are not followed: such datagrams pass unchecked */
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_UDP)
			return LEAVE();
		udp = (void *)(ip6 + 1);
	} else {
		return LEAVE();
	}
	if ((void *)(udp + 1) > data_end)
		return LEAVE();
	if (!bpf_map_lookup_elem(&vtl_ports, &udp->dest))
		return LEAVE();

	/* From here on it is a datagram for a VTL endpoint. */
	__u32 zero = 0;
	struct vtl_xdp_config *cfg = bpf_map_lookup_elem(&vtl_xdp_config, &zero);
	__u32 ulen = bpf_ntohs(udp->len);
	struct vtl_hdr *vh = (void *)(udp + 1);
	int aggregate = 0;

	if (ulen < sizeof(*udp) + VTL_MIN || (void *)(vh + 1) > data_end)
		return DROP(VTL_X_SHORT);
	if ((void *)udp + ulen > data_end) /* UDP length beyond the frame */
		return DROP(VTL_X_LENGTH);
	if (vh->version != VTL_VERSION)
		return DROP(VTL_X_VERSION);
	__u32 vlen = VTL_MIN + (__u32)bpf_ntohs(vh->optlen) + bpf_ntohs(vh->bodylen);

	if (vlen != ulen - sizeof(*udp)) {
		if (!cfg || !cfg->aggregates || vlen > ulen - sizeof(*udp))
			return DROP(VTL_X_LENGTH);
		aggregate = 1; /* generic mode: more datagrams follow this one */
	}
	if (vh->type < 1 || vh->type > VTL_T_MAX)
		return DROP(VTL_X_TYPE);

	__u64 dcid = vh->dcid;

	if (vh->type == VTL_T_OFFER) {
		if (dcid)
			return DROP(VTL_X_ZERO_DCID);
		return pass(frame, aggregate);
	}
	if (!dcid) /* a RESET may abort a handshake before the initiator knows our ID */
		return vh->type == VTL_T_RESET ? pass(frame, aggregate) : DROP(VTL_X_ZERO_DCID);

	if (cfg && cfg->check_conns) {
		__u64 *expiry = bpf_map_lookup_elem(&vtl_conns, &dcid);

		if (!expiry)
			return DROP(VTL_X_UNKNOWN_CONN);
		if (*expiry && bpf_ktime_get_ns() > *expiry) {
			bpf_map_delete_elem(&vtl_conns, &dcid); /* its grace period is over */
			return DROP(VTL_X_UNKNOWN_CONN);
		}
	}
	return pass(frame, aggregate);
}

char _license[] SEC("license") = "Dual MIT/GPL";
