//! Inbound: peers reach the local app through the proxy. The inbound listener's port picks the
//! `virtualInbound` filter chain the control plane sent for it: HTTP chains are served as HTTP
//! (HTTP/1.1 or HTTP/2 in, the app's protocol out), anything else is proxied as TCP bytes. The
//! app is at `app` (loopback and the app's own port), whatever port the chain names.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::debug;

use crate::http::{self as h, Body};
use crate::model::{Config, Inbound as Chain};
use crate::telemetry::{Reporter, Telemetry};
use crate::upstream::Upstreams;

#[derive(Clone)]
pub struct Inbound {
    pub config: Arc<ArcSwap<Config>>,
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    /// The chain to use (the workload's port as the mesh knows it).
    pub port: u16,
    /// Where the app listens.
    pub app: SocketAddr,
}

impl Inbound {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let cfg = self.config.load();
        let (http2, cluster) = match cfg.inbound.get(&self.port) {
            Some(Chain::Http { cluster }) => (
                cfg.clusters.get(&**cluster).is_some_and(|c| c.http2),
                cluster.clone(),
            ),
            _ => (false, Arc::from("")),
        };
        let (mut parts, body) = req.into_parts();
        let request = self
            .telemetry
            .begin(&parts, h::request_size(&parts, &body), peer);
        let upgrade = h::take_upgrade(&mut parts);
        let grpc = h::is_grpc(&parts);
        let resp = match self
            .upstreams
            .send_direct(http2, self.app, parts, h::incoming(body))
            .await
        {
            Ok(mut resp) => {
                h::splice(upgrade, &mut resp);
                resp
            }
            Err(flag) if grpc => h::grpc_local_reply(h::local_reply(flag)),
            Err(flag) => h::local_reply(flag),
        };
        let telemetry = self.telemetry.clone();
        h::observed(resp, move |out| {
            telemetry.end(request, Reporter::Destination, &cluster, out);
        })
    }
}

/// Serves the inbound side on `listener` until the task is dropped.
pub async fn serve(inbound: Inbound, listener: TcpListener, drain: h::Drain) {
    // One allocation per listener: requests clone this `Arc`, not the state it holds.
    let inbound = Arc::new(inbound);
    while let Some((mut stream, peer)) = h::accept(&listener, &drain).await {
        let is_http = matches!(
            inbound.config.load().inbound.get(&inbound.port),
            Some(Chain::Http { .. })
        );
        let inbound = inbound.clone();
        if is_http {
            tokio::spawn(h::serve_connection(
                stream,
                peer,
                drain.clone(),
                move |req, peer| {
                    let i = inbound.clone();
                    async move { i.handle(req, peer).await }
                },
            ));
        } else {
            let open = drain.open();
            tokio::spawn(async move {
                let _open = open;
                let metrics = &inbound.telemetry.metrics;
                match tokio::net::TcpStream::connect(inbound.app).await {
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
            });
        }
    }
}
