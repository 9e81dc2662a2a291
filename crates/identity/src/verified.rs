//! The peer chains a TLS context has verified, so that the same chain presented again is not
//! verified again.
//!
//! In a mesh a sidecar meets the same few peers over and over, each presenting the same
//! certificate chain until it rotates, and every new connection would otherwise re-check that
//! chain's signatures against the roots (a P-256 verification per certificate, plus building
//! the chain). A context remembers the chains it verified, by the SHA-256 of their
//! certificates, and accepts the same chain again at once until the first of its certificates
//! (roots included) expires. A hit skips only the chain's check: the handshake still proves
//! the peer holds the leaf's key (its CertificateVerify), and the caller still checks the
//! peer's SPIFFE ID.
//!
//! This is sound because a chain's verdict depends only on the chain, the trust store, the
//! verification parameters and the time. The store and the parameters are fixed for the
//! context's life (new roots or a rotated certificate build new contexts, with empty caches);
//! `notBefore` was past when the chain verified and stays past; `notAfter` is kept per entry.
//! Only chains that verified are remembered: a failure is always checked in full.
//!
//! The check runs in BoringSSL's certificate-verification hook, where the verification
//! context is already set up for this connection (store, chain, the TLS purpose of the side),
//! so a miss is exactly BoringSSL's own `X509_verify_cert`. A lookup loads a snapshot of the
//! map (no lock); a miss that verifies swaps in a copy with the new entry. The map is bounded:
//! when full, expired entries go and, if more than half of it is left, the longest-remembered
//! entries go until half is (a big gateway meeting more chains than fit, rotations leaving old
//! chains behind until they expire, or someone replaying recorded mesh chains keeps the newer
//! half instead of starting again empty; entries are ranked by when they were added, since a
//! hit writes nothing).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use boring::hash::MessageDigest;
use boring::ssl::{SslContextBuilder, SslContextRef};
use boring::x509::{X509StoreContextRef, X509};
use boring::{error::ErrorStack, ex_data::Index, ssl::SslContext, stack::StackRef};

/// Most chains remembered per context: far more peers than a sidecar talks to, small enough
/// that copying the map on a miss stays cheap.
const CAPACITY: usize = 1024;

/// A chain's key: SHA-256 over the SHA-256 of each certificate, the leaf first.
type ChainKey = [u8; 32];

/// A remembered chain: valid until `until`; `added` ranks it for eviction (higher is newer).
#[derive(Debug, Clone, Copy)]
struct Entry {
    until: SystemTime,
    added: u64,
}

/// How a context's cache has fared, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainCacheStats {
    /// Chains accepted from the cache without verification.
    pub hits: u64,
    /// Chains verified in full (whatever the verdict).
    pub misses: u64,
}

#[derive(Default)]
struct VerifiedChains {
    chains: ArcSwap<HashMap<ChainKey, Entry>>,
    added: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

fn stats_index() -> Result<Index<SslContext, Arc<VerifiedChains>>, ErrorStack> {
    static INDEX: OnceLock<Index<SslContext, Arc<VerifiedChains>>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = SslContext::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// Makes the context remember the peer chains it verifies (see the module docs).
pub(crate) fn install(b: &mut SslContextBuilder) -> Result<(), ErrorStack> {
    let cache = Arc::new(VerifiedChains::default());
    b.set_ex_data(stats_index()?, cache.clone());
    b.set_cert_verify_callback(move |ctx| cache.verify(ctx));
    Ok(())
}

/// The chain cache's counters of a context made by [`crate::tls`] (zero for any other).
pub fn chain_cache_stats(ctx: &SslContextRef) -> ChainCacheStats {
    match stats_index().ok().and_then(|i| ctx.ex_data(i)) {
        Some(c) => ChainCacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
        },
        None => ChainCacheStats::default(),
    }
}

impl VerifiedChains {
    /// BoringSSL's verification hook: true when the chain is good. On `false` the context's
    /// error (set by `X509_verify_cert`) says why.
    fn verify(&self, ctx: &mut X509StoreContextRef) -> bool {
        let key = chain_key(ctx).ok();
        let now = SystemTime::now();
        if let Some(key) = &key {
            if self.chains.load().get(key).is_some_and(|e| now < e.until) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                ctx.set_error(Ok(()));
                return true;
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if !ctx.verify_cert().unwrap_or(false) {
            return false;
        }
        if let (Some(key), Some(until)) = (key, ctx.chain().and_then(expiry)) {
            self.remember(key, until, now);
        }
        true
    }

    fn remember(&self, key: ChainKey, until: SystemTime, now: SystemTime) {
        let entry = Entry {
            until,
            added: self.added.fetch_add(1, Ordering::Relaxed),
        };
        self.chains.rcu(|old| {
            let mut next = if old.len() < CAPACITY {
                (**old).clone()
            } else {
                evict(old, now)
            };
            next.insert(key, entry);
            next
        });
    }
}

/// A full map's successor: the entries not expired at `now`, at most the newest half.
fn evict(full: &HashMap<ChainKey, Entry>, now: SystemTime) -> HashMap<ChainKey, Entry> {
    let mut live: Vec<(ChainKey, Entry)> = full
        .iter()
        .filter(|(_, e)| now < e.until)
        .map(|(k, e)| (*k, *e))
        .collect();
    if live.len() > CAPACITY / 2 {
        live.sort_unstable_by_key(|(_, e)| std::cmp::Reverse(e.added));
        live.truncate(CAPACITY / 2);
    }
    live.into_iter().collect()
}

/// The key of the chain being verified: its leaf and the certificates the peer sent with it.
fn chain_key(ctx: &X509StoreContextRef) -> Result<ChainKey, ErrorStack> {
    let leaf = ctx.cert().ok_or_else(ErrorStack::get)?;
    let mut h = boring::sha::Sha256::new();
    h.update(&leaf.digest(MessageDigest::sha256())?);
    for c in ctx.untrusted().into_iter().flat_map(StackRef::iter) {
        h.update(&c.digest(MessageDigest::sha256())?);
    }
    Ok(h.finish())
}

/// When the first certificate of a verified chain (roots included) expires.
fn expiry(chain: &StackRef<X509>) -> Option<SystemTime> {
    chain
        .iter()
        .map(|c| crate::identity::system_time(c.not_after()).ok())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .min()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(i: usize) -> ChainKey {
        let mut k = [0; 32];
        k[..8].copy_from_slice(&(i as u64).to_le_bytes());
        k
    }

    #[test]
    fn a_full_map_drops_expired_chains_then_keeps_the_newest_half() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cache = VerifiedChains::default();
        // Every fourth chain has expired by `now`.
        for i in 0..CAPACITY {
            let until = if i % 4 == 0 {
                now
            } else {
                now + Duration::from_secs(60)
            };
            cache.remember(key(i), until, now - Duration::from_secs(1));
        }
        assert_eq!(cache.chains.load().len(), CAPACITY);

        cache.remember(key(CAPACITY), now + Duration::from_secs(60), now);
        let map = cache.chains.load();
        assert_eq!(map.len(), CAPACITY / 2 + 1);
        assert!(map.contains_key(&key(CAPACITY)));
        // The newest live chains stay; the expired and the oldest live ones went.
        let kept: Vec<usize> = (0..CAPACITY)
            .filter(|i| map.contains_key(&key(*i)))
            .collect();
        let live: Vec<usize> = (0..CAPACITY).filter(|i| i % 4 != 0).collect();
        assert_eq!(kept, live[live.len() - CAPACITY / 2..]);

        // Below capacity nothing is evicted.
        cache.remember(key(CAPACITY + 1), now + Duration::from_secs(60), now);
        assert_eq!(cache.chains.load().len(), CAPACITY / 2 + 2);
    }

    #[test]
    fn a_full_map_of_expired_chains_empties() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cache = VerifiedChains::default();
        for i in 0..CAPACITY {
            cache.remember(key(i), now, now - Duration::from_secs(1));
        }
        cache.remember(key(CAPACITY), now + Duration::from_secs(1), now);
        assert_eq!(cache.chains.load().len(), 1);
    }
}
