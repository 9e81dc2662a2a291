//! Downstream limits: how long a client may take over a request head (and idle between
//! requests), how many connections the proxy serves, in all and from one source address, and
//! how long a proxied TCP connection may sit idle ([`splice`]). Counted without locks: one
//! atomic per connection and a fixed table of per-source counts.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::model::now_nanos;

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
    /// A proxied TCP connection with no bytes either way for this long is closed (Envoy's
    /// `tcp_proxy` `idle_timeout`, one hour by default).
    pub tcp_idle_timeout: Duration,
    /// An HTTP/2 connection with no request in flight for this long is closed (Envoy's HTTP
    /// connection manager `idle_timeout`, one hour by default). HTTP/1.1 connections wait
    /// for their next request at most the header read timeout.
    pub http_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 65_536,
            max_connections_per_source: 8_192,
            tcp_idle_timeout: Duration::from_secs(3600),
            http_idle_timeout: Duration::from_secs(3600),
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
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            open: AtomicUsize::new(0),
            by_source: (0..SLOTS).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Whether one more connection from `ip` is served.
    pub(crate) fn admits(&self, ip: IpAddr) -> bool {
        self.open.load(Ordering::Relaxed) < self.limits.max_connections
            && self.by_source[slot(ip)].load(Ordering::Relaxed)
                < self.limits.max_connections_per_source
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

/// Copies both ways between `a` and `b` until both ends close, or until no byte has moved
/// either way for `idle`: `copy_bidirectional` with Envoy's TCP idle timeout. Returns the
/// bytes from `a` to `b` and back.
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let last = AtomicU64::new(now_nanos());
    let mut a = Active { io: a, last: &last };
    let mut b = Active { io: b, last: &last };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut a, &mut b) => copied,
        () = quiet_for(&last, idle) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "TCP idle timeout",
        )),
    }
}

/// Resolves once `last` (nanoseconds, see [`now_nanos`]) is `idle` in the past.
async fn quiet_for(last: &AtomicU64, idle: Duration) {
    let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
    loop {
        let since = now_nanos().saturating_sub(last.load(Ordering::Relaxed));
        if since >= idle {
            return;
        }
        tokio::time::sleep(Duration::from_nanos(idle - since)).await;
    }
}

/// A stream that notes when bytes last moved through it.
struct Active<'a, S: ?Sized> {
    io: &'a mut S,
    last: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Active<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.store(now_nanos(), Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Active<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.last.store(now_nanos(), Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}
