//! What policies and apps see of a request, at the enforcement point: raw requests to a
//! sidecar's inbound port, what its AuthorizationPolicy decides and what the app gets, under
//! each MeshConfig `pathNormalization` (raw bytes, so nothing on the way tidies the request
//! first); and one authority, the name the client used, from the client to the app.

use std::time::Duration;

use hypha_proxy::Options;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{config, get, ready, sidecar, sidecar_service, web_sidecar, WAIT};

/// `web.shop` behind its sidecar: a DENY on `/admin*`, and an ALLOW that lets `/tenant*` through
/// only for `x-tenant: good` (everything else is allowed).
fn yaml(normalization: &str, inbound: u16) -> String {
    format!(
        "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\n\
         spec: {{trustDomain: cluster.local{normalization}}}\n{}\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: no-admin, namespace: shop}}\nspec:\n  \
         selector: {{matchLabels: {{app: web}}}}\n  action: DENY\n  rules:\n  \
         - to: [{{operation: {{paths: [/admin*]}}}}]\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: tenants, namespace: shop}}\nspec:\n  \
         selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules:\n  \
         - to: [{{operation: {{notPaths: [/tenant*]}}}}]\n  \
         - to: [{{operation: {{paths: [/tenant*]}}}}]\n    \
         when: [{{key: 'request.headers[x-tenant]', values: [good]}}]\n",
        sidecar_service("web", 80, "http", "HTTP", inbound)
    )
}

/// One HTTP/1.1 request as written, to `addr`: the status and the body.
async fn raw(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{head}\r\nhost: web.shop.svc.cluster.local\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Repeats `head` until the sidecar answers `status` (a config change on its way).
async fn until(addr: std::net::SocketAddr, head: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body) = raw(addr, head).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{head:?}: still {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn policies_see_paths_methods_and_headers_as_istio_normalizes_them() {
    let (cp, _, server) = web_sidecar(|port| yaml("", port), Default::default()).await;
    let inbound = server.inbound[0];
    let push = |normalization: &str| {
        cp.update(config(&yaml(normalization, inbound.port())));
    };
    until(inbound, "GET /ok HTTP/1.1", 200).await;

    // BASE, Istio's default: escapes of unreserved characters are decoded before the policy
    // looks, and the app gets the decoded path.
    for head in [
        "GET /%61dmin HTTP/1.1",
        "GET /%41%64min/../admin HTTP/1.1",
        "GET /public/%2E%2E/admin HTTP/1.1",
    ] {
        assert_eq!(raw(inbound, head).await.0, 403, "{head}");
    }
    assert_eq!(
        raw(inbound, "GET /%7Euser/%2d HTTP/1.1").await,
        (200, "web /~user/- -".into())
    );
    // `%00` and lower-case methods are refused; escaped slashes and repeated slashes are
    // left alone by BASE (and do not match `/admin*`).
    for head in [
        "GET /x%00 HTTP/1.1",
        "get /admin HTTP/1.1",
        "Post /x HTTP/1.1",
    ] {
        assert_eq!(raw(inbound, head).await.0, 400, "{head}");
    }
    assert_eq!(
        raw(inbound, "GET //admin HTTP/1.1").await,
        (200, "web //admin -".into())
    );
    assert_eq!(
        raw(inbound, "GET /a%2F..%2Fadmin HTTP/1.1").await,
        (200, "web /a%2F..%2Fadmin -".into())
    );
    // A header sent twice is matched as its values joined, as Envoy does: the second value
    // is not hidden behind the first.
    assert_eq!(
        raw(inbound, "GET /tenant HTTP/1.1\r\nx-tenant: good")
            .await
            .0,
        200
    );
    for extra in [
        "x-tenant: good\r\nx-tenant: evil",
        "x-tenant: evil\r\nx-tenant: good",
    ] {
        let head = format!("GET /tenant HTTP/1.1\r\n{extra}");
        assert_eq!(raw(inbound, &head).await.0, 403, "{extra}");
    }

    // A request that names two authorities is refused before routing and policy; an
    // absolute-form one that names one reaches the (HTTP/1.1) app in origin form.
    assert_eq!(
        raw(inbound, "GET http://admin.shop/x HTTP/1.1").await.0,
        400
    );
    assert_eq!(
        raw(
            inbound,
            "GET http://web.shop.svc.cluster.local/abs HTTP/1.1"
        )
        .await,
        (200, "web /abs -".into())
    );

    // MERGE_SLASHES: repeated slashes merge before the policy looks.
    push(", pathNormalization: {normalization: MERGE_SLASHES}");
    until(inbound, "GET //admin HTTP/1.1", 403).await;
    assert_eq!(
        raw(inbound, "GET //a///b HTTP/1.1").await,
        (200, "web /a/b -".into())
    );

    // DECODE_AND_MERGE_SLASHES: escaped slashes are slashes too.
    push(", pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}");
    until(inbound, "GET /a%2F..%2Fadmin HTTP/1.1", 403).await;
    assert_eq!(
        raw(inbound, "GET /a%2fb%5Cc HTTP/1.1").await,
        (200, "web /a/b/c -".into())
    );

    // NONE: the path goes as sent (what the user asked for), methods are still checked.
    push(", pathNormalization: {normalization: NONE}");
    let body = until(inbound, "GET /public/../admin HTTP/1.1", 200).await;
    assert_eq!(body, "web /public/../admin -");
    assert_eq!(raw(inbound, "get /x HTTP/1.1").await.0, 400);
}

#[tokio::test]
async fn one_authority_from_the_client_to_the_app() {
    // HTTP/2 between the sidecars (a GRPC port), and a policy on the host the client named.
    let yaml = |inbound: u16| {
        format!(
            "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\n\
             spec: {{trustDomain: cluster.local}}\n{}\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: by-host, namespace: shop}}\nspec:\n  \
             selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules:\n  \
             - to: [{{operation: {{hosts: ['web.shop.svc.cluster.local*']}}}}]\n",
            sidecar_service("web", 80, "grpc", "GRPC", inbound)
        )
    };
    let (_cp, uri, server) = web_sidecar(yaml, Default::default()).await;
    let mut client = hypha_proxy::start(Options {
        http_proxy: vec!["127.0.0.1:0".parse().unwrap()],
        ..sidecar(&uri, "client", &[("app", "client")])
    })
    .await
    .unwrap();
    ready(&mut client).await;
    // The server's sidecar sees the name the client used as the HTTP/2 `:authority` (not the
    // endpoint's address), so the `hosts` rule allows it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body, _) = get(
            client.http_proxy[0],
            "http://web.shop.svc.cluster.local/h2",
            &[],
        )
        .await;
        if status == 200 {
            assert_eq!(body, "web http://web.shop.svc.cluster.local/h2 -");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Over HTTP/2 to the app too.
    let (status, body) = raw(
        server.inbound[0],
        "GET http://web.shop.svc.cluster.local/abs HTTP/1.1",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "web http://web.shop.svc.cluster.local/abs -")
    );
}
