//! Application probes through the sidecar. With STRICT mutual TLS the kubelet's plain probes
//! to the app's ports would be refused by the sidecar, so the injector points each HTTP, TCP
//! and gRPC probe at the sidecar's health port (`/app-health/<container>/livez`, `readyz`,
//! `startupz`, as Istio names them) and hands the sidecar the original probes
//! ([`APP_PROBERS_ENV`](crate::APP_PROBERS_ENV), JSON); the sidecar forwards each to the app
//! from inside the pod and answers with the result. Exec probes stay as they are; so does
//! everything when the pod says `sidecar.istio.io/rewriteAppHTTPProbers: "false"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The probes the sidecar forwards, by path.
pub type AppProbers = BTreeMap<String, AppProbe>;

/// One original probe: what the kubelet would have done, the port resolved to a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// The probe's timeout (the kubelet's default, 1 s, when the probe gives none).
    #[serde(default = "one_second")]
    pub timeout_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: String,
    pub port: u16,
    /// `HTTP` (the kubelet's default) or `HTTPS` (the kubelet does not verify the app's
    /// certificate, nor does the sidecar).
    #[serde(default = "http")]
    pub scheme: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSocket {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grpc {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

fn http() -> String {
    "HTTP".into()
}

fn one_second() -> u32 {
    1
}

/// The path the sidecar serves a container's probe of one kind on.
pub fn path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
}

/// The sidecar's probers, from the JSON the injector wrote.
pub fn parse(json: &str) -> Result<AppProbers, serde_json::Error> {
    serde_json::from_str(json)
}

const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Points the HTTP, TCP and gRPC probes of `container` (a pod spec's container, as JSON) at
/// the sidecar's `health_port`, adding the originals to `probers`. A probe whose named port
/// the container does not declare is left alone, as the kubelet would fail it anyway.
pub(crate) fn rewrite(container: &mut Value, health_port: u16, probers: &mut AppProbers) {
    let name = container["name"].as_str().unwrap_or_default().to_owned();
    let ports = container["ports"].clone();
    let Some(c) = container.as_object_mut() else {
        return;
    };
    for (field, kind) in KINDS {
        let Some(probe) = c.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        let resolve = |p: &Value| port(p, &ports);
        let timeout = probe
            .get("timeoutSeconds")
            .and_then(Value::as_u64)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(1);
        let original = if let Some(h) = probe.get("httpGet") {
            let Some(port) = resolve(&h["port"]) else {
                continue;
            };
            let headers = h["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| Header {
                    name: x["name"].as_str().unwrap_or_default().to_owned(),
                    value: x["value"].as_str().unwrap_or_default().to_owned(),
                })
                .collect();
            AppProbe {
                http_get: Some(HttpGet {
                    path: h["path"].as_str().unwrap_or("/").to_owned(),
                    port,
                    scheme: h["scheme"].as_str().unwrap_or("HTTP").to_owned(),
                    host: h["host"].as_str().map(str::to_owned),
                    http_headers: headers,
                }),
                tcp_socket: None,
                grpc: None,
                timeout_seconds: timeout,
            }
        } else if let Some(t) = probe.get("tcpSocket") {
            let Some(port) = resolve(&t["port"]) else {
                continue;
            };
            AppProbe {
                http_get: None,
                tcp_socket: Some(TcpSocket {
                    port,
                    host: t["host"].as_str().map(str::to_owned),
                }),
                grpc: None,
                timeout_seconds: timeout,
            }
        } else if let Some(g) = probe.get("grpc") {
            let Some(port) = resolve(&g["port"]) else {
                continue;
            };
            AppProbe {
                http_get: None,
                tcp_socket: None,
                grpc: Some(Grpc {
                    port,
                    service: g["service"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                }),
                timeout_seconds: timeout,
            }
        } else {
            continue;
        };
        let path = path(&name, kind);
        for handler in ["httpGet", "tcpSocket", "grpc"] {
            probe.remove(handler);
        }
        probe.insert(
            "httpGet".into(),
            json!({"path": path, "port": health_port, "scheme": "HTTP"}),
        );
        probers.insert(path, original);
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(p: &Value, ports: &Value) -> Option<u16> {
    match p {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => match s.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => ports
                .as_array()?
                .iter()
                .find(|cp| cp["name"].as_str() == Some(s))
                .and_then(|cp| cp["containerPort"].as_u64())
                .and_then(|n| u16::try_from(n).ok()),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_probe_goes_to_the_sidecar_and_exec_stays() {
        let mut c = json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "grpc", "containerPort": 9090}],
            "livenessProbe": {"httpGet": {"path": "/live", "port": "http",
                "httpHeaders": [{"name": "x-probe", "value": "1"}]}, "periodSeconds": 3},
            "readinessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
            "startupProbe": {"grpc": {"port": "grpc", "service": "ready"}, "failureThreshold": 30},
        });
        let mut probers = AppProbers::new();
        rewrite(&mut c, 15021, &mut probers);
        for (field, kind) in KINDS {
            assert_eq!(
                c[field]["httpGet"],
                json!({"path": format!("/app-health/web/{kind}"), "port": 15021, "scheme": "HTTP"}),
                "{field}"
            );
        }
        assert_eq!(c["livenessProbe"]["periodSeconds"], 3);
        assert_eq!(c["startupProbe"]["failureThreshold"], 30);
        assert!(c["readinessProbe"].get("tcpSocket").is_none());
        let live = &probers["/app-health/web/livez"];
        let h = live.http_get.as_ref().unwrap();
        assert_eq!((h.path.as_str(), h.port), ("/live", 8080));
        assert_eq!(h.http_headers[0].name, "x-probe");
        assert_eq!(
            probers["/app-health/web/readyz"]
                .tcp_socket
                .as_ref()
                .unwrap()
                .port,
            8080
        );
        assert_eq!(probers["/app-health/web/readyz"].timeout_seconds, 2);
        assert_eq!(live.timeout_seconds, 1, "the kubelet's default");
        let g = probers["/app-health/web/startupz"].grpc.as_ref().unwrap();
        assert_eq!((g.port, g.service.as_deref()), (9090, Some("ready")));
        // Round trip through the sidecar's environment.
        let back = parse(&serde_json::to_string(&probers).unwrap()).unwrap();
        assert_eq!(back, probers);

        let mut exec = json!({"name": "x", "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"httpGet": {"port": "nope"}}});
        let before = exec.clone();
        let mut none = AppProbers::new();
        rewrite(&mut exec, 15021, &mut none);
        assert_eq!(exec, before, "exec probes and unknown named ports stay");
        assert!(none.is_empty());
    }
}
