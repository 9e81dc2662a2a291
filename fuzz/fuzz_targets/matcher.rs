//! A rule table and a request from the fuzzer's bytes: the table's first match must be
//! sequential evaluation's, within the default budget and a tight one.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_matcher::fuzzing::matcher(data));
