//! Hypha on a cluster, end to end (root; CI runs it): the test API server with its
//! controllers and a kubelet stand-in that runs each pod's containers from its spec in a
//! network namespace; `hypha control` on the cluster with its injection webhook. The user
//! labels a namespace and applies bookinfo's Deployments with kubectl; each pod comes up with
//! the webhook's `istio-init` (capture), native `istio-proxy` and the unmodified app, and an
//! unmodified `curl` in a client pod reaches productpage, which reaches details and reviews,
//! all over mutual TLS (STRICT: plaintext to an app's port is refused). The node agent
//! (`hypha bypass --kubernetes`) registers each injected pod with the eBPF bypass as it
//! starts, so the connections between the pods' apps and sidecars skip the TCP/IP stack.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypha_apiserver::kubelet::KubeletConfig;
use hypha_apiserver::ApiServer;
use hypha_testkit::{privileged, TestCgroup};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// The control plane, killed on drop.
struct Control(Child);

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn apply(dir: &Path, name: &str, yaml: &str) {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    hypha_apiserver::kubectl(dir, &["apply", "-f", path.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"));
}

fn bookinfo() -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo, labels: {istio-injection: enabled}}\n",
    );
    // Bookinfo's four services; ratings speaks gRPC, which reviews v2 calls.
    for (app, port) in [
        ("productpage", "http"),
        ("details", "http"),
        ("reviews", "http"),
        ("ratings", "grpc"),
    ] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bookinfo-{app}, namespace: bookinfo}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: {app}, namespace: bookinfo, labels: {{app: {app}}}}}\n\
             spec: {{selector: {{app: {app}}}, ports: [{{name: {port}, port: 9080, targetPort: {port}}}]}}\n"
        ));
    }
    for (app, version, role, port, replicas) in [
        ("productpage", "v1", "productpage", "http", 1),
        ("details", "v1", "details", "http", 1),
        ("reviews", "v1", "reviews-v1", "http", 2),
        ("reviews", "v2", "reviews-v2", "http", 1),
        ("ratings", "v1", "ratings", "grpc", 1),
    ] {
        out.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {app}-{version}, namespace: bookinfo}}\n\
             spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {app}, version: {version}}}}}\n  template:\n    \
             metadata: {{labels: {{app: {app}, version: {version}}}}}\n    spec:\n      serviceAccountName: bookinfo-{app}\n      \
             containers:\n      - name: {app}\n        image: demo/{role}\n        \
             ports: [{{name: {port}, containerPort: 9080}}]\n        \
             readinessProbe: {{tcpSocket: {{port: {port}}}, periodSeconds: 1}}\n"
        ));
    }
    // A pod with a classic sidecar that holds its app until the proxy is ready.
    out.push_str(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: classic, namespace: bookinfo}\n\
         spec:\n  replicas: 1\n  selector: {matchLabels: {app: classic}}\n  template:\n    \
         metadata:\n      labels: {app: classic}\n      annotations: {sidecar.istio.io/nativeSidecar: \"false\", \
         proxy.istio.io/config: \"holdApplicationUntilProxyStarts: true\"}\n    spec:\n      containers:\n      \
         - name: classic\n        image: demo/details\n        ports: [{name: http, containerPort: 9080}]\n        \
         readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}\n",
    );
    // A client: a shell that sleeps, for curl.
    out.push_str(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: client, namespace: bookinfo}\n\
         spec:\n  replicas: 1\n  selector: {matchLabels: {app: client}}\n  template:\n    \
         metadata: {labels: {app: client}}\n    spec:\n      containers:\n      \
         - {name: client, image: demo/sleep}\n\
         ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n",
    );
    out
}

fn pods(api: &ApiServer, app: &str) -> Vec<Value> {
    api.list("", "pods")
        .into_iter()
        .filter(|p| {
            p["metadata"]["namespace"] == "bookinfo" && p["metadata"]["labels"]["app"] == app
        })
        .collect()
}

fn ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in walk(dir) {
        if entry.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&entry).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            out.push_str(&format!(
                "--- {}:\n{}\n",
                entry.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The timestamp of the first line of a log that contains `text` (RFC 3339, comparable).
fn logged_at(log: &Path, text: &str) -> String {
    let raw = std::fs::read_to_string(log).unwrap_or_default();
    // Without the terminal colours.
    let mut plain = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let line = plain
        .lines()
        .find(|l| l.contains(text) && l.starts_with("20"))
        .unwrap_or_else(|| panic!("no {text:?} in {}:\n{plain}", log.display()));
    line.split_whitespace().next().unwrap().to_owned()
}

/// The node agent's `/metrics`.
fn scrape(port: u16) -> String {
    http_get(port, "/metrics")
}

/// A plain GET on loopback; the whole answer.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `curl` in the pod's network namespace, as its app would call.
fn curl_in(netns: &str, url: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.trim_end().ends_with("200"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_bookinfo_runs_over_mutual_tls() {
    if !privileged("injected_bookinfo_runs_over_mutual_tls") {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_hypha");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let node = Arc::new(hypha_pod::Node::create_free(150..=199).unwrap());
    // Every process below (the pods' containers, the control plane, the node agent) is
    // started from this one, so they are all in its cgroup, which the bypass attaches to.
    let cgroup = TestCgroup::enter("kubernetes");
    let api = ApiServer::start().await.unwrap();
    api.run_controllers();
    let mut images: HashMap<String, Vec<String>> = HashMap::new();
    images.insert("hypha:test".into(), vec![exe.into()]);
    for role in [
        "productpage",
        "details",
        "reviews-v1",
        "reviews-v2",
        "ratings",
    ] {
        images.insert(
            format!("demo/{role}"),
            vec![
                exe.into(),
                "demo-app".into(),
                "--role".into(),
                role.into(),
                "--listen".into(),
                "0.0.0.0:9080".into(),
            ],
        );
    }
    images.insert("demo/sleep".into(), vec!["sleep".into(), "3600".into()]);
    images.insert("demo/once".into(), vec!["sleep".into(), "1".into()]);
    api.run_kubelet(KubeletConfig {
        node_name: "node-1".into(),
        node: node.clone(),
        images,
        dir: dir.join("pods"),
    });
    api.write_kubeconfig(dir).unwrap();
    apply(
        dir,
        "platform.yaml",
        &format!(
            "{}\n---\n{}---\n{}",
            hypha_kube::NAMESPACES,
            hypha_kube::RBAC,
            hypha_kube::ISTIO_CRDS
        ),
    );
    let token = api.issue_account_token(hypha_kube::CONTROL_NAMESPACE, "hypha-control");
    let control_kubeconfig = api
        .write_kubeconfig_as(&dir.join("control.kubeconfig"), &token)
        .unwrap();

    // The control plane as the install runs it, on the node's address.
    let (xds, webhook, ready_port) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(dir.join("control.log")).unwrap();
    let _control = Control(
        Command::new(exe)
            .args(["control", "--kubernetes", "--kubeconfig"])
            .arg(&control_kubeconfig)
            .arg("--data-dir")
            .arg(dir.join("ca"))
            .args(["--listen-tls", &format!("0.0.0.0:{xds}")])
            .args(["--webhook", &format!("127.0.0.1:{webhook}")])
            .args(["--webhook-name", "hypha.hypha-system.svc"])
            .args([
                "--injected-control-plane",
                &format!("https://{}:{xds}", node.ipv4()),
            ])
            .args(["--image", "hypha:test"])
            .args(["--health", &format!("127.0.0.1:{ready_port}")])
            .env("HYPHA_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The node agent, with only its own RBAC (the install's).
    let install = hypha_kube::install::objects(&Default::default()).unwrap();
    let node_rbac: Vec<Value> = install
        .iter()
        .filter(|o| o["metadata"]["name"] == "hypha-node" && o["kind"] != "DaemonSet")
        .cloned()
        .collect();
    assert_eq!(
        node_rbac.len(),
        3,
        "ServiceAccount, ClusterRole, ClusterRoleBinding"
    );
    apply(
        dir,
        "node-rbac.yaml",
        &hypha_kube::install::yaml(&node_rbac),
    );
    let node_token = api.issue_account_token(hypha_kube::CONTROL_NAMESPACE, "hypha-node");
    let node_kubeconfig = api
        .write_kubeconfig_as(&dir.join("node.kubeconfig"), &node_token)
        .unwrap();
    let bypass_metrics = free_port();
    let log = std::fs::File::create(dir.join("bypass.log")).unwrap();
    let _bypass = Control(
        Command::new(exe)
            .arg("bypass")
            .arg("--cgroup")
            .arg(cgroup.path())
            .args(["--metrics", &format!("127.0.0.1:{bypass_metrics}")])
            .args(["--kubernetes", "--node", "node-1", "--kubeconfig"])
            .arg(&node_kubeconfig)
            .env("HYPHA_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    api.route_service(
        "hypha-system",
        "hypha",
        443,
        format!("127.0.0.1:{webhook}").parse().unwrap(),
    );
    let injector = install
        .iter()
        .filter(|o| o["kind"] == "MutatingWebhookConfiguration")
        .cloned()
        .collect::<Vec<_>>();
    apply(dir, "injector.yaml", &hypha_kube::install::yaml(&injector));
    let deadline = Instant::now() + WAIT;
    while api
        .get(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "",
            "hypha-sidecar-injector",
        )
        .and_then(|c| c.pointer("/webhooks/0/clientConfig/caBundle").cloned())
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "no caBundle:\n{}",
            std::fs::read_to_string(dir.join("control.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The user's part: a labelled namespace and plain Deployments.
    apply(dir, "bookinfo.yaml", &bookinfo());
    let apps = [
        "productpage",
        "details",
        "reviews",
        "ratings",
        "classic",
        "client",
    ];
    let deadline = Instant::now() + WAIT;
    loop {
        let all_ready = apps.iter().all(|a| {
            let want = if *a == "reviews" { 3 } else { 1 };
            let p = pods(&api, a);
            *a == "client" || (p.len() == want && p.iter().all(ready))
        });
        let client_running = pods(&api, "client")
            .first()
            .is_some_and(|p| p.pointer("/status/phase") == Some(&Value::from("Running")));
        if all_ready && client_running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods not ready: {:#?}\n{}\n--- control:\n{}",
            apps.iter()
                .map(|a| (a, pods(&api, a).first().map(|p| p["status"].clone())))
                .collect::<Vec<_>>(),
            logs(dir),
            std::fs::read_to_string(dir.join("control.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let names = |p: &Value, list: &str| -> Vec<String> {
        p["spec"][list]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for a in apps {
        let p = &pods(&api, a)[0];
        if a == "classic" {
            assert_eq!(names(p, "initContainers"), ["istio-init"]);
            assert_eq!(names(p, "containers"), ["istio-proxy", "classic"]);
        } else {
            assert_eq!(
                names(p, "initContainers"),
                ["istio-init", "istio-proxy"],
                "{a}"
            );
        }
    }

    // The app started only once its sidecar was ready (the native sidecar's startup probe).
    // (The classic sidecar: its postStart hook, `hypha wait`, held the app.)
    for a in ["productpage", "details", "reviews", "ratings", "classic"] {
        let pod = pods(&api, a)[0]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let pod_dir = dir.join("pods").join(format!("bookinfo_{pod}"));
        let sidecar_ready = logged_at(&pod_dir.join("istio-proxy.log"), "proxy ready");
        let app_start = logged_at(&pod_dir.join(format!("{a}.log")), "");
        assert!(
            sidecar_ready < app_start,
            "{a}: app at {app_start}, sidecar ready at {sidecar_ready}"
        );
    }

    // Through the mesh: curl in the client pod, productpage to details and reviews.
    let client = &pods(&api, "client")[0];
    let netns = format!(
        "hypha{}-bookinfo.{}",
        node.index(),
        client["metadata"]["name"].as_str().unwrap()
    );
    let url = "http://productpage.bookinfo.svc.cluster.local:9080/productpage";
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let (ok, text) = curl_in(&netns, url);
        if ok && text.contains("\"reviews\"") && !text.contains("\"error\"") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no page through the mesh: {text}\n{}",
            logs(dir)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(page.contains("details-v1"), "{page}");
    // gRPC through the mesh too: reviews v2 asks ratings for its stars.
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, text) = curl_in(
            &netns,
            "http://reviews.bookinfo.svc.cluster.local:9080/reviews/0",
        );
        if ok && text.contains("\"black\"") && text.contains("\"stars\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no stars from ratings through the mesh: {text}\n{}",
            logs(dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The control plane says it is ready: the cluster has been read and pushed.
    let answer = http_get(ready_port, "/ready");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The node agent registered the pods: their apps' connections were captured at connect
    // time and their bytes handed from socket to socket.
    let bypass_log = || std::fs::read_to_string(dir.join("bypass.log")).unwrap_or_default();
    for a in apps {
        let pod = pods(&api, a)[0]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            bypass_log()
                .lines()
                .any(|l| l.contains("pod in the bypass") && l.contains(&format!("bookinfo/{pod}"))),
            "{a} not registered:\n{}",
            bypass_log()
        );
    }
    let metrics = scrape(bypass_metrics);
    for counter in [
        "hypha_bypass_connects_outbound_total",
        "hypha_bypass_messages_redirected_total",
    ] {
        let value = metrics
            .lines()
            .find(|l| l.starts_with(counter))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(
            value > 0.0,
            "{counter} is {value}:\n{metrics}\n{}",
            bypass_log()
        );
    }

    // STRICT: plaintext from outside the mesh to an app's port is refused.
    let details_ip = pods(&api, "details")[0]["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_owned();
    let plain = Command::new("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{details_ip}:9080/details/0"))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert_ne!(
        code, "200",
        "plaintext reached the app past STRICT mutual TLS"
    );

    // A pod deleted under load loses no request: its endpoint leaves the mesh, what reached it
    // as it stopped is retried on the other replica, its sidecar outlives its app.
    let reviews_url = "http://reviews.bookinfo.svc.cluster.local:9080/reviews/0";
    let script = format!(
        "for i in $(seq 1 120); do curl -s -o /dev/null -m 10 -w '%{{http_code}}\\n' {reviews_url}; sleep 0.02; done"
    );
    let load = Command::new("ip")
        .args(["netns", "exec", &netns, "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let victim = pods(&api, "reviews")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    hypha_apiserver::kubectl(
        dir,
        &["delete", "pod", "-n", "bookinfo", &victim, "--wait=false"],
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || load.wait_with_output().unwrap())
        .await
        .unwrap();
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    let answered: Vec<&str> = codes.lines().collect();
    assert_eq!(answered.len(), 120, "{codes}");
    let failed = answered.iter().filter(|c| **c != "200").count();
    assert_eq!(
        failed,
        0,
        "requests lost while a reviews pod went: {codes}\n{}",
        logs(dir)
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let now = pods(&api, "reviews");
        let replaced = now.len() == 3
            && now.iter().all(ready)
            && now.iter().all(|p| p["metadata"]["name"] != victim.as_str());
        if replaced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deleted pod was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A Job's pod completes: its app exits, then its native sidecar is stopped.
    apply(
        dir,
        "job.yaml",
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: once, namespace: bookinfo}\n\
         spec:\n  template:\n    metadata: {labels: {app: once}}\n    spec:\n      \
         restartPolicy: Never\n      containers: [{name: once, image: demo/once}]\n",
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let job = api.get("batch", "jobs", "bookinfo", "once").unwrap();
        let complete = job
            .pointer("/status/conditions/0/type")
            .is_some_and(|t| t == "Complete");
        if complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Job did not complete: {:#}\n{:#?}\n{}",
            job["status"],
            pods(&api, "once")
                .iter()
                .map(|p| p["status"].clone())
                .collect::<Vec<_>>(),
            logs(dir)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let once = &pods(&api, "once")[0];
    assert_eq!(once["status"]["phase"], "Succeeded");
    assert!(
        once["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "istio-proxy" && c["restartPolicy"] == "Always"),
        "the Job's pod had its native sidecar"
    );
}
