//! The mesh certificate authority's core: per-tenant signers, CSR checks and workload
//! certificate issuance with SPIFFE identities. The Istio CA gRPC service
//! (`IstioCertificateService/CreateCertificate`) is [`service`]; its TLS and the proxy's
//! side build on this.
//!
//! - [`signer`]: the [`Signer`] seam (a CA certificate plus "sign these bytes") and the file-key
//!   implementation.
//! - [`token`]: the signer whose key lives in a PKCS#11 token, after [`attest`] approves the
//!   token.
//! - [`issue`]: what a CSR must satisfy and how a leaf certificate is built.
//! - [`tenants`]: [`Ca`], one signer per tenant, and each tenant's trust bundle.
//! - [`rotation`]: a signer's root rotated in three phases (`hypha ca rotate`).
//! - [`status`]: `hypha ca status`, each tenant's signer and root from the config and data dir.
//! - [`service`]: Istio's CA gRPC API over [`Ca`], with caller authentication
//!   ([`service::Authenticator`], join tokens first) and a per-identity issuance rate
//!   ([`rate`]).

pub mod attest;
pub mod error;
pub mod issue;
pub mod rate;
pub mod rotation;
pub mod service;
pub mod signer;
pub mod status;
pub mod tenants;
pub mod token;

pub mod der;

pub use error::CaError;
pub use issue::{Caller, Issued, DEFAULT_MAX_VALIDITY};
pub use rate::IssueRate;
pub use service::{bearer, AuthError, Authenticator, CaService, JoinTokens, TokenReview};
pub use signer::{Attested, FileSigner, Signer};
pub use tenants::{
    file_signer_dir, open_signer, parse_revoked, same_cert, signer_common_name, Ca, TenantCa,
    CONTROL_SERVICE_ACCOUNT, KUBERNETES_USAGES, REVOKED_FILE,
};
pub use token::{TokenSigner, TokenSignerConfig};
