// meshproxy eBPF outbound capture.
//
// connect4/connect6 (cgroup/connect*) rewrite a pod's outbound TCP connects to
// the proxy's loopback outbound port and file the original destination under
// the socket cookie. sockops moves that record, once the connection is
// established, to a map keyed by the client's own address and port — the
// proxy's accepted socket sees exactly that as its peer. getsockopt
// (cgroup/getsockopt) answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST for the
// proxy's accepted socket from that map, so the proxy recovers the original
// destination the same way as with netfilter REDIRECT. getpeername4/6 show
// the app its original peer rather than the proxy's loopback address.
//
// Exempt: the proxy's own uid/gid, loopback and unspecified destinations, and
// the excluded CIDRs (LPM tries filled from user space).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct config {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port; /* host byte order */
	__u16 pad;
};

/* Where a connection was going. ip is in network byte order; an IPv4
 * destination uses ip[0]. */
struct origin {
	__u32 ip[4];
	__u16 port; /* network byte order */
	__u16 family;
};

/* A client socket's own address: the proxy's accepted socket's peer. */
struct addr_key {
	__u32 ip[4];
	__u16 port; /* host byte order */
	__u16 family;
};

struct lpm_v4 {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm_v6 {
	__u32 prefixlen;
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct origin);
} origin_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr_key);
	__type(value, struct origin);
} origin_by_addr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u8);
} exclude_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6);
	__type(value, __u8);
} exclude_v6 SEC(".maps");

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config_map, &zero);
}

/* The proxy's own traffic is never captured. */
static __always_inline int from_proxy(struct config *cfg)
{
	__u64 ug = bpf_get_current_uid_gid();
	return (__u32)ug == cfg->proxy_uid || (__u32)(ug >> 32) == cfg->proxy_gid;
}

/* Loopback, unspecified and excluded IPv4 destinations are left alone. */
static __always_inline int exempt_v4(__u32 ip)
{
	__u32 host = bpf_ntohl(ip);
	if ((host >> 24) == 127 || host == 0)
		return 1;
	struct lpm_v4 key = {.prefixlen = 32, .addr = ip};
	return bpf_map_lookup_elem(&exclude_v4, &key) != NULL;
}

static __always_inline int is_v4_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

SEC("cgroup/connect4")
int mp_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	struct config *cfg = get_config();
	if (!cfg || cfg->outbound_port == 0 || from_proxy(cfg))
		return 1;
	__u32 dst = ctx->user_ip4;
	if (exempt_v4(dst))
		return 1;
	struct origin o = {};
	o.ip[0] = dst;
	o.port = (__u16)ctx->user_port;
	o.family = AF_INET;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&origin_by_cookie, &cookie, &o, BPF_ANY))
		return 1; /* cannot remember it: let it through uncaptured */
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(cfg->outbound_port);
	return 1;
}

SEC("cgroup/connect6")
int mp_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	struct config *cfg = get_config();
	if (!cfg || cfg->outbound_port == 0 || from_proxy(cfg))
		return 1;
	__u32 ip[4];
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	struct origin o = {};
	o.port = (__u16)ctx->user_port;
	if (is_v4_mapped(ip)) {
		if (exempt_v4(ip[3]))
			return 1;
		o.ip[0] = ip[3];
		o.family = AF_INET;
	} else {
		if (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == bpf_htonl(1)))
			return 1; /* :: and ::1 */
		struct lpm_v6 key = {.prefixlen = 128};
		key.addr[0] = ip[0];
		key.addr[1] = ip[1];
		key.addr[2] = ip[2];
		key.addr[3] = ip[3];
		if (bpf_map_lookup_elem(&exclude_v6, &key))
			return 1;
		o.ip[0] = ip[0];
		o.ip[1] = ip[1];
		o.ip[2] = ip[2];
		o.ip[3] = ip[3];
		o.family = AF_INET6;
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&origin_by_cookie, &cookie, &o, BPF_ANY))
		return 1;
	if (o.family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(cfg->outbound_port);
	return 1;
}

/* Fill key from an address in network byte order; IPv4-mapped IPv6
 * addresses become IPv4 keys so both ends agree. */
static __always_inline void make_key(struct addr_key *k, __u32 family, __u32 ip4, const __u32 ip6[4], __u16 port)
{
	k->port = port;
	if (family == AF_INET) {
		k->family = AF_INET;
		k->ip[0] = ip4;
		return;
	}
	if (is_v4_mapped(ip6)) {
		k->family = AF_INET;
		k->ip[0] = ip6[3];
		return;
	}
	k->family = AF_INET6;
	k->ip[0] = ip6[0];
	k->ip[1] = ip6[1];
	k->ip[2] = ip6[2];
	k->ip[3] = ip6[3];
}

SEC("sockops")
int mp_sockops(struct bpf_sock_ops *ctx)
{
	if (ctx->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct origin *o = bpf_map_lookup_elem(&origin_by_cookie, &cookie);
	if (!o)
		return 1;
	struct origin val = *o;
	__u32 ip6[4];
	ip6[0] = ctx->local_ip6[0];
	ip6[1] = ctx->local_ip6[1];
	ip6[2] = ctx->local_ip6[2];
	ip6[3] = ctx->local_ip6[3];
	struct addr_key key = {};
	make_key(&key, ctx->family, ctx->local_ip4, ip6, (__u16)ctx->local_port);
	bpf_map_update_elem(&origin_by_addr, &key, &val, BPF_ANY);
	/* The cookie record stays (LRU) for getpeername. */
	return 1;
}

SEC("cgroup/getsockopt")
int mp_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	struct config *cfg = get_config();
	if (!cfg || sk->src_port != cfg->outbound_port)
		return 1;
	__u32 ip6[4];
	ip6[0] = sk->dst_ip6[0];
	ip6[1] = sk->dst_ip6[1];
	ip6[2] = sk->dst_ip6[2];
	ip6[3] = sk->dst_ip6[3];
	struct addr_key key = {};
	make_key(&key, sk->family, sk->dst_ip4, ip6, bpf_ntohs(sk->dst_port));
	struct origin *o = bpf_map_lookup_elem(&origin_by_addr, &key);
	if (!o)
		return 1;
	if (ctx->level == SOL_IP) {
		if (o->family != AF_INET)
			return 1;
		__u8 *p = ctx->optval;
		if (p + 16 > (__u8 *)ctx->optval_end)
			return 1;
		/* struct sockaddr_in */
		*(__u16 *)(p + 0) = AF_INET;
		*(__u16 *)(p + 2) = o->port;
		*(__u32 *)(p + 4) = o->ip[0];
		*(__u32 *)(p + 8) = 0;
		*(__u32 *)(p + 12) = 0;
		ctx->optlen = 16;
	} else {
		__u8 *p = ctx->optval;
		if (p + 28 > (__u8 *)ctx->optval_end)
			return 1;
		/* struct sockaddr_in6 */
		*(__u16 *)(p + 0) = AF_INET6;
		*(__u16 *)(p + 2) = o->port;
		*(__u32 *)(p + 4) = 0; /* flowinfo */
		if (o->family == AF_INET) {
			*(__u32 *)(p + 8) = 0;
			*(__u32 *)(p + 12) = 0;
			*(__u32 *)(p + 16) = bpf_htonl(0x0000ffff);
			*(__u32 *)(p + 20) = o->ip[0];
		} else {
			*(__u32 *)(p + 8) = o->ip[0];
			*(__u32 *)(p + 12) = o->ip[1];
			*(__u32 *)(p + 16) = o->ip[2];
			*(__u32 *)(p + 20) = o->ip[3];
		}
		*(__u32 *)(p + 24) = 0; /* scope id */
		ctx->optlen = 28;
	}
	ctx->retval = 0;
	return 1;
}

SEC("cgroup/getpeername4")
int mp_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct origin *o = bpf_map_lookup_elem(&origin_by_cookie, &cookie);
	if (!o || o->family != AF_INET)
		return 1;
	ctx->user_ip4 = o->ip[0];
	ctx->user_port = o->port;
	return 1;
}

SEC("cgroup/getpeername6")
int mp_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct origin *o = bpf_map_lookup_elem(&origin_by_cookie, &cookie);
	if (!o)
		return 1;
	if (o->family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = o->ip[0];
	} else {
		ctx->user_ip6[0] = o->ip[0];
		ctx->user_ip6[1] = o->ip[1];
		ctx->user_ip6[2] = o->ip[2];
		ctx->user_ip6[3] = o->ip[3];
	}
	ctx->user_port = o->port;
	return 1;
}
