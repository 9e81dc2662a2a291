//! What the demo runs: bookinfo's six workloads (as in `examples/bookinfo/workloads.yaml`), the
//! client that drives traffic, and the loopback ports each process listens on; or, with
//! `--pods`, the pod each runs in and the fixed ports there.
//!
//! Ports are picked up front (bind port 0, keep the listener until every port is chosen, then
//! release them all) because the WorkloadEntries must name each sidecar's inbound port before
//! the control plane starts. A process that then loses its port to someone else is restarted
//! on new ones (see `run`).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::str::FromStr;

/// The namespace every demo workload lives in.
pub const NAMESPACE: &str = "bookinfo";
/// The service port every bookinfo service exposes (`examples/bookinfo/services.yaml`).
pub const SERVICE_PORT: u16 = 9080;
/// The workload that drives traffic: a sidecar only, in HTTP proxy mode.
pub const CLIENT: &str = "demo-client";
/// A client of another tenant (namespace `guest`): its calls into bookinfo fail the handshake.
pub const GUEST: &str = "guest-client";
pub const GUEST_NAMESPACE: &str = "guest";
/// In a pod: every sidecar's admin port, on the pod's loopback.
pub const POD_ADMIN_PORT: u16 = 15000;
/// In a pod: the client sidecars' HTTP proxy port, on the pod's loopback, where the demo sends
/// its traffic from inside the pod.
pub const POD_PROXY_PORT: u16 = 15080;

/// The role a `hypha demo-app` process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Productpage,
    Details,
    ReviewsV1,
    ReviewsV2,
    ReviewsV3,
    Ratings,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Productpage,
        Role::Details,
        Role::ReviewsV1,
        Role::ReviewsV2,
        Role::ReviewsV3,
        Role::Ratings,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Productpage => "productpage",
            Role::Details => "details",
            Role::ReviewsV1 => "reviews-v1",
            Role::ReviewsV2 => "reviews-v2",
            Role::ReviewsV3 => "reviews-v3",
            Role::Ratings => "ratings",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?}; one of {}", names.join(", "))
            })
    }
}

/// The address families a workload has, as in the bookinfo example: details is IPv4-only,
/// ratings IPv6-only, the others dual-stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    Dual,
}

/// One bookinfo workload: its WorkloadEntry, the app role behind it and its sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub app: &'static str,
    pub version: &'static str,
    pub service_account: &'static str,
    /// The name of its service's port (`http`, or `grpc` for ratings): the key of the
    /// WorkloadEntry's `ports` map.
    pub port_name: &'static str,
    pub family: Family,
    pub role: Role,
}

const fn workload(
    name: &'static str,
    app: &'static str,
    version: &'static str,
    service_account: &'static str,
    port_name: &'static str,
    family: Family,
    role: Role,
) -> Workload {
    Workload {
        name,
        app,
        version,
        service_account,
        port_name,
        family,
        role,
    }
}

/// The workloads, in start order (callees before callers).
pub const WORKLOADS: [Workload; 6] = [
    workload(
        "ratings-v1",
        "ratings",
        "v1",
        "bookinfo-ratings",
        "grpc",
        Family::V6,
        Role::Ratings,
    ),
    workload(
        "details-v1",
        "details",
        "v1",
        "bookinfo-details",
        "http",
        Family::V4,
        Role::Details,
    ),
    workload(
        "reviews-v1",
        "reviews",
        "v1",
        "bookinfo-reviews",
        "http",
        Family::Dual,
        Role::ReviewsV1,
    ),
    workload(
        "reviews-v2",
        "reviews",
        "v2",
        "bookinfo-reviews",
        "http",
        Family::Dual,
        Role::ReviewsV2,
    ),
    workload(
        "reviews-v3",
        "reviews",
        "v3",
        "bookinfo-reviews",
        "http",
        Family::Dual,
        Role::ReviewsV3,
    ),
    workload(
        "productpage-v1",
        "productpage",
        "v1",
        "bookinfo-productpage",
        "http",
        Family::Dual,
        Role::Productpage,
    ),
];

/// A service's mesh name, e.g. `reviews.bookinfo.svc.cluster.local`.
pub fn host(app: &str) -> String {
    format!("{app}.{NAMESPACE}.svc.cluster.local")
}

/// Where one workload's processes listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadPorts {
    /// The app (`hypha demo-app --listen`).
    pub app: SocketAddr,
    /// The sidecar's HTTP proxy listener, the app's way out (`--http-proxy`); none in a pod,
    /// where the app calls services by name and the capture takes it to its sidecar.
    pub http_proxy: Option<SocketAddr>,
    /// The WorkloadEntry's port (its `ports` map): on loopback the sidecar's inbound port, the
    /// same on every loopback address the workload has; in a pod the app's own port, whose
    /// connections the capture hands to the sidecar.
    pub inbound: u16,
    /// The sidecar's admin listener.
    pub admin: SocketAddr,
}

/// A pod's network namespace and addresses (`hypha demo --pods`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddrs {
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// One workload and its ports.
#[derive(Debug, Clone)]
pub struct Planned {
    pub workload: Workload,
    /// The workload's family on this machine (dual-stack falls back to IPv4 without `::1`).
    pub family: Family,
    pub ports: WorkloadPorts,
    /// Its pod, with `--pods`.
    pub pod: Option<PodAddrs>,
}

impl Planned {
    /// The workload's addresses (its pod's, or loopback): primary first.
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        let (v4, v6) = match &self.pod {
            Some(pod) => (pod.ipv4.into(), pod.ipv6.into()),
            None => (Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()),
        };
        match self.family {
            Family::V4 => vec![v4],
            Family::V6 => vec![v6],
            Family::Dual => vec![v4, v6],
        }
    }

    /// The sidecar's inbound listeners.
    pub fn inbound(&self) -> Vec<SocketAddr> {
        self.ips()
            .into_iter()
            .map(|ip| SocketAddr::new(ip, self.ports.inbound))
            .collect()
    }
}

/// Every port of the demo.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The control plane's xDS listener.
    pub control: SocketAddr,
    pub workloads: Vec<Planned>,
    /// The traffic client's sidecar: its HTTP proxy listener and admin.
    pub client_proxy: SocketAddr,
    pub client_admin: SocketAddr,
    /// The guest's sidecar (namespace `guest`, another tenant): proxy and admin.
    pub guest_proxy: SocketAddr,
    pub guest_admin: SocketAddr,
    /// Whether `::1` works here; without it every workload is IPv4-only.
    pub ipv6: bool,
    /// With `--pods`: every process's pod but the control plane's (which runs on the node),
    /// by workload name ([`CLIENT`] and [`GUEST`] included).
    pub pods: BTreeMap<String, PodAddrs>,
}

impl Plan {
    /// Picks free loopback ports for everything.
    pub fn allocate() -> io::Result<Plan> {
        let ipv6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
        let mut a = Allocator::default();
        let control = a.v4()?;
        let workloads = WORKLOADS
            .iter()
            .map(|w| {
                let family = if ipv6 { w.family } else { Family::V4 };
                Ok(Planned {
                    workload: *w,
                    family,
                    ports: a.workload(family)?,
                    pod: None,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let client_proxy = a.v4()?;
        let client_admin = a.v4()?;
        let guest_proxy = a.v4()?;
        let guest_admin = a.v4()?;
        Ok(Plan {
            control,
            workloads,
            client_proxy,
            client_admin,
            guest_proxy,
            guest_admin,
            ipv6,
            pods: BTreeMap::new(),
        })
    }

    /// Where the node reaches `addr` that the process `name` listens on: from inside its pod
    /// (which serves admin and proxy listeners on its loopback only), or as it is.
    pub fn reach(&self, name: &str, addr: SocketAddr) -> crate::client::Reach {
        crate::client::Reach {
            addr,
            netns: self.pods.get(name).map(|p| p.netns.clone()),
        }
    }

    /// The plan for pods: the control plane at `control` on the node, everything else in its
    /// pod from `pods` (one per workload, [`CLIENT`] and [`GUEST`]) on fixed ports: each app
    /// on its service port, each sidecar's admin on [`POD_ADMIN_PORT`], the clients' HTTP
    /// proxies on [`POD_PROXY_PORT`], those two on the pod's loopback only, as Istio's are
    /// (the node reaches them from inside the pod, [`Plan::reach`]). Panics if a pod is
    /// missing.
    pub fn in_pods(control: SocketAddr, pods: BTreeMap<String, PodAddrs>) -> Plan {
        let pod = |name: &str| pods[name].clone();
        let at = |name: &str, port| {
            assert!(pods.contains_key(name), "no pod for {name}");
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
        };
        let workloads = WORKLOADS
            .iter()
            .map(|w| Planned {
                workload: *w,
                family: w.family,
                ports: WorkloadPorts {
                    app: (Ipv6Addr::UNSPECIFIED, SERVICE_PORT).into(),
                    http_proxy: None,
                    inbound: SERVICE_PORT,
                    admin: at(w.name, POD_ADMIN_PORT),
                },
                pod: Some(pod(w.name)),
            })
            .collect();
        Plan {
            control,
            workloads,
            client_proxy: at(CLIENT, POD_PROXY_PORT),
            client_admin: at(CLIENT, POD_ADMIN_PORT),
            guest_proxy: at(GUEST, POD_PROXY_PORT),
            guest_admin: at(GUEST, POD_ADMIN_PORT),
            ipv6: true,
            pods,
        }
    }

    /// Whether the workloads run in pods.
    pub fn has_pods(&self) -> bool {
        !self.pods.is_empty()
    }

    /// New ports for one workload (after it lost one of its ports to another process).
    pub fn reallocate(&mut self, index: usize) -> io::Result<()> {
        let w = &mut self.workloads[index];
        w.ports = Allocator::default().workload(w.family)?;
        Ok(())
    }

    pub fn reallocate_control(&mut self) -> io::Result<()> {
        self.control = Allocator::default().v4()?;
        Ok(())
    }

    /// New ports for both client sidecars (after one lost a port to another process).
    pub fn reallocate_client(&mut self) -> io::Result<()> {
        let mut a = Allocator::default();
        self.client_proxy = a.v4()?;
        self.client_admin = a.v4()?;
        self.guest_proxy = a.v4()?;
        self.guest_admin = a.v4()?;
        Ok(())
    }
}

/// Holds every port it hands out until dropped, so no port is handed out twice.
#[derive(Default)]
struct Allocator {
    held: Vec<TcpListener>,
}

impl Allocator {
    fn hold(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        let local = l.local_addr()?;
        self.held.push(l);
        Ok(local)
    }

    fn v4(&mut self) -> io::Result<SocketAddr> {
        self.hold((Ipv4Addr::LOCALHOST, 0).into())
    }

    fn v6(&mut self) -> io::Result<SocketAddr> {
        self.hold((Ipv6Addr::LOCALHOST, 0).into())
    }

    /// A port free on both loopback addresses.
    fn dual(&mut self) -> io::Result<u16> {
        let mut last = None;
        for _ in 0..50 {
            let v4 = self.v4()?;
            match self.hold((Ipv6Addr::LOCALHOST, v4.port()).into()) {
                Ok(_) => return Ok(v4.port()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no port free on both 127.0.0.1 and ::1")))
    }

    fn workload(&mut self, family: Family) -> io::Result<WorkloadPorts> {
        let (app, inbound) = match family {
            Family::V4 => (self.v4()?, self.v4()?.port()),
            Family::V6 => (self.v6()?, self.v6()?.port()),
            Family::Dual => (self.v4()?, self.dual()?),
        };
        Ok(WorkloadPorts {
            app,
            http_proxy: Some(self.v4()?),
            inbound,
            admin: self.v4()?,
        })
    }
}
