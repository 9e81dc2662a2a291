//! `ProxyConfig` files (`hypha proxy --proxy-config`): Istio's `privateKeyProvider` shape for a
//! PKCS#11 token or CryptoMB, every problem reported with its line and field path at once.

use hypha_config::proxy::{load_proxy_config, parse_proxy_config, Pkcs11Provider};
use hypha_config::Severity;

/// (code, line, path) of every error.
fn errors(src: &str) -> Vec<(&'static str, usize, String)> {
    let diags = parse_proxy_config("proxy.yaml".into(), src).expect_err("expected errors");
    diags
        .into_sorted()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| {
            assert_eq!(&*d.file, "proxy.yaml");
            (d.code, d.line, d.path)
        })
        .collect()
}

#[test]
fn a_pkcs11_provider_is_read_whole() {
    let cfg = parse_proxy_config(
        "proxy.yaml".into(),
        "\
privateKeyProvider:
  pkcs11:
    module: /usr/lib/softhsm/libsofthsm2.so
    tokenLabel: mesh
    pinFile: /etc/hypha/pin
    keyLabel: web
    threads: 4
",
    )
    .unwrap();
    assert_eq!(
        cfg.private_key_provider.unwrap().pkcs11.unwrap(),
        Pkcs11Provider {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "mesh".into(),
            pin_file: Some("/etc/hypha/pin".into()),
            pin_env: None,
            key_label: Some("web".into()),
            threads: Some(4),
        }
    );
    // An empty file or no provider: keys in memory.
    assert!(parse_proxy_config("p".into(), "")
        .unwrap()
        .private_key_provider
        .is_none());
    assert!(parse_proxy_config("p".into(), "privateKeyProvider: {}\n")
        .unwrap()
        .private_key_provider
        .unwrap()
        .pkcs11
        .is_none());
}

#[test]
fn problems_are_listed_with_lines_and_paths() {
    // Both PIN sources, an empty token label and no threads: all three at once.
    assert_eq!(
        errors(
            "\
privateKeyProvider:
  pkcs11:
    module: /usr/lib/softhsm/libsofthsm2.so
    tokenLabel: ''
    pinFile: /etc/pin
    pinEnv: PIN
    threads: 0
"
        ),
        vec![
            (
                "private-key-provider",
                2,
                "privateKeyProvider.pkcs11".to_string()
            ),
            (
                "private-key-provider",
                4,
                "privateKeyProvider.pkcs11.tokenLabel".to_string()
            ),
            (
                "private-key-provider",
                7,
                "privateKeyProvider.pkcs11.threads".to_string()
            ),
        ]
    );
    // No PIN at all.
    assert_eq!(
        errors("privateKeyProvider:\n  pkcs11: {module: m, tokenLabel: t}\n"),
        vec![(
            "private-key-provider",
            2,
            "privateKeyProvider.pkcs11".to_string()
        )]
    );
    // Istio fields Hypha does not take from this file are refused by name, never ignored.
    assert_eq!(
        errors("tracing: {sampling: 1}\n"),
        vec![("unknown-field", 1, "tracing".to_string())]
    );
    // The lifecycle fields the injector and the sidecar read.
    let life = parse_proxy_config(
        "p".into(),
        "concurrency: 2\nterminationDrainDuration: 7s\nholdApplicationUntilProxyStarts: true\n",
    )
    .unwrap();
    assert_eq!(life.concurrency, Some(2));
    assert_eq!(life.drain_duration(), std::time::Duration::from_secs(7));
    assert_eq!(life.hold_application_until_proxy_starts, Some(true));
    assert_eq!(
        errors("concurrency: -1\n"),
        vec![("invalid-value", 1, "concurrency".to_string())]
    );
    assert_eq!(
        errors("privateKeyProvider:\n  qat:\n    pollDelay: 10ms\n"),
        vec![("unknown-field", 2, "privateKeyProvider.qat".to_string())]
    );
    // A required field missing, and bad YAML.
    assert_eq!(
        errors("privateKeyProvider:\n  pkcs11: {module: m, pinEnv: P}\n"),
        vec![("missing-field", 2, "privateKeyProvider.pkcs11".to_string())]
    );
    assert_eq!(
        errors("privateKeyProvider: [\n"),
        vec![("yaml-syntax", 2, String::new())]
    );
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let diags = load_proxy_config(std::path::Path::new("/nonexistent/proxy.yaml")).unwrap_err();
    let text = diags.iter().next().unwrap().to_string();
    assert!(text.starts_with("/nonexistent/proxy.yaml"), "{text}");
}

#[test]
fn a_cryptomb_provider_is_read_with_its_defaults_and_limits() {
    use hypha_config::proxy::CryptoMbProvider;
    let cfg = parse_proxy_config(
        "proxy.yaml".into(),
        "privateKeyProvider:\n  cryptomb:\n    pollDelay: 20ms\n    fallback: true\n",
    )
    .unwrap();
    let c = cfg.private_key_provider.unwrap().cryptomb.unwrap();
    assert_eq!(
        c.poll_delay.map(|d| d.as_std()),
        Some(std::time::Duration::from_millis(20))
    );
    assert_eq!(c.fallback, Some(true));
    let empty = parse_proxy_config("p".into(), "privateKeyProvider:\n  cryptomb: {}\n").unwrap();
    assert_eq!(
        empty.private_key_provider.unwrap().cryptomb,
        Some(CryptoMbProvider::default())
    );

    assert_eq!(
        errors(
            "\
privateKeyProvider:
  cryptomb:
    pollDelay: 0s
  pkcs11:
    module: /m.so
    tokenLabel: t
    pinEnv: PIN
"
        ),
        vec![
            ("private-key-provider", 1, "privateKeyProvider".to_string()),
            (
                "private-key-provider",
                3,
                "privateKeyProvider.cryptomb.pollDelay".to_string()
            ),
        ]
    );
    let long = errors("privateKeyProvider:\n  cryptomb:\n    pollDelay: 2s\n");
    assert_eq!(long.len(), 1);
    assert_eq!(long[0].1, 3);
    let unknown = errors("privateKeyProvider:\n  cryptomb:\n    pollDelays: 2ms\n");
    assert_eq!(unknown.len(), 1, "{unknown:?}");
}
