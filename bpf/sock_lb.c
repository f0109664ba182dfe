/*
 * clustermesh socket-level load balancer (IPv4 and IPv6), cgroup v2 sock_addr hooks.
 *
 * The destination of a socket is rewritten once, when the application calls
 * connect() (TCP, connected UDP) or sendmsg() (unconnected UDP): no per-packet
 * NAT and no conntrack. getpeername() and recvmsg() translate the backend
 * address back to the ClusterIP so the application never sees the rewrite.
 *
 * cm_rev4 remembers, per (socket cookie, backend), which ClusterIP the socket
 * asked for. It is an LRU hash with one LRU list per CPU (BPF_F_NO_COMMON_LRU):
 * a connect() takes an element from its own CPU's list and close() gives it
 * back there (cm_release4), so no connect() waits on a list shared by all CPUs
 * or pays for a global eviction (bpf/README.md: the figures of
 * bench/churn_bench.py, and the alternatives measured). sendmsg4 looks its
 * entry up before writing it, so a steady flow of datagrams writes nothing.
 *
 * Only frontends present in cm_svc4 are touched: every other address passes
 * untouched, so kube-proxy or the cluster's CNI keeps serving all the other
 * Services.
 *
 * Built by clustermesh/datapath/loader.py with bcc; it passes
 *   -I<this dir>  -DCM_PIN_DIR="/sys/fs/bpf/clustermesh/<node>"
 * and optionally the CM_*_MAX sizes. BPF_TABLE_PINNED makes bcc reuse a map
 * already pinned at that path, which is what keeps the maps (and so the
 * traffic) intact across an agent restart.
 */
#include <asm-generic/errno.h>

#include "clustermesh_maps.h"

#ifndef CM_PIN_DIR
#error "CM_PIN_DIR is required: the loader passes -DCM_PIN_DIR=\"/sys/fs/bpf/...\""
#endif

BPF_TABLE_PINNED("hash", struct cm_svc4_key, struct cm_svc_val, cm_svc4, CM_SVC4_MAX,
		 CM_PIN_DIR "/cm_svc4");
BPF_TABLE_PINNED("hash", __u32, struct cm_backend4, cm_backend4, CM_BACKEND4_MAX,
		 CM_PIN_DIR "/cm_backend4");
BPF_TABLE_PINNED7("lru_hash", struct cm_rev4_key, struct cm_rev4_val, cm_rev4, CM_REV4_MAX,
		  CM_PIN_DIR "/cm_rev4", BPF_F_NO_COMMON_LRU);
/* IPv6: the same three maps with 16-byte addresses. A backend id names an
 * entry of cm_backend4 or of cm_backend6, never of both. */
BPF_TABLE_PINNED("hash", struct cm_svc6_key, struct cm_svc_val, cm_svc6, CM_SVC6_MAX,
		 CM_PIN_DIR "/cm_svc6");
BPF_TABLE_PINNED("hash", __u32, struct cm_backend6, cm_backend6, CM_BACKEND6_MAX,
		 CM_PIN_DIR "/cm_backend6");
BPF_TABLE_PINNED7("lru_hash", struct cm_rev6_key, struct cm_rev6_val, cm_rev6, CM_REV6_MAX,
		  CM_PIN_DIR "/cm_rev6", BPF_F_NO_COMMON_LRU);

/*
 * bcc's helpers.h declares bpf_get_socket_cookie() as returning u32; the
 * kernel returns a u64 and cookies are only unique in 64 bits.
 */
static __u64 (*cm_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

/*
 * The errno an application sees when a global service has no backend at all.
 * ECONNREFUSED is what a client of a kube-proxy Service without endpoints gets
 * (kube-proxy REJECTs with icmp-port-unreachable), so applications keep their
 * usual "nothing is serving" handling; a bare `return 0` would surface EPERM,
 * which reads as a policy denial. Cilium refuses too (with EHOSTUNREACH).
 */
#define CM_NO_BACKEND_ERRNO ECONNREFUSED

/* user_port holds a __be16 in the low-addressed half of a 32-bit field. */
static __always_inline __be16 cm_ctx_port(struct bpf_sock_addr *ctx)
{
	return (__be16)ctx->user_port;
}

#define CM_IPPROTO_UDP 17

/*
 * The backend for the service ctx points at.
 * Returns 1 with *out set when the call is to be rewritten, 1 with *out NULL
 * when the address is not ours, 0 when the call is to be refused.
 */
static __always_inline int cm_lb4_pick(struct bpf_sock_addr *ctx, struct cm_svc4_key *key,
				       struct cm_backend4 **out)
{
	struct cm_svc_val *svc, *slot;
	__u32 backend_id, n;

	*out = NULL;
	key->addr = ctx->user_ip4;
	key->port = cm_ctx_port(ctx);
	key->proto = (__u8)ctx->protocol;
	key->slot = CM_SLOT_MASTER;

	svc = cm_svc4.lookup(key);
	if (!svc)
		return 1;

	n = svc->count;
	if (n == 0) {
		bpf_set_retval(-CM_NO_BACKEND_ERRNO);
		return 0;
	}
	/* Preferred backends sit in slots 1..preferred; when none is left the
	 * agent sets preferred to 0 and every slot is eligible: that is the
	 * failover between local and remote clusters. */
	if (svc->preferred && svc->preferred < n)
		n = svc->preferred;
	key->slot = (bpf_get_prandom_u32() % n) + 1;

	slot = cm_svc4.lookup(key);
	/* The agent writes slots and backends before it raises a count, so a miss
	 * here means the maps are being torn down by hand: behave as if the
	 * service were not ours rather than failing the application. */
	if (!slot)
		return 1;
	backend_id = slot->backend_id;
	*out = cm_backend4.lookup(&backend_id);
	return 1;
}

/* Remember what a rewritten socket asked for, for getpeername()/recvmsg(). */
static __always_inline void cm_rev4_remember(struct bpf_sock_addr *ctx, struct cm_svc4_key *key,
					     struct cm_backend4 *be, int look_first)
{
	struct cm_rev4_key rkey = {};
	struct cm_rev4_val rval = {};
	struct cm_rev4_val *have;

	rkey.cookie = cm_socket_cookie(ctx);
	rkey.addr = be->addr;
	rkey.port = be->port;
	/* Look before writing where the entry is likely there already (a
	 * socket sending datagrams); a new connected socket never has one. */
	if (look_first) {
		have = cm_rev4.lookup(&rkey);
		if (have && have->addr == key->addr && have->port == key->port)
			return;
	}
	rval.addr = key->addr;
	rval.port = key->port;
	cm_rev4.update(&rkey, &rval);
}

/* connect4: TCP and connected UDP. */
int cm_connect4(struct bpf_sock_addr *ctx)
{
	struct cm_svc4_key key = {};
	struct cm_rev4_key rkey = {};
	struct cm_backend4 *be;

	if (!cm_lb4_pick(ctx, &key, &be))
		return 0;
	if (!be) {
		/* A UDP socket may connect again, straight to a backend it first
		 * reached through a ClusterIP: its old entry would show that peer
		 * as the ClusterIP. (TCP cannot connect twice.) */
		if (ctx->protocol == CM_IPPROTO_UDP) {
			rkey.cookie = cm_socket_cookie(ctx);
			rkey.addr = ctx->user_ip4;
			rkey.port = cm_ctx_port(ctx);
			cm_rev4.delete(&rkey);
		}
		return 1;
	}
	cm_rev4_remember(ctx, &key, be, 0);
	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	return 1;
}

/* sendmsg4: unconnected UDP, per datagram. */
int cm_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct cm_svc4_key key = {};
	struct cm_backend4 *be;

	if (!cm_lb4_pick(ctx, &key, &be))
		return 0;
	if (!be)
		return 1;
	cm_rev4_remember(ctx, &key, be, 1);
	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	return 1;
}

/* Reverse translation for getpeername4 and recvmsg4: these hooks must
 * always return 1. */
static __always_inline int cm_lb4_reverse(struct bpf_sock_addr *ctx)
{
	struct cm_rev4_key rkey = {};
	struct cm_rev4_val *orig;

	rkey.cookie = cm_socket_cookie(ctx);
	rkey.addr = ctx->user_ip4;
	rkey.port = cm_ctx_port(ctx);

	orig = cm_rev4.lookup(&rkey);
	if (orig) {
		ctx->user_ip4 = orig->addr;
		ctx->user_port = (__u32)orig->port;
	}
	return 1;
}

int cm_recvmsg4(struct bpf_sock_addr *ctx)
{
	return cm_lb4_reverse(ctx);
}

int cm_getpeername4(struct bpf_sock_addr *ctx)
{
	return cm_lb4_reverse(ctx);
}

/* --- IPv6 ------------------------------------------------------------------ */

/* ctx->user_ip6 is four __u32 words in network order; the map structs hold the
 * same 16 bytes as __u8[16] (2-byte aligned), hence the copies. */
static __always_inline void cm_ctx_ip6(struct bpf_sock_addr *ctx, __u8 *out)
{
	__u32 ip[4];

	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	__builtin_memcpy(out, ip, 16);
}

static __always_inline void cm_set_ctx_ip6(struct bpf_sock_addr *ctx, const __u8 *addr)
{
	__u32 ip[4];

	__builtin_memcpy(ip, addr, 16);
	ctx->user_ip6[0] = ip[0];
	ctx->user_ip6[1] = ip[1];
	ctx->user_ip6[2] = ip[2];
	ctx->user_ip6[3] = ip[3];
}

/* cm_lb4_pick for IPv6. */
static __always_inline int cm_lb6_pick(struct bpf_sock_addr *ctx, struct cm_svc6_key *key,
				       struct cm_backend6 **out)
{
	struct cm_svc_val *svc, *slot;
	__u32 backend_id, n;

	*out = NULL;
	cm_ctx_ip6(ctx, key->addr);
	key->port = cm_ctx_port(ctx);
	key->proto = (__u8)ctx->protocol;
	key->slot = CM_SLOT_MASTER;

	svc = cm_svc6.lookup(key);
	if (!svc)
		return 1;
	n = svc->count;
	if (n == 0) {
		bpf_set_retval(-CM_NO_BACKEND_ERRNO);
		return 0;
	}
	if (svc->preferred && svc->preferred < n)
		n = svc->preferred;
	key->slot = (bpf_get_prandom_u32() % n) + 1;
	slot = cm_svc6.lookup(key);
	if (!slot)
		return 1;
	backend_id = slot->backend_id;
	*out = cm_backend6.lookup(&backend_id);
	return 1;
}

/* Four word compares: clang would emit a call to memcmp(), which BPF lacks. */
static __always_inline int cm_ip6_equal(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline void cm_rev6_remember(struct bpf_sock_addr *ctx, struct cm_svc6_key *key,
					     struct cm_backend6 *be, int look_first)
{
	struct cm_rev6_key rkey = {};
	struct cm_rev6_val rval = {};
	struct cm_rev6_val *have;

	rkey.cookie = cm_socket_cookie(ctx);
	__builtin_memcpy(rkey.addr, be->addr, 16);
	rkey.port = be->port;
	if (look_first) {
		have = cm_rev6.lookup(&rkey);
		if (have && have->port == key->port && cm_ip6_equal(have->addr, key->addr))
			return;
	}
	__builtin_memcpy(rval.addr, key->addr, 16);
	rval.port = key->port;
	cm_rev6.update(&rkey, &rval);
}

int cm_connect6(struct bpf_sock_addr *ctx)
{
	struct cm_svc6_key key = {};
	struct cm_rev6_key rkey = {};
	struct cm_backend6 *be;

	if (!cm_lb6_pick(ctx, &key, &be))
		return 0;
	if (!be) {
		if (ctx->protocol == CM_IPPROTO_UDP) {
			rkey.cookie = cm_socket_cookie(ctx);
			cm_ctx_ip6(ctx, rkey.addr);
			rkey.port = cm_ctx_port(ctx);
			cm_rev6.delete(&rkey);
		}
		return 1;
	}
	cm_rev6_remember(ctx, &key, be, 0);
	cm_set_ctx_ip6(ctx, be->addr);
	ctx->user_port = (__u32)be->port;
	return 1;
}

int cm_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct cm_svc6_key key = {};
	struct cm_backend6 *be;

	if (!cm_lb6_pick(ctx, &key, &be))
		return 0;
	if (!be)
		return 1;
	cm_rev6_remember(ctx, &key, be, 1);
	cm_set_ctx_ip6(ctx, be->addr);
	ctx->user_port = (__u32)be->port;
	return 1;
}

static __always_inline int cm_lb6_reverse(struct bpf_sock_addr *ctx)
{
	struct cm_rev6_key rkey = {};
	struct cm_rev6_val *orig;

	rkey.cookie = cm_socket_cookie(ctx);
	cm_ctx_ip6(ctx, rkey.addr);
	rkey.port = cm_ctx_port(ctx);
	orig = cm_rev6.lookup(&rkey);
	if (orig) {
		cm_set_ctx_ip6(ctx, orig->addr);
		ctx->user_port = (__u32)orig->port;
	}
	return 1;
}

int cm_recvmsg6(struct bpf_sock_addr *ctx)
{
	return cm_lb6_reverse(ctx);
}

int cm_getpeername6(struct bpf_sock_addr *ctx)
{
	return cm_lb6_reverse(ctx);
}

#define CM_AF_INET 2
#define CM_AF_INET6 10

/*
 * cgroup/sock_release (both families; the name is kept so an upgraded agent
 * swaps the program in place): drop the reverse entry of a connected socket when the
 * application closes it, on the CPU that is closing it (usually the one that
 * connected it): the element goes back to that CPU's LRU list, ready for the
 * next connect() there. Without this, entries of closed sockets would only
 * leave cm_rev4 by eviction, and a long-lived connected UDP socket could lose
 * its entry (its replies would then show the backend address). Entries of
 * unconnected UDP sockets (one per backend they talked to) age out by LRU.
 */
int cm_release4(struct bpf_sock *sk)
{
	struct cm_rev4_key rkey = {};
	struct cm_rev6_key rkey6 = {};
	__u32 ip[4];

	if (sk->family == CM_AF_INET) {
		rkey.cookie = cm_socket_cookie(sk);
		rkey.addr = sk->dst_ip4;
		rkey.port = sk->dst_port;
		cm_rev4.delete(&rkey);
	} else if (sk->family == CM_AF_INET6) {
		rkey6.cookie = cm_socket_cookie(sk);
		ip[0] = sk->dst_ip6[0];
		ip[1] = sk->dst_ip6[1];
		ip[2] = sk->dst_ip6[2];
		ip[3] = sk->dst_ip6[3];
		__builtin_memcpy(rkey6.addr, ip, 16);
		rkey6.port = sk->dst_port;
		cm_rev6.delete(&rkey6);
	}
	return 1;
}
