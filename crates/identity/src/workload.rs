//! The workload side of Istio's CA API: generate a key, send a CSR for the workload's SPIFFE
//! ID, get the chain back, and renew at half life; and, for the CA's side, [`WorkloadAuth`]:
//! who a caller is, from its join token or its current certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boring::x509::X509;
use hypha_ca::service::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use hypha_ca::service::pb::IstioCertificateRequest;
use hypha_ca::service::AuthError;
use hypha_ca::{Authenticator, Ca, Caller, JoinTokens, TokenReview};
use tonic::metadata::MetadataMap;
use tonic::Extensions;

use crate::grpc::PeerInfo;
use crate::tls::{ClientCert, Peer};
use crate::{Credentials, Identity, IdentityError, KeyKind, Store};

/// Retries of a failed renewal start here and double up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Where a workload's keys are made: in memory, in memory with RSA operations batched for the
/// multi-buffer engine, or inside a PKCS#11 token (generated there, never extractable; the
/// token signs the CSR and every handshake).
#[derive(Clone)]
pub enum KeySource {
    Software(KeyKind),
    /// Generated in memory; handshakes sign through the batcher (keys it does not take, in
    /// software).
    Batched {
        kind: KeyKind,
        batcher: Arc<hypha_keys::batch::Batcher>,
    },
    Token {
        token: Arc<hypha_keys::pkcs11::Token>,
        kind: hypha_keys::pkcs11::TokenKeyKind,
        /// The generated key's label; `hypha <SPIFFE ID>` when not given.
        label: Option<String>,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Software(k) => write!(f, "software {k:?}"),
            KeySource::Batched { kind, .. } => write!(f, "batched {kind:?}"),
            KeySource::Token { token, kind, .. } => write!(f, "{token:?} {kind:?}"),
        }
    }
}

impl KeySource {
    /// A fresh key and a CSR for `spiffe_id` signed by it.
    async fn key_and_csr(
        &self,
        spiffe_id: &str,
    ) -> Result<(Arc<dyn hypha_keys::KeyProvider>, Vec<u8>), IdentityError> {
        match self {
            KeySource::Software(kind) => {
                let key = kind.generate()?;
                let csr = crate::csr_pem(&key, spiffe_id)?;
                Ok((Arc::new(hypha_keys::SoftwareKey::new(key)?), csr))
            }
            KeySource::Batched { kind, batcher } => {
                let key = kind.generate()?;
                let csr = crate::csr_pem(&key, spiffe_id)?;
                Ok((batcher.provider(key)?, csr))
            }
            KeySource::Token { token, kind, label } => {
                // A session object, destroyed when the last context using it goes (a
                // rotated-out certificate, a refused request): rotations pile nothing up.
                let label = match label {
                    Some(l) => l.clone(),
                    None => format!("hypha {spiffe_id}"),
                };
                let key = token.generate(*kind, &label, false).await?;
                let csr = crate::csr_pem_with(&key, spiffe_id).await?;
                Ok((Arc::new(key), csr))
            }
        }
    }
}

/// A workload asking the CA for its certificate.
#[derive(Clone)]
pub struct Workload {
    /// The CA's address, e.g. `https://127.0.0.1:15012`.
    pub ca: String,
    /// Roots that verify the CA's own certificate.
    pub ca_roots: Vec<X509>,
    /// Where `ca_roots` came from, read again for every request (the control plane's roots
    /// rotate; Kubernetes updates a mounted ConfigMap in place). An unreadable or empty file
    /// leaves `ca_roots` in force.
    pub ca_roots_file: Option<std::path::PathBuf>,
    /// Who the CA must be.
    pub ca_identity: Peer,
    /// The credential for the first certificate: a join token (used again only if renewal
    /// by the certificate fails), or a service-account token file (read again for every
    /// request, and used for every renewal, as Istio's agent does).
    pub token: Option<Credential>,
    /// The identity asked for: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: String,
    pub keys: KeySource,
    /// The validity asked for (the CA caps it).
    pub validity: Duration,
}

/// What a workload presents as `authorization: Bearer` for its first certificate.
#[derive(Clone)]
pub enum Credential {
    /// A join token (`hypha control --join-tokens`).
    Join(String),
    /// A projected service-account token the kubelet keeps fresh in this file, checked by
    /// the CA with Kubernetes' TokenReview.
    ServiceAccount(std::path::PathBuf),
}

impl Credential {
    /// The token as of now.
    pub async fn read(&self) -> Result<String, IdentityError> {
        match self {
            Credential::Join(t) => Ok(t.clone()),
            Credential::ServiceAccount(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| t.trim().to_owned())
                .map_err(|source| IdentityError::Read {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

impl std::fmt::Debug for Credential {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Join(_) => f.write_str("join token"),
            Credential::ServiceAccount(p) => write!(f, "service-account token {}", p.display()),
        }
    }
}

impl From<String> for Credential {
    fn from(token: String) -> Credential {
        Credential::Join(token)
    }
}

impl From<&str> for Credential {
    fn from(token: &str) -> Credential {
        Credential::Join(token.to_owned())
    }
}

impl std::fmt::Debug for Workload {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("ca", &self.ca)
            .field("spiffe_id", &self.spiffe_id)
            .field("keys", &self.keys)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// The roots in `file` (PEM), if it reads and holds any; else `fallback`.
pub fn roots_from_file(file: Option<&std::path::Path>, fallback: &[X509]) -> Vec<X509> {
    file.and_then(|f| std::fs::read(f).ok())
        .and_then(|pem| X509::stack_from_pem(&pem).ok())
        .filter(|roots| !roots.is_empty())
        .unwrap_or_else(|| fallback.to_vec())
}

impl Workload {
    /// The roots that verify the CA now (see [`Workload::ca_roots_file`]).
    fn current_ca_roots(&self) -> Vec<X509> {
        roots_from_file(self.ca_roots_file.as_deref(), &self.ca_roots)
    }

    /// The first certificate, authenticated by the token.
    pub async fn bootstrap(&self) -> Result<Identity, IdentityError> {
        let connector = crate::tls::client(None, &self.current_ca_roots())?;
        let token = match &self.token {
            Some(c) => Some(c.read().await?),
            None => None,
        };
        self.request(connector, token.as_deref()).await
    }

    /// A new certificate (and key), authenticated by the current one. Keeps the current
    /// trusted roots (they may have been updated since the first certificate).
    pub async fn renew(&self, current: &Identity) -> Result<Identity, IdentityError> {
        let connector = crate::tls::client(Some(current), &self.current_ca_roots())?;
        let fresh = self.request(connector, None).await?;
        fresh.with_roots(current.roots().to_vec())
    }

    async fn request(
        &self,
        connector: boring::ssl::SslConnector,
        token: Option<&str>,
    ) -> Result<Identity, IdentityError> {
        // Connected first: an unreachable CA costs no key (in a token, a key generation is
        // slow, and every retry would make one).
        let channel = crate::grpc::channel(&self.ca, connector, self.ca_identity.clone()).await?;
        let (key, csr) = self.keys.key_and_csr(&self.spiffe_id).await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: String::from_utf8_lossy(&csr).into_owned(),
            validity_duration: i64::try_from(self.validity.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| IdentityError::Refused {
                    code: tonic::Code::InvalidArgument,
                    message: "the join token is not valid header text".into(),
                })?;
            req.metadata_mut().insert("authorization", value);
        }
        let chain = client
            .create_certificate(req)
            .await
            .map_err(|s| IdentityError::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner()
            .cert_chain;
        let mut certs = Vec::new();
        for pem in &chain {
            certs.extend(X509::stack_from_pem(pem.as_bytes())?);
        }
        // The chain ends at the tenant's root: the first trust bundle. The control plane
        // sends the whole bundle (shared roots too) later.
        let root = certs
            .last()
            .cloned()
            .ok_or(IdentityError::NoCertificate("the CA's reply"))?;
        let identity = Identity::new(key, certs, vec![root])?;
        if identity.id() != self.spiffe_id {
            return Err(IdentityError::WrongIdentity {
                got: identity.id().to_owned(),
                want: self.spiffe_id.clone(),
            });
        }
        Ok(identity)
    }

    /// Keeps `store` current: renews at half life by the current certificate (by the join
    /// token if that fails and one is configured), retrying with backoff until it succeeds.
    /// Runs until dropped.
    pub async fn rotate(self, store: Store, clients: ClientCert) {
        loop {
            let current = store.load();
            let wait = current
                .identity
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            let mut retry = RETRY_MIN;
            let fresh = loop {
                let by_service_account = match &self.token {
                    Some(Credential::ServiceAccount(_)) => match self.bootstrap().await {
                        Ok(id) => Some(id.with_roots(current.identity.roots().to_vec())),
                        Err(e) => {
                            tracing::warn!(error = %e, "renewal by the service-account token failed; trying the certificate");
                            None
                        }
                    },
                    _ => None,
                };
                let attempt = match by_service_account {
                    Some(attempt) => attempt,
                    None => self.renew(&current.identity).await,
                };
                let attempt = match attempt {
                    Err(e) if matches!(self.token, Some(Credential::Join(_))) => {
                        tracing::warn!(error = %e, "certificate renewal failed; trying the join token");
                        match self.bootstrap().await {
                            Ok(id) => id.with_roots(current.identity.roots().to_vec()),
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                };
                match attempt.and_then(|id| Credentials::new(id, clients)) {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?retry, "certificate renewal failed");
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
            };
            tracing::info!(
                identity = %fresh.identity.id(),
                not_after = ?fresh.identity.not_after(),
                "certificate rotated"
            );
            // With the roots in force now: a trust bundle may have come while renewing.
            let updated = store.update(|now| {
                let roots = now.identity.roots().to_vec();
                Credentials::new(fresh.identity.with_roots(roots)?, clients)
            });
            if let Err(e) = updated {
                tracing::warn!(error = %e, "the renewed certificate does not take the current trust bundle; keeping the bundle it came with");
                store.replace(fresh);
            }
        }
    }
}

/// An identity for `caller` issued by `ca` in this process (the control plane's own serving
/// certificate): the same checks as a remote request, without the network.
pub fn issue_local(
    ca: &Ca,
    caller: &Caller,
    validity: Duration,
    roots: &[String],
) -> Result<Identity, IdentityError> {
    issue_local_with(ca, caller, validity, roots, KeyKind::EcdsaP256.generate()?)
}

/// [`issue_local`] for a key the caller generated (and may have to write to a file).
pub fn issue_local_with(
    ca: &Ca,
    caller: &Caller,
    validity: Duration,
    roots: &[String],
    key: boring::pkey::PKey<boring::pkey::Private>,
) -> Result<Identity, IdentityError> {
    let csr = crate::csr_pem(&key, &caller.spiffe_id(ca.trust_domain())?)?;
    let issued = ca.issue(caller, &csr, validity)?;
    let roots: Vec<u8> = roots.concat().into_bytes();
    Identity::from_pem(
        Arc::new(hypha_keys::SoftwareKey::new(key)?),
        &issued.chain,
        &roots,
    )
}

/// [`issue_local`] for a key a provider holds (a token, a test's wrapper): the key signs its
/// own CSR, awaited.
pub async fn issue_local_for(
    ca: &Ca,
    caller: &Caller,
    validity: Duration,
    roots: &[String],
    key: Arc<dyn hypha_keys::KeyProvider>,
) -> Result<Identity, IdentityError> {
    let csr = crate::csr_pem_with(key.as_ref(), &caller.spiffe_id(ca.trust_domain())?).await?;
    let issued = ca.issue(caller, &csr, validity)?;
    Identity::from_pem(key, &issued.chain, roots.concat().as_bytes())
}

/// [`issue_local`] with the key generated in `token` (a session object, sensitive, never
/// extractable), which signs the CSR. Waits on this thread for the token: call it off the
/// async workers.
pub fn issue_local_in_token(
    ca: &Ca,
    caller: &Caller,
    validity: Duration,
    roots: &[String],
    token: &Arc<hypha_keys::pkcs11::Token>,
) -> Result<Identity, IdentityError> {
    let id = caller.spiffe_id(ca.trust_domain())?;
    let key = token.generate_blocking(
        hypha_keys::pkcs11::TokenKeyKind::EcdsaP256,
        &format!("hypha {id}"),
        false,
    )?;
    let csr = crate::csr_pem_with_blocking(&key, &id)?;
    let issued = ca.issue(caller, &csr, validity)?;
    let roots: Vec<u8> = roots.concat().into_bytes();
    Identity::from_pem(Arc::new(key), &issued.chain, &roots)
}

/// The CA's authenticator for workloads: a bearer join token when the request has one,
/// otherwise the SPIFFE ID of the verified client certificate (renewal), which must be a
/// workload identity of the CA's trust domain.
pub struct WorkloadAuth {
    /// Replaced whole when the token directory changes (see [`WorkloadAuth::set_tokens`]).
    tokens: std::sync::RwLock<Option<Arc<JoinTokens>>>,
    /// Checks bearer tokens that are no join token (service-account tokens on Kubernetes).
    review: std::sync::OnceLock<Arc<dyn TokenReview>>,
    trust_domain: String,
}

impl WorkloadAuth {
    pub fn new(tokens: Option<JoinTokens>, trust_domain: impl Into<String>) -> WorkloadAuth {
        WorkloadAuth {
            tokens: std::sync::RwLock::new(tokens.map(Arc::new)),
            review: std::sync::OnceLock::new(),
            trust_domain: trust_domain.into(),
        }
    }

    /// Has bearer tokens that are no join token checked by `review` (set once).
    pub fn review_tokens_with(&self, review: Arc<dyn TokenReview>) {
        let _ = self.review.set(review);
    }

    /// The join tokens from now on (a token directory read again).
    pub fn set_tokens(&self, tokens: JoinTokens) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(tokens));
    }
}

#[tonic::async_trait]
impl Authenticator for WorkloadAuth {
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
    ) -> Result<Caller, AuthError> {
        if metadata.contains_key("authorization") {
            let token = hypha_ca::bearer(metadata)?;
            let tokens = self
                .tokens
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let joined = match tokens {
                Some(tokens) => tokens.check(token),
                None => Err(AuthError::UnknownToken),
            };
            return match (joined, self.review.get()) {
                (Err(AuthError::UnknownToken), Some(review)) => review.review(token).await,
                (result, _) => result,
            };
        }
        let peer = extensions.get::<PeerInfo>().ok_or(AuthError::Missing)?;
        if let Some(reason) = &peer.refused {
            return Err(AuthError::Refused(reason.clone()));
        }
        let id = peer.identity.as_deref().ok_or(AuthError::Missing)?;
        let not_a_workload = || AuthError::NotAWorkload(id.to_owned());
        let path = id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.strip_prefix(self.trust_domain.as_str()))
            .ok_or_else(not_a_workload)?;
        match path.split('/').collect::<Vec<_>>()[..] {
            ["", "ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => Ok(Caller::new(ns, sa)),
            _ => Err(not_a_workload()),
        }
    }
}
