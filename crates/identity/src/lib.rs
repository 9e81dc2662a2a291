//! Workload identity and the TLS built on it: a SPIFFE ID with its private key, certificate
//! chain and trusted roots ([`Identity`]); BoringSSL server and client contexts that present
//! it and check the peer's SPIFFE ID ([`tls`]); gRPC (tonic) over those contexts ([`grpc`]);
//! and the workload side of Istio's CA API: key, CSR, certificate, renewal at half life
//! ([`Workload`]).
//!
//! Both the control plane (serving xDS and the CA over TLS) and the sidecar (its xDS channel
//! and mutual TLS between sidecars) stand on this crate. Private keys stay in memory: they are
//! never logged and never written, and TLS contexts never hold them: every signature of a
//! handshake is an asynchronous call into the identity's key provider (`hypha_keys`).

#![forbid(unsafe_code)]

pub mod grpc;
mod identity;
pub mod tls;
mod verified;
mod workload;

pub use identity::{
    csr_pem, csr_pem_with, csr_pem_with_blocking, spiffe_id, Credentials, Identity, KeyKind, Store,
};
pub use workload::{
    issue_local, issue_local_for, issue_local_in_token, issue_local_with, roots_from_file,
    Credential, KeySource, Workload, WorkloadAuth,
};

/// Errors building an identity, its TLS contexts, or obtaining one from the CA.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("TLS library: {0}")]
    Ssl(#[from] boring::error::ErrorStack),
    #[error("{path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(&'static str),
    #[error("the certificate carries no SPIFFE ID (URI SAN spiffe://...)")]
    NoSpiffeId,
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    #[error("unknown key kind {0:?}: expected ecdsa-p256, rsa-2048 or rsa-3072")]
    KeyKind(String),
    #[error("cannot reach the CA at {uri}: {reason}")]
    Connect { uri: String, reason: String },
    #[error("the server at {uri} is not the control plane: {reason}")]
    WrongServer { uri: String, reason: String },
    #[error("the CA refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("private key: {0}")]
    Key(#[from] hypha_keys::KeyError),
    #[error("issuing in process: {0}")]
    Issue(#[from] hypha_ca::CaError),
    #[error("the CA issued {got}, not {want}")]
    WrongIdentity { got: String, want: String },
}
