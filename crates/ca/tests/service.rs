//! Istio's CA API end to end in-process: the tonic server on an ephemeral port (plaintext for
//! now; TLS comes with the next step), a tonic client, join-token authentication, and the
//! status codes a workload sees.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use boring::x509::X509;
use common::{csr, id, p256, tenant, verifies, San, TD};
use hypha_ca::service::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use hypha_ca::service::pb::IstioCertificateRequest;
use hypha_ca::service::TokenError;
use hypha_ca::{Ca, CaService, Caller, IssueRate, JoinTokens};
use tonic::transport::Channel;
use tonic::{Code, Request};

const REVIEWS_TOKEN: &str = "reviews-secret-0123456789abcdef";
const RATINGS_TOKEN: &str = "ratings-secret-0123456789abcdef";

/// A CA with one tenant (max validity `max`), served with `reviews`'s join token.
struct Served {
    ca: Arc<Ca>,
    client: IstioCertificateServiceClient<Channel>,
    _dir: tempfile::TempDir,
}

async fn serve(max: Duration) -> Served {
    serve_at(max, IssueRate::default()).await
}

/// [`serve`], issuing each identity at most `rate`.
async fn serve_at(max: Duration, rate: IssueRate) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tenant("default", "*", &[], dir.path());
    t.max_validity = max;
    let ca = Arc::new(Ca::new(TD, vec![t]).unwrap());
    let tokens = JoinTokens::new([
        (REVIEWS_TOKEN, Caller::new("bookinfo", "reviews")),
        (RATINGS_TOKEN, Caller::new("bookinfo", "ratings")),
    ])
    .unwrap();
    let svc = CaService::new(ca.clone(), Arc::new(tokens))
        .with_rate(rate)
        .into_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The listener is bound already, so connecting cannot race the server's start.
    let client = IstioCertificateServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Served {
        ca,
        client,
        _dir: dir,
    }
}

fn request(
    token: Option<&str>,
    csr_pem: Vec<u8>,
    validity_s: i64,
) -> Request<IstioCertificateRequest> {
    let mut r = Request::new(IstioCertificateRequest {
        csr: String::from_utf8(csr_pem).unwrap(),
        validity_duration: validity_s,
        metadata: None,
    });
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn own_csr() -> Vec<u8> {
    csr(&p256(), &[San::Uri(&id("bookinfo", "reviews"))])
}

#[tokio::test]
async fn a_join_token_gets_its_own_identity_leaf_first() {
    let mut s = serve(Duration::from_secs(24 * 3600)).await;
    let chain = s
        .client
        .create_certificate(request(Some(REVIEWS_TOKEN), own_csr(), 3600))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2);
    let bundle = s.ca.trust_bundle("default").unwrap();
    assert_eq!(chain[1], bundle[0]);
    assert!(verifies(&chain, &bundle));
    let leaf = X509::from_pem(chain[0].as_bytes()).unwrap();
    let sans: Vec<_> = leaf
        .subject_alt_names()
        .unwrap()
        .iter()
        .map(|n| n.uri().map(str::to_owned))
        .collect();
    assert_eq!(sans, vec![Some(id("bookinfo", "reviews"))]);
    let diff = leaf.not_before().diff(leaf.not_after()).unwrap();
    assert_eq!(
        (diff.days, diff.secs),
        (0, 3600 + 60),
        "requested + backdate"
    );
}

#[tokio::test]
async fn one_identity_asking_in_a_loop_is_slowed_and_no_other_is() {
    let rate = IssueRate {
        burst: 3,
        every: Duration::from_secs(3600),
    };
    let mut s = serve_at(Duration::from_secs(3600), rate).await;
    for _ in 0..3 {
        s.client
            .create_certificate(request(Some(REVIEWS_TOKEN), own_csr(), 0))
            .await
            .unwrap();
    }
    let err = s
        .client
        .create_certificate(request(Some(REVIEWS_TOKEN), own_csr(), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("bookinfo/reviews"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("retry in"), "{}", err.message());
    // Another identity still gets its certificate.
    let ratings = csr(&p256(), &[San::Uri(&id("bookinfo", "ratings"))]);
    s.client
        .create_certificate(request(Some(RATINGS_TOKEN), ratings, 0))
        .await
        .unwrap();
}

#[tokio::test]
async fn someone_elses_identity_is_permission_denied() {
    let mut s = serve(Duration::from_secs(3600)).await;
    let other = csr(&p256(), &[San::Uri(&id("bookinfo", "ratings"))]);
    let err = s
        .client
        .create_certificate(request(Some(REVIEWS_TOKEN), other, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("sa/ratings"), "{}", err.message());

    let extra = csr(
        &p256(),
        &[
            San::Uri(&id("bookinfo", "reviews")),
            San::Dns("evil.example"),
        ],
    );
    let err = s
        .client
        .create_certificate(request(Some(REVIEWS_TOKEN), extra, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn missing_unknown_or_malformed_credentials_are_unauthenticated() {
    let mut s = serve(Duration::from_secs(3600)).await;
    for token in [None, Some("not-the-token"), Some("")] {
        let err = s
            .client
            .create_certificate(request(token, own_csr(), 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        assert!(!err.message().contains(REVIEWS_TOKEN));
    }
    let mut r = request(None, own_csr(), 0);
    r.metadata_mut().insert(
        "authorization",
        format!("Basic {REVIEWS_TOKEN}").parse().unwrap(),
    );
    let err = s.client.create_certificate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(!err.message().contains(REVIEWS_TOKEN));
}

#[tokio::test]
async fn a_bad_csr_or_validity_is_invalid_argument() {
    let mut s = serve(Duration::from_secs(3600)).await;
    let err = s
        .client
        .create_certificate(request(Some(REVIEWS_TOKEN), b"garbage".to_vec(), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = s
        .client
        .create_certificate(request(Some(REVIEWS_TOKEN), own_csr(), -5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn validity_is_capped_and_zero_means_the_maximum() {
    let mut s = serve(Duration::from_secs(600)).await;
    for requested in [0, 30 * 24 * 3600] {
        let chain = s
            .client
            .create_certificate(request(Some(REVIEWS_TOKEN), own_csr(), requested))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        let leaf = X509::from_pem(chain[0].as_bytes()).unwrap();
        let diff = leaf.not_before().diff(leaf.not_after()).unwrap();
        assert_eq!((diff.days, diff.secs), (0, 660), "requested {requested}s");
    }
}

#[tokio::test]
async fn impersonation_metadata_is_refused() {
    let mut s = serve(Duration::from_secs(3600)).await;
    let mut r = request(Some(REVIEWS_TOKEN), own_csr(), 0);
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(id(
            "bookinfo", "ratings",
        ))),
    };
    r.get_mut().metadata = Some(prost_types::Struct {
        fields: [("ImpersonatedIdentity".to_owned(), value)].into(),
    });
    let err = s.client.create_certificate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

fn write_token(dir: &std::path::Path, name: &str, content: &str, mode: u32) {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn tokens_load_from_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_token(dir.path(), "bookinfo.reviews.token", "tok-a\n", 0o600);
    write_token(dir.path(), "team-b.api.v2.token", "tok-b", 0o600);
    write_token(dir.path(), "README", "ignored", 0o644);
    let tokens = JoinTokens::from_dir(dir.path()).unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(
        tokens.lookup(b"tok-a"),
        Some(&Caller::new("bookinfo", "reviews"))
    );
    assert_eq!(
        tokens.lookup(b"tok-b"),
        Some(&Caller::new("team-b", "api.v2"))
    );
    assert_eq!(tokens.lookup(b"tok-a\n"), None);
    assert_eq!(tokens.lookup(b"tok"), None);
    let debug = format!("{tokens:?}");
    assert!(!debug.contains("tok-a"), "{debug}");

    write_token(dir.path(), "ns.open.token", "tok-c", 0o644);
    let err = JoinTokens::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenError::Mode { mode: 0o644, .. }), "{err}");
    std::fs::remove_file(dir.path().join("ns.open.token")).unwrap();

    write_token(dir.path(), "ns.dup.token", "tok-a", 0o600);
    let err = JoinTokens::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenError::Duplicate { .. }), "{err}");
    assert!(!err.to_string().contains("tok-a"), "{err}");
    std::fs::remove_file(dir.path().join("ns.dup.token")).unwrap();

    write_token(dir.path(), "nodot.token", "tok-d", 0o600);
    let err = JoinTokens::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenError::BadName(_)), "{err}");
    std::fs::remove_file(dir.path().join("nodot.token")).unwrap();

    write_token(dir.path(), "ns.empty.token", " \n", 0o600);
    let err = JoinTokens::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenError::Empty(_)), "{err}");
}

#[test]
fn token_expiries_are_utc_times() {
    use hypha_ca::service::parse_utc;
    let secs = |s: &str| {
        parse_utc(s).map(|t| {
            t.duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        })
    };
    // As `date -u -d <time> +%s` says.
    assert_eq!(secs("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(secs("2000-03-01T00:00:00Z"), Some(951_868_800));
    assert_eq!(secs("2024-02-29T23:59:59Z"), Some(1_709_251_199));
    assert_eq!(secs("2026-12-06T19:55:08Z"), Some(1_796_586_908));
    for bad in [
        "2026-12-06",
        "2026-13-01T00:00:00Z",
        "2026-12-06T19:55:08+01:00",
        "soon",
    ] {
        assert_eq!(secs(bad), None, "{bad}");
    }
}
