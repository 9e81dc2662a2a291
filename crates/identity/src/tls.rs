//! BoringSSL contexts for the mesh: TLS 1.2+ with the workload's certificate, peers verified
//! against the trusted roots (never against DNS names: mesh identities are SPIFFE IDs), and
//! the peer's SPIFFE ID checked against the identities the caller allows ([`Peer`]). Each
//! context remembers the peer chains it has verified (`verified`), so the peers a sidecar meets
//! again and again cost one chain verification per certificate, not one per connection.

use std::sync::Arc;

use boring::ssl::{
    AlpnError, SslAcceptor, SslConnector, SslContextBuilder, SslMethod, SslOptions, SslRef,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use boring::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_boring::SslStream;

use crate::{Identity, IdentityError};

pub use crate::verified::{chain_cache_stats, ChainCacheStats};

/// ALPN protocol lists in wire format.
pub const ALPN_H2: &[u8] = b"\x02h2";
pub const ALPN_HTTP11: &[u8] = b"\x08http/1.1";
pub const ALPN_H2_HTTP11: &[u8] = b"\x02h2\x08http/1.1";

/// Which peer identities a connection accepts, once the chain verified against the roots.
#[derive(Debug, Clone)]
pub enum Peer {
    /// Any SPIFFE ID the roots vouch for.
    Any,
    /// Exactly one of these SPIFFE IDs (the identities a cluster's endpoints run as).
    OneOf(Arc<[String]>),
}

impl Peer {
    pub fn allows(&self, id: &str) -> bool {
        match self {
            Peer::Any => true,
            Peer::OneOf(ids) => ids.iter().any(|i| i == id),
        }
    }
}

/// Why a TLS connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("the peer presented no SPIFFE identity")]
    NoPeerIdentity,
    #[error("the peer is {got}, which is not allowed here ({allowed:?})")]
    UnexpectedPeer { got: String, allowed: Peer },
    #[error("TLS library: {0}")]
    Ssl(#[from] boring::error::ErrorStack),
}

fn add_roots(
    store: &mut boring::x509::store::X509StoreBuilderRef,
    roots: &[X509],
) -> Result<(), IdentityError> {
    for r in roots {
        store.add_cert(r.clone())?;
    }
    Ok(())
}

/// Makes a context present `identity`: its leaf and the rest of its chain, and every
/// signature of the handshake asked of its key provider (the context holds no private key).
fn present(b: &mut SslContextBuilder, identity: &Identity) -> Result<(), IdentityError> {
    let (leaf, rest) = identity
        .chain()
        .split_first()
        .ok_or(IdentityError::NoCertificate("the chain"))?;
    b.set_certificate(leaf)?;
    for c in rest {
        b.add_extra_chain_cert(c.clone())?;
    }
    b.set_async_private_key_method(hypha_keys::Method(identity.key().clone()));
    Ok(())
}

/// Whether a server wants client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// Mutual TLS: a client certificate chaining to the roots is required.
    Require,
    /// Asked for and verified when presented; a client without one is let through (the CA's
    /// endpoint, where a workload's first call has only a join token).
    Optional,
}

/// Key exchange groups, in order of preference: Envoy's defaults (X25519, then P-256). Newer
/// BoringSSL also offers the hybrid X25519MLKEM768 unless told otherwise; Istio and Envoy
/// leave it off by default, and it costs every handshake an ML-KEM key pair, encapsulation
/// and 1.1 KB more in each hello.
const GROUPS: &str = "X25519:P-256";

/// A server context presenting `identity`, verifying client certificates against its roots.
/// Every connection is a full handshake (no tickets, no session cache).
///
/// ALPN: the server picks h2 when the client offers it, else http/1.1.
pub fn server(identity: &Identity, clients: ClientCert) -> Result<SslAcceptor, IdentityError> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    // No session resumption: Hypha's clients never resume, so TLS 1.3 session tickets (two
    // sealed copies of the session, peer chain included, after every handshake) and the
    // TLS 1.2 session cache would be work thrown away on each connection.
    b.set_options(SslOptions::NO_TICKET);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_curves_list(GROUPS)?;
    present(&mut b, identity)?;
    add_roots(b.cert_store_mut(), identity.roots())?;
    b.set_verify(match clients {
        ClientCert::Require => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        ClientCert::Optional => SslVerifyMode::PEER,
    });
    crate::verified::install(&mut b)?;
    b.set_alpn_select_callback(|_, offered| {
        boring::ssl::select_next_proto(ALPN_H2_HTTP11, offered).ok_or(AlpnError::NOACK)
    });
    Ok(b.build())
}

/// A client context verifying servers against `roots` only (never the system's CA store),
/// presenting `identity` when given (mutual TLS) and nothing otherwise (a workload's first call
/// to the CA).
///
/// Connect with [`connect`]: it turns off the DNS-name check (mesh peers are named by SPIFFE ID)
/// and checks the peer's ID, and it sets nothing per connection that would change whether a
/// chain verifies, which the context's memory of verified chains (`verified`) relies on.
pub fn client(identity: Option<&Identity>, roots: &[X509]) -> Result<SslConnector, IdentityError> {
    let mut b = SslConnector::builder(SslMethod::tls())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_curves_list(GROUPS)?;
    if let Some(id) = identity {
        present(&mut b, id)?;
    }
    // The connector's builder trusts the system's CA store (`/etc/ssl/certs`, `SSL_CERT_FILE`,
    // `SSL_CERT_DIR`); a mesh client trusts the mesh roots it is given and nothing else.
    b.set_cert_store_builder(boring::x509::store::X509StoreBuilder::new()?);
    add_roots(b.cert_store_mut(), roots)?;
    b.set_verify(SslVerifyMode::PEER);
    crate::verified::install(&mut b)?;
    Ok(b.build())
}

/// The verified peer's SPIFFE ID.
pub fn peer_id(ssl: &SslRef) -> Option<String> {
    ssl.peer_certificate().and_then(|c| crate::spiffe_id(&c))
}

/// Checks the verified peer of an established connection against `allowed`.
pub fn check_peer(ssl: &SslRef, allowed: &Peer) -> Result<String, TlsError> {
    let id = peer_id(ssl).ok_or(TlsError::NoPeerIdentity)?;
    if allowed.allows(&id) {
        Ok(id)
    } else {
        Err(TlsError::UnexpectedPeer {
            got: id,
            allowed: allowed.clone(),
        })
    }
}

/// Connects over `stream` as a client, offering `alpn`, and checks the server is `allowed`.
pub async fn connect<S>(
    connector: &SslConnector,
    stream: S,
    allowed: &Peer,
    alpn: &[u8],
) -> Result<SslStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut cfg = connector.configure()?;
    // Mesh peers are named by SPIFFE ID, checked below; there is no DNS name to match.
    cfg.set_verify_hostname(false);
    cfg.set_use_server_name_indication(false);
    cfg.set_alpn_protos(alpn)?;
    let stream = tokio_boring::connect(cfg, "", stream)
        .await
        .map_err(|e| TlsError::Handshake(describe(&e)))?;
    check_peer(stream.ssl(), allowed)?;
    Ok(stream)
}

/// Accepts a TLS connection on `stream`; the caller checks the peer (if it asked for one).
pub async fn accept<S>(acceptor: &SslAcceptor, stream: S) -> Result<SslStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio_boring::accept(acceptor, stream)
        .await
        .map_err(|e| TlsError::Handshake(describe(&e)))
}

/// A handshake error with the certificate verification result when that is what failed.
fn describe<S>(e: &tokio_boring::HandshakeError<S>) -> String {
    match e.ssl().map(SslRef::verify_result) {
        Some(Err(v)) => format!("{e}: certificate: {}", v.error_string()),
        _ => e.to_string(),
    }
}
