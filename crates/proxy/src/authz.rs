//! Authorization on the inbound side: the Envoy RBAC filters of an inbound chain (what the
//! control plane makes of Istio's AuthorizationPolicy), compiled once per config and checked
//! per request (HTTP) or per connection (TCP), in order: a DENY filter denies when one of its
//! policies matches, an ALLOW filter denies when none does, a LOG filter (AUDIT) only counts.
//!
//! A policy matches when one of its permissions (what is asked: method, path, host, headers,
//! destination port and address, SNI) and one of its principals (who asks: the verified
//! SPIFFE ID, addresses, headers) match. Every string test goes through the `matcher` crate.

use std::net::{IpAddr, SocketAddr};

use hypha_matcher::{Condition, Request, Rule, StringMatch, Table, Test};

/// An inbound chain's RBAC filters, in the order they run. Empty: everything is allowed.
#[derive(Debug, Default)]
pub struct Authz {
    pub filters: Vec<Rbac>,
}

#[derive(Debug)]
pub struct Rbac {
    pub action: Action,
    /// (name, permission, principal): a policy's permissions and principals each folded into
    /// one `Or`.
    pub policies: Vec<(String, Permission, Principal)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// AUDIT: counted, never denies.
    Log,
}

#[derive(Debug)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    /// A test on the request (method, path, authority, a header); never holds on TCP.
    Http(Leaf),
    DestinationPort(u16),
    DestinationIp(Cidr),
    /// The SNI the client sent (Hypha's own clients send none).
    ServerName(Leaf),
}

#[derive(Debug)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A verified client certificate, whose SPIFFE ID matches if a test is given.
    Authenticated(Option<Leaf>),
    /// The address of the connection's peer.
    DirectRemoteIp(Cidr),
    /// The original client's address; without trusted proxies in front, the peer's.
    RemoteIp(Cidr),
    Http(Leaf),
}

/// Tests through the matcher crate, any of which may hold: one table of one rule per test,
/// over the request, or over a value of its own (a SPIFFE ID, an SNI) presented as a path.
/// Alternatives (Istio's `paths: [...]`, `hosts: [...]`, `principals: [...]`) are one leaf,
/// so a list of a hundred paths is one pass over the path, not a hundred.
#[derive(Debug)]
pub struct Leaf(Table);

impl Leaf {
    pub fn request(conditions: Vec<Condition>) -> Result<Leaf, String> {
        Leaf::any_of(vec![conditions])
    }

    /// Holds when all the conditions of one of the alternatives hold.
    pub fn any_of(alternatives: Vec<Vec<Condition>>) -> Result<Leaf, String> {
        Table::compile(
            alternatives
                .into_iter()
                .map(|conditions| Rule { conditions })
                .collect(),
        )
        .map(Leaf)
        .map_err(|e| e.to_string())
    }

    pub fn value(m: StringMatch) -> Result<Leaf, String> {
        Leaf::any_value(vec![m])
    }

    /// Holds when the value matches one of `matches`.
    pub fn any_value(matches: Vec<StringMatch>) -> Result<Leaf, String> {
        Leaf::any_of(matches.into_iter().map(Leaf::on_value).collect())
    }

    /// The condition of a value leaf, on the value presented as a path.
    fn on_value(m: StringMatch) -> Vec<Condition> {
        vec![Condition {
            attr: hypha_matcher::Attr::Path,
            test: Test::Matches(m),
            invert: false,
        }]
    }

    /// The rules of the leaf's table (alternatives).
    pub fn alternatives(&self) -> usize {
        self.0.len()
    }

    fn holds_on(&self, req: &impl Request) -> bool {
        self.0.first_match(req).is_some()
    }

    fn holds_for(&self, value: &str) -> bool {
        self.holds_on(&Value(value.as_bytes()))
    }
}

/// A standalone value, seen by a [`Leaf::value`] table as a request's path.
struct Value<'a>(&'a [u8]);

impl Request for Value<'_> {
    fn path(&self) -> &[u8] {
        self.0
    }
    fn authority(&self) -> &[u8] {
        b""
    }
    fn method(&self) -> &[u8] {
        b""
    }
    fn scheme(&self) -> &[u8] {
        b""
    }
    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }
    fn query(&self, _: &str) -> Option<&[u8]> {
        None
    }
}

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// What a decision looks at. `http` is the request on HTTP chains, `None` on TCP ones.
pub struct Ctx<'a, R: Request> {
    pub http: Option<&'a R>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub principal: Option<&'a str>,
    pub sni: Option<&'a str>,
}

/// The outcome of the filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// An AUDIT policy matched.
    pub audited: bool,
}

impl Authz {
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn check<R: Request>(&self, ctx: &Ctx<'_, R>) -> Decision {
        let mut audited = false;
        for f in &self.filters {
            let matched = f
                .policies
                .iter()
                .any(|(_, perm, princ)| perm.holds(ctx) && princ.holds(ctx));
            match f.action {
                Action::Deny if matched => {
                    return Decision {
                        allowed: false,
                        audited,
                    }
                }
                Action::Allow if !matched => {
                    return Decision {
                        allowed: false,
                        audited,
                    }
                }
                Action::Log => audited |= matched,
                _ => {}
            }
        }
        Decision {
            allowed: true,
            audited,
        }
    }
}

impl Permission {
    fn holds<R: Request>(&self, ctx: &Ctx<'_, R>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.holds(ctx)),
            Permission::Or(v) => v.iter().any(|p| p.holds(ctx)),
            Permission::Not(p) => !p.holds(ctx),
            Permission::Http(leaf) => ctx.http.is_some_and(|r| leaf.holds_on(r)),
            Permission::DestinationPort(p) => ctx.destination.port() == *p,
            Permission::DestinationIp(c) => c.contains(ctx.destination.ip()),
            Permission::ServerName(leaf) => leaf.holds_for(ctx.sni.unwrap_or("")),
        }
    }
}

impl Principal {
    fn holds<R: Request>(&self, ctx: &Ctx<'_, R>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.holds(ctx)),
            Principal::Or(v) => v.iter().any(|p| p.holds(ctx)),
            Principal::Not(p) => !p.holds(ctx),
            Principal::Authenticated(None) => ctx.principal.is_some(),
            Principal::Authenticated(Some(leaf)) => {
                ctx.principal.is_some_and(|p| leaf.holds_for(p))
            }
            Principal::DirectRemoteIp(c) | Principal::RemoteIp(c) => c.contains(ctx.source.ip()),
            Principal::Http(leaf) => ctx.http.is_some_and(|r| leaf.holds_on(r)),
        }
    }
}
