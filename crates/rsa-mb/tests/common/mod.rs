//! Shared by the tests, the unit tests and the benchmarks: BoringSSL keys into the engine.

#![allow(dead_code)]

use boring::pkey::Private;
use boring::rsa::Rsa;
use hypha_rsa_mb::{Components, Engine, Error, Key};

/// Random bytes from BoringSSL's generator.
pub fn random(buf: &mut [u8]) {
    boring::rand::rand_bytes(buf).unwrap();
}

/// n, e, p, q, dp, dq, qinv, big-endian.
pub fn components(rsa: &Rsa<Private>) -> [Vec<u8>; 7] {
    [
        rsa.n().to_vec(),
        rsa.e().to_vec(),
        rsa.p().unwrap().to_vec(),
        rsa.q().unwrap().to_vec(),
        rsa.dmp1().unwrap().to_vec(),
        rsa.dmq1().unwrap().to_vec(),
        rsa.iqmp().unwrap().to_vec(),
    ]
}

/// Borrows the seven parts as `Components`.
pub fn view(parts: &[Vec<u8>; 7]) -> Components<'_> {
    let [n, e, p, q, dp, dq, qinv] = parts;
    Components {
        n,
        e,
        p,
        q,
        dp,
        dq,
        qinv,
    }
}

/// The key, prepared by `engine`.
pub fn load(engine: &Engine, rsa: &Rsa<Private>) -> Result<Key, Error> {
    engine.key(&view(&components(rsa)), &mut random)
}
