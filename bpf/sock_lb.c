/*
 * clustermesh socket-level load balancer (IPv4), cgroup v2 sock_addr hooks.
 *
 * The destination of a socket is rewritten once, when the application calls
 * connect() (TCP, connected UDP) or sendmsg() (unconnected UDP): no per-packet
 * NAT and no conntrack. getpeername() and recvmsg() translate the backend
 * address back to the ClusterIP so the application never sees the rewrite.
 *
 * cm_release4 (cgroup sock_release) forgets the reverse entry of a closed socket.
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
BPF_TABLE_PINNED("lru_hash", struct cm_rev4_key, struct cm_rev4_val, cm_rev4, CM_REV4_MAX,
		 CM_PIN_DIR "/cm_rev4");

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

/*
 * Forward translation for connect4 and sendmsg4.
 * Returns 1 to let the call proceed (rewritten or not ours), 0 to refuse it.
 */
static __always_inline int cm_lb4_forward(struct bpf_sock_addr *ctx)
{
	struct cm_svc4_key key = {};
	struct cm_rev4_key rkey = {};
	struct cm_rev4_val rval = {};
	struct cm_svc_val *svc, *slot;
	struct cm_backend4 *be;
	__u32 backend_id, n;

	key.addr = ctx->user_ip4;
	key.port = cm_ctx_port(ctx);
	key.proto = (__u8)ctx->protocol;
	key.slot = CM_SLOT_MASTER;

	svc = cm_svc4.lookup(&key);
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
	key.slot = (bpf_get_prandom_u32() % n) + 1;

	slot = cm_svc4.lookup(&key);
	/* The agent writes slots and backends before it raises a count, so a miss
	 * here means the maps are being torn down by hand: behave as if the
	 * service were not ours rather than failing the application. */
	if (!slot)
		return 1;
	backend_id = slot->backend_id;
	be = cm_backend4.lookup(&backend_id);
	if (!be)
		return 1;

	rkey.cookie = cm_socket_cookie(ctx);
	rkey.addr = be->addr;
	rkey.port = be->port;
	rval.addr = key.addr;
	rval.port = key.port;
	cm_rev4.update(&rkey, &rval);

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

int cm_connect4(struct bpf_sock_addr *ctx)
{
	return cm_lb4_forward(ctx);
}

int cm_sendmsg4(struct bpf_sock_addr *ctx)
{
	return cm_lb4_forward(ctx);
}

int cm_recvmsg4(struct bpf_sock_addr *ctx)
{
	return cm_lb4_reverse(ctx);
}

int cm_getpeername4(struct bpf_sock_addr *ctx)
{
	return cm_lb4_reverse(ctx);
}

#define CM_AF_INET 2

/*
 * cgroup/sock_release: drop the reverse entry of a connected socket when the
 * application closes it. Without this, entries of closed sockets only leave
 * cm_rev4 by LRU eviction: under connection churn every connect() would pay
 * for an eviction, and a long-lived connected UDP socket could lose its entry
 * (its replies would then show the backend address). Entries of unconnected
 * UDP sockets (one per backend they talked to) still age out by LRU.
 */
int cm_release4(struct bpf_sock *sk)
{
	struct cm_rev4_key rkey = {};

	if (sk->family != CM_AF_INET)
		return 1;
	rkey.cookie = cm_socket_cookie(sk);
	rkey.addr = sk->dst_ip4;
	rkey.port = sk->dst_port;
	cm_rev4.delete(&rkey);
	return 1;
}
