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

#define AF_INET 2
#define AF_INET6 10

// One end of a connection as seen from that end: its own address and port first. IPv4
// addresses (and IPv4-mapped IPv6 ones, so a dual-stack listener's socket meets its IPv4
// peer) use the first word of each address with `family` 4; IPv6 ones all four, family 6.
// Ports in host byte order.
struct key {
    __u32 family;
    __u32 local_ip[4];
    __u32 remote_ip[4];
    __u32 local_port;
    __u32 remote_port;
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

// `remote_port` is the network-order port in the upper 16 bits of a host-order word (the
// kernel loads the 16-bit field and shifts it), in sock_ops and sk_msg alike.
static __always_inline __u32 remote_port(__u32 raw)
{
    return __builtin_bswap32(raw) & 0xffff;
}

SEC("sockops")
int hypha_sockops(struct bpf_sock_ops *ops)
{
    if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
        ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    struct key k = {};
    if (ops->family == AF_INET) {
        k.family = 4;
        k.local_ip[0] = ops->local_ip4;
        k.remote_ip[0] = ops->remote_ip4;
    } else if (ops->family == AF_INET6) {
        __u32 local[4] = {ops->local_ip6[0], ops->local_ip6[1], ops->local_ip6[2], ops->local_ip6[3]};
        __u32 remote[4] = {ops->remote_ip6[0], ops->remote_ip6[1], ops->remote_ip6[2],
                           ops->remote_ip6[3]};
        if (is_v4_mapped(local) && is_v4_mapped(remote)) {
            k.family = 4;
            k.local_ip[0] = local[3];
            k.remote_ip[0] = remote[3];
        } else {
            k.family = 6;
            for (int i = 0; i < 4; i++) {
                k.local_ip[i] = local[i];
                k.remote_ip[i] = remote[i];
            }
        }
    } else {
        return 1;
    }
    k.local_port = ops->local_port;
    k.remote_port = remote_port(ops->remote_port);
    if (bpf_sock_hash_update(ops, &hypha_socks, &k, BPF_ANY) == 0)
        count(SOCKETS_RECORDED, 1);
    else
        count(SOCKETS_REFUSED, 1);
    return 1;
}

SEC("sk_msg")
int hypha_sk_msg(struct sk_msg_md *msg)
{
    // The key of the other end: its local address is our remote one.
    struct key peer = {};
    if (msg->family == AF_INET) {
        peer.family = 4;
        peer.local_ip[0] = msg->remote_ip4;
        peer.remote_ip[0] = msg->local_ip4;
    } else if (msg->family == AF_INET6) {
        __u32 local[4] = {msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2], msg->local_ip6[3]};
        __u32 remote[4] = {msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2],
                           msg->remote_ip6[3]};
        if (is_v4_mapped(local) && is_v4_mapped(remote)) {
            peer.family = 4;
            peer.local_ip[0] = remote[3];
            peer.remote_ip[0] = local[3];
        } else {
            peer.family = 6;
            for (int i = 0; i < 4; i++) {
                peer.local_ip[i] = remote[i];
                peer.remote_ip[i] = local[i];
            }
        }
    } else {
        return SK_PASS;
    }
    peer.local_port = remote_port(msg->remote_port);
    peer.remote_port = msg->local_port;
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
