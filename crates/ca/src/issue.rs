//! Issuing a workload certificate from a CSR: the checks a CSR must pass for an authenticated
//! caller, and the leaf that comes out (URI SAN = the caller's SPIFFE ID, mTLS usages, capped
//! validity), returned as Istio's `CreateCertificate` returns it: PEM chain, leaf first.

use std::time::Duration;

use boring::asn1::Asn1Time;
use boring::nid::Nid;
use boring::pkey::{Id, PKeyRef, Public};
use boring::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use boring::x509::{GeneralNameRef, X509Req, X509};

use crate::signer::{random_serial, secs, sign_certificate, unix_now};
use crate::{CaError, Signer};

/// Longest validity granted when the signer's configuration says nothing else.
pub const DEFAULT_MAX_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// How far `notBefore` is backdated, for callers whose clocks run behind.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// The authenticated identity of whoever asks for a certificate (from its bootstrap token or
/// current certificate, never from the CSR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
}

impl Caller {
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Caller {
        Caller {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`, if both parts are plain path segments.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<String, CaError> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !ok(&self.namespace) || !ok(&self.service_account) {
            return Err(CaError::BadCaller {
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
            });
        }
        Ok(format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        ))
    }
}

/// An issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificates, leaf first, then the signer's CA certificate.
    pub chain: Vec<String>,
    /// The validity granted (the request, capped).
    pub validity: Duration,
}

/// Checks `csr_pem` for `spiffe_id` and issues a leaf signed by `signer`.
///
/// `requested` of zero means "the maximum"; anything above `max` is capped, not refused.
/// `dns_names` go on the leaf besides the SPIFFE ID (the control plane's Service names, never
/// a workload's: the CSR's own names are checked to be the SPIFFE ID alone).
pub fn issue(
    signer: &dyn Signer,
    csr_pem: &[u8],
    requested: Duration,
    max: Duration,
    spiffe_id: &str,
    dns_names: &[String],
) -> Result<Issued, CaError> {
    issue_named(signer, csr_pem, requested, max, &|csr| {
        check_sans(csr, spiffe_id)?;
        Ok((vec![spiffe_id.to_owned()], dns_names.to_vec()))
    })
}

/// Accepts (or refuses) the URI SANs and DNS names a CSR requests.
pub type AllowNames<'a> = dyn Fn(&[String], &[String]) -> Result<(), CaError> + 'a;

/// The URI SANs and DNS names a leaf gets for a CSR.
type LeafNames<'a> = dyn Fn(&X509Req) -> Result<(Vec<String>, Vec<String>), CaError> + 'a;

/// Issues a leaf with the names the CSR requests, once `allow` has accepted them (its URI SANs,
/// its DNS names); a CSR requesting any other kind of name is refused. For requesters that are
/// not the identity itself (cert-manager's CertificateRequests), whose names the caller checks.
pub fn issue_requested(
    signer: &dyn Signer,
    csr_pem: &[u8],
    requested: Duration,
    max: Duration,
    allow: &AllowNames<'_>,
) -> Result<Issued, CaError> {
    issue_named(signer, csr_pem, requested, max, &|csr| {
        let names = requested_names(csr)?.unwrap_or_default();
        if !names.others.is_empty() {
            return Err(CaError::BadCsr(format!(
                "it requests names other than URIs and DNS names: {}",
                names.others.join(", ")
            )));
        }
        if names.uris.is_empty() && names.dns.is_empty() {
            return Err(CaError::BadCsr(
                "it requests no subject alternative name".into(),
            ));
        }
        allow(&names.uris, &names.dns)?;
        Ok((names.uris, names.dns))
    })
}

/// The leaf for a CSR whose signature and key pass, with the URI and DNS SANs `names` gives.
fn issue_named(
    signer: &dyn Signer,
    csr_pem: &[u8],
    requested: Duration,
    max: Duration,
    names: &LeafNames<'_>,
) -> Result<Issued, CaError> {
    let csr = X509Req::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
    let key = csr
        .public_key()
        .map_err(|e| CaError::BadCsr(format!("public key: {e}")))?;
    // The signature first: nothing else in an unauthenticated CSR is worth reading before it.
    if !csr.verify(&key).unwrap_or(false) {
        return Err(CaError::BadSignature);
    }
    let rsa = check_key(&key)?;
    let (uris, dns_names) = names(&csr)?;

    let validity = if requested.is_zero() {
        max
    } else {
        requested.min(max)
    };
    let ca = signer.certificate();
    let now = unix_now();
    // Never past the CA certificate's own expiry.
    let left = Asn1Time::from_unix(now)?.diff(ca.not_after())?;
    let left = i64::from(left.days) * 86_400 + i64::from(left.secs);
    let left = u64::try_from(left).map_err(|_| CaError::CaExpired)?;
    let validity = validity.min(Duration::from_secs(left));

    let serial = random_serial()?;
    let not_before = Asn1Time::from_unix(now - secs(BACKDATE))?;
    let not_after = Asn1Time::from_unix(now.saturating_add(secs(validity)))?;
    let basic = BasicConstraints::new().critical().build()?;
    let mut ku = KeyUsage::new();
    ku.critical().digital_signature();
    if rsa {
        ku.key_encipherment();
    }
    let usage = ku.build()?;
    let eku = ExtendedKeyUsage::new()
        .server_auth()
        .client_auth()
        .build()?;

    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&serial)?;
    b.set_issuer_name(ca.subject_name())?;
    b.set_pubkey(&key)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    b.append_extension(&basic)?;
    b.append_extension(&usage)?;
    b.append_extension(&eku)?;
    // The subject is empty (identity lives in the SAN), so RFC 5280 wants the SAN critical.
    let (san, ski, aki) = {
        let ctx = b.x509v3_context(Some(ca), None);
        let mut san = SubjectAlternativeName::new();
        san.critical();
        for uri in &uris {
            san.uri(uri);
        }
        for name in &dns_names {
            san.dns(name);
        }
        (
            san.build(&ctx)?,
            SubjectKeyIdentifier::new().build(&ctx)?,
            AuthorityKeyIdentifier::new().keyid(true).build(&ctx)?,
        )
    };
    b.append_extension(&san)?;
    b.append_extension(&ski)?;
    b.append_extension(&aki)?;
    let leaf = sign_certificate(b, &|tbs| signer.sign(tbs))?;

    let pem = |c: &X509| -> Result<String, CaError> {
        Ok(String::from_utf8_lossy(&c.to_pem()?).into_owned())
    };
    Ok(Issued {
        chain: vec![pem(&leaf)?, pem(ca)?],
        validity,
    })
}

/// Accepts P-256 and RSA >= 2048; returns whether the key is RSA.
fn check_key(key: &PKeyRef<Public>) -> Result<bool, CaError> {
    match key.id() {
        Id::EC => {
            let curve = key.ec_key()?.group().curve_name();
            if curve == Some(Nid::X9_62_PRIME256V1) {
                Ok(false)
            } else {
                let name = curve
                    .and_then(|n| n.short_name().ok())
                    .unwrap_or("unnamed curve");
                Err(CaError::UnsupportedKey(format!("ECDSA on {name}")))
            }
        }
        Id::RSA if key.bits() >= 2048 => Ok(true),
        Id::RSA => Err(CaError::UnsupportedKey(format!("RSA-{}", key.bits()))),
        other => Err(CaError::UnsupportedKey(format!("key type {other:?}"))),
    }
}

/// The names a CSR requests.
#[derive(Default)]
struct Requested {
    uris: Vec<String>,
    dns: Vec<String>,
    /// Names of other kinds, described (`email:x`, `IP:...`).
    others: Vec<String>,
}

impl Requested {
    /// Every name but the URIs, described (`DNS:x`, `email:x`).
    fn non_uris(&self) -> Vec<String> {
        let dns = self.dns.iter().map(|d| format!("DNS:{d}"));
        dns.chain(self.others.iter().cloned()).collect()
    }
}

/// What a CSR requests; `None` when it requests no SAN at all.
fn requested_names(csr: &X509Req) -> Result<Option<Requested>, CaError> {
    // The requested extensions are read by placing them in a scratch certificate, whose SAN
    // accessor the library does have (it has none for a CSR).
    let Ok(exts) = csr.extensions() else {
        return Ok(None);
    };
    let mut scratch = X509::builder()?;
    for ext in &exts {
        scratch.append_extension(ext)?;
    }
    let Some(names) = scratch.build().subject_alt_names() else {
        return Ok(None);
    };
    let mut r = Requested::default();
    for name in &names {
        match (name.uri(), name.dnsname()) {
            (Some(uri), _) => r.uris.push(uri.to_owned()),
            (_, Some(dns)) => r.dns.push(dns.to_owned()),
            _ => r.others.push(describe(name)),
        }
    }
    Ok(Some(r))
}

/// The one identity a CSR asks for: its only SAN, a URI (for a CSR whose requester is not the
/// identity itself, as with Kubernetes CSRs istiod files for its workloads).
pub fn requested_identity(csr_pem: &[u8]) -> Result<String, CaError> {
    let csr = X509Req::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
    match requested_names(&csr)?.map(|r| (r.non_uris(), r.uris)) {
        Some((others, uris)) if uris.len() == 1 && others.is_empty() => {
            Ok(uris.into_iter().next().unwrap_or_default())
        }
        Some((others, uris)) => Err(CaError::BadCsr(format!(
            "it must request exactly one URI SAN (a SPIFFE ID) and no other name; it requests {}",
            uris.iter()
                .map(|u| format!("URI:{u}"))
                .chain(others)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => Err(CaError::BadCsr(
            "it requests no subject alternative name; expected a SPIFFE ID".into(),
        )),
    }
}

/// The CSR's requested SANs must be exactly one URI, equal to `expected`.
fn check_sans(csr: &X509Req, expected: &str) -> Result<(), CaError> {
    let no_san = || CaError::NoSan {
        expected: expected.into(),
    };
    let requested = requested_names(csr)?.ok_or_else(no_san)?;
    let (others, uris) = (requested.non_uris(), requested.uris);
    match uris.as_slice() {
        [] if others.is_empty() => Err(no_san()),
        [only] if others.is_empty() => {
            if only == expected {
                Ok(())
            } else {
                Err(CaError::IdentityMismatch {
                    requested: only.clone(),
                    caller: expected.into(),
                })
            }
        }
        _ => {
            // Every name but (one copy of) the caller's own is extra.
            let mut extra = others;
            let mut seen_own = false;
            for uri in uris {
                if uri == expected && !seen_own {
                    seen_own = true;
                } else {
                    extra.push(format!("URI:{uri}"));
                }
            }
            Err(CaError::ExtraSan {
                caller: expected.into(),
                extra,
            })
        }
    }
}

fn describe(name: &GeneralNameRef) -> String {
    if let Some(d) = name.dnsname() {
        format!("DNS:{d}")
    } else if let Some(e) = name.email() {
        format!("email:{e}")
    } else if let Some(ip) = name.ipaddress() {
        format!("IP:{ip:?}")
    } else {
        "a non-URI name".into()
    }
}
