//! [`Ca`]: the mesh CA as the control plane holds it. One signer (and root) per tenant, the
//! namespace → tenant mapping of the mesh config, and per tenant the trust bundle its workloads
//! get: its own root plus the roots of the tenants it trusts (`trustTenants` in
//! `hypha_config::MeshConfig`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use hypha_config::MeshConfig;

use crate::issue::{issue, Caller, Issued};
use crate::rotation::{self, RotationState};
use crate::{CaError, Signer};

/// One tenant as the CA sees it.
#[derive(Clone)]
pub struct TenantCa {
    pub name: String,
    /// Namespace names; `*` covers every namespace no other tenant lists.
    pub namespaces: Vec<String>,
    /// Tenants whose roots this tenant's workloads also trust (one direction).
    pub trust_tenants: Vec<String>,
    pub signer: Arc<dyn Signer>,
    /// Roots trusted besides the signer's while it rotates (see [`crate::rotation`]): the next
    /// generation's while it is distributed, the old one's while its certificates run out.
    pub also_trusted: Vec<boring::x509::X509>,
    /// Cap on issued validity.
    pub max_validity: Duration,
}

impl TenantCa {
    /// The roots this tenant's own certificates chain to: the signer's, then any other
    /// generation's mid-rotation.
    pub fn own_roots(&self) -> impl Iterator<Item = &boring::x509::X509> {
        std::iter::once(self.signer.certificate()).chain(&self.also_trusted)
    }
}

impl std::fmt::Debug for TenantCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantCa")
            .field("name", &self.name)
            .field("namespaces", &self.namespaces)
            .field("trust_tenants", &self.trust_tenants)
            .field("max_validity", &self.max_validity)
            .finish_non_exhaustive()
    }
}

/// The mesh CA: tenants, their signers and trust bundles.
#[derive(Debug)]
pub struct Ca {
    trust_domain: String,
    /// Swapped whole when a signer rotates ([`Ca::set_signer`]).
    tenants: ArcSwap<BTreeMap<String, TenantCa>>,
    /// The control plane's namespace (the mesh's root namespace): the only one whose
    /// [`CONTROL_SERVICE_ACCOUNT`] is issued, since proxies take that identity for the
    /// control plane's.
    control_namespace: Option<String>,
    /// DNS names the control plane's own certificate carries besides its SPIFFE ID: the
    /// Service names the API server reaches its injection webhook by.
    control_names: Vec<String>,
    /// The cluster's DNS suffix (`cluster.local`): Service names are `<name>.<ns>.svc` or
    /// `<name>.<ns>.svc.<suffix>`.
    domain_suffix: String,
    /// Revoked SPIFFE IDs: never issued, renewed or vouched for (see [`Ca::set_revoked`]).
    revoked: std::sync::RwLock<std::sync::Arc<std::collections::HashSet<String>>>,
}

/// The usages (Kubernetes' names) a workload certificate has, and so all a Kubernetes CSR to
/// a Hypha signer may ask for.
pub const KUBERNETES_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// Refuses any usage a workload certificate does not have.
fn check_usages(usages: &[String]) -> Result<(), CaError> {
    match usages
        .iter()
        .find(|u| !KUBERNETES_USAGES.contains(&u.as_str()))
    {
        Some(u) => Err(CaError::Usage(u.clone())),
        None => Ok(()),
    }
}

/// The deny list in a CA's data directory: one SPIFFE ID per line (`#` starts a comment).
pub const REVOKED_FILE: &str = "revoked";

/// The SPIFFE IDs a deny list names.
pub fn parse_revoked(text: &str) -> std::collections::HashSet<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The control plane's service account: `spiffe://<td>/ns/<root namespace>/sa/hypha-control`.
pub const CONTROL_SERVICE_ACCOUNT: &str = "hypha-control";

/// Where a signer whose key is a file keeps it (its `file.dir`, else `<data_dir>/<name>`);
/// `None` for a signer whose key is in a token.
pub fn file_signer_dir(cfg: &hypha_config::mesh::Signer, data_dir: &Path) -> Option<PathBuf> {
    if cfg.key.pkcs11.is_some() {
        return None;
    }
    Some(match cfg.key.file.as_ref().and_then(|f| f.dir.as_deref()) {
        Some(d) => Path::new(d).to_path_buf(),
        None => data_dir.join(&cfg.name),
    })
}

/// Whether two certificates are the same (their DER).
pub fn same_cert(a: &boring::x509::X509Ref, b: &boring::x509::X509Ref) -> bool {
    matches!((a.to_der(), b.to_der()), (Ok(a), Ok(b)) if a == b)
}

/// A signer as the tenants get it: the key that signs, the other generation's root trusted
/// mid-rotation, the validity cap.
type SignerEntry = (Arc<dyn Signer>, Vec<boring::x509::X509>, Duration);

/// The signer config a tenant names.
pub fn signer_of<'m>(
    mesh: &'m MeshConfig,
    tenant: &hypha_config::mesh::Tenant,
) -> Result<&'m hypha_config::mesh::Signer, CaError> {
    mesh.signer(&tenant.signer)
        .ok_or_else(|| CaError::UnknownSigner {
            tenant: tenant.name.clone(),
            signer: tenant.signer.clone(),
        })
}

/// Opens a signer at the generation its rotation state says signs, with the other
/// generation's root when one is rotating in or out (blocks on a token).
pub fn open_signer(
    mesh: &MeshConfig,
    cfg: &hypha_config::mesh::Signer,
    data_dir: &Path,
) -> Result<(Arc<dyn Signer>, Vec<boring::x509::X509>), CaError> {
    let state = RotationState::read(&rotation::state_dir(data_dir, &cfg.name))?;
    let signer = rotation::open_generation(mesh, cfg, data_dir, state.signing(), false)?;
    let also = match state.also_trusted() {
        Some(n) => vec![rotation::generation_root(cfg, data_dir, n)?],
        None => Vec::new(),
    };
    Ok((signer, also))
}

/// The common name of a signer's self-made root.
pub fn signer_common_name(signer: &str) -> String {
    format!("Hypha mesh CA {signer}")
}

impl Ca {
    /// A CA over already-opened signers. Every `trust_tenants` entry must name a tenant.
    pub fn new(trust_domain: impl Into<String>, tenants: Vec<TenantCa>) -> Result<Ca, CaError> {
        let tenants: BTreeMap<_, _> = tenants.into_iter().map(|t| (t.name.clone(), t)).collect();
        for t in tenants.values() {
            if let Some(missing) = t.trust_tenants.iter().find(|n| !tenants.contains_key(*n)) {
                return Err(CaError::UnknownTrustedTenant {
                    tenant: t.name.clone(),
                    trusted: missing.clone(),
                });
            }
        }
        Ok(Ca {
            trust_domain: trust_domain.into(),
            tenants: ArcSwap::from_pointee(tenants),
            control_namespace: None,
            control_names: Vec::new(),
            domain_suffix: "cluster.local".into(),
            revoked: Default::default(),
        })
    }

    /// A CA for a (validated) mesh config: file signers under `data_dir/<signer name>` (or the
    /// signer's configured dir), created on first start; token signers (`pkcs11`) attested,
    /// their keys in the token and their roots under `data_dir/<signer name>`. Tenants sharing
    /// a signer share its root.
    ///
    /// With a token signer this waits for the token, as [`Ca::issue`] then does: call both
    /// where blocking is allowed (a `spawn_blocking` task, a plain thread), never on an async
    /// runtime's worker (see [`crate::token`]).
    pub fn from_mesh(mesh: &MeshConfig, data_dir: &Path) -> Result<Ca, CaError> {
        let mut signers: HashMap<&str, SignerEntry> = HashMap::new();
        let mut tenants = Vec::new();
        for t in &mesh.tenants {
            let (signer, also, max) = if let Some(s) = signers.get(t.signer.as_str()) {
                s.clone()
            } else {
                let cfg = signer_of(mesh, t)?;
                let (signer, also) = open_signer(mesh, cfg, data_dir)?;
                let entry = (signer, also, cfg.max_certificate_ttl.0);
                signers.insert(&cfg.name, entry.clone());
                entry
            };
            tenants.push(TenantCa {
                name: t.name.clone(),
                namespaces: t.namespaces.clone(),
                trust_tenants: t.trust_tenants.clone(),
                signer,
                also_trusted: also,
                max_validity: max,
            });
        }
        let mut ca = Ca::new(mesh.trust_domain.clone(), tenants)?
            .with_control_namespace(&mesh.root_namespace);
        ca.domain_suffix = mesh.domain_suffix.clone();
        Ok(ca)
    }

    /// Replaces the revoked identities: from now on they get no certificate (by token or by
    /// renewal) and their certificates are not vouched for.
    pub fn set_revoked(&self, ids: std::collections::HashSet<String>) {
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(ids);
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Puts these DNS names on the control plane's own certificates (its Service, for the API
    /// server calling its webhook over TLS); no other identity gets DNS names.
    pub fn with_control_names(mut self, names: Vec<String>) -> Ca {
        self.control_names = names;
        self
    }

    /// Issues [`CONTROL_SERVICE_ACCOUNT`] in `namespace` only, never in another.
    pub fn with_control_namespace(mut self, namespace: &str) -> Ca {
        self.control_namespace = Some(namespace.to_owned());
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn tenant(&self, name: &str) -> Option<TenantCa> {
        self.tenants.load().get(name).cloned()
    }

    /// The tenant of a namespace: an exact listing wins over `*`.
    pub fn tenant_of(&self, namespace: &str) -> Option<TenantCa> {
        let tenants = self.tenants.load();
        let lists = |t: &&TenantCa, n: &str| t.namespaces.iter().any(|x| x == n);
        tenants
            .values()
            .find(|t| lists(t, namespace))
            .or_else(|| tenants.values().find(|t| lists(t, "*")))
            .cloned()
    }

    /// Puts `signer` in `tenants`' hands, trusting `also_trusted` beside its root (a rotation's
    /// other generation; see [`crate::rotation`]). Certificates issued from now on are its.
    pub fn set_signer(
        &self,
        tenants: &[String],
        signer: Arc<dyn Signer>,
        also_trusted: Vec<boring::x509::X509>,
    ) {
        self.tenants.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            for name in tenants {
                if let Some(t) = next.get_mut(name) {
                    t.signer = signer.clone();
                    t.also_trusted = also_trusted.clone();
                }
            }
            next
        });
    }

    /// Issues a certificate for `caller` from its tenant's signer. See [`crate::issue::issue`].
    /// May wait for a token signer: see [`Ca::from_mesh`] for where it may be called.
    pub fn issue(
        &self,
        caller: &Caller,
        csr_pem: &[u8],
        requested: Duration,
    ) -> Result<Issued, CaError> {
        let id = caller.spiffe_id(&self.trust_domain)?;
        if self.is_revoked(&id) {
            return Err(CaError::Revoked(id));
        }
        if caller.service_account == CONTROL_SERVICE_ACCOUNT
            && self.control_namespace.as_ref() != Some(&caller.namespace)
        {
            return Err(CaError::Reserved(id));
        }
        let tenant = self
            .tenant_of(&caller.namespace)
            .ok_or_else(|| CaError::NoTenant(caller.namespace.clone()))?;
        let control = caller.service_account == CONTROL_SERVICE_ACCOUNT;
        let issued = issue(
            tenant.signer.as_ref(),
            csr_pem,
            requested,
            tenant.max_validity,
            &id,
            if control { &self.control_names } else { &[] },
        )?;
        tracing::info!(identity = %id, tenant = %tenant.name, validity_s = issued.validity.as_secs(), "issued certificate");
        Ok(issued)
    }

    /// Signs a Kubernetes CSR addressed to `tenant`'s signer: the identity is the CSR's (its
    /// only SAN, a SPIFFE ID of this trust domain), its namespace must be the tenant's, the
    /// usages those of a workload certificate; then as [`Ca::issue`] (revocation, the reserved
    /// control-plane identity, the tenant's validity cap).
    pub fn sign_kubernetes(
        &self,
        tenant: &str,
        csr_pem: &[u8],
        usages: &[String],
        requested: Duration,
    ) -> Result<Issued, CaError> {
        check_usages(usages)?;
        let id = crate::issue::requested_identity(csr_pem)?;
        let caller = self.workload(&id)?;
        self.check_tenant(tenant, None, &caller.namespace)?;
        self.issue(&caller, csr_pem, requested)
    }

    /// Signs a cert-manager CertificateRequest for an issuer of `tenant`'s signer (`scope`: the
    /// namespace of a namespaced Issuer, `None` for a ClusterIssuer). Each URI it asks for must
    /// be a workload identity (as [`Ca::sign_kubernetes`]) and each DNS name a Service's
    /// (`<name>.<ns>.svc`, `.svc.<domain suffix>`, or `*.<ns>.svc...`), all in namespaces of the
    /// tenant within the scope; usages those of a workload certificate.
    pub fn sign_for_issuer(
        &self,
        tenant: &str,
        scope: Option<&str>,
        csr_pem: &[u8],
        usages: &[String],
        requested: Duration,
    ) -> Result<Issued, CaError> {
        check_usages(usages)?;
        let t = self
            .tenant(tenant)
            .ok_or_else(|| CaError::UnknownTenant(tenant.into()))?;
        let allow = |uris: &[String], dns: &[String]| -> Result<(), CaError> {
            for id in uris {
                let caller = self.workload(id)?;
                caller.spiffe_id(&self.trust_domain)?;
                if self.is_revoked(id) {
                    return Err(CaError::Revoked(id.clone()));
                }
                if caller.service_account == CONTROL_SERVICE_ACCOUNT {
                    return Err(CaError::Reserved(id.clone()));
                }
                self.check_tenant(tenant, scope, &caller.namespace)?;
            }
            for name in dns {
                let namespace = self
                    .service_namespace(name)
                    .ok_or_else(|| CaError::NotAServiceName(name.clone()))?;
                self.check_tenant(tenant, scope, namespace)?;
            }
            Ok(())
        };
        let issued = crate::issue::issue_requested(
            t.signer.as_ref(),
            csr_pem,
            requested,
            t.max_validity,
            &allow,
        )?;
        tracing::info!(%tenant, scope = scope.unwrap_or("cluster"), validity_s = issued.validity.as_secs(), "issued certificate for an issuer");
        Ok(issued)
    }

    /// The workload a SPIFFE ID of this trust domain names.
    fn workload(&self, id: &str) -> Result<Caller, CaError> {
        id.strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once("/ns/"))
            .filter(|(domain, _)| *domain == self.trust_domain)
            .and_then(|(_, rest)| rest.split_once("/sa/"))
            .filter(|(_, sa)| !sa.contains('/'))
            .map(|(ns, sa)| Caller::new(ns, sa))
            .ok_or_else(|| CaError::ForeignIdentity(id.to_owned()))
    }

    /// The namespace of a Service DNS name (`<name>.<ns>.svc[.<suffix>]`, the name possibly
    /// `*`); `None` for any other name.
    fn service_namespace<'a>(&self, name: &'a str) -> Option<&'a str> {
        let stem = name
            .strip_suffix(&format!(".svc.{}", self.domain_suffix))
            .or_else(|| name.strip_suffix(".svc"))?;
        let (host, namespace) = stem.rsplit_once('.')?;
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let host_ok = host == "*" || host.split('.').all(label);
        (host_ok && label(namespace)).then_some(namespace)
    }

    /// Whether `tenant`'s signer may sign for `namespace` (its tenant's, and within `scope`).
    fn check_tenant(
        &self,
        tenant: &str,
        scope: Option<&str>,
        namespace: &str,
    ) -> Result<(), CaError> {
        if let Some(scope) = scope.filter(|s| *s != namespace) {
            return Err(CaError::OutOfScope {
                namespace: namespace.into(),
                scope: scope.into(),
            });
        }
        let owner = self
            .tenant_of(namespace)
            .ok_or_else(|| CaError::NoTenant(namespace.into()))?;
        if owner.name != tenant {
            return Err(CaError::OtherTenant {
                namespace: namespace.into(),
                owner: owner.name.clone(),
                signer: tenant.into(),
            });
        }
        Ok(())
    }

    /// Whether `leaf`, a verified certificate for SPIFFE ID `id`, was issued by the signer of
    /// the tenant its namespace belongs to: the CA's endpoint trusts every tenant's root (all
    /// renew there), so a chain to *some* root is not enough, or one tenant's leaked signer
    /// would mint every tenant's identities.
    pub fn vouch(&self, id: &str, leaf: &boring::x509::X509Ref) -> Result<(), String> {
        if self.is_revoked(id) {
            return Err(format!("{id} is revoked"));
        }
        let namespace = id
            .split_once("/ns/")
            .and_then(|(_, rest)| rest.split_once("/sa/"))
            .map(|(ns, _)| ns)
            .ok_or_else(|| format!("{id} is not a workload identity"))?;
        let tenant = self
            .tenant_of(namespace)
            .ok_or_else(|| format!("namespace {namespace:?} belongs to no tenant"))?;
        // Mid-rotation either generation's key may have signed it.
        let signed = tenant.own_roots().any(|root| {
            root.public_key()
                .is_ok_and(|key| leaf.verify(&key).unwrap_or(false))
        });
        match signed {
            true => Ok(()),
            false => Err(format!(
                "{id} is not from the signer of tenant {:?}",
                tenant.name
            )),
        }
    }

    /// Every tenant's root, without duplicates: what the CA's own endpoint trusts for
    /// renewals, since workloads of every tenant renew there.
    pub fn all_roots(&self) -> Result<Vec<String>, CaError> {
        self.all_root_certs()
            .iter()
            .map(|r| Ok(String::from_utf8_lossy(&r.to_pem()?).into_owned()))
            .collect()
    }

    /// [`Ca::all_roots`] as certificates.
    pub fn all_root_certs(&self) -> Vec<boring::x509::X509> {
        let mut out: Vec<boring::x509::X509> = Vec::new();
        for t in self.tenants.load().values() {
            for root in t.own_roots() {
                if !out.iter().any(|r| same_cert(r, root)) {
                    out.push(root.clone());
                }
            }
        }
        out
    }

    /// PEM roots a tenant's workloads trust: its own first, then those of the tenants it
    /// trusts, without duplicates (tenants may share a signer).
    pub fn trust_bundle(&self, tenant: &str) -> Result<Vec<String>, CaError> {
        let tenants = self.tenants.load();
        let t = tenants
            .get(tenant)
            .ok_or_else(|| CaError::UnknownTenant(tenant.into()))?;
        let mut out: Vec<String> = Vec::new();
        let own = std::iter::once(t);
        let shared = t.trust_tenants.iter().filter_map(|n| tenants.get(n));
        for s in own.chain(shared) {
            for root in s.own_roots() {
                let pem = String::from_utf8_lossy(&root.to_pem()?).into_owned();
                if !out.contains(&pem) {
                    out.push(pem);
                }
            }
        }
        Ok(out)
    }
}
