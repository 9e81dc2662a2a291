//! `hypha install` as a user runs it: the manifests printed, and with `--skip-crds` the same
//! manifests without the CRDs (for a cluster whose Istio CRDs are to stay).

use std::process::Command;

use serde_json::Value;

fn install(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_hypha"))
        .arg("install")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    hypha_config::yaml::parse_documents(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .into_iter()
        .map(|d| d.value)
        .collect()
}

#[test]
fn install_prints_the_manifests_and_can_leave_the_crds_out() {
    let crd = |o: &Value| o["kind"] == "CustomResourceDefinition";
    let all = install(&[]);
    assert_eq!(
        all,
        hypha_kube::install::objects(&Default::default()).unwrap()
    );
    assert_eq!(
        all.iter().filter(|o| crd(o)).count(),
        hypha_kube::crds::istio().len() + hypha_kube::crds::hypha().len()
    );
    let without = install(&["--skip-crds"]);
    let rest: Vec<Value> = all.into_iter().filter(|o| !crd(o)).collect();
    assert!(!rest.is_empty());
    assert_eq!(without, rest);
}
