//! The `cargo fuzz` targets' bodies (`fuzz/`, which needs nightly to run under libFuzzer), run
//! here on stable over pseudo-random inputs so that CI exercises them on every change.

use hypha_matcher::fuzzing;

fn inputs(seed: u64, n: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed;
    (0..n).map(move |i| {
        (0..1 + (i % len))
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect()
    })
}

#[test]
fn matcher_agrees_with_sequential_evaluation() {
    for data in inputs(1, 4_000, 200) {
        fuzzing::matcher(&data);
    }
}

#[test]
fn compiler_survives_arbitrary_patterns_and_budgets_agree() {
    for data in inputs(2, 1_500, 120) {
        fuzzing::compile(&data);
    }
    // Pattern-shaped inputs, so that many compile.
    let words: &[&[u8]] = &[
        b"\x04/a.*",
        b"\x01/api",
        b"\x04[a-z]+",
        b"\x02.js",
        b"\x03x",
        b"\x84\\w+\\d",
    ];
    for data in inputs(3, 1_500, 12) {
        let joined: Vec<u8> = data
            .iter()
            .flat_map(|&b| {
                let mut w = words[usize::from(b) % words.len()].to_vec();
                w.push(0);
                w
            })
            .collect();
        fuzzing::compile(&joined);
    }
}
