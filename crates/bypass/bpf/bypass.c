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

#define AF_INET 2
#define AF_INET6 10

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

SEC("sockops")
int hypha_sockops(struct bpf_sock_ops *ops)
{
    if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
        ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    // Context fields are read one by one (the verifier allows no pointer into the context).
    __u32 l6[4] = {ops->local_ip6[0], ops->local_ip6[1], ops->local_ip6[2], ops->local_ip6[3]};
    __u32 r6[4] = {ops->remote_ip6[0], ops->remote_ip6[1], ops->remote_ip6[2], ops->remote_ip6[3]};
    struct key k = {};
    if (make_key(ops, &k, ops->family, ops->local_ip4, ops->remote_ip4, l6, r6, ops->local_port,
                 remote_port(ops->remote_port)))
        return 1;
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
