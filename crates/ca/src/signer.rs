//! The seam between issuing certificates and holding a CA key: a [`Signer`] shows its CA
//! certificate and signs bytes, nothing more, so the key can live in a file or in a PKCS#11
//! token ([`crate::TokenSigner`]) without the issuing code changing.
//!
//! [`FileSigner`]: an ECDSA P-256 key and self-signed root in a directory, created on first start
//! (key file created 0600 from the first byte), loaded and checked on later starts.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use boring::asn1::Asn1Time;
use boring::bn::{BigNum, MsbOption};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, PKeyRef, Private, Public};
use boring::x509::extension::{BasicConstraints, KeyUsage, SubjectKeyIdentifier};
use boring::x509::{X509Builder, X509Name, X509};

use crate::{der, CaError};

/// Validity of a generated root certificate.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A file signer's key (PEM, 0600) and root, in its directory.
pub const KEY_FILE: &str = "ca-key.pem";
pub const CERT_FILE: &str = "ca-cert.pem";

/// A CA key holder. Only P-256 ECDSA with SHA-256 for now: the certificate builder stamps that
/// algorithm into what it asks the signer to sign.
pub trait Signer: Send + Sync {
    /// The CA certificate (a self-signed root for now) whose key this signer holds.
    fn certificate(&self) -> &X509;
    /// A DER `ECDSA-Sig-Value` over SHA-256 of `tbs` (hashing is the signer's job: a token may
    /// need the hash, `CKM_ECDSA`, rather than the message).
    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, CaError>;

    /// The token holding the key and what approved it, for a key in a token.
    fn attested(&self) -> Option<&Attested> {
        None
    }
}

/// A token a signer's key lives in, as its attestation saw and approved it.
#[derive(Debug, Clone)]
pub struct Attested {
    pub token: crate::attest::TokenInfo,
    /// The attestor that approved it ([`crate::attest::Attestor::describe`]).
    pub attestor: String,
    pub at: std::time::SystemTime,
}

/// "Sign these bytes" as a closure: how certificate building reaches a key it does not hold.
pub type SignFn<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, CaError> + 'a;

/// Signs a certificate built by `builder` with `sign` instead of a key in the process.
///
/// boring's builder can only sign with an in-process key, so it signs with a throwaway key of
/// the CA's algorithm (P-256/SHA-256, so the algorithm fields are right), then the signature is
/// replaced by one computed by `sign` over the same `tbsCertificate` bytes.
pub(crate) fn sign_certificate(
    mut builder: X509Builder,
    sign: &SignFn<'_>,
) -> Result<X509, CaError> {
    let throwaway = p256_key()?;
    builder.sign(&throwaway, MessageDigest::sha256())?;
    let draft = builder.build().to_der()?;
    let (tbs, alg) = der::split_signed(&draft)?;
    let signature = sign(tbs)?;
    Ok(X509::from_der(&der::join_signed(tbs, alg, &signature))?)
}

pub(crate) fn p256_key() -> Result<PKey<Private>, CaError> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

/// A random positive serial of up to 159 bits (RFC 5280: at most 20 octets).
pub(crate) fn random_serial() -> Result<boring::asn1::Asn1Integer, CaError> {
    let mut bn = BigNum::new()?;
    bn.rand(159, MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

/// A self-signed CA certificate for `public_key`, signed through `sign`.
pub fn build_root(
    public_key: &PKeyRef<Public>,
    organization: &str,
    common_name: &str,
    sign: &SignFn<'_>,
) -> Result<X509, CaError> {
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, organization)?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    let name = name.build();

    let now = unix_now();
    let serial = random_serial()?;
    let not_before = Asn1Time::from_unix(now - 60)?;
    let not_after = Asn1Time::from_unix(now + secs(ROOT_VALIDITY))?;
    let basic = BasicConstraints::new().critical().ca().build()?;
    let usage = KeyUsage::new()
        .critical()
        .key_cert_sign()
        .crl_sign()
        .build()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(public_key)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    b.append_extension(&basic)?;
    b.append_extension(&usage)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(&ski)?;
    sign_certificate(b, sign)
}

pub(crate) fn unix_now() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// A CA key and root certificate kept as PEM files in a directory.
pub struct FileSigner {
    key: PKey<Private>,
    cert: X509,
    dir: PathBuf,
}

impl std::fmt::Debug for FileSigner {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSigner")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FileSigner {
    /// Loads the key and root from `dir`, or creates them there (directory 0700, key 0600) if
    /// neither exists. The root's subject is `O=<organization>, CN=<common_name>`.
    pub fn open_or_create(
        dir: &Path,
        organization: &str,
        common_name: &str,
    ) -> Result<FileSigner, CaError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Self::load(dir, &key_path, &cert_path),
            (false, false) => Self::create(dir, &key_path, &cert_path, organization, common_name),
            (true, false) => Err(CaError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
            (false, true) => Err(CaError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
        }
    }

    /// The directory holding this signer's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn load(dir: &Path, key_path: &Path, cert_path: &Path) -> Result<FileSigner, CaError> {
        let mode = fs::metadata(key_path)
            .map_err(CaError::io(key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::KeyFileMode {
                path: key_path.into(),
                mode: mode & 0o777,
            });
        }
        let key = PKey::private_key_from_pem(&fs::read(key_path).map_err(CaError::io(key_path))?)?;
        let cert = X509::from_pem(&fs::read(cert_path).map_err(CaError::io(cert_path))?)?;
        if !cert.public_key()?.public_eq(&key) {
            return Err(CaError::KeyMismatch {
                path: cert_path.into(),
            });
        }
        tracing::info!(dir = %dir.display(), root = %fingerprint(&cert), "loaded CA key and root");
        Ok(FileSigner {
            key,
            cert,
            dir: dir.into(),
        })
    }

    fn create(
        dir: &Path,
        key_path: &Path,
        cert_path: &Path,
        organization: &str,
        common_name: &str,
    ) -> Result<FileSigner, CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(CaError::io(dir))?;
        let key = p256_key()?;
        let public = PKey::public_key_from_pem(&key.public_key_to_pem()?)?;
        let cert = build_root(&public, organization, common_name, &|tbs| {
            ecdsa_sha256(&key, tbs)
        })?;
        // Cert first: a crash between the writes leaves a cert without a key, which is refused
        // rather than silently replaced; the key is written to a 0600 temp file and renamed.
        write_new(cert_path, &cert.to_pem()?, 0o644)?;
        write_new(key_path, &key.private_key_to_pem_pkcs8()?, 0o600)?;
        tracing::info!(dir = %dir.display(), root = %fingerprint(&cert), "generated CA key and root");
        Ok(FileSigner {
            key,
            cert,
            dir: dir.into(),
        })
    }
}

impl Signer for FileSigner {
    fn certificate(&self) -> &X509 {
        &self.cert
    }

    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, CaError> {
        ecdsa_sha256(&self.key, tbs)
    }
}

fn ecdsa_sha256(key: &PKeyRef<Private>, data: &[u8]) -> Result<Vec<u8>, CaError> {
    let mut s = boring::sign::Signer::new(MessageDigest::sha256(), key)?;
    Ok(s.sign_oneshot_to_vec(data)?)
}

/// Writes `bytes` to a new file created with `mode` (never wider, even briefly), via a temp
/// file in the same directory renamed into place.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(CaError::io(&tmp))?;
    f.write_all(bytes).map_err(CaError::io(&tmp))?;
    f.sync_all().map_err(CaError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(CaError::io(path))
}

/// SHA-256 of the certificate's DER, hex: how roots are named in logs.
pub fn fingerprint(cert: &X509) -> String {
    cert.digest(MessageDigest::sha256())
        .map(|d| d.iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default()
}
