//! Istio's CA API, `istio.v1.auth.IstioCertificateService/CreateCertificate`, over [`Ca`]: the
//! gRPC service the control plane serves to workloads (and their proxies) asking for a
//! certificate. Who is asking comes from an [`Authenticator`], never from the CSR; what they
//! get is their own SPIFFE identity from their tenant's signer, or a status saying why not.
//!
//! The authenticator here is [`JoinTokens`] (bootstrap: a per-workload token the operator
//! writes). Renewal by the caller's current client certificate is `hypha_identity`'s
//! `WorkloadAuth`, which reads the verified peer identity the TLS layer puts in the request's
//! extensions, which is why the trait is handed them.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boring::hash::{hash, MessageDigest};
use tonic::metadata::MetadataMap;
use tonic::{Extensions, Request, Response, Status};

use crate::rate::{Buckets, IssueRate};
use crate::{Ca, CaError, Caller};

/// Code generated from `proto/istio/v1/auth/ca.proto`.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

use pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use pb::{IstioCertificateRequest, IstioCertificateResponse};

/// Why a request's credentials were not accepted. Every variant is `UNAUTHENTICATED`; the
/// messages never contain the credential itself.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: expected `authorization: Bearer <token>` or a client certificate")]
    Missing,
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    #[error("unknown token")]
    UnknownToken,
    #[error("the token has expired")]
    ExpiredToken,
    #[error("the client certificate's identity {0} is not a workload of this trust domain")]
    NotAWorkload(String),
    #[error("the client certificate is refused: {0}")]
    Refused(String),
    #[error("the token review refused the token: {0}")]
    Review(String),
    #[error("the token could not be reviewed: {0}")]
    ReviewUnavailable(String),
}

/// Establishes who is calling from what the transport and the request's metadata carry.
///
/// `extensions` is where the TLS layer will put the verified peer certificate chain, for the
/// renewal authenticator (a workload authenticated by its current certificate).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        extensions: &Extensions,
    ) -> Result<Caller, AuthError>;
}

/// Checks a bearer token that is not a join token with an authority that knows it: on
/// Kubernetes, a projected service-account token checked by the `TokenReview` API
/// (`hypha-kube`), the caller being the namespace and service account the review names.
#[tonic::async_trait]
pub trait TokenReview: Send + Sync + 'static {
    async fn review(&self, token: &str) -> Result<Caller, AuthError>;
}

impl std::fmt::Debug for dyn TokenReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenReview")
    }
}

/// The bearer token of `authorization: Bearer <token>`.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("authorization is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthError::Malformed("expected `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed("expected the Bearer scheme"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed("empty bearer token"));
    }
    Ok(token)
}

/// Errors loading a join-token directory.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: expected a file named <namespace>.<service account>.token", .0.display())]
    BadName(PathBuf),
    #[error("{}: not a valid identity: {source}", path.display())]
    BadIdentity { path: PathBuf, source: CaError },
    #[error("{}: token file is empty", .0.display())]
    Empty(PathBuf),
    #[error("{}: token file is readable by group or others (mode {mode:o}); expected 0600", path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("the same token is given to {first} and {second}")]
    Duplicate { first: String, second: String },
    #[error("{}: line {line}: expected `expires: <YYYY-MM-DDTHH:MM:SSZ>` after the token", path.display())]
    BadField { path: PathBuf, line: usize },
}

/// Join tokens: bootstrap credentials, one per workload identity, presented as
/// `authorization: Bearer <token>`.
///
/// Only SHA-256 digests of the tokens are kept; a presented token is hashed and compared with
/// every entry in constant time, so neither timing nor a memory dump gives a token away.
pub struct JoinTokens {
    entries: Vec<([u8; 32], Caller)>,
    /// When each entry's token stops being taken, if it carries an expiry (same order).
    expires: Vec<Option<SystemTime>>,
}

impl std::fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let callers: Vec<_> = self.entries.iter().map(|(_, c)| c).collect();
        f.debug_struct("JoinTokens")
            .field("identities", &callers)
            .finish_non_exhaustive()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = hash(MessageDigest::sha256(), token).expect("SHA-256 does not fail");
    let mut out = [0; 32];
    out.copy_from_slice(&d);
    out
}

impl JoinTokens {
    /// A table from `(token, caller)` pairs (tests, or tokens from another store). Each
    /// caller must be a valid identity and no token may be given to two callers.
    pub fn new(
        pairs: impl IntoIterator<Item = (impl AsRef<[u8]>, Caller)>,
    ) -> Result<JoinTokens, TokenError> {
        let mut seen: HashMap<[u8; 32], Caller> = HashMap::new();
        let mut entries = Vec::new();
        for (token, caller) in pairs {
            let d = digest(token.as_ref());
            if let Some(first) = seen.get(&d) {
                return Err(TokenError::Duplicate {
                    first: format!("{}/{}", first.namespace, first.service_account),
                    second: format!("{}/{}", caller.namespace, caller.service_account),
                });
            }
            seen.insert(d, caller.clone());
            entries.push((d, caller));
        }
        let expires = vec![None; entries.len()];
        Ok(JoinTokens { entries, expires })
    }

    /// Reads every `<namespace>.<service account>.token` file in `dir` (mode 0600; the
    /// token is the file's first line without surrounding whitespace, optionally followed by
    /// a line `expires: <YYYY-MM-DDTHH:MM:SSZ>` after which it is refused). Namespaces cannot
    /// contain a dot, so the name splits at the first one; service accounts may contain
    /// dots.
    pub fn from_dir(dir: &Path) -> Result<JoinTokens, TokenError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { path, source }
        };
        let mut pairs = Vec::new();
        let mut expires = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io(dir))?;
        names.sort();
        for path in names {
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".token"))
            else {
                continue;
            };
            let Some((ns, sa)) = stem.split_once('.') else {
                return Err(TokenError::BadName(path));
            };
            let caller = Caller::new(ns, sa);
            // The trust domain does not matter here, only that both parts are valid.
            if let Err(source) = caller.spiffe_id("check") {
                return Err(TokenError::BadIdentity { path, source });
            }
            let mode = std::fs::metadata(&path)
                .map_err(io(&path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(TokenError::Mode { path, mode });
            }
            let content = std::fs::read(&path).map_err(io(&path))?;
            let mut lines = content
                .split(|&b| b == b'\n')
                .map(<[u8]>::trim_ascii)
                .enumerate()
                .filter(|(_, l)| !l.is_empty());
            let Some((_, token)) = lines.next() else {
                return Err(TokenError::Empty(path));
            };
            let mut expiry = None;
            for (i, line) in lines {
                let value = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.strip_prefix("expires:"))
                    .and_then(|v| parse_utc(v.trim()));
                match value {
                    Some(t) if expiry.is_none() => expiry = Some(t),
                    _ => return Err(TokenError::BadField { path, line: i + 1 }),
                }
            }
            pairs.push((token.to_vec(), caller));
            expires.push(expiry);
        }
        let mut tokens = JoinTokens::new(pairs)?;
        tokens.expires = expires;
        Ok(tokens)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a token belongs to. Every entry is compared (no early exit).
    pub fn lookup(&self, token: &[u8]) -> Option<&Caller> {
        self.find(token).map(|i| &self.entries[i].1)
    }

    fn find(&self, token: &[u8]) -> Option<usize> {
        let d = digest(token);
        let mut found = None;
        for (i, (entry, _)) in self.entries.iter().enumerate() {
            if boring::memcmp::eq(entry, &d) {
                found = Some(i);
            }
        }
        found
    }
}

impl JoinTokens {
    /// The workload `token` is the join token of, unless it has expired.
    pub fn check(&self, token: &str) -> Result<Caller, AuthError> {
        let i = self.find(token.as_bytes()).ok_or(AuthError::UnknownToken)?;
        if self.expires[i].is_some_and(|t| t <= SystemTime::now()) {
            return Err(AuthError::ExpiredToken);
        }
        Ok(self.entries[i].1.clone())
    }
}

#[tonic::async_trait]
impl Authenticator for JoinTokens {
    async fn authenticate(
        &self,
        metadata: &MetadataMap,
        _extensions: &Extensions,
    ) -> Result<Caller, AuthError> {
        self.check(bearer(metadata)?)
    }
}

/// The `IstioCertificateService` implementation.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<Ca>,
    auth: Arc<dyn Authenticator>,
    /// Shared by the clones tonic makes.
    rate: Arc<Buckets>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl CaService {
    pub fn new(ca: Arc<Ca>, auth: Arc<dyn Authenticator>) -> CaService {
        CaService {
            ca,
            auth,
            rate: Arc::new(Buckets::new(IssueRate::default())),
        }
    }

    /// Issues each identity at most `rate` certificates (the default: [`IssueRate`]'s).
    pub fn with_rate(mut self, rate: IssueRate) -> CaService {
        self.rate = Arc::new(Buckets::new(rate));
        self
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_server(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self)
    }
}

/// Request errors say what was wrong; the CA's own failures are logged here and reach the
/// caller only as `INTERNAL`.
fn status(err: CaError) -> Status {
    match err {
        CaError::BadCsr(_)
        | CaError::BadSignature
        | CaError::NoSan { .. }
        | CaError::UnsupportedKey(_) => Status::invalid_argument(err.to_string()),
        CaError::IdentityMismatch { .. }
        | CaError::ExtraSan { .. }
        | CaError::BadCaller { .. }
        | CaError::Reserved(_)
        | CaError::Revoked(_)
        | CaError::NoTenant(_) => Status::permission_denied(err.to_string()),
        other => {
            tracing::error!(error = %other, "certificate issuance failed");
            Status::internal("the certificate authority failed; see its log")
        }
    }
}

/// Istio puts an identity to act for here (node agents); nothing is trusted to do that yet.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self
            .auth
            .authenticate(request.metadata(), request.extensions())
            .await
            .map_err(|e| {
                tracing::info!(reason = %e, "CreateCertificate: unauthenticated");
                match e {
                    AuthError::Refused(_) => Status::permission_denied(e.to_string()),
                    AuthError::ReviewUnavailable(_) => Status::unavailable(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                }
            })?;
        if let Err(wait) = self.rate.take(&caller) {
            let rate = self.rate.rate();
            tracing::info!(
                namespace = %caller.namespace,
                service_account = %caller.service_account,
                "CreateCertificate: over the issuance rate"
            );
            return Err(Status::resource_exhausted(format!(
                "{}/{} asks for certificates faster than this CA issues them to one identity \
                 ({} at once, then one every {:?}): retry in {} ms",
                caller.namespace,
                caller.service_account,
                rate.burst,
                rate.every,
                wait.as_millis().max(1)
            )));
        }
        let req = request.into_inner();
        if req
            .metadata
            .as_ref()
            .is_some_and(|m| m.fields.contains_key(IMPERSONATED_IDENTITY))
        {
            return Err(Status::permission_denied(
                "ImpersonatedIdentity is not allowed for this caller",
            ));
        }
        let requested = u64::try_from(req.validity_duration)
            .map(Duration::from_secs)
            .map_err(|_| Status::invalid_argument("validity_duration is negative"))?;
        let ca = self.ca.clone();
        // Signing may wait for a PKCS#11 token (`TokenSigner`): keep it off the async workers.
        let issued = tokio::task::spawn_blocking(move || {
            ca.issue(&caller, req.csr.as_bytes(), requested)
                .map_err(|e| (caller, e))
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "CreateCertificate: issuing task failed");
            Status::internal("the certificate authority failed; see its log")
        })?
        .map_err(|(caller, e)| {
            tracing::info!(
                namespace = %caller.namespace,
                service_account = %caller.service_account,
                error = %e,
                "CreateCertificate: refused"
            );
            status(e)
        })?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.chain,
        }))
    }
}

/// A UTC time written `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339 in UTC, as `date -u +%FT%TZ` prints).
pub fn parse_utc(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    // Days from 1970-01-01 to y-m-d (the proleptic Gregorian calendar).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}
