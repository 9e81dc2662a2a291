//! The app's probes, through the sidecar. An injected pod's HTTP, TCP and gRPC probes point
//! at the health listener (`/app-health/<container>/livez`, ...), since with STRICT mutual
//! TLS the kubelet's plain probe would be refused on the app's own port; the health listener
//! runs the original probe from inside the pod (as the sidecar's group, which the capture
//! leaves alone) and answers 200 or 503, as the kubelet would have judged it: HTTP status
//! 200–399, a TCP connection accepted, gRPC health `SERVING`. Each probe has its own timeout.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The probes the health listener forwards, by path.
#[derive(Debug, Clone, Default)]
pub struct AppProbes {
    /// The app's address (the pod's first IP, where the kubelet would have probed); a probe
    /// with a host of its own goes there instead.
    pub app: Option<IpAddr>,
    pub by_path: HashMap<String, AppProbe>,
}

#[derive(Debug, Clone)]
pub struct AppProbe {
    pub action: Action,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Action {
    Http {
        port: u16,
        path: String,
        https: bool,
        host: Option<String>,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
        host: Option<String>,
    },
    Grpc {
        port: u16,
        service: Option<String>,
    },
}

impl AppProbes {
    /// Runs the probe for `path`, if there is one: `Some(Ok)` when the app passes.
    pub async fn check(&self, path: &str) -> Option<Result<(), String>> {
        let probe = self.by_path.get(path)?;
        let app = self.app.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let run = probe.action.run(app);
        Some(match tokio::time::timeout(probe.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer in {:?}", probe.timeout)),
        })
    }
}

impl Action {
    async fn run(&self, app: IpAddr) -> Result<(), String> {
        match self {
            Action::Tcp { port, host } => {
                connect(host.as_deref(), app, *port).await?;
                Ok(())
            }
            Action::Http {
                port,
                path,
                https,
                host,
                headers,
            } => {
                let stream = connect(host.as_deref(), app, *port).await?;
                // The probe's own Host and User-Agent headers replace the defaults, as the
                // kubelet's do.
                let named = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
                let mut req = http::Request::get(if path.is_empty() { "/" } else { path });
                if !named("host") {
                    let authority = host.clone().unwrap_or_else(|| authority(app, *port));
                    req = req.header(http::header::HOST, authority);
                }
                if !named("user-agent") {
                    req = req.header(http::header::USER_AGENT, "kube-probe/1.33");
                }
                for (k, v) in headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let req = req
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?;
                let status = if *https {
                    http1(tls(stream).await?, req).await?
                } else {
                    http1(stream, req).await?
                };
                if (200..400).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("HTTP status {status}"))
                }
            }
            Action::Grpc { port, service } => grpc_health(app, *port, service.as_deref()).await,
        }
    }
}

fn authority(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

async fn connect(host: Option<&str>, app: IpAddr, port: u16) -> Result<TcpStream, String> {
    let r = match host {
        Some(h) => TcpStream::connect((h, port)).await,
        None => TcpStream::connect(SocketAddr::new(app, port)).await,
    };
    r.map_err(|e| format!("connect to port {port}: {e}"))
}

/// TLS without verification, as the kubelet's HTTPS probes do.
async fn tls(stream: TcpStream) -> Result<tokio_boring::SslStream<TcpStream>, String> {
    use boring::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
    b.set_verify(SslVerifyMode::NONE);
    let config = b
        .build()
        .configure()
        .map_err(|e| e.to_string())?
        .verify_hostname(false)
        .use_server_name_indication(false);
    tokio_boring::connect(config, "probe", stream)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

async fn http1<S>(stream: S, req: http::Request<Full<Bytes>>) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(|e| e.to_string());
    conn.abort();
    Ok(resp?.status().as_u16())
}

/// `grpc.health.v1.Health/Check`: passes when the app says `SERVING`.
async fn grpc_health(app: IpAddr, port: u16, service: Option<&str>) -> Result<(), String> {
    let stream = connect(None, app, port).await?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    // HealthCheckRequest { service = 1 }, in a gRPC frame.
    let service = service.unwrap_or_default().as_bytes();
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a);
        varint(&mut message, service.len() as u64);
        message.extend_from_slice(service);
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = http::Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        authority(app, port)
    ))
    .header(http::header::CONTENT_TYPE, "application/grpc")
    .header(http::header::TE, "trailers")
    .header(http::header::USER_AGENT, "kube-probe/1.33")
    .body(Full::new(Bytes::from(frame)))
    .map_err(|e| e.to_string())?;
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let head_status = grpc_status(resp.headers());
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let status = collected
            .trailers()
            .and_then(grpc_status)
            .or(head_status)
            .unwrap_or(-1);
        if status != 0 {
            return Err(format!("grpc-status {status}"));
        }
        let mut body = collected.to_bytes();
        if body.len() < 5 {
            return Err("no health response".into());
        }
        body.advance(5);
        // HealthCheckResponse { status = 1 }: SERVING is 1.
        match serving_status(&body) {
            Some(1) => Ok(()),
            Some(s) => Err(format!("health status {s}, not SERVING")),
            None => Err("unreadable health response".into()),
        }
    }
    .await;
    conn.abort();
    result
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field 1 (a varint) of a protobuf message; 0 when absent, as proto3 has it.
fn serving_status(mut b: &[u8]) -> Option<u64> {
    let read = |b: &mut &[u8]| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    let mut status = 0;
    while !b.is_empty() {
        let key = read(&mut b)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = read(&mut b)?,
            (_, 0) => {
                read(&mut b)?;
            }
            (_, 2) => {
                let n = usize::try_from(read(&mut b)?).ok()?;
                b = b.get(n..)?;
            }
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_health_status() {
        assert_eq!(serving_status(&[0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[]), Some(0));
        assert_eq!(serving_status(&[0x12, 0x01, 0x41, 0x08, 0x02]), Some(2));
        assert_eq!(serving_status(&[0x08]), None);
    }
}
