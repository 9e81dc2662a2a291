//! Inbound: peers reach the local app through the proxy. Each connection is served by the
//! `virtualInbound` filter chain the control plane sent for its destination port, or by the
//! catch-all (passthrough) chain for ports no service declares; without a chain it is closed,
//! and before the first complete config every connection is. HTTP chains are served as HTTP
//! (HTTP/1.1 or HTTP/2 in, the app's protocol out) to `app` (loopback and the app's own port);
//! TCP chains proxy bytes, to `app` or, for the passthrough cluster, to the connection's
//! original destination (the pod's address) from 127.0.0.6 / ::6.
//!
//! A port can have a mutual-TLS chain, a plaintext one, or both (Istio's PERMISSIVE). Where it
//! has a TLS chain, the first byte of each connection tells them apart (a TLS record starts
//! with 0x16): TLS connections are terminated with the workload certificate, the client's
//! certificate required and verified, and its SPIFFE ID recorded for metrics and logs.
//! Plaintext on a port with only a TLS chain (STRICT) is closed.
//!
//! A connection stays judged by the chain it was accepted under: each HTTP request looks the
//! chain up again (gone or changed kind: denied, and the connection closes after the requests
//! in flight), and each open TCP connection is checked again when a new config arrives.
//! Captured connections to the sidecar's own ports are closed, never proxied to itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use crate::http::{self as h, Body};
use crate::model::{ClusterKind, Config, Inbound as Chain};
use crate::request::{self, View};
use crate::telemetry::{InboundRefusal, Reporter, Telemetry};
use crate::upstream::Upstreams;

/// A client that opens a connection to a TLS port must start its handshake within this.
const FIRST_BYTE: Duration = Duration::from_secs(10);
/// The first byte of a TLS record (handshake).
const TLS_HANDSHAKE: u8 = 0x16;
/// Where passthrough connections to the original destination come from (Istio's), so the app
/// can tell them from its own loopback clients and the capture rules leave them alone.
const PASSTHROUGH_SOURCE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
const PASSTHROUGH_SOURCE_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));

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
    /// Changes each time a config is applied: open TCP connections are judged again.
    pub updates: watch::Receiver<()>,
    /// The ports the sidecar itself listens on, set once they are all bound: a captured
    /// connection to one of them is closed.
    pub own_ports: Arc<OnceLock<Box<[u16]>>>,
}

/// Who is calling, as far as the connection says, and the chain it was accepted under.
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
    /// The cluster of the chain the connection was accepted under.
    cluster: Arc<str>,
    /// Closes an HTTP connection whose chain changed, after the requests in flight.
    closer: Option<h::Closer>,
    /// `x-forwarded-client-cert` for the app, from the verified peer of a mutual-TLS
    /// connection; made once per connection.
    xfcc: Option<http::HeaderValue>,
}

/// One XFCC value, quoted (with `\` and `"` escaped) when asked to or when it holds a
/// character that would end it (`,` `;` `=` `"`): a certificate cannot smuggle in a second
/// `URI=`.
fn xfcc_value(v: &str, always: bool) -> String {
    if !always && !v.contains([',', ';', '=', '"', '\\']) {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Istio's `x-forwarded-client-cert` for a mutual-TLS peer, as Envoy sets it with Istio's
/// `set_current_client_cert_details` (subject, URI, DNS): who this sidecar is (`By`), the
/// SHA-256 of the peer's certificate (`Hash`), its subject and SPIFFE ID.
fn xfcc(own: &str, ssl: &boring::ssl::SslRef) -> Option<http::HeaderValue> {
    let cert = ssl.peer_certificate()?;
    let hash = cert.digest(boring::hash::MessageDigest::sha256()).ok()?;
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    // RFC 2253 order: the last RDN first.
    let mut subject: Vec<String> = cert
        .subject_name()
        .entries()
        .filter_map(|e| {
            let key = e.object().nid().short_name().ok()?;
            Some(format!("{key}={}", e.data().as_utf8().ok()?))
        })
        .collect();
    subject.reverse();
    let mut value = format!("By={};Hash={hex};Subject={}", xfcc_value(own, false), {
        xfcc_value(&subject.join(","), true)
    });
    if let Some(uri) = hypha_identity::tls::peer_id(ssl) {
        value.push_str(";URI=");
        value.push_str(&xfcc_value(&uri, false));
    }
    for dns in cert
        .subject_alt_names()
        .iter()
        .flatten()
        .filter_map(|n| n.dnsname().map(str::to_owned))
    {
        value.push_str(";DNS=");
        value.push_str(&xfcc_value(&dns, false));
    }
    http::HeaderValue::from_str(&value).ok()
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
        // The chain is looked up again for every request: policy changes apply at once, and a
        // chain that is gone or is no longer this HTTP one denies.
        let chain = match cfg.inbound_chain(caller.tls, caller.port) {
            Some(Chain::Http {
                cluster,
                authz,
                paths,
            }) if *cluster == caller.cluster => Some((
                cfg.clusters.get(&**cluster).is_some_and(|c| c.http2),
                authz,
                *paths,
            )),
            _ => None,
        };
        let (mut parts, body) = req.into_parts();
        // The app learns the client's certificate from this sidecar only (Envoy's
        // SANITIZE_SET): whatever a client sent is dropped, mutual TLS sets it.
        // (`insert` replaces every value the client sent.)
        match &caller.xfcc {
            Some(v) => {
                parts.headers.insert(h::XFCC, v.clone());
            }
            None => h::remove_rare(&mut parts.headers, &h::XFCC),
        }
        // A method or path normalization refuses: 400, before authorization.
        let invalid =
            chain.is_some_and(|(_, _, paths)| request::normalize(&mut parts, paths).is_err());
        let request = self
            .telemetry
            .begin(&parts, h::request_size(&parts, &body), peer);
        let allowed = match chain {
            _ if invalid => false,
            Some((_, a, _)) => {
                a.is_empty() || {
                    let authority = parts
                        .uri
                        .authority()
                        .map(http::uri::Authority::as_str)
                        .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
                        .unwrap_or("");
                    let view = View::new(&parts, authority);
                    self.authorize(a, Some(&view), peer, caller)
                }
            }
            None => {
                debug!(%peer, port = caller.port, "the connection's chain changed: request denied, connection closing");
                self.telemetry
                    .metrics
                    .inbound_refused(InboundRefusal::ChainChanged);
                if let Some(closer) = &caller.closer {
                    closer.close();
                }
                false
            }
        };
        let resp = if invalid {
            h::local_reply(h::Flag::BadRequest)
        } else if allowed {
            let http2 = chain.is_some_and(|(http2, ..)| http2);
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
        let cluster = caller.cluster.clone();
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

    /// Where a captured connection was going, unless that is the sidecar itself: one of its
    /// own ports (the capture port would hand the connection back to itself for ever), or a
    /// connection from its own passthrough source (one that came back around).
    fn original_destination(&self, stream: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let dst = match crate::capture::original_dst(stream) {
            Ok(dst) => dst,
            Err(e) => {
                debug!(%peer, error = %e, "captured connection without an original destination");
                return None;
            }
        };
        let own = self.own_ports.get().is_none_or(|p| p.contains(&dst.port()));
        let looped = matches!(
            peer.ip().to_canonical(),
            PASSTHROUGH_SOURCE_V4 | PASSTHROUGH_SOURCE_V6
        );
        if own || looped {
            debug!(%peer, %dst, "captured connection to the sidecar itself: closed");
            self.telemetry
                .metrics
                .inbound_refused(InboundRefusal::Blackholed);
            return None;
        }
        Some(dst)
    }

    /// One accepted connection: TLS or plaintext, then HTTP or TCP by the port's chain.
    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, drain: h::Drain) {
        let cfg = self.config.load_full();
        let metrics = &self.telemetry.metrics;
        if !cfg.complete {
            debug!(%peer, "inbound connection before the first complete config: closed");
            metrics.inbound_refused(InboundRefusal::NotReady);
            return;
        }
        let (destination, port, app) = if self.captured {
            let Some(dst) = self.original_destination(&stream, peer) else {
                return;
            };
            (dst, dst.port(), SocketAddr::new(self.app.ip(), dst.port()))
        } else {
            let local = stream.local_addr().map_or(peer, |a| a);
            (SocketAddr::new(local.ip(), self.port), self.port, self.app)
        };
        let has_tls = cfg.inbound_takes_tls(port);
        let tls = has_tls && {
            let mut first = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE, stream.peek(&mut first)).await {
                Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
                _ => return,
            }
        };
        let caller = |tls, principal, sni, chain: &Chain| Caller {
            tls,
            principal,
            sni,
            destination,
            port,
            app,
            cluster: match chain {
                Chain::Http { cluster, .. } => cluster.clone(),
                Chain::Tcp { cluster, .. } => Arc::from(cluster.as_str()),
            },
            closer: None,
            xfcc: None,
        };
        if !tls {
            match cfg.inbound_chain(false, port) {
                Some(chain @ Chain::Http { .. }) => {
                    let (caller, drain) =
                        Self::http_caller(caller(false, None, None, chain), &drain);
                    h::serve_connection(stream, peer, drain, move |req, peer| {
                        let (i, caller) = (self.clone(), caller.clone());
                        async move { i.handle(req, peer, &caller).await }
                    })
                    .await;
                }
                Some(chain @ Chain::Tcp { authz, cluster }) => {
                    let caller = caller(false, None, None, chain);
                    if self.authorize_tcp(authz, peer, &caller) {
                        self.tcp(stream, peer, &caller, cluster).await;
                    }
                }
                None if has_tls => {
                    debug!(%peer, port, "plaintext refused: the port requires mutual TLS");
                    metrics.plaintext_refused();
                }
                None => {
                    debug!(%peer, port, "no inbound filter chain takes the connection: closed");
                    metrics.inbound_refused(InboundRefusal::NoFilterChain);
                }
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
                metrics.tls_refused();
                return;
            }
            Err(_) => return,
        };
        let principal = hypha_identity::tls::peer_id(stream.ssl()).map(Arc::from);
        let sni = stream
            .ssl()
            .servername(boring::ssl::NameType::HOST_NAME)
            .map(Arc::from);
        let h2 = stream.ssl().selected_alpn_protocol() == Some(b"h2".as_slice());
        // Looked up again: the config may have changed during the handshake.
        let cfg = self.config.load_full();
        match cfg.inbound_chain(true, port) {
            Some(chain @ Chain::Http { .. }) => {
                let caller = Caller {
                    xfcc: xfcc(credentials.identity.id(), stream.ssl()),
                    ..caller(true, principal, sni, chain)
                };
                let (caller, drain) = Self::http_caller(caller, &drain);
                h::serve_tls(stream, h2, peer, drain, move |req, peer| {
                    let (i, caller) = (self.clone(), caller.clone());
                    async move { i.handle(req, peer, &caller).await }
                })
                .await;
            }
            Some(chain @ Chain::Tcp { authz, cluster }) => {
                let caller = caller(true, principal, sni, chain);
                if self.authorize_tcp(authz, peer, &caller) {
                    self.tcp(stream, peer, &caller, cluster).await;
                }
            }
            None => {
                debug!(%peer, port, "the TLS chain went away during the handshake: closed");
                metrics.inbound_refused(InboundRefusal::ChainChanged);
            }
        }
    }

    /// An HTTP connection's caller, with a closer for when its chain changes, and the drain
    /// that closer is part of.
    fn http_caller(mut caller: Caller, drain: &h::Drain) -> (Arc<Caller>, h::Drain) {
        let (closer, drain) = drain.with_closer();
        caller.closer = Some(closer);
        (Arc::new(caller), drain)
    }

    /// A TCP connection's authorization: a denied one is closed before any byte reaches the
    /// app.
    fn authorize_tcp(
        &self,
        authz: &crate::authz::Authz,
        peer: SocketAddr,
        caller: &Caller,
    ) -> bool {
        authz.is_empty() || self.authorize::<View<'_>>(authz, None, peer, caller)
    }

    /// Whether an open TCP connection's chain still takes it, as it is now.
    fn still_allowed(&self, peer: SocketAddr, caller: &Caller) -> bool {
        let cfg = self.config.load();
        match cfg.inbound_chain(caller.tls, caller.port) {
            Some(Chain::Tcp { cluster, authz }) if **cluster == *caller.cluster => {
                self.authorize_tcp(authz, peer, caller)
            }
            _ => {
                self.telemetry
                    .metrics
                    .inbound_refused(InboundRefusal::ChainChanged);
                false
            }
        }
    }

    /// Proxies the connection's bytes to where its chain's cluster says: the original
    /// destination (the passthrough cluster, captured connections), nowhere (a cluster without
    /// endpoints, or none), or the app. Closed when a new config no longer takes it.
    async fn tcp<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        caller: &Caller,
        cluster: &str,
    ) {
        let metrics = &self.telemetry.metrics;
        let target = {
            let cfg = self.config.load();
            match cfg.clusters.get(cluster).map(|c| (&c.kind, &c.bind)) {
                Some((ClusterKind::OriginalDst, bind)) if self.captured => {
                    Some((caller.destination, bind.clone()))
                }
                Some((ClusterKind::Static(e), _)) if e.is_empty() => None,
                Some(_) => Some((caller.app, Vec::new())),
                None => None,
            }
        };
        let Some((to, bind)) = target else {
            debug!(%peer, cluster, "inbound connection to a cluster with no endpoints: closed");
            metrics.inbound_refused(InboundRefusal::Blackholed);
            return;
        };
        let mut upstream = match connect_from(to, &bind).await {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, %to, error = %e, "cannot reach the app");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        metrics.tcp_opened();
        let mut updates = self.updates.clone();
        updates.mark_unchanged();
        let idle = self.upstreams.tcp_idle_timeout;
        let copy = crate::limits::splice(&mut stream, &mut upstream, idle);
        let mut copy = std::pin::pin!(copy);
        let done = loop {
            tokio::select! {
                done = &mut copy => break Some(done),
                Ok(()) = updates.changed() => {
                    if !self.still_allowed(peer, caller) {
                        debug!(%peer, "the connection's chain changed: closed");
                        break None;
                    }
                }
            }
        };
        match done {
            // Received from the peer, sent back to it.
            Some(Ok((received, sent))) => metrics.tcp_closed(sent, received),
            Some(Err(e)) => {
                metrics.tcp_closed(0, 0);
                debug!(%peer, error = %e, "inbound TCP connection ended");
            }
            None => metrics.tcp_closed(0, 0),
        }
    }
}

/// A connection to `to`, from the first of `sources` of its family when there is one (Istio's
/// 127.0.0.6 / ::6), or from the kernel's choice where that address is not configured.
async fn connect_from(to: SocketAddr, sources: &[IpAddr]) -> std::io::Result<TcpStream> {
    let socket = || match to {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let mut s = socket()?;
    if let Some(ip) = sources.iter().find(|ip| ip.is_ipv4() == to.is_ipv4()) {
        if let Err(e) = s.bind(SocketAddr::new(*ip, 0)) {
            if e.kind() != std::io::ErrorKind::AddrNotAvailable {
                return Err(e);
            }
            debug!(source = %ip, "passthrough source address not configured; connecting without it");
            s = socket()?;
        }
    }
    s.connect(to).await
}

/// Serves the inbound side on `listener` until the task is dropped.
pub async fn serve(inbound: Inbound, listener: TcpListener, drain: h::Drain) {
    // One allocation per listener: requests clone this `Arc`, not the state it holds.
    let inbound = Arc::new(inbound);
    while let Some((stream, peer, open)) = h::accept(&listener, &drain).await {
        let serving = inbound.clone().connection(stream, peer, drain.clone());
        tokio::spawn(async move {
            let _open = open;
            serving.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::xfcc_value;

    #[test]
    fn xfcc_values_cannot_add_elements() {
        assert_eq!(
            xfcc_value("spiffe://td/ns/a/sa/b", false),
            "spiffe://td/ns/a/sa/b"
        );
        assert_eq!(xfcc_value("", true), "\"\"");
        assert_eq!(
            xfcc_value("x;URI=spiffe://td/ns/x/sa/admin", false),
            "\"x;URI=spiffe://td/ns/x/sa/admin\""
        );
        assert_eq!(xfcc_value("CN=a\\\",b", true), "\"CN=a\\\\\\\",b\"");
    }
}
