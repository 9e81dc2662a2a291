//! Errors of the CA: each says what was wrong with a request or with the CA's own state, so the
//! gRPC service can map request errors to `InvalidArgument`/`PermissionDenied` and the rest to
//! `Internal`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR is not a PEM certificate request: {0}")]
    BadCsr(String),
    #[error("CSR signature does not verify with the CSR's own public key")]
    BadSignature,
    #[error("CSR requests no subject alternative name; expected the URI SAN {expected}")]
    NoSan { expected: String },
    #[error("CSR requests identity {requested} but the caller is {caller}")]
    IdentityMismatch { requested: String, caller: String },
    #[error("CSR requests names other than the caller's identity {caller}: {extra:?}")]
    ExtraSan { caller: String, extra: Vec<String> },
    #[error("unsupported CSR key: {0} (accepted: ECDSA P-256, RSA of at least 2048 bits)")]
    UnsupportedKey(String),
    #[error(
        "invalid caller identity: namespace {namespace:?}, service account {service_account:?}"
    )]
    BadCaller {
        namespace: String,
        service_account: String,
    },
    #[error("{0} is reserved: only the control plane, in the mesh's root namespace, runs as hypha-control")]
    Reserved(String),
    #[error("{0} is revoked")]
    Revoked(String),
    #[error("namespace {0:?} belongs to no tenant")]
    NoTenant(String),
    #[error("namespace {namespace:?} belongs to tenant {owner:?}: the signer of tenant {signer:?} does not sign for it")]
    OtherTenant {
        namespace: String,
        owner: String,
        signer: String,
    },
    #[error("{namespace:?} is outside the issuer's namespace {scope:?}")]
    OutOfScope { namespace: String, scope: String },
    #[error("{0:?} is not a Service name (<name>.<namespace>.svc, optionally with the cluster's domain)")]
    NotAServiceName(String),
    #[error("{0} is not a workload identity of this mesh (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)")]
    ForeignIdentity(String),
    #[error("usage {0:?} is not one a workload certificate has (digital signature, key encipherment, server auth, client auth)")]
    Usage(String),
    #[error("root rotation: {0}")]
    Rotation(String),
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("tenant {tenant:?} trusts unknown tenant {trusted:?}")]
    UnknownTrustedTenant { tenant: String, trusted: String },
    #[error("tenant {tenant:?} names unknown signer {signer:?}")]
    UnknownSigner { tenant: String, signer: String },
    #[error(
        "signer {0:?}: a PKCS#11 key needs exactly one attestation policy (`allow` or `command`)"
    )]
    NoAttestation(String),
    #[error(transparent)]
    AttestationRefused(Box<Refused>),
    #[error("signer {signer:?}: PKCS#11 token {token:?}: {source}")]
    Token {
        signer: String,
        token: String,
        source: Box<hypha_keys::KeyError>,
    },
    #[error(transparent)]
    TokenKey(Box<TokenKeyError>),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: CA key file is readable by group or others (mode {mode:o}); expected 0600", path.display())]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("{} exists but {} does not; restore it or remove both to start a new CA", present.display(), missing.display())]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{}: CA certificate does not belong to the CA key", path.display())]
    KeyMismatch { path: PathBuf },
    #[error("the CA certificate has expired")]
    CaExpired,
    #[error("malformed certificate encoding: {0}")]
    Encoding(&'static str),
    #[error("signer failed: {0}")]
    Sign(String),
    #[error("crypto library: {0}")]
    Crypto(#[from] boring::error::ErrorStack),
}

/// A token the attestation step refused (boxed in [`CaError`]: errors stay small).
#[derive(Debug, thiserror::Error)]
#[error("signer {signer:?}: token {token:?} (serial {serial:?}) refused by attestation ({attestor}): {reason}")]
pub struct Refused {
    pub signer: String,
    pub token: String,
    pub serial: String,
    /// The policy that refused, e.g. `allow list`.
    pub attestor: String,
    pub reason: String,
}

/// A token-held CA key that cannot be used as it is.
#[derive(Debug, thiserror::Error)]
#[error("signer {signer:?}: key {key_label:?} in token {token:?}: {problem}")]
pub struct TokenKeyError {
    pub signer: String,
    pub token: String,
    pub key_label: String,
    pub problem: String,
}

impl CaError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CaError {
        let path = path.into();
        move |source| CaError::Io { path, source }
    }
}
