//! The generated mesh config: services, workloads, VirtualServices and DestinationRules in a
//! scratch directory the control plane reads.

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::{Params, HTTP_PORT, NAMESPACES};

pub(crate) fn namespace(service: usize) -> String {
    format!("bench-{}", service % NAMESPACES)
}

/// Endpoint `g` (global index) has 10.x.y.z and fd00:10::x:y.
pub(crate) fn endpoint_v4(g: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | (g as u32 + 1))
}

pub(crate) fn endpoint_v6(g: usize) -> Ipv6Addr {
    let g = g as u32 + 1;
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, (g >> 16) as u16, g as u16)
}

pub(crate) fn service_yaml(i: usize) -> String {
    let ns = namespace(i);
    let vip4 = Ipv4Addr::from(0xf000_0000 | (i as u32 + 1));
    let vip6 = Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x240,
        0,
        0,
        0,
        (i >> 16) as u16,
        i as u16 + 1,
    );
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  hosts: [svc-{i}.{ns}.svc.cluster.local]
  addresses: [{vip4}, \"{vip6}\"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {HTTP_PORT}, name: http, protocol: HTTP}}
  workloadSelector:
    labels: {{app: svc-{i}}}
"
    )
}

pub(crate) fn workload_name(i: usize, e: usize) -> String {
    format!("svc-{i}-{e}")
}

pub(crate) fn workload_version(e: usize) -> &'static str {
    if e.is_multiple_of(2) {
        "v1"
    } else {
        "v2"
    }
}

pub(crate) fn workload_yaml(i: usize, e: usize, endpoints: usize) -> String {
    let ns = namespace(i);
    let g = i * endpoints + e;
    let name = workload_name(i, e);
    let version = workload_version(e);
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {ns}
  annotations:
    hypha.dev/addresses: \"{v6}\"
spec:
  address: {v4}
  labels: {{app: svc-{i}, version: {version}}}
  serviceAccount: svc-{i}
  ports: {{http: {HTTP_PORT}}}
",
        v4 = endpoint_v4(g),
        v6 = endpoint_v6(g),
    )
}

pub(crate) fn virtual_service_yaml(i: usize, timeout_s: u64) -> String {
    let ns = namespace(i);
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  hosts: [svc-{i}]
  http:
  - name: canary
    route:
    - destination: {{host: svc-{i}, subset: v1}}
      weight: 90
    - destination: {{host: svc-{i}, subset: v2}}
      weight: 10
    timeout: {timeout_s}s
"
    )
}

pub(crate) fn destination_rule_yaml(i: usize) -> String {
    let ns = namespace(i);
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  host: svc-{i}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"
    )
}

/// The VirtualService that the change phase rewrites, and its initial timeout.
pub(crate) const CHANGED_SERVICE: usize = 0;
pub(crate) const INITIAL_TIMEOUT_S: u64 = 2;

/// A scratch directory holding the config (`config/`) and the control plane's log; removed on
/// drop unless `KEEP_BENCH_DIR` is set.
pub(crate) struct BenchDir {
    root: PathBuf,
    keep: bool,
}

impl BenchDir {
    pub(crate) fn create() -> Result<BenchDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let root = std::env::temp_dir().join(format!(
            "hypha-control-scale-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&root).with_context(|| format!("cannot create {}", root.display()))?;
        Ok(BenchDir {
            root,
            keep: std::env::var_os("KEEP_BENCH_DIR").is_some(),
        })
    }

    pub(crate) fn root(&self) -> &std::path::Path {
        &self.root
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.root.join("config")
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.root.join("control-plane.log")
    }

    pub(crate) fn virtual_service_path(&self, i: usize) -> PathBuf {
        self.config()
            .join(namespace(i))
            .join(format!("virtualservice-svc-{i}.yaml"))
    }

    /// Writes the whole config: per namespace one file of services, one of workloads, one of
    /// destination rules, and one file per VirtualService (so that one can be rewritten).
    pub(crate) fn generate(&self, p: &Params) -> Result<()> {
        for n in 0..NAMESPACES {
            std::fs::create_dir_all(self.config().join(format!("bench-{n}")))?;
        }
        let mut services = vec![String::new(); NAMESPACES];
        let mut workloads = vec![String::new(); NAMESPACES];
        let mut rules = vec![String::new(); NAMESPACES];
        for i in 0..p.services {
            let n = i % NAMESPACES;
            services[n].push_str("---\n");
            services[n].push_str(&service_yaml(i));
            for e in 0..p.endpoints {
                workloads[n].push_str("---\n");
                workloads[n].push_str(&workload_yaml(i, e, p.endpoints));
            }
            if i.is_multiple_of(10) {
                rules[n].push_str("---\n");
                rules[n].push_str(&destination_rule_yaml(i));
                std::fs::write(
                    self.virtual_service_path(i),
                    virtual_service_yaml(i, INITIAL_TIMEOUT_S),
                )?;
            }
        }
        for n in 0..NAMESPACES {
            let dir = self.config().join(format!("bench-{n}"));
            for (file, text) in [
                ("services.yaml", &services[n]),
                ("workloads.yaml", &workloads[n]),
                ("destinationrules.yaml", &rules[n]),
            ] {
                if !text.is_empty() {
                    std::fs::write(dir.join(file), text)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the changed VirtualService atomically (write elsewhere, rename into place), so
    /// the control plane never reads a half-written file.
    pub(crate) fn rewrite_virtual_service(&self, timeout_s: u64) -> Result<()> {
        let tmp = self.root.join("virtualservice.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(virtual_service_yaml(CHANGED_SERVICE, timeout_s).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.virtual_service_path(CHANGED_SERVICE))?;
        Ok(())
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
