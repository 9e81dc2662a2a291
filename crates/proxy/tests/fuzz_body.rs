//! The `normalize` fuzz target's body (`fuzz/`, nightly only) run here on stable over
//! pseudo-random paths, so that CI compares the proxy's path normalization with the RFC 3986
//! reference on every change.

use hypha_proxy::request::fuzzing;

#[test]
fn path_normalization_agrees_with_the_reference_in_every_mode() {
    let mut state: u64 = 11;
    for i in 0..20_000 {
        let data: Vec<u8> = (0..1 + i % 24)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect();
        fuzzing::normalize(&data);
    }
}
