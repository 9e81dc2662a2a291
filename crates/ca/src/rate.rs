//! How often one identity may be issued a certificate: a token bucket per caller, so that a
//! compromised workload asking in a loop costs the CA (and its token) a bounded share.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Caller;

/// `burst` certificates at once, then one every `every`, per identity. Replicas of a workload
/// share their service account's identity, so the default lets a rollout of a hundred pods
/// through at once and ten a second after that; a sidecar asks once at start and then at
/// half-life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueRate {
    pub burst: u32,
    pub every: Duration,
}

impl Default for IssueRate {
    fn default() -> Self {
        IssueRate {
            burst: 100,
            every: Duration::from_millis(100),
        }
    }
}

/// Identities tracked before the full buckets (identities that have not asked lately) are
/// forgotten.
const TRACKED: usize = 65_536;

/// The buckets, by identity.
#[derive(Debug)]
pub(crate) struct Buckets {
    rate: IssueRate,
    /// Tokens left and when they were counted.
    by_caller: Mutex<HashMap<(String, String), (f64, Instant)>>,
}

impl Buckets {
    pub(crate) fn new(rate: IssueRate) -> Buckets {
        Buckets {
            rate,
            by_caller: Mutex::default(),
        }
    }

    pub(crate) fn rate(&self) -> IssueRate {
        self.rate
    }

    /// Takes one token for `caller`; when none is left, how long until one is.
    pub(crate) fn take(&self, caller: &Caller) -> Result<(), Duration> {
        let now = Instant::now();
        let burst = f64::from(self.rate.burst.max(1));
        let per_second = 1.0 / self.rate.every.as_secs_f64().max(1e-9);
        let refill = |(tokens, at): (f64, Instant)| {
            (tokens + now.duration_since(at).as_secs_f64() * per_second).min(burst)
        };
        let mut map = self.by_caller.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= TRACKED {
            map.retain(|_, b| refill(*b) < burst);
        }
        let key = (caller.namespace.clone(), caller.service_account.clone());
        let bucket = map.entry(key).or_insert((burst, now));
        let tokens = refill(*bucket);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            Ok(())
        } else {
            *bucket = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_period_per_caller() {
        let b = Buckets::new(IssueRate {
            burst: 3,
            every: Duration::from_secs(3600),
        });
        let web = Caller::new("shop", "web");
        for _ in 0..3 {
            assert!(b.take(&web).is_ok());
        }
        let wait = b.take(&web).unwrap_err();
        assert!(wait > Duration::from_secs(3500), "{wait:?}");
        // Another identity has its own bucket.
        assert!(b.take(&Caller::new("shop", "db")).is_ok());

        let fast = Buckets::new(IssueRate {
            burst: 1,
            every: Duration::from_millis(20),
        });
        assert!(fast.take(&web).is_ok());
        assert!(fast.take(&web).is_err());
        std::thread::sleep(Duration::from_millis(30));
        assert!(fast.take(&web).is_ok());
    }
}
