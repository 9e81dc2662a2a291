//! Pods with transparent capture, end to end (root; CI runs it): two pods on a bridge, each
//! with its sidecar inside and Istio-style capture rules, the control plane on the node. An
//! unmodified `curl` in the client pod reaches the service's VIP, IPv4 and IPv6; the client
//! sidecar routes by the original destination, the server pod's capture hands the connection
//! to its sidecar, which requires mutual TLS (STRICT) and sees the client's SPIFFE identity.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hypha_bypass::{Bypass, CapturedPod, IpRange};
use hypha_pod::{Capture, Node, Pod};
use hypha_testkit::{privileged, TestCgroup};

/// Children killed (and reaped) on drop, so a failing test leaves nothing running.
struct Procs(Vec<(String, Child, PathBuf)>);

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command, logs: &Path) {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("HYPHA_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.0.push((name.to_string(), child, log));
    }

    /// Panics with the logs if a child exited.
    fn check(&mut self) {
        for (name, child, log) in &mut self.0 {
            if let Some(status) = child.try_wait().unwrap() {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                panic!("{name} exited ({status}):\n{text}");
            }
        }
    }

    /// The process id of child `name`.
    fn pid(&self, name: &str) -> u32 {
        let (_, child, _) = self.0.iter().find(|(n, ..)| n == name).unwrap();
        child.id()
    }

    fn logs(&self) -> String {
        self.0
            .iter()
            .map(|(name, _, log)| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {name}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `curl` inside `pod`: (exit success, stdout).
fn curl(pod: &Pod, args: &[&str]) -> (bool, String) {
    let out = pod
        .command("curl")
        .args(["-sS", "-m", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn config(dir: &Path, client: &Pod, server: &Pod, ext: &Pod) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: pods.local}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: pods}}
spec:
  hosts: [web.pods.svc.cluster.local]
  addresses: [10.78.0.10, fd78::10]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: web-1
  namespace: pods
  annotations: {{hypha.dev/addresses: \"{s6}\"}}
spec: {{address: {s4}, serviceAccount: web, labels: {{app: web}}, ports: {{http: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: client-1
  namespace: pods
  annotations: {{hypha.dev/addresses: \"{c6}\"}}
spec: {{address: {c4}, serviceAccount: client, labels: {{app: client}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: pods}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tls-a, namespace: pods}}
spec:
  hosts: [a.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: tls, protocol: TLS, targetPort: 8443}}]
  endpoints: [{{address: {e4}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tls-b, namespace: pods}}
spec:
  hosts: [b.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: https, protocol: HTTPS, targetPort: 9443}}]
  endpoints: [{{address: {e4}}}]
",
            e4 = ext.ipv4,
            s4 = server.ipv4,
            s6 = server.ipv6,
            c4 = client.ipv4,
            c6 = client.ipv6,
        ),
    )
    .unwrap();
}

#[test]
fn curl_in_a_pod_reaches_a_service_vip_over_mutual_tls_in_both_families() {
    if !privileged("curl_in_a_pod_reaches_a_service_vip_over_mutual_tls_in_both_families") {
        return;
    }
    // Captured by iptables alone; then with the eBPF bypass attached and both pods registered,
    // so their connections are captured at connect instead, and bypassed.
    mesh_in_pods(false);
    mesh_in_pods(true);
}

fn mesh_in_pods(bypass: bool) {
    let hypha = env!("CARGO_BIN_EXE_hypha");
    // Every process below is started from this one, so they are all in its cgroup.
    let cgroup = bypass.then(|| TestCgroup::enter("pods"));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let index = 200 + u8::try_from(std::process::id() % 50).unwrap();
    let node = Node::create(index).unwrap();
    let client = node.pod("client").unwrap();
    let server = node.pod("web").unwrap();
    // Outside the mesh: no sidecar, no capture.
    let ext = node.pod("ext").unwrap();
    // The client's app reaches the ext pod's /30 directly (a range with only ext in it: the
    // pods are .2, .3 and .4 of the node's /24), in IPv4 only.
    let direct = IpRange {
        addr: ext.ipv4.into(),
        prefix: 30,
    };
    // The capture as a pod's init container makes it: `hypha capture` run inside the pod,
    // with the values of Istio's annotations.
    let capture = |pod: &Pod, args: &[&str]| {
        let out = pod
            .command(hypha)
            .arg("capture")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hypha capture: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    capture(
        &client,
        &["--exclude-outbound-ip-ranges", &direct.to_string()],
    );
    capture(&server, &[]);
    config(&w.join("config"), &client, &server, &ext);
    let attached = cgroup.as_ref().map(|cg| {
        let mut b = Bypass::attach(cg.path()).unwrap();
        for pod in [&client, &server] {
            let excluded = if pod.name == "client" {
                vec![direct]
            } else {
                Vec::new()
            };
            b.add_pod(&CapturedPod {
                exclude_outbound_cidrs: excluded,
                ..CapturedPod::new(format!("/run/netns/{}", pod.netns))
            })
            .unwrap();
        }
        b
    });
    let tokens = join_tokens(w, index, &["client", "web"]);
    let mut procs = Procs(Vec::new());
    let cp = control_plane(&mut procs, &node, w, &tokens);
    // The app in the server pod, on all addresses of the pod.
    let mut app = server.command(hypha);
    app.args([
        "demo-app",
        "--role",
        "reviews-v1",
        "--listen",
        "0.0.0.0:8080",
    ]);
    procs.spawn("app", app, w);
    // An HTTP server outside the mesh, on the mesh's HTTP port.
    let mut outside = ext.command(hypha);
    outside.args(["demo-app", "--role", "details", "--listen", "[::]:8080"]);
    procs.spawn("ext-app", outside, w);
    // Two TLS servers outside the mesh, each with its own self-signed certificate.
    for (name, port) in [("a", 8443), ("b", 9443)] {
        let host = format!("{name}.example.com");
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", &format!("/CN={host}")])
            .args(["-addext", &format!("subjectAltName=DNS:{host}")])
            .arg("-keyout")
            .arg(w.join(format!("{name}.key")))
            .arg("-out")
            .arg(w.join(format!("{name}.pem")))
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let mut server = ext.command("openssl");
        server
            .args(["s_server", "-www", "-quiet", "-accept", &port.to_string()])
            .arg("-cert")
            .arg(w.join(format!("{name}.pem")))
            .arg("-key")
            .arg(w.join(format!("{name}.key")));
        procs.spawn(&format!("tls-{name}"), server, w);
    }
    sidecar(
        &mut procs,
        &client,
        &cp,
        ("client", "client-1", "client"),
        w,
    );
    sidecar(&mut procs, &server, &cp, ("web", "web-1", "web"), w);
    wait_ready(&mut procs, &[&client, &server]);
    // An unmodified client: curl to the service's VIPs, nothing told it about a proxy.
    let before = attached.as_ref().map(|b| b.counters().unwrap());
    let mut served = 0;
    for url in [
        "http://10.78.0.10:8080/reviews/0",
        "http://[fd78::10]:8080/reviews/0",
        "http://web.pods.svc.cluster.local:8080/reviews/0",
    ] {
        let args: Vec<&str> = if url.contains("svc.cluster.local") {
            // No DNS in the pod: the name resolves to the VIP, as cluster DNS would.
            vec![
                "--resolve",
                "web.pods.svc.cluster.local:8080:10.78.0.10",
                url,
            ]
        } else {
            vec![url]
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let body = loop {
            let (ok, body) = curl(&client, &args);
            if ok && body.contains("reviews") {
                break body;
            }
            procs.check();
            assert!(Instant::now() < deadline, "{url}: {body}\n{}", procs.logs());
            thread::sleep(Duration::from_millis(300));
        };
        assert!(body.contains("\"id\""), "{url}: {body}");
        served += body.len() as u64;
    }
    if let (Some(b), Some(before)) = (&attached, before) {
        // Each response crossed three socket pairs (server app → its sidecar, server sidecar
        // → client sidecar over mutual TLS, client sidecar → curl), each pair redirected; with
        // iptables REDIRECT in the way only the first pair would be.
        let after = b.counters().unwrap();
        assert!(
            after.bytes_redirected - before.bytes_redirected >= 3 * served,
            "{served} bytes of responses, redirected: {before:?} → {after:?}"
        );
    }
    // The server's sidecar took them over mutual TLS from the client's identity.
    let (_, metrics) = curl(&server, &["http://127.0.0.1:15000/metrics"]);
    let mtls: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("source_principal=\"spiffe://pods.local/ns/pods/sa/client\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        mtls >= 3,
        "mutual-TLS requests seen by the server's sidecar: {mtls}\n{metrics}"
    );
    // Plaintext straight to the server pod's app port is captured too, and refused (STRICT).
    // (The client sidecar knows no service at that address and passes it through as plain
    // TCP, as Istio's ALLOW_ANY does; the server pod's capture still sends it to its sidecar.)
    let (_, body) = curl(
        &client,
        &[&format!("http://{}:8080/reviews/0", server.ipv4)],
    );
    assert!(
        !body.contains("\"id\""),
        "plaintext reached the app past STRICT mTLS: {body}"
    );
    // TLS services without VIPs share port 443: the client sidecar reads the ClientHello and
    // picks the service by its server name. Each server's certificate is the only one its
    // client trusts, so a connection that reaches the other server fails.
    for name in ["a", "b"] {
        let host = format!("{name}.example.com");
        let cacert = w.join(format!("{name}.pem"));
        let args = [
            "-f",
            "-o",
            "/dev/null",
            "--cacert",
            cacert.to_str().unwrap(),
            // Any address: the capture hands it to the sidecar, which goes by the name.
            "--resolve",
            &format!("{host}:443:10.78.0.20"),
            &format!("https://{host}/"),
        ];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, out) = curl(&client, &args);
            if ok {
                break;
            }
            procs.check();
            assert!(Instant::now() < deadline, "{host}: {out}\n{}", procs.logs());
            thread::sleep(Duration::from_millis(300));
        }
    }
    // A name no service has: the sidecar closes the connection and counts it.
    let (ok, out) = curl(
        &client,
        &[
            "-k",
            "--resolve",
            "c.example.com:443:10.78.0.20",
            "https://c.example.com/",
        ],
    );
    assert!(!ok, "c.example.com reached something: {out}");
    // An excluded range is reached directly: nothing listens on ext's port 9, and the refusal
    // reaches curl as such. The same port on ext's IPv6 address (not excluded) is captured:
    // the sidecar accepts, cannot connect on, and closes.
    let (ok, out) = curl(&client, &[&format!("http://{}:9/", ext.ipv4)]);
    assert!(!ok && out.contains("curl: (7)"), "excluded range: {out}");
    let (ok, out) = curl(&client, &[&format!("http://[{}]:9/", ext.ipv6)]);
    assert!(!ok && !out.contains("curl: (7)"), "captured: {out}");
    // Captured HTTP that no service takes (ALLOW_ANY) goes where the connection was going,
    // never where its Host header points: ext's server is reached at its own address, and not
    // through a connection to the server pod that names ext in its Host.
    let ext_host = format!("[{}]:8080", ext.ipv6);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = curl(&client, &[&format!("http://{ext_host}/marker")]);
        if body.contains("details: no such page /marker") {
            break;
        }
        procs.check();
        assert!(Instant::now() < deadline, "{body}\n{}", procs.logs());
        thread::sleep(Duration::from_millis(300));
    }
    let (_, body) = curl(
        &client,
        &[
            "-H",
            &format!("Host: {ext_host}"),
            &format!("http://[{}]:8080/marker", server.ipv6),
        ],
    );
    assert!(
        !body.contains("no such page"),
        "a Host header steered passthrough traffic: {body}"
    );
    let (_, metrics) = curl(&client, &["http://127.0.0.1:15000/metrics"]);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hypha_outbound_no_filter_chain_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    if let Some(b) = &attached {
        // The app's connections went to its sidecar at connect, the client sidecar's to the
        // server pod's inbound port, both sidecars learnt the original destinations from
        // the BPF program, and the bytes between them skipped the TCP/IP stack.
        let c = b.counters().unwrap();
        assert!(c.connects_outbound >= 6, "{c:?}");
        assert!(c.connects_inbound >= 1, "{c:?}");
        assert!(
            c.original_dst_answered >= c.connects_outbound + c.connects_inbound,
            "{c:?}"
        );
        assert!(c.messages_redirected > 0 && c.bytes_redirected > 0, "{c:?}");
    }
    drop(procs);
    drop(attached);
    drop((client, server, ext));
    drop(node);
    drop(cgroup);
}

/// Istio's inbound passthrough chains (and the holes they close): in a pod under STRICT,
/// a port no service declares takes mutual TLS only, under the workload's authorization
/// policy, to the pod's own address (never loopback); the sidecar's own ports are closed, and
/// a connection to the capture port does not make the sidecar connect to itself.
#[test]
fn undeclared_ports_take_mutual_tls_under_policy_to_the_pod_address() {
    if !privileged("undeclared_ports_take_mutual_tls_under_policy_to_the_pod_address") {
        return;
    }
    let hypha = env!("CARGO_BIN_EXE_hypha");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Another node range than `mesh_in_pods`, so the two tests can run at once.
    let index = 150 + u8::try_from(std::process::id() % 50).unwrap();
    let node = Node::create(index).unwrap();
    let client = node.pod("client").unwrap();
    let server = node.pod("web").unwrap();
    client.capture(&Capture::default()).unwrap();
    server.capture(&Capture::default()).unwrap();
    config(&w.join("config"), &client, &server, &server);
    std::fs::write(
        w.join("config").join("authz.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-callers, namespace: pods}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [pods.local/ns/pods/sa/client]}}]}]
",
    )
    .unwrap();
    let tokens = join_tokens(w, index, &["client", "web"]);
    let mut procs = Procs(Vec::new());
    let cp = control_plane(&mut procs, &node, w, &tokens);
    // The declared app port; a port no service declares, on every address of both families;
    // and one on the pod's loopback only.
    for (name, listen) in [
        ("app", "0.0.0.0:8080"),
        ("undeclared", "[::]:9090"),
        ("local", "127.0.0.1:9091"),
    ] {
        let mut app = server.command(hypha);
        app.args(["demo-app", "--role", "reviews-v1", "--listen", listen]);
        procs.spawn(name, app, w);
    }
    sidecar(
        &mut procs,
        &client,
        &cp,
        ("client", "client-1", "client"),
        w,
    );
    sidecar(&mut procs, &server, &cp, ("web", "web-1", "web"), w);
    wait_ready(&mut procs, &[&client, &server]);
    // Certificates for curl: the allowed identity, and one the policy does not name.
    let certs = |sa: &str| {
        let out = w.join(format!("cert-{sa}"));
        let issued = Command::new(hypha)
            .args(["ca", "issue", "--config"])
            .arg(w.join("config"))
            .arg("--data-dir")
            .arg(w.join("ca"))
            .args(["--namespace", "pods", "--service-account", sa, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(issued.status.success(), "{issued:?}");
        out
    };
    let (allowed, denied) = (certs("client"), certs("intruder"));
    let mtls = |cert: &Path, url: &str| {
        let chain = cert.join("cert-chain.pem");
        let key = cert.join("key.pem");
        curl(
            &client,
            &[
                "-k",
                "--http1.1",
                "--cert",
                chain.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                url,
            ],
        )
    };
    // The mesh works: the service, over the sidecars' mutual TLS, from the allowed identity.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, body) = curl(&client, &["http://10.78.0.10:8080/reviews/0"]);
        if ok && body.contains("\"id\"") {
            break;
        }
        procs.check();
        assert!(Instant::now() < deadline, "{body}\n{}", procs.logs());
        thread::sleep(Duration::from_millis(300));
    }
    let (s4, s6) = (server.ipv4.to_string(), format!("[{}]", server.ipv6));
    let before = metrics(&server);
    // Plaintext under STRICT, to an undeclared port, a loopback-only port and the sidecar's
    // admin port (on the pod's loopback): refused, all three (the admin port as one of the
    // sidecar's own, before anything else).
    for port in [9090, 9091, 15000] {
        let url = format!("http://{s4}:{port}/ready");
        let (ok, body) = curl(&client, &[&url]);
        assert!(!ok, "plaintext past STRICT to {url}: {body}");
    }
    let after = metrics(&server);
    let refused = "hypha_inbound_plaintext_refused_total";
    assert!(
        counter(&after, refused) >= counter(&before, refused) + 2,
        "{}",
        own_counters(&after)
    );
    // Mutual TLS from the allowed identity reaches the app at the pod's address, both
    // families; not the loopback-only app, which the pod's address does not reach.
    for host in [&s4, &s6] {
        let url = format!("https://{host}:9090/reviews/0");
        let (ok, body) = mtls(&allowed, &url);
        assert!(
            ok && body.contains("\"id\""),
            "{url}: {body}\n{}",
            procs.logs()
        );
    }
    let (ok, body) = mtls(&allowed, &format!("https://{s4}:9091/reviews/0"));
    assert!(!ok, "passthrough reached a loopback-only port: {body}");
    // The policy's TCP rules hold there too: another identity is refused.
    let (ok, body) = mtls(&denied, &format!("https://{s4}:9090/reviews/0"));
    assert!(!ok, "an identity the policy does not allow: {body}");
    assert!(
        counter(&metrics(&server), "hypha_rbac_denied_connections_total") >= 1,
        "no TCP denial counted"
    );
    // The sidecar's own ports, even with an allowed identity: closed.
    let (ok, body) = mtls(&allowed, &format!("https://{s4}:15000/ready"));
    assert!(!ok, "the sidecar's admin port through passthrough: {body}");
    // One connection to the capture port itself: closed, and the sidecar's descriptors stay
    // as they were (the hole: it connected to itself until it ran out).
    let pid = procs.pid("sidecar-web");
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let open = fds();
    for url in [
        format!("http://{s4}:15006/"),
        format!("https://{s4}:15006/"),
    ] {
        let (ok, body) = mtls(&allowed, &url);
        assert!(!ok, "{url}: {body}");
    }
    thread::sleep(Duration::from_millis(500));
    let now = fds();
    assert!(now <= open + 4, "descriptors {open} → {now}");
    let after = metrics(&server);
    assert!(
        counter(&after, "hypha_inbound_blackholed_total") >= 4,
        "{}",
        own_counters(&after)
    );
    procs.check();
}

/// The sidecar's Prometheus metrics in `pod`.
fn metrics(pod: &Pod) -> String {
    curl(pod, &["http://127.0.0.1:15000/metrics"]).1
}

/// Hypha's own counters in `text`, for failure messages.
fn own_counters(text: &str) -> String {
    let own: Vec<&str> = text.lines().filter(|l| l.starts_with("hypha_")).collect();
    own.join("\n")
}

/// An unlabelled counter's value in `text` (0 when absent).
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// One join token per service account of namespace `pods`, in a new `tokens` directory.
fn join_tokens(w: &Path, index: u8, accounts: &[&str]) -> PathBuf {
    let tokens = w.join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    for sa in accounts {
        let path = tokens.join(format!("pods.{sa}.token"));
        std::fs::write(&path, format!("token-{sa}-{index}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    tokens
}

/// Where sidecars find the control plane and what they join with.
struct ControlPlane {
    url: String,
    root: PathBuf,
    tokens: PathBuf,
}

/// The control plane on the node, reachable from the pods through the bridge, with its CA
/// in `w/ca`; returned once it listens and the mesh root is written.
fn control_plane(procs: &mut Procs, node: &Node, w: &Path, tokens: &Path) -> ControlPlane {
    let cp_port = std::net::TcpListener::bind((node.ipv4(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut control = Command::new(env!("CARGO_BIN_EXE_hypha"));
    control
        .args(["control", "--config"])
        .arg(w.join("config"))
        .args(["--listen-tls", &format!("{}:{cp_port}", node.ipv4())])
        .arg("--data-dir")
        .arg(w.join("ca"))
        .arg("--join-tokens")
        .arg(tokens);
    procs.spawn("control", control, w);
    let root = w.join("ca").join("root-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root.exists() || std::net::TcpStream::connect((node.ipv4(), cp_port)).is_err() {
        procs.check();
        assert!(
            Instant::now() < deadline,
            "no control plane:\n{}",
            procs.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
    ControlPlane {
        url: format!("https://{}:{cp_port}", node.ipv4()),
        root,
        tokens: tokens.to_owned(),
    }
}

/// `pod`'s sidecar, capturing both ways, admin on the pod's loopback; `who` is its service
/// account, workload name and `app` label.
fn sidecar(procs: &mut Procs, pod: &Pod, cp: &ControlPlane, who: (&str, &str, &str), w: &Path) {
    let (sa, workload, app) = who;
    let mut sidecar = pod.sidecar_command(env!("CARGO_BIN_EXE_hypha"));
    sidecar
        .args(["proxy", "--control-plane", &cp.url])
        .arg("--ca-root")
        .arg(&cp.root)
        .args(["--trust-domain", "pods.local", "--join-token"])
        .arg(cp.tokens.join(format!("pods.{sa}.token")))
        .args(["--namespace", "pods", "--service-account", sa])
        .args(["--workload", workload, "--label", &format!("app={app}")])
        .args(["--ip", &pod.ipv4.to_string(), "--ip", &pod.ipv6.to_string()])
        .args(["--capture-outbound", "15001", "--capture-inbound", "15006"])
        .args(["--admin", "127.0.0.1:15000"]);
    procs.spawn(&format!("sidecar-{}", pod.name), sidecar, w);
}

/// Waits until every pod's sidecar says it is ready.
fn wait_ready(procs: &mut Procs, pods: &[&Pod]) {
    for pod in pods {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            procs.check();
            if curl(pod, &["-f", "http://127.0.0.1:15000/ready"]).0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready:\n{}",
                pod.name,
                procs.logs()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}
