//! A path from the fuzzer's bytes, normalized in every mode of Istio's `pathNormalization`
//! and Envoy's escaped-slash actions: the proxy's answer must be the RFC 3986 reference's.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hypha_proxy::request::fuzzing::normalize(data));
