//! PeerAuthentication: port-level mTLS settings and selectors.

use super::{port, Validator};
use crate::diag::Diagnostics;
use crate::security::PeerAuthentication;
use crate::Resource;

impl Validator<'_> {
    pub(super) fn peer_authentication(
        &self,
        r: &Resource<PeerAuthentication>,
        diags: &mut Diagnostics,
    ) {
        let (s, src) = (&r.spec, &r.source);
        if !s.port_level_mtls.is_empty()
            && s.selector
                .as_ref()
                .is_none_or(|sel| sel.match_labels.is_empty())
        {
            diags.error(
                "missing-selector",
                src,
                "spec.portLevelMtls",
                "portLevelMtls needs a workload selector",
            );
        }
        for key in s.port_level_mtls.keys() {
            let p = format!("spec.portLevelMtls.{key}");
            match key.parse::<u32>() {
                Ok(n) => {
                    port(src, &p, n, diags);
                }
                Err(_) => diags.error(
                    "invalid-port",
                    src,
                    p,
                    format!("{key:?} is not a port number"),
                ),
            }
        }
        if s.selector.is_some() && r.namespace == self.cfg.mesh.root_namespace {
            diags.warning(
                "selector-in-root",
                src,
                "spec.selector",
                "a selector in the root namespace applies to matching workloads in every namespace",
            );
        }
    }
}
