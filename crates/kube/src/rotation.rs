//! Root rotation across control-plane replicas (`hypha ca rotate --kubernetes`). Each replica
//! has a data directory of its own, so the cluster holds what they share:
//!
//! - a file signer's generations in its Secret `hypha-ca-<signer>` (`ca-key.pem`/`ca-cert.pem`
//!   for generation 0, `gen-<n>.ca-key.pem`/`gen-<n>.ca-cert.pem` after), beside what
//!   [`crate::signers`] put there; a token signer's later roots in the ConfigMap (its keys are
//!   shared by the token);
//! - the ConfigMap `hypha-ca-rotation` in the root namespace: `state.<signer>` (the rotation
//!   state, as `rotation.json` holds it without a cluster) and `replica.<pod>` (each replica's
//!   report: the states it has in force, whether every proxy connected to it acknowledged
//!   their bundles, and when it said so).
//!
//! Every replica copies the shared state into its data directory every second ([`sync`]),
//! where its control plane puts it in force as without a cluster, and publishes its report
//! ([`report`]). Only the holder of the Lease `hypha-ca-rotation` moves a rotation on
//! ([`advance`]): out of Distributing once every live replica (reported within
//! [`REPORT_TTL`]) has the state in force and all its proxies have acknowledged it, out of
//! Issuing at `retire_after`, removing the retired file key from the Secret.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hypha_ca::rotation::{self, RotationState};
use hypha_ca::signer::{CERT_FILE, KEY_FILE};
use hypha_config::MeshConfig;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde::{Deserialize, Serialize};

use crate::signers::{secret_name, ShareError};

/// The ConfigMap holding the rotation states and the replicas' reports.
pub const CONFIGMAP: &str = "hypha-ca-rotation";
/// The Lease whose holder moves rotations on.
pub const LEASE: &str = "hypha-ca-rotation";
/// A replica whose report is older than this is taken for gone.
pub const REPORT_TTL: Duration = Duration::from_secs(10);
/// How often replicas copy, report and the leader judges.
pub const PERIOD: Duration = Duration::from_secs(1);

/// A replica's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Unix seconds.
    pub at: u64,
    /// Each signer's state in force, as [`key`] writes it.
    pub applied: BTreeMap<String, String>,
    /// Whether every proxy connected to the replica acknowledged the bundles of those states.
    pub acknowledged: bool,
}

/// A state as reports compare it.
pub fn key(s: &RotationState) -> String {
    match &s.rotation {
        Some(r) => format!("{}>{}:{}", s.generation, r.to, r.phase.as_str()),
        None => s.generation.to_string(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A Secret key for generation `n`'s `file`.
fn secret_key(n: u32, file: &str) -> String {
    if n == 0 {
        file.to_owned()
    } else {
        format!("gen-{n}.{file}")
    }
}

/// The ConfigMap key of a token signer's generation-`n` root.
fn root_key(signer: &str, n: u32) -> String {
    format!("root.{signer}.gen-{n}")
}

fn api_err(signer: &str) -> impl Fn(kube::Error) -> ShareError + '_ {
    move |e| ShareError::Api(signer.to_owned(), e)
}

/// Writes `bytes` to `path` (its directory made 0700) unless it holds them already, via a
/// file beside it renamed into place, with `mode`.
pub(crate) fn write_if_changed(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    signer: &str,
) -> Result<bool, ShareError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    let io = |p: &Path, e| ShareError::Io(signer.to_owned(), p.to_path_buf(), e);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    let tmp = path.with_extension("sync");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    Ok(true)
}

/// Copies the cluster's rotation states and generations into `data_dir`: first every
/// generation's files (so a state never names one that is missing), then the states. Whether
/// anything changed.
pub async fn sync(client: &Client, mesh: &MeshConfig, data_dir: &Path) -> Result<bool, ShareError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &mesh.root_namespace);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &mesh.root_namespace);
    let shared = maps
        .get_opt(CONFIGMAP)
        .await
        .map_err(api_err("(all)"))?
        .and_then(|c| c.data)
        .unwrap_or_default();
    let mut changed = false;
    for signer in &mesh.signers {
        let name = &signer.name;
        let state_dir = rotation::state_dir(data_dir, name);
        match hypha_ca::file_signer_dir(signer, data_dir) {
            Some(dir) => {
                let Some(secret) = secrets
                    .get_opt(&secret_name(name))
                    .await
                    .map_err(api_err(name))?
                else {
                    continue;
                };
                for (k, v) in secret.data.unwrap_or_default() {
                    let (n, file) = match k.strip_prefix("gen-").and_then(|r| r.split_once('.')) {
                        Some((n, file)) => (n.parse::<u32>().unwrap_or(0), file.to_owned()),
                        None => (0, k.clone()),
                    };
                    if file != KEY_FILE && file != CERT_FILE {
                        continue;
                    }
                    let path = rotation::generation_dir(&dir, n).join(&file);
                    let mode = if file == KEY_FILE { 0o600 } else { 0o644 };
                    changed |= write_if_changed(&path, &v.0, mode, name)?;
                }
            }
            None => {
                // A token signer: its later generations' roots.
                let prefix = format!("root.{name}.gen-");
                for (k, pem) in &shared {
                    let Some(n) = k.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let path = rotation::generation_dir(&state_dir, n).join(CERT_FILE);
                    changed |= write_if_changed(&path, pem.as_bytes(), 0o644, name)?;
                }
            }
        }
        if let Some(json) = shared.get(&format!("state.{name}")) {
            changed |= write_if_changed(
                &state_dir.join(rotation::ROTATION_FILE),
                json.as_bytes(),
                0o644,
                name,
            )?;
        }
    }
    Ok(changed)
}

/// Publishes this replica's report (`replica.<identity>`) with a merge patch of its own key.
pub async fn report(
    client: &Client,
    namespace: &str,
    identity: &str,
    states: &[(String, RotationState)],
    acknowledged: bool,
) -> Result<(), ShareError> {
    let r = Report {
        at: now(),
        applied: states.iter().map(|(n, s)| (n.clone(), key(s))).collect(),
        acknowledged,
    };
    let json = serde_json::to_string(&r).unwrap_or_default();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let patch = Patch::Merge(serde_json::json!({"data": {format!("replica.{identity}"): json}}));
    let params = PatchParams::default();
    let send = || maps.patch(CONFIGMAP, &params, &patch);
    match send().await {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            ensure_configmap(&maps, namespace).await?;
            send().await.map_err(api_err("(report)"))?;
        }
        other => {
            other.map_err(api_err("(report)"))?;
        }
    }
    Ok(())
}

async fn ensure_configmap(maps: &Api<ConfigMap>, namespace: &str) -> Result<(), ShareError> {
    if maps
        .get_opt(CONFIGMAP)
        .await
        .map_err(api_err("(all)"))?
        .is_some()
    {
        return Ok(());
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match maps.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(api_err("(all)")(e)),
    }
}

/// Whether every live replica reports `state` in force for `signer`, acknowledged.
pub fn acknowledged(
    data: &BTreeMap<String, String>,
    signer: &str,
    state: &RotationState,
    now: u64,
) -> bool {
    let want = key(state);
    let live: Vec<Report> = data
        .iter()
        .filter(|(k, _)| k.starts_with("replica."))
        .filter_map(|(_, v)| serde_json::from_str::<Report>(v).ok())
        .filter(|r| r.at + REPORT_TTL.as_secs() >= now)
        .collect();
    !live.is_empty()
        && live
            .iter()
            .all(|r| r.acknowledged && r.applied.get(signer) == Some(&want))
}

/// The leader's step: each signer's rotation moved on when it is time (see the module docs),
/// written over the ConfigMap as read. The signers moved on, with their new phases.
pub async fn advance(
    client: &Client,
    mesh: &MeshConfig,
) -> Result<Vec<(String, String)>, ShareError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &mesh.root_namespace);
    let Some(mut cm) = maps.get_opt(CONFIGMAP).await.map_err(api_err("(all)"))? else {
        return Ok(Vec::new());
    };
    let data = cm.data.clone().unwrap_or_default();
    let mut moved = Vec::new();
    let mut retired = Vec::new();
    for signer in &mesh.signers {
        let Some(json) = data.get(&format!("state.{}", signer.name)) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<RotationState>(json) else {
            tracing::warn!(signer = %signer.name, "unreadable rotation state in ConfigMap {CONFIGMAP}");
            continue;
        };
        let acked = acknowledged(&data, &signer.name, &state, now());
        if let Some(next) = state.advance(acked, SystemTime::now(), signer.max_certificate_ttl.0) {
            if next.rotation.is_none() {
                retired.push((signer.clone(), state.generation));
            }
            moved.push((signer.name.clone(), next.phase().to_owned()));
            cm.data.get_or_insert_with(BTreeMap::new).insert(
                format!("state.{}", signer.name),
                serde_json::to_string_pretty(&next).unwrap_or_default(),
            );
        }
    }
    if moved.is_empty() {
        return Ok(moved);
    }
    // The retired keys first: no replica copies them back between the two writes, and in the
    // state before (Issuing) they sign nothing.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &mesh.root_namespace);
    for (signer, old) in retired {
        if hypha_ca::file_signer_dir(&signer, Path::new("")).is_none() {
            continue;
        }
        let patch = serde_json::json!({"data": {secret_key(old, KEY_FILE): null}});
        secrets
            .patch(
                &secret_name(&signer.name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(api_err(&signer.name))?;
        tracing::info!(signer = %signer.name, generation = old, "root rotation done: the retired key is removed from its Secret");
    }
    // Over the ConfigMap as read: a concurrent writer makes this one fail, to be judged again.
    maps.replace(CONFIGMAP, &PostParams::default(), &cm)
        .await
        .map_err(api_err("(all)"))?;
    for (name, phase) in &moved {
        tracing::info!(signer = %name, phase, "root rotation: phase moved on for every replica");
    }
    Ok(moved)
}

/// `hypha ca rotate --kubernetes --tenant T`: the next generation of `tenant`'s signer made
/// (a file key in `scratch`, then added to the signer's Secret; a token key in its token, its
/// root in the ConfigMap) and phase 1 recorded in the ConfigMap. Refused while that signer
/// rotates. Blocks on a token.
pub async fn start(
    client: &Client,
    mesh: &MeshConfig,
    tenant: &str,
    scratch: &Path,
) -> Result<rotation::Started, ShareError> {
    let ca_err = |e| ShareError::Ca(tenant.to_owned(), e);
    let t = mesh
        .tenants
        .iter()
        .find(|t| t.name == tenant)
        .ok_or_else(|| ca_err(hypha_ca::CaError::UnknownTenant(tenant.into())))?;
    let mut cfg = hypha_ca::tenants::signer_of(mesh, t)
        .map_err(ca_err)?
        .clone();
    let name = cfg.name.clone();
    // Generated under `scratch`, whatever directory the control plane keeps it in.
    if let Some(file) = cfg.key.file.as_mut() {
        file.dir = None;
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &mesh.root_namespace);
    ensure_configmap(&maps, &mesh.root_namespace).await?;
    // This signer alone (no other signer's key comes near `scratch`), its current generation
    // and state copied from the cluster first.
    let mut local = mesh.clone();
    local.signers = vec![cfg.clone()];
    sync(client, &local, scratch).await?;
    let (m, dir, t2) = (local.clone(), scratch.to_path_buf(), tenant.to_owned());
    let started = tokio::task::spawn_blocking(move || rotation::start(&m, &dir, &t2))
        .await
        .map_err(|e| ShareError::Io(name.clone(), scratch.into(), std::io::Error::other(e)))?
        .map_err(|e| ShareError::Ca(name.clone(), e))?;
    let state = RotationState::read(&rotation::state_dir(scratch, &name))
        .map_err(|e| ShareError::Ca(name.clone(), e))?;
    let gen_dir = |base: &Path| rotation::generation_dir(base, started.to);
    let read = |p: std::path::PathBuf| {
        std::fs::read(&p).map_err(|e| ShareError::Io(name.clone(), p.clone(), e))
    };
    let mut cm = maps.get(CONFIGMAP).await.map_err(api_err(&name))?;
    let data = cm.data.get_or_insert_with(BTreeMap::new);
    match hypha_ca::file_signer_dir(&cfg, scratch) {
        Some(base) => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &mesh.root_namespace);
            let mut secret = secrets
                .get(&secret_name(&name))
                .await
                .map_err(api_err(&name))?;
            let sd = secret.data.get_or_insert_with(BTreeMap::new);
            for file in [KEY_FILE, CERT_FILE] {
                sd.insert(
                    secret_key(started.to, file),
                    ByteString(read(gen_dir(&base).join(file))?),
                );
            }
            secrets
                .replace(&secret_name(&name), &PostParams::default(), &secret)
                .await
                .map_err(api_err(&name))?;
        }
        None => {
            let pem = read(gen_dir(&rotation::state_dir(scratch, &name)).join(CERT_FILE))?;
            data.insert(
                root_key(&name, started.to),
                String::from_utf8_lossy(&pem).into_owned(),
            );
        }
    }
    if let Some(json) = data.get(&format!("state.{name}")) {
        if serde_json::from_str::<RotationState>(json).is_ok_and(|s| s.rotation.is_some()) {
            return Err(ShareError::Ca(
                name.clone(),
                hypha_ca::CaError::Rotation(format!("signer {name:?} is already rotating")),
            ));
        }
    }
    data.insert(
        format!("state.{name}"),
        serde_json::to_string_pretty(&state).unwrap_or_default(),
    );
    // Over the ConfigMap as read: two rotations started at once cannot both win.
    maps.replace(CONFIGMAP, &PostParams::default(), &cm)
        .await
        .map_err(api_err(&name))?;
    Ok(started)
}

/// Every replica, as a task of its control plane: [`sync`] and [`report`] every second;
/// on the holder of the Lease, [`advance`] too. The control plane stops moving phases on by
/// itself (`Secure::rotate_elsewhere`).
pub fn service(
    client: Client,
    mesh: MeshConfig,
    data_dir: std::path::PathBuf,
    lease: crate::lease::LeaseConfig,
) -> hypha_control::TlsService {
    hypha_control::TlsService(Arc::new(move |secure| {
        let (client, mesh, data_dir, lease) = (
            client.clone(),
            mesh.clone(),
            data_dir.clone(),
            lease.clone(),
        );
        Box::pin(async move {
            secure.rotate_elsewhere();
            let identity = lease.identity.clone();
            let every_replica = async {
                // Reported when it changes, and again well within REPORT_TTL.
                let mut last: Option<(Report, std::time::Instant)> = None;
                loop {
                    if let Err(e) = sync(&client, &mesh, &data_dir).await {
                        tracing::warn!(error = %e, "copying the cluster's root rotation state");
                    }
                    let (states, acked) = secure.rotation_report();
                    let now = Report {
                        at: 0,
                        applied: states.iter().map(|(n, s)| (n.clone(), key(s))).collect(),
                        acknowledged: acked,
                    };
                    let due = last
                        .as_ref()
                        .is_none_or(|(r, at)| *r != now || at.elapsed() >= REPORT_TTL / 3);
                    if due {
                        match report(&client, &mesh.root_namespace, &identity, &states, acked).await
                        {
                            Ok(()) => last = Some((now, std::time::Instant::now())),
                            Err(e) => {
                                tracing::warn!(error = %e, "reporting this replica's root rotation state")
                            }
                        }
                    }
                    tokio::time::sleep(PERIOD).await;
                }
            };
            let leader = crate::lease::while_leader(client.clone(), lease.clone(), || {
                let (client, mesh) = (client.clone(), mesh.clone());
                async move {
                    loop {
                        if let Err(e) = advance(&client, &mesh).await {
                            tracing::warn!(error = %e, "moving root rotations on");
                        }
                        tokio::time::sleep(PERIOD).await;
                    }
                }
            });
            tokio::join!(every_replica, leader);
        })
    }))
}
