//! RSA private-key operations on a batch of up to eight lanes, each with its own key.
//!
//! One batch of one size class runs, for every lane at once:
//! 1. base blinding: `x * A mod n`, with `A = r^e` and its inverse kept per key;
//! 2. CRT: `x mod p` and `x mod q` into the Montgomery domain, the two half-size
//!    exponentiations with `dp` and `dq`, and Garner's recombination;
//! 3. a check that `s^e = x mod n` before anything is released (a fault in the arithmetic
//!    must not hand out a signature that leaks a factor of `n`);
//! 4. unblinding with `A^-1`.
//!
//! Lanes beyond the batch's real operations repeat the first key on a zero input and their
//! results are dropped, so a part-filled batch costs the same as a full one.

use std::sync::Mutex;

use crate::exp::{mont_exp, Exponent, Modulus};
use crate::kernel::{get_lane, put_lane, Kernel, Num, L8, LANES};
use crate::num::{self, MAX_LIMBS};
use crate::Error;

/// The public exponent every key must have.
pub const E: u64 = 65_537;

/// Modulus sizes the engine computes, with the limbs of each half (p, q).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    /// RSA-2048: 20 limbs per prime.
    Rsa2048,
    /// RSA-3072: 30 limbs per prime.
    Rsa3072,
    /// RSA-4096: 40 limbs per prime.
    Rsa4096,
}

impl Size {
    /// The size for a modulus of `bits` bits, if the engine handles it.
    pub fn from_bits(bits: usize) -> Option<Size> {
        match bits {
            2048 => Some(Size::Rsa2048),
            3072 => Some(Size::Rsa3072),
            4096 => Some(Size::Rsa4096),
            _ => None,
        }
    }

    /// Modulus bits.
    pub fn bits(self) -> usize {
        match self {
            Size::Rsa2048 => 2048,
            Size::Rsa3072 => 3072,
            Size::Rsa4096 => 4096,
        }
    }

    /// Modulus bytes: the length of every input and output.
    pub fn bytes(self) -> usize {
        self.bits() / 8
    }

    /// Bits of each prime and of each CRT exponent.
    fn half_bits(self) -> usize {
        self.bits() / 2
    }

    /// Limbs per prime.
    fn half_limbs(self) -> usize {
        match self {
            Size::Rsa2048 => 20,
            Size::Rsa3072 => 30,
            Size::Rsa4096 => 40,
        }
    }
}

/// An RSA private key in its CRT form, as big-endian unsigned integers (leading zero bytes
/// allowed), the way PKCS#1 and BoringSSL hold it.
#[derive(Clone, Copy)]
pub struct Components<'a> {
    pub n: &'a [u8],
    pub e: &'a [u8],
    pub p: &'a [u8],
    pub q: &'a [u8],
    pub dp: &'a [u8],
    pub dq: &'a [u8],
    pub qinv: &'a [u8],
}

impl std::fmt::Debug for Components<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Components").finish_non_exhaustive()
    }
}

/// One prime's constants: the modulus and what the Montgomery domain needs.
struct Prime {
    m: Vec<u64>,
    k0: u64,
    /// `R^2 mod m` and `R^3 mod m`: into the domain from the low and high halves of `x`.
    rr: Vec<u64>,
    rrr: Vec<u64>,
    /// `R mod m`.
    one: Vec<u64>,
    /// The CRT exponent (`dp` or `dq`), 64-bit words.
    d: Exponent,
}

impl Prime {
    fn new(m: Vec<u64>, d: Exponent) -> Prime {
        let k0 = num::mont_k0(m[0]);
        let mut rr = vec![0; m.len()];
        num::mont_rr(&m, &mut rr);
        let mut rrr = vec![0; m.len()];
        num::amm(&mut rrr, &rr, &rr, &m, k0);
        num::cond_sub(&mut rrr, &m);
        let mut one = vec![0; m.len()];
        let mut unit = vec![0; m.len()];
        unit[0] = 1;
        num::amm(&mut one, &rr, &unit, &m, k0);
        num::cond_sub(&mut one, &m);
        Prime {
            m,
            k0,
            rr,
            rrr,
            one,
            d,
        }
    }
}

/// `A = r^e` and `A^-1` for one key, both in the Montgomery domain of `n`.
struct Blinding {
    a: Vec<u64>,
    a_inv: Vec<u64>,
}

/// A private key prepared for the engine. Create it with [`crate::Engine::key`].
pub struct Key {
    size: Size,
    n: Vec<u64>,
    k0n: u64,
    rrn: Vec<u64>,
    /// `R mod n`: one in the Montgomery domain (a dummy lane's blinding factor).
    one_n: Vec<u64>,
    p: Prime,
    q: Prime,
    /// `qinv * R mod p`, so one AMM multiplies by `qinv`.
    qinv_m: Vec<u64>,
    /// Squared after each use, so no two operations share a blinding factor. Held for the
    /// two scalar squarings only.
    blinding: Mutex<Blinding>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// The key's size class.
    pub fn size(&self) -> Size {
        self.size
    }

    /// Checks the components and precomputes the Montgomery constants. The blinding pair is
    /// filled in by [`Key::init_blinding`].
    pub(crate) fn prepare(c: &Components<'_>) -> Result<Key, Error> {
        let mut e = [0u64; 2];
        if !num::from_be(c.e, &mut e) || e != [E, 0] {
            return Err(Error::UnsupportedExponent);
        }
        let mut n_buf = [0u64; MAX_LIMBS];
        if !num::from_be(c.n, &mut n_buf) {
            return Err(Error::UnsupportedSize(8 * c.n.len()));
        }
        let bits = num::bit_len(&n_buf);
        let size = Size::from_bits(bits).ok_or(Error::UnsupportedSize(bits))?;
        let (half, half_bits) = (size.half_limbs(), size.half_bits());
        let n = n_buf[..2 * half].to_vec();

        let prime = |bytes: &[u8], what: &'static str| -> Result<Vec<u64>, Error> {
            let mut v = vec![0u64; half];
            // Both primes must have exactly half the modulus bits: then q < 2p, which the
            // recombination relies on, and every CRT exponent fits the window schedule.
            if !num::from_be(bytes, &mut v) || num::bit_len(&v) != half_bits || v[0] & 1 == 0 {
                return Err(Error::InvalidKey(what));
            }
            Ok(v)
        };
        let p = prime(c.p, "p must be odd with half the modulus bits")?;
        let q = prime(c.q, "q must be odd with half the modulus bits")?;
        let mut pq = vec![0u64; 2 * half];
        num::mul(&p, &q, &mut pq);
        if !num::ct_eq(&pq, &n) {
            return Err(Error::InvalidKey("p * q is not n"));
        }
        let exponent = |bytes: &[u8], what: &'static str| -> Result<Exponent, Error> {
            let mut limbs = [0u64; MAX_LIMBS];
            let fits = num::from_be(bytes, &mut limbs[..half]);
            let words = words_from_limbs(&limbs[..half]);
            // The window schedule covers `half_bits`: anything above would be ignored.
            let above = words[half_bits / 64..].iter().fold(0, |acc, w| acc | w);
            if !fits || above != 0 {
                return Err(Error::InvalidKey(what));
            }
            Ok(words)
        };
        let dp = exponent(c.dp, "dp is longer than p")?;
        let dq = exponent(c.dq, "dq is longer than q")?;
        let mut qinv = vec![0u64; half];
        if !num::from_be(c.qinv, &mut qinv) {
            return Err(Error::InvalidKey("qinv is longer than p"));
        }

        let p = Prime::new(p, dp);
        let q = Prime::new(q, dq);
        let mut qinv_m = vec![0u64; half];
        // qinv * R^2 / R = qinv * R: into the domain.
        num::amm(&mut qinv_m, &qinv, &p.rr, &p.m, p.k0);
        num::cond_sub(&mut qinv_m, &p.m);
        let k0n = num::mont_k0(n[0]);
        let mut rrn = vec![0u64; 2 * half];
        num::mont_rr(&n, &mut rrn);
        let mut one_n = vec![0u64; 2 * half];
        let mut unit = vec![0u64; 2 * half];
        unit[0] = 1;
        num::amm(&mut one_n, &rrn, &unit, &n, k0n);
        Ok(Key {
            size,
            n,
            k0n,
            rrn,
            one_n,
            p,
            q,
            qinv_m,
            blinding: Mutex::new(Blinding {
                a: Vec::new(),
                a_inv: Vec::new(),
            }),
        })
    }

    /// Sets the blinding pair from a random `r`: `A = r^e`, `A^-1 = r^-1` (by Fermat's
    /// little theorem on each prime, recombined), and checks `r * r^-1 = 1`, which also
    /// proves `p`, `q` and `qinv` agree.
    pub(crate) fn init_blinding<K: Kernel>(
        &self,
        kernel: K,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), Error> {
        let len = self.size.bytes();
        let mut bytes = vec![0u8; len];
        // One byte short of the modulus: below n whatever the bytes.
        random(&mut bytes[1..]);
        let mut r = vec![0u64; self.n.len()];
        num::from_be(&bytes, &mut r);
        let minus_two = |m: &[u64]| {
            let mut t = vec![0u64; m.len()];
            num::sub(m, &[2], &mut t);
            words_from_limbs(&t)
        };
        let exps = (minus_two(&self.p.m), minus_two(&self.q.m));
        let (r_inv, a) = match self.size {
            Size::Rsa2048 => inverse_and_power::<K, 20, 40>(kernel, self, &r, &exps),
            Size::Rsa3072 => inverse_and_power::<K, 30, 60>(kernel, self, &r, &exps),
            Size::Rsa4096 => inverse_and_power::<K, 40, 80>(kernel, self, &r, &exps),
        };
        let mut check = vec![0u64; self.n.len()];
        let mut product = vec![0u64; self.n.len()];
        num::amm(&mut product, &r, &r_inv, &self.n, self.k0n);
        num::amm(&mut check, &product, &self.rrn, &self.n, self.k0n);
        num::cond_sub(&mut check, &self.n);
        let mut one = vec![0u64; self.n.len()];
        one[0] = 1;
        if !num::ct_eq(&check, &one) {
            return Err(Error::InvalidKey("p, q, dp, dq and qinv do not agree"));
        }
        let to_domain = |v: &[u64]| {
            let mut out = vec![0u64; self.n.len()];
            num::amm(&mut out, v, &self.rrn, &self.n, self.k0n);
            out
        };
        *self.blinding.lock().unwrap_or_else(|e| e.into_inner()) = Blinding {
            a: to_domain(&a),
            a_inv: to_domain(&r_inv),
        };
        Ok(())
    }

    /// The current blinding pair, squared in place for the next operation (one vector
    /// squaring with `A` and `A^-1` in two lanes, under the key's lock).
    fn take_blinding<K: Kernel, const N2: usize>(
        &self,
        kernel: K,
        a: &mut [u64],
        a_inv: &mut [u64],
    ) {
        let (mut pair, mut m) = ([L8::ZERO; N2], [L8::ZERO; N2]);
        for lane in 0..2 {
            put_lane(&mut m, lane, &self.n);
        }
        let k0 = L8([self.k0n; LANES]);
        let mut b = self.blinding.lock().unwrap_or_else(|e| e.into_inner());
        a.copy_from_slice(&b.a);
        a_inv.copy_from_slice(&b.a_inv);
        put_lane(&mut pair, 0, &b.a);
        put_lane(&mut pair, 1, &b.a_inv);
        let squared = kernel.ams(&pair, &m, &k0);
        get_lane(&squared, 0, &mut b.a);
        get_lane(&squared, 1, &mut b.a_inv);
    }
}

/// Exponent words from 52-bit limbs.
fn words_from_limbs(limbs: &[u64]) -> Exponent {
    let mut words = [0u64; 32];
    for (i, &l) in limbs.iter().enumerate() {
        let (w, s) = (i * 52 / 64, i * 52 % 64);
        words[w] |= l << s;
        if s > 12 && w + 1 < words.len() {
            words[w + 1] |= l >> (64 - s);
        }
    }
    words
}

/// Per-lane constants for one batch, transposed.
struct Lanes<const N: usize, const N2: usize> {
    n: Num<N2>,
    k0n: L8,
    rrn: Num<N2>,
    p: LanePrime<N>,
    q: LanePrime<N>,
    qinv_m: Num<N>,
}

struct LanePrime<const N: usize> {
    m: Num<N>,
    k0: L8,
    rr: Num<N>,
    rrr: Num<N>,
    one: Num<N>,
    d: [Exponent; LANES],
}

impl<const N: usize> LanePrime<N> {
    fn new(primes: &[&Prime; LANES]) -> Self {
        let mut lp = LanePrime {
            m: [L8::ZERO; N],
            k0: L8::ZERO,
            rr: [L8::ZERO; N],
            rrr: [L8::ZERO; N],
            one: [L8::ZERO; N],
            d: [[0; 32]; LANES],
        };
        for (l, p) in primes.iter().enumerate() {
            put_lane(&mut lp.m, l, &p.m);
            lp.k0.0[l] = p.k0;
            put_lane(&mut lp.rr, l, &p.rr);
            put_lane(&mut lp.rrr, l, &p.rrr);
            put_lane(&mut lp.one, l, &p.one);
            lp.d[l] = p.d;
        }
        lp
    }

    fn modulus(&self) -> Modulus<'_, N> {
        Modulus {
            m: &self.m,
            k0: &self.k0,
            one: &self.one,
        }
    }
}

impl<const N: usize, const N2: usize> Lanes<N, N2> {
    fn new(keys: &[&Key; LANES]) -> Self {
        let mut lanes = Lanes {
            n: [L8::ZERO; N2],
            k0n: L8::ZERO,
            rrn: [L8::ZERO; N2],
            p: LanePrime::new(&keys.map(|k| &k.p)),
            q: LanePrime::new(&keys.map(|k| &k.q)),
            qinv_m: [L8::ZERO; N],
        };
        for (l, k) in keys.iter().enumerate() {
            put_lane(&mut lanes.n, l, &k.n);
            lanes.k0n.0[l] = k.k0n;
            put_lane(&mut lanes.rrn, l, &k.rrn);
            put_lane(&mut lanes.qinv_m, l, &k.qinv_m);
        }
        lanes
    }
}

/// 1 in every lane.
fn unit<const N: usize>() -> Num<N> {
    let mut one = [L8::ZERO; N];
    one[0] = L8([1; LANES]);
    one
}

/// Reduces each lane below its modulus (inputs below twice the modulus).
fn reduce<const N: usize>(x: &mut Num<N>, m: &Num<N>) {
    let (mut lx, mut lm) = ([0u64; N], [0u64; N]);
    for l in 0..LANES {
        get_lane(x, l, &mut lx);
        get_lane(m, l, &mut lm);
        num::cond_sub(&mut lx, &lm);
        put_lane(x, l, &lx);
    }
}

/// `x^d mod n` by CRT for each lane, `x < n`, with the exponents given per prime.
fn crt<K: Kernel, const N: usize, const N2: usize>(
    kernel: K,
    lanes: &Lanes<N, N2>,
    x: &Num<N2>,
    dp: &[Exponent; LANES],
    dq: &[Exponent; LANES],
    half_bits: usize,
) -> Num<N2> {
    let (lo, hi): (Num<N>, Num<N>) = (
        core::array::from_fn(|i| x[i]),
        core::array::from_fn(|i| x[N + i]),
    );
    let half = |prime: &LanePrime<N>, d: &[Exponent; LANES]| -> Num<N> {
        // x = hi * R + lo, so x * R = lo * R^2 / R + hi * R^3 / R: below 4m, fine for AMM.
        let a = kernel.amm(&lo, &prime.rr, &prime.m, &prime.k0);
        let b = kernel.amm(&hi, &prime.rrr, &prime.m, &prime.k0);
        let mut xm = [L8::ZERO; N];
        let (mut la, mut lb, mut ls) = ([0u64; N], [0u64; N], [0u64; N]);
        for l in 0..LANES {
            get_lane(&a, l, &mut la);
            get_lane(&b, l, &mut lb);
            num::add(&la, &lb, &mut ls);
            put_lane(&mut xm, l, &ls);
        }
        let r = mont_exp(kernel, &xm, d, half_bits, &prime.modulus());
        let mut out = kernel.amm(&r, &unit(), &prime.m, &prime.k0);
        reduce(&mut out, &prime.m);
        out
    };
    let m1 = half(&lanes.p, dp);
    let m2 = half(&lanes.q, dq);

    // Garner: h = qinv * (m1 - m2) mod p, s = m2 + h * q. With m1 < p and m2 < q < 2p,
    // t = m1 + 2p - m2 lies in (0, 3p).
    let mut t = [L8::ZERO; N];
    let (mut l1, mut l2, mut lp, mut lt) = ([0u64; N], [0u64; N], [0u64; N], [0u64; N]);
    for l in 0..LANES {
        get_lane(&m1, l, &mut l1);
        get_lane(&m2, l, &mut l2);
        get_lane(&lanes.p.m, l, &mut lp);
        num::add(&l1, &lp, &mut lt);
        num::add(&lt, &lp, &mut l1);
        num::sub(&l1, &l2, &mut lt);
        put_lane(&mut t, l, &lt);
    }
    let mut h = kernel.amm(&t, &lanes.qinv_m, &lanes.p.m, &lanes.p.k0);
    reduce(&mut h, &lanes.p.m);
    let mut s = [L8::ZERO; N2];
    let (mut lh, mut lq, mut prod, mut sum) = ([0u64; N], [0u64; N], [0u64; N2], [0u64; N2]);
    for l in 0..LANES {
        get_lane(&h, l, &mut lh);
        get_lane(&lanes.q.m, l, &mut lq);
        get_lane(&m2, l, &mut l2);
        num::mul(&lh, &lq, &mut prod);
        num::add(&prod, &l2, &mut sum);
        put_lane(&mut s, l, &sum);
    }
    s
}

/// `s^e mod n` for each lane (e = 65537), fully reduced.
fn pow_e<K: Kernel, const N: usize, const N2: usize>(
    kernel: K,
    lanes: &Lanes<N, N2>,
    s: &Num<N2>,
) -> Num<N2> {
    let (n, k0) = (&lanes.n, &lanes.k0n);
    let sm = kernel.amm(s, &lanes.rrn, n, k0);
    let mut acc = sm;
    for _ in 0..16 {
        acc = kernel.ams(&acc, n, k0);
    }
    acc = kernel.amm(&acc, &sm, n, k0);
    let mut out = kernel.amm(&acc, &unit(), n, k0);
    reduce(&mut out, n);
    out
}

/// The blinding set-up's batch: `r^-1` (CRT with `p - 2`, `q - 2`) and `r^e`, in lane 0.
fn inverse_and_power<K: Kernel, const N: usize, const N2: usize>(
    kernel: K,
    key: &Key,
    r: &[u64],
    exps: &(Exponent, Exponent),
) -> (Vec<u64>, Vec<u64>) {
    let lanes = Lanes::<N, N2>::new(&[key; LANES]);
    let mut x = [L8::ZERO; N2];
    put_lane(&mut x, 0, r);
    let inv = crt(
        kernel,
        &lanes,
        &x,
        &[exps.0; LANES],
        &[exps.1; LANES],
        key.size.half_bits(),
    );
    let pow = pow_e(kernel, &lanes, &x);
    let (mut a, mut b) = (vec![0u64; N2], vec![0u64; N2]);
    get_lane(&inv, 0, &mut a);
    get_lane(&pow, 0, &mut b);
    (a, b)
}

/// One private-key operation in a batch.
pub(crate) struct Job<'k, 'b> {
    pub(crate) key: &'k Key,
    pub(crate) input: &'b [u8],
    pub(crate) output: &'b mut [u8],
    pub(crate) result: Result<(), Error>,
}

/// Runs up to eight jobs of one size class in one batch.
pub(crate) fn run_batch<K: Kernel>(kernel: K, size: Size, jobs: &mut [&mut Job<'_, '_>]) {
    match size {
        Size::Rsa2048 => batch::<K, 20, 40>(kernel, jobs),
        Size::Rsa3072 => batch::<K, 30, 60>(kernel, jobs),
        Size::Rsa4096 => batch::<K, 40, 80>(kernel, jobs),
    }
}

fn batch<K: Kernel, const N: usize, const N2: usize>(kernel: K, jobs: &mut [&mut Job<'_, '_>]) {
    debug_assert!(!jobs.is_empty() && jobs.len() <= LANES);
    let first = jobs[0].key;
    let keys: [&Key; LANES] = core::array::from_fn(|l| jobs.get(l).map_or(first, |j| j.key));
    let lanes = Lanes::<N, N2>::new(&keys);

    // Inputs, and the blinding pairs (dummy lanes: zero input, A = 1).
    let mut x = [L8::ZERO; N2];
    let mut a = [L8::ZERO; N2];
    let mut a_inv = [L8::ZERO; N2];
    let (mut lx, mut la, mut li, mut t) = ([0u64; N2], [0u64; N2], [0u64; N2], [0u64; N2]);
    let mut valid = [false; LANES];
    for l in 0..LANES {
        if let Some(job) = jobs.get(l) {
            // x < n, checked by the borrow of x - n: a public yes or no.
            let fits = num::from_be(job.input, &mut lx) && num::sub(&lx, &job.key.n, &mut t) == 1;
            if fits {
                job.key.take_blinding::<K, N2>(kernel, &mut la, &mut li);
                valid[l] = true;
            }
        }
        if !valid[l] {
            lx = [0; N2];
            la.copy_from_slice(&keys[l].one_n);
            li = la;
        }
        put_lane(&mut x, l, &lx);
        put_lane(&mut a, l, &la);
        put_lane(&mut a_inv, l, &li);
    }

    let mut xb = kernel.amm(&x, &a, &lanes.n, &lanes.k0n);
    reduce(&mut xb, &lanes.n);
    let s = crt(
        kernel,
        &lanes,
        &xb,
        &lanes.p.d,
        &lanes.q.d,
        keys[0].size.half_bits(),
    );
    let check = pow_e(kernel, &lanes, &s);
    let mut out = kernel.amm(&s, &a_inv, &lanes.n, &lanes.k0n);
    reduce(&mut out, &lanes.n);

    let (mut lc, mut lb, mut lo) = ([0u64; N2], [0u64; N2], [0u64; N2]);
    for (l, job) in jobs.iter_mut().enumerate() {
        if !valid[l] {
            job.result = Err(Error::InputOutOfRange);
            continue;
        }
        get_lane(&check, l, &mut lc);
        get_lane(&xb, l, &mut lb);
        if !num::ct_eq(&lc, &lb) {
            job.result = Err(Error::Fault);
            continue;
        }
        get_lane(&out, l, &mut lo);
        num::to_be(&lo, job.output);
        job.result = Ok(());
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::kernel::Portable;

    fn unit_limbs<const N: usize>() -> [u64; N] {
        let mut one = [0u64; N];
        one[0] = 1;
        one
    }

    thread_local! {
        static TRACE: RefCell<Vec<(&'static str, usize)>> = const { RefCell::new(Vec::new()) };
    }

    /// The portable kernel, recording which operation ran on which size.
    #[derive(Clone, Copy)]
    struct Trace;

    fn record(op: &'static str, n: usize) {
        TRACE.with(|t| t.borrow_mut().push((op, n)));
    }

    impl Kernel for Trace {
        fn amm_into<const N: usize>(
            self,
            out: &mut Num<N>,
            a: &Num<N>,
            b: &Num<N>,
            m: &Num<N>,
            k0: &L8,
        ) {
            record("amm", N);
            Portable.amm_into(out, a, b, m, k0);
        }
        fn ams_into<const N: usize>(self, out: &mut Num<N>, a: &Num<N>, m: &Num<N>, k0: &L8) {
            record("ams", N);
            Portable.ams_into(out, a, m, k0);
        }
        fn select_into<const N: usize>(self, out: &mut Num<N>, table: &[Num<N>; 16], idx: &L8) {
            record("select", N);
            Portable.select_into(out, table, idx);
        }
    }

    fn key() -> (Key, Vec<u8>) {
        let rsa = boring::rsa::Rsa::generate(2048).unwrap();
        let key = crate::test_common::load(&crate::Engine::portable(), &rsa).unwrap();
        (key, rsa.n().to_vec())
    }

    fn trace(jobs: &mut [Job<'_, '_>]) -> Vec<(&'static str, usize)> {
        TRACE.with(|t| t.borrow_mut().clear());
        let mut refs: Vec<&mut Job<'_, '_>> = jobs.iter_mut().collect();
        run_batch(Trace, Size::Rsa2048, &mut refs);
        assert!(jobs.iter().all(|j| j.result.is_ok()));
        TRACE.with(|t| t.take())
    }

    /// The sequence of kernel operations is the same for any keys and any inputs: nothing
    /// secret steers which operations run. Only the number of real lanes, which is public,
    /// adds one blinding update per operation. (Within the kernels, branches and addresses
    /// depend only on the size; see the crate docs.)
    #[test]
    fn the_operation_sequence_does_not_depend_on_keys_or_inputs() {
        let (k1, n1) = key();
        let (k2, n2) = key();
        let mut n2_minus_1 = n2.clone();
        *n2_minus_1.last_mut().unwrap() -= 1;
        let zero = vec![0u8; 256];
        let mut small = vec![0u8; 256];
        small[255] = 2;
        let mut n1_half = n1.clone();
        n1_half[0] >>= 1;
        let inputs = [
            (&k2, &n2_minus_1),
            (&k1, &zero),
            (&k2, &small),
            (&k1, &n1_half),
        ];
        let run = |lanes: usize, shift: usize| {
            let mut outs = vec![vec![0u8; 256]; lanes];
            let mut jobs: Vec<Job> = outs
                .iter_mut()
                .enumerate()
                .map(|(i, output)| {
                    let (key, input) = inputs[(i + shift) % inputs.len()];
                    Job {
                        key,
                        input,
                        output,
                        result: Ok(()),
                    }
                })
                .collect();
            trace(&mut jobs)
        };
        for lanes in [1, 3, 8] {
            let first = run(lanes, 0);
            assert!(first.len() > 2 * 1000, "{} operations", first.len());
            assert_eq!(first, run(lanes, 1), "{lanes} lanes");
            assert_eq!(first, run(lanes, 3), "{lanes} lanes");
        }
    }

    /// Each operation gets a fresh blinding pair (the previous one squared), and every pair
    /// is consistent: `A * (A^-1)^e = 1 mod n`.
    #[test]
    fn blinding_pairs_change_every_time_and_stay_consistent() {
        let (key, _) = key();
        let (n, k0) = (&key.n, key.k0n);
        let mut seen: Vec<Vec<u64>> = Vec::new();
        for _ in 0..4 {
            let (mut a, mut a_inv) = (vec![0u64; 40], vec![0u64; 40]);
            key.take_blinding::<_, 40>(Portable, &mut a, &mut a_inv);
            assert!(!seen.contains(&a), "a blinding factor came back");
            let mut x = a_inv.clone();
            let mut t = vec![0u64; 40];
            for _ in 0..16 {
                num::amm(&mut t, &x, &x, n, k0);
                x.copy_from_slice(&t);
            }
            num::amm(&mut t, &x, &a_inv, n, k0);
            num::amm(&mut x, &t, &a, n, k0);
            num::amm(&mut t, &x, &unit_limbs::<40>(), n, k0);
            num::cond_sub(&mut t, n);
            assert_eq!(t, unit_limbs::<40>().to_vec());
            seen.push(a);
        }
    }
}
