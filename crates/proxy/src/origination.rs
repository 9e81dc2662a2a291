//! TLS origination to servers outside the mesh (a DestinationRule's `SIMPLE` and `MUTUAL`
//! modes): the connector built from the files the cluster names, the SNI sent, and the check
//! of the server's certificate names.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use boring::pkey::PKey;
use boring::ssl::{SslConnector, SslMethod, SslRef, SslVerifyMode};
use boring::x509::store::X509StoreBuilder;
use boring::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_boring::SslStream;

/// A name the server's certificate must carry (Envoy's `match_typed_subject_alt_names`, exact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    Dns(String),
    Uri(String),
    Ip(IpAddr),
}

/// What a cluster's UpstreamTlsContext asks for, as files on this proxy's machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spec {
    /// PEM roots the server's chain must end at (`trusted_ca`); `None`: the server is not
    /// verified (no validation context: Istio's `insecureSkipVerify`).
    pub roots: Option<String>,
    /// The client certificate chain and its key, for `MUTUAL` (`tls_certificates`).
    pub client: Option<(String, String)>,
    /// The server names accepted; empty: any the roots vouch for.
    pub names: Vec<Name>,
    /// The SNI sent; none when empty.
    pub sni: String,
    /// ALPN offered, in wire format.
    pub alpn: Vec<u8>,
}

/// A ready connector for one cluster's TLS origination.
pub struct Origination {
    pub spec: Spec,
    connector: SslConnector,
    /// Tells this context's pooled connections apart from any other's.
    pub id: u64,
}

impl std::fmt::Debug for Origination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origination")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Origination {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

/// Pool keys 0 and 1 are plaintext and mutual TLS; each origination context takes its own.
static NEXT_ID: AtomicU64 = AtomicU64::new(2);

impl Origination {
    /// Reads the files `spec` names and builds the connector; the error names the file and
    /// what is wrong with it.
    pub fn new(spec: Spec) -> Result<Arc<Origination>, String> {
        let mut b = SslConnector::builder(SslMethod::tls()).map_err(failed("TLS context"))?;
        // The store holds only the roots asked for: never the library's default paths.
        let mut store = X509StoreBuilder::new().map_err(failed("certificate store"))?;
        match &spec.roots {
            Some(path) => {
                let roots = pem_certs(path)?;
                for root in roots {
                    store.add_cert(root).map_err(failed(path))?;
                }
                b.set_verify(SslVerifyMode::PEER);
            }
            None => b.set_verify(SslVerifyMode::NONE),
        }
        b.set_cert_store(store.build());
        if let Some((chain, key)) = &spec.client {
            let mut certs = pem_certs(chain)?.into_iter();
            let leaf = certs
                .next()
                .ok_or_else(|| format!("{chain}: no certificate"))?;
            b.set_certificate(&leaf).map_err(failed(chain))?;
            for extra in certs {
                b.add_extra_chain_cert(extra).map_err(failed(chain))?;
            }
            let pem = read(key)?;
            let pkey = PKey::private_key_from_pem(&pem)
                .map_err(|_| format!("{key}: not a PEM private key"))?;
            b.set_private_key(&pkey).map_err(failed(key))?;
            b.check_private_key()
                .map_err(|_| format!("{key}: does not match the certificate in {chain}"))?;
        }
        if !spec.alpn.is_empty() {
            b.set_alpn_protos(&spec.alpn).map_err(failed("ALPN"))?;
        }
        Ok(Arc::new(Origination {
            spec,
            connector: b.build(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }))
    }

    /// The client side of TLS on `stream`: SNI, chain verification, then the names.
    pub async fn connect<S>(&self, stream: S) -> Result<SslStream<S>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut cfg = self.connector.configure().map_err(|e| e.to_string())?;
        // The names are checked below, against the list (Envoy's matchers), not the SNI.
        cfg.set_verify_hostname(false);
        cfg.set_use_server_name_indication(!self.spec.sni.is_empty());
        let stream = tokio_boring::connect(cfg, &self.spec.sni, stream)
            .await
            .map_err(|e| match e.ssl().map(SslRef::verify_result) {
                Some(Err(v)) => format!("{e}: certificate: {}", v.error_string()),
                _ => e.to_string(),
            })?;
        if self.spec.roots.is_some() && !self.spec.names.is_empty() {
            check_names(stream.ssl(), &self.spec.names)?;
        }
        Ok(stream)
    }
}

/// A BoringSSL error about `what`.
fn failed(what: &str) -> impl Fn(boring::error::ErrorStack) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("{path}: {e}"))
}

fn pem_certs(path: &str) -> Result<Vec<X509>, String> {
    let certs =
        X509::stack_from_pem(&read(path)?).map_err(|_| format!("{path}: not PEM certificates"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no certificate"));
    }
    Ok(certs)
}

/// The server's certificate carries one of `names` (a `*.` DNS entry stands for one label).
fn check_names(ssl: &SslRef, names: &[Name]) -> Result<(), String> {
    let cert = ssl
        .peer_certificate()
        .ok_or("the server sent no certificate")?;
    let sans = cert.subject_alt_names();
    let found = sans.iter().flatten().any(|g| {
        names.iter().any(|n| match n {
            Name::Dns(want) => g.dnsname().is_some_and(|have| dns_matches(have, want)),
            Name::Uri(want) => g.uri() == Some(want.as_str()),
            Name::Ip(want) => g.ipaddress().is_some_and(|have| match want {
                IpAddr::V4(a) => have == a.octets(),
                IpAddr::V6(a) => have == a.octets(),
            }),
        })
    });
    if found {
        Ok(())
    } else {
        Err(format!(
            "the server's certificate names none of {names:?} in its subject alternative names"
        ))
    }
}

/// A certificate's DNS name `have` covers `want`: equal ignoring case, or `*.rest` where
/// `want` is one more label before `rest`.
fn dns_matches(have: &str, want: &str) -> bool {
    if have.eq_ignore_ascii_case(want) {
        return true;
    }
    match (have.strip_prefix("*."), want.split_once('.')) {
        (Some(rest), Some((label, want_rest))) => {
            !label.is_empty() && rest.contains('.') && rest.eq_ignore_ascii_case(want_rest)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stand_for_one_label() {
        assert!(dns_matches("api.example.com", "API.example.com"));
        assert!(dns_matches("*.example.com", "api.example.com"));
        assert!(!dns_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_matches("*.example.com", "example.com"));
        assert!(!dns_matches("*.com", "example.com"));
        assert!(!dns_matches("api.example.com", "*.example.com"));
    }

    #[test]
    fn files_that_are_missing_or_wrong_are_named() {
        let missing = Origination::new(Spec {
            roots: Some("/nonexistent/ca.pem".into()),
            ..Spec::default()
        })
        .unwrap_err();
        assert!(missing.starts_with("/nonexistent/ca.pem: "), "{missing}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = junk.to_str().unwrap().to_owned();
        let err = Origination::new(Spec {
            roots: Some(junk.clone()),
            ..Spec::default()
        })
        .unwrap_err();
        assert_eq!(err, format!("{junk}: no certificate"));
    }
}
