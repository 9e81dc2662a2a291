//! Arbitrary first bytes of a connection into the ClientHello reader: no panic, valid names,
//! and an answer that more bytes never change.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_sni::fuzz(data));
