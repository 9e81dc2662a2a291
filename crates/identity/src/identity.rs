//! A workload's identity: its SPIFFE ID, private key, certificate chain and trusted roots,
//! and the TLS contexts built from them once per certificate ([`Credentials`]), swapped whole
//! on rotation ([`Store`]) so that connections never wait on a lock.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use boring::asn1::{Asn1Time, Asn1TimeRef};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::rsa::Rsa;
use boring::ssl::{SslAcceptor, SslConnector};
use boring::stack::Stack;
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::{X509Ref, X509Req, X509};
use hypha_keys::KeyProvider;

use crate::tls::ClientCert;
use crate::IdentityError;

/// The kind of key a workload generates (Istio's `ECC_SIGNATURE_ALGORITHM` / `RSA_KEY_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyKind {
    #[default]
    EcdsaP256,
    Rsa2048,
    Rsa3072,
}

impl FromStr for KeyKind {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<KeyKind, IdentityError> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "ecdsa" | "p256" | "ec" => Ok(KeyKind::EcdsaP256),
            "rsa-2048" | "rsa2048" | "rsa" => Ok(KeyKind::Rsa2048),
            "rsa-3072" | "rsa3072" => Ok(KeyKind::Rsa3072),
            _ => Err(IdentityError::KeyKind(s.to_owned())),
        }
    }
}

impl KeyKind {
    /// A fresh private key of this kind.
    pub fn generate(self) -> Result<PKey<Private>, IdentityError> {
        Ok(match self {
            KeyKind::EcdsaP256 => {
                let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
                PKey::from_ec_key(EcKey::generate(&group)?)?
            }
            KeyKind::Rsa2048 => PKey::from_rsa(Rsa::generate(2048)?)?,
            KeyKind::Rsa3072 => PKey::from_rsa(Rsa::generate(3072)?)?,
        })
    }
}

/// A CSR for `public` with `spiffe_id` as its only SAN, signed by `signer`.
fn csr<T: boring::pkey::HasPublic>(
    public: &boring::pkey::PKeyRef<T>,
    spiffe_id: &str,
    signer: &PKey<Private>,
) -> Result<X509Req, IdentityError> {
    let mut b = X509Req::builder()?;
    b.set_pubkey(public)?;
    let san = SubjectAlternativeName::new()
        .uri(spiffe_id)
        .build(&b.x509v3_context(None))?;
    let mut exts = Stack::new()?;
    exts.push(san)?;
    b.add_extensions(&exts)?;
    b.sign(signer, MessageDigest::sha256())?;
    Ok(b.build())
}

/// A PEM CSR for `spiffe_id` (its only SAN), signed by `key`.
pub fn csr_pem(key: &PKey<Private>, spiffe_id: &str) -> Result<Vec<u8>, IdentityError> {
    Ok(csr(key, spiffe_id, key)?.to_pem()?)
}

/// A PEM CSR for `spiffe_id` signed by a key provider (a key in a token, which cannot sign
/// through BoringSSL's CSR builder): the request is built and signed with a throwaway key of
/// the same type, then its signature is replaced by the provider's over the same bytes.
pub async fn csr_pem_with(
    key: &dyn KeyProvider,
    spiffe_id: &str,
) -> Result<Vec<u8>, IdentityError> {
    let (draft, scheme) = csr_draft(key.public_key(), spiffe_id)?;
    let (info, _) = hypha_ca::der::split_signed(&draft)?;
    let signature = key.sign(scheme, info).await?;
    csr_signed(&draft, &signature)
}

/// [`csr_pem_with`] for a key in a token, waiting on this thread for the token's signature
/// (never call it on an async worker: see `hypha_keys::pkcs11`).
pub fn csr_pem_with_blocking(
    key: &hypha_keys::pkcs11::TokenKey,
    spiffe_id: &str,
) -> Result<Vec<u8>, IdentityError> {
    let (draft, scheme) = csr_draft(key.public_key(), spiffe_id)?;
    let (info, _) = hypha_ca::der::split_signed(&draft)?;
    let signature = key.sign_blocking(scheme, info)?;
    csr_signed(&draft, &signature)
}

/// A CSR for `public` signed by a throwaway key of the same type (so the algorithm fields are
/// right), and the TLS scheme whose signature replaces the throwaway's.
fn csr_draft(
    public: &PKey<boring::pkey::Public>,
    spiffe_id: &str,
) -> Result<(Vec<u8>, boring::ssl::SslSignatureAlgorithm), IdentityError> {
    use boring::ssl::SslSignatureAlgorithm;
    let (throwaway, scheme) = if public.ec_key().is_ok() {
        (
            KeyKind::EcdsaP256.generate()?,
            SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256,
        )
    } else {
        (
            KeyKind::Rsa2048.generate()?,
            SslSignatureAlgorithm::RSA_PKCS1_SHA256,
        )
    };
    Ok((csr(public, spiffe_id, &throwaway)?.to_der()?, scheme))
}

/// The draft's request info with `signature` in place of the throwaway's, as PEM.
fn csr_signed(draft: &[u8], signature: &[u8]) -> Result<Vec<u8>, IdentityError> {
    let (info, alg) = hypha_ca::der::split_signed(draft)?;
    let signed = hypha_ca::der::join_signed(info, alg, signature);
    Ok(X509Req::from_der(&signed)?.to_pem()?)
}

/// The SPIFFE ID of a certificate: its first `spiffe://` URI SAN.
pub fn spiffe_id(cert: &X509Ref) -> Option<String> {
    cert.subject_alt_names()?
        .iter()
        .filter_map(|n| n.uri())
        .find(|u| u.starts_with("spiffe://"))
        .map(str::to_owned)
}

pub(crate) fn system_time(t: &Asn1TimeRef) -> Result<SystemTime, IdentityError> {
    let d = Asn1Time::from_unix(0)?.diff(t)?;
    let secs = i64::from(d.days) * 86_400 + i64::from(d.secs);
    Ok(match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    })
}

/// A SPIFFE identity with its key (behind a [`KeyProvider`]: TLS contexts never hold it),
/// chain (leaf first) and the roots it trusts.
#[derive(Clone)]
pub struct Identity {
    id: String,
    key: Arc<dyn KeyProvider>,
    chain: Vec<X509>,
    roots: Vec<X509>,
    received: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for Identity {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("key", &self.key.describe())
            .field("not_after", &self.not_after)
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Checks that `key` belongs to the leaf (`chain[0]`) and that the leaf names a SPIFFE ID.
    pub fn new(
        key: Arc<dyn KeyProvider>,
        chain: Vec<X509>,
        roots: Vec<X509>,
    ) -> Result<Identity, IdentityError> {
        let leaf = chain
            .first()
            .ok_or(IdentityError::NoCertificate("the chain"))?;
        if roots.is_empty() {
            return Err(IdentityError::NoCertificate("the trusted roots"));
        }
        if !leaf.public_key()?.public_eq(key.public_key()) {
            return Err(IdentityError::KeyMismatch);
        }
        let id = spiffe_id(leaf).ok_or(IdentityError::NoSpiffeId)?;
        let not_after = system_time(leaf.not_after())?;
        Ok(Identity {
            id,
            key,
            chain,
            roots,
            received: SystemTime::now(),
            not_after,
        })
    }

    /// From PEM text: the chain (leaf first, several certificates in one string or one per
    /// string) and the roots.
    pub fn from_pem(
        key: Arc<dyn KeyProvider>,
        chain: &[impl AsRef<[u8]>],
        roots: &[u8],
    ) -> Result<Identity, IdentityError> {
        let mut certs = Vec::new();
        for pem in chain {
            certs.extend(X509::stack_from_pem(pem.as_ref())?);
        }
        Identity::new(key, certs, X509::stack_from_pem(roots)?)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn chain(&self) -> &[X509] {
        &self.chain
    }

    pub fn roots(&self) -> &[X509] {
        &self.roots
    }

    pub(crate) fn key(&self) -> &Arc<dyn KeyProvider> {
        &self.key
    }

    /// Where the private key lives, e.g. `PKCS#11 token "mesh" ECDSA P-256` (never key
    /// material).
    pub fn key_description(&self) -> String {
        self.key.describe()
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to renew: half way from receipt to expiry, as Istio rotates. Counted from receipt,
    /// not `notBefore`, which the CA backdates for clock skew.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        self.received + life / 2
    }

    /// The same certificate with another set of trusted roots (a trust bundle update).
    pub fn with_roots(&self, roots: Vec<X509>) -> Result<Identity, IdentityError> {
        if roots.is_empty() {
            return Err(IdentityError::NoCertificate("the trusted roots"));
        }
        Ok(Identity {
            roots,
            ..self.clone()
        })
    }
}

/// An identity with its TLS contexts, built once per certificate.
pub struct Credentials {
    pub identity: Identity,
    /// Presents the identity; verifies client certificates as asked.
    pub server: SslAcceptor,
    /// Presents the identity and verifies the server against the roots.
    pub client: SslConnector,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(identity: Identity, clients: ClientCert) -> Result<Credentials, IdentityError> {
        Ok(Credentials {
            server: crate::tls::server(&identity, clients)?,
            client: crate::tls::client(Some(&identity), identity.roots())?,
            identity,
        })
    }
}

/// The current credentials, replaced whole when the certificate rotates or the trust bundle
/// changes. Loading is lock-free; a connection keeps the credentials it started with.
#[derive(Clone, Debug)]
pub struct Store(Arc<ArcSwap<Credentials>>);

impl Store {
    pub fn new(credentials: Credentials) -> Store {
        Store(Arc::new(ArcSwap::from_pointee(credentials)))
    }

    pub fn load(&self) -> Arc<Credentials> {
        self.0.load_full()
    }

    pub fn replace(&self, credentials: Credentials) {
        self.0.store(Arc::new(credentials));
    }

    /// Replaces the credentials with what `make` builds from the current ones. If they were
    /// replaced meanwhile (a renewal racing a trust-bundle update), builds again from the
    /// newer ones, so neither change is lost.
    pub fn update<E>(
        &self,
        mut make: impl FnMut(&Credentials) -> Result<Credentials, E>,
    ) -> Result<(), E> {
        loop {
            let current = self.0.load_full();
            let next = Arc::new(make(&current)?);
            let previous = self.0.compare_and_swap(&current, next);
            if Arc::ptr_eq(&previous, &current) {
                return Ok(());
            }
        }
    }
}
