//! Wycheproof's RSA decryption vectors (PKCS#1 v1.5 and OAEP, 2048/3072/4096-bit keys):
//! every ciphertext through the engine's raw private operation, which must equal BoringSSL's
//! raw operation or be refused exactly when BoringSSL refuses it; for PKCS#1 v1.5 vectors
//! Wycheproof marks valid, the decoded padding must give the expected message.
//! Keys the engine does not take (other sizes or exponents) are counted and must be refused
//! with the matching error.

use boring::pkey::PKey;
use boring::rsa::Padding;
use common::load;
use hypha_rsa_mb::{Engine, Error};

mod common;
use wycheproof::TestResult;

/// PKCS#1 v1.5 encryption padding: 00 02 PS(>= 8 non-zero) 00 M.
fn unpad_pkcs1(em: &[u8]) -> Option<&[u8]> {
    if em.len() < 11 || em[0] != 0 || em[1] != 2 {
        return None;
    }
    let zero = em[2..].iter().position(|&b| b == 0)? + 2;
    (zero >= 10).then(|| &em[zero + 1..])
}

#[derive(Default, Debug)]
struct Tally {
    keys: usize,
    keys_refused: usize,
    computed: usize,
    refused: usize,
    unpadded: usize,
}

/// Runs one group's ciphertexts; `pt` is checked when `pkcs1` and the vector is valid.
fn run_group<'a>(
    engine: &Engine,
    der: &[u8],
    tests: impl Iterator<Item = (usize, &'a [u8], &'a [u8], TestResult)>,
    pkcs1: bool,
    tally: &mut Tally,
) {
    let rsa = PKey::private_key_from_pkcs8(der).unwrap().rsa().unwrap();
    tally.keys += 1;
    let key = match load(engine, &rsa) {
        Ok(key) => key,
        Err(e) => {
            let bits = rsa.n().num_bits();
            let expected_refusal =
                !matches!(bits, 2048 | 3072 | 4096) || rsa.e().to_vec() != [1, 0, 1];
            assert!(
                expected_refusal,
                "a {bits}-bit e=65537 key was refused: {e}"
            );
            tally.keys_refused += 1;
            return;
        }
    };
    let len = rsa.size() as usize;
    for (id, ct, pt, result) in tests {
        let mut reference = vec![0u8; len];
        let boring = rsa.private_decrypt(ct, &mut reference, Padding::NONE);
        let mut out = vec![0u8; len];
        let ours = engine.private(&key, ct, &mut out);
        match (boring, ours) {
            (Ok(_), Ok(())) => {
                assert_eq!(out, reference, "tcId {id}");
                tally.computed += 1;
                if pkcs1 && result == TestResult::Valid {
                    assert_eq!(unpad_pkcs1(&out), Some(pt), "tcId {id}");
                    tally.unpadded += 1;
                }
            }
            (Err(_), Err(Error::Length { .. } | Error::InputOutOfRange)) => tally.refused += 1,
            (b, o) => panic!("tcId {id}: BoringSSL {:?}, engine {o:?}", b.map(|_| ())),
        }
    }
}

/// Every group of every file of one Wycheproof module; returns the tally.
macro_rules! run_module {
    ($module:ident, $pkcs1:expr) => {{
        use wycheproof::$module::{TestName, TestSet};
        let engine = Engine::detect();
        let mut tally = Tally::default();
        for name in TestName::all() {
            for g in &TestSet::load(name).unwrap().test_groups {
                let tests = g
                    .tests
                    .iter()
                    .map(|t| (t.tc_id, &t.ct[..], &t.pt[..], t.result));
                run_group(&engine, &g.pkcs8, tests, $pkcs1, &mut tally);
            }
        }
        tally
    }};
}

#[test]
fn pkcs1_decryption_vectors() {
    let tally = run_module!(rsa_pkcs1_decrypt, true);
    eprintln!("PKCS#1 v1.5: {tally:?}");
    assert!(tally.computed >= 150 && tally.unpadded >= 100, "{tally:?}");
}

#[test]
fn oaep_decryption_vectors() {
    let tally = run_module!(rsa_oaep, false);
    eprintln!("OAEP: {tally:?}");
    assert!(
        tally.computed >= 700 && tally.keys - tally.keys_refused >= 80,
        "{tally:?}"
    );
}
