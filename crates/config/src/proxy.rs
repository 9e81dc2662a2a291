//! Per-proxy settings in the shape of Istio's `ProxyConfig` (what the `proxy.istio.io/config`
//! annotation or `meshConfig.defaultConfig` carries): today its `privateKeyProvider`, where
//! the sidecar's workload key lives. `hypha proxy --proxy-config FILE` reads one from a file.
//!
//! ```yaml
//! privateKeyProvider:
//!   pkcs11:
//!     module: /usr/lib/softhsm/libsofthsm2.so
//!     tokenLabel: mesh
//!     pinFile: /etc/hypha/token-pin     # or pinEnv: HYPHA_TOKEN_PIN
//!     keyLabel: web                     # optional: the label of the generated key
//!     threads: 2                        # optional: token threads (one session each)
//! ```
//!
//! or, for RSA keys computed eight at a time with AVX-512 IFMA (Istio's CryptoMB):
//!
//! ```yaml
//! privateKeyProvider:
//!   cryptomb:
//!     pollDelay: 10ms      # the longest an operation waits for its batch to fill
//!     fallback: true       # on a CPU without AVX-512 IFMA, BoringSSL signs (else: refuse)
//! ```
//!
//! and the sidecar's lifecycle, as Istio's injector and sidecar read them:
//!
//! ```yaml
//! concurrency: 2                          # worker threads (0: one per CPU)
//! terminationDrainDuration: 5s            # how long a stopping sidecar drains
//! holdApplicationUntilProxyStarts: true   # classic sidecars: the app waits for the proxy
//! ```
//!
//! Istio's other `ProxyConfig` fields are refused by name rather than ignored: Hypha takes
//! them from its own flags or not at all.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::diag::{Diagnostics, Source};
use crate::types::Duration;
use crate::yaml;

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_provider: Option<PrivateKeyProvider>,
    /// Worker threads; 0 for one per CPU (Istio's default is 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// How long a stopping sidecar lets requests in flight finish (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_drain_duration: Option<Duration>,
    /// With the classic (non-native) sidecar: start the app only once the proxy is ready.
    /// Native sidecars always start, and are ready, before the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_application_until_proxy_starts: Option<bool>,
}

impl ProxyConfig {
    /// This config (a pod's `proxy.istio.io/config`) over `defaults` (the mesh's
    /// `defaultConfig`): each field set here wins, as Istio merges them.
    pub fn over(self, defaults: &ProxyConfig) -> ProxyConfig {
        ProxyConfig {
            private_key_provider: self
                .private_key_provider
                .or_else(|| defaults.private_key_provider.clone()),
            concurrency: self.concurrency.or(defaults.concurrency),
            termination_drain_duration: self
                .termination_drain_duration
                .or(defaults.termination_drain_duration),
            hold_application_until_proxy_starts: self
                .hold_application_until_proxy_starts
                .or(defaults.hold_application_until_proxy_starts),
        }
    }

    /// The drain time a stopping sidecar gives requests in flight.
    pub fn drain_duration(&self) -> std::time::Duration {
        self.termination_drain_duration
            .map_or(std::time::Duration::from_secs(5), |d| d.as_std())
    }
}

/// Where the workload's private key lives and who does its operations. Without one, the key
/// is generated in the proxy's memory (software).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrivateKeyProvider {
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Provider>,
    #[serde(default)]
    pub cryptomb: Option<CryptoMbProvider>,
}

/// Istio's `cryptomb`: the key in memory, its RSA operations batched eight at a time for the
/// AVX-512 IFMA multi-buffer engine. ECDSA keys and RSA keys the engine does not take are
/// signed by BoringSSL.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CryptoMbProvider {
    /// The longest an operation waits for a full batch (default 10ms; at most 1s).
    #[serde(default)]
    pub poll_delay: Option<Duration>,
    /// On a CPU without AVX-512 IFMA: use BoringSSL (true) or refuse to start (false, the
    /// default, as in Istio).
    #[serde(default)]
    pub fallback: Option<bool>,
}

/// A PKCS#11 token: the key is generated in it (sensitive, never extractable) and every
/// signature is the token's.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pkcs11Provider {
    /// The PKCS#11 library, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: String,
    pub token_label: String,
    #[serde(default)]
    pub pin_file: Option<String>,
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Label of the key generated in the token; defaults to the workload's SPIFFE ID.
    #[serde(default)]
    pub key_label: Option<String>,
    /// Threads doing the token's work, one session each (default 2).
    #[serde(default)]
    pub threads: Option<usize>,
}

/// Reads and checks a `ProxyConfig` file: every problem, with its line, at once.
pub fn load_proxy_config(path: &Path) -> Result<ProxyConfig, Diagnostics> {
    let file: Arc<str> = path.display().to_string().into();
    let mut diags = Diagnostics::default();
    let src = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            diags.push(crate::Diagnostic::io(file, e.to_string()));
            return Err(diags);
        }
    };
    parse_proxy_config(file, &src)
}

/// [`load_proxy_config`] on text already read; `file` names it in errors.
pub fn parse_proxy_config(file: Arc<str>, src: &str) -> Result<ProxyConfig, Diagnostics> {
    let mut diags = Diagnostics::default();
    let docs = match yaml::parse_documents(src) {
        Ok(d) => d,
        Err(e) => {
            diags.push(crate::Diagnostic::yaml_syntax(file, e));
            return Err(diags);
        }
    };
    let mut docs = docs.into_iter();
    let Some(doc) = docs.next() else {
        return Ok(ProxyConfig::default());
    };
    let source = Source {
        file,
        doc: Arc::new(doc),
        resource: "ProxyConfig".into(),
        derived: false,
    };
    if let Some(extra) = docs.next() {
        let second = Source {
            doc: Arc::new(extra),
            ..source.clone()
        };
        diags.error(
            "duplicate",
            &second,
            "",
            "a proxy config file holds one document",
        );
    }
    let value = match &source.doc.value {
        serde_json::Value::Null => serde_json::Value::Object(serde_json::Map::new()),
        v => v.clone(),
    };
    let cfg = crate::load::deserialize::<ProxyConfig>(&mut diags, &source, value);
    if let Some(c) = &cfg {
        check(c, &source, "", &mut diags);
    }
    match cfg {
        Some(c) if !diags.has_errors() => Ok(c),
        _ => Err(diags),
    }
}

/// The checks beyond the shape, for a config at `prefix` of `source` (`""` for a file of its
/// own, `spec.defaultConfig.` in a MeshConfig).
pub(crate) fn check(cfg: &ProxyConfig, source: &Source, prefix: &str, diags: &mut Diagnostics) {
    let cfg = Some(cfg);
    if let Some(p) = cfg
        .and_then(|c| c.private_key_provider.as_ref())
        .and_then(|k| k.pkcs11.as_ref())
    {
        let path = format!("{prefix}privateKeyProvider.pkcs11");
        let path = path.as_str();
        if p.pin_file.is_some() == p.pin_env.is_some() {
            diags.error(
                "private-key-provider",
                source,
                path,
                "exactly one of `pinFile` and `pinEnv` is required",
            );
        }
        for (field, value) in [("module", &p.module), ("tokenLabel", &p.token_label)] {
            if value.is_empty() {
                diags.error(
                    "private-key-provider",
                    source,
                    format!("{path}.{field}"),
                    format!("`{field}` must not be empty"),
                );
            }
        }
        if p.threads == Some(0) {
            diags.error(
                "private-key-provider",
                source,
                format!("{path}.threads"),
                "`threads` must be at least 1",
            );
        }
    }
    if let Some(k) = cfg.and_then(|c| c.private_key_provider.as_ref()) {
        if k.pkcs11.is_some() && k.cryptomb.is_some() {
            diags.error(
                "private-key-provider",
                source,
                format!("{prefix}privateKeyProvider"),
                "give one provider: `pkcs11` or `cryptomb`, not both",
            );
        }
        if let Some(delay) = k.cryptomb.as_ref().and_then(|c| c.poll_delay) {
            let d = delay.as_std();
            if d.is_zero() || d > std::time::Duration::from_secs(1) {
                diags.error(
                    "private-key-provider",
                    source,
                    format!("{prefix}privateKeyProvider.cryptomb.pollDelay"),
                    format!("`pollDelay` must be above 0 and at most 1s, not {delay}"),
                );
            }
        }
    }
}
