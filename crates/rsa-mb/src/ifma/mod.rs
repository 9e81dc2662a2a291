//! The AVX-512 IFMA kernel: 52-bit multiply-accumulate on eight 64-bit lanes at once.
//!
//! The only module with `unsafe`: aligned 512-bit loads and stores, and the calls into
//! `#[target_feature]` functions, which are sound only on a CPU that has the features. An
//! [`Ifma`] value exists only after [`Ifma::detect`] has seen them, and every call into a
//! kernel goes through one.

use core::arch::x86_64::{
    __m512i, _mm512_add_epi64, _mm512_and_si512, _mm512_cmpeq_epi64_mask, _mm512_load_si512,
    _mm512_madd52hi_epu64, _mm512_madd52lo_epu64, _mm512_mask_mov_epi64, _mm512_set1_epi64,
    _mm512_setzero_si512, _mm512_srli_epi64, _mm512_store_si512,
};

use crate::kernel::{Kernel, Num, L8};
use crate::num::MASK;

mod unrolled;

/// Proof that this CPU has AVX-512F and AVX-512 IFMA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ifma(());

impl Ifma {
    /// `Some` when the CPU has the features the kernels are compiled for.
    pub(crate) fn detect() -> Option<Ifma> {
        (std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512ifma"))
            .then_some(Ifma(()))
    }
}

impl Kernel for Ifma {
    fn amm_into<const N: usize>(
        self,
        out: &mut Num<N>,
        a: &Num<N>,
        b: &Num<N>,
        m: &Num<N>,
        k0: &L8,
    ) {
        macro_rules! unrolled {
            ($($n:literal => $f:ident),*) => {
                match N {
                    $($n => {
                        // SAFETY: `self` exists only if `detect` found avx512f and
                        // avx512ifma on this CPU.
                        unsafe { unrolled::$f(fixed_mut(out), fixed(a), fixed(b), fixed(m), k0) }
                    })*
                    // SAFETY: as above.
                    _ => unsafe { amm(out, a, b, m, k0) },
                }
            };
        }
        unrolled!(20 => amm20, 30 => amm30, 40 => amm40);
    }

    fn ams_into<const N: usize>(self, out: &mut Num<N>, a: &Num<N>, m: &Num<N>, k0: &L8) {
        macro_rules! unrolled {
            ($($n:literal => $f:ident),*) => {
                match N {
                    $($n => {
                        // SAFETY: `self` exists only if `detect` found avx512f and
                        // avx512ifma on this CPU.
                        unsafe { unrolled::$f(fixed_mut(out), fixed(a), fixed(m), k0) }
                    })*
                    // SAFETY: as above.
                    _ => unsafe { amm(out, a, a, m, k0) },
                }
            };
        }
        unrolled!(20 => ams20, 30 => ams30, 40 => ams40);
    }

    fn select_into<const N: usize>(self, out: &mut Num<N>, table: &[Num<N>; 16], idx: &L8) {
        // SAFETY: as above, the features were detected.
        unsafe { select(out, table, idx) };
    }
}

/// A `Num<N>` seen as the `Num<M>` it is when `N == M` (the caller's match checked it).
fn fixed<const N: usize, const M: usize>(v: &Num<N>) -> &Num<M> {
    v[..].try_into().expect("sizes checked by the caller")
}

/// [`fixed`] for the output.
fn fixed_mut<const N: usize, const M: usize>(v: &mut Num<N>) -> &mut Num<M> {
    (&mut v[..])
        .try_into()
        .expect("sizes checked by the caller")
}

/// Loads one limb position of the eight lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn load(v: &L8) -> __m512i {
    // SAFETY: `L8` is 64 bytes and 64-byte aligned (`repr(C, align(64))`), as the aligned
    // load requires, and the reference keeps it alive and initialized.
    unsafe { _mm512_load_si512(v.0.as_ptr().cast()) }
}

/// Stores one limb position of the eight lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn store(out: &mut L8, v: __m512i) {
    // SAFETY: as for `load`; the exclusive reference makes the write the only access.
    unsafe { _mm512_store_si512(out.0.as_mut_ptr().cast(), v) }
}

/// Carries every limb's excess above 52 bits into the next limb, then stores.
#[inline]
#[target_feature(enable = "avx512f")]
fn normalize_store<const N: usize>(out: &mut Num<N>, r: &mut [__m512i; N]) {
    let mask = _mm512_set1_epi64(MASK as i64);
    for j in 0..N - 1 {
        r[j + 1] = _mm512_add_epi64(r[j + 1], _mm512_srli_epi64::<52>(r[j]));
        r[j] = _mm512_and_si512(r[j], mask);
    }
    for (o, v) in out.iter_mut().zip(r.iter()) {
        store(o, *v);
    }
}

/// Almost Montgomery Multiplication, word by word (CIOS): for each limb `a_i`, add
/// `a_i * b`, add `y * m` with `y` chosen to clear the lowest limb, and shift one limb down.
/// The window of accumulators stays in registers; `b` and `m` are read from memory.
#[target_feature(enable = "avx512f,avx512ifma")]
fn amm<const N: usize>(out: &mut Num<N>, a: &Num<N>, b: &Num<N>, m: &Num<N>, k0: &L8) {
    let zero = _mm512_setzero_si512();
    let k0 = load(k0);
    let mut r = [zero; N];
    for ai in a.iter() {
        let ai = load(ai);
        for j in 0..N {
            r[j] = _mm512_madd52lo_epu64(r[j], ai, load(&b[j]));
        }
        let y = _mm512_madd52lo_epu64(zero, r[0], k0);
        for j in 0..N {
            r[j] = _mm512_madd52lo_epu64(r[j], y, load(&m[j]));
        }
        let carry = _mm512_srli_epi64::<52>(r[0]);
        for j in 0..N - 1 {
            r[j] = r[j + 1];
        }
        r[N - 1] = zero;
        r[0] = _mm512_add_epi64(r[0], carry);
        for j in 0..N {
            r[j] = _mm512_madd52hi_epu64(r[j], ai, load(&b[j]));
        }
        for j in 0..N {
            r[j] = _mm512_madd52hi_epu64(r[j], y, load(&m[j]));
        }
    }
    normalize_store(out, &mut r);
}

/// `table[idx]` per lane: every entry is read; a lane takes the entry whose number equals
/// its index through a compare mask, never through an address.
#[target_feature(enable = "avx512f")]
fn select<const N: usize>(out: &mut Num<N>, table: &[Num<N>; 16], idx: &L8) {
    let idx = load(idx);
    let mut r = [_mm512_setzero_si512(); N];
    for (t, entry) in table.iter().enumerate() {
        let hit = _mm512_cmpeq_epi64_mask(idx, _mm512_set1_epi64(t as i64));
        for (acc, limb) in r.iter_mut().zip(entry.iter()) {
            *acc = _mm512_mask_mov_epi64(*acc, hit, load(limb));
        }
    }
    for (o, v) in out.iter_mut().zip(r.iter()) {
        store(o, *v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{put_lane, Portable, LANES};
    use crate::num;

    /// xorshift64*: reproducible limbs without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// Eight random odd moduli below R/4 and, for each, inputs below 2m, including 2m - 1.
    fn case<const N: usize>(rng: &mut Rng, round: usize) -> [Num<N>; 4] {
        let (mut m, mut a, mut b, mut k0) =
            ([L8::ZERO; N], [L8::ZERO; N], [L8::ZERO; N], [L8::ZERO; N]);
        for lane in 0..LANES {
            let mut lm = [0u64; N];
            lm.iter_mut().for_each(|l| *l = rng.next() & MASK);
            lm[0] |= 1;
            // Below R/4, at most 14 bits short of it (the RSA sizes leave 14 to 16).
            lm[N - 1] = (lm[N - 1] >> (2 + (rng.next() % 13))) | (1 << 36);
            let mut two_m = [0u64; N];
            num::add(&lm, &lm, &mut two_m);
            let mut below = |edge: bool| {
                let mut v = [0u64; N];
                if edge {
                    num::sub(&two_m, &[1], &mut v);
                } else {
                    v.iter_mut().for_each(|l| *l = rng.next() & MASK);
                    v[N - 1] = rng.next() % two_m[N - 1].max(1);
                }
                v
            };
            let la = below(round.is_multiple_of(5) && lane == 1);
            let lb = below(round.is_multiple_of(7) && lane == 2);
            put_lane(&mut m, lane, &lm);
            put_lane(&mut a, lane, &la);
            put_lane(&mut b, lane, &lb);
            k0[0].0[lane] = num::mont_k0(lm[0]);
        }
        [m, a, b, k0]
    }

    fn compare<const N: usize>() {
        let Some(ifma) = Ifma::detect() else {
            eprintln!("NOTE: no AVX-512 IFMA on this CPU: the vector kernel is not tested here");
            return;
        };
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ N as u64);
        for round in 0..200 {
            let [m, a, b, k0] = case::<N>(&mut rng, round);
            let k0 = &k0[0];
            assert_eq!(
                ifma.amm(&a, &b, &m, k0),
                Portable.amm(&a, &b, &m, k0),
                "amm{N} round {round}"
            );
            assert_eq!(
                ifma.ams(&a, &m, k0),
                Portable.ams(&a, &m, k0),
                "ams{N} round {round}"
            );
            let table: [Num<N>; 16] = core::array::from_fn(|t| if t % 2 == 0 { a } else { b });
            let idx = L8(core::array::from_fn(|_| rng.next() % 16));
            let got = ifma.select(&table, &idx);
            assert_eq!(got, Portable.select(&table, &idx), "select{N}");
        }
    }

    #[test]
    fn vector_kernels_match_the_portable_ones_for_every_size() {
        compare::<20>();
        compare::<30>();
        compare::<40>();
        compare::<60>();
        compare::<80>();
        compare::<7>();
    }
}
