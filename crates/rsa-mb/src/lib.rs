//! Multi-buffer RSA: eight private-key operations at once, one per 64-bit lane of the
//! AVX-512 IFMA multiplier, for 2048-, 3072- and 4096-bit keys with `e = 65537`.
//!
//! This is the arithmetic behind the batching key provider in `hypha-keys`: TLS handshakes
//! queue their RSA operations there, and a full (or timed-out) queue becomes one call to
//! [`Engine::private_batch`]. The engine computes the raw operation `x^d mod n`; padding
//! (PKCS#1 v1.5, PSS) and its checks belong to the caller, as with BoringSSL's
//! `RSA_NO_PADDING`.
//!
//! Numbers are held in 52-bit limbs and multiplied with Almost Montgomery Multiplication;
//! each operation uses the CRT (two half-size exponentiations and Garner's recombination),
//! base blinding, and a check of `s^e = x` before the result leaves the engine.
//!
//! # Constant time
//!
//! No branch and no memory address depends on secret data: every lane of a size class runs
//! the same instruction sequence (4-bit fixed windows over the full exponent length, table
//! entries selected by masks over all sixteen entries, conditional subtractions by masks).
//! Checked two ways: `rsa::tests` records the kernel operations a batch runs and requires the
//! same sequence for different keys, inputs and numbers of real lanes; inside the kernels,
//! loop bounds and addresses are functions of the size alone, and the instructions used
//! (IFMA multiply-adds, shifts, masked moves) have data-independent timing. A dudect-style
//! statistical check (`benches/dudect.rs`: fixed vs random inputs, one key vs another, Welch's
//! t on cropped timings) found no difference on the development machine; its figures are in
//! `docs/benchmarks.md`.
//!
//! # Backends
//!
//! [`Engine::detect`] uses the AVX-512 IFMA kernel when the CPU has it (checked at run
//! time) and the portable kernel otherwise; [`Engine::portable`] forces the portable one.
//! `unsafe` code exists only in the `ifma` module.

mod exp;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod ifma;
mod kernel;
mod num;
mod rsa;

// The integration tests' helpers, for the unit tests too (they name the crate by its name).
#[cfg(test)]
extern crate self as hypha_rsa_mb;
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
mod test_common;

pub use rsa::{Components, Key, Size, E};

use kernel::Portable;
use rsa::Job;

/// Lanes per batch: the most operations one call computes together.
pub const BATCH: usize = kernel::LANES;

/// Why a key or an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The modulus is not 2048, 3072 or 4096 bits.
    #[error("RSA modulus of {0} bits is not supported (2048, 3072 and 4096 are)")]
    UnsupportedSize(usize),
    /// The public exponent is not 65537.
    #[error("RSA public exponent is not 65537")]
    UnsupportedExponent,
    /// The components are inconsistent or outside what the engine handles.
    #[error("invalid RSA key: {0}")]
    InvalidKey(&'static str),
    /// Input or output length differs from the modulus length.
    #[error("expected {expected} bytes for this key, got {got}")]
    Length { expected: usize, got: usize },
    /// The input is not below the modulus.
    #[error("input is not below the RSA modulus")]
    InputOutOfRange,
    /// The result failed its `s^e = x` check: it was withheld.
    #[error("RSA result failed its consistency check and was withheld")]
    Fault,
}

/// One operation of a batch: `output = input^d mod n` for `key`, both big-endian and as
/// long as the modulus. `result` is set by [`Engine::private_batch`].
pub struct Op<'k, 'b> {
    job: Job<'k, 'b>,
}

impl<'k, 'b> Op<'k, 'b> {
    pub fn new(key: &'k Key, input: &'b [u8], output: &'b mut [u8]) -> Self {
        Op {
            job: Job {
                key,
                input,
                output,
                result: Ok(()),
            },
        }
    }

    /// The outcome, once the batch has run.
    pub fn result(&self) -> Result<(), Error> {
        self.job.result.clone()
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Ifma(ifma::Ifma),
}

/// The engine: which kernel computes. Cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct Engine {
    backend: Backend,
}

impl Engine {
    /// The fastest kernel this CPU runs: AVX-512 IFMA if present, else portable.
    pub fn detect() -> Engine {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = ifma::Ifma::detect() {
            return Engine {
                backend: Backend::Ifma(k),
            };
        }
        Engine::portable()
    }

    /// The portable kernel, whatever the CPU.
    pub fn portable() -> Engine {
        Engine {
            backend: Backend::Portable,
        }
    }

    /// Whether this engine uses the vector kernel.
    pub fn is_accelerated(&self) -> bool {
        !matches!(self.backend, Backend::Portable)
    }

    /// The kernel's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Backend::Ifma(_) => "avx512ifma",
        }
    }

    /// Checks and prepares a key. `random` fills a buffer with random bytes; it seeds the
    /// key's blinding. The set-up runs one private operation to prove the components agree.
    pub fn key(
        &self,
        components: &Components<'_>,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Key, Error> {
        let key = Key::prepare(components)?;
        match self.backend {
            Backend::Portable => key.init_blinding(Portable, random)?,
            #[cfg(target_arch = "x86_64")]
            Backend::Ifma(k) => key.init_blinding(k, random)?,
        }
        Ok(key)
    }

    /// Computes every operation in `ops`, eight at a time per size class; keys may differ
    /// within a batch. Each op's outcome is in [`Op::result`].
    pub fn private_batch(&self, ops: &mut [Op<'_, '_>]) {
        for size in [Size::Rsa2048, Size::Rsa3072, Size::Rsa4096] {
            let mut chunk: Vec<&mut Job<'_, '_>> = Vec::with_capacity(BATCH);
            for op in ops.iter_mut() {
                let job = &mut op.job;
                if job.key.size() != size {
                    continue;
                }
                let expected = size.bytes();
                let got = if job.input.len() == expected {
                    job.output.len()
                } else {
                    job.input.len()
                };
                if got != expected {
                    job.result = Err(Error::Length { expected, got });
                    continue;
                }
                chunk.push(job);
                if chunk.len() == BATCH {
                    self.run(size, &mut chunk);
                    chunk.clear();
                }
            }
            if !chunk.is_empty() {
                self.run(size, &mut chunk);
            }
        }
    }

    /// One operation on its own (a batch of one).
    pub fn private(&self, key: &Key, input: &[u8], output: &mut [u8]) -> Result<(), Error> {
        let mut ops = [Op::new(key, input, output)];
        self.private_batch(&mut ops);
        ops[0].result()
    }

    fn run(&self, size: Size, jobs: &mut [&mut Job<'_, '_>]) {
        match self.backend {
            Backend::Portable => rsa::run_batch(Portable, size, jobs),
            #[cfg(target_arch = "x86_64")]
            Backend::Ifma(k) => rsa::run_batch(k, size, jobs),
        }
    }
}
