//! The proxy's runtime config: what `compile` makes of the xDS resources, read by every
//! request through one `Arc` swapped whole when an update is applied. Nothing here is parsed
//! or locked on the request path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hypha_matcher::{SimpleRequest, Table};

/// The maps requests look names up in (clusters, route tables, domains). Their keys come from
/// the config, never from a request, so they need no DoS-resistant hash: FxHash (a multiply
/// and a rotate per word, as rustc uses) instead of SipHash, several times faster on names
/// like `outbound|9080|v1|reviews.bookinfo.svc.cluster.local`.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// One applied config generation.
#[derive(Debug, Default)]
pub struct Config {
    /// Route tables by name (RDS names such as `9080`, and `<host>:<port>`).
    pub routes: FastMap<String, Arc<RouteTable>>,
    pub clusters: FastMap<String, Arc<Cluster>>,
    /// EDS endpoints by cluster name.
    pub endpoints: HashMap<String, Arc<[Endpoint]>>,
    /// Every cluster's endpoints (EDS or static) with its load-balancing state.
    pub endpoint_sets: FastMap<String, Arc<EndpointSet>>,
    /// Service port → route table and path normalization, from the `0.0.0.0_<port>` HTTP
    /// listeners.
    pub http_by_port: FastMap<u16, (String, PathNormalization)>,
    /// VIP and port (or any address on a port) → where its connections go, from the TCP and
    /// TLS listeners.
    pub tcp: HashMap<ListenAddr, Arc<TcpRoutes>>,
    /// The same routes by the service they are for ([`TcpRoutes::service`]): where a local
    /// service port's connections go.
    pub tcp_by_service: HashMap<String, Arc<TcpRoutes>>,
    /// Outbound listeners by name (`0.0.0.0_<port>`, `<vip>_<port>`): the address they stand
    /// for and what traffic for it does.
    pub outbound: HashMap<String, (ListenAddr, Outbound)>,
    /// Inbound filter chains (from `virtualInbound`) for plaintext connections
    /// (`transport_protocol` unset or `raw_buffer`).
    pub inbound: InboundChains,
    /// The same for mutual-TLS connections (`transport_protocol: tls` with a
    /// DownstreamTlsContext): the workload certificate, a client certificate required.
    pub inbound_tls: InboundChains,
    /// Clusters and listeners have arrived, and everything they refer to: until then the
    /// inbound side serves nothing. Stays true once set.
    pub complete: bool,
}

/// One transport's inbound filter chains: by destination port, then the catch-all (Istio's
/// passthrough chain, no `destination_port`) for every other port.
#[derive(Debug, Default, Clone)]
pub struct InboundChains {
    pub by_port: FastMap<u16, Inbound>,
    pub any: Option<Inbound>,
}

impl Config {
    /// The chain a connection to `port` is served by, TLS or plaintext, in Envoy's order: the
    /// destination port first (a chain that names the port, of either transport, wins over the
    /// catch-all), then the transport.
    #[inline]
    pub fn inbound_chain(&self, tls: bool, port: u16) -> Option<&Inbound> {
        let chains = if tls {
            &self.inbound_tls
        } else {
            &self.inbound
        };
        if self.inbound_names(port) {
            chains.by_port.get(&port)
        } else {
            chains.any.as_ref()
        }
    }

    /// Whether a connection to `port` that starts a TLS handshake is terminated: a mutual-TLS
    /// chain takes it.
    #[inline]
    pub fn inbound_takes_tls(&self, port: u16) -> bool {
        self.inbound_chain(true, port).is_some()
    }

    fn inbound_names(&self, port: u16) -> bool {
        self.inbound.by_port.contains_key(&port) || self.inbound_tls.by_port.contains_key(&port)
    }
}

/// The destination an outbound listener stands for: a service VIP and port, or any address
/// on a port (`0.0.0.0_<port>`, HTTP services and TCP services without VIPs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Vip(std::net::IpAddr, u16),
    AnyOn(u16),
}

/// What the outbound side does with traffic for one service port.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// HTTP: route with the route table of this name, paths normalized so.
    Http {
        route_table: String,
        paths: PathNormalization,
    },
    /// TCP bytes to a cluster: the only one, or the one the ClientHello's server name picks.
    Tcp(Arc<TcpRoutes>),
}

/// Where the TCP connections for one outbound address go: Envoy's filter chain selection by
/// `server_names` (the TLS inspector's SNI), then the chain without names.
#[derive(Debug)]
pub struct TcpRoutes {
    /// One rule per server name on the SNI (as the authority), most specific first: exact
    /// names, then `*.` wildcards longest first. `None` when no chain names any, so the
    /// connection is not read before it is proxied.
    pub names: Option<Table>,
    /// For each rule of `names`, the server name it is and its clusters.
    pub named: Vec<(String, Weighted)>,
    /// The clusters of the chain without names: connections no name picks (no ClientHello, no
    /// server name, another name).
    pub default: Option<Weighted>,
    /// The service these are for: the stat prefix of the chain without names, which the
    /// control plane makes the service's own cluster name (`outbound|<port>||<host>`). A local
    /// port for that service sends its connections through these routes.
    pub service: Option<String>,
}

/// A TCP proxy's clusters: one, or several with weights (Envoy's `weighted_clusters`), one
/// picked per connection in proportion to its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weighted {
    clusters: Vec<(String, u32)>,
    total: u64,
}

impl Weighted {
    /// All to `cluster`.
    pub fn one(cluster: String) -> Weighted {
        Weighted::new(vec![(cluster, 1)]).expect("one cluster")
    }

    /// `None` without a cluster, or when every weight is 0.
    pub fn new(clusters: Vec<(String, u32)>) -> Option<Weighted> {
        let total = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
        (total > 0).then_some(Weighted { clusters, total })
    }

    /// The one cluster, when there is just one.
    pub fn only(&self) -> Option<&str> {
        match self.clusters.as_slice() {
            [(c, _)] => Some(c),
            _ => None,
        }
    }

    /// The clusters and their weights.
    pub fn clusters(&self) -> &[(String, u32)] {
        &self.clusters
    }

    /// A cluster for one connection, in proportion to the weights.
    pub fn pick(&self) -> &str {
        if let Some(c) = self.only() {
            return c;
        }
        let mut at = crate::rand::below(self.total);
        for (c, w) in &self.clusters {
            if at < u64::from(*w) {
                return c;
            }
            at -= u64::from(*w);
        }
        &self.clusters[0].0
    }
}

impl PartialEq for TcpRoutes {
    /// The same names to the same clusters (`names` is compiled from `named`).
    fn eq(&self, other: &TcpRoutes) -> bool {
        self.named == other.named && self.default == other.default && self.service == other.service
    }
}

impl TcpRoutes {
    /// Every connection to `cluster`.
    pub fn single(cluster: String) -> TcpRoutes {
        TcpRoutes::to(Weighted::one(cluster))
    }

    /// Every connection to one of `clusters`.
    pub fn to(clusters: Weighted) -> TcpRoutes {
        TcpRoutes {
            names: None,
            named: Vec::new(),
            default: Some(clusters),
            service: None,
        }
    }

    /// The cluster for a connection whose ClientHello named `sni` (lower-case), if any chain
    /// takes it.
    pub fn pick(&self, sni: Option<&str>) -> Option<&str> {
        let named = match (&self.names, sni) {
            (Some(table), Some(sni)) => table
                .first_match(&SimpleRequest {
                    target: b"",
                    method: b"",
                    scheme: b"",
                    authority: sni.as_bytes(),
                    headers: &[],
                })
                .map(|rule| &self.named[rule].1),
            _ => None,
        };
        named.or(self.default.as_ref()).map(Weighted::pick)
    }
}

/// What an HTTP connection manager does to request paths before routing and authorization
/// (Envoy's `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`; Istio's
/// `pathNormalization` sets them). Nothing, unless the connection manager says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathNormalization {
    /// RFC 3986: escapes of unreserved characters decoded, `%00` refused, backslashes as
    /// slashes, dot segments removed.
    pub normalize: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

/// What is done to `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    #[default]
    Keep,
    /// 400.
    Reject,
    /// Decoded before the rest of normalization, and sent on so.
    Unescape,
}

/// What the inbound side does with traffic for one local port.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// HTTP to the local app through this cluster (`inbound|<port>||`).
    Http {
        /// Shared: every request names it in its metrics.
        cluster: Arc<str>,
        /// Checked per request before it goes anywhere.
        authz: Arc<crate::authz::Authz>,
        /// What is done to request paths before authorization.
        paths: PathNormalization,
    },
    Tcp {
        cluster: String,
        /// Checked per connection.
        authz: Arc<crate::authz::Authz>,
    },
}

impl Inbound {
    /// The same chain for a connection already accepted: same kind, same cluster (policy may
    /// differ; it is checked again).
    pub fn same_kind(&self, other: &Inbound) -> bool {
        match (self, other) {
            (Inbound::Http { cluster: a, .. }, Inbound::Http { cluster: b, .. }) => a == b,
            (Inbound::Tcp { cluster: a, .. }, Inbound::Tcp { cluster: b, .. }) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Every domain of every virtual host, one rule each on the authority, in the order Envoy
    /// prefers them: exact domains, then suffix wildcards (`*.example.com`) longest first,
    /// then prefix wildcards (`example.*`) longest first, then `*`.
    pub domains: Table,
    /// For each rule of `domains`, its virtual host.
    pub domain_hosts: Vec<usize>,
}

impl RouteTable {
    /// Envoy's virtual host selection (see `domains`). `authority` must be lower-case.
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let rule = self.domains.first_match(&SimpleRequest {
            target: b"",
            method: b"",
            scheme: b"",
            authority: authority.as_bytes(),
            headers: &[],
        })?;
        self.virtual_hosts.get(self.domain_hosts[rule])
    }
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
    /// One rule per route, in order.
    pub table: Table,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub action: Action,
    pub headers: HeaderOps,
    pub fault: Option<Fault>,
}

#[derive(Debug)]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: u16, body: bytes::Bytes },
}

#[derive(Debug)]
pub struct Forward {
    pub clusters: Vec<WeightedCluster>,
    /// Sum of the weights.
    pub total_weight: u32,
    /// `None`: no route timeout (Envoy's 0).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(regex::Regex, String)>,
    pub host_rewrite: Option<String>,
    /// The length of the prefix the route matched, for `prefix_rewrite`.
    pub matched_prefix: Option<usize>,
    /// Consistent-hash keys, tried in order (the first one present is used).
    pub hash: Vec<HashKey>,
}

/// Where a consistent-hash load balancer takes its key from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
    Query(String),
}

#[derive(Debug)]
pub struct WeightedCluster {
    /// Shared, so requests can carry it to their metrics without copying.
    pub name: Arc<str>,
    pub weight: u32,
    pub headers: HeaderOps,
}

/// Envoy's `HeaderValueOption.append_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderAppend {
    /// Add a value, keeping existing ones.
    Append,
    AddIfAbsent,
    /// Replace existing values, or add.
    Overwrite,
    /// Replace existing values; add nothing if there are none.
    OverwriteIfExists,
}

pub type HeaderAdd = (http::HeaderName, http::HeaderValue, HeaderAppend);

#[derive(Debug, Default)]
pub struct HeaderOps {
    pub request_add: Vec<HeaderAdd>,
    pub request_remove: Vec<http::HeaderName>,
    pub response_add: Vec<HeaderAdd>,
    pub response_remove: Vec<http::HeaderName>,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    /// Status codes retried on (`retriable-status-codes`, and 409 for `retriable-4xx`, the one
    /// code Envoy puts in that class).
    pub on_status: Vec<u16>,
    /// `envoy-ratelimited`: a response carrying `x-envoy-ratelimited` is retried.
    pub on_ratelimited: bool,
    /// `reset-before-request`: retried when the request never reached the upstream (the
    /// connection failed), which is safe for any method.
    pub on_reset_before_request: bool,
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// `refused-stream`: retry when the upstream refuses the HTTP/2 stream. Carried, not
    /// acted on by `upstream` itself: hyper_util's HTTP/2 client retries a refused stream
    /// on its own, and anything else reset is retried as a `reset`.
    pub on_refused_stream: bool,
    /// gRPC status codes retried on, as a set of bits (bit 14: `unavailable`; also
    /// `cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8, `internal` 13), read
    /// from the `grpc-status` of a trailers-only response.
    pub on_grpc_status: u32,
}

impl RetryPolicy {
    /// Whether a response with this `grpc-status` is retried.
    pub fn on_grpc(&self, status: u32) -> bool {
        status < 32 && self.on_grpc_status & (1 << status) != 0
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    /// (delay, percentage in millionths)
    pub delay: Option<(Duration, u32)>,
    /// (status, percentage in millionths)
    pub abort: Option<(u16, u32)>,
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub status: u16,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub kind: ClusterKind,
    pub lb: Lb,
    pub connect_timeout: Duration,
    /// Speak HTTP/2 to the upstream.
    pub http2: bool,
    pub limits: Limits,
    pub outlier: Option<OutlierPolicy>,
    /// Close an upstream connection idle this long (`common_http_protocol_options.idle_timeout`,
    /// Envoy's default one hour); `None`: never (Envoy's 0). The HTTP/1.1 pool applies it,
    /// capped at its own 60 s.
    pub idle_timeout: Option<Duration>,
    /// Close an upstream connection after this many requests
    /// (`common_http_protocol_options.max_requests_per_connection`); `None`: no limit.
    /// Applied by the HTTP/1.1 pool.
    pub max_requests_per_connection: Option<u32>,
    /// HTTP/2 streams at once per upstream connection (`max_concurrent_streams` of the
    /// HTTP/2 options); `None`: Envoy's default, 2^31 - 1. Carried, not yet applied.
    pub max_concurrent_streams: Option<u32>,
    /// TLS: mutual TLS with the workload certificate (and to which endpoints), or origination.
    pub tls: Option<UpstreamTls>,
    /// Source addresses to connect from (`upstream_bind_config`, one per family: Istio's
    /// 127.0.0.6 and ::6 for inbound passthrough); empty: the kernel's choice.
    pub bind: Vec<std::net::IpAddr>,
}

/// TLS to upstreams: mutual TLS with the workload certificate to sidecars, or origination
/// to a server outside the mesh.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamTls {
    Mesh(MeshTls),
    /// A DestinationRule's `SIMPLE` or `MUTUAL`: files and names, ready to connect with.
    Origination(Arc<crate::origination::Origination>),
}

/// Mutual TLS to sidecars: Envoy's UpstreamTlsContext with Istio's SDS names (`default`, the
/// workload certificate; `ROOTCA`, the trust bundle).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshTls {
    /// The SPIFFE IDs the server may present (`match_typed_subject_alt_names`, exact URI
    /// matchers); empty: any identity the roots vouch for.
    pub identities: Arc<[String]>,
    /// ALPN offered, in wire format (`h2`, `http/1.1`).
    pub alpn: Arc<[u8]>,
    /// Every endpoint (`transport_socket`), or only those whose metadata says
    /// `tlsMode: istio` (`transport_socket_matches`, Istio's auto mTLS).
    pub only_istio_endpoints: bool,
}

/// Circuit-breaker thresholds (Envoy's defaults when unset: 1024 each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

impl Limits {
    /// Requests the cluster may have in flight at once: `max_requests` (Istio's
    /// `http2MaxRequests`, which Envoy applies to every protocol); over HTTP/1.1 also no more
    /// than a connection each plus the pending queue.
    pub fn concurrency(&self, http2: bool) -> u64 {
        let requests = u64::from(self.max_requests);
        if http2 {
            requests
        } else {
            requests.min(u64::from(self.max_connections) + u64::from(self.max_pending_requests))
        }
    }
}

/// Outlier detection (consecutive errors eject an endpoint for base time × ejections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// 0: off.
    pub consecutive_5xx: u32,
    /// 0: off.
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Envoy's ejection sweep (`interval`, default 10 s): an endpoint's ejection count drops
    /// by one for each interval it has been back. (Ejections end exactly at base × count,
    /// not at the next sweep.)
    pub interval: Duration,
}

/// A cluster's live state, carried from one config generation to the next.
#[derive(Debug, Default)]
pub struct ClusterRuntime {
    /// Requests in flight.
    pub active: std::sync::atomic::AtomicU64,
    /// Retries in flight.
    pub retries: std::sync::atomic::AtomicU64,
    /// Requests refused for the limits (`upstream_rq_pending_overflow`).
    pub overflows: std::sync::atomic::AtomicU64,
    /// Connections open (HTTP/1.1 and TCP), every thread's pool together: what
    /// `max_connections` caps.
    pub connections: std::sync::atomic::AtomicU64,
    /// Wakes requests waiting for a connection under that cap when one is freed.
    pub freed: tokio::sync::Notify,
}

/// An endpoint's live state, carried across generations by address.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests in flight (least request).
    pub active: std::sync::atomic::AtomicU64,
    pub consecutive_5xx: std::sync::atomic::AtomicU32,
    pub consecutive_gateway: std::sync::atomic::AtomicU32,
    /// Ejected until this many nanoseconds after [`epoch`]; 0 when not ejected.
    pub ejected_until: std::sync::atomic::AtomicU64,
    pub ejections: std::sync::atomic::AtomicU32,
}

/// The proxy's monotonic time origin for ejection deadlines.
pub fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

#[derive(Debug)]
pub enum ClusterKind {
    /// Endpoints from EDS (the ClusterLoadAssignment of the same name).
    Eds,
    /// Endpoints in the cluster itself.
    Static(Arc<[Endpoint]>),
    /// To wherever the connection was going (captured traffic); in explicit mode, to the
    /// authority the request named.
    OriginalDst,
    /// Endpoints named by DNS (`STRICT_DNS` / `LOGICAL_DNS`): host and port, resolved when
    /// connecting.
    Dns(Arc<[(String, u16)]>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

/// A cluster's endpoints with their live state, and its round-robin position (atomics, not
/// locks).
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Arc<[Endpoint]>,
    /// One per endpoint, in the same order.
    pub states: Box<[Arc<EndpointState>]>,
    pub runtime: Arc<ClusterRuntime>,
    pub next: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Every address of the endpoint, primary first (dual stack).
    pub addresses: Vec<SocketAddr>,
    pub weight: u32,
    /// The endpoint runs a sidecar that speaks mutual TLS (metadata
    /// `envoy.transport_socket_match: {tlsMode: istio}`).
    pub istio_tls: bool,
}
