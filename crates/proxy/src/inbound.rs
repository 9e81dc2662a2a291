//! Inbound: peers reach the local app through the proxy. The inbound listener's port picks the
//! `virtualInbound` filter chain the control plane sent for it: HTTP chains are served as HTTP
//! (HTTP/1.1 or HTTP/2 in, the app's protocol out), anything else is proxied as TCP bytes. The
//! app is at `app` (loopback and the app's own port), whatever port the chain names.
//!
//! A port can have a mutual-TLS chain, a plaintext one, or both (Istio's PERMISSIVE). Where it
//! has a TLS chain, the first byte of each connection tells them apart (a TLS record starts
//! with 0x16): TLS connections are terminated with the workload certificate, the client's
//! certificate required and verified, and its SPIFFE ID recorded for metrics and logs.
//! Plaintext on a port with only a TLS chain (STRICT) is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::http::{self as h, Body};
use crate::model::{Config, Inbound as Chain};
use crate::telemetry::{Reporter, Telemetry};
use crate::upstream::Upstreams;

/// A client that opens a connection to a TLS port must start its handshake within this.
const FIRST_BYTE: Duration = Duration::from_secs(10);
/// The first byte of a TLS record (handshake).
const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Clone)]
pub struct Inbound {
    pub config: Arc<ArcSwap<Config>>,
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    /// The chain to use (the workload's port as the mesh knows it).
    pub port: u16,
    /// Where the app listens.
    pub app: SocketAddr,
    /// The workload certificate, for mutual-TLS chains.
    pub identity: Option<hypha_identity::Store>,
    /// A capture listener (15006): each connection's original destination port picks its
    /// chain and the app port, in place of `port` and `app`'s port.
    pub captured: bool,
}

/// Who is calling, as far as the connection says.
#[derive(Clone)]
struct Caller {
    tls: bool,
    /// The verified SPIFFE ID of a mutual-TLS client.
    principal: Option<Arc<str>>,
    /// The SNI a TLS client sent.
    sni: Option<Arc<str>>,
    /// The workload address and port the connection came to (`destination.*` in policies).
    destination: SocketAddr,
    /// The chain's port.
    port: u16,
    /// Where the app listens for this connection.
    app: SocketAddr,
}

/// Denied requests get this, as from Envoy's RBAC filter.
const DENIED: &str = "RBAC: access denied";

impl Inbound {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        caller: &Caller,
    ) -> Response<Body> {
        let cfg = self.config.load();
        let chains = if caller.tls {
            &cfg.inbound_tls
        } else {
            &cfg.inbound
        };
        let (http2, cluster, authz) = match chains.get(&caller.port) {
            Some(Chain::Http { cluster, authz }) => (
                cfg.clusters.get(&**cluster).is_some_and(|c| c.http2),
                cluster.clone(),
                Some(authz),
            ),
            _ => (false, Arc::from(""), None),
        };
        let (mut parts, body) = req.into_parts();
        h::normalize_path(&mut parts);
        let request = self
            .telemetry
            .begin(&parts, h::request_size(&parts, &body), peer);
        let allowed = authz.is_none_or(|a| {
            a.is_empty() || {
                let authority = parts
                    .uri
                    .authority()
                    .map(http::uri::Authority::as_str)
                    .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
                    .unwrap_or("");
                let view = h::View {
                    parts: &parts,
                    authority,
                };
                self.authorize(a, Some(&view), peer, caller)
            }
        });
        let resp = if allowed {
            let upgrade = h::take_upgrade(&mut parts);
            let grpc = h::is_grpc(&parts);
            match self
                .upstreams
                .send_direct(http2, caller.app, parts, h::incoming(body))
                .await
            {
                Ok(mut resp) => {
                    h::splice(upgrade, &mut resp);
                    resp
                }
                Err(flag) if grpc => h::grpc_local_reply(h::local_reply(flag)),
                Err(flag) => h::local_reply(flag),
            }
        } else if h::is_grpc(&parts) {
            h::grpc_permission_denied()
        } else {
            let mut resp = Response::new(h::full(DENIED));
            *resp.status_mut() = http::StatusCode::FORBIDDEN;
            resp
        };
        let telemetry = self.telemetry.clone();
        let principal = caller.principal.clone();
        h::observed(resp, move |out| {
            telemetry.end(
                request,
                Reporter::Destination,
                &cluster,
                out,
                principal.as_deref(),
            );
        })
    }

    /// Runs the chain's RBAC filters; counts denials and audits.
    fn authorize<R: hypha_matcher::Request>(
        &self,
        authz: &crate::authz::Authz,
        http: Option<&R>,
        peer: SocketAddr,
        caller: &Caller,
    ) -> bool {
        let d = authz.check(&crate::authz::Ctx {
            http,
            source: peer,
            destination: caller.destination,
            principal: caller.principal.as_deref(),
            sni: caller.sni.as_deref(),
        });
        let metrics = &self.telemetry.metrics;
        if d.audited {
            metrics.rbac_audited();
        }
        if !d.allowed {
            metrics.rbac_denied(http.is_some());
            debug!(%peer, principal = ?caller.principal, "denied by authorization policy");
        }
        d.allowed
    }

    /// One accepted connection: TLS or plaintext, then HTTP or TCP by the port's chain.
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, drain: h::Drain) {
        let cfg = self.config.load_full();
        let (destination, port, app) = if self.captured {
            match crate::capture::original_dst(&stream) {
                Ok(dst) => (dst, dst.port(), SocketAddr::new(self.app.ip(), dst.port())),
                Err(e) => {
                    debug!(%peer, error = %e, "captured connection without an original destination");
                    return;
                }
            }
        } else {
            let local = stream.local_addr().map_or(peer, |a| a);
            (SocketAddr::new(local.ip(), self.port), self.port, self.app)
        };
        let has_tls = cfg.inbound_tls.contains_key(&port);
        let tls = has_tls && {
            let mut first = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE, stream.peek(&mut first)).await {
                Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
                _ => return,
            }
        };
        if !tls {
            match cfg.inbound.get(&port) {
                Some(Chain::Http { .. }) => {
                    let caller = Caller {
                        tls: false,
                        principal: None,
                        sni: None,
                        destination,
                        port,
                        app,
                    };
                    h::serve_connection(stream, peer, drain, move |req, peer| {
                        let (i, caller) = (self.clone(), caller.clone());
                        async move { i.handle(req, peer, &caller).await }
                    })
                    .await;
                }
                None if has_tls => {
                    debug!(%peer, port, "plaintext refused: the port requires mutual TLS");
                    self.telemetry.metrics.plaintext_refused();
                }
                Some(Chain::Tcp { authz, .. }) => {
                    let caller = Caller {
                        tls: false,
                        principal: None,
                        sni: None,
                        destination,
                        port,
                        app,
                    };
                    let allowed = self.authorize_tcp(authz, peer, &caller);
                    if allowed {
                        self.to_app(stream, peer, app, &drain).await;
                    }
                }
                // No chain: the bytes go to the app.
                None => self.to_app(stream, peer, app, &drain).await,
            }
            return;
        }
        let Some(store) = &self.identity else {
            return; // refused when the chain arrived (see `state`)
        };
        let credentials = store.load();
        let accepted = tokio::time::timeout(
            FIRST_BYTE,
            hypha_identity::tls::accept(&credentials.server, stream),
        )
        .await;
        let stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "inbound mutual TLS refused");
                self.telemetry.metrics.tls_refused();
                return;
            }
            Err(_) => return,
        };
        let caller = Caller {
            tls: true,
            principal: hypha_identity::tls::peer_id(stream.ssl()).map(Arc::from),
            sni: stream
                .ssl()
                .servername(boring::ssl::NameType::HOST_NAME)
                .map(Arc::from),
            destination,
            port,
            app,
        };
        let h2 = stream.ssl().selected_alpn_protocol() == Some(b"h2".as_slice());
        match cfg.inbound_tls.get(&port) {
            Some(Chain::Http { .. }) => {
                h::serve_tls(stream, h2, peer, drain, move |req, peer| {
                    let (i, caller) = (self.clone(), caller.clone());
                    async move { i.handle(req, peer, &caller).await }
                })
                .await;
            }
            Some(Chain::Tcp { authz, .. }) if self.authorize_tcp(authz, peer, &caller) => {
                self.to_app(stream, peer, app, &drain).await;
            }
            // Denied, or no chain (the TLS chain went away meanwhile): closed.
            _ => {}
        }
    }

    /// A TCP connection's authorization: a denied one is closed before any byte reaches the
    /// app.
    fn authorize_tcp(
        &self,
        authz: &crate::authz::Authz,
        peer: SocketAddr,
        caller: &Caller,
    ) -> bool {
        authz.is_empty() || self.authorize::<h::View<'_>>(authz, None, peer, caller)
    }

    /// Proxies the connection's bytes to the app.
    async fn to_app<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        app: SocketAddr,
        drain: &h::Drain,
    ) {
        let _open = drain.open();
        let metrics = &self.telemetry.metrics;
        match TcpStream::connect(app).await {
            Ok(mut app) => {
                let _ = app.set_nodelay(true);
                metrics.tcp_opened();
                match tokio::io::copy_bidirectional(&mut stream, &mut app).await {
                    // Received from the peer, sent back to it.
                    Ok((received, sent)) => metrics.tcp_closed(sent, received),
                    Err(e) => {
                        metrics.tcp_closed(0, 0);
                        debug!(%peer, error = %e, "inbound TCP connection ended");
                    }
                }
            }
            Err(e) => debug!(%peer, error = %e, "cannot reach the app"),
        }
    }
}

/// Serves the inbound side on `listener` until the task is dropped.
pub async fn serve(inbound: Inbound, listener: TcpListener, drain: h::Drain) {
    // One allocation per listener: requests clone this `Arc`, not the state it holds.
    let inbound = Arc::new(inbound);
    while let Some((stream, peer)) = h::accept(&listener, &drain).await {
        tokio::spawn(inbound.clone().connection(stream, peer, drain.clone()));
    }
}
