//! A small per-thread pseudo-random source for load balancing, weighted splits, fault
//! percentages and jitter: statistical spread is all that is needed, not unpredictability.

use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    // The address of a thread-local differs per thread.
    let addr = std::ptr::addr_of!(local) as u64;
    (t ^ addr.rotate_left(32)) | 1
}

/// The next 64 random bits (xorshift64*).
pub fn next() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Uniform in `0..n` (n > 0).
pub fn below(n: u64) -> u64 {
    ((u128::from(next()) * u128::from(n)) >> 64) as u64
}
