//! [`TokenSigner`]: a CA key that lives in a PKCS#11 token and never leaves it. The token is
//! attested first ([`crate::attest`]); the key is a persistent token object found by its label,
//! or generated there (P-256, sensitive, not extractable) on first start. Only the public CA
//! certificate is kept on disk, in the signer's directory like [`crate::FileSigner`]'s, and is
//! checked against the token's key on every start.
//!
//! Blocking: every token operation here waits on the calling thread for the token's own
//! thread pool (`hypha_keys::pkcs11`). Callers therefore run off the async runtime's workers:
//! the CA service signs under `spawn_blocking`, `hypha control` opens the CA and renews its own
//! certificate under `spawn_blocking`, and `hypha ca issue` has no runtime. A call from a
//! worker panics (tokio's `blocking_recv`) instead of silently stalling it.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use boring::ssl::SslSignatureAlgorithm;
use boring::x509::X509;
use hypha_keys::pkcs11::{Token, TokenConfig, TokenKey, TokenKeyKind};
use hypha_keys::{KeyError, KeyProvider};

use crate::attest::{self, Attestor};
use crate::error::{Refused, TokenKeyError};
use crate::signer::{build_root, fingerprint, write_new, CERT_FILE};
use crate::{CaError, Signer};

/// Threads (a token session each) per signer: the CA signs a certificate per request, far
/// below what one session does; two let one slow signature not hold up the next.
const TOKEN_THREADS: usize = 2;

/// What a token-held signer needs.
pub struct TokenSignerConfig {
    /// The signer's name, for errors and logs.
    pub signer: String,
    pub token: TokenConfig,
    /// The CA key's `CKA_LABEL`.
    pub key_label: String,
    pub attestor: Box<dyn Attestor>,
}

impl TokenSignerConfig {
    /// From a mesh config signer whose key is `pkcs11`.
    pub fn from_mesh(
        signer: &str,
        p: &hypha_config::mesh::Pkcs11Key,
    ) -> Result<TokenSignerConfig, CaError> {
        let attestor = p
            .attestation
            .as_ref()
            .and_then(attest::from_config)
            .ok_or_else(|| CaError::NoAttestation(signer.to_owned()))?;
        let pin = match (&p.pin_file, &p.pin_env) {
            (Some(f), None) => hypha_keys::pkcs11::PinSource::File(f.into()),
            (None, Some(v)) => hypha_keys::pkcs11::PinSource::Env(v.clone()),
            _ => {
                return Err(CaError::TokenKey(Box::new(TokenKeyError {
                    signer: signer.to_owned(),
                    token: p.token_label.clone(),
                    key_label: p.key_label.clone(),
                    problem: "exactly one of pinFile and pinEnv is required".into(),
                })))
            }
        };
        Ok(TokenSignerConfig {
            signer: signer.to_owned(),
            token: TokenConfig {
                module: PathBuf::from(&p.module),
                label: p.token_label.clone(),
                pin,
                threads: TOKEN_THREADS,
            },
            key_label: p.key_label.clone(),
            attestor,
        })
    }
}

/// A CA key in a PKCS#11 token, with its root certificate in a directory.
pub struct TokenSigner {
    key: TokenKey,
    cert: X509,
    dir: PathBuf,
    signer: String,
    token: String,
    attested: crate::signer::Attested,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("signer", &self.signer)
            .field("key", &self.key.describe())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Why opening the token failed: its own error, or the attestor said no.
enum Open {
    Key(KeyError),
    Refused { serial: String, reason: String },
}

impl From<KeyError> for Open {
    fn from(e: KeyError) -> Open {
        Open::Key(e)
    }
}

impl TokenSigner {
    /// Attests and opens the token, then finds the key labelled `cfg.key_label` (or generates
    /// it on first start) and loads `dir/ca-cert.pem` (or creates the root, `O=<organization>,
    /// CN=<common_name>`, signed by the token). Blocks: see the module docs.
    pub fn open_or_create(
        cfg: &TokenSignerConfig,
        dir: &Path,
        organization: &str,
        common_name: &str,
    ) -> Result<TokenSigner, CaError> {
        let (token, attested) = Self::open_token(cfg)?;
        let cert_path = dir.join(CERT_FILE);
        let token_err = |source| CaError::Token {
            signer: cfg.signer.clone(),
            token: cfg.token.label.clone(),
            source: Box::new(source),
        };
        let key_err = |problem: String| {
            CaError::TokenKey(Box::new(TokenKeyError {
                signer: cfg.signer.clone(),
                token: cfg.token.label.clone(),
                key_label: cfg.key_label.clone(),
                problem,
            }))
        };
        let found = token.find_blocking(&cfg.key_label).map_err(token_err)?;
        let cert_exists = cert_path.exists();
        let (key, generated) = match found {
            Some(key) => (key, false),
            None if cert_exists => {
                return Err(key_err(format!(
                    "the token holds no such key, but {} exists; restore the token's key, or \
                     remove the certificate to start a new CA",
                    cert_path.display()
                )))
            }
            None => {
                let key = token
                    .generate_blocking(TokenKeyKind::EcdsaP256, &cfg.key_label, true)
                    .map_err(token_err)?;
                (key, true)
            }
        };
        if key.kind() != TokenKeyKind::EcdsaP256 {
            return Err(key_err(format!(
                "it is {}; the CA signs with ECDSA P-256 keys only",
                key.describe()
            )));
        }
        let cert = if cert_exists {
            let cert = X509::from_pem(&fs::read(&cert_path).map_err(CaError::io(&cert_path))?)?;
            if !cert.public_key()?.public_eq(key.public_key()) {
                return Err(key_err(format!(
                    "the CA certificate {} does not belong to it; restore the matching \
                     certificate, or start a new root under a new keyLabel",
                    cert_path.display()
                )));
            }
            tracing::info!(signer = %cfg.signer, token = %cfg.token.label, key = %cfg.key_label, root = %fingerprint(&cert), "loaded token-held CA key and root");
            cert
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(CaError::io(dir))?;
            let cert = build_root(key.public_key(), organization, common_name, &|tbs| {
                token_sign(&key, &cfg.signer, &cfg.token.label, tbs)
            })?;
            write_new(&cert_path, &cert.to_pem()?, 0o644)?;
            if generated {
                tracing::info!(signer = %cfg.signer, token = %cfg.token.label, key = %cfg.key_label, root = %fingerprint(&cert), "generated CA key in the token and its root");
            } else {
                // E.g. the data directory was lost, or a start stopped between generating the
                // key and writing the root: the key is what matters; a new root is made for it.
                tracing::warn!(signer = %cfg.signer, token = %cfg.token.label, key = %cfg.key_label, root = %fingerprint(&cert), "the token already held the CA key; made a new root for it");
            }
            cert
        };
        Ok(TokenSigner {
            key,
            cert,
            dir: dir.into(),
            signer: cfg.signer.clone(),
            token: cfg.token.label.clone(),
            attested,
        })
    }

    /// The token, opened only if the attestor approves it (before any login), and what
    /// approved it.
    fn open_token(
        cfg: &TokenSignerConfig,
    ) -> Result<(Arc<Token>, crate::signer::Attested), CaError> {
        let nonce = attest::nonce()?;
        let mut approved = None;
        let opened = Token::open_checked(&cfg.token, |info| {
            cfg.attestor
                .attest(info, &nonce)
                .map_err(|reason| Open::Refused {
                    serial: info.serial_number.clone(),
                    reason,
                })?;
            approved = Some(info.clone());
            Ok::<(), Open>(())
        });
        match opened {
            Ok(token) => {
                let info = approved.unwrap_or_default();
                tracing::info!(signer = %cfg.signer, token = %info.label, serial = %info.serial_number, manufacturer = %info.manufacturer_id, attestor = %cfg.attestor.describe(), "token approved by attestation");
                let attested = crate::signer::Attested {
                    token: info,
                    attestor: cfg.attestor.describe(),
                    at: std::time::SystemTime::now(),
                };
                Ok((token, attested))
            }
            Err(Open::Refused { serial, reason }) => {
                Err(CaError::AttestationRefused(Box::new(Refused {
                    signer: cfg.signer.clone(),
                    token: cfg.token.label.clone(),
                    serial,
                    attestor: cfg.attestor.describe(),
                    reason,
                })))
            }
            Err(Open::Key(source)) => Err(CaError::Token {
                signer: cfg.signer.clone(),
                token: cfg.token.label.clone(),
                source: Box::new(source),
            }),
        }
    }

    /// The directory holding this signer's certificate.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Signer for TokenSigner {
    fn certificate(&self) -> &X509 {
        &self.cert
    }

    /// Waits for the token (see the module docs for why every caller may block).
    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, CaError> {
        token_sign(&self.key, &self.signer, &self.token, tbs)
    }

    fn attested(&self) -> Option<&crate::signer::Attested> {
        Some(&self.attested)
    }
}

/// A DER ECDSA-Sig-Value over SHA-256 of `tbs` by the token (hashed here, `CKM_ECDSA` there).
fn token_sign(key: &TokenKey, signer: &str, token: &str, tbs: &[u8]) -> Result<Vec<u8>, CaError> {
    key.sign_blocking(SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, tbs)
        .map_err(|source| CaError::Token {
            signer: signer.to_owned(),
            token: token.to_owned(),
            source: Box::new(source),
        })
}
