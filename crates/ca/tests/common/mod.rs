//! Helpers shared by the CA's integration tests: keys, CSRs built the way a proxy will build
//! them, tenants on file signers, and chain verification with BoringSSL's own verifier.

// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::stack::Stack;
use boring::x509::extension::SubjectAlternativeName;
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509Req, X509StoreContext, X509};
use hypha_ca::{Ca, FileSigner, TenantCa};

pub const TD: &str = "cluster.local";

pub fn p256() -> PKey<Private> {
    let g = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&g).unwrap()).unwrap()
}

pub enum San<'a> {
    Uri(&'a str),
    Dns(&'a str),
}

pub fn csr(key: &PKey<Private>, sans: &[San]) -> Vec<u8> {
    let mut b = X509Req::builder().unwrap();
    b.set_pubkey(key).unwrap();
    if !sans.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for s in sans {
            match s {
                San::Uri(u) => san.uri(u),
                San::Dns(d) => san.dns(d),
            };
        }
        let ext = san.build(&b.x509v3_context(None)).unwrap();
        let mut exts = Stack::new().unwrap();
        exts.push(ext).unwrap();
        b.add_extensions(&exts).unwrap();
    }
    b.sign(key, MessageDigest::sha256()).unwrap();
    b.build().to_pem().unwrap()
}

pub fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

pub fn tenant(name: &str, ns: &str, trust: &[&str], dir: &std::path::Path) -> TenantCa {
    let signer = FileSigner::open_or_create(&dir.join(name), TD, &format!("test {name}")).unwrap();
    TenantCa {
        name: name.into(),
        namespaces: vec![ns.into()],
        trust_tenants: trust.iter().map(|s| (*s).into()).collect(),
        signer: Arc::new(signer),
        also_trusted: Vec::new(),
        max_validity: Duration::from_secs(24 * 3600),
    }
}

pub fn one_tenant(dir: &std::path::Path) -> Ca {
    Ca::new(TD, vec![tenant("default", "*", &[], dir)]).unwrap()
}

/// Verifies `chain[0]` against `roots` with `chain[1..]` as untrusted intermediates.
pub fn verifies(chain: &[String], roots: &[String]) -> bool {
    let mut store = X509StoreBuilder::new().unwrap();
    for r in roots {
        store
            .add_cert(X509::from_pem(r.as_bytes()).unwrap())
            .unwrap();
    }
    let store = store.build();
    let leaf = X509::from_pem(chain[0].as_bytes()).unwrap();
    let mut rest = Stack::new().unwrap();
    for c in &chain[1..] {
        rest.push(X509::from_pem(c.as_bytes()).unwrap()).unwrap();
    }
    let mut ctx = X509StoreContext::new().unwrap();
    ctx.init(&store, &leaf, &rest, |c| c.verify_cert()).unwrap()
}
