//! xDS resources → the runtime [`model`](crate::model). Each resource is decoded and checked on
//! its own, so a bad one is refused (NACKed) with a reason that names the resource and the
//! Envoy field Hypha does not support, and never half-applied.
//!
//! Nothing is ignored silently: every message read here goes through [`only`], which refuses
//! each field that is set (differs from its default) but that the code neither acts on nor
//! lists as informational, by its Envoy name. Informational fields (names, stats prefixes,
//! metadata no Hypha feature reads) are listed per message with the reason they change nothing.
//! A field added to the Envoy API later is refused the same way until someone decides what it
//! means here. (The well-known wrappers, `Duration`, `UInt32Value`, `BoolValue`, are read whole.)
//!
//! One submodule per kind of Envoy resource; the field checks and helpers they share are here:
//! - `cluster`: Clusters (discovery, load balancing, upstream HTTP options, limits, outliers).
//! - `endpoint`: ClusterLoadAssignments, a DNS cluster's host names, socket addresses.
//! - `listener`: Listeners, filter chains, network filters, the HTTP connection manager.
//! - `rbac`: RBAC filters, as [`authz`](crate::authz) policies.
//! - `route`: RouteConfigurations: virtual hosts, routes, matches, header ops, retries, faults.
//! - `tls`: transport sockets, SDS, the TLS contexts, and the trust bundle Secret.

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{config_source, ApiVersion, ConfigSource};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

mod cluster;
mod endpoint;
mod listener;
mod rbac;
mod route;
mod tls;

pub use self::cluster::cluster;
pub use self::endpoint::endpoints;
pub use self::listener::{listener, ListenerParts};
pub use self::route::route_table;
pub use self::tls::trust_bundle;

/// The fault filter: in an HTTP connection manager's filters, and in a route's
/// `typed_per_filter_config`.
const FAULT: &str = "envoy.filters.http.fault";

/// Why a resource was refused: its name and the reason, for the NACK's error detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct Refused {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

type Result<T> = std::result::Result<T, String>;

fn decode<M: Message + Default>(bytes: &[u8], what: &str) -> Result<M> {
    M::decode(bytes).map_err(|e| format!("cannot decode {what}: {e}"))
}

/// The message in a typed config, which must be of type `M`.
fn typed<M: Message + Default + Name>(any: &Any, at: &str) -> Result<M> {
    if any.type_url != M::type_url() {
        return Err(format!(
            "{at}: a {} is expected, not {:?}",
            M::full_name(),
            any.type_url
        ));
    }
    decode(&any.value, &M::full_name())
}

fn refuse<'a>(kind: &'static str, name: &'a str) -> impl FnOnce(String) -> Refused + 'a {
    move |reason| Refused {
        kind,
        name: name.to_owned(),
        reason,
    }
}

fn unsupported(field: &str) -> String {
    format!("field `{field}` is not supported by Hypha")
}

/// A field Hypha reads, set to a value it does not support.
fn unsupported_value(field: &str, value: impl std::fmt::Display) -> String {
    format!("field `{field}` = {value} is not supported by Hypha")
}

/// `field` inside the message at `at` (`""` at the top of a resource).
fn path(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

fn dur(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------------
// Fields nobody acts on.

/// Refuses every field of `msg` that is set but not in `known`: the fields the caller acts on
/// and the informational ones it accepts, by Rust field name (a oneof by the oneof's name).
/// `at` is where the message sits in the resource, for the reason.
fn only<M: Debug + Default + 'static>(msg: &M, at: &str, known: &[&str]) -> Result<()> {
    let rest: Vec<String> = set_fields(msg, known)
        .iter()
        .map(|f| format!("`{}`", path(at, f)))
        .collect();
    match rest.as_slice() {
        [] => Ok(()),
        [one] => Err(format!("field {one} is not supported by Hypha")),
        many => Err(format!(
            "fields {} are not supported by Hypha",
            many.join(", ")
        )),
    }
}

/// The fields of `msg` that differ from `M::default()`, minus `known`. prost messages have no
/// reflection, but the `Debug` prost derives lists every field by name, in declaration order,
/// so the renderings of the message and of its default are compared field by field. A set
/// oneof is named by its variant, as the Envoy API names it (`ring_hash_lb_config`, not
/// `lb_config`).
fn set_fields<M: Debug + Default + 'static>(msg: &M, known: &[&str]) -> Vec<String> {
    let set = format!("{msg:?}");
    let default = default_fields::<M>();
    debug_assert!(
        known.iter().all(|k| default.iter().any(|(n, _)| n == k)),
        "a known field is not a field of {}: {known:?}",
        std::any::type_name::<M>()
    );
    changed(&set, &default)
        .into_iter()
        .filter(|(name, _)| !known.contains(name))
        .map(|(name, value)| oneof_variant(value).unwrap_or_else(|| name.to_owned()))
        .collect()
}

/// The fields of `M::default()`'s `Debug` rendering, split once per message type (a route
/// table checks the same few types thousands of times).
fn default_fields<M: Debug + Default + 'static>() -> Arc<[(String, String)]> {
    type Fields = Arc<[(String, String)]>;
    static DEFAULTS: OnceLock<Mutex<HashMap<TypeId, Fields>>> = OnceLock::new();
    let mut defaults = DEFAULTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    defaults
        .entry(TypeId::of::<M>())
        .or_insert_with(|| {
            debug_fields(&format!("{:?}", M::default()))
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect()
        })
        .clone()
}

/// The `(name, value)` of each field in `set` (a `Debug` rendering) that differs from the
/// default's, walking both field by field: a field at its default is passed over with one
/// comparison, and only a set one is scanned for its end.
fn changed<'a>(set: &'a str, default: &[(String, String)]) -> Vec<(&'a str, &'a str)> {
    let mut rest = debug_body(set);
    let mut out = Vec::new();
    for (name, value) in default {
        let raw = rest.strip_prefix("r#").unwrap_or(rest);
        let Some(after) = raw
            .strip_prefix(name.as_str())
            .and_then(|r| r.strip_prefix(": "))
        else {
            return changed_slowly(set, default);
        };
        let at_default = after.starts_with(value.as_str())
            && (after.len() == value.len() || after[value.len()..].starts_with(", "));
        let len = if at_default {
            value.len()
        } else {
            let len = value_len(after);
            out.push((&raw[..name.len()], &after[..len]));
            len
        };
        rest = after[len..].strip_prefix(", ").unwrap_or("");
    }
    if !rest.is_empty() {
        return changed_slowly(set, default);
    }
    out
}

/// [`changed`] for a rendering that is not what was expected (prost's never is): every field
/// compared with the default's in the same place, a misplaced or extra one counted as set, so
/// nothing slips through.
fn changed_slowly<'a>(set: &'a str, default: &[(String, String)]) -> Vec<(&'a str, &'a str)> {
    debug_fields(set)
        .into_iter()
        .zip(default.iter().map(Some).chain(std::iter::repeat(None)))
        .filter(|((n, v), d)| d.is_none_or(|(dn, dv)| n != dn || v != dv))
        .map(|(field, _)| field)
        .collect()
}

/// The top-level `(name, value)` pairs of a struct's `Debug` rendering
/// (`Name { a: 1, r#b: Some(B { c: "x, y" }) }`), raw identifiers without their `r#`.
fn debug_fields(debug: &str) -> Vec<(&str, &str)> {
    let mut rest = debug_body(debug);
    let mut out = Vec::new();
    while let Some((name, after)) = rest.split_once(": ") {
        let len = value_len(after);
        out.push((name.trim_start_matches("r#"), &after[..len]));
        rest = after[len..].strip_prefix(", ").unwrap_or("");
    }
    out
}

/// The fields of `Name { .. }`, without the braces; empty for `Name` (no fields).
fn debug_body(debug: &str) -> &str {
    debug
        .split_once(" { ")
        .and_then(|(_, body)| body.strip_suffix(" }"))
        .unwrap_or("")
}

/// The length of the value `s` starts with: up to the first comma outside brackets and
/// string literals (whose quotes and backslashes `Debug` escapes), or all of `s`.
fn value_len(s: &str) -> usize {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    // Bytes, not chars: every byte of a multi-byte UTF-8 character is above ASCII.
    for (i, c) in s.bytes().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => return i,
            _ => {}
        }
    }
    s.len()
}

/// A set oneof's variant as Envoy names it: `Some(RingHashLbConfig(..))` →
/// `ring_hash_lb_config`. (A message field reads `Some(Name { .. })`, an enum `Some(Name)`.)
fn oneof_variant(value: &str) -> Option<String> {
    let inner = value.strip_prefix("Some(")?;
    let end = inner.find(|c: char| !c.is_ascii_alphanumeric() && c != '_')?;
    (inner.starts_with(|c: char| c.is_ascii_uppercase()) && inner[end..].starts_with('('))
        .then(|| snake_case(&inner[..end]))
}

/// The Envoy name of a oneof value: `ClusterHeader("x")` → `cluster_header`.
fn variant(v: &impl Debug) -> String {
    let debug = format!("{v:?}");
    let end = debug
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(debug.len());
    snake_case(&debug[..end])
}

fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A ConfigSource must be ADS: the proxy has one stream, to its control plane.
fn ads_source(cs: &ConfigSource, at: &str) -> Result<()> {
    only(cs, at, &["config_source_specifier", "resource_api_version"])?;
    // AUTO and V3 both mean v3, the only version the proxy (and Envoy today) speaks.
    if !matches!(
        ApiVersion::try_from(cs.resource_api_version),
        Ok(ApiVersion::Auto | ApiVersion::V3)
    ) {
        return Err(unsupported_value(
            &path(at, "resource_api_version"),
            cs.resource_api_version,
        ));
    }
    match &cs.config_source_specifier {
        Some(config_source::ConfigSourceSpecifier::Ads(_)) => Ok(()),
        Some(other) => Err(unsupported(&path(at, &variant(other)))),
        None => Err(format!("{at}: only `ads` is supported")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster as EnvoyCluster};
    use envoy_types::pb::envoy::config::route::v3::{route_action, RouteAction};

    use super::*;

    // Read through `Debug` only.
    #[allow(dead_code)]
    #[derive(Debug, Default, Clone)]
    struct Inner {
        s: String,
        n: u32,
    }

    #[allow(dead_code)]
    #[derive(Debug, Clone)]
    enum Choice {
        Plain(String),
        NestedInner(Inner),
    }

    #[allow(dead_code)]
    #[derive(Debug, Default, Clone)]
    struct Outer {
        name: String,
        inner: Option<Inner>,
        list: Vec<Inner>,
        map: BTreeMap<String, String>,
        choice: Option<Choice>,
        r#match: bool,
        pair: (u8, u8),
    }

    const TRICKY: &str = "a, b: {c} [d] (e) \"f\", 'g' \\";

    #[test]
    fn debug_fields_split_at_top_level_commas_only() {
        let o = Outer {
            name: TRICKY.into(),
            inner: Some(Inner {
                s: "x, y: }".into(),
                n: 1,
            }),
            list: vec![Inner::default(), Inner::default()],
            map: [("k, \"1\"".to_string(), "v: {".to_string())].into(),
            choice: Some(Choice::Plain("),(".into())),
            r#match: true,
            pair: (1, 2),
        };
        let text = format!("{o:?}");
        let fields = debug_fields(&text);
        let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["name", "inner", "list", "map", "choice", "match", "pair"]
        );
        assert_eq!(fields[0].1, format!("{TRICKY:?}"));
        assert_eq!(fields[1].1, format!("{:?}", o.inner));
        assert_eq!(fields[3].1, format!("{:?}", o.map));
        assert_eq!(fields[4].1, format!("{:?}", o.choice));
        assert_eq!(fields[6].1, "(1, 2)");
        assert!(debug_fields("Unit").is_empty());
    }

    #[test]
    fn set_fields_names_what_differs_from_the_default() {
        assert!(set_fields(&Outer::default(), &[]).is_empty());
        let o = Outer {
            name: TRICKY.into(),
            list: vec![Inner::default()],
            pair: (0, 1),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["name", "list", "pair"]);
        assert_eq!(set_fields(&o, &["name", "pair"]), ["list"]);
        // A set value equal to the default's is not set; `Some(default)` is.
        let o = Outer {
            inner: Some(Inner::default()),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["inner"]);
        // Raw identifiers lose their `r#`; maps count when not empty.
        let o = Outer {
            r#match: true,
            map: [("{".to_string(), "}".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["map", "match"]);
        assert!(set_fields(&o, &["map", "match"]).is_empty());
    }

    #[test]
    fn an_unexpected_rendering_counts_as_set() {
        let default = [("a", "1"), ("c", "3")].map(|(n, v)| (n.to_string(), v.to_string()));
        assert_eq!(changed("X { a: 1, c: 4 }", &default), [("c", "4")]);
        // `b` where `c` was expected: compared field by field, the misplaced one is set.
        assert_eq!(changed("X { a: 1, b: 3 }", &default), [("b", "3")]);
        assert_eq!(changed("X { a: 1, c: 3, d: 4 }", &default), [("d", "4")]);
    }

    #[test]
    fn a_set_oneof_is_named_by_its_variant() {
        let o = Outer {
            choice: Some(Choice::NestedInner(Inner {
                s: "Some(X(".into(),
                n: 2,
            })),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["nested_inner"]);
        let o = Outer {
            choice: Some(Choice::Plain(String::new())),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["plain"]);
        assert_eq!(variant(&Choice::Plain("a".into())), "plain");
        // Optional messages and enums are not oneofs.
        assert_eq!(
            oneof_variant("Some(Duration { seconds: 1, nanos: 0 })"),
            None
        );
        assert_eq!(oneof_variant("Some(V4Only)"), None);
        assert_eq!(oneof_variant("Some(\"Abc(\")"), None);
    }

    #[test]
    fn envoy_messages_are_checked_by_their_envoy_field_names() {
        let mut c = EnvoyCluster {
            name: "a".into(),
            dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
            lb_config: Some(cluster::LbConfig::RingHashLbConfig(Default::default())),
            ..Default::default()
        };
        c.typed_extension_protocol_options
            .insert("x".into(), Any::default());
        assert_eq!(
            set_fields(&c, &["name"]),
            [
                "typed_extension_protocol_options",
                "dns_lookup_family",
                "ring_hash_lb_config"
            ]
        );
        assert_eq!(
            only(
                &c,
                "",
                &["name", "lb_config", "typed_extension_protocol_options"]
            ),
            Err("field `dns_lookup_family` is not supported by Hypha".into())
        );
        let ra = RouteAction {
            idle_timeout: Some(Default::default()),
            cluster_specifier: Some(route_action::ClusterSpecifier::ClusterHeader("x-c".into())),
            ..Default::default()
        };
        assert_eq!(
            only(&ra, "route", &[]),
            Err(
                "fields `route.idle_timeout`, `route.cluster_header` are not supported by Hypha"
                    .into()
            )
        );
    }
}
