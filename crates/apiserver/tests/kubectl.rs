//! The test API server driven by the machine's kubectl, as a user drives a cluster: apply a
//! directory (create, then update by strategic merge and JSON merge patches), get, scale,
//! delete; CRDs registered when applied; watches that resume, end in `410 Gone` once
//! compacted, and send bookmarks; TokenReview for the tokens the test issued.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hypha_apiserver::{ApiServer, Token};
use serde_json::{json, Value};

/// Runs kubectl against the server whose kubeconfig is in `dir`; its stdout, or a panic with
/// what it printed.
fn kubectl(dir: &Path, args: &[&str]) -> String {
    hypha_apiserver::kubectl(dir, args).unwrap_or_else(|e| panic!("{e}"))
}

const CRD: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: virtualservices.networking.istio.io}
spec:
  group: networking.istio.io
  names: {kind: VirtualService, plural: virtualservices, singular: virtualservice, shortNames: [vs]}
  scope: Namespaced
  versions:
  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
";

fn app(replicas: u32, env: &str, ports: &str, route: &str) -> String {
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: reviews, namespace: shop}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop, labels: {{app: reviews}}}}
spec:
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: reviews, namespace: shop}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: reviews}}}}
  template:
    metadata: {{labels: {{app: reviews}}}}
    spec:
      serviceAccountName: reviews
      containers:
      - name: reviews
        image: example/reviews:1
        env: [{env}]
        ports: [{ports}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews]
  http: [{{route: [{{destination: {{host: reviews, subset: {route}}}}}]}}]
"
    )
}

/// One HTTP request to the server; status and body (a watch: its first `lines` lines).
async fn request(
    server: &ApiServer,
    method: &str,
    path: &str,
    body: Option<Value>,
    lines: usize,
) -> (u16, Vec<Value>) {
    let stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "apiserver")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            buf.extend_from_slice(frame.unwrap().data_ref().map_or(&[][..], |d| &d[..]));
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                out.push(serde_json::from_slice(&line).unwrap());
                if out.len() == lines {
                    return;
                }
            }
        }
        if !buf.is_empty() {
            out.push(serde_json::from_slice(&buf).unwrap());
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the response in time");
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_gets_scales_and_deletes() {
    let server = ApiServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    server.write_kubeconfig(dir).unwrap();
    let manifests = dir.join("manifests");
    std::fs::create_dir(&manifests).unwrap();

    // A CRD, then objects of every kind (kubectl's default, strict validation included).
    std::fs::write(dir.join("crd.yaml"), CRD).unwrap();
    let crd = dir.join("crd.yaml");
    kubectl(dir, &["apply", "-f", crd.to_str().unwrap()]);
    let env = "{name: A, value: '1'}, {name: B, value: '1'}";
    std::fs::write(
        manifests.join("app.yaml"),
        app(1, env, "{containerPort: 80}, {containerPort: 81}", "v1"),
    )
    .unwrap();
    let m = manifests.to_str().unwrap();
    kubectl(dir, &["apply", "-f", m]);
    let deploy = server
        .get("apps", "deployments", "shop", "reviews")
        .unwrap();
    assert_eq!(deploy["spec"]["replicas"], 1);
    assert!(
        deploy["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );
    let vs = server
        .get("networking.istio.io", "virtualservices", "shop", "reviews")
        .unwrap();
    assert_eq!(
        vs["spec"]["http"][0]["route"][0]["destination"]["subset"],
        "v1"
    );

    // Applied again, changed: a strategic merge patch for the Deployment (a port and an env
    // entry gone, one changed), a JSON merge patch for the VirtualService.
    std::fs::write(
        manifests.join("app.yaml"),
        app(2, "{name: B, value: '2'}", "{containerPort: 81}", "v2"),
    )
    .unwrap();
    kubectl(dir, &["apply", "-f", m]);
    let deploy = server
        .get("apps", "deployments", "shop", "reviews")
        .unwrap();
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(container["env"], json!([{"name": "B", "value": "2"}]));
    assert_eq!(container["ports"], json!([{"containerPort": 81}]));
    assert_eq!(deploy["metadata"]["generation"], 2);
    let vs = server
        .get("networking.istio.io", "virtualservices", "shop", "reviews")
        .unwrap();
    assert_eq!(
        vs["spec"]["http"][0]["route"][0]["destination"]["subset"],
        "v2"
    );
    // Nothing changed: nothing written.
    let rv = server.resource_version();
    kubectl(dir, &["apply", "-f", m]);
    assert_eq!(server.resource_version(), rv);

    // get, by label too; the CRD's short name.
    let got: Value = serde_json::from_str(&kubectl(
        dir,
        &[
            "get",
            "svc",
            "-n",
            "shop",
            "-l",
            "app=reviews",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(got["items"][0]["metadata"]["name"], "reviews");
    let none: Value = serde_json::from_str(&kubectl(
        dir,
        &["get", "svc", "-n", "shop", "-l", "app=other", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(none["items"], json!([]));
    assert!(kubectl(dir, &["get", "vs", "-n", "shop"]).contains("reviews"));

    // scale
    kubectl(
        dir,
        &["scale", "deployment/reviews", "-n", "shop", "--replicas=3"],
    );
    let deploy = server
        .get("apps", "deployments", "shop", "reviews")
        .unwrap();
    assert_eq!(deploy["spec"]["replicas"], 3);

    // delete
    kubectl(dir, &["delete", "-f", m]);
    assert!(server
        .get("apps", "deployments", "shop", "reviews")
        .is_none());
    assert!(server
        .get("networking.istio.io", "virtualservices", "shop", "reviews")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_expire_and_bookmark() {
    let server = ApiServer::start().await.unwrap();
    let pod = |name: &str, app: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}}, "spec": {}})
    };
    let pods = "/api/v1/namespaces/shop/pods";
    let (s, _) = request(&server, "POST", pods, Some(pod("a", "web")), 1).await;
    assert_eq!(s, 201);
    let (_, list) = request(
        &server,
        "GET",
        &format!("{pods}?labelSelector=app%3Dweb"),
        None,
        1,
    )
    .await;
    let rv: u64 = list[0]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(list[0]["items"].as_array().unwrap().len(), 1);

    // Changes after the list's version: the ones the selector takes, in order.
    request(&server, "POST", pods, Some(pod("b", "db")), 1).await;
    request(&server, "POST", pods, Some(pod("c", "web")), 1).await;
    request(&server, "DELETE", &format!("{pods}/a"), None, 1).await;
    let (s, events) = request(
        &server,
        "GET",
        &format!("{pods}?watch=true&labelSelector=app%3Dweb&resourceVersion={rv}"),
        None,
        2,
    )
    .await;
    assert_eq!(s, 200);
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("ADDED", "c"), ("DELETED", "a")]);

    // Live: a watch sees what happens after it starts; bookmarks carry the version.
    let now = server.resource_version();
    let path = format!("{pods}?watch=true&allowWatchBookmarks=true&resourceVersion={now}");
    let w = request(&server, "GET", &path, None, 2);
    let write = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        server.put("", "pods", pod("d", "web"));
    };
    let ((_, events), ()) = tokio::join!(w, write);
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "d");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(
        events[1]["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );

    // Compacted: a watch from before gets 410 Gone in the stream.
    server.compact();
    let (s, events) = request(
        &server,
        "GET",
        &format!("{pods}?watch=true&resourceVersion={rv}"),
        None,
        1,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_answer_for_issued_tokens_only() {
    let server = ApiServer::start().await.unwrap();
    let pod = server.put(
        "",
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": "shop"}}),
    );
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = |pod_uid: &str, expires: u64| Token {
        namespace: "shop".into(),
        service_account: "reviews".into(),
        pod: Some(("p1".into(), pod_uid.into())),
        audiences: vec!["istio-ca".into()],
        expires,
    };
    let good = server.issue_token(token(&uid, later));
    let expired = server.issue_token(token(&uid, 1));
    let other_pod = server.issue_token(token("not-the-uid", later));
    let review = |t: &str, aud: &str| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "spec": {"token": t, "audiences": [aud]}})
    };
    let path = "/apis/authentication.k8s.io/v1/tokenreviews";
    let (s, r) = request(&server, "POST", path, Some(review(&good, "istio-ca")), 1).await;
    assert_eq!(s, 201);
    assert_eq!(r[0]["status"]["authenticated"], true);
    assert_eq!(
        r[0]["status"]["user"]["username"],
        "system:serviceaccount:shop:reviews"
    );
    assert_eq!(
        r[0]["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["p1"])
    );
    for (t, aud) in [
        (&good, "other"),
        (&expired, "istio-ca"),
        (&other_pod, "istio-ca"),
        (&"junk".to_owned(), "istio-ca"),
    ] {
        let (_, r) = request(&server, "POST", path, Some(review(t, aud)), 1).await;
        assert_eq!(
            r[0]["status"]["authenticated"], false,
            "{t} for {aud}: {r:?}"
        );
    }
    // The pod gone, its token no longer authenticates.
    assert!(server.delete("", "pods", "shop", "p1"));
    let (_, r) = request(&server, "POST", path, Some(review(&good, "istio-ca")), 1).await;
    assert_eq!(r[0]["status"]["authenticated"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_in_pages_and_namespaces_take_their_objects() {
    let server = ApiServer::start().await.unwrap();
    let mut names = Vec::new();
    // `a` and `a-b`: ordered by namespace, then name (not as one string, where `-` < `/`).
    for ns in ["a", "a-b"] {
        server.put(
            "",
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
        for i in 0..3 {
            let name = format!("p{i}");
            server.put(
                "",
                "pods",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}}),
            );
            names.push(format!("{ns}/{name}"));
        }
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut first_token = None;
    loop {
        let (s, page) = request(
            &server,
            "GET",
            &format!("/api/v1/pods?limit=2&continue={token}"),
            None,
            1,
        )
        .await;
        assert_eq!(s, 200);
        let items = page[0]["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            )
        }));
        match page[0]["metadata"]["continue"].as_str() {
            Some(next) => {
                token = next.to_owned();
                first_token.get_or_insert(token.clone());
            }
            None => break,
        }
    }
    assert_eq!(seen, names);
    // A replacement read at an older version conflicts; at the current one it is taken.
    let (_, pod) = request(&server, "GET", "/api/v1/namespaces/a/pods/p0", None, 1).await;
    let mut stale = pod[0].clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    stale["metadata"]["labels"] = json!({"x": "y"});
    let (s, _) = request(
        &server,
        "PUT",
        "/api/v1/namespaces/a/pods/p0",
        Some(stale),
        1,
    )
    .await;
    assert_eq!(s, 409);
    let mut fresh = pod[0].clone();
    fresh["metadata"]["labels"] = json!({"x": "y"});
    let (s, put) = request(
        &server,
        "PUT",
        "/api/v1/namespaces/a/pods/p0",
        Some(fresh),
        1,
    )
    .await;
    assert_eq!((s, &put[0]["metadata"]["labels"]["x"]), (200, &json!("y")));
    // A continue token from before a compaction: 410, list again.
    server.put(
        "",
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late", "namespace": "a"}}),
    );
    server.compact();
    let (s, _) = request(
        &server,
        "GET",
        &format!("/api/v1/pods?limit=2&continue={}", first_token.unwrap()),
        None,
        1,
    )
    .await;
    assert_eq!(s, 410);

    // kubectl deletes a namespace: what is in it goes too, the rest stays.
    let tmp = tempfile::tempdir().unwrap();
    server.write_kubeconfig(tmp.path()).unwrap();
    kubectl(tmp.path(), &["delete", "namespace", "a"]);
    assert!(server.get("", "pods", "a", "p0").is_none());
    assert!(server.get("", "pods", "a", "late").is_none());
    assert!(server.get("", "pods", "a-b", "p0").is_some());
}

/// Polls `check` until it holds (5 s at most).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_turn_deployments_into_pods_and_endpoint_slices() {
    let server = ApiServer::start().await.unwrap();
    server.run_controllers();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    server.write_kubeconfig(dir).unwrap();
    let manifest = dir.join("web.yaml");
    std::fs::write(
        &manifest,
        "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, appProtocol: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers: [{name: web, image: web:1, ports: [{name: http, containerPort: 8080}]}]
",
    )
    .unwrap();
    kubectl(dir, &["apply", "-f", manifest.to_str().unwrap()]);
    let svc = server.get("", "services", "shop", "web").unwrap();
    assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
    assert_eq!(svc["spec"]["clusterIPs"].as_array().unwrap().len(), 2);

    let endpoints = |family: &str| {
        server
            .get(
                "discovery.k8s.io",
                "endpointslices",
                "shop",
                &format!("web-{family}"),
            )
            .map(|s| s["endpoints"].as_array().unwrap().clone())
            .unwrap_or_default()
    };
    eventually("two endpoints of each family", || {
        endpoints("ipv4").len() == 2 && endpoints("ipv6").len() == 2
    })
    .await;
    let slice = server
        .get("discovery.k8s.io", "endpointslices", "shop", "web-ipv6")
        .unwrap();
    assert_eq!(slice["addressType"], "IPv6");
    assert_eq!(
        slice["ports"],
        json!([{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}])
    );
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    let pods = server.list("", "pods");
    assert_eq!(pods.len(), 2);
    for ep in endpoints("ipv4") {
        let pod = pods
            .iter()
            .find(|p| p["metadata"]["name"] == ep["targetRef"]["name"])
            .expect("the endpoint's pod");
        assert_eq!(pod["spec"]["serviceAccountName"], "web");
        assert_eq!(ep["addresses"][0], pod["status"]["podIPs"][0]["ip"]);
        assert_eq!(ep["conditions"]["ready"], true);
    }

    kubectl(
        dir,
        &["scale", "deployment/web", "-n", "shop", "--replicas=3"],
    );
    eventually("three endpoints", || endpoints("ipv4").len() == 3).await;
    // A pod deleted by hand is replaced, and its slice entry with it.
    let first_pod = || {
        endpoints("ipv4")[0]["targetRef"]["name"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Three endpoints, none of them pod `name`.
    let replaced = |name: &str| {
        let eps = endpoints("ipv6");
        eps.len() == 3 && eps.iter().all(|ep| ep["targetRef"]["name"] != name)
    };
    let gone = first_pod();
    kubectl(dir, &["delete", "pod", "-n", "shop", &gone]);
    eventually("the deleted pod replaced in the slices", || replaced(&gone)).await;
    assert_eq!(server.list("", "pods").len(), 3);
    // A pod relabelled out of the selector leaves the Service's slices, and the Deployment
    // makes another in its place.
    let relabel = |name: &str| {
        kubectl(
            dir,
            &[
                "label",
                "pod",
                "-n",
                "shop",
                name,
                "app=debug",
                "--overwrite",
            ],
        );
    };
    let moved = first_pod();
    relabel(&moved);
    eventually("the relabelled pod out of the slices, replaced", || {
        replaced(&moved)
    })
    .await;
    kubectl(dir, &["delete", "pod", "-n", "shop", &moved]);
    // A pod of no Deployment (nothing replaces it) relabelled out of the selector leaves the
    // slices that listed it.
    server.put(
        "",
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "loose", "namespace": "shop", "labels": {"app": "web"}},
               "spec": {"containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]},
               "status": {"podIPs": [{"ip": "10.9.9.9"}], "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let listed = |name: &str| {
        endpoints("ipv4")
            .iter()
            .any(|ep| ep["targetRef"]["name"] == name)
    };
    eventually("a pod of no Deployment in the slices", || listed("loose")).await;
    relabel("loose");
    eventually("it leaves them once relabelled", || !listed("loose")).await;
    kubectl(dir, &["delete", "pod", "-n", "shop", "loose"]);
    kubectl(
        dir,
        &["scale", "deployment/web", "-n", "shop", "--replicas=0"],
    );
    eventually("no endpoints, no slices", || {
        server.list("discovery.k8s.io", "endpointslices").is_empty()
            && server.list("", "pods").is_empty()
    })
    .await;
    // A Service deleted takes its slices with it; the pods stay.
    kubectl(
        dir,
        &["scale", "deployment/web", "-n", "shop", "--replicas=1"],
    );
    eventually("one endpoint", || endpoints("ipv4").len() == 1).await;
    kubectl(dir, &["delete", "service", "-n", "shop", "web"]);
    eventually("the slices gone with their Service", || {
        server.list("discovery.k8s.io", "endpointslices").is_empty()
    })
    .await;
    assert_eq!(server.list("", "pods").len(), 1);
}
