//! Small constructors for the Envoy protos translation builds over and over: addresses,
//! durations, ADS config sources, typed `Any` configs, string matchers.

use std::time::Duration as StdDuration;

use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};

pub const HCM: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
pub const ROUTER: &str = "envoy.filters.http.router";
pub const FAULT: &str = "envoy.filters.http.fault";
pub const UPSTREAM_HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

pub fn any<M: prost::Message + prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

pub fn duration(d: StdDuration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn secs(s: u64) -> Duration {
    duration(StdDuration::from_secs(s))
}

pub fn u32v(v: u32) -> UInt32Value {
    UInt32Value { value: v }
}

pub fn boolv(v: bool) -> BoolValue {
    BoolValue { value: v }
}

/// Resources delivered over the same ADS stream.
pub fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

pub fn string_matcher(pattern: MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

/// A percentage (0–100, fractional) as Envoy's per-million fraction.
pub fn percent(p: f64) -> FractionalPercent {
    FractionalPercent {
        numerator: (p.clamp(0.0, 100.0) * 10_000.0).round() as u32,
        denominator: DenominatorType::Million as i32,
    }
}
