//! TLS: Envoy's transport sockets as Istio sends them for mutual TLS between sidecars (SDS
//! references, common, upstream and downstream TLS contexts) and for origination to servers
//! outside the mesh (files), and the trust bundle Secret.

use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3::{
    data_source, transport_socket, DataSource, TransportSocket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, secret, subject_alt_name_matcher::SanType,
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use prost::{Message, Name};

use super::{
    ads_source, decode, only, path, refuse, typed, unsupported, unsupported_value, variant,
    Refused, Result,
};
use crate::model::{MeshTls, UpstreamTls};
use crate::origination::{self, Origination, Spec};

/// Istio's SDS names: the workload certificate, and the trust bundle.
const SDS_CERT: &str = "default";
const SDS_ROOTS: &str = "ROOTCA";

/// What a transport socket is: TLS with this context, or plaintext (`raw_buffer`).
enum Socket<T> {
    Tls(T),
    Plain,
}

fn socket<T: Message + Default + Name>(ts: &TransportSocket, at: &str) -> Result<Socket<T>> {
    // The name is a label: the typed config says what the socket is.
    only(ts, at, &["name", "config_type"])?;
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return Err(format!("{at}: a typed config is required"));
    };
    if any.type_url == RawBuffer::type_url() {
        let raw: RawBuffer = decode(&any.value, "RawBuffer")?;
        only(&raw, at, &[])?;
        return Ok(Socket::Plain);
    }
    typed::<T>(any, at).map(Socket::Tls)
}

/// A cluster's TLS: `transport_socket` (every endpoint), or Istio's auto-mTLS pair of
/// `transport_socket_matches` (TLS where the endpoint's metadata says `tlsMode: istio`,
/// plaintext elsewhere). Other matches are refused: Hypha matches on nothing else.
pub(super) fn upstream_tls(
    ts: Option<&TransportSocket>,
    matches: &[cluster::TransportSocketMatch],
) -> Result<Option<UpstreamTls>> {
    if let Some(ts) = ts {
        if !matches.is_empty() {
            return Err("both transport_socket and transport_socket_matches are set".into());
        }
        return match socket::<UpstreamTlsContext>(ts, "transport_socket")? {
            Socket::Plain => Ok(None),
            Socket::Tls(ctx) if !mesh_context(&ctx) => {
                origination_context(&ctx, "transport_socket").map(Some)
            }
            Socket::Tls(ctx) => upstream_context(&ctx, "transport_socket").map(|mut t| {
                t.only_istio_endpoints = false;
                Some(UpstreamTls::Mesh(t))
            }),
        };
    }
    let mut tls = None;
    let mut plain_fallback = false;
    for (i, m) in matches.iter().enumerate() {
        let at = format!("transport_socket_matches[{i}]");
        // The name is a stats label.
        only(m, &at, &["name", "match", "transport_socket"])?;
        let fields = m.r#match.as_ref().map(|s| &s.fields);
        let istio = fields.is_some_and(|f| {
            f.len() == 1
                && f.get("tlsMode").and_then(|v| v.kind.as_ref())
                    == Some(
                        &envoy_types::pb::google::protobuf::value::Kind::StringValue(
                            "istio".into(),
                        ),
                    )
        });
        let empty = fields.is_none_or(|f| f.is_empty());
        let Some(ts) = &m.transport_socket else {
            return Err(format!("{at}: no transport_socket"));
        };
        match (
            socket::<UpstreamTlsContext>(ts, &path(&at, "transport_socket"))?,
            istio,
            empty,
        ) {
            (Socket::Tls(ctx), true, _) if tls.is_none() && !plain_fallback => {
                tls = Some(upstream_context(&ctx, &path(&at, "transport_socket"))?);
            }
            (Socket::Plain, _, true) => plain_fallback = true,
            _ => {
                return Err(format!(
                    "{at}: only Istio's auto-mTLS matches are supported (TLS for \
                     `tlsMode: istio`, then plaintext for the rest)"
                ))
            }
        }
    }
    Ok(tls.map(|mut t| {
        t.only_istio_endpoints = true;
        UpstreamTls::Mesh(t)
    }))
}

/// An SDS reference, which must be `name` over ADS.
fn sds(cfg: &SdsSecretConfig, name: &str, at: &str) -> Result<()> {
    only(cfg, at, &["name", "sds_config"])?;
    if cfg.name != name {
        return Err(unsupported_value(
            &path(at, "name"),
            format_args!(
                "{:?} (Hypha serves the workload certificate as {SDS_CERT:?} and the trust \
                 bundle as {SDS_ROOTS:?})",
                cfg.name
            ),
        ));
    }
    if let Some(cs) = &cfg.sds_config {
        ads_source(cs, &path(at, "sds_config"))?;
    }
    Ok(())
}

/// The common part of both sides: the workload certificate, the trust bundle, peer SPIFFE IDs
/// and ALPN. Returns (identities, ALPN in wire format).
fn common_tls(c: Option<&CommonTlsContext>, at: &str) -> Result<(Vec<String>, Vec<u8>)> {
    let at = path(at, "common_tls_context");
    let Some(c) = c else {
        return Err(format!(
            "{at}: the workload certificate ({SDS_CERT:?}) is required"
        ));
    };
    // Informational: TLS versions and ciphers; Hypha's contexts allow TLS 1.2 and 1.3 with
    // BoringSSL's defaults.
    only(
        c,
        &at,
        &[
            "tls_certificate_sds_secret_configs",
            "validation_context_type",
            "alpn_protocols",
            "tls_params",
        ],
    )?;
    match c.tls_certificate_sds_secret_configs.as_slice() {
        [one] => sds(
            one,
            SDS_CERT,
            &path(&at, "tls_certificate_sds_secret_configs"),
        )?,
        _ => {
            return Err(format!(
                "{at}: exactly one tls_certificate_sds_secret_configs ({SDS_CERT:?}) is required"
            ))
        }
    }
    let mut identities = Vec::new();
    match &c.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(cfg)) => {
            sds(
                cfg,
                SDS_ROOTS,
                &path(&at, "validation_context_sds_secret_config"),
            )?;
        }
        Some(ValidationContextType::CombinedValidationContext(combined)) => {
            let at = path(&at, "combined_validation_context");
            only(
                combined,
                &at,
                &[
                    "default_validation_context",
                    "validation_context_sds_secret_config",
                ],
            )?;
            match &combined.validation_context_sds_secret_config {
                Some(cfg) => sds(
                    cfg,
                    SDS_ROOTS,
                    &path(&at, "validation_context_sds_secret_config"),
                )?,
                None => {
                    return Err(format!(
                        "{at}: the trust bundle ({SDS_ROOTS:?}) is required"
                    ))
                }
            }
            if let Some(v) = &combined.default_validation_context {
                let at = path(&at, "default_validation_context");
                only(v, &at, &["match_typed_subject_alt_names"])?;
                for m in &v.match_typed_subject_alt_names {
                    let at = path(&at, "match_typed_subject_alt_names");
                    only(m, &at, &["san_type", "matcher"])?;
                    if m.san_type != SanType::Uri as i32 {
                        return Err(unsupported_value(&path(&at, "san_type"), m.san_type));
                    }
                    match m.matcher.as_ref().and_then(|x| x.match_pattern.as_ref()) {
                        Some(MatchPattern::Exact(id))
                            if !m.matcher.as_ref().is_some_and(|x| x.ignore_case) =>
                        {
                            identities.push(id.clone());
                        }
                        _ => {
                            return Err(format!(
                                "{at}: only exact, case-sensitive SPIFFE IDs are supported"
                            ))
                        }
                    }
                }
            }
        }
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err(unsupported(&path(&at, "validation_context"))
                + ": inline roots; Hypha verifies peers against the mesh trust bundle (ROOTCA)")
        }
        Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
        None => {
            return Err(format!(
                "{at}: the trust bundle ({SDS_ROOTS:?}) is required"
            ))
        }
    }
    let alpn = alpn(c, &at)?;
    Ok((identities, alpn))
}

/// The ALPN a context offers, in wire format.
fn alpn(c: &CommonTlsContext, at: &str) -> Result<Vec<u8>> {
    let mut alpn = Vec::new();
    for p in &c.alpn_protocols {
        match p.as_str() {
            "h2" | "http/1.1" => {
                alpn.push(u8::try_from(p.len()).unwrap_or(0));
                alpn.extend_from_slice(p.as_bytes());
            }
            // Istio's markers for its metadata exchange, which Hypha does not do: the peer's
            // identity comes from its certificate.
            "istio" | "istio-peer-exchange" | "istio-http/1.0" | "istio-http/1.1" | "istio-h2" => {}
            other => {
                return Err(unsupported_value(
                    &path(at, "alpn_protocols"),
                    format_args!("{other:?}"),
                ))
            }
        }
    }
    Ok(alpn)
}

/// Whether an upstream context is mutual TLS with the workload certificate (SDS), rather than
/// origination with files.
fn mesh_context(ctx: &UpstreamTlsContext) -> bool {
    ctx.common_tls_context
        .as_ref()
        .is_some_and(|c| !c.tls_certificate_sds_secret_configs.is_empty())
}

/// TLS origination, as Istio sends a DestinationRule's `SIMPLE` or `MUTUAL`: the roots and
/// client certificate as files on this machine, the server names to accept, the SNI. No
/// validation context means the server is not verified (`insecureSkipVerify`).
fn origination_context(ctx: &UpstreamTlsContext, at: &str) -> Result<UpstreamTls> {
    only(ctx, at, &["common_tls_context", "sni"])?;
    let mut spec = Spec {
        sni: ctx.sni.clone(),
        ..Spec::default()
    };
    if let Some(c) = &ctx.common_tls_context {
        let at = path(at, "common_tls_context");
        // Informational: TLS versions and ciphers (BoringSSL's defaults, TLS 1.2 and 1.3).
        only(
            c,
            &at,
            &[
                "tls_certificates",
                "validation_context_type",
                "alpn_protocols",
                "tls_params",
            ],
        )?;
        match c.tls_certificates.as_slice() {
            [] => {}
            [one] => {
                let at = path(&at, "tls_certificates");
                only(one, &at, &["certificate_chain", "private_key"])?;
                spec.client = Some((
                    file(
                        one.certificate_chain.as_ref(),
                        &path(&at, "certificate_chain"),
                    )?,
                    file(one.private_key.as_ref(), &path(&at, "private_key"))?,
                ));
            }
            _ => {
                return Err(format!(
                    "{at}: at most one tls_certificates entry is supported"
                ))
            }
        }
        match &c.validation_context_type {
            None => {}
            Some(ValidationContextType::ValidationContext(v)) => {
                let at = path(&at, "validation_context");
                only(v, &at, &["trusted_ca", "match_typed_subject_alt_names"])?;
                spec.roots = Some(file(v.trusted_ca.as_ref(), &path(&at, "trusted_ca"))?);
                for m in &v.match_typed_subject_alt_names {
                    let at = path(&at, "match_typed_subject_alt_names");
                    only(m, &at, &["san_type", "matcher"])?;
                    let Some(MatchPattern::Exact(name)) =
                        m.matcher.as_ref().and_then(|x| x.match_pattern.as_ref())
                    else {
                        return Err(format!("{at}: only exact names are supported"));
                    };
                    spec.names.push(match SanType::try_from(m.san_type) {
                        Ok(SanType::Dns) => origination::Name::Dns(name.clone()),
                        Ok(SanType::Uri) => origination::Name::Uri(name.clone()),
                        Ok(SanType::IpAddress) => origination::Name::Ip(
                            name.parse()
                                .map_err(|_| format!("{at}: {name:?} is not an IP address"))?,
                        ),
                        _ => return Err(unsupported_value(&path(&at, "san_type"), m.san_type)),
                    });
                }
            }
            Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
        }
        spec.alpn = alpn(c, &at)?;
    }
    Origination::new(spec)
        .map(UpstreamTls::Origination)
        .map_err(|e| format!("{at}: {e}"))
}

/// A file a context names (`filename`): certificates and keys are read from this machine,
/// never taken inline from the control plane.
fn file(d: Option<&DataSource>, at: &str) -> Result<String> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) if !f.is_empty() => Ok(f.clone()),
        Some(_) => Err(format!(
            "{at}: only a filename is supported (the file on the proxy's machine)"
        )),
        None => Err(format!("{at}: a filename is required")),
    }
}

fn upstream_context(ctx: &UpstreamTlsContext, at: &str) -> Result<MeshTls> {
    // Informational: SNI, which Istio sets to the cluster name for its own routing of
    // passthrough traffic; Hypha checks the server by its SPIFFE ID, not a name.
    only(ctx, at, &["common_tls_context", "sni"])?;
    let (identities, alpn) = common_tls(ctx.common_tls_context.as_ref(), at)?;
    Ok(MeshTls {
        identities: identities.into(),
        alpn: alpn.into(),
        only_istio_endpoints: false,
    })
}

/// The trust bundle secret (`ROOTCA`): the PEM roots in its `trusted_ca`. Hypha keeps its own
/// key and certificate, so no other secret is taken from the control plane.
pub fn trust_bundle(
    name: &str,
    bytes: &[u8],
) -> std::result::Result<Vec<boring::x509::X509>, Refused> {
    trust_bundle_inner(name, bytes).map_err(refuse("secret", name))
}

fn trust_bundle_inner(name: &str, bytes: &[u8]) -> Result<Vec<boring::x509::X509>> {
    if name != SDS_ROOTS {
        return Err(format!(
            "only {SDS_ROOTS:?} is taken from the control plane; the workload certificate \
             ({SDS_CERT:?}) comes from the proxy's own key and the CA"
        ));
    }
    let s: Secret = decode(bytes, "Secret")?;
    only(&s, "", &["name", "type"])?;
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        return Err("a validation_context with trusted_ca is expected".into());
    };
    only(v, "validation_context", &["trusted_ca"])?;
    let pem: &[u8] = match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => {
            s.as_bytes()
        }
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        _ => return Err("validation_context.trusted_ca must be inline PEM".into()),
    };
    let roots = boring::x509::X509::stack_from_pem(pem)
        .map_err(|e| format!("validation_context.trusted_ca: {e}"))?;
    if roots.is_empty() {
        return Err("validation_context.trusted_ca holds no certificate".into());
    }
    Ok(roots)
}

/// An inbound chain's TLS: a DownstreamTlsContext that requires client certificates.
pub(super) fn downstream_tls(ts: &TransportSocket, at: &str) -> Result<bool> {
    match socket::<DownstreamTlsContext>(ts, at)? {
        Socket::Plain => Ok(false),
        Socket::Tls(ctx) => {
            only(
                &ctx,
                at,
                &["common_tls_context", "require_client_certificate"],
            )?;
            if !ctx.require_client_certificate.is_some_and(|b| b.value) {
                return Err(format!(
                    "{at}: require_client_certificate must be true (mutual TLS only)"
                ));
            }
            let (identities, _alpn) = common_tls(ctx.common_tls_context.as_ref(), at)?;
            if !identities.is_empty() {
                return Err(unsupported(&path(at, "match_typed_subject_alt_names"))
                    + " on the server side: authorization policy decides who may call");
            }
            Ok(true)
        }
    }
}
