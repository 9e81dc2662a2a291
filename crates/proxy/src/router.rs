//! Route selection: route table → virtual host (by authority) → the first route whose rule
//! matches (through the `matcher` crate) → for a forwarding route, one of its weighted
//! clusters. Also the request rewrites and header operations a route asks for.

use http::{HeaderMap, Uri};

use crate::model::{Config, Forward, HeaderAppend, HeaderOps, Route, WeightedCluster};
use crate::request::View;

/// The route for a request, or `None` (Envoy: NR, 404).
pub fn select<'c>(cfg: &'c Config, table: &str, view: &View<'_>) -> Option<&'c Route> {
    let table = cfg.routes.get(table)?;
    let vh = table.virtual_host(view.authority)?;
    let i = vh.table.first_match(view)?;
    vh.routes.get(i)
}

/// One of the route's clusters, by weight.
pub fn pick_cluster(f: &Forward) -> &WeightedCluster {
    if f.clusters.len() == 1 {
        return &f.clusters[0];
    }
    let mut r = crate::rand::below(u64::from(f.total_weight)) as u32;
    for c in &f.clusters {
        if r < c.weight {
            return c;
        }
        r -= c.weight;
    }
    &f.clusters[f.clusters.len() - 1]
}

/// The request URI's path and query after the route's rewrites.
pub fn rewrite_path(f: &Forward, uri: &Uri) -> Option<String> {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path = uri.path();
    if let Some((re, sub)) = &f.regex_rewrite {
        let rest = &pq[path.len()..];
        let new = re.replace_all(path, sub.as_str());
        return Some(format!("{new}{rest}"));
    }
    let (prefix, len) = (f.prefix_rewrite.as_ref()?, f.matched_prefix?);
    let rest = pq.get(len..).unwrap_or("");
    // Istio's `rewrite.uri: /` on prefix `/legacy/` must not produce `//x`.
    if prefix.ends_with('/') && rest.starts_with('/') {
        Some(format!("{prefix}{}", &rest[1..]))
    } else {
        Some(format!("{prefix}{rest}"))
    }
}

/// Applies header operations to request or response headers.
pub fn apply(headers: &mut HeaderMap, ops: &HeaderOps, request: bool) {
    let (add, remove) = if request {
        (&ops.request_add, &ops.request_remove)
    } else {
        (&ops.response_add, &ops.response_remove)
    };
    for name in remove {
        headers.remove(name);
    }
    for (name, value, how) in add {
        match how {
            HeaderAppend::Append => {
                headers.append(name.clone(), value.clone());
            }
            HeaderAppend::AddIfAbsent => {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
            HeaderAppend::Overwrite => {
                headers.insert(name.clone(), value.clone());
            }
            HeaderAppend::OverwriteIfExists => {
                if headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
    }
}
