//! Fixed-window modular exponentiation on eight lanes, written once over any [`Kernel`].
//!
//! Every lane runs the same sequence of operations: four squarings and one multiplication
//! per 4-bit window over the full exponent length of its size class, whatever the exponent's
//! value. The table entry for a window is taken by [`Kernel::select`], which reads all
//! sixteen entries, so neither branches nor addresses depend on exponent bits.

use crate::kernel::{Kernel, Num, L8, LANES};

/// Window width in bits. A 5-bit table of 4096-bit numbers would not fit in L1.
const WINDOW: usize = 4;

/// Per-lane exponent words, least significant first. 2048 bits covers every size class.
pub(crate) type Exponent = [u64; 32];

/// Montgomery parameters of one modulus per lane.
pub(crate) struct Modulus<'a, const N: usize> {
    pub(crate) m: &'a Num<N>,
    pub(crate) k0: &'a L8,
    /// `R mod m`: one in the Montgomery domain.
    pub(crate) one: &'a Num<N>,
}

/// The 4-bit window of each lane's exponent that starts at bit `pos` (a multiple of 4).
fn window(exps: &[Exponent; LANES], pos: usize) -> L8 {
    L8(core::array::from_fn(|l| {
        (exps[l][pos / 64] >> (pos % 64)) & ((1 << WINDOW) - 1)
    }))
}

/// `x^e` in the Montgomery domain for each lane: `x` is in the domain and below `2m`,
/// `bits` (a multiple of 4) covers every exponent. The result is below `2m`.
pub(crate) fn mont_exp<K: Kernel, const N: usize>(
    kernel: K,
    x: &Num<N>,
    exps: &[Exponent; LANES],
    bits: usize,
    modulus: &Modulus<'_, N>,
) -> Num<N> {
    debug_assert!(bits.is_multiple_of(WINDOW) && bits <= 64 * 32);
    let (m, k0) = (modulus.m, modulus.k0);
    let mut table = [[L8::ZERO; N]; 16];
    table[0] = *modulus.one;
    table[1] = *x;
    for i in 2..16 {
        let (done, rest) = table.split_at_mut(i);
        if i % 2 == 0 {
            kernel.ams_into(&mut rest[0], &done[i / 2], m, k0);
        } else {
            kernel.amm_into(&mut rest[0], &done[i - 1], x, m, k0);
        }
    }
    // Two buffers whose roles swap after each product: no copies of the accumulator.
    let (mut a, mut b, mut entry) = ([L8::ZERO; N], [L8::ZERO; N], [L8::ZERO; N]);
    kernel.select_into(&mut a, &table, &window(exps, bits - WINDOW));
    let (mut acc, mut next) = (&mut a, &mut b);
    for pos in (0..bits - WINDOW).step_by(WINDOW).rev() {
        for _ in 0..WINDOW {
            kernel.ams_into(next, acc, m, k0);
            core::mem::swap(&mut acc, &mut next);
        }
        kernel.select_into(&mut entry, &table, &window(exps, pos));
        kernel.amm_into(next, acc, &entry, m, k0);
        core::mem::swap(&mut acc, &mut next);
    }
    *acc
}
