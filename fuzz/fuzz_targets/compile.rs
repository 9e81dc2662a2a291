//! Arbitrary patterns into the table compiler: no panic, and budgets that agree.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_matcher::fuzzing::compile(data));
