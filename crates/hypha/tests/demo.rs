//! `hypha demo` end to end with the real binary: the control plane, six apps, eight sidecars as
//! separate processes on loopback, page views, and the summary checked against the bookinfo
//! routing rules, the identities the CA issued, mutual TLS on every hop, and the refusals
//! (another tenant, ratings' authorization policy). Also checks that no process outlives the
//! demo. Twice: with software keys, and with every key in a SoftHSM2 token (`--keys pkcs11`),
//! where no file the demo leaves holds a private key outside the tokens' own stores. As root
//! (CI), also in pods (`--pods`): every workload captured, the bypass on, an unmodified curl.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypha_demo::{Keys, Placement, Summary};

/// Page views per run (a few seconds; the token's signatures cost little next to that).
const PAGES: usize = 60;

/// Fifteen processes each: one demo at a time, so that neither starves the other of the
/// machine's cores and runs out of time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh directory under the system temp dir, removed when dropped unless the test failed
/// (the demo's logs are in it).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the demo's files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs the demo on loopback into `dir` (kept afterwards); its summary and progress lines.
async fn demo(keys: Keys, requests: usize, dir: &Path) -> (Summary, Vec<String>) {
    demo_in(Placement::Loopback, keys, requests, dir).await
}

async fn demo_in(
    placement: Placement,
    keys: Keys,
    requests: usize,
    dir: &Path,
) -> (Summary, Vec<String>) {
    demo_with(placement, false, keys, requests, dir).await
}

async fn demo_with(
    placement: Placement,
    kubernetes: bool,
    keys: Keys,
    requests: usize,
    dir: &Path,
) -> (Summary, Vec<String>) {
    demo_rotating(placement, kubernetes, keys, requests, dir, None).await
}

async fn demo_rotating(
    placement: Placement,
    kubernetes: bool,
    keys: Keys,
    requests: usize,
    dir: &Path,
    rotate_root: Option<&str>,
) -> (Summary, Vec<String>) {
    let _one = ONE_AT_A_TIME.lock().await;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let opts = hypha_demo::Options {
        exe: env!("CARGO_BIN_EXE_hypha").into(),
        requests,
        concurrency: 8,
        serve: false,
        keys,
        placement,
        kubernetes,
        rotate_root: rotate_root.map(str::to_owned),
        dir: Some(dir.to_path_buf()),
        progress: Arc::new(move |line: &str| {
            eprintln!("{line}");
            sink.lock().unwrap().push(line.to_owned());
        }),
    };
    // A rotation lasts a certificate lifetime (20 s) past the switch.
    let patience = Duration::from_secs(if rotate_root.is_some() { 180 } else { 90 });
    let s = tokio::time::timeout(patience, hypha_demo::run(opts))
        .await
        .expect("the demo finishes in time")
        .unwrap_or_else(|e| panic!("the demo failed: {e}"));
    let lines = lines.lock().unwrap().clone();
    (s, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_bookinfo_through_the_mesh() {
    let dir = TempDir::new("hypha-demo-test-software");
    let (s, lines) = demo(Keys::Software, PAGES, &dir.0).await;
    bookinfo_went_through_the_mesh(&s);
    all_processes_gone(&lines);

    // Software keys: each sidecar's in its memory, the CA's in 0600 files, which the scan
    // below finds (what shows the scan of the pkcs11 run can find a key at all).
    for (workload, _, _, key) in &s.identities {
        assert_eq!(key, "software ECDSA", "{workload}");
    }
    let signers: Vec<&str> = s.signers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(signers, ["bookinfo", "default"], "{:?}", s.signers);
    assert_eq!(s.control_key, "software ECDSA");
    for (signer, key) in &s.signers {
        assert!(
            key.starts_with("software, key file (0600)"),
            "{signer}: {key}"
        );
    }
    let mut found = private_keys_in(&dir.0, None);
    found.sort();
    let ca = dir.0.join("ca");
    assert_eq!(
        found,
        [
            ca.join("bookinfo/ca-key.pem"),
            ca.join("default/ca-key.pem")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_bookinfo_on_kubernetes() {
    let dir = TempDir::new("hypha-demo-test-kubernetes");
    let (s, lines) = demo_with(Placement::Loopback, true, Keys::Software, PAGES, &dir.0).await;
    // The same mesh as from files: routes, faults, retries, identities, refusals, mTLS, and
    // metrics labelled with the Deployments' names.
    bookinfo_went_through_the_mesh(&s);
    all_processes_gone(&lines);
    assert!(s.kubernetes);
    assert!(
        s.to_string()
            .contains("a pod's: its service-account token, checked by TokenReview"),
        "{s}"
    );
    for want in [
        "kubernetes: test API server at http://127.0.0.1:",
        "pods: 6 made by the Deployment controller",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "{want}: {lines:?}"
        );
    }
    // The workloads had nothing but their pods' tokens: join tokens exist for the two
    // clients (outside the cluster) only, a bound service-account token for each pod.
    let tokens = names_in(&dir.0.join("tokens"));
    let (pods, joins): (Vec<&String>, Vec<&String>) =
        tokens.iter().partition(|n| n.ends_with(".istio-token"));
    assert_eq!(joins, ["bookinfo.default.token", "guest.default.token"]);
    assert_eq!(pods.len(), 6, "{pods:?}");
    // The control plane read the cluster with only its RBAC role, and the mesh from files was
    // the MeshConfig alone.
    assert_eq!(names_in(&dir.0.join("config")), ["mesh.yaml"]);
    let control = std::fs::read_to_string(dir.0.join("logs/control.log")).unwrap();
    assert!(!control.contains("forbidden"), "{control}");
}

/// `hypha demo --rotate-root bookinfo`: the bookinfo tenant's root rotated end to end while
/// page views flow: no request fails, every bookinfo sidecar ends on the new root, no bundle
/// keeps the old one, the other tenant is untouched, and the old key file is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_rotates_a_tenants_root_under_load() {
    let dir = TempDir::new("hypha-demo-test-rotation");
    let (s, lines) = demo_rotating(
        Placement::Loopback,
        false,
        Keys::Software,
        PAGES,
        &dir.0,
        Some("bookinfo"),
    )
    .await;
    all_processes_gone(&lines);
    let r = s.rotation.as_ref().expect("a rotation report");
    let text = s.to_string();
    assert_eq!(r.signer, "bookinfo");
    assert!(!r.old_root.is_empty() && !r.new_root.is_empty() && r.old_root != r.new_root);
    // Three phases in order, the issuing one ending a certificate lifetime after it began.
    let phases: Vec<&str> = r
        .phases
        .iter()
        .map(|(p, _)| p.split(':').next().unwrap())
        .collect();
    assert_eq!(phases, ["phase 1", "phase 2", "phase 3"], "{text}");
    let issuing = r.phases[2].1 - r.phases[1].1;
    assert!(issuing >= Duration::from_secs(19), "{issuing:?}: {text}");
    // Under load, nothing failed but what the demo breaks on purpose (details fails every
    // tenth request; once in thousands of page views every retry lands on one).
    assert!(r.pages >= 50, "{text}");
    assert!(r.failures.is_empty(), "{text}");
    assert_eq!(r.pages_ok + r.deliberate, r.pages, "{text}");
    assert!(r.deliberate * 500 <= r.pages, "{text}");
    // Every bookinfo sidecar (six workloads and the demo client) chains to the new root; no
    // bundle holds the old one; the guest tenant neither moved nor trusts bookinfo's root.
    assert_eq!(r.sidecars.len(), 8, "{text}");
    assert!(r.old_root_left().is_empty(), "{text}");
    let mut on_new = r.on_new_root();
    on_new.sort_unstable();
    assert_eq!(
        on_new,
        [
            "demo-client",
            "details-v1",
            "productpage-v1",
            "ratings-v1",
            "reviews-v1",
            "reviews-v2",
            "reviews-v3"
        ],
        "{text}"
    );
    let (guest_roots, guest_chain) = &r.sidecars["guest-client"];
    assert!(!guest_roots.contains(&r.new_root) && guest_chain != &r.new_root);
    // The retired key is gone; the new generation's is in place; the other signer's is kept.
    let ca = dir.0.join("ca");
    assert!(!ca.join("bookinfo/ca-key.pem").exists());
    assert!(ca.join("bookinfo/gen-1/ca-key.pem").exists());
    assert!(ca.join("default/ca-key.pem").exists());
    // `hypha ca status` says so.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypha"))
        .args(["ca", "status", "--config"])
        .arg(dir.0.join("config"))
        .arg("--data-dir")
        .arg(&ca)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("none under way; generation 1 signs (last rotation: generation 0 -> 1"),
        "{status}"
    );
    assert!(status.contains(&r.new_root), "{status}");
    assert!(!status.contains(&r.old_root), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_every_key_in_a_pkcs11_token() {
    if !hypha_keys::softhsm::available_for_tests() {
        return;
    }
    let dir = TempDir::new("hypha-demo-test-pkcs11");
    let (s, lines) = demo(Keys::Pkcs11, PAGES, &dir.0).await;
    bookinfo_went_through_the_mesh(&s);
    all_processes_gone(&lines);

    // A token per process, made by the demo.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("keys: 9 SoftHSM2 tokens created")),
        "{lines:?}"
    );

    // Each sidecar says its key is in its own token; the control plane, that both signers'
    // keys are in its token.
    assert_eq!(s.identities.len(), 8);
    for (workload, _, _, key) in &s.identities {
        assert_eq!(
            key,
            &format!("PKCS#11 token \"hypha-{workload}\" ECDSA P-256"),
            "{workload}"
        );
    }
    // The control plane's own serving key too.
    assert_eq!(s.control_key, "PKCS#11 token \"hypha-control\" ECDSA P-256");
    assert_eq!(
        s.signers,
        [
            (
                "bookinfo".to_owned(),
                "PKCS#11 token \"hypha-control\", key \"bookinfo-ca\"".to_owned()
            ),
            (
                "default".to_owned(),
                "PKCS#11 token \"hypha-control\", key \"default-ca\"".to_owned()
            ),
        ]
    );
    let text = s.to_string();
    assert!(
        text.contains("key: PKCS#11 token \"hypha-productpage-v1\" ECDSA P-256"),
        "{text}"
    );
    assert!(
        text.contains("CA signer bookinfo  key: PKCS#11 token \"hypha-control\""),
        "{text}"
    );

    // No private key in clear anywhere the demo wrote, logs included: only the CA
    // certificates in the CA's directory, and SoftHSM2's stores (the tokens themselves) hold
    // the keys, where the CA's persistent keys are token objects.
    let hsm = dir.0.join("hsm");
    let store = hsm.join(hypha_demo::hsm::STORE);
    assert_eq!(private_keys_in(&dir.0, Some(&store)), Vec::<PathBuf>::new());
    for signer in ["bookinfo", "default"] {
        let files = names_in(&dir.0.join("ca").join(signer));
        assert_eq!(files, ["ca-cert.pem"], "{signer}");
    }
    let control_objects = files_under(&store.join("control"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "object"))
        .count();
    // token.object, and a private and a public key object per signer.
    assert!(control_objects >= 5, "{control_objects} objects");

    // The PINs are in their 0600 files only: never in the progress, summary or logs.
    use std::os::unix::fs::PermissionsExt;
    let logs = files_under(&dir.0.join("logs"));
    for pin_file in files_under(&hsm)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pin"))
    {
        let mode = std::fs::metadata(&pin_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", pin_file.display());
        let pin = std::fs::read_to_string(&pin_file).unwrap();
        assert!(pin.trim().len() >= 16);
        assert!(!text.contains(pin.trim()));
        assert!(!lines.iter().any(|l| l.contains(pin.trim())));
        for log in &logs {
            let content = std::fs::read_to_string(log).unwrap();
            assert!(!content.contains(pin.trim()), "{}", log.display());
        }
    }
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The names of the files in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The files under `dir` (but not under `skip`) with PEM private key material.
fn private_keys_in(dir: &Path, skip: Option<&Path>) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| skip.is_none_or(|s| !p.starts_with(s)))
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap();
            // `-----BEGIN PRIVATE KEY-----`, `... EC PRIVATE KEY-----`, `... RSA ...`,
            // `... ENCRYPTED PRIVATE KEY-----`.
            bytes.windows(16).any(|w| w == b"PRIVATE KEY-----")
        })
        .collect()
}

/// What the demo's summary must show after [`PAGES`] page views, whatever the keys.
fn bookinfo_went_through_the_mesh(s: &Summary) {
    // Every page view, nearly all successful (details' deliberate failures are retried).
    assert_eq!(s.pages, PAGES);
    assert!(s.success_rate() >= 0.9, "success {}", s.success_rate());
    assert_eq!(s.sent["page (jason)"], PAGES / 3);

    // jason always gets reviews v2; everyone else the canary: v1 and v3.
    let jason: usize = s.jason.values().sum();
    assert!(jason > 0);
    assert_eq!(s.jason.get("reviews-v2"), Some(&jason), "{:?}", s.jason);
    assert!(s.anonymous.contains_key("reviews-v1"), "{:?}", s.anonymous);
    assert!(s.anonymous.contains_key("reviews-v3"), "{:?}", s.anonymous);
    assert!(!s.anonymous.contains_key("reviews-v2"), "{:?}", s.anonymous);
    assert!(s.anonymous["reviews-v1"] > s.anonymous["reviews-v3"]);

    // The sidecar's own answers and the rewrite.
    assert_eq!(s.health.get("ok"), Some(&s.sent["/healthz"]));
    assert_eq!(
        s.redirects
            .get("http://productpage.bookinfo.svc.cluster.local:9080/productpage"),
        Some(&s.sent["/index.html"])
    );
    assert_eq!(s.legacy_rewritten, s.sent["/legacy/productpage"]);

    // Trace headers reached details, reviews and ratings on every successful page.
    assert_eq!(s.traced, s.pages_ok);

    // The gRPC hop: reviews v2/v3 called ratings for each of their pages.
    let with_stars = jason + s.anonymous["reviews-v3"];
    assert_eq!(s.ratings_calls, with_stars);
    assert_eq!(s.ratings_failed, 0, "only the injected aborts fail");

    // details fails one try in ten; the route's retries hide it from productpage.
    let details = s.calls("details");
    assert!(details.failed_tries >= 4.0, "{details:?}");
    assert!(details.retries() >= details.failed_tries, "{details:?}");
    assert_eq!(details.errors, 0.0, "{details:?}");

    // Every sidecar got its own identity from its tenant's signer: bookinfo's, and the
    // default tenant's for the guest.
    assert_eq!(s.identities.len(), 8, "{:?}", s.identities);
    for (workload, id, root, _) in &s.identities {
        let app = workload.split('-').next().unwrap();
        let (want, tenant) = match workload.as_str() {
            "demo-client" => (
                "spiffe://cluster.local/ns/bookinfo/sa/default".to_owned(),
                "bookinfo",
            ),
            "guest-client" => (
                "spiffe://cluster.local/ns/guest/sa/default".to_owned(),
                "default",
            ),
            _ => (
                format!("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-{app}"),
                "bookinfo",
            ),
        };
        assert_eq!(id, &want, "{workload}");
        assert!(root.ends_with(tenant), "{workload}: {root}");
    }

    // The mesh refused what its config forbids: the other tenant's calls (no shared root:
    // the handshake fails) and calls to ratings from anyone but reviews (403).
    let refused = |who: &str, target: &str| -> Vec<(String, usize)> {
        s.denials
            .iter()
            .filter(|((w, t, _), _)| w == who && t == target)
            .map(|((_, _, outcome), n)| (outcome.clone(), *n))
            .collect()
    };
    assert_eq!(
        refused("guest-client", "productpage"),
        [("503 UF".to_owned(), 3)]
    );
    assert_eq!(
        refused("demo-client", "ratings"),
        [("403 \"RBAC: access denied\"".to_owned(), 3)]
    );

    // Every hop between sidecars was mutual TLS, and each server saw its real caller.
    assert!(!s.security.is_empty());
    for ((workload, principal, policy), v) in &s.security {
        assert_eq!(policy, "mutual_tls", "{workload} ← {principal} ×{v}");
        let caller = principal.rsplit("/sa/").next().unwrap();
        if workload == "ratings-v1" && caller == "default" {
            assert_eq!(*v, 3.0, "only the refused direct calls");
            continue;
        }
        let want = match workload.split('-').next().unwrap() {
            "productpage" => "default",
            "details" | "reviews" => "bookinfo-productpage",
            "ratings" => "bookinfo-reviews",
            other => panic!("unexpected workload {other}"),
        };
        assert_eq!(caller, want, "{workload} ← {principal}");
    }

    // The sidecars' metrics agree with what the apps reported.
    let v2 = s
        .source_metrics
        .iter()
        .filter(|((src, svc, version, code, _), _)| {
            src == "productpage-v1"
                && svc == "reviews.bookinfo.svc.cluster.local"
                && version == "v2"
                && code == "200"
        })
        .map(|(_, v)| *v)
        .sum::<f64>();
    assert!(v2 >= jason as f64, "{:?}", s.source_metrics);
    let aborted: f64 = s
        .source_metrics
        .iter()
        // gRPC: the abort is a trailers-only reply (HTTP 200, grpc-status 14) with flag FI.
        .filter(|((_, svc, _, _, flags), _)| {
            svc == "ratings.bookinfo.svc.cluster.local" && flags == "FI"
        })
        .map(|(_, v)| *v)
        .sum();
    assert!(aborted >= s.ratings_aborted as f64);
    let text = s.to_string();
    assert!(text.contains("success"), "{text}");
}

/// Every process the demo started is gone (killed and reaped).
fn all_processes_gone(lines: &[String]) {
    processes_gone(lines, 15);
}

/// The `count` processes the demo says it started are gone, and so is every earlier attempt
/// at one of them (the demo starts a process again when another program took its port).
fn processes_gone(lines: &[String], count: usize) {
    let started: Vec<(&str, u32)> = lines
        .iter()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("started ")?.split_once(" pid ")?;
            let pid = rest.split_whitespace().next()?.parse().ok()?;
            Some((name.trim(), pid))
        })
        .collect();
    let names: std::collections::BTreeSet<&str> = started.iter().map(|(n, _)| *n).collect();
    assert_eq!(names.len(), count, "{lines:?}");
    for (name, pid) in started {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name}: process {pid} still exists"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_batched_rsa_signatures() {
    let dir = TempDir::new("hypha-demo-test-cryptomb");
    let (s, lines) = demo(Keys::Cryptomb, PAGES, &dir.0).await;
    bookinfo_went_through_the_mesh(&s);
    all_processes_gone(&lines);
    // Every sidecar's RSA-2048 key signs through the batcher (or, on a CPU without AVX-512
    // IFMA, falls back to BoringSSL as the demo's ProxyConfig allows).
    let expected = if hypha_rsa_mb::Engine::detect().is_accelerated() {
        "multi-buffer RSA-2048 (avx512ifma, poll delay 2ms)"
    } else {
        eprintln!("NOTE: no AVX-512 IFMA on this CPU: the demo's sidecars fall back to BoringSSL");
        "software RSA-2048"
    };
    assert_eq!(s.identities.len(), 8);
    for (workload, _, _, key) in &s.identities {
        assert_eq!(key, expected, "{workload}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("privateKeyProvider.cryptomb")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_in_pods_with_capture_and_bypass() {
    if !hypha_testkit::privileged("demo_in_pods_with_capture_and_bypass") {
        return;
    }
    let dir = TempDir::new("hypha-demo-test-pods");
    let (s, lines) = demo_in(Placement::PodsWithBypass, Keys::Software, PAGES, &dir.0).await;
    // The same mesh behaviour as on loopback: routes, faults, retries, identities, refusals,
    // mutual TLS on every hop, now with every app unmodified and its traffic captured.
    bookinfo_went_through_the_mesh(&s);
    // Fifteen processes and the bypass.
    processes_gone(&lines, 16);
    let pods = s.pods.as_ref().expect("a pods report");
    assert_eq!(pods.pods.len(), 8, "{pods:?}");
    // An unmodified curl in the client pod reached productpage by its name.
    assert_eq!(pods.curl, "200", "{pods}");
    // Admin and the client proxies listen on each pod's loopback (the demo reached them from
    // inside the pods): nothing answers on those ports at a pod's address.
    assert!(pods.open_on_pod_addresses.is_empty(), "{pods}");
    // The bypass was on: the apps' connections were captured at connect, the sidecars asked it
    // for the original destinations, and bytes went socket to socket.
    assert!(pods.bypass_cgroup.is_some(), "{pods}");
    let c = |name: &str| pods.counter(name);
    assert!(c("hypha_bypass_connects_outbound_total") >= 3, "{pods}");
    assert!(c("hypha_bypass_connects_inbound_total") >= 3, "{pods}");
    assert!(
        c("hypha_bypass_original_dst_answered_total") >= c("hypha_bypass_connects_outbound_total"),
        "{pods}"
    );
    assert!(c("hypha_bypass_bytes_redirected_total") > 100_000, "{pods}");
    let text = s.to_string();
    assert!(
        text.contains("an unmodified curl in the demo-client pod"),
        "{text}"
    );
    // Nothing is left behind: the pods, their /etc/netns files, the bridge, the cgroup.
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    for (_, ns, _, _) in &pods.pods {
        assert!(!netns.contains(ns.as_str()), "{ns} left: {netns}");
        assert!(
            !Path::new("/etc/netns").join(ns).exists(),
            "{ns}'s /etc/netns"
        );
    }
    assert!(
        !Path::new("/sys/class/net").join(&pods.bridge).exists(),
        "{} left",
        pods.bridge
    );
    let cgroup = pods.bypass_cgroup.as_ref().unwrap();
    assert!(!Path::new(cgroup).exists(), "{cgroup} left");
}
