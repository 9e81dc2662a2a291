//! The node agent on Kubernetes (`hypha bypass --kubernetes --node NAME`): watches the pods of
//! its node and registers each injected pod with the eBPF bypass once it runs, and takes it
//! out when it goes, so the same-host bypass needs no list of pods. A pod's network namespace
//! is the one that holds its addresses (`status.podIPs`), found through `/proc/<pid>/net` of
//! the processes in it, whatever the container runtime; its exclusions are its capture's
//! (`hypha_inject::capture_annotations`, the same the injected init container applies).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use futures::StreamExt;
use hypha_bypass::{CapturedPod, IpRange, PodChange};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::mpsc::UnboundedSender;

/// Watches the pods of `node` and sends their registrations to `tx` until the channel closes.
pub async fn watch_pods(client: Client, node: String, tx: UnboundedSender<PodChange>) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    // Pod uid → the namespace it was registered with.
    let mut registered: HashMap<String, PathBuf> = HashMap::new();
    // The pods of a relist in progress: those registered and not in it went while the watch
    // was down.
    let mut relisted: Option<std::collections::HashSet<String>> = None;
    while let Some(event) = events.next().await {
        let (pod, gone) = match event {
            Ok(watcher::Event::Init) => {
                relisted = Some(Default::default());
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let listed = relisted.take().unwrap_or_default();
                let stale: Vec<String> = registered
                    .keys()
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect();
                for uid in stale {
                    if let Some(netns) = registered.remove(&uid) {
                        if !netns.as_os_str().is_empty()
                            && tx.send(PodChange::Remove(netns)).is_err()
                        {
                            return;
                        }
                    }
                }
                continue;
            }
            Ok(watcher::Event::Apply(p)) => (p, false),
            Ok(watcher::Event::InitApply(p)) => {
                if let (Some(set), Some(uid)) = (&mut relisted, &p.metadata.uid) {
                    set.insert(uid.clone());
                }
                (p, false)
            }
            Ok(watcher::Event::Delete(p)) => (p, true),
            Err(e) => {
                tracing::warn!(error = %e, "node agent: watching pods");
                continue;
            }
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let ending = gone
            || pod.metadata.deletion_timestamp.is_some()
            || pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if ending {
            if let Some(netns) = registered.remove(&uid) {
                if netns.as_os_str().is_empty() {
                    continue;
                }
                tracing::info!(pod = %name, "node agent: pod leaves the bypass");
                if tx.send(PodChange::Remove(netns)).is_err() {
                    return;
                }
            }
            continue;
        }
        if registered.contains_key(&uid) {
            continue;
        }
        let Some(captured) = captured(&pod) else {
            continue;
        };
        let captured = match captured {
            Ok(c) => c,
            Err(why) => {
                tracing::info!(pod = %name, %why, "node agent: pod left to iptables alone");
                // Not again at every update of the pod.
                registered.insert(uid, PathBuf::new());
                continue;
            }
        };
        tracing::info!(pod = %name, netns = %captured.netns.display(), "node agent: pod in the bypass");
        registered.insert(uid, captured.netns.clone());
        if tx.send(PodChange::Add(captured)).is_err() {
            return;
        }
    }
}

/// The bypass registration of an injected, running pod: `None` while it is not that (yet),
/// an error when its capture is one the bypass cannot follow.
fn captured(pod: &Pod) -> Option<Result<CapturedPod, String>> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    annotations.get(hypha_inject::STATUS_ANNOTATION)?;
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        return None;
    }
    let netns = netns_of(&ips)?;
    Some(registration(&annotations, netns))
}

fn registration(
    annotations: &std::collections::BTreeMap<String, String>,
    netns: PathBuf,
) -> Result<CapturedPod, String> {
    let a = hypha_inject::capture_annotations(annotations).map_err(|e| e.to_string())?;
    let capture = hypha_pod::Capture::default().with_annotations(&a)?;
    if capture.include_inbound_ports.is_some() || capture.include_outbound_cidrs.is_some() {
        return Err(
            "it captures only some ports or ranges, which the bypass does not follow".into(),
        );
    }
    let cidrs = capture
        .exclude_outbound_cidrs
        .iter()
        .map(|c| c.parse::<IpRange>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let pod = CapturedPod {
        exclude_outbound_ports: capture.exclude_outbound_ports,
        exclude_inbound_ports: capture.exclude_inbound_ports,
        exclude_outbound_cidrs: cidrs,
        outbound_port: capture.outbound_port,
        inbound_port: capture.inbound_port,
        sidecar_gid: capture.proxy_gid,
        ..CapturedPod::new(netns)
    };
    let too_many = pod.exclude_outbound_ports.len() > 8
        || pod.exclude_inbound_ports.len() > 8
        || pod.exclude_outbound_cidrs.len() > 8;
    if too_many {
        return Err("more than 8 exclusions of one kind".into());
    }
    Ok(pod)
}

/// The network namespace holding one of `ips`, as `/proc/<pid>/ns/net` of a process in it.
pub fn netns_of(ips: &[IpAddr]) -> Option<PathBuf> {
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let proc = PathBuf::from("/proc").join(pid);
        let Ok(ns) = std::fs::read_link(proc.join("ns/net")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        if local_addresses(&proc).iter().any(|a| ips.contains(a)) {
            return Some(proc.join("ns/net"));
        }
    }
    None
}

/// The addresses of the network namespace `/proc/<pid>` is in: IPv6 from `net/if_inet6`,
/// IPv4 from the local entries of `net/fib_trie`.
fn local_addresses(proc: &std::path::Path) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(proc.join("net/if_inet6")) {
        for line in text.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(n) = u128::from_str_radix(hex, 16) {
                out.push(IpAddr::V6(std::net::Ipv6Addr::from(n)));
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string(proc.join("net/fib_trie")) {
        let mut last: Option<IpAddr> = None;
        for line in text.lines() {
            let t = line.trim_start_matches([' ', '|', '+', '-']).trim();
            if let Ok(ip) = t.parse::<std::net::Ipv4Addr>() {
                last = Some(IpAddr::V4(ip));
            } else if line.contains("/32 host LOCAL") {
                out.extend(last);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_processs_namespace_is_found_by_its_loopback() {
        // Every namespace has loopback: the first process that has one is found.
        let found = netns_of(&["127.0.0.1".parse().unwrap()]);
        assert!(found.is_some_and(|p| p.ends_with("ns/net")));
        let own = local_addresses(std::path::Path::new("/proc/self"));
        assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
        assert_eq!(netns_of(&["192.0.2.77".parse().unwrap()]), None);
    }

    #[test]
    fn a_pods_exclusions_are_its_captures() {
        let mut a = std::collections::BTreeMap::new();
        a.insert(
            "traffic.sidecar.istio.io/excludeOutboundPorts".to_owned(),
            "5432,6379".to_owned(),
        );
        a.insert(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges".to_owned(),
            "10.0.0.0/8".to_owned(),
        );
        let pod = registration(&a, "/proc/1/ns/net".into()).unwrap();
        assert_eq!(pod.exclude_outbound_ports, [5432, 6379]);
        assert_eq!(pod.exclude_inbound_ports, [15020, 15021, 15090]);
        assert_eq!(pod.exclude_outbound_cidrs.len(), 1);
        a.insert(
            "traffic.sidecar.istio.io/includeInboundPorts".to_owned(),
            "8080".to_owned(),
        );
        assert!(registration(&a, "/proc/1/ns/net".into()).is_err());
    }
}
