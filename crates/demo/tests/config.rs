//! The demo's generated config: valid, everything but the workloads taken from
//! `examples/bookinfo` unchanged, and every service endpoint (as the control plane's registry
//! resolves it) at the sidecar inbound port and loopback addresses the demo starts the
//! workload's sidecar with.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use hypha_control::registry::Registry;
use hypha_demo::topology::{
    host, Family, Plan, PodAddrs, Workload, CLIENT, GUEST, NAMESPACE, SERVICE_PORT, WORKLOADS,
};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Workload `wl` as an endpoint of its service in the registry: the endpoint, the port its
/// service port goes to, and its addresses.
fn endpoint_of<'r>(
    registry: &'r Registry,
    wl: &Workload,
) -> (&'r hypha_control::registry::Endpoint, u32, Vec<IpAddr>) {
    let service = registry
        .service(&host(wl.app), NAMESPACE)
        .unwrap_or_else(|| panic!("service {}", wl.app));
    let port = service.port(u32::from(SERVICE_PORT)).unwrap();
    assert_eq!(port.name, wl.port_name);
    let endpoint = service
        .endpoints
        .iter()
        .find(|e| e.workload_name == wl.name)
        .unwrap_or_else(|| panic!("{} is an endpoint of {}", wl.name, wl.app));
    let addresses = endpoint
        .addresses
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    (endpoint, endpoint.port_for(port), addresses)
}

#[test]
fn generated_config_is_valid_and_points_at_the_sidecars() {
    let plan = Plan::allocate().unwrap();
    let dir = TempDir::new("hypha-demo-config");
    let cfg =
        hypha_demo::config::write(&dir.0, &plan, None).expect("the generated config is valid");
    assert_eq!(cfg.workload_entries.len(), WORKLOADS.len());

    // Everything but the workloads is the example, byte for byte.
    for (name, yaml) in hypha_control::EMBEDDED_CONFIG {
        let file = name.rsplit(':').next().unwrap();
        let written = std::fs::read_to_string(dir.0.join(file)).unwrap();
        if file == "workloads.yaml" {
            assert_ne!(&written, yaml);
        } else {
            assert_eq!(&written, yaml, "{file}");
        }
    }

    let registry = Registry::build(&cfg);
    for w in &plan.workloads {
        let wl = &w.workload;
        let (endpoint, port, addresses) = endpoint_of(&registry, wl);
        assert_eq!(
            port,
            u32::from(w.ports.inbound),
            "{}: the service port goes to the sidecar's inbound port",
            wl.name
        );
        assert_eq!(addresses, w.ips(), "{}", wl.name);
        assert!(addresses.iter().all(IpAddr::is_loopback));
        // The sidecar listens on exactly those addresses, at that port.
        let inbound: Vec<(IpAddr, u16)> = w.inbound().iter().map(|a| (a.ip(), a.port())).collect();
        let expected: Vec<(IpAddr, u16)> =
            addresses.iter().map(|ip| (*ip, w.ports.inbound)).collect();
        assert_eq!(inbound, expected);
        assert_eq!(endpoint.labels["app"], wl.app);
        assert_eq!(endpoint.labels["version"], wl.version);
        assert_eq!(endpoint.service_account, wl.service_account);
    }

    // The families of the example: details IPv4 only, ratings IPv6 only, the rest both.
    if plan.ipv6 {
        let family = |name: &str| {
            plan.workloads
                .iter()
                .find(|w| w.workload.name == name)
                .unwrap()
                .family
        };
        assert_eq!(family("details-v1"), Family::V4);
        assert_eq!(family("ratings-v1"), Family::V6);
        assert_eq!(family("reviews-v2"), Family::Dual);
        assert_eq!(family("productpage-v1"), Family::Dual);
    }

    // Every port is different.
    let mut ports = vec![
        plan.control.port(),
        plan.client_proxy.port(),
        plan.client_admin.port(),
    ];
    for w in &plan.workloads {
        ports.extend([
            w.ports.app.port(),
            w.ports
                .http_proxy
                .expect("on loopback every app has its sidecar's proxy")
                .port(),
            w.ports.inbound,
            w.ports.admin.port(),
        ]);
    }
    let n = ports.len();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), n, "ports are unique");
}

#[test]
fn in_pods_each_endpoint_is_its_pod_at_the_apps_own_port() {
    // Pods as `hypha demo --pods` makes them (no root needed to plan them).
    let names = WORKLOADS.iter().map(|w| w.name).chain([CLIENT, GUEST]);
    let pods: BTreeMap<String, PodAddrs> = names
        .zip(2u8..)
        .map(|(name, host)| {
            let addrs = PodAddrs {
                netns: format!("hypha100-{name}"),
                ipv4: Ipv4Addr::new(10, 77, 100, host),
                ipv6: Ipv6Addr::new(0xfd77, 0, 0, 100, 0, 0, 0, u16::from(host)),
            };
            (name.to_owned(), addrs)
        })
        .collect();
    let plan = Plan::in_pods("10.77.100.1:15012".parse().unwrap(), pods.clone());
    assert!(plan.has_pods());
    let dir = TempDir::new("hypha-demo-config-pods");
    let cfg = hypha_demo::config::write(&dir.0, &plan, None).expect("valid");
    let registry = Registry::build(&cfg);
    for w in &plan.workloads {
        let wl = &w.workload;
        let pod = &pods[wl.name];
        let (_, port, addresses) = endpoint_of(&registry, wl);
        // The app's own port: the pod's capture hands it to the sidecar.
        assert_eq!(port, u32::from(SERVICE_PORT), "{}", wl.name);
        let expected: Vec<IpAddr> = match wl.family {
            Family::V4 => vec![pod.ipv4.into()],
            Family::V6 => vec![pod.ipv6.into()],
            Family::Dual => vec![pod.ipv4.into(), pod.ipv6.into()],
        };
        assert_eq!(addresses, expected, "{}", wl.name);
        // No proxy settings for the app; the admin port on the pod's loopback, reached from
        // the node inside the pod.
        assert_eq!(w.ports.http_proxy, None);
        assert!(w.ports.admin.ip().is_loopback(), "{}", wl.name);
        let reach = plan.reach(wl.name, w.ports.admin);
        assert_eq!(reach.netns.as_deref(), Some(pod.netns.as_str()));
    }
    for (name, proxy) in [(CLIENT, plan.client_proxy), (GUEST, plan.guest_proxy)] {
        assert!(proxy.ip().is_loopback(), "{name}");
        assert_eq!(
            plan.reach(name, proxy).netns,
            Some(pods[name].netns.clone())
        );
    }
}

#[test]
fn an_invalid_config_is_refused_with_every_error() {
    let dir = TempDir::new("hypha-demo-invalid");
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(
        dir.0.join("bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x, namespace: bookinfo}\n\
         spec:\n  hosts: [x]\n  http:\n  - route: [{destination: {host: x}, weight: 300}]\n",
    )
    .unwrap();
    let err = hypha_demo::config::validate(&dir.0).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("the generated config is invalid"),
        "{text}"
    );
    assert!(text.contains("bad.yaml"), "{text}");
}

#[tokio::test]
async fn a_missing_binary_fails_clearly() {
    let opts = hypha_demo::Options {
        exe: "/nonexistent/hypha".into(),
        requests: 1,
        concurrency: 1,
        serve: false,
        keys: hypha_demo::Keys::Software,
        placement: hypha_demo::Placement::Loopback,
        kubernetes: false,
        rotate_root: None,
        dir: None,
        progress: std::sync::Arc::new(|_: &str| {}),
    };
    let err = hypha_demo::run(opts).await.expect_err("fails");
    assert!(
        matches!(err, hypha_demo::DemoError::Spawn { ref name, .. } if name == "control plane"),
        "{err}"
    );
    // A failed demo keeps its directory for the logs; this one has nothing worth keeping.
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("hypha-demo-{}", std::process::id())),
    );
}

#[test]
fn with_a_token_every_signer_keeps_its_key_in_it() {
    let plan = Plan::allocate().unwrap();
    let dir = TempDir::new("hypha-demo-config-pkcs11");
    let token = hypha_demo::hsm::Token {
        label: "hypha-control".into(),
        conf: dir.0.join("hsm/control.conf"),
        pin_file: dir.0.join("hsm/control.pin"),
    };
    let cfg = hypha_demo::config::write(&dir.0, &plan, Some(&token))
        .expect("the generated config is valid");
    let example = hypha_control::initial_config(None).unwrap();

    // The example's signers, each with its key in the token; the tenants as they were.
    assert_eq!(cfg.mesh.tenants, example.mesh.tenants);
    assert_eq!(cfg.mesh.signers.len(), example.mesh.signers.len());
    for (signer, original) in cfg.mesh.signers.iter().zip(&example.mesh.signers) {
        assert_eq!(signer.name, original.name);
        assert_eq!(signer.max_certificate_ttl, original.max_certificate_ttl);
        let key = signer.key.pkcs11.as_ref().expect("in the token");
        assert_eq!(key.module, hypha_demo::hsm::MODULE);
        assert_eq!(key.token_label, "hypha-control");
        assert_eq!(key.key_label, format!("{}-ca", signer.name));
        assert_eq!(
            key.pin_file.as_deref(),
            Some(token.pin_file.to_str().unwrap())
        );
        let allow = key.attestation.as_ref().unwrap().allow.as_ref().unwrap();
        assert_eq!(allow.labels, ["hypha-control"]);
    }
    // The PIN is read from its file, never written into the config.
    let yaml = std::fs::read_to_string(dir.0.join("mesh.yaml")).unwrap();
    assert!(!yaml.contains("pin:"), "{yaml}");
}
