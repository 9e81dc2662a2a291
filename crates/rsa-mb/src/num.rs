//! Scalar big-number helpers on one lane: 52-bit limbs, least significant first.
//!
//! Everything here runs in time that depends only on lengths, never on values: no branch
//! and no memory index is taken from a limb. These helpers do the per-lane work around the
//! vector kernels (byte conversion, CRT recombination, final reductions) and the scalar
//! Almost Montgomery Multiplication that the portable kernel and key set-up use.

/// Bits per limb: the width of the AVX-512 IFMA multiplier.
pub(crate) const LIMB_BITS: usize = 52;
/// The low 52 bits.
pub(crate) const MASK: u64 = (1 << LIMB_BITS) - 1;
/// Most limbs any number here has: a 4096-bit modulus is 79 limbs, rounded up to 80.
pub(crate) const MAX_LIMBS: usize = 80;

/// Reads a big-endian integer into `out`. Returns false when it does not fit in `out`.
pub(crate) fn from_be(bytes: &[u8], out: &mut [u64]) -> bool {
    out.fill(0);
    let mut overflow = 0u64;
    for (k, &byte) in bytes.iter().rev().enumerate() {
        let b = u64::from(byte);
        let (limb, shift) = (8 * k / LIMB_BITS, 8 * k % LIMB_BITS);
        if limb >= out.len() {
            overflow |= b;
            continue;
        }
        out[limb] |= (b << shift) & MASK;
        if shift > LIMB_BITS - 8 {
            let spill = b >> (LIMB_BITS - shift);
            match out.get_mut(limb + 1) {
                Some(next) => *next |= spill,
                None => overflow |= spill,
            }
        }
    }
    overflow == 0
}

/// Writes `limbs` big-endian into all of `out`. The value must fit in `out`.
pub(crate) fn to_be(limbs: &[u64], out: &mut [u8]) {
    let len = out.len();
    for k in 0..len {
        let (limb, shift) = (8 * k / LIMB_BITS, 8 * k % LIMB_BITS);
        let mut v = limbs.get(limb).map_or(0, |l| l >> shift);
        if shift > LIMB_BITS - 8 {
            v |= limbs.get(limb + 1).map_or(0, |l| l << (LIMB_BITS - shift));
        }
        out[len - 1 - k] = v as u8;
    }
}

/// `out = a - b` (b may be shorter than a); returns the borrow out of the top limb, 0 or 1.
pub(crate) fn sub(a: &[u64], b: &[u64], out: &mut [u64]) -> u64 {
    let mut borrow = 0u64;
    for (i, o) in out.iter_mut().enumerate().take(a.len()) {
        let d = a[i]
            .wrapping_sub(b.get(i).copied().unwrap_or(0))
            .wrapping_sub(borrow);
        *o = d & MASK;
        borrow = d >> 63;
    }
    borrow
}

/// `out = a + b` (b may be shorter than a); returns the carry out of the top limb.
pub(crate) fn add(a: &[u64], b: &[u64], out: &mut [u64]) -> u64 {
    let mut carry = 0u64;
    for (i, o) in out.iter_mut().enumerate().take(a.len()) {
        let s = a[i] + b.get(i).copied().unwrap_or(0) + carry;
        *o = s & MASK;
        carry = s >> LIMB_BITS;
    }
    carry
}

/// All ones when `bit` is 1, zero when it is 0.
fn mask_of(bit: u64) -> u64 {
    bit.wrapping_neg()
}

/// All ones when `a == b`, else zero.
pub(crate) fn eq_mask(a: u64, b: u64) -> u64 {
    let x = a ^ b;
    ((x | x.wrapping_neg()) >> 63).wrapping_sub(1)
}

/// `a = a - m` when `a >= m`, else unchanged; `a` normalized, as long as `m`.
pub(crate) fn cond_sub(a: &mut [u64], m: &[u64]) {
    let mut t = [0u64; MAX_LIMBS];
    let t = &mut t[..a.len()];
    let keep = mask_of(sub(a, m, t));
    for (x, d) in a.iter_mut().zip(t.iter()) {
        *x = (*x & keep) | (d & !keep);
    }
}

/// True when the two numbers are equal; reads every limb whatever the answer.
pub(crate) fn ct_eq(a: &[u64], b: &[u64]) -> bool {
    let diff = a.iter().zip(b).fold(0u64, |acc, (x, y)| acc | (x ^ y));
    diff == 0 && a.len() == b.len()
}

/// Plain product `out = a * b`, `out` as long as `a` and `b` together; normalized.
pub(crate) fn mul(a: &[u64], b: &[u64], out: &mut [u64]) {
    out.fill(0);
    for (i, &ai) in a.iter().enumerate() {
        let mut carry: u128 = 0;
        for (j, &bj) in b.iter().enumerate() {
            let v = u128::from(out[i + j]) + u128::from(ai) * u128::from(bj) + carry;
            out[i + j] = (v as u64) & MASK;
            carry = v >> LIMB_BITS;
        }
        out[i + b.len()] = carry as u64;
    }
}

/// `-m^-1 mod 2^52` for an odd `m0`, the Montgomery constant.
pub(crate) fn mont_k0(m0: u64) -> u64 {
    // Newton's iteration doubles the correct low bits each round: 1 → 64 bits in 6 rounds.
    let mut inv = 1u64;
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(m0.wrapping_mul(inv)));
    }
    inv.wrapping_neg() & MASK
}

/// `R^2 mod m` with `R = 2^(52 * m.len())`, by doubling with conditional subtraction.
pub(crate) fn mont_rr(m: &[u64], out: &mut [u64]) {
    out.fill(0);
    out[0] = 1;
    let mut t = [0u64; MAX_LIMBS];
    for _ in 0..2 * LIMB_BITS * m.len() {
        let t = &mut t[..m.len()];
        add(out, out, t);
        // 2 * out < 2m < R, so the doubling never leaves the limbs.
        out.copy_from_slice(t);
        cond_sub(out, m);
    }
}

/// Almost Montgomery Multiplication on one lane: `a * b / R mod m`, result below `2m`
/// for inputs below `2m` (R = 2^(52 * m.len()), with 4m < R).
pub(crate) fn amm(out: &mut [u64], a: &[u64], b: &[u64], m: &[u64], k0: u64) {
    let n = m.len();
    let mut t = [0u64; MAX_LIMBS + 2];
    for &ai in &a[..n] {
        let ai = u128::from(ai);
        let mut c: u128 = 0;
        for j in 0..n {
            let v = u128::from(t[j]) + ai * u128::from(b[j]) + c;
            t[j] = (v as u64) & MASK;
            c = v >> LIMB_BITS;
        }
        let v = u128::from(t[n]) + c;
        t[n] = (v as u64) & MASK;
        t[n + 1] = (v >> LIMB_BITS) as u64;

        let y = u128::from(t[0].wrapping_mul(k0) & MASK);
        let mut c = (u128::from(t[0]) + y * u128::from(m[0])) >> LIMB_BITS;
        for j in 1..n {
            let v = u128::from(t[j]) + y * u128::from(m[j]) + c;
            t[j - 1] = (v as u64) & MASK;
            c = v >> LIMB_BITS;
        }
        let v = u128::from(t[n]) + c;
        t[n - 1] = (v as u64) & MASK;
        t[n] = t[n + 1] + (v >> LIMB_BITS) as u64;
    }
    debug_assert_eq!(
        t[n], 0,
        "AMM result left its limbs: an input was out of range"
    );
    out[..n].copy_from_slice(&t[..n]);
}

/// Number of significant bits (used on public values only: moduli).
pub(crate) fn bit_len(limbs: &[u64]) -> usize {
    limbs.iter().rposition(|&l| l != 0).map_or(0, |i| {
        i * LIMB_BITS + (64 - limbs[i].leading_zeros() as usize)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_through_limbs() {
        let bytes: Vec<u8> = (1..=64u8).map(|b| b.wrapping_mul(37)).collect();
        let mut limbs = [0u64; 10];
        assert!(from_be(&bytes, &mut limbs));
        assert!(limbs.iter().all(|&l| l <= MASK));
        let mut back = [0u8; 64];
        to_be(&limbs, &mut back);
        assert_eq!(&back[..], &bytes[..]);
        // 64 bytes need 10 limbs (520 bits); 9 limbs (468 bits) cannot hold them.
        assert!(!from_be(&bytes, &mut [0u64; 9]));
        // Leading zero bytes beyond the limbs are fine.
        let mut padded = vec![0u8; 8];
        padded.extend_from_slice(&bytes);
        assert!(from_be(&padded, &mut limbs));
    }

    #[test]
    fn k0_is_the_negated_inverse() {
        for m0 in [
            1u64,
            3,
            0xF_FFFF_FFFF_FFFF,
            0x1234_5678_9ABD,
            0xA_AAAA_AAAA_AAAB,
        ] {
            let k0 = mont_k0(m0);
            assert_eq!(
                m0.wrapping_mul(k0).wrapping_add(1) & MASK,
                0,
                "m0 = {m0:#x}"
            );
        }
    }

    #[test]
    fn cond_sub_and_compare() {
        let m = [5u64, 7];
        let mut a = [6u64, 7];
        cond_sub(&mut a, &m);
        assert_eq!(a, [1, 0]);
        let mut b = [4u64, 7];
        cond_sub(&mut b, &m);
        assert_eq!(b, [4, 7]);
        assert!(ct_eq(&b, &[4, 7]));
        assert!(!ct_eq(&b, &[4, 6]));
        assert_eq!(eq_mask(3, 3), u64::MAX);
        assert_eq!(eq_mask(3, 2), 0);
    }
}
