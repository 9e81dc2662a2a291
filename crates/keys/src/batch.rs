//! The batching RSA provider, Hypha's form of Istio's `privateKeyProvider.cryptomb`:
//! concurrent handshakes queue their RSA private-key operations, and eight of them (or as
//! many as arrived within the poll delay) are computed together by the multi-buffer engine
//! (`hypha-rsa-mb`, AVX-512 IFMA).
//!
//! A handshake's operation goes to the queue of the thread it runs on, so each proxy worker
//! feeds one queue, as Envoy's per-worker queues do. The operation that fills a queue to
//! eight computes the batch right there, on its worker (flush reason "full"), as Envoy does:
//! no thread hand-off, and the other seven handshakes, on the same worker, find their
//! results ready. A queue that does not fill is computed by the timer thread once its oldest
//! operation has waited the poll delay ("timer"): no operation waits longer than the delay
//! before its batch starts. When operations have been arriving further apart than the delay
//! (a quiet proxy), waiting would not bring a second one, so the operation is computed at
//! once ("idle"). A batch of one is computed by BoringSSL, which is faster than the engine
//! for a single operation. The handshake's future resolves when its result is back.
//!
//! Keys the engine does not take (ECDSA; RSA of other sizes or exponents) and every key on a
//! CPU without AVX-512 IFMA use the software path instead, each reason logged once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boring::pkey::{PKey, Private, Public};
use boring::rsa::{Padding, Rsa};
use boring::ssl::SslSignatureAlgorithm;
use hypha_rsa_mb::{Components, Engine, Op, BATCH};
use tokio::sync::oneshot;

use crate::metrics::{Histogram, Timings};
use crate::{padding, scheme, KeyError, KeyFuture, KeyProvider, SoftwareKey};

/// How the batcher runs: Istio's `cryptomb` fields, plus the number of queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// The longest an operation waits for seven others before its batch is computed anyway.
    pub poll_delay: Duration,
    /// On a CPU without AVX-512 IFMA: use the software path (true) or refuse to start (false).
    pub fallback: bool,
    /// Queues: one per proxy worker thread (a thread feeds queue `its number % queues`).
    pub queues: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            poll_delay: DEFAULT_POLL_DELAY,
            fallback: false,
            queues: 1,
        }
    }
}

/// Istio's default: long enough for a burst of handshakes to fill a batch, short next to a
/// handshake's round trips.
pub const DEFAULT_POLL_DELAY: Duration = Duration::from_millis(10);

/// A key in both forms: the engine's, and BoringSSL's for batches of one.
struct BatchKey {
    engine: hypha_rsa_mb::Key,
    rsa: Rsa<Private>,
}

/// One queued operation.
struct Request {
    key: Arc<BatchKey>,
    input: Vec<u8>,
    queued: Instant,
    reply: oneshot::Sender<Result<Vec<u8>, KeyError>>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    full: AtomicU64,
    timer: AtomicU64,
    idle: AtomicU64,
    /// Batches by how many real operations they held (index 0 = one).
    sizes: [AtomicU64; BATCH],
    queue_wait: Timings,
    fallback_keys: AtomicU64,
    batched_keys: AtomicU64,
}

/// What the batcher has done, for `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMetrics {
    /// The engine's kernel (`avx512ifma`), or `off` when every key falls back.
    pub engine: &'static str,
    pub queues: usize,
    pub ok: u64,
    pub failed: u64,
    /// Batches computed because eight operations were queued.
    pub flushed_full: u64,
    /// Batches computed because the poll delay expired.
    pub flushed_timer: u64,
    /// Batches computed at once because operations arrive further apart than the delay.
    pub flushed_idle: u64,
    /// Batches by size: `batch_sizes[i]` held `i + 1` operations.
    pub batch_sizes: [u64; BATCH],
    /// Time from queueing to the start of the operation's batch.
    pub queue_wait: Histogram,
    /// Keys handed to the software path, and to the engine.
    pub fallback_keys: u64,
    pub batched_keys: u64,
}

/// Why a batch was computed.
#[derive(Clone, Copy)]
enum Flush {
    Full,
    Timer,
    Idle,
}

/// One worker's queue of operations waiting for their batch.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    batch: Vec<Request>,
    /// Counts the batches taken, so a timer armed for an earlier batch does nothing.
    generation: u64,
    arrivals: Arrivals,
}

/// What the workers and the timer thread share: the engine, the queues, the counters.
struct Shared {
    engine: Engine,
    delay: Duration,
    queues: Vec<Queue>,
    counters: Arc<Counters>,
}

/// A timer for queue `queue`'s batch number `generation`.
struct Deadline {
    at: Instant,
    queue: usize,
    generation: u64,
}

/// The shared batcher: per-worker queues, the timer thread, and metrics. Create one per
/// process.
pub struct Batcher {
    config: BatchConfig,
    /// `None` when the engine is off (no IFMA, fallback allowed).
    shared: Option<Arc<Shared>>,
    timer: Option<mpsc::Sender<Deadline>>,
    counters: Arc<Counters>,
    /// Fallback reasons already logged.
    logged: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.config)
            .field("engine", &self.engine_name())
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// A batcher on the best engine this CPU runs.
    pub fn new(config: BatchConfig) -> Result<Arc<Batcher>, KeyError> {
        Batcher::with_engine(config, Engine::detect())
    }

    /// A batcher on `engine`; a portable engine counts as a CPU without AVX-512 IFMA.
    pub fn with_engine(config: BatchConfig, engine: Engine) -> Result<Arc<Batcher>, KeyError> {
        let engine = if engine.is_accelerated() {
            Some(engine)
        } else if config.fallback {
            tracing::info!(
                "multi-buffer RSA is off: this CPU has no AVX-512 IFMA, so RSA keys sign with \
                 BoringSSL (privateKeyProvider.cryptomb.fallback is true)"
            );
            None
        } else {
            return Err(KeyError::Backend(
                "multi-buffer RSA needs AVX-512 IFMA, which this CPU lacks; set \
                 privateKeyProvider.cryptomb.fallback to use BoringSSL instead"
                    .into(),
            ));
        };
        let counters = Arc::new(Counters::default());
        let (mut shared, mut timer) = (None, None);
        if let Some(engine) = engine {
            let queues = config.queues.max(1);
            let state = Arc::new(Shared {
                engine,
                delay: config.poll_delay,
                queues: (0..queues).map(|_| Queue::default()).collect(),
                counters: counters.clone(),
            });
            let (tx, rx) = mpsc::channel();
            let for_timer = state.clone();
            std::thread::Builder::new()
                .name("hypha-rsa-mb-timer".into())
                .spawn(move || run_timer(&for_timer, &rx))
                .map_err(|e| KeyError::Backend(format!("batcher timer thread: {e}")))?;
            shared = Some(state);
            timer = Some(tx);
            tracing::info!(
                engine = engine.name(),
                queues,
                poll_delay = ?config.poll_delay,
                "multi-buffer RSA batcher started"
            );
        }
        Ok(Arc::new(Batcher {
            config,
            shared,
            timer,
            counters,
            logged: Mutex::new(HashSet::new()),
        }))
    }

    /// The provider for `key`: batched if the engine takes it, else software (the reason
    /// logged once per batcher).
    pub fn provider(
        self: &Arc<Self>,
        key: PKey<Private>,
    ) -> Result<Arc<dyn KeyProvider>, KeyError> {
        match self.qualify(&key) {
            Ok(engine_key) => {
                self.counters.batched_keys.fetch_add(1, Ordering::Relaxed);
                let public = PKey::public_key_from_der(&key.public_key_to_der()?)?;
                let bits = engine_key.size().bits();
                Ok(Arc::new(BatchedRsaKey {
                    key: Arc::new(BatchKey {
                        engine: engine_key,
                        rsa: key.rsa()?,
                    }),
                    public,
                    bits,
                    batcher: self.clone(),
                }))
            }
            Err(reason) => {
                self.counters.fallback_keys.fetch_add(1, Ordering::Relaxed);
                let first = self
                    .logged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(reason.clone());
                if first {
                    tracing::info!("key not batched, BoringSSL signs it: {reason}");
                }
                Ok(Arc::new(SoftwareKey::new(key)?))
            }
        }
    }

    /// The engine's form of `key`, or why it does not qualify.
    fn qualify(&self, key: &PKey<Private>) -> Result<hypha_rsa_mb::Key, String> {
        let Some(engine) = self.shared.as_ref().map(|s| s.engine) else {
            return Err("this CPU has no AVX-512 IFMA".into());
        };
        let Ok(rsa) = key.rsa() else {
            return Err("the key is not RSA (ECDSA keys are signed in software)".into());
        };
        let part = |b: Option<&boring::bn::BigNumRef>| b.map(|b| b.to_vec()).unwrap_or_default();
        let parts = [
            rsa.n().to_vec(),
            rsa.e().to_vec(),
            part(rsa.p()),
            part(rsa.q()),
            part(rsa.dmp1()),
            part(rsa.dmq1()),
            part(rsa.iqmp()),
        ];
        let [n, e, p, q, dp, dq, qinv] = &parts;
        engine
            .key(
                &Components {
                    n,
                    e,
                    p,
                    q,
                    dp,
                    dq,
                    qinv,
                },
                &mut |b| {
                    boring::rand::rand_bytes(b).expect("the system random generator failed");
                },
            )
            .map_err(|e| format!("RSA-{}: {e}", rsa.size() * 8))
    }

    /// Queues one operation on the calling thread's queue; computes the batch here if this
    /// operation fills it, or if the queue is quiet.
    fn submit(
        &self,
        key: Arc<BatchKey>,
        input: Vec<u8>,
    ) -> oneshot::Receiver<Result<Vec<u8>, KeyError>> {
        let (reply, rx) = oneshot::channel();
        let Some(shared) = &self.shared else {
            // No engine: no `BatchedRsaKey` is ever made, so this is not reached; answer anyway.
            let _ = reply.send(Err(KeyError::Backend(
                "the multi-buffer RSA engine is off".into(),
            )));
            return rx;
        };
        let now = Instant::now();
        let index = thread_slot() % shared.queues.len();
        let mut state = shared.queues[index]
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        state.arrivals.note(now, shared.delay);
        state.batch.push(Request {
            key,
            input,
            queued: now,
            reply,
        });
        let flush = if state.batch.len() >= BATCH {
            Some(Flush::Full)
        } else if state.batch.len() == 1 && state.arrivals.gap > shared.delay {
            Some(Flush::Idle)
        } else {
            if state.batch.len() == 1 {
                if let Some(timer) = &self.timer {
                    let _ = timer.send(Deadline {
                        at: now + shared.delay,
                        queue: index,
                        generation: state.generation,
                    });
                }
            }
            None
        };
        if let Some(reason) = flush {
            let batch = std::mem::replace(&mut state.batch, Vec::with_capacity(BATCH));
            state.generation += 1;
            drop(state);
            shared.run(batch, reason);
        }
        rx
    }

    /// The engine's kernel, or `off`.
    fn engine_name(&self) -> &'static str {
        self.shared.as_ref().map_or("off", |s| s.engine.name())
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    pub fn metrics(&self) -> BatchMetrics {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BatchMetrics {
            engine: self.engine_name(),
            queues: self.shared.as_ref().map_or(0, |s| s.queues.len()),
            ok: load(&c.ok),
            failed: load(&c.failed),
            flushed_full: load(&c.full),
            flushed_timer: load(&c.timer),
            flushed_idle: load(&c.idle),
            batch_sizes: core::array::from_fn(|i| load(&c.sizes[i])),
            queue_wait: c.queue_wait.snapshot(),
            fallback_keys: load(&c.fallback_keys),
            batched_keys: load(&c.batched_keys),
        }
    }
}

/// This thread's queue number: threads are numbered in the order they first submit.
fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|s| *s)
}

/// How far apart operations have been arriving on one queue: an exponentially weighted
/// average of the gaps, so a quiet queue computes at once instead of waiting for company.
#[derive(Default)]
struct Arrivals {
    last: Option<Instant>,
    gap: Duration,
}

impl Arrivals {
    fn note(&mut self, at: Instant, delay: Duration) {
        if let Some(last) = self.last {
            // Gaps beyond ten delays say "quiet" as well as longer ones would.
            let gap = at.saturating_duration_since(last).min(delay * 10);
            self.gap = (self.gap * 3 + gap) / 4;
        }
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
    }
}

impl Shared {
    /// Computes `batch` on this thread and answers each operation.
    fn run(&self, batch: Vec<Request>, reason: Flush) {
        let counters = &self.counters;
        let start = Instant::now();
        let counter = match reason {
            Flush::Full => &counters.full,
            Flush::Timer => &counters.timer,
            Flush::Idle => &counters.idle,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        counters.sizes[batch.len() - 1].fetch_add(1, Ordering::Relaxed);
        for r in &batch {
            counters
                .queue_wait
                .observe(start.saturating_duration_since(r.queued));
        }
        let results = compute(self.engine, &batch);
        for (request, result) in batch.into_iter().zip(results) {
            let counter = if result.is_ok() {
                &counters.ok
            } else {
                &counters.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            // The handshake may be gone (closed mid-way): nobody to answer.
            let _ = request.reply.send(result);
        }
    }
}

/// The timer thread: computes each queue's batch whose oldest operation has waited the poll
/// delay, unless the batch was taken (full, idle) meanwhile. Ends with the batcher.
fn run_timer(shared: &Shared, rx: &mpsc::Receiver<Deadline>) {
    let mut due: Vec<Deadline> = Vec::new();
    loop {
        let next = due.iter().map(|d| d.at).min();
        let received = match next {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match received {
            Ok(d) => {
                due.push(d);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<Deadline>, Vec<Deadline>) =
            due.drain(..).partition(|d| d.at <= now);
        due = waiting;
        for d in ready {
            let mut state = shared.queues[d.queue]
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if state.generation != d.generation || state.batch.is_empty() {
                continue;
            }
            let batch = std::mem::replace(&mut state.batch, Vec::with_capacity(BATCH));
            state.generation += 1;
            drop(state);
            shared.run(batch, Flush::Timer);
        }
    }
}

/// The batch's results: one operation by BoringSSL, more by the engine, all at once.
fn compute(engine: Engine, batch: &[Request]) -> Vec<Result<Vec<u8>, KeyError>> {
    if let [one] = batch {
        let mut out = vec![0u8; one.key.engine.size().bytes()];
        let result = one
            .key
            .rsa
            .private_decrypt(&one.input, &mut out, Padding::NONE)
            .map_err(KeyError::from)
            .and_then(|n| {
                (n == out.len())
                    .then_some(out)
                    .ok_or_else(|| KeyError::Backend("raw RSA returned a short result".into()))
            });
        return vec![result];
    }
    let mut outputs: Vec<Vec<u8>> = batch
        .iter()
        .map(|r| vec![0u8; r.key.engine.size().bytes()])
        .collect();
    let results: Vec<Result<(), hypha_rsa_mb::Error>> = {
        let mut ops: Vec<Op> = batch
            .iter()
            .zip(outputs.iter_mut())
            .map(|(r, out)| Op::new(&r.key.engine, &r.input, out))
            .collect();
        engine.private_batch(&mut ops);
        ops.iter().map(Op::result).collect()
    };
    outputs
        .into_iter()
        .zip(results)
        .map(|(out, r)| {
            r.map(|()| out)
                .map_err(|e| KeyError::Backend(e.to_string()))
        })
        .collect()
}

/// An RSA key whose private operations go through the batcher.
pub struct BatchedRsaKey {
    key: Arc<BatchKey>,
    public: PKey<Public>,
    bits: usize,
    batcher: Arc<Batcher>,
}

impl std::fmt::Debug for BatchedRsaKey {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl BatchedRsaKey {
    fn queue(&self, input: Vec<u8>) -> KeyFuture<Vec<u8>> {
        let rx = self.batcher.submit(self.key.clone(), input);
        Box::pin(async move {
            rx.await
                .map_err(|_| KeyError::Backend("the multi-buffer RSA engine stopped".into()))?
        })
    }
}

impl KeyProvider for BatchedRsaKey {
    fn public_key(&self) -> &PKey<Public> {
        &self.public
    }

    fn sign(&self, algorithm: SslSignatureAlgorithm, input: &[u8]) -> KeyFuture<Vec<u8>> {
        let encoded = match scheme(algorithm) {
            Ok((md, Some(Padding::PKCS1))) => padding::pkcs1_v15(md, input, self.bits / 8),
            Ok((md, Some(Padding::PKCS1_PSS))) => padding::pss(md, input, self.bits),
            Ok(_) => Err(KeyError::Algorithm(algorithm.to_string())),
            Err(e) => Err(e),
        };
        match encoded {
            Ok(em) => self.queue(em),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn decrypt(&self, input: &[u8]) -> KeyFuture<Vec<u8>> {
        self.queue(input.to_vec())
    }

    fn describe(&self) -> String {
        format!(
            "multi-buffer RSA-{} ({}, poll delay {:?})",
            self.bits,
            self.batcher.engine_name(),
            self.batcher.config.poll_delay
        )
    }
}
