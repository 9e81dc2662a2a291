//! cert-manager's side of the issuer tests: its CertificateRequest kind, requests as its
//! certificates controller makes them, and approval as its approver writes it.

use super::{csr_base64, San, TestCluster};

/// cert-manager's CertificateRequest kind, as its CRD registers it (the schema left open: the
/// test API server needs the names; cert-manager's own CRD carries the full schema).
pub const CERT_MANAGER_CRD: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: certificaterequests.cert-manager.io}
spec:
  group: cert-manager.io
  names: {kind: CertificateRequest, listKind: CertificateRequestList, plural: certificaterequests, singular: certificaterequest, shortNames: [cr, crs], categories: [cert-manager]}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
";

/// A CertificateRequest as cert-manager's certificates controller creates it.
pub fn certificate_request(
    ns: &str,
    name: &str,
    issuer: (&str, &str, &str),
    sans: &[San],
) -> String {
    let (group, kind, issuer) = issuer;
    format!(
        "apiVersion: cert-manager.io/v1\nkind: CertificateRequest\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\n  annotations:\n    cert-manager.io/certificate-name: {name}\n    \
         cert-manager.io/certificate-revision: \"1\"\n    cert-manager.io/private-key-secret-name: \
         {name}-abcde\nspec:\n  duration: 2h0m0s\n  issuerRef: {{group: {group}, kind: {kind}, name: \
         {issuer}}}\n  usages: [digital signature, key encipherment, server auth]\n  request: {}\n",
        csr_base64(sans)
    )
}

/// What cert-manager's approver (or `cmctl approve/deny`) writes.
pub fn decide(cluster: &TestCluster, ns: &str, name: &str, kind: &str) {
    let patch = format!(
        "{{\"status\":{{\"conditions\":[{{\"type\":\"{kind}\",\"status\":\"True\",\"reason\":\
         \"cert-manager.io\",\"message\":\"{kind} by the test\"}}]}}}}"
    );
    cluster.kubectl(&[
        "patch",
        "certificaterequest",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
}
