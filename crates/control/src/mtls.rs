//! Mutual TLS between sidecars: the PeerAuthentication mode of a workload's port (Istio's
//! precedence), and the Envoy TLS resources that carry it, shaped as Istio sends them (SDS
//! secrets `default` and `ROOTCA`, auto-mTLS transport socket matches on `tlsMode: istio`);
//! and the TLS a DestinationRule originates to servers that speak TLS themselves.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::config::core::v3::{transport_socket, Metadata, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::{listener_filter, ListenerFilter};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    secret,
    subject_alt_name_matcher::SanType,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use hypha_config::security::MtlsMode;
use hypha_config::types::labels_match;
use hypha_config::Config;

use crate::envoy::{self, any, boolv};

const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// A port's effective mode (never `Unset`).
///
/// Istio's precedence: a policy selecting the workload in its namespace, then the
/// namespace's policy without a selector, then the mesh-wide one (root namespace, no
/// selector); `UNSET` inherits from the next; PERMISSIVE when nothing says otherwise. The
/// selecting policy's `portLevelMtls` for the port overrides its own mode. Several policies
/// at one level: the first by name wins (Istio takes the oldest).
pub fn mode(
    cfg: &Config,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u32,
) -> MtlsMode {
    mode_of(cfg, namespace, labels, Some(port))
}

/// The workload's own mode, for ports no service declares and no `portLevelMtls` names (the
/// inbound passthrough chains).
pub fn workload_mode(cfg: &Config, namespace: &str, labels: &BTreeMap<String, String>) -> MtlsMode {
    mode_of(cfg, namespace, labels, None)
}

/// The ports the policy selecting the workload names in `portLevelMtls`.
pub fn port_level_ports(
    cfg: &Config,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<u32> {
    let policies = sorted(cfg);
    let Some(p) = selecting(&policies, namespace, labels) else {
        return Vec::new();
    };
    let mut ports: Vec<u32> = p
        .spec
        .port_level_mtls
        .keys()
        .filter_map(|k| k.parse().ok())
        .collect();
    ports.sort_unstable();
    ports
}

type Policy = hypha_config::Resource<hypha_config::security::PeerAuthentication>;

fn sorted(cfg: &Config) -> Vec<&Policy> {
    let mut policies: Vec<_> = cfg.peer_authentications.iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    policies
}

fn selecting<'a>(
    policies: &[&'a Policy],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Option<&'a Policy> {
    policies.iter().copied().find(|p| {
        p.namespace == namespace
            && p.spec.selector.as_ref().is_some_and(|s| {
                !s.match_labels.is_empty() && labels_match(&s.match_labels, labels)
            })
    })
}

fn mode_of(
    cfg: &Config,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: Option<u32>,
) -> MtlsMode {
    let policies = sorted(cfg);
    let workload = selecting(&policies, namespace, labels);
    let no_selector = |ns: &str| {
        policies.iter().find(|p| {
            p.namespace == ns
                && p.spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.match_labels.is_empty())
        })
    };
    let root = cfg.mesh.root_namespace.as_str();
    let levels = [
        workload.and_then(|p| {
            let port_mode = port
                .and_then(|port| p.spec.port_level_mtls.get(&port.to_string()))
                .map(|m| m.mode);
            port_mode
                .filter(|m| *m != MtlsMode::Unset)
                .or(p.spec.mtls.as_ref().map(|m| m.mode))
        }),
        no_selector(namespace).and_then(|p| p.spec.mtls.as_ref().map(|m| m.mode)),
        (namespace != root)
            .then(|| no_selector(root))
            .flatten()
            .and_then(|p| p.spec.mtls.as_ref().map(|m| m.mode)),
    ];
    levels
        .into_iter()
        .flatten()
        .find(|m| *m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive)
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(envoy::ads()),
    }
}

/// The workload certificate (`default`), the trust bundle (`ROOTCA`), the SPIFFE IDs a server
/// may present (client side; empty on the server), and ALPN.
fn common(identities: &[String], alpn: &[&str]) -> CommonTlsContext {
    let default_validation_context =
        (!identities.is_empty()).then(|| CertificateValidationContext {
            match_typed_subject_alt_names: identities
                .iter()
                .map(|id| SubjectAltNameMatcher {
                    san_type: SanType::Uri as i32,
                    matcher: Some(StringMatcher {
                        match_pattern: Some(MatchPattern::Exact(id.clone())),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds("default")],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context,
                validation_context_sds_secret_config: Some(sds("ROOTCA")),
                ..Default::default()
            },
        )),
        alpn_protocols: alpn.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// The client side: mutual TLS to a server that must be one of `identities`.
pub fn upstream(identities: &[String], alpn: &[&str], sni: &str) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &UpstreamTlsContext {
                common_tls_context: Some(common(identities, alpn)),
                sni: sni.into(),
                ..Default::default()
            },
        ))),
    }
}

/// Where a proxy finds the system's roots when a DestinationRule originating TLS names no
/// `caCertificates` (Debian's, and Istio's proxy image's, bundle).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS origination to a server outside the mesh (a DestinationRule's `SIMPLE` or `MUTUAL`),
/// as Istio sends it: the client certificate and roots as files on the proxy's machine, the
/// server's names (`subjectAltNames`, else the SNI, as Envoy's auto SAN validation does) as
/// DNS and URI matchers, no validation at all for `insecureSkipVerify`. `sni` is the
/// DestinationRule's, else the service's host (Istio's auto SNI takes the request's Host,
/// which is that host unless a route rewrites it).
pub fn origination(
    tls: &hypha_config::networking::ClientTlsSettings,
    host: &str,
    alpn: &[&str],
) -> TransportSocket {
    let file = |f: &str| DataSource {
        specifier: Some(data_source::Specifier::Filename(f.to_owned())),
        ..Default::default()
    };
    let sni = tls.sni.clone().unwrap_or_else(|| {
        if host.contains('*') {
            String::new()
        } else {
            host.to_owned()
        }
    });
    let mutual = tls.mode == Some(hypha_config::networking::TlsMode::Mutual);
    let tls_certificates = match (&tls.client_certificate, &tls.private_key) {
        (Some(chain), Some(key)) if mutual => {
            vec![
                envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::TlsCertificate {
                    certificate_chain: Some(file(chain)),
                    private_key: Some(file(key)),
                    ..Default::default()
                },
            ]
        }
        _ => Vec::new(),
    };
    let validation = (tls.insecure_skip_verify != Some(true)).then(|| {
        let names: Vec<&str> = if tls.subject_alt_names.is_empty() {
            [sni.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect()
        } else {
            tls.subject_alt_names.iter().map(String::as_str).collect()
        };
        let matcher = |san_type: SanType, name: &str| SubjectAltNameMatcher {
            san_type: san_type as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(name.to_owned())),
                ..Default::default()
            }),
            ..Default::default()
        };
        ValidationContextType::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(file(tls.ca_certificates.as_deref().unwrap_or(SYSTEM_ROOTS))),
            match_typed_subject_alt_names: names
                .iter()
                .flat_map(|n| match n.parse::<std::net::IpAddr>() {
                    Ok(_) => vec![matcher(SanType::IpAddress, n)],
                    Err(_) => vec![matcher(SanType::Dns, n), matcher(SanType::Uri, n)],
                })
                .collect(),
            ..Default::default()
        })
    });
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &UpstreamTlsContext {
                common_tls_context: Some(CommonTlsContext {
                    tls_certificates,
                    validation_context_type: validation,
                    alpn_protocols: alpn.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                }),
                sni,
                ..Default::default()
            },
        ))),
    }
}

/// The server side: mutual TLS, a client certificate required.
pub fn downstream() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &DownstreamTlsContext {
                common_tls_context: Some(common(&[], &["h2", "http/1.1"])),
                require_client_certificate: Some(boolv(true)),
                ..Default::default()
            },
        ))),
    }
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &RawBuffer::default(),
        ))),
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// Istio's auto mTLS: TLS to endpoints labelled `tlsMode: istio` (see [`endpoint_metadata`]),
/// plaintext to the rest.
pub fn auto_matches(tls: TransportSocket) -> Vec<TransportSocketMatch> {
    vec![
        TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(Struct {
                fields: [("tlsMode".to_owned(), string("istio"))]
                    .into_iter()
                    .collect(),
            }),
            transport_socket: Some(tls),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(raw_buffer()),
        },
    ]
}

/// The metadata of an endpoint whose sidecar speaks mutual TLS.
pub fn endpoint_metadata() -> Metadata {
    Metadata {
        filter_metadata: [(
            TRANSPORT_SOCKET_MATCH.to_owned(),
            Struct {
                fields: [("tlsMode".to_owned(), string("istio"))]
                    .into_iter()
                    .collect(),
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// Tells TLS from plaintext on inbound connections.
pub fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

/// The name of the trust bundle secret (Istio's).
pub const ROOTCA: &str = "ROOTCA";

/// The root certificate (PEM) of each signer, by signer name: what trust bundles are made of.
pub type SignerRoots = BTreeMap<String, String>;

/// Each namespace's trust bundle (PEM roots its workloads trust: its tenant's own, then the
/// roots the mesh config shares with that tenant), sent to sidecars as the SDS secret
/// `ROOTCA` so that trust changes without a restart.
#[derive(Debug, Default, Clone)]
pub struct TrustBundles {
    by_namespace: BTreeMap<String, Arc<str>>,
    /// For namespaces no tenant lists (the `*` tenant).
    rest: Option<Arc<str>>,
}

impl TrustBundles {
    /// From (tenant namespaces, PEM bundle) pairs; `*` stands for every other namespace.
    pub fn new(tenants: impl IntoIterator<Item = (Vec<String>, String)>) -> TrustBundles {
        let mut out = TrustBundles::default();
        for (namespaces, pem) in tenants {
            let pem: Arc<str> = pem.into();
            for ns in namespaces {
                if ns == "*" {
                    out.rest = Some(pem.clone());
                } else {
                    out.by_namespace.insert(ns, pem.clone());
                }
            }
        }
        out
    }

    /// From the mesh config's tenants (`trustTenants` shares a tenant's root with another)
    /// and the signers' roots; a tenant whose signer has no root yet gets none.
    pub fn from_mesh(mesh: &hypha_config::MeshConfig, roots: &SignerRoots) -> TrustBundles {
        let root_of = |tenant: &str| {
            mesh.tenants
                .iter()
                .find(|t| t.name == tenant)
                .and_then(|t| roots.get(&t.signer))
        };
        TrustBundles::new(mesh.tenants.iter().filter_map(|t| {
            let mut pem: Vec<&String> = Vec::new();
            for r in std::iter::once(&t.name)
                .chain(&t.trust_tenants)
                .filter_map(|n| root_of(n))
            {
                if !pem.contains(&r) {
                    pem.push(r);
                }
            }
            (!pem.is_empty()).then(|| {
                (
                    t.namespaces.clone(),
                    pem.into_iter().map(String::as_str).collect::<String>(),
                )
            })
        }))
    }

    pub fn of(&self, namespace: &str) -> Option<&str> {
        self.by_namespace
            .get(namespace)
            .or(self.rest.as_ref())
            .map(|s| &**s)
    }

    /// The `ROOTCA` secret for a namespace's sidecars.
    pub fn secret(&self, namespace: &str) -> Option<Secret> {
        let pem = self.of(namespace)?;
        Some(Secret {
            name: ROOTCA.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(DataSource {
                        specifier: Some(data_source::Specifier::InlineString(pem.to_owned())),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        })
    }
}
