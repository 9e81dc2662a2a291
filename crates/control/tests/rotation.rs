//! What a root rotation waits for: new signer roots pushed as every proxy's `ROOTCA` bundle,
//! and `trust_acknowledged` true only once every connected proxy (delta or state of the world)
//! has acknowledged the bundle it was last sent; a NACK or silence keeps it waiting. And the
//! rotation gauges of `/metrics`.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use hypha_control::mtls::{SignerRoots, ROOTCA};
use hypha_control::{initial_config, ControlPlane};
use hypha_xds::{type_url, DeltaClient, SotwClient};

const WAIT: Duration = Duration::from_secs(10);

fn node(ns: &str, workload: &str, ip: &str) -> Node {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    let field = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    Node {
        id: format!("sidecar~{ip}~{workload}.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(Struct {
            fields: [
                ("NAMESPACE".to_owned(), field(ns)),
                ("WORKLOAD_NAME".to_owned(), field(workload)),
            ]
            .into(),
        }),
        ..Default::default()
    }
}

fn roots(bookinfo: &str) -> SignerRoots {
    let mut r = SignerRoots::new();
    r.insert("bookinfo".into(), bookinfo.into());
    r.insert("default".into(), "default root\n".into());
    r
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let until = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < until, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next update of the secrets, other types acknowledged on the way.
async fn next_secret(c: &mut DeltaClient) -> hypha_xds::Update {
    loop {
        let u = tokio::time::timeout(WAIT, c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if u.type_url == type_url::SECRET {
            return u;
        }
        c.ack_or_nack(&u, Ok(())).await.unwrap();
    }
}

async fn next_sotw_secret(
    c: &mut SotwClient,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    loop {
        let r = tokio::time::timeout(WAIT, c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if r.type_url == type_url::SECRET {
            return r;
        }
        c.ack(&r).await.unwrap();
    }
}

#[tokio::test]
async fn a_new_bundle_counts_as_in_force_once_every_proxy_acknowledged_it() {
    let cp = ControlPlane::with_mtls(initial_config(None).unwrap(), roots("old root\n"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    assert!(cp.trust_acknowledged().everywhere(), "no proxy yet");

    let mut delta = DeltaClient::connect(uri.clone(), node("bookinfo", "reviews-v1", "10.9.0.1"))
        .await
        .unwrap();
    delta.subscribe(type_url::SECRET, [ROOTCA]).await.unwrap();
    let first = next_secret(&mut delta).await;
    let waiting = cp.trust_acknowledged();
    assert_eq!(waiting.proxies, 1);
    assert!(!waiting.everywhere(), "sent, not yet acknowledged");
    delta.ack_or_nack(&first, Ok(())).await.unwrap();
    eventually("the delta proxy's ACK counts", || {
        cp.trust_acknowledged().everywhere()
    })
    .await;

    let mut sotw = SotwClient::connect(uri.clone(), node("bookinfo", "details-v1", "10.9.0.2"))
        .await
        .unwrap();
    sotw.subscribe(type_url::SECRET, vec![ROOTCA.to_owned()])
        .await
        .unwrap();
    let sotw_first = next_sotw_secret(&mut sotw).await;
    assert!(!cp.trust_acknowledged().everywhere());
    sotw.ack(&sotw_first).await.unwrap();
    eventually("both ACKs count", || {
        let t = cp.trust_acknowledged();
        t.proxies == 2 && t.everywhere()
    })
    .await;

    // A rotation's first phase: both roots in the bookinfo bundle, pushed to both.
    let g = cp.set_signer_roots(roots("old root\nnew root\n"));
    assert_eq!((g.proxies, g.changed), (2, 2));
    let t = cp.trust_acknowledged();
    assert_eq!(t.waiting.len(), 2, "{t:?}");

    let update = next_secret(&mut delta).await;
    let secret = &update.resources[0];
    assert!(
        String::from_utf8_lossy(&secret.body.value).contains("new root"),
        "the new bundle holds the new root"
    );
    // A NACK is no acknowledgement.
    delta
        .ack_or_nack(&update, Err("refused on purpose".into()))
        .await
        .unwrap();
    let sotw_update = next_sotw_secret(&mut sotw).await;
    sotw.ack(&sotw_update).await.unwrap();
    eventually("the SotW proxy's ACK counts", || {
        cp.trust_acknowledged().waiting.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = cp.trust_acknowledged();
    assert_eq!(t.waiting, [node("bookinfo", "reviews-v1", "10.9.0.1").id]);

    // A proxy that goes away is not waited for.
    drop(delta);
    eventually("a closed stream is not waited for", || {
        let t = cp.trust_acknowledged();
        t.proxies == 1 && t.everywhere()
    })
    .await;
}

#[test]
fn metrics_show_each_signers_phase() {
    use hypha_ca::rotation::{Phase, Rotation, RotationState};
    let cp = ControlPlane::new(initial_config(None).unwrap());
    let states = vec![
        (
            "bookinfo".to_owned(),
            RotationState {
                generation: 0,
                rotation: Some(Rotation {
                    to: 1,
                    phase: Phase::Issuing,
                    started: 100,
                    switched: Some(110),
                    retire_after: Some(200),
                }),
                last: None,
            },
        ),
        ("default".to_owned(), RotationState::default()),
    ];
    let text = hypha_control::rotation::metrics(&states);
    cp.add_metrics(std::sync::Arc::new(move || text.clone()));
    let m = cp.metrics();
    for line in [
        "hypha_control_generation 1",
        "hypha_control_proxies 0",
        "hypha_ca_rotation_phase{signer=\"bookinfo\",phase=\"issuing\"} 1",
        "hypha_ca_rotation_phase{signer=\"bookinfo\",phase=\"distributing\"} 0",
        "hypha_ca_rotation_phase{signer=\"default\",phase=\"idle\"} 1",
        "hypha_ca_signing_generation{signer=\"bookinfo\"} 1",
        "hypha_ca_signing_generation{signer=\"default\"} 0",
        "hypha_ca_rotation_retire_after_seconds{signer=\"bookinfo\"} 200",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
}
