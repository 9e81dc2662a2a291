//! The engine against BoringSSL: random keys of every size, random inputs, full and part
//! filled batches mixing keys and sizes, on the detected kernel and the portable one.

use std::sync::OnceLock;

use boring::bn::BigNum;
use boring::pkey::Private;
use boring::rsa::{Padding, Rsa};
use common::{components, load, random, view};
use hypha_rsa_mb::{Engine, Error, Key, Op, Size, BATCH};

mod common;

/// Keys generated once per test binary, in parallel: RSA keygen dominates the run time.
fn keys(bits: u32) -> &'static [Rsa<Private>] {
    static KEYS: OnceLock<Vec<(u32, Vec<Rsa<Private>>)>> = OnceLock::new();
    let all = KEYS.get_or_init(|| {
        let plan = [(2048u32, 32usize), (3072, 12), (4096, 6)];
        std::thread::scope(|s| {
            let handles: Vec<_> = plan
                .iter()
                .map(|&(bits, count)| {
                    s.spawn(move || {
                        let keys = (0..count).map(|_| Rsa::generate(bits).unwrap()).collect();
                        (bits, keys)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    });
    &all.iter().find(|(b, _)| *b == bits).unwrap().1
}

/// A random input below n.
fn input(rsa: &Rsa<Private>) -> Vec<u8> {
    let mut x = BigNum::new().unwrap();
    rsa.n().rand_range(&mut x).unwrap();
    x.to_vec_padded(rsa.size() as usize).unwrap()
}

fn reference(rsa: &Rsa<Private>, input: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; rsa.size() as usize];
    let len = rsa.private_decrypt(input, &mut out, Padding::NONE).unwrap();
    assert_eq!(len, out.len());
    out
}

fn engines() -> Vec<Engine> {
    let detected = Engine::detect();
    if !detected.is_accelerated() {
        eprintln!("NOTE: this CPU has no AVX-512 IFMA; only the portable kernel is tested");
        return vec![detected];
    }
    vec![detected, Engine::portable()]
}

#[test]
fn single_operations_match_boringssl_for_every_size() {
    for engine in engines() {
        for bits in [2048, 3072, 4096] {
            for rsa in keys(bits) {
                let key = load(&engine, rsa).unwrap();
                assert_eq!(key.size().bits(), bits as usize);
                let x = input(rsa);
                let mut out = vec![0u8; x.len()];
                engine.private(&key, &x, &mut out).unwrap();
                assert_eq!(out, reference(rsa, &x), "{} {bits}", engine.name());
            }
        }
    }
}

/// One batch of `picks` (indices into `rsas` and `loaded`) with random inputs, every
/// result compared with BoringSSL.
fn check_batch(
    engine: &Engine,
    rsas: &[&Rsa<Private>],
    loaded: &[Key],
    picks: &[usize],
    what: &str,
) {
    let inputs: Vec<Vec<u8>> = picks.iter().map(|&k| input(rsas[k])).collect();
    let mut outputs: Vec<Vec<u8>> = inputs.iter().map(|x| vec![0u8; x.len()]).collect();
    let mut ops: Vec<Op> = picks
        .iter()
        .zip(&inputs)
        .zip(outputs.iter_mut())
        .map(|((&k, x), out)| Op::new(&loaded[k], x, out))
        .collect();
    engine.private_batch(&mut ops);
    assert!(ops.iter().all(|o| o.result().is_ok()), "{what}");
    drop(ops);
    for ((&k, x), out) in picks.iter().zip(&inputs).zip(&outputs) {
        assert_eq!(out, &reference(rsas[k], x), "{} {what}", engine.name());
    }
}

/// `count` random messages over the keys of `bits`, in batches of eight different keys,
/// the last batch part-filled when `count` is not a multiple of eight.
fn random_messages(engine: &Engine, bits: u32, count: usize) {
    let rsas: Vec<&Rsa<Private>> = keys(bits).iter().collect();
    let loaded: Vec<Key> = rsas.iter().map(|r| load(engine, r).unwrap()).collect();
    for start in (0..count).step_by(BATCH) {
        let picks: Vec<usize> = (start..count.min(start + BATCH))
            .map(|i| (i * 5 + i / rsas.len()) % rsas.len())
            .collect();
        check_batch(
            engine,
            &rsas,
            &loaded,
            &picks,
            &format!("{bits}-bit message {start}"),
        );
    }
}

#[test]
fn thousands_of_random_messages_match_boringssl_2048() {
    random_messages(&Engine::detect(), 2048, 2051);
}

#[test]
fn thousands_of_random_messages_match_boringssl_3072() {
    random_messages(&Engine::detect(), 3072, 1027);
}

#[test]
fn thousands_of_random_messages_match_boringssl_4096() {
    random_messages(&Engine::detect(), 4096, 517);
}

#[test]
fn the_forced_portable_kernel_matches_boringssl() {
    let engine = Engine::portable();
    assert!(!engine.is_accelerated());
    for bits in [2048, 3072, 4096] {
        random_messages(&engine, bits, 21);
    }
}

#[test]
fn mixed_sizes_and_part_filled_batches_match_boringssl() {
    let engine = Engine::detect();
    let rsas: Vec<&Rsa<Private>> = keys(2048)
        .iter()
        .take(3)
        .chain(keys(3072).iter().take(3))
        .chain(keys(4096).iter().take(2))
        .collect();
    let loaded: Vec<Key> = rsas.iter().map(|r| load(&engine, r).unwrap()).collect();
    // 1..=19 operations: part-filled batches, more than one batch per size, sizes mixed.
    for count in 1..=19usize {
        let picks: Vec<usize> = (0..count).map(|i| (i * 3 + count) % rsas.len()).collect();
        check_batch(&engine, &rsas, &loaded, &picks, &format!("count {count}"));
    }
}

#[test]
fn edge_inputs_match_boringssl() {
    let engine = Engine::detect();
    for bits in [2048, 3072, 4096] {
        let rsa = &keys(bits)[0];
        let key = load(&engine, rsa).unwrap();
        let len = rsa.size() as usize;
        let mut n_minus_1 = rsa.n().to_owned().unwrap();
        n_minus_1.sub_word(1).unwrap();
        let p = rsa.p().unwrap().to_vec_padded(len).unwrap();
        let mut one = vec![0u8; len];
        one[len - 1] = 1;
        for x in [
            vec![0u8; len],
            one,
            n_minus_1.to_vec_padded(len).unwrap(),
            p,
        ] {
            let mut out = vec![0u8; len];
            engine.private(&key, &x, &mut out).unwrap();
            assert_eq!(out, reference(rsa, &x), "{bits}");
        }
    }
}

#[test]
fn malformed_inputs_are_refused() {
    let engine = Engine::detect();
    let rsa = &keys(2048)[0];
    let key = load(&engine, rsa).unwrap();
    let n = rsa.n().to_vec();
    let mut out = vec![0u8; 256];
    assert_eq!(
        engine.private(&key, &n, &mut out),
        Err(Error::InputOutOfRange)
    );
    assert_eq!(
        engine.private(&key, &[0xff; 256], &mut out),
        Err(Error::InputOutOfRange)
    );
    assert_eq!(
        engine.private(&key, &[1; 255], &mut out),
        Err(Error::Length {
            expected: 256,
            got: 255
        })
    );
    assert_eq!(
        engine.private(&key, &[1; 256], &mut [0u8; 512]),
        Err(Error::Length {
            expected: 256,
            got: 512
        })
    );
    // A refused op in a batch does not disturb the others.
    let good = input(rsa);
    let mut o1 = vec![0u8; 256];
    let mut o2 = vec![0u8; 256];
    {
        let mut ops = [Op::new(&key, &n, &mut o1), Op::new(&key, &good, &mut o2)];
        engine.private_batch(&mut ops);
        assert_eq!(ops[0].result(), Err(Error::InputOutOfRange));
        assert_eq!(ops[1].result(), Ok(()));
    }
    assert_eq!(o2, reference(rsa, &good));
}

#[test]
fn unsupported_and_inconsistent_keys_are_refused() {
    let engine = Engine::detect();
    let small = Rsa::generate(1024).unwrap();
    assert_eq!(
        load(&engine, &small).unwrap_err(),
        Error::UnsupportedSize(1024)
    );
    let e3 = Rsa::generate_with_e(2048, &BigNum::from_u32(3).unwrap()).unwrap();
    assert_eq!(load(&engine, &e3).unwrap_err(), Error::UnsupportedExponent);

    let rsa = &keys(2048)[0];
    let with = |f: &dyn Fn(&mut [Vec<u8>; 7])| {
        let mut parts = components(rsa);
        f(&mut parts);
        engine.key(&view(&parts), &mut random)
    };
    assert!(matches!(
        with(&|c| c[2][10] ^= 1),
        Err(Error::InvalidKey(_))
    ));
    assert!(matches!(
        with(&|c| c[6][10] ^= 1),
        Err(Error::InvalidKey(_))
    ));
    assert!(matches!(
        with(&|c| c[4] = vec![0xff; 129]),
        Err(Error::InvalidKey(_))
    ));
    assert!(matches!(
        with(&|c| c[2] = vec![0xff; 128]),
        Err(Error::InvalidKey(_))
    ));
    assert!(with(&|_| ()).is_ok());
}

#[test]
fn sizes_report_their_lengths() {
    assert_eq!(Size::from_bits(2048), Some(Size::Rsa2048));
    assert_eq!(Size::Rsa3072.bytes(), 384);
    assert_eq!(Size::from_bits(1024), None);
}

#[test]
fn a_wrong_crt_exponent_is_caught_by_the_result_check() {
    let engine = Engine::detect();
    let rsa = &keys(2048)[1];
    let mut parts = components(rsa);
    parts[4][20] ^= 0x10;
    let key = engine.key(&view(&parts), &mut random).unwrap();
    let x = input(rsa);
    let mut out = vec![0u8; 256];
    assert_eq!(engine.private(&key, &x, &mut out), Err(Error::Fault));
    assert_eq!(out, vec![0u8; 256], "nothing is released");
}
