//! `hypha demo` end to end with the real binary: the control plane, six apps, eight sidecars as
//! separate processes on loopback, 60 page views, and the summary checked against the bookinfo
//! routing rules, the identities the CA issued, mutual TLS on every hop, and the refusals
//! (another tenant, ratings' authorization policy). Also checks that no process outlives the demo.

use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_bookinfo_through_the_mesh() {
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let opts = hypha_demo::Options {
        exe: env!("CARGO_BIN_EXE_hypha").into(),
        requests: 60,
        concurrency: 8,
        serve: false,
        keys: hypha_demo::Keys::Software,
        dir: None,
        progress: Arc::new(move |line: &str| {
            eprintln!("{line}");
            sink.lock().unwrap().push(line.to_owned());
        }),
    };
    let s = tokio::time::timeout(Duration::from_secs(90), hypha_demo::run(opts))
        .await
        .expect("the demo finishes in time")
        .unwrap_or_else(|e| panic!("the demo failed: {e}"));

    // Every page view, nearly all successful (details' deliberate failures are retried).
    assert_eq!(s.pages, 60);
    assert!(s.success_rate() >= 0.9, "success {}", s.success_rate());
    assert_eq!(s.sent["page (jason)"], 20);

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

    // Every process the demo started is gone (killed and reaped).
    let lines = lines.lock().unwrap();
    let pids: Vec<u32> = lines
        .iter()
        .filter(|l| l.starts_with("started "))
        .filter_map(|l| {
            l.split("pid ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(pids.len(), 15, "{lines:?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists"
        );
    }
}
