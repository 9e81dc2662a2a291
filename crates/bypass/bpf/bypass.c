// SPDX-License-Identifier: GPL-2.0
//
// Hypha's same-host socket bypass: `sockops` records both ends of every TCP connection that
// becomes established in the cgroup, keyed by its addresses and ports, in a SOCKHASH;
// `sk_msg` (attached to that SOCKHASH) hands each message sent on a recorded socket straight
// to the receive queue of the connection's other end when that end is recorded too. Bytes
// then skip the TCP/IP stack (and loopback) entirely. A message whose peer is not in the map
// takes the normal path: the program always returns SK_PASS.
//
// Helpers are declared here by number (linux/bpf.h's enum) rather than through libbpf's
// headers, so the build needs only clang and the kernel's UAPI headers.

#include <linux/bpf.h>
#include <linux/types.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_sock_hash_update)(struct bpf_sock_ops *skops, void *map, void *key,
                                    __u64 flags) = (void *)BPF_FUNC_sock_hash_update;
static long (*bpf_msg_redirect_hash)(struct sk_msg_md *msg, void *map, void *key,
                                     __u64 flags) = (void *)BPF_FUNC_msg_redirect_hash;
static __u64 (*bpf_get_netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
                                   __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_delete_elem;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static __u64 (*bpf_get_current_uid_gid)(void) = (void *)BPF_FUNC_get_current_uid_gid;
static long (*bpf_sock_ops_cb_flags_set)(struct bpf_sock_ops *skops,
                                         int flags) = (void *)BPF_FUNC_sock_ops_cb_flags_set;

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_IP 0
#define SOL_IPV6 41
// SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST share the number.
#define SO_ORIGINAL_DST 80

// One end of a connection as seen from that end: its own address and port first. IPv4
// addresses (and IPv4-mapped IPv6 ones, so a dual-stack listener's socket meets its IPv4
// peer) use the first word of each address with `family` 4; IPv6 ones all four, family 6.
// Ports in host byte order. Loopback addresses repeat in every network namespace (two pods'
// sidecars may both talk to 127.0.0.1:8080 from the same port), so for them `netns` is the
// namespace's cookie and a socket never meets another pod's; other addresses are taken to be
// unique on the host (pod IPs are), so that two pods' sockets find each other across their
// namespaces, and `netns` is 0. No padding: the kernel hashes every byte.
struct key {
    __u64 netns;
    __u32 family;
    __u32 local_ip[4];
    __u32 remote_ip[4];
    __u32 local_port;
    __u32 remote_port;
    __u32 pad;
};

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, struct key);
    __type(value, __u32);
} hypha_socks SEC(".maps");

// Counters, per CPU, read by `hypha bypass` (see crates/bypass/src/lib.rs: Counter).
enum {
    SOCKETS_RECORDED,
    SOCKETS_REFUSED,
    MSGS_REDIRECTED,
    BYTES_REDIRECTED,
    MSGS_PASSED,
    CONNECTS_OUTBOUND,
    CONNECTS_INBOUND,
    ORIGINAL_DST_ANSWERED,
    COUNTERS,
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, COUNTERS);
    __type(key, __u32);
    __type(value, __u64);
} hypha_counters SEC(".maps");

static __always_inline void count(__u32 which, __u64 n)
{
    __u64 *c = bpf_map_lookup_elem(&hypha_counters, &which);
    if (c)
        *c += n;
}

static __always_inline int is_v4_mapped(const __u32 ip[4])
{
    // ::ffff:a.b.c.d; the words are in network byte order.
    return ip[0] == 0 && ip[1] == 0 && ip[2] == __builtin_bswap32(0x0000ffff);
}

static __always_inline int is_loopback(const struct key *k)
{
    if (k->family == 4)
        return (k->local_ip[0] & 0xff) == 127; // 127.0.0.0/8, network byte order
    return k->local_ip[0] == 0 && k->local_ip[1] == 0 && k->local_ip[2] == 0 &&
           k->local_ip[3] == __builtin_bswap32(1);
}

// `remote_port` is the network-order port in the upper 16 bits of a host-order word (the
// kernel loads the 16-bit field and shifts it), in sock_ops and sk_msg alike.
static __always_inline __u32 remote_port(__u32 raw)
{
    return __builtin_bswap32(raw) & 0xffff;
}

// Fills `k` with one end's view of a connection (`ctx`: the program's context, for the
// namespace cookie): `local` and `remote` are its own and its
// peer's addresses as the context gives them (IPv4 in `l4`/`r4`, IPv6 in `l6`/`r6`).
// Returns 0, or -1 for a family that is neither.
static __always_inline int make_key(void *ctx, struct key *k, __u32 family, __u32 l4, __u32 r4,
                                    const __u32 l6[4], const __u32 r6[4], __u32 local_port,
                                    __u32 remote_port)
{
    if (family == AF_INET) {
        k->family = 4;
        k->local_ip[0] = l4;
        k->remote_ip[0] = r4;
    } else if (family == AF_INET6) {
        if (is_v4_mapped(l6) && is_v4_mapped(r6)) {
            k->family = 4;
            k->local_ip[0] = l6[3];
            k->remote_ip[0] = r6[3];
        } else {
            k->family = 6;
            for (int i = 0; i < 4; i++) {
                k->local_ip[i] = l6[i];
                k->remote_ip[i] = r6[i];
            }
        }
    } else {
        return -1;
    }
    k->local_port = local_port;
    k->remote_port = remote_port;
    if (is_loopback(k))
        k->netns = bpf_get_netns_cookie(ctx);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Transparent capture without NAT (Merbridge's way), for pods registered in `hypha_pods`.
//
// iptables REDIRECT rewrites a captured connection's destination in the packets, so the app's
// socket (to VIP:8080) and the sidecar's (at 127.0.0.1:15001) name different four-tuples and
// never meet in the socket map; pairing them by "the peer's address only" could cross two
// connections when conntrack remaps a port. Instead `connect4`/`connect6` rewrite the
// destination before the kernel connects: an app's connection goes to its sidecar's outbound
// port on loopback, a sidecar's connection to another registered pod goes to that pod's
// inbound port. Both ends then have matching four-tuples (the bypass pairs them), and there is
// no NAT to undo. The original destination is kept by socket cookie until the connection is
// established (`sockops`), then by the connecting end's address and port, where the
// accepting sidecar's `getsockopt(SO_ORIGINAL_DST)` (or IP6T_SO_ORIGINAL_DST) finds it: the
// `cgroup/getsockopt` program answers it. Connections it does not rewrite keep the iptables
// path (still installed in the pod), so a rule this misses is not a connection lost.
//
// Established, a connection is named by its whole four-tuple as the connecting end sees it
// (the accepting end sees the same one reversed): the connecting end's address and port alone
// would not do, since the kernel lets connections to different destinations share a local
// port, and two sidecars asking at once would get one answer. The original destination is
// forgotten when the connecting socket reaches CLOSE (a failed connect included), which it
// does only after the accepting side's FIN or a reset, so never before that side has asked.

// A registered pod (key: its network namespace's cookie). Ports in host byte order.
// A destination range an app reaches directly: family 4 (the address in ip[0]) or 6 (0: an
// unused slot), the address in network byte order.
struct cidr {
    __u32 family;
    __u32 prefix;
    __u32 ip[4];
};

struct pod {
    __u16 outbound_port;      // the sidecar's capture-outbound port (15001)
    __u16 inbound_port;       // its capture-inbound port (15006)
    __u32 sidecar_gid;        // the sidecar's group: its own connections are not outbound
    __u16 exclude_outbound[8]; // destination ports an app reaches directly (0: unused)
    __u16 exclude_inbound[8];  // ports of this pod reached directly
    struct cidr exclude_cidrs[8]; // destination ranges an app reaches directly
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u64);
    __type(value, struct pod);
} hypha_pods SEC(".maps");

// An address: family 4 (the address in ip[0]) or 6; network byte order.
struct addr {
    __u32 family;
    __u32 ip[4];
};

// Every registered pod's addresses → its namespace's cookie.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, struct addr);
    __type(value, __u64);
} hypha_pod_addrs SEC(".maps");

// A connection's original destination; `port` in network byte order.
struct orig {
    struct addr addr;
    __u32 port;
};

// Socket cookie → original destination, from connect until established.
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct orig);
} hypha_connecting SEC(".maps");

// An established rewritten connection as its connecting end sees it (a `struct key`) →
// original destination, for the accepting sidecar.
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct key);
    __type(value, struct orig);
} hypha_original_dst SEC(".maps");

static __always_inline int addr_is_loopback(const struct addr *a)
{
    if (a->family == 4)
        return (a->ip[0] & 0xff) == 127;
    return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == 0 && a->ip[3] == __builtin_bswap32(1);
}

static __always_inline int excluded(const __u16 ports[8], __u16 port)
{
    for (int i = 0; i < 8; i++)
        if (ports[i] && ports[i] == port)
            return 1;
    return 0;
}

// Whether `a` is in one of the ranges (IPv4-mapped IPv6 destinations arrive as family 4).
static __always_inline int in_cidrs(const struct cidr c[8], const struct addr *a)
{
    for (int i = 0; i < 8; i++) {
        if (c[i].family != a->family)
            continue;
        __u32 differ = 0;
        for (int w = 0; w < 4; w++) {
            int bits = (int)c[i].prefix - 32 * w;
            __u32 mask = bits <= 0    ? 0
                         : bits >= 32 ? 0xffffffffu
                                      : __builtin_bswap32(0xffffffffu << (32 - bits));
            differ |= (a->ip[w] ^ c[i].ip[w]) & mask;
        }
        if (!differ)
            return 1;
    }
    return 0;
}

// Where a connection from this namespace to `dst`:`port` (host order) should go instead: 0
// and `*to_port` set (host order; `*to_loopback` for the app's own sidecar), or -1 to leave it.
static __always_inline int rewrite(void *ctx, const struct addr *dst, __u16 port, __u16 *to_port,
                                   int *to_loopback)
{
    __u64 ns = bpf_get_netns_cookie(ctx);
    struct pod *me = bpf_map_lookup_elem(&hypha_pods, &ns);
    if (!me)
        return -1;
    __u32 gid = bpf_get_current_uid_gid() >> 32;
    __u64 *owner = bpf_map_lookup_elem(&hypha_pod_addrs, dst);
    if (gid != me->sidecar_gid) {
        // The app: everything but loopback, its own pod's addresses, excluded ports and
        // excluded ranges goes to its sidecar, as the OUTPUT rules do.
        if (addr_is_loopback(dst) || (owner && *owner == ns) ||
            excluded(me->exclude_outbound, port) || in_cidrs(me->exclude_cidrs, dst))
            return -1;
        *to_port = me->outbound_port;
        *to_loopback = 1;
        return 0;
    }
    // The sidecar: to another registered pod, that pod's inbound port (as its PREROUTING
    // rules would do), unless the port is excluded there or already the inbound port.
    if (!owner || *owner == ns)
        return -1;
    struct pod *peer = bpf_map_lookup_elem(&hypha_pods, owner);
    if (!peer || port == peer->inbound_port || excluded(peer->exclude_inbound, port))
        return -1;
    *to_port = peer->inbound_port;
    *to_loopback = 0;
    return 0;
}

static __always_inline void remember(void *ctx, const struct addr *dst, __u32 port_be,
                                     int to_loopback)
{
    struct orig o = {.addr = *dst, .port = port_be};
    __u64 cookie = bpf_get_socket_cookie(ctx);
    if (bpf_map_update_elem(&hypha_connecting, &cookie, &o, BPF_ANY) == 0)
        count(to_loopback ? CONNECTS_OUTBOUND : CONNECTS_INBOUND, 1);
}

// `rewrite`, and when it rewrites, the original destination kept by the socket's cookie.
static __always_inline int capture(void *ctx, const struct addr *dst, __u32 port_be,
                                   __u16 *to_port, int *to_loopback)
{
    if (rewrite(ctx, dst, __builtin_bswap16(port_be), to_port, to_loopback))
        return -1;
    remember(ctx, dst, port_be, *to_loopback);
    return 0;
}

SEC("cgroup/connect4")
int hypha_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM)
        return 1;
    struct addr dst = {.family = 4, .ip = {ctx->user_ip4}};
    __u16 to_port;
    int to_loopback;
    if (capture(ctx, &dst, ctx->user_port, &to_port, &to_loopback))
        return 1;
    if (to_loopback)
        ctx->user_ip4 = __builtin_bswap32(0x7f000001);
    ctx->user_port = __builtin_bswap16(to_port);
    return 1;
}

SEC("cgroup/connect6")
int hypha_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM)
        return 1;
    __u32 ip6[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    int mapped = is_v4_mapped(ip6);
    struct addr dst = {.family = mapped ? 4 : 6};
    if (mapped) {
        dst.ip[0] = ip6[3];
    } else {
        for (int i = 0; i < 4; i++)
            dst.ip[i] = ip6[i];
    }
    __u16 to_port;
    int to_loopback;
    if (capture(ctx, &dst, ctx->user_port, &to_port, &to_loopback))
        return 1;
    if (to_loopback) {
        // ::1, or ::ffff:127.0.0.1 for an IPv4 destination on an IPv6 socket.
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = mapped ? __builtin_bswap32(0x0000ffff) : 0;
        ctx->user_ip6[3] = __builtin_bswap32(mapped ? 0x7f000001 : 1);
    }
    ctx->user_port = __builtin_bswap16(to_port);
    return 1;
}

// The accepting sidecar asks for a connection's original destination: answered from
// `hypha_original_dst` when the connection was rewritten at connect, else the kernel's answer
// (conntrack, for iptables-captured connections) stands.
SEC("cgroup/getsockopt")
int hypha_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    // The connection as the connecting end sees it: our peer's address and port first.
    __u32 l6[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
    __u32 r6[4] = {sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]};
    struct key peer = {};
    if (make_key(ctx, &peer, sk->family, sk->dst_ip4, sk->src_ip4, r6, l6,
                 __builtin_bswap16(sk->dst_port), sk->src_port))
        return 1;
    struct orig *o = bpf_map_lookup_elem(&hypha_original_dst, &peer);
    if (!o)
        return 1;
    __u8 *out = ctx->optval;
    if (ctx->level == SOL_IP) {
        // struct sockaddr_in
        if (o->addr.family != 4 || out + 16 > (__u8 *)ctx->optval_end)
            return 1;
        __u16 *w = (__u16 *)out;
        w[0] = AF_INET;
        w[1] = o->port;
        __u32 *ip = (__u32 *)(out + 4);
        ip[0] = o->addr.ip[0];
        ip[1] = 0;
        ip[2] = 0;
        ctx->optlen = 16;
    } else {
        // struct sockaddr_in6
        if (o->addr.family != 6 || out + 28 > (__u8 *)ctx->optval_end)
            return 1;
        __u16 *w = (__u16 *)out;
        w[0] = AF_INET6;
        w[1] = o->port;
        __u32 *v = (__u32 *)(out + 4);
        v[0] = 0; // flow info
        for (int i = 0; i < 4; i++)
            v[1 + i] = o->addr.ip[i];
        v[5] = 0; // scope
        ctx->optlen = 28;
    }
    ctx->retval = 0;
    count(ORIGINAL_DST_ANSWERED, 1);
    return 1;
}

// The connection as this end of it sees it.
static __always_inline int own_key(struct bpf_sock_ops *ops, struct key *k)
{
    // Context fields are read one by one (the verifier allows no pointer into the context).
    __u32 l6[4] = {ops->local_ip6[0], ops->local_ip6[1], ops->local_ip6[2], ops->local_ip6[3]};
    __u32 r6[4] = {ops->remote_ip6[0], ops->remote_ip6[1], ops->remote_ip6[2], ops->remote_ip6[3]};
    return make_key(ops, k, ops->family, ops->local_ip4, ops->remote_ip4, l6, r6, ops->local_port,
                    remote_port(ops->remote_port));
}

// At TCP_CONNECT (the SYN about to leave): a connection rewritten at connect asks for state
// changes, so that its original destination is forgotten when it closes.
static __always_inline void connecting(struct bpf_sock_ops *ops)
{
    __u64 cookie = bpf_get_socket_cookie(ops);
    if (bpf_map_lookup_elem(&hypha_connecting, &cookie))
        bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

// At ACTIVE_ESTABLISHED: a connection rewritten at connect moves its original destination
// from the socket cookie to the connection (`k`: as this, the connecting, end sees it).
static __always_inline void established(struct bpf_sock_ops *ops, const struct key *k)
{
    __u64 cookie = bpf_get_socket_cookie(ops);
    struct orig *o = bpf_map_lookup_elem(&hypha_connecting, &cookie);
    if (!o)
        return;
    bpf_map_update_elem(&hypha_original_dst, k, o, BPF_ANY);
    bpf_map_delete_elem(&hypha_connecting, &cookie);
}

// At CLOSE of a connection rewritten at connect: whatever is kept for it goes.
static __always_inline void closed(struct bpf_sock_ops *ops)
{
    __u64 cookie = bpf_get_socket_cookie(ops);
    bpf_map_delete_elem(&hypha_connecting, &cookie);
    struct key k = {};
    if (own_key(ops, &k) == 0)
        bpf_map_delete_elem(&hypha_original_dst, &k);
}

SEC("sockops")
int hypha_sockops(struct bpf_sock_ops *ops)
{
    switch (ops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        connecting(ops);
        return 1;
    case BPF_SOCK_OPS_STATE_CB:
        // args: the old state, the new one.
        if (ops->args[1] == BPF_TCP_CLOSE)
            closed(ops);
        return 1;
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        break;
    default:
        return 1;
    }
    struct key k = {};
    if (own_key(ops, &k))
        return 1;
    if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        established(ops, &k);
    if (bpf_sock_hash_update(ops, &hypha_socks, &k, BPF_ANY) == 0)
        count(SOCKETS_RECORDED, 1);
    else
        count(SOCKETS_REFUSED, 1);
    return 1;
}

SEC("sk_msg")
int hypha_sk_msg(struct sk_msg_md *msg)
{
    __u32 l6[4] = {msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2], msg->local_ip6[3]};
    __u32 r6[4] = {msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2], msg->remote_ip6[3]};
    // The key of the other end: its local address and port are our remote ones.
    struct key peer = {};
    if (make_key(msg, &peer, msg->family, msg->remote_ip4, msg->local_ip4, r6, l6,
                 remote_port(msg->remote_port), msg->local_port))
        return SK_PASS;
    __u64 len = msg->size;
    if (bpf_msg_redirect_hash(msg, &hypha_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
        count(MSGS_REDIRECTED, 1);
        count(BYTES_REDIRECTED, len);
    } else {
        count(MSGS_PASSED, 1);
    }
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
