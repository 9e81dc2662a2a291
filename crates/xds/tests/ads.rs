//! End-to-end tests of the ADS server and clients over real gRPC on `127.0.0.1:0`.
//!
//! "Nothing else was sent" is proven with a probe: a request for a fresh, unknown type URL,
//! which the server always answers. The server handles a stream's requests and snapshot
//! changes one at a time and queues each batch of responses in order, so when the probe's
//! answer is the next message, no other response was pending.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, Node, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use hypha_xds::type_url::{CLUSTER, ENDPOINT, LISTENER};
use hypha_xds::{
    AdsServer, AdsStats, ClientError, DeltaClient, Resource, Snapshot, SnapshotSource, SotwClient,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Status, Streaming};

const PROBE: &str = "type.googleapis.com/hypha.test.Probe";

/// Every await that depends on the server goes through this, so a hang fails the test.
async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out waiting for the xDS server")
}

struct Source(watch::Sender<Arc<Snapshot>>);

impl SnapshotSource for Source {
    fn watch(
        &self,
        _node: &Node,
        _connection: &tonic::Extensions,
    ) -> Result<watch::Receiver<Arc<Snapshot>>, Status> {
        Ok(self.0.subscribe())
    }
}

struct Harness {
    uri: String,
    stats: Arc<AdsStats>,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Harness {
    async fn start(snapshot: Snapshot) -> Harness {
        let (snapshots, _) = watch::channel(Arc::new(snapshot));
        let server = AdsServer::new(Arc::new(Source(snapshots.clone())));
        let stats = server.stats();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server.into_service())
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Harness {
            uri,
            stats,
            snapshots,
        }
    }

    fn publish(&self, snapshot: Snapshot) {
        self.snapshots.send_replace(Arc::new(snapshot));
    }
}

fn node(id: &str) -> Node {
    Node {
        id: id.to_owned(),
        ..Default::default()
    }
}

/// A cluster whose content (and so version) changes with `timeout`.
fn cluster(name: &str, timeout: i64) -> Resource {
    let cluster = Cluster {
        name: name.to_owned(),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: timeout,
            nanos: 0,
        }),
        ..Default::default()
    };
    Resource::encode(name, &cluster)
}

fn endpoints(name: &str, port: u32) -> Resource {
    let address = Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "10.0.0.1".to_owned(),
            port_specifier: Some(PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    };
    let endpoint = LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
            address: Some(address),
            ..Default::default()
        })),
        ..Default::default()
    };
    let cla = ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![endpoint],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::encode(name, &cla)
}

fn listener(name: &str) -> Resource {
    let listener = Listener {
        name: name.to_owned(),
        ..Default::default()
    };
    Resource::encode(name, &listener)
}

fn snapshot(version: &str, resources: impl IntoIterator<Item = Resource>) -> Snapshot {
    let mut snapshot = Snapshot::new(version);
    for r in resources {
        snapshot.insert(r);
    }
    snapshot
}

/// Names of the resources in a SotW response, decoded from the protos themselves.
fn sotw_names(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            CLUSTER => Cluster::decode(&*any.value).unwrap().name,
            ENDPOINT => {
                ClusterLoadAssignment::decode(&*any.value)
                    .unwrap()
                    .cluster_name
            }
            other => panic!("unexpected type {other}"),
        })
        .collect()
}

fn delta_names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

async fn sotw_next(client: &mut SotwClient) -> DiscoveryResponse {
    within(client.next()).await.unwrap().expect("stream ended")
}

/// Asserts that nothing but the answer to probe `n` is pending on the stream.
async fn sotw_probe(client: &mut SotwClient, n: u32) {
    let probe = format!("{PROBE}{n}");
    client.subscribe(&probe, Vec::new()).await.unwrap();
    let response = sotw_next(client).await;
    assert_eq!(
        response.type_url, probe,
        "unexpected response before the probe"
    );
    assert!(response.resources.is_empty());
}

/// A delta stream driven request by request.
struct RawDelta {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl RawDelta {
    async fn open(uri: &str) -> RawDelta {
        let mut client = within(AggregatedDiscoveryServiceClient::connect(uri.to_owned()))
            .await
            .unwrap();
        let (requests, rx) = mpsc::channel(16);
        let responses = within(client.delta_aggregated_resources(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        RawDelta {
            requests,
            responses,
        }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        within(self.requests.send(request)).await.unwrap();
    }

    async fn subscribe(&self, node: Option<Node>, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_owned(),
            resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        within(self.responses.message())
            .await
            .unwrap()
            .expect("stream ended")
    }

    async fn reply(&self, response: &DeltaDiscoveryResponse, error: Option<&str>) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: 3,
                message: message.to_owned(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .await;
    }

    async fn probe(&mut self, n: u32) {
        let probe = format!("{PROBE}{n}");
        self.subscribe(None, &probe, &[]).await;
        let response = self.next().await;
        assert_eq!(
            response.type_url, probe,
            "unexpected response before the probe"
        );
        assert!(response.resources.is_empty() && response.removed_resources.is_empty());
    }

    fn versions(response: &DeltaDiscoveryResponse) -> HashMap<String, String> {
        let versions = response.resources.iter();
        versions
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    }
}

#[tokio::test]
async fn sotw_fetch_ack_and_push_only_the_changed_type() {
    let h = Harness::start(snapshot(
        "v1",
        [
            cluster("a", 1),
            cluster("b", 1),
            endpoints("a", 80),
            endpoints("b", 80),
        ],
    ))
    .await;
    let mut c = within(SotwClient::connect(h.uri.clone(), node("n1")))
        .await
        .unwrap();

    c.subscribe(CLUSTER, Vec::new()).await.unwrap();
    let cds = sotw_next(&mut c).await;
    assert_eq!(
        (cds.type_url.as_str(), sotw_names(&cds)),
        (CLUSTER, vec!["a".into(), "b".into()])
    );
    c.ack(&cds).await.unwrap();

    c.subscribe(ENDPOINT, vec!["a".into()]).await.unwrap();
    let eds = sotw_next(&mut c).await;
    assert_eq!(
        (eds.type_url.as_str(), sotw_names(&eds)),
        (ENDPOINT, vec!["a".into()])
    );
    assert_ne!(eds.nonce, cds.nonce);
    c.ack(&eds).await.unwrap();
    sotw_probe(&mut c, 0).await;
    assert_eq!(h.stats.acks(), 2);

    // Endpoint "b" is not subscribed: its change alone sends nothing. Endpoint "a" changes
    // next (the two snapshots may be coalesced); only EDS goes out, with a new version.
    h.publish(snapshot(
        "v2",
        [
            cluster("a", 1),
            cluster("b", 1),
            endpoints("a", 80),
            endpoints("b", 81),
        ],
    ));
    h.publish(snapshot(
        "v3",
        [
            cluster("a", 1),
            cluster("b", 1),
            endpoints("a", 81),
            endpoints("b", 81),
        ],
    ));
    let eds2 = sotw_next(&mut c).await;
    assert_eq!(
        (eds2.type_url.as_str(), sotw_names(&eds2)),
        (ENDPOINT, vec!["a".into()])
    );
    assert_ne!(eds2.version_info, eds.version_info);
    assert_eq!(eds2.resources[0].value, endpoints("a", 81).body.value);
    c.ack(&eds2).await.unwrap();

    // A NACK carrying a superseded nonce is stale: neither counted nor remembered.
    c.nack(&eds, "stale").await.unwrap();
    sotw_probe(&mut c, 1).await;
    assert_eq!((h.stats.acks(), h.stats.nacks()), (3, 0));
}

/// Collects formatted log lines so a test can check what an operator would see.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn sotw_nacked_content_is_never_resent_to_that_node() {
    // A current-thread runtime runs the server tasks on this thread, under this subscriber.
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = Harness::start(snapshot("v1", [cluster("bad", 1)])).await;
    let mut c = within(SotwClient::connect(h.uri.clone(), node("n1")))
        .await
        .unwrap();
    c.subscribe(CLUSTER, Vec::new()).await.unwrap();
    let rejected = sotw_next(&mut c).await;
    c.nack(&rejected, "cluster bad: no endpoints")
        .await
        .unwrap();
    sotw_probe(&mut c, 0).await;
    assert_eq!((h.stats.nacks(), h.stats.acks()), (1, 0));
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let nack = logged
        .lines()
        .find(|l| l.contains("NACK"))
        .expect("NACK not logged");
    for needle in [
        "WARN",
        "n1",
        CLUSTER,
        &rejected.version_info,
        "cluster bad: no endpoints",
    ] {
        assert!(nack.contains(needle), "{needle:?} missing from {nack:?}");
    }
    drop(c);

    // Reconnecting, the same node is not offered the content it rejected...
    let mut c = within(SotwClient::connect(h.uri.clone(), node("n1")))
        .await
        .unwrap();
    c.subscribe(CLUSTER, Vec::new()).await.unwrap();
    sotw_probe(&mut c, 0).await;

    // ...while another node is (the memory is per node)...
    let mut other = within(SotwClient::connect(h.uri.clone(), node("n2")))
        .await
        .unwrap();
    other.subscribe(CLUSTER, Vec::new()).await.unwrap();
    assert_eq!(
        sotw_next(&mut other).await.version_info,
        rejected.version_info
    );

    // ...and corrected content is sent normally.
    h.publish(snapshot("v2", [cluster("good", 1)]));
    let fixed = sotw_next(&mut c).await;
    assert_eq!(sotw_names(&fixed), vec!["good".to_owned()]);
    assert_ne!(fixed.version_info, rejected.version_info);
}

#[tokio::test]
async fn delta_sends_only_changes_and_removals() {
    let h = Harness::start(snapshot(
        "v1",
        [cluster("a", 1), cluster("b", 1), endpoints("a", 80)],
    ))
    .await;
    let mut d = RawDelta::open(&h.uri).await;

    // An empty first subscription to CDS is a wildcard.
    d.subscribe(Some(node("n1")), CLUSTER, &[]).await;
    let cds = d.next().await;
    assert_eq!(
        (cds.type_url.as_str(), delta_names(&cds)),
        (CLUSTER, vec!["a", "b"])
    );
    assert_eq!(cds.system_version_info, "v1");
    let body = cds.resources[0].resource.as_ref().unwrap();
    assert_eq!(Cluster::decode(&*body.value).unwrap().name, "a");
    d.reply(&cds, None).await;

    // A named subscription to something that does not exist is answered with a removal.
    d.subscribe(None, ENDPOINT, &["a", "missing"]).await;
    let eds = d.next().await;
    assert_eq!(delta_names(&eds), vec!["a"]);
    assert_eq!(eds.removed_resources, vec!["missing"]);
    d.reply(&eds, None).await;
    d.probe(0).await;

    h.publish(snapshot(
        "v2",
        [cluster("a", 1), cluster("b", 2), endpoints("a", 80)],
    ));
    let changed = d.next().await;
    assert_eq!(
        (changed.type_url.as_str(), delta_names(&changed)),
        (CLUSTER, vec!["b"])
    );
    assert!(changed.removed_resources.is_empty());
    assert_eq!(changed.system_version_info, "v2");
    assert_ne!(changed.resources[0].version, RawDelta::versions(&cds)["b"]);
    d.reply(&changed, None).await;
    d.probe(1).await;

    h.publish(snapshot("v3", [cluster("b", 2), endpoints("a", 80)]));
    let removed = d.next().await;
    assert_eq!(removed.type_url, CLUSTER);
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, vec!["a"]);
    d.reply(&removed, None).await;
    d.probe(2).await;
    assert_eq!((h.stats.acks(), h.stats.nacks()), (4, 0));
}

#[tokio::test]
async fn delta_reconnect_with_initial_versions_gets_only_what_changed() {
    let h = Harness::start(snapshot(
        "v1",
        [cluster("a", 1), cluster("b", 1), cluster("c", 1)],
    ))
    .await;
    let mut d = RawDelta::open(&h.uri).await;
    d.subscribe(Some(node("n1")), CLUSTER, &["*"]).await;
    let first = d.next().await;
    assert_eq!(delta_names(&first), vec!["a", "b", "c"]);
    d.reply(&first, None).await;
    drop(d);

    h.publish(snapshot(
        "v2",
        [cluster("a", 1), cluster("b", 2), cluster("d", 1)],
    ));
    let mut d = RawDelta::open(&h.uri).await;
    d.send(DeltaDiscoveryRequest {
        node: Some(node("n1")),
        type_url: CLUSTER.to_owned(),
        initial_resource_versions: RawDelta::versions(&first),
        ..Default::default()
    })
    .await;
    let catch_up = d.next().await;
    assert_eq!(delta_names(&catch_up), vec!["b", "d"]);
    assert_eq!(catch_up.removed_resources, vec!["c"]);
    drop(d);

    // A client that is fully up to date gets an empty answer and nothing else.
    let mut versions = RawDelta::versions(&first);
    versions.remove("c");
    versions.extend(RawDelta::versions(&catch_up));
    let mut d = RawDelta::open(&h.uri).await;
    d.send(DeltaDiscoveryRequest {
        node: Some(node("n1")),
        type_url: CLUSTER.to_owned(),
        initial_resource_versions: versions,
        ..Default::default()
    })
    .await;
    let nothing = d.next().await;
    assert!(nothing.resources.is_empty() && nothing.removed_resources.is_empty());
    d.probe(0).await;
}

#[tokio::test]
async fn delta_nacked_resource_is_never_resent_to_that_node() {
    let h = Harness::start(snapshot("v1", [cluster("a", 1), cluster("b", 1)])).await;
    let mut d = RawDelta::open(&h.uri).await;
    d.subscribe(Some(node("n1")), CLUSTER, &[]).await;
    let first = d.next().await;
    d.reply(&first, None).await;

    h.publish(snapshot("v2", [cluster("a", 1), cluster("b", 99)]));
    let bad = d.next().await;
    assert_eq!(delta_names(&bad), vec!["b"]);
    d.reply(&bad, Some("cluster b: timeout too long")).await;
    d.probe(0).await;
    assert_eq!(h.stats.nacks(), 1);

    // A later change to "a" goes out alone: the rejected "b" stays withheld.
    h.publish(snapshot("v3", [cluster("a", 2), cluster("b", 99)]));
    let next = d.next().await;
    assert_eq!(delta_names(&next), vec!["a"]);
    d.reply(&next, None).await;

    // After the NACK the client still has its old "b": reverting to it sends only "a".
    h.publish(snapshot("v4", [cluster("a", 3), cluster("b", 1)]));
    let reverted = d.next().await;
    assert_eq!(delta_names(&reverted), vec!["a"]);
    d.reply(&reverted, None).await;
    drop(d);

    // The rejected "b" is not sent on a new stream either.
    h.publish(snapshot("v5", [cluster("a", 3), cluster("b", 99)]));
    let mut versions = RawDelta::versions(&first);
    versions.extend(RawDelta::versions(&reverted));
    let mut d = RawDelta::open(&h.uri).await;
    d.send(DeltaDiscoveryRequest {
        node: Some(node("n1")),
        type_url: CLUSTER.to_owned(),
        initial_resource_versions: versions,
        ..Default::default()
    })
    .await;
    let resumed = d.next().await;
    assert!(resumed.resources.is_empty() && resumed.removed_resources.is_empty());

    h.publish(snapshot("v6", [cluster("a", 3), cluster("b", 3)]));
    let fixed = d.next().await;
    assert_eq!(delta_names(&fixed), vec!["b"]);
    assert_eq!(fixed.resources[0].version, cluster("b", 3).version);
}

#[tokio::test]
async fn first_request_without_node_is_invalid_argument() {
    let h = Harness::start(snapshot("v1", [cluster("a", 1)])).await;

    let mut c = within(SotwClient::connect(h.uri.clone(), node("unused")))
        .await
        .unwrap();
    let request = DiscoveryRequest {
        type_url: CLUSTER.to_owned(),
        ..Default::default()
    };
    c.send(request).await.unwrap();
    match within(c.next()).await {
        Err(ClientError::Stream(status)) => assert_eq!(status.code(), Code::InvalidArgument),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }

    let mut d = RawDelta::open(&h.uri).await;
    d.subscribe(None, CLUSTER, &[]).await;
    let status = within(d.responses.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(h.stats.responses_sent(), 0);
}

#[tokio::test]
async fn delta_client_end_to_end() {
    let h = Harness::start(snapshot(
        "v1",
        [cluster("a", 1), listener("l"), endpoints("a", 80)],
    ))
    .await;
    let mut c = within(DeltaClient::connect(h.uri.clone(), node("n1")))
        .await
        .unwrap();

    let mut types = BTreeSet::new();
    for _ in 0..2 {
        let update = within(c.next()).await.unwrap().unwrap();
        let names: Vec<_> = update.resources.iter().map(|r| r.name.as_str()).collect();
        let expected = if update.type_url == CLUSTER { "a" } else { "l" };
        assert_eq!(names, vec![expected]);
        types.insert(update.type_url.clone());
        within(c.ack_or_nack(&update, Ok(()))).await.unwrap();
    }
    assert_eq!(
        types,
        BTreeSet::from([CLUSTER.to_owned(), LISTENER.to_owned()])
    );

    within(c.subscribe(ENDPOINT, ["a"])).await.unwrap();
    let eds = within(c.next()).await.unwrap().unwrap();
    assert_eq!((eds.type_url.as_str(), eds.resources.len()), (ENDPOINT, 1));
    assert_eq!(eds.resources[0], endpoints("a", 80));
    within(c.ack_or_nack(&eds, Err("port 80 is reserved".to_owned())))
        .await
        .unwrap();

    h.publish(snapshot(
        "v2",
        [cluster("a", 1), listener("l"), endpoints("a", 8080)],
    ));
    let eds = within(c.next()).await.unwrap().unwrap();
    assert_eq!(eds.resources, vec![endpoints("a", 8080)]);
    assert_eq!(eds.system_version, "v2");
    within(c.ack_or_nack(&eds, Ok(()))).await.unwrap();

    within(c.subscribe(PROBE, Vec::<String>::new()))
        .await
        .unwrap();
    let probe = within(c.next()).await.unwrap().unwrap();
    assert_eq!(probe.type_url, PROBE);
    assert_eq!((h.stats.acks(), h.stats.nacks()), (3, 1));
    let accepted = c.accepted_versions().clone();
    assert_eq!(accepted[ENDPOINT]["a"], endpoints("a", 8080).version);
    assert_eq!(accepted[CLUSTER]["a"], cluster("a", 1).version);
    drop(c);

    // Reconnecting with what it accepted, the client is sent nothing it has.
    let mut c = within(DeltaClient::connect_with_versions(
        h.uri.clone(),
        node("n1"),
        accepted,
    ))
    .await
    .unwrap();
    within(c.subscribe(ENDPOINT, ["a"])).await.unwrap();
    for _ in 0..3 {
        let update = within(c.next()).await.unwrap().unwrap();
        assert!(
            update.resources.is_empty() && update.removed.is_empty(),
            "{update:?}"
        );
    }
}

#[tokio::test]
async fn a_stream_tracks_a_bounded_number_of_type_urls() {
    let h = Harness::start(snapshot("v1", [])).await;
    let mut d = RawDelta::open(&h.uri).await;
    d.subscribe(Some(node("n1")), CLUSTER, &[]).await;
    assert_eq!(d.next().await.type_url, CLUSTER);
    for n in 0..63 {
        d.probe(n).await;
    }
    d.subscribe(None, PROBE, &[]).await;
    let status = within(d.responses.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}
