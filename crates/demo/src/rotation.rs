//! `hypha demo --rotate-root <tenant>`: the tenant's root rotated end to end while page views
//! keep flowing through the mesh. `hypha ca rotate` starts it; the control plane distributes
//! the new root, switches issuance once every sidecar has acknowledged it, and retires the old
//! root once its last certificate has expired; the demo follows the phases with
//! `hypha_ca::status`, counts every request that failed meanwhile, and checks each sidecar's
//! `/certs` at the end: no bundle holds the old root, the tenant's certificates chain to the
//! new one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use serde_json::Value;

use crate::client::{get_at, ProxyClient};
use crate::{DemoError, Mesh, Progress};

/// Every signer's `maxCertificateTtl` in this mode: certificates renew every 10 s, and the old
/// root retires 20 s after the switch.
pub const CERTIFICATE_TTL: &str = "20s";

/// What the rotation did, and what the traffic saw meanwhile.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tenant: String,
    pub signer: String,
    pub old_root: String,
    pub new_root: String,
    /// Each phase and when it began, from `hypha ca rotate`.
    pub phases: Vec<(String, Duration)>,
    /// Page views sent during the rotation, and those answered 200.
    pub pages: usize,
    pub pages_ok: usize,
    /// Page views that failed because details failed on purpose every time it was tried (the
    /// demo's own fault, which its retries usually hide).
    pub deliberate: usize,
    /// Up to ten other failures, as the client saw them.
    pub failures: Vec<String>,
    /// Each sidecar at the end, from `/certs`: the roots it trusts (SHA-256) and the root its
    /// certificate chains to.
    pub sidecars: BTreeMap<String, (Vec<String>, String)>,
}

impl Report {
    /// Sidecars whose bundle still holds the old root.
    pub fn old_root_left(&self) -> Vec<&str> {
        self.sidecars
            .iter()
            .filter(|(_, (roots, _))| roots.contains(&self.old_root))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Sidecars whose certificate chains to the new root.
    pub fn on_new_root(&self) -> Vec<&str> {
        self.sidecars
            .iter()
            .filter(|(_, (roots, chain))| *chain == self.new_root && roots.contains(chain))
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "Root rotation of tenant {} (signer {}), under load:",
            self.tenant, self.signer
        )?;
        writeln!(f, "  old root {}", self.old_root)?;
        writeln!(f, "  new root {}", self.new_root)?;
        for (phase, at) in &self.phases {
            writeln!(f, "  {:>6.1} s  {phase}", at.as_secs_f64())?;
        }
        writeln!(
            f,
            "  page views meanwhile: {} sent, {} answered 200, {} failed: {} by the demo's own \
             fault (details failed on purpose at every try), {} otherwise",
            self.pages,
            self.pages_ok,
            self.pages - self.pages_ok,
            self.deliberate,
            self.pages - self.pages_ok - self.deliberate
        )?;
        for failure in &self.failures {
            writeln!(f, "    {failure}")?;
        }
        let left = self.old_root_left();
        writeln!(
            f,
            "  at the end: {} of {} sidecars chain to the new root; the old root is in {} bundle(s){}",
            self.on_new_root().len(),
            self.sidecars.len(),
            left.len(),
            if left.is_empty() {
                String::new()
            } else {
                format!(" ({})", left.join(", "))
            }
        )
    }
}

/// What the load saw.
#[derive(Default)]
struct Load {
    sent: usize,
    ok: usize,
    deliberate: usize,
    failures: Vec<String>,
}

/// Page views through the client sidecar until `stop`.
async fn load(mesh: &Mesh, concurrency: usize, stop: Arc<AtomicBool>) -> Load {
    let client = ProxyClient::new(
        mesh.plan
            .reach(crate::topology::CLIENT, mesh.plan.client_proxy),
        Duration::from_secs(10),
    );
    let url = Mesh::productpage_url("/productpage");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        tasks.spawn(async move {
            let mut seen = Load::default();
            while !stop.load(Ordering::Relaxed) {
                seen.sent += 1;
                match client.get(&url, &HeaderMap::new()).await {
                    Ok(r) if r.status == http::StatusCode::OK => seen.ok += 1,
                    Ok(r) if r.text().contains(crate::app::DELIBERATE_FAILURE) => {
                        seen.deliberate += 1;
                    }
                    Ok(r) => seen
                        .failures
                        .push(format!("{} {}", r.status, r.text().trim())),
                    Err(e) => seen.failures.push(e.to_string()),
                }
            }
            seen
        });
    }
    let mut all = Load::default();
    while let Some(Ok(seen)) = tasks.join_next().await {
        all.sent += seen.sent;
        all.ok += seen.ok;
        all.deliberate += seen.deliberate;
        all.failures.extend(seen.failures);
    }
    all.failures.truncate(10);
    all
}

/// Each sidecar's trusted roots and the root its chain ends at, from `/certs`.
async fn sidecar_roots(mesh: &Mesh) -> BTreeMap<String, (Vec<String>, String)> {
    let mut out = BTreeMap::new();
    for (name, admin) in mesh.admins() {
        let Ok(reply) = get_at(&admin, "/certs", Duration::from_secs(5)).await else {
            continue;
        };
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        let roots = v["root_sha256"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let chain = v["chain_root_sha256"].as_str().unwrap_or("").to_owned();
        out.insert(name, (roots, chain));
    }
    out
}

/// Rotates `tenant`'s root with `hypha ca rotate` while page views flow, and reports.
pub async fn run(
    mesh: &Mesh,
    exe: &Path,
    tenant: &str,
    concurrency: usize,
    say: &Progress,
) -> Result<Report, DemoError> {
    let cfg = hypha_control::initial_config(Some(&mesh.config_dir()))
        .map_err(|d| DemoError::Config(format!("{} error(s)", d.errors().count())))?;
    let ttl = cfg
        .mesh
        .tenants
        .iter()
        .find(|t| t.name == tenant)
        .and_then(|t| cfg.mesh.signer(&t.signer))
        .map(|s| s.max_certificate_ttl.0)
        .ok_or_else(|| DemoError::Config(format!("no tenant {tenant:?} with a signer")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(mesh, concurrency, stop.clone());
    let rotate = async {
        let start = Instant::now();
        let mut command = std::process::Command::new(exe);
        command
            .args(["ca", "rotate", "--tenant", tenant, "--config"])
            .arg(mesh.config_dir())
            .arg("--data-dir")
            .arg(mesh.ca_dir())
            .env("HYPHA_LOG", "warn");
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .map_err(|e| DemoError::Config(e.to_string()))?
            .map_err(|e| DemoError::Spawn {
                name: "hypha ca rotate".into(),
                exe: exe.to_path_buf(),
                source: e,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(DemoError::Config(format!(
                "hypha ca rotate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        say(&format!(
            "rotation: hypha ca rotate --tenant {tenant}: {}",
            text.trim()
        ));
        let first = hypha_ca::status::status(&cfg.mesh, &mesh.ca_dir());
        let status = first.iter().find(|s| s.tenant == tenant);
        let mut report = Report {
            tenant: tenant.to_owned(),
            signer: status.map(|s| s.signer.clone()).unwrap_or_default(),
            ..Report::default()
        };
        let mut phase = String::new();
        // Distributing takes a push and its acknowledgements; issuing, a certificate lifetime.
        let deadline = start + ttl * 3 + Duration::from_secs(30);
        loop {
            let st = hypha_ca::status::status(&cfg.mesh, &mesh.ca_dir());
            let Some(s) = st.iter().find(|s| s.tenant == tenant) else {
                break;
            };
            if report.old_root.is_empty() {
                report.old_root = s
                    .root
                    .as_ref()
                    .map(|r| r.fingerprint.clone())
                    .unwrap_or_default();
                report.new_root = s
                    .rotation
                    .also_trusted
                    .as_ref()
                    .map(|r| r.fingerprint.clone())
                    .unwrap_or_default();
            }
            if s.rotation.phase != phase {
                phase = s.rotation.phase.clone();
                let what = match phase.as_str() {
                    "distributing" => "phase 1: the new root added to every bundle that trusts the old one".to_owned(),
                    "issuing" => "phase 2: every sidecar acknowledged its bundle; the new key signs, the old root stays until its certificates expire".to_owned(),
                    _ => "phase 3: the old root's certificates have expired; it is dropped from every bundle".to_owned(),
                };
                say(&format!(
                    "rotation: {:.1} s  {what}",
                    start.elapsed().as_secs_f64()
                ));
                report.phases.push((what, start.elapsed()));
                if phase == "idle" {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(DemoError::Config(format!(
                    "the rotation of {tenant} is still in phase {phase} after {:?}",
                    start.elapsed()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The last push reaches the sidecars: wait until no bundle holds the old root.
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            report.sidecars = sidecar_roots(mesh).await;
            if report.old_root_left().is_empty() || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok::<_, DemoError>(report)
    };
    let stopper = async {
        let r = rotate.await;
        stop.store(true, Ordering::Relaxed);
        r
    };
    let (report, seen) = tokio::join!(stopper, traffic);
    let mut report = report?;
    report.pages = seen.sent;
    report.pages_ok = seen.ok;
    report.deliberate = seen.deliberate;
    report.failures = seen.failures;
    Ok(report)
}
