//! gRPC (tonic) over BoringSSL: a server's stream of accepted TLS connections, each carrying
//! the peer's verified identity into every request's extensions ([`PeerInfo`]), and client
//! channels that check the server's SPIFFE ID.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use boring::ssl::SslConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_boring::SslStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{self, Peer, ALPN_H2};
use crate::Credentials;

/// A slow or silent client gets this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, every client together: more connections wait in the
/// listen backlog until one ends.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress at once from one address: more from it are closed at once, so one
/// client cannot hold every handshake slot.
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 64;

/// What a request's extensions say about its connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The client certificate's SPIFFE ID, verified against the server's roots and vouched
    /// for (see [`incoming_vouched`]); `None` when the client presented no certificate, or one
    /// that was not vouched for.
    pub identity: Option<String>,
    /// Why a verified client certificate was not taken as an identity.
    pub refused: Option<String>,
}

/// What a server asks of a verified client certificate beyond its chain (its SPIFFE ID and
/// the certificate): `Err` with the reason to refuse it.
pub type Vouch = dyn Fn(&str, &boring::x509::X509Ref) -> Result<(), String> + Send + Sync;

/// An accepted TLS connection, for tonic's `serve_with_incoming`.
pub struct TlsIo {
    stream: SslStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and handshakes each connection on its own task with the server
/// context of the credentials `current()` returns at that moment (so a rotated certificate serves new connections at
/// once). Connections that fail their handshake are logged and dropped; the stream yields the
/// rest. The accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    current: impl Fn() -> Arc<Credentials> + Send + Sync + 'static,
) -> ReceiverStream<io::Result<TlsIo>> {
    incoming_vouched(listener, current, Arc::new(|_: &str, _: &_| Ok(())))
}

/// [`incoming`], taking a client certificate's identity only where `vouch` accepts it (the
/// control plane: a workload's certificate must come from its own tenant's signer, whatever
/// other roots the server trusts). A refused one leaves the connection without an identity,
/// with [`PeerInfo::refused`] saying why. Handshakes are bounded: [`MAX_HANDSHAKES`] at
/// once (the next connection waits to be accepted), [`MAX_HANDSHAKES_PER_SOURCE`] from one
/// address (more are closed), each at most [`HANDSHAKE_TIMEOUT`].
pub fn incoming_vouched(
    listener: TcpListener,
    current: impl Fn() -> Arc<Credentials> + Send + Sync + 'static,
    vouch: Arc<Vouch>,
) -> ReceiverStream<io::Result<TlsIo>> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let by_source = Arc::new(Sources::default());
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                () = tx.closed() => return,
                slot = handshakes.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return, // never closed
                },
            };
            let (tcp, remote) = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(source) = by_source.clone().take(remote.ip()) else {
                tracing::info!(%remote, "too many handshakes from one address: closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let credentials = current();
            let tx = tx.clone();
            let vouch = vouch.clone();
            tokio::spawn(async move {
                let _held = (slot, source);
                let handshake = tls::accept(&credentials.server, tcp);
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let mut identity = tls::peer_id(stream.ssl());
                let mut refused = None;
                if let (Some(id), Some(cert)) = (&identity, stream.ssl().peer_certificate()) {
                    if let Err(reason) = vouch(id, &cert) {
                        tracing::warn!(%remote, identity = %id, %reason, "client certificate refused");
                        refused = Some(reason);
                        identity = None;
                    }
                }
                let info = PeerInfo {
                    remote,
                    identity,
                    refused,
                };
                let _ = tx.send(Ok(TlsIo { stream, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Handshakes in progress by source address.
#[derive(Default)]
struct Sources(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One handshake counted for its source until dropped.
struct Source(Arc<Sources>, std::net::IpAddr);

impl Sources {
    fn take(self: Arc<Self>, ip: std::net::IpAddr) -> Option<Source> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        drop(map);
        Some(Source(self, ip))
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// A gRPC channel to `uri` (`https://host:port`; the scheme is not used) over TLS with
/// `connector`, connecting only to a server whose identity `allowed` accepts. Connects now,
/// so that an unreachable or wrong server is an error here.
pub async fn channel(
    uri: &str,
    connector: SslConnector,
    allowed: Peer,
) -> Result<Channel, crate::IdentityError> {
    let failed = |reason: String| crate::IdentityError::Connect {
        uri: uri.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(uri.to_owned()).map_err(|e| failed(e.to_string()))?;
    let connect = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        let allowed = allowed.clone();
        async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no authority"))?
                .as_str()
                .to_owned();
            let tcp = TcpStream::connect(&authority).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tls::connect(&connector, tcp, &allowed, ALPN_H2)
                .await
                .map_err(io::Error::other)?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connect)
        .await
        .map_err(|e| match wrong_peer(&e) {
            // Not a server that is away for now: one that is not who it must be.
            Some(reason) => crate::IdentityError::WrongServer {
                uri: uri.to_owned(),
                reason,
            },
            None => failed(error_chain(&e)),
        })
}

/// The refusal of a server whose identity is not the one allowed, if that is what `e` is.
fn wrong_peer(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        let inner = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<tls::TlsError>());
        if let Some(t @ tls::TlsError::UnexpectedPeer { .. }) = inner {
            return Some(t.to_string());
        }
        next = err.source();
    }
    None
}

/// An error with its sources, for messages that say what actually failed.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
