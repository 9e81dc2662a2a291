//! Downstream limits: how long a client may take over a request head (and idle between
//! requests), and how many connections the proxy serves, in all and from one source address.
//! Counted without locks: one atomic per connection and a fixed table of per-source counts.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What the proxy allows its clients (apps and peer sidecars) on every listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client must send a whole HTTP/1.1 request head within this, counted from when the
    /// connection opens or the previous response ends (so it is the keep-alive idle timeout
    /// too), and the first bytes on every listener. hyper's default (Envoy has none; its
    /// overload manager stands in).
    pub header_read_timeout: Duration,
    /// Connections served at once, every listener together.
    pub max_connections: usize,
    /// Connections served at once from one source address (IPv6 by its /64).
    pub max_connections_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            max_connections_per_source: 8_192,
        }
    }
}

/// Per-source counts: sources hash into this many slots; two sharing a slot share a limit.
const SLOTS: usize = 4096;

/// The connections served now, in all and by source slot.
pub(crate) struct Admission {
    pub(crate) limits: Limits,
    open: AtomicUsize,
    by_source: Box<[AtomicUsize]>,
    refused: AtomicUsize,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            open: AtomicUsize::new(0),
            by_source: (0..SLOTS).map(|_| AtomicUsize::new(0)).collect(),
            refused: AtomicUsize::new(0),
        }
    }

    /// Whether one more connection from `ip` is served; refusals are counted.
    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        let ok = self.open.load(Ordering::Relaxed) < self.limits.max_connections
            && self.by_source[slot(ip)].load(Ordering::Relaxed)
                < self.limits.max_connections_per_source;
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    pub(crate) fn opened(&self, ip: IpAddr) -> usize {
        let s = slot(ip);
        self.open.fetch_add(1, Ordering::AcqRel);
        self.by_source[s].fetch_add(1, Ordering::AcqRel);
        s
    }

    pub(crate) fn closed(&self, slot: usize) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.by_source[slot].fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections refused so far (`hypha_downstream_refused_total`).
    pub(crate) fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The slot of a source: an IPv4 address, or an IPv6 address's /64 (one host's share).
fn slot(ip: IpAddr) -> usize {
    let key = match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64 ^ 0x9e37_79b9_7f4a_7c15,
    };
    // splitmix64's finalizer spreads neighbouring addresses over the slots.
    let mut x = key;
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x as usize) % SLOTS
}
