//! The sample app (`hypha demo-app --role ROLE`): bookinfo's services, small enough to read.
//! Each instance sits behind its own sidecar, and reaches other services by name through
//! that sidecar's HTTP proxy listener or, in a pod with transparent capture (`hypha demo
//! --pods`), straight to the name as any unmodified client does; either way it passes on
//! `end-user` and the trace headers.
//!
//! - productpage (`GET /`, `/productpage`): calls details and reviews, answers a JSON page
//!   naming who answered (502 if either failed for good).
//! - details (`GET /details/<id>`): the book; fails one request in ten on purpose (503), so the
//!   mesh's retries have something to hide.
//! - reviews v1 (no stars), v2 (black stars), v3 (red stars): v2 and v3 ask ratings over gRPC
//!   and report how that call went (the fault injection on ratings shows up here).
//! - ratings: a real gRPC service (`ratings.Ratings/Get`, HTTP/2 without TLS) built on tonic's
//!   server machinery with hand-written prost messages, so no protoc is needed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::client::ProxyClient;
use crate::topology::{host, Role, SERVICE_PORT};

/// Headers every app passes on to the services it calls: the user (routing) and tracing.
pub const PROPAGATED: [&str; 10] = [
    "end-user",
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// The gRPC method reviews calls.
pub const RATINGS_METHOD: &str = "/ratings.Ratings/Get";

/// How long an app waits for a service it calls (the mesh's own timeouts are shorter).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type AppBody = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("bad service address {0}: {1}")]
    Address(String, String),
    #[error("cannot watch for SIGTERM: {0}")]
    Signal(std::io::Error),
}

/// The ratings service's messages, written by hand in prost's derive form (what
/// `prost-build` would generate for `ratings.proto`).
pub mod proto {
    use std::collections::HashMap;

    /// `message RatingsRequest { int32 product_id = 1; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RatingsRequest {
        #[prost(int32, tag = "1")]
        pub product_id: i32,
    }

    /// `message RatingsResponse { map<string, int32> ratings = 1; string served_by = 2;
    /// string request_id = 3; }`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RatingsResponse {
        #[prost(map = "string, int32", tag = "1")]
        pub ratings: HashMap<String, i32>,
        #[prost(string, tag = "2")]
        pub served_by: String,
        #[prost(string, tag = "3")]
        pub request_id: String,
    }
}

struct App {
    role: Role,
    /// Through the sidecar, HTTP/1.1 with absolute-form targets.
    mesh: ProxyClient,
    /// Through the sidecar, HTTP/2 (gRPC) with `ratings` as the authority.
    ratings: tonic::client::Grpc<tonic::transport::Channel>,
    served: AtomicU64,
}

/// Serves `role` on `listen`, calling other services through the sidecar at `proxy` (or,
/// without one, by their names: a captured pod), until SIGINT or SIGTERM.
pub async fn run(
    role: Role,
    listen: SocketAddr,
    proxy: Option<SocketAddr>,
) -> Result<(), AppError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| AppError::Bind(listen, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| AppError::Bind(listen, e))?;
    let ratings = format!("http://{}:{SERVICE_PORT}", host("ratings"));
    let bad = |at: &str, e: &dyn std::fmt::Display| AppError::Address(at.to_owned(), e.to_string());
    let endpoint = match proxy {
        // The proxy is the connection's address; ratings, the request's authority.
        Some(proxy) => {
            let origin: http::Uri = ratings.parse().map_err(|e| bad(&ratings, &e))?;
            let at = format!("http://{proxy}");
            tonic::transport::Endpoint::from_shared(at.clone())
                .map_err(|e| bad(&at, &e))?
                .origin(origin)
        }
        None => tonic::transport::Endpoint::from_shared(ratings.clone())
            .map_err(|e| bad(&ratings, &e))?,
    };
    let channel = endpoint.timeout(CALL_TIMEOUT).connect_lazy();
    let app = Arc::new(App {
        role,
        mesh: ProxyClient::with(proxy, CALL_TIMEOUT),
        ratings: tonic::client::Grpc::new(channel),
        served: AtomicU64::new(0),
    });
    let via = proxy.map_or_else(|| "captured".to_owned(), |p| p.to_string());
    tracing::info!(%role, listen = %local, proxy = %via, "demo app serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AppError::Signal)?;
    tokio::select! {
        () = accept_loop(app, listener) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(%role, "demo app stopping");
    Ok(())
}

async fn accept_loop(app: Arc<App>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AppBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Response<AppBody> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    full(status, "application/json", text)
}

/// The headers of `incoming` to pass on.
fn propagated(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in PROPAGATED {
        if let Some(v) = incoming.get(name) {
            out.insert(name, v.clone());
        }
    }
    out
}

fn header(h: &HeaderMap, name: &str) -> Value {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map_or(Value::Null, |v| Value::String(v.to_owned()))
}

/// The product id at the end of `/details/<id>` or `/reviews/<id>`.
fn product_id(path: &str) -> i32 {
    path.rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<AppBody> {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        let path = req.uri().path().to_owned();
        match (self.role, path.as_str()) {
            (Role::Productpage, "/" | "/productpage") => self.productpage(req.headers()).await,
            (Role::Details, p) if p.starts_with("/details/") => details(n, p, req.headers()),
            (Role::ReviewsV1 | Role::ReviewsV2 | Role::ReviewsV3, p)
                if p.starts_with("/reviews/") =>
            {
                self.reviews(p, req.headers()).await
            }
            (Role::Ratings, RATINGS_METHOD) => {
                let codec = tonic_prost::ProstCodec::<proto::RatingsResponse, proto::RatingsRequest>::default();
                tonic::server::Grpc::new(codec)
                    .unary(GetRatings, req)
                    .await
                    .map(|b| b.map_err(BoxError::from).boxed_unsync())
            }
            _ => full(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("{}: no such page {path}\n", self.role),
            ),
        }
    }

    async fn productpage(&self, incoming: &HeaderMap) -> Response<AppBody> {
        let headers = propagated(incoming);
        let details_url = format!("http://{}:{SERVICE_PORT}/details/0", host("details"));
        let reviews_url = format!("http://{}:{SERVICE_PORT}/reviews/0", host("reviews"));
        let (details, reviews) = tokio::join!(
            self.call_json(&details_url, &headers),
            self.call_json(&reviews_url, &headers)
        );
        let ok = details.is_ok() && reviews.is_ok();
        let page = json!({
            "productpage": "productpage-v1",
            "user": header(incoming, "end-user"),
            "request_id": header(incoming, "x-request-id"),
            "legacy": incoming.contains_key("x-legacy"),
            "details": details.unwrap_or_else(|e| json!({ "error": e })),
            "reviews": reviews.unwrap_or_else(|e| json!({ "error": e })),
        });
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        };
        json_reply(status, &page)
    }

    /// GETs a JSON document through the sidecar; the error says what came back instead.
    async fn call_json(&self, url: &str, headers: &HeaderMap) -> Result<Value, String> {
        match self.mesh.get(url, headers).await {
            Ok(r) if r.status.is_success() => {
                serde_json::from_slice(&r.body).map_err(|e| format!("bad JSON from {url}: {e}"))
            }
            Ok(r) => {
                let flags = r
                    .headers
                    .get("x-hypha-response-flags")
                    .and_then(|v| v.to_str().ok())
                    .map_or(String::new(), |f| format!(" [{f}]"));
                Err(format!("{}{flags}: {}", r.status, r.text().trim()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    async fn reviews(&self, path: &str, incoming: &HeaderMap) -> Response<AppBody> {
        let (version, color) = match self.role {
            Role::ReviewsV2 => ("v2", Some("black")),
            Role::ReviewsV3 => ("v3", Some("red")),
            _ => ("v1", None),
        };
        let id = product_id(path);
        let (ratings, call) = match color {
            Some(_) => self.ratings(id, incoming).await,
            None => (HashMap::new(), Value::Null),
        };
        let review = |reviewer: &str, text: &str| {
            let mut r = json!({ "reviewer": reviewer, "text": text });
            if let (Some(color), Some(stars)) = (color, ratings.get(reviewer)) {
                r["rating"] = json!({ "stars": stars, "color": color });
            }
            r
        };
        json_reply(
            StatusCode::OK,
            &json!({
                "id": id,
                "served_by": self.role.as_str(),
                "version": version,
                "request_id": header(incoming, "x-request-id"),
                "reviews": [
                    review("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
                    review("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."),
                ],
                "ratings_call": call,
            }),
        )
    }

    /// Asks ratings over gRPC: the stars by reviewer, and how the call went.
    async fn ratings(&self, id: i32, incoming: &HeaderMap) -> (HashMap<String, i32>, Value) {
        let start = Instant::now();
        let request = tonic::Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(propagated(incoming)),
            tonic::Extensions::default(),
            proto::RatingsRequest { product_id: id },
        );
        let mut grpc = self.ratings.clone();
        let result = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec =
                tonic_prost::ProstCodec::<proto::RatingsRequest, proto::RatingsResponse>::default();
            grpc.unary(
                request,
                http::uri::PathAndQuery::from_static(RATINGS_METHOD),
                codec,
            )
            .await
        }
        .await;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(resp) => {
                let r = resp.into_inner();
                let call = json!({
                    "status": "ok",
                    "ms": ms,
                    "served_by": r.served_by,
                    "request_id": r.request_id,
                });
                (r.ratings, call)
            }
            Err(status) => {
                // The sidecar marks its own replies (a fault abort is `FI`).
                let flags = status
                    .metadata()
                    .get("x-hypha-response-flags")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                let call = json!({
                    "status": "error",
                    "ms": ms,
                    "grpc_code": format!("{:?}", status.code()),
                    "flags": flags,
                    "message": status.message(),
                });
                (HashMap::new(), call)
            }
        }
    }
}

/// What details answers when it fails on purpose.
pub const DELIBERATE_FAILURE: &str = "details: failing one request in ten on purpose";

/// details: the book, or on every tenth request a deliberate 503.
fn details(n: u64, path: &str, incoming: &HeaderMap) -> Response<AppBody> {
    if n % 10 == 9 {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{DELIBERATE_FAILURE}\n"),
        );
    }
    json_reply(
        StatusCode::OK,
        &json!({
            "id": product_id(path),
            "author": "William Shakespeare",
            "year": 1595,
            "type": "paperback",
            "pages": 200,
            "publisher": "PublisherA",
            "language": "English",
            "ISBN-10": "1234567890",
            "ISBN-13": "123-1234567890",
            "served_by": "details-v1",
            "request_id": header(incoming, "x-request-id"),
        }),
    )
}

/// ratings' one method.
struct GetRatings;

impl tonic::server::UnaryService<proto::RatingsRequest> for GetRatings {
    type Response = proto::RatingsResponse;
    type Future =
        std::future::Ready<Result<tonic::Response<proto::RatingsResponse>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<proto::RatingsRequest>) -> Self::Future {
        let request_id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if req.get_ref().product_id < 0 {
            return std::future::ready(Err(tonic::Status::invalid_argument(
                "product ids are not negative",
            )));
        }
        let ratings = HashMap::from([("Reviewer1".to_owned(), 5), ("Reviewer2".to_owned(), 4)]);
        std::future::ready(Ok(tonic::Response::new(proto::RatingsResponse {
            ratings,
            served_by: "ratings-v1".into(),
            request_id,
        })))
    }
}
