//! Reloading a directory through a [`LoadCache`]: changed, added and removed files are seen,
//! and checks that span files (a second MeshConfig) still fire for cached files.

use std::path::PathBuf;

use hypha_config::{load, load_cached, LoadCache};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hypha-reload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn service(name: &str, port: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{name}.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{{address: 10.0.0.1}}]
  ports:
  - {{number: {port}, name: http, protocol: HTTP}}
"
    )
}

fn ports(loaded: &hypha_config::Loaded) -> Vec<(String, u32)> {
    loaded
        .config
        .service_entries
        .iter()
        .map(|s| (s.name.clone(), s.spec.ports[0].number))
        .collect()
}

#[test]
fn reload_sees_changed_added_and_removed_files() {
    let d = dir("files");
    std::fs::write(d.join("a.yaml"), service("a", 80)).unwrap();
    std::fs::write(d.join("b.yaml"), service("b", 81)).unwrap();
    let mut cache = LoadCache::default();
    let first = load_cached(&d, &mut cache);
    assert!(!first.has_errors(), "{:?}", first.diagnostics);
    assert_eq!(ports(&first), [("a".into(), 80), ("b".into(), 81)]);

    // Rewritten through a rename, as editors and the ConfigMap mounts do.
    std::fs::write(d.join(".b.tmp"), service("b", 9090)).unwrap();
    std::fs::rename(d.join(".b.tmp"), d.join("b.yaml")).unwrap();
    std::fs::write(d.join("c.yaml"), service("c", 82)).unwrap();
    let second = load_cached(&d, &mut cache);
    assert_eq!(
        ports(&second),
        [("a".into(), 80), ("b".into(), 9090), ("c".into(), 82)]
    );
    assert_eq!(ports(&second), ports(&load(&d)));

    std::fs::remove_file(d.join("a.yaml")).unwrap();
    let third = load_cached(&d, &mut cache);
    assert_eq!(ports(&third), [("b".into(), 9090), ("c".into(), 82)]);

    // An error in one file is reported again on the next reload even though that file is
    // cached, and a duplicate MeshConfig across a cached and a new file is caught.
    let mesh = "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {trustDomain: t.example}\n";
    std::fs::write(d.join("m1.yaml"), mesh).unwrap();
    std::fs::write(d.join("bad.yaml"), "apiVersion: [\n").unwrap();
    let fourth = load_cached(&d, &mut cache);
    std::fs::write(d.join("m2.yaml"), mesh).unwrap();
    let fifth = load_cached(&d, &mut cache);
    let codes = |l: &hypha_config::Loaded| {
        let mut c: Vec<&str> = l.diagnostics.errors().map(|d| d.code).collect();
        c.sort();
        c
    };
    assert_eq!(codes(&fourth), ["yaml-syntax"]);
    assert_eq!(codes(&fifth), ["duplicate-mesh-config", "yaml-syntax"]);
    assert_eq!(codes(&fifth), codes(&load(&d)));
    let _ = std::fs::remove_dir_all(&d);
}
