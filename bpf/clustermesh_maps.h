/*
 * Layout of the clustermesh socket-LB maps: the contract between the BPF
 * programs (bpf/sock_lb.c) and the agent, which writes the maps from Python.
 *
 * clustermesh/datapath/layout.py mirrors every struct here with ctypes, and
 * tests/unit/test_datapath_layout.py compiles this header with gcc and checks
 * that sizes and field offsets agree. Change both sides together.
 *
 * Only UAPI types are used, so the same file compiles inside bcc (BPF target,
 * kernel headers) and with a plain userspace gcc (linux-libc-dev headers).
 * Every struct is free of implicit padding: explicit pad fields are zeroed by
 * both writers, so hash keys compare equal byte for byte.
 */
#ifndef CLUSTERMESH_MAPS_H
#define CLUSTERMESH_MAPS_H

#include <linux/types.h>

/* Slot 0 of a service is its master entry; slots 1..count name backends. */
#define CM_SLOT_MASTER 0

/*
 * Master flags. The BPF side does not read them: affinity is already encoded
 * by the agent in the slot order and the preferred count. They are kept for
 * `clustermesh datapath dump` and for whoever debugs a node with bpftool.
 */
#define CM_SVC_F_AFFINITY_LOCAL (1U << 0)
#define CM_SVC_F_AFFINITY_REMOTE (1U << 1)

/* Backend flags. */
#define CM_BE_F_LOCAL (1U << 0) /* backend runs in this node's cluster */

/* Map sizes; the loader may override them with -D. */
#ifndef CM_SVC4_MAX
#define CM_SVC4_MAX 262144
#endif
#ifndef CM_BACKEND4_MAX
#define CM_BACKEND4_MAX 131072
#endif
#ifndef CM_REV4_MAX
#define CM_REV4_MAX 131072
#endif
#ifndef CM_SVC6_MAX
#define CM_SVC6_MAX 262144
#endif
#ifndef CM_BACKEND6_MAX
#define CM_BACKEND6_MAX 131072
#endif
#ifndef CM_REV6_MAX
#define CM_REV6_MAX 131072
#endif

/* cm_svc4 key: one entry per (ClusterIP, port, protocol, slot). */
struct cm_svc4_key {
	__be32 addr;  /* ClusterIP */
	__be16 port;  /* service port */
	__u16 slot;   /* CM_SLOT_MASTER or 1..count */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
};

/* IPv6 twin of cm_svc4_key: the cm_svc6 map. */
struct cm_svc6_key {
	__u8 addr[16];
	__be16 port;
	__u16 slot;
	__u8 proto;
	__u8 pad[3];
};

/*
 * cm_svc4 / cm_svc6 value. A master entry uses count, preferred and flags
 * (backend_id is 0); a slot entry uses only backend_id.
 * The programs pick a random slot in 1..preferred when preferred > 0, else in
 * 1..count; count == 0 means "service known, no backend": connect is refused.
 */
struct cm_svc_val {
	__u32 backend_id;
	__u16 count;
	__u16 preferred;
	__u32 flags;   /* CM_SVC_F_* */
};

/* cm_backend4 value, keyed by a __u32 backend id (0 is never used). */
struct cm_backend4 {
	__be32 addr;
	__be16 port;
	__u8 flags;   /* CM_BE_F_* */
	__u8 pad;
	__u32 cluster_id;
};

/* IPv6 twin of cm_backend4: the cm_backend6 map (ids shared with cm_backend4). */
struct cm_backend6 {
	__u8 addr[16];
	__be16 port;
	__u8 flags;
	__u8 pad;
	__u32 cluster_id;
};

/*
 * cm_rev4 key: which service address a socket asked for when it talks to a
 * given backend. Keyed by socket cookie so getpeername()/recvmsg() translate
 * back only for sockets we rewrote. A connected socket's entry is removed when
 * it closes (cm_release4); unconnected UDP sockets leave one per backend, for
 * the LRU.
 */
struct cm_rev4_key {
	__u64 cookie;
	__be32 addr;  /* backend address */
	__be16 port;  /* backend port */
	__u16 pad;
};

struct cm_rev4_val {
	__be32 addr;  /* ClusterIP the application asked for */
	__be16 port;
	__u16 pad;
};

/* IPv6 twins of the reverse map: cm_rev6. */
struct cm_rev6_key {
	__u64 cookie;
	__u8 addr[16];
	__be16 port;
	__u16 pad[3];
};

struct cm_rev6_val {
	__u8 addr[16];
	__be16 port;
	__u16 pad;
};

#endif /* CLUSTERMESH_MAPS_H */
