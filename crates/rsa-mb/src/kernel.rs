//! The 8-lane number layout and the kernels that compute on it.
//!
//! A batch of eight numbers of `N` limbs is stored transposed: `Num<N>[i]` holds limb `i`
//! of all eight lanes, so one AVX-512 register holds one limb position of the whole batch.
//! A [`Kernel`] provides the three operations the exponentiation needs on that layout;
//! [`Portable`] computes them lane by lane in plain Rust and is both the fallback and the
//! oracle the vector kernel is tested against.

use crate::num;

/// Lanes per batch: one per 64-bit element of a 512-bit register.
pub(crate) const LANES: usize = 8;

/// One limb position across the eight lanes, aligned for a 512-bit load.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct L8(pub(crate) [u64; LANES]);

impl L8 {
    pub(crate) const ZERO: L8 = L8([0; LANES]);
}

/// Eight numbers of `N` limbs each, transposed.
pub(crate) type Num<const N: usize> = [L8; N];

/// Writes lane `lane` of `num` from `limbs` (little-endian 52-bit limbs).
pub(crate) fn put_lane<const N: usize>(num: &mut Num<N>, lane: usize, limbs: &[u64]) {
    for (i, l) in num.iter_mut().enumerate() {
        l.0[lane] = limbs.get(i).copied().unwrap_or(0);
    }
}

/// Reads lane `lane` of `num` into `limbs`.
pub(crate) fn get_lane<const N: usize>(num: &Num<N>, lane: usize, limbs: &mut [u64]) {
    for (l, out) in num.iter().zip(limbs.iter_mut()) {
        *out = l.0[lane];
    }
}

/// The arithmetic the exponentiation runs on eight lanes at once. Each lane has its own
/// modulus `m` (odd, `4m < R = 2^(52N)`) and Montgomery constant `k0`.
pub(crate) trait Kernel: Copy {
    /// Almost Montgomery Multiplication: `out = a * b / R mod m`, below `2m` for inputs
    /// below `2m`.
    fn amm_into<const N: usize>(
        self,
        out: &mut Num<N>,
        a: &Num<N>,
        b: &Num<N>,
        m: &Num<N>,
        k0: &L8,
    );

    /// Almost Montgomery Squaring: `amm(a, a, ..)`, cheaper where the kernel has one.
    fn ams_into<const N: usize>(self, out: &mut Num<N>, a: &Num<N>, m: &Num<N>, k0: &L8) {
        self.amm_into(out, a, a, m, k0);
    }

    /// `out = table[idx]` per lane, reading every entry whatever the indices (constant time).
    fn select_into<const N: usize>(self, out: &mut Num<N>, table: &[Num<N>; 16], idx: &L8);

    /// [`Kernel::amm_into`] returning the result.
    fn amm<const N: usize>(self, a: &Num<N>, b: &Num<N>, m: &Num<N>, k0: &L8) -> Num<N> {
        let mut out = [L8::ZERO; N];
        self.amm_into(&mut out, a, b, m, k0);
        out
    }

    /// [`Kernel::ams_into`] returning the result.
    fn ams<const N: usize>(self, a: &Num<N>, m: &Num<N>, k0: &L8) -> Num<N> {
        let mut out = [L8::ZERO; N];
        self.ams_into(&mut out, a, m, k0);
        out
    }

    /// [`Kernel::select_into`] returning the result.
    #[cfg(test)]
    fn select<const N: usize>(self, table: &[Num<N>; 16], idx: &L8) -> Num<N> {
        let mut out = [L8::ZERO; N];
        self.select_into(&mut out, table, idx);
        out
    }
}

/// Plain Rust, one lane after another. Runs anywhere.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Portable;

impl Kernel for Portable {
    fn amm_into<const N: usize>(
        self,
        out: &mut Num<N>,
        a: &Num<N>,
        b: &Num<N>,
        m: &Num<N>,
        k0: &L8,
    ) {
        let (mut la, mut lb, mut lm, mut lr) = ([0; N], [0; N], [0; N], [0; N]);
        for lane in 0..LANES {
            get_lane(a, lane, &mut la);
            get_lane(b, lane, &mut lb);
            get_lane(m, lane, &mut lm);
            num::amm(&mut lr, &la, &lb, &lm, k0.0[lane]);
            put_lane(out, lane, &lr);
        }
    }

    fn select_into<const N: usize>(self, out: &mut Num<N>, table: &[Num<N>; 16], idx: &L8) {
        out.fill(L8::ZERO);
        for (t, entry) in table.iter().enumerate() {
            let masks: [u64; LANES] = core::array::from_fn(|l| num::eq_mask(idx.0[l], t as u64));
            for (o, e) in out.iter_mut().zip(entry) {
                for ((o, e), mask) in o.0.iter_mut().zip(e.0).zip(masks) {
                    *o |= e & mask;
                }
            }
        }
    }
}
