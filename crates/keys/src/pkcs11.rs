//! Keys inside a PKCS#11 token (an HSM, an enclave behind a PKCS#11 library, SoftHSM2 in
//! tests): generated in the token as sensitive and not extractable, used only through it.
//!
//! PKCS#11 calls block, so they run on a small dedicated pool of threads, each with its own
//! session ([`Token`]); a signature is a job sent to the pool and a future that resolves when
//! a thread has done it. A token that takes 50 ms per signature slows only the handshakes that
//! wait for one; the async runtime keeps serving everything else.
//!
//! A workload key is a session object, and [`TokenKey`] destroys it when the last user lets go
//! (a rotated-out certificate, a certificate request the CA refused): a token holds only the
//! keys in use, however long the process runs. Persistent keys (a CA's) and keys found by
//! label are never destroyed.
//!
//! Start-up code that has no runtime to await on (the CA opening its signer) uses the
//! `*_blocking` forms, which wait on the calling thread: never an async worker (they panic there,
//! through tokio's `blocking_recv`, rather than stall the runtime).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use boring::bn::BigNum;
use boring::ec::{EcGroup, EcKey, EcPoint};
use boring::ecdsa::EcdsaSig;
use boring::hash::{hash, MessageDigest};
use boring::nid::Nid;
use boring::pkey::{PKey, Public};
use boring::rsa::Rsa;
use boring::ssl::SslSignatureAlgorithm;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use crate::{KeyError, KeyFuture, KeyProvider};

/// The PKCS#11 library at `path`, loaded once and kept for the life of the process: a module is
/// process-wide anyway, and unloading it (`dlclose`, when a token's last thread let go of it)
/// while the process exits raced the library's own teardown (SoftHSM crashed at exit).
pub fn module(path: &std::path::Path) -> Result<Pkcs11, KeyError> {
    static LOADED: std::sync::OnceLock<Mutex<std::collections::HashMap<PathBuf, Pkcs11>>> =
        std::sync::OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = loaded.get(path) {
        return Ok(p.clone());
    }
    let p = Pkcs11::new(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    loaded.insert(path.to_owned(), p.clone());
    Ok(p)
}

/// Where the PIN comes from: never from the command line or the config itself.
#[derive(Debug, Clone)]
pub enum PinSource {
    /// An environment variable.
    Env(String),
    /// A file (its first line).
    File(PathBuf),
}

impl PinSource {
    fn read(&self) -> Result<AuthPin, KeyError> {
        let pin = match self {
            PinSource::Env(var) => std::env::var(var)
                .map_err(|_| KeyError::Backend(format!("PIN variable {var} is not set")))?,
            PinSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| KeyError::Backend(format!("PIN file {}: {e}", path.display())))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        Ok(AuthPin::from(pin))
    }
}

/// How to reach a token.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label (slot numbers change; labels do not).
    pub label: String,
    pub pin: PinSource,
    /// Threads (one session each) doing the token's work.
    pub threads: usize,
}

/// What a token says about itself (`C_GetTokenInfo`, padding trimmed) and the module it is
/// reached through: what an attestation policy judges before the token is logged in to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenInfo {
    pub module: PathBuf,
    pub label: String,
    pub manufacturer_id: String,
    pub model: String,
    pub serial_number: String,
}

/// The kind of key generated in a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeyKind {
    EcdsaP256,
    Rsa(u32),
}

/// Where a token thread sends the outcome of a job.
type Reply<T> = tokio::sync::oneshot::Sender<Result<T, KeyError>>;

/// Where a caller waits for a job's outcome.
type Receiver<T> = tokio::sync::oneshot::Receiver<Result<T, KeyError>>;

/// A key found or generated in the token, as a token thread hands it back.
type Found = (ObjectHandle, PKey<Public>, TokenKeyKind);

enum Job {
    Find {
        label: String,
        reply: Reply<Option<Found>>,
    },
    Generate {
        kind: TokenKeyKind,
        label: String,
        persistent: bool,
        reply: Reply<(ObjectHandle, PKey<Public>)>,
    },
    Sign {
        key: ObjectHandle,
        mechanism: Mech,
        data: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    /// Raw RSA (`CKM_RSA_X_509`).
    Decrypt {
        key: ObjectHandle,
        data: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    /// A session key nobody uses any more.
    Destroy { key: ObjectHandle },
    /// How many session objects the token holds for this process.
    CountSessionObjects { reply: Reply<usize> },
}

/// A signing mechanism, sent to a token thread (cryptoki's `Mechanism` is not `Send`).
#[derive(Debug, Clone, Copy)]
enum Mech {
    Ecdsa,
    RsaPkcs,
    /// PSS with SHA-256/384/512 (the digest's size in bytes) and MGF1 of the same.
    RsaPss(usize),
}

impl Mech {
    fn mechanism(self) -> Result<Mechanism<'static>, KeyError> {
        Ok(match self {
            Mech::Ecdsa => Mechanism::Ecdsa,
            Mech::RsaPkcs => Mechanism::RsaPkcs,
            Mech::RsaPss(size) => Mechanism::RsaPkcsPss(pss_params(size)?),
        })
    }
}

fn backend(e: impl std::fmt::Display) -> KeyError {
    KeyError::Backend(e.to_string())
}

use crate::metrics::Timings;
pub use crate::metrics::{Histogram, SECONDS_BUCKETS};

/// A job as the pool holds it: when it was queued, for the wait metric.
struct Queued {
    job: Job,
    at: Instant,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    signed: AtomicU64,
    sign_failed: AtomicU64,
    generated: AtomicU64,
    destroyed: AtomicU64,
    abandoned: AtomicU64,
    sign_time: Timings,
    wait_time: Timings,
}

/// What a token's threads have done, for `/metrics`: signatures (done and failed), keys
/// generated, jobs waiting for a thread now, and how long signatures and waits took.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMetrics {
    pub label: String,
    pub threads: usize,
    pub queued: u64,
    pub signed: u64,
    pub sign_failed: u64,
    pub generated: u64,
    /// Session keys destroyed once nothing used them.
    pub destroyed: u64,
    /// Operations whose caller was gone (a handshake dropped) before a thread took them:
    /// skipped, so a slow token does not work through dead handshakes.
    pub abandoned: u64,
    /// Time a thread spent in the token's sign call.
    pub sign_time: Histogram,
    /// Time a job waited for a free thread.
    pub wait_time: Histogram,
}

/// An open token: a pool of threads with a logged-in session each.
pub struct Token {
    jobs: Mutex<mpsc::Sender<Queued>>,
    label: String,
    threads: usize,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module, finds the token by label, logs in and starts the threads.
    pub fn open(cfg: &TokenConfig) -> Result<Arc<Token>, KeyError> {
        Self::open_checked(cfg, |_| Ok::<(), KeyError>(()))
    }

    /// [`Token::open`], with `check` judging the token's [`TokenInfo`] first: a token it refuses
    /// is never logged in to (its PIN is not even read).
    pub fn open_checked<E: From<KeyError>>(
        cfg: &TokenConfig,
        check: impl FnOnce(&TokenInfo) -> Result<(), E>,
    ) -> Result<Arc<Token>, E> {
        let pkcs11 = module(&cfg.module)?;
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another user of the same module in this process initialized it already (the
            // library is process-wide): use it as it is.
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::CryptokiAlreadyInitialized,
                _,
            )) => {}
            Err(e) => return Err(backend(e).into()),
        }
        let (slot, info) = pkcs11
            .get_slots_with_token()
            .map_err(backend)?
            .into_iter()
            .find_map(|s| {
                let i = pkcs11.get_token_info(s).ok()?;
                (i.label().trim_end() == cfg.label).then_some((s, i))
            })
            .ok_or_else(|| backend(format!("no token labelled {:?}", cfg.label)))?;
        check(&TokenInfo {
            module: cfg.module.clone(),
            label: info.label().trim_end().to_owned(),
            manufacturer_id: info.manufacturer_id().trim_end().to_owned(),
            model: info.model().trim_end().to_owned(),
            serial_number: info.serial_number().trim_end().to_owned(),
        })?;
        Ok(Self::start(&pkcs11, slot, cfg)?)
    }

    /// Logs in and starts the threads, a session each.
    fn start(
        pkcs11: &Pkcs11,
        slot: cryptoki::slot::Slot,
        cfg: &TokenConfig,
    ) -> Result<Arc<Token>, KeyError> {
        let pin = cfg.pin.read()?;
        let (tx, rx) = mpsc::channel::<Queued>();
        let rx = Arc::new(Mutex::new(rx));
        let counters = Arc::new(Counters::default());
        let mut logged_in = false;
        let threads = cfg.threads.max(1);
        for i in 0..threads {
            let session = pkcs11.open_rw_session(slot).map_err(backend)?;
            if !logged_in {
                match session.login(UserType::User, Some(&pin)) {
                    // Logins are per application and token: already done by another user of
                    // the token in this process.
                    Ok(())
                    | Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::UserAlreadyLoggedIn,
                        _,
                    )) => {}
                    Err(e) => {
                        return Err(backend(format!("logging in to token {:?}: {e}", cfg.label)))
                    }
                }
                logged_in = true;
            }
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("pkcs11-{i}"))
                .spawn({
                    let counters = counters.clone();
                    move || worker(&session, &rx, &counters)
                })
                .map_err(backend)?;
        }
        Ok(Arc::new(Token {
            jobs: Mutex::new(tx),
            label: cfg.label.clone(),
            threads,
            counters,
        }))
    }

    fn submit(&self, job: Job) -> Result<(), KeyError> {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Queued {
                job,
                at: Instant::now(),
            });
        sent.map_err(|_| {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            backend("the token's threads are gone")
        })
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// What the token's threads have done so far.
    pub fn metrics(&self) -> TokenMetrics {
        let c = &self.counters;
        TokenMetrics {
            label: self.label.clone(),
            threads: self.threads,
            queued: c.queued.load(Ordering::Relaxed),
            signed: c.signed.load(Ordering::Relaxed),
            sign_failed: c.sign_failed.load(Ordering::Relaxed),
            generated: c.generated.load(Ordering::Relaxed),
            destroyed: c.destroyed.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
            sign_time: c.sign_time.snapshot(),
            wait_time: c.wait_time.snapshot(),
        }
    }

    /// Sends a job to the pool; the receiver gets its outcome.
    fn request<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<Receiver<T>, KeyError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(job(reply))?;
        Ok(rx)
    }

    /// A key handed out; an `owned` one is destroyed when dropped.
    fn key(
        self: &Arc<Self>,
        handle: ObjectHandle,
        public: PKey<Public>,
        kind: TokenKeyKind,
        owned: bool,
    ) -> TokenKey {
        TokenKey {
            token: self.clone(),
            handle,
            public,
            kind,
            owned,
        }
    }

    /// How many session objects (keys and their public halves) the token holds for this
    /// process now: what [`TokenKey`]'s clean-up leaves.
    pub async fn session_objects(&self) -> Result<usize, KeyError> {
        let rx = self.request(|reply| Job::CountSessionObjects { reply })?;
        rx.await.map_err(|_| thread_died())?
    }

    /// Generates a key pair inside the token (sensitive, not extractable); only its public
    /// half ever leaves. A `persistent` key is a token object (a CA key); otherwise a session
    /// object (a workload key, renewed anyway), destroyed when the returned key is dropped.
    pub async fn generate(
        self: &Arc<Self>,
        kind: TokenKeyKind,
        label: &str,
        persistent: bool,
    ) -> Result<TokenKey, KeyError> {
        let rx = self.request_generate(kind, label, persistent)?;
        let (handle, public) = rx.await.map_err(|_| thread_died())??;
        Ok(self.key(handle, public, kind, !persistent))
    }

    /// [`Token::generate`], waiting on this thread (see the module docs).
    pub fn generate_blocking(
        self: &Arc<Self>,
        kind: TokenKeyKind,
        label: &str,
        persistent: bool,
    ) -> Result<TokenKey, KeyError> {
        let rx = self.request_generate(kind, label, persistent)?;
        let (handle, public) = rx.blocking_recv().map_err(|_| thread_died())??;
        Ok(self.key(handle, public, kind, !persistent))
    }

    /// Queues a key generation; the receiver gets the new key's handle and public half.
    fn request_generate(
        &self,
        kind: TokenKeyKind,
        label: &str,
        persistent: bool,
    ) -> Result<Receiver<(ObjectHandle, PKey<Public>)>, KeyError> {
        self.request(|reply| Job::Generate {
            kind,
            label: label.to_owned(),
            persistent,
            reply,
        })
    }

    /// The persistent key (token object) labelled `label`, if the token holds one, waiting on
    /// this thread (see the module docs). A key that could leave the token (not sensitive, or
    /// extractable) is refused, as is a label on more than one private key.
    pub fn find_blocking(self: &Arc<Self>, label: &str) -> Result<Option<TokenKey>, KeyError> {
        let rx = self.request(|reply| Job::Find {
            label: label.to_owned(),
            reply,
        })?;
        let found = rx.blocking_recv().map_err(|_| thread_died())??;
        Ok(found.map(|(handle, public, kind)| self.key(handle, public, kind, false)))
    }
}

fn thread_died() -> KeyError {
    backend("the token's thread died")
}

/// Each thread takes the next job and does it on its own session.
fn worker(session: &Session, jobs: &Mutex<mpsc::Receiver<Queued>>, counters: &Counters) {
    loop {
        let Ok(Queued { job, at }) = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() else {
            return;
        };
        counters.queued.fetch_sub(1, Ordering::Relaxed);
        counters.wait_time.observe(at.elapsed());
        match job {
            Job::Find { label, reply } => {
                let _ = reply.send(find(session, &label));
            }
            Job::Generate {
                kind,
                label,
                persistent,
                reply,
            } => {
                let generated = generate(session, kind, &label, persistent);
                if generated.is_ok() {
                    counters.generated.fetch_add(1, Ordering::Relaxed);
                }
                let _ = reply.send(generated);
            }
            Job::Sign { reply, .. } | Job::Decrypt { reply, .. } if reply.is_closed() => {
                counters.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            Job::Sign {
                key,
                mechanism,
                data,
                reply,
            } => {
                let started = Instant::now();
                let signed = mechanism
                    .mechanism()
                    .and_then(|m| session.sign(&m, key, &data).map_err(backend));
                counters.sign_time.observe(started.elapsed());
                match &signed {
                    Ok(_) => counters.signed.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.sign_failed.fetch_add(1, Ordering::Relaxed),
                };
                let _ = reply.send(signed);
            }
            Job::Decrypt { key, data, reply } => {
                let _ = reply.send(
                    session
                        .decrypt(&Mechanism::RsaX509, key, &data)
                        .map_err(backend),
                );
            }
            Job::Destroy { key } => match session.destroy_object(key) {
                Ok(()) => {
                    counters.destroyed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "PKCS#11: destroying an unused session key"),
            },
            Job::CountSessionObjects { reply } => {
                let _ = reply.send(
                    session
                        .find_objects(&[Attribute::Token(false)])
                        .map(|found| found.len())
                        .map_err(backend),
                );
            }
        }
    }
}

/// DER of the P-256 curve's OID, as CKA_EC_PARAMS wants it.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn generate(
    session: &Session,
    kind: TokenKeyKind,
    label: &str,
    persistent: bool,
) -> Result<(ObjectHandle, PKey<Public>), KeyError> {
    let label = label.as_bytes().to_vec();
    let private = [
        Attribute::Token(persistent),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        // Only an RSA key exchange decrypts (see `KeyProvider::decrypt`).
        Attribute::Decrypt(matches!(kind, TokenKeyKind::Rsa(_))),
        Attribute::Label(label.clone()),
    ];
    let (mechanism, public_template) = match kind {
        TokenKeyKind::EcdsaP256 => (
            Mechanism::EccKeyPairGen,
            vec![
                Attribute::Token(persistent),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Verify(true),
                Attribute::Label(label),
            ],
        ),
        TokenKeyKind::Rsa(bits) => (
            Mechanism::RsaPkcsKeyPairGen,
            vec![
                Attribute::Token(persistent),
                Attribute::ModulusBits(u64::from(bits).into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                Attribute::Verify(true),
                Attribute::Label(label),
            ],
        ),
    };
    let (public_handle, private_handle) = session
        .generate_key_pair(&mechanism, &public_template, &private)
        .map_err(backend)?;
    let public = public_key(session, public_handle, kind);
    // A session key's public object is read once, here; a persistent one stays, for `find`.
    // A pair whose public half cannot be read is of no use at all.
    if public.is_err() || !persistent {
        let _ = session.destroy_object(public_handle);
    }
    if public.is_err() {
        let _ = session.destroy_object(private_handle);
    }
    Ok((private_handle, public?))
}

/// The public half of a key pair, read from its public key object.
fn public_key(
    session: &Session,
    public_handle: ObjectHandle,
    kind: TokenKeyKind,
) -> Result<PKey<Public>, KeyError> {
    Ok(match kind {
        TokenKeyKind::EcdsaP256 => {
            let attrs = session
                .get_attributes(public_handle, &[AttributeType::EcPoint])
                .map_err(backend)?;
            let Some(Attribute::EcPoint(der)) = attrs.into_iter().next() else {
                return Err(backend("the token returned no EC point"));
            };
            // CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
            let point = match der.as_slice() {
                [0x04, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
                other => other,
            };
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
            let mut ctx = boring::bn::BigNumContext::new()?;
            let point = EcPoint::from_bytes(&group, point, &mut ctx)?;
            PKey::from_ec_key(EcKey::from_public_key(&group, &point)?)?
        }
        TokenKeyKind::Rsa(_) => {
            let attrs = session
                .get_attributes(
                    public_handle,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(backend)?;
            let (mut n, mut e) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(v) => n = Some(BigNum::from_slice(&v)?),
                    Attribute::PublicExponent(v) => e = Some(BigNum::from_slice(&v)?),
                    _ => {}
                }
            }
            let (Some(n), Some(e)) = (n, e) else {
                return Err(backend("the token returned no RSA public key"));
            };
            PKey::from_rsa(Rsa::from_public_components(n, e)?)?
        }
    })
}

/// The one token object of `class` labelled `label`, if any.
fn find_one(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>, KeyError> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(backend)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        more => Err(backend(format!(
            "{} {class} objects are labelled {label:?}; expected one",
            more.len()
        ))),
    }
}

fn find(session: &Session, label: &str) -> Result<Option<Found>, KeyError> {
    let Some(private) = find_one(session, ObjectClass::PRIVATE_KEY, label)? else {
        return Ok(None);
    };
    let attrs = session
        .get_attributes(
            private,
            &[
                AttributeType::KeyType,
                AttributeType::Sensitive,
                AttributeType::Extractable,
            ],
        )
        .map_err(backend)?;
    let (mut key_type, mut sensitive, mut extractable) = (None, false, true);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            _ => {}
        }
    }
    if !sensitive || extractable {
        return Err(backend(format!(
            "key {label:?} could leave the token (sensitive: {sensitive}, extractable: \
             {extractable}); refusing to use it"
        )));
    }
    let public = find_one(session, ObjectClass::PUBLIC_KEY, label)?
        .ok_or_else(|| backend(format!("key {label:?} has no public key object")))?;
    let kind = match key_type {
        Some(KeyType::EC) => {
            let attrs = session
                .get_attributes(public, &[AttributeType::EcParams])
                .map_err(backend)?;
            match attrs.into_iter().next() {
                Some(Attribute::EcParams(p)) if p == P256_PARAMS => TokenKeyKind::EcdsaP256,
                _ => {
                    return Err(backend(format!(
                        "key {label:?} is on a curve other than P-256"
                    )))
                }
            }
        }
        Some(KeyType::RSA) => {
            let attrs = session
                .get_attributes(public, &[AttributeType::Modulus])
                .map_err(backend)?;
            let Some(Attribute::Modulus(n)) = attrs.into_iter().next() else {
                return Err(backend("the token returned no RSA modulus"));
            };
            let bits = u32::try_from(n.len() * 8).map_err(backend)?;
            TokenKeyKind::Rsa(bits)
        }
        other => {
            return Err(backend(format!(
                "key {label:?} is of type {}, not ECDSA or RSA",
                other.map_or_else(|| "unknown".to_owned(), |t| t.to_string())
            )))
        }
    };
    Ok(Some((private, public_key(session, public, kind)?, kind)))
}

/// A key that lives in a token.
pub struct TokenKey {
    token: Arc<Token>,
    handle: ObjectHandle,
    public: PKey<Public>,
    kind: TokenKeyKind,
    /// A session key this process generated: destroyed on drop.
    owned: bool,
}

impl Drop for TokenKey {
    fn drop(&mut self) {
        if self.owned {
            // Every TLS context that held it is gone, so no handshake asks for it again.
            let _ = self.token.submit(Job::Destroy { key: self.handle });
        }
    }
}

/// The DER DigestInfo prefix for a digest, as PKCS#1 v1.5 signs it.
fn digest_info(digest: MessageDigest) -> Result<&'static [u8], KeyError> {
    crate::padding::digest_info_prefix(digest).ok_or_else(|| backend("unsupported digest"))
}

fn pss_params(size: usize) -> Result<PkcsPssParams, KeyError> {
    let (hash_alg, mgf) = match size {
        32 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        48 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
        64 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
        _ => return Err(backend("unsupported digest")),
    };
    Ok(PkcsPssParams {
        hash_alg,
        mgf,
        s_len: (size as u64).into(),
    })
}

impl TokenKey {
    /// The mechanism and the bytes the token signs for a TLS scheme: the digest is computed
    /// here (SoftHSM2 has no hash-and-sign for ECDSA); the token applies the key.
    fn prepare(
        &self,
        algorithm: SslSignatureAlgorithm,
        input: &[u8],
    ) -> Result<(Mech, Vec<u8>), KeyError> {
        let (digest, padding) = crate::scheme(algorithm)?;
        let h = hash(digest, input)?.to_vec();
        Ok(match (self.kind, padding) {
            (TokenKeyKind::EcdsaP256, None) => (Mech::Ecdsa, h),
            (TokenKeyKind::Rsa(_), Some(boring::rsa::Padding::PKCS1)) => {
                let mut data = digest_info(digest)?.to_vec();
                data.extend_from_slice(&h);
                (Mech::RsaPkcs, data)
            }
            (TokenKeyKind::Rsa(_), Some(boring::rsa::Padding::PKCS1_PSS)) => {
                (Mech::RsaPss(digest.size()), h)
            }
            _ => return Err(KeyError::Algorithm(algorithm.to_string())),
        })
    }
}

impl TokenKey {
    pub fn kind(&self) -> TokenKeyKind {
        self.kind
    }

    /// [`KeyProvider::sign`], waiting on this thread (see the module docs): for callers that
    /// are synchronous by nature, such as the CA's certificate builder.
    pub fn sign_blocking(
        &self,
        algorithm: SslSignatureAlgorithm,
        input: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let (mechanism, data) = self.prepare(algorithm, input)?;
        let rx = self.token.request(|reply| Job::Sign {
            key: self.handle,
            mechanism,
            data,
            reply,
        })?;
        let raw = rx.blocking_recv().map_err(|_| thread_died())??;
        finish_signature(self.kind, raw)
    }
}

/// PKCS#11 returns an ECDSA signature as r || s; TLS and X.509 want the DER ECDSA-Sig-Value.
/// RSA signatures are already what they want.
fn finish_signature(kind: TokenKeyKind, raw: Vec<u8>) -> Result<Vec<u8>, KeyError> {
    if kind != TokenKeyKind::EcdsaP256 {
        return Ok(raw);
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let sig = EcdsaSig::from_private_components(BigNum::from_slice(r)?, BigNum::from_slice(s)?)?;
    Ok(sig.to_der()?)
}

impl KeyProvider for TokenKey {
    fn public_key(&self) -> &PKey<Public> {
        &self.public
    }

    fn sign(&self, algorithm: SslSignatureAlgorithm, input: &[u8]) -> KeyFuture<Vec<u8>> {
        let prepared = self.prepare(algorithm, input);
        let token = self.token.clone();
        let handle = self.handle;
        let kind = self.kind;
        Box::pin(async move {
            let (mechanism, data) = prepared?;
            let rx = token.request(|reply| Job::Sign {
                key: handle,
                mechanism,
                data,
                reply,
            })?;
            let raw = rx.await.map_err(|_| thread_died())??;
            finish_signature(kind, raw)
        })
    }

    fn decrypt(&self, input: &[u8]) -> KeyFuture<Vec<u8>> {
        let checked = match self.kind {
            TokenKeyKind::Rsa(bits) if input.len() * 8 == bits as usize => Ok(input.to_vec()),
            TokenKeyKind::Rsa(bits) => Err(KeyError::Algorithm(format!(
                "RSA decryption of {} bytes with a {bits}-bit key",
                input.len()
            ))),
            TokenKeyKind::EcdsaP256 => Err(KeyError::Algorithm(
                "RSA decryption with a key that is not RSA".into(),
            )),
        };
        let token = self.token.clone();
        let handle = self.handle;
        Box::pin(async move {
            let data = checked?;
            let rx = token.request(|reply| Job::Decrypt {
                key: handle,
                data,
                reply,
            })?;
            rx.await.map_err(|_| thread_died())?
        })
    }

    fn describe(&self) -> String {
        let kind = match self.kind {
            TokenKeyKind::EcdsaP256 => "ECDSA P-256".to_owned(),
            TokenKeyKind::Rsa(bits) => format!("RSA-{bits}"),
        };
        format!("PKCS#11 token {:?} {kind}", self.token.label)
    }
}
