//! The mesh certificate authority's core: per-tenant signers, CSR checks and workload
//! certificate issuance with SPIFFE identities. No networking here: the Istio CA gRPC service
//! (`IstioCertificateService/CreateCertificate`) and the proxy's side build on this.
//!
//! - [`signer`]: the [`Signer`] seam (a CA certificate plus "sign these bytes") and the file-key
//!   implementation; the PKCS#11 signer of the key-provider issue plugs in here.
//! - [`issue`]: what a CSR must satisfy and how a leaf certificate is built.
//! - [`tenants`]: [`Ca`], one signer per tenant, and each tenant's trust bundle.

pub mod error;
pub mod issue;
pub mod signer;
pub mod tenants;

mod der;

pub use error::CaError;
pub use issue::{Caller, Issued, DEFAULT_MAX_VALIDITY};
pub use signer::{FileSigner, Signer};
pub use tenants::{Ca, TenantCa};
