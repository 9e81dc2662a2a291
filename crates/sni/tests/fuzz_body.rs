//! The `cargo fuzz` target's body (`fuzz/`, nightly only) run here on stable over
//! pseudo-random inputs and mutated ClientHellos, so that CI exercises it on every change.

use hypha_sni::{client_hello, fuzz, parse, Hello};

fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

#[test]
fn random_bytes_and_mutated_hellos_never_panic_or_change_their_answer() {
    let mut state = 7;
    for i in 0..3_000 {
        let len = 1 + (i % 300);
        let data: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
        fuzz(&data);
    }
    let names = [Some("a.example.com"), None, Some("x")];
    let mut complete = 0;
    for i in 0..6_000u64 {
        let mut hello = client_hello(names[i as usize % 3], 1 + (i as usize % 200));
        for _ in 0..1 + i % 3 {
            let at = next(&mut state) as usize % hello.len();
            hello[at] = next(&mut state) as u8;
        }
        fuzz(&hello);
        complete += usize::from(matches!(parse(&hello), Hello::Complete(_)));
    }
    // Mutations inside random, session or cipher bytes leave a parseable hello: the inputs
    // reach the extension parser rather than all stopping at the first header.
    assert!(complete > 600, "{complete}");
}
