//! Lock-free duration histograms the key providers keep for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the key providers' histogram buckets: from a fast token's
/// ECDSA signature (~0.1 ms) to a slow HSM's (tens of ms) and a queue backed up behind it.
pub const SECONDS_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A histogram of durations over [`SECONDS_BUCKETS`], updated without locks.
#[derive(Default)]
pub(crate) struct Timings {
    /// Per bucket (not cumulative); the last slot counts what exceeds every bound.
    buckets: [AtomicU64; SECONDS_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Timings {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = SECONDS_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(SECONDS_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Histogram {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        Histogram {
            count: counts.iter().sum(),
            cumulative: counts
                .iter()
                .take(SECONDS_BUCKETS.len())
                .scan(0, |acc, c| {
                    *acc += c;
                    Some(*acc)
                })
                .collect(),
            sum_seconds: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64(),
        }
    }
}

/// A histogram as metrics render it: cumulative counts per bound of [`SECONDS_BUCKETS`].
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}
