//! Private-key providers: every private-key operation of a TLS handshake is an asynchronous
//! call into a [`KeyProvider`], wired into BoringSSL through its asynchronous private-key
//! method ([`Method`]). A handshake waiting for its signature yields to the runtime; nothing
//! else waits with it.
//!
//! Backends: [`SoftwareKey`] (the key in this process's memory; the default), [`pkcs11`]
//! (the key inside a token) and [`batch`] (RSA keys computed eight at a time by the
//! multi-buffer engine, Istio's `cryptomb`).

#![forbid(unsafe_code)]

pub mod batch;
pub mod metrics;
mod padding;
pub mod pkcs11;
pub mod softhsm;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use boring::hash::MessageDigest;
use boring::pkey::{PKey, Private, Public};
use boring::rsa::Padding;
use boring::sign::{RsaPssSaltlen, Signer};
use boring::ssl::{
    AsyncPrivateKeyMethod, AsyncPrivateKeyMethodError, BoxPrivateKeyMethodFinish,
    BoxPrivateKeyMethodFuture, SslRef, SslSignatureAlgorithm,
};

/// Why a private-key operation failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signature algorithm {0} is not supported by this key")]
    Algorithm(String),
    #[error("TLS library: {0}")]
    Ssl(#[from] boring::error::ErrorStack),
    #[error("key backend: {0}")]
    Backend(String),
}

/// A pending private-key operation.
pub type KeyFuture<T> = Pin<Box<dyn Future<Output = Result<T, KeyError>> + Send>>;

/// Where a private key lives and how it signs.
pub trait KeyProvider: Send + Sync + 'static {
    /// The public half, which the certificate must carry.
    fn public_key(&self) -> &PKey<Public>;

    /// Signs `input` (the whole message, not a digest) as the TLS `algorithm` says: its digest
    /// and, for RSA, PKCS#1 v1.5 or PSS padding.
    fn sign(&self, algorithm: SslSignatureAlgorithm, input: &[u8]) -> KeyFuture<Vec<u8>>;

    /// Raw RSA decryption (no padding: BoringSSL checks the padding itself), what an RSA key
    /// exchange asks of the server's key. `input` is as long as the modulus; a key that is not
    /// RSA refuses.
    fn decrypt(&self, input: &[u8]) -> KeyFuture<Vec<u8>>;

    /// What the key is, for logs (never key material): e.g. `software ECDSA P-256`.
    fn describe(&self) -> String;
}

/// The digest and padding a TLS signature algorithm means.
pub(crate) fn scheme(
    algorithm: SslSignatureAlgorithm,
) -> Result<(MessageDigest, Option<Padding>), KeyError> {
    let a = algorithm;
    Ok(if a == SslSignatureAlgorithm::RSA_PKCS1_SHA256 {
        (MessageDigest::sha256(), Some(Padding::PKCS1))
    } else if a == SslSignatureAlgorithm::RSA_PKCS1_SHA384 {
        (MessageDigest::sha384(), Some(Padding::PKCS1))
    } else if a == SslSignatureAlgorithm::RSA_PKCS1_SHA512 {
        (MessageDigest::sha512(), Some(Padding::PKCS1))
    } else if a == SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256 {
        (MessageDigest::sha256(), Some(Padding::PKCS1_PSS))
    } else if a == SslSignatureAlgorithm::RSA_PSS_RSAE_SHA384 {
        (MessageDigest::sha384(), Some(Padding::PKCS1_PSS))
    } else if a == SslSignatureAlgorithm::RSA_PSS_RSAE_SHA512 {
        (MessageDigest::sha512(), Some(Padding::PKCS1_PSS))
    } else if a == SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256 {
        (MessageDigest::sha256(), None)
    } else if a == SslSignatureAlgorithm::ECDSA_SECP384R1_SHA384 {
        (MessageDigest::sha384(), None)
    } else {
        return Err(KeyError::Algorithm(algorithm.to_string()));
    })
}

/// Signs with a key in memory, as [`KeyProvider::sign`] describes.
pub fn sign_with(
    key: &PKey<Private>,
    algorithm: SslSignatureAlgorithm,
    input: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let (digest, padding) = scheme(algorithm)?;
    let mut signer = Signer::new(digest, key)?;
    if let Some(p) = padding {
        if key.rsa().is_err() {
            return Err(KeyError::Algorithm(algorithm.to_string()));
        }
        signer.set_rsa_padding(p)?;
        if p == Padding::PKCS1_PSS {
            signer.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
        }
    }
    Ok(signer.sign_oneshot_to_vec(input)?)
}

/// Decrypts with a key in memory, as [`KeyProvider::decrypt`] describes.
pub fn decrypt_with(key: &PKey<Private>, input: &[u8]) -> Result<Vec<u8>, KeyError> {
    let rsa = key
        .rsa()
        .map_err(|_| KeyError::Algorithm("RSA decryption with a key that is not RSA".into()))?;
    let size = rsa.size() as usize;
    if input.len() != size {
        return Err(KeyError::Algorithm(format!(
            "RSA decryption of {} bytes with a {size}-byte modulus",
            input.len()
        )));
    }
    let mut out = vec![0; size];
    let n = rsa.private_decrypt(input, &mut out, Padding::NONE)?;
    out.truncate(n);
    Ok(out)
}

/// A key in this process's memory.
pub struct SoftwareKey {
    key: PKey<Private>,
    public: PKey<Public>,
}

impl std::fmt::Debug for SoftwareKey {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl SoftwareKey {
    pub fn new(key: PKey<Private>) -> Result<SoftwareKey, KeyError> {
        let public = PKey::public_key_from_der(&key.public_key_to_der()?)?;
        Ok(SoftwareKey { key, public })
    }

    /// The key itself, for what must hold it in memory anyway (signing a CSR; writing a key
    /// file the user asked for).
    pub fn private_key(&self) -> &PKey<Private> {
        &self.key
    }
}

impl KeyProvider for SoftwareKey {
    fn public_key(&self) -> &PKey<Public> {
        &self.public
    }

    fn sign(&self, algorithm: SslSignatureAlgorithm, input: &[u8]) -> KeyFuture<Vec<u8>> {
        let result = sign_with(&self.key, algorithm, input);
        Box::pin(std::future::ready(result))
    }

    fn decrypt(&self, input: &[u8]) -> KeyFuture<Vec<u8>> {
        Box::pin(std::future::ready(decrypt_with(&self.key, input)))
    }

    fn describe(&self) -> String {
        let kind = match (self.key.ec_key(), self.key.rsa()) {
            (Ok(_), _) => "ECDSA".to_owned(),
            (_, Ok(rsa)) => format!("RSA-{}", rsa.size() * 8),
            _ => "key".to_owned(),
        };
        format!("software {kind}")
    }
}

/// BoringSSL's asynchronous private-key method over a provider: a context configured with it
/// holds no private key; each handshake's signature is a future the TLS stream polls.
pub struct Method(pub Arc<dyn KeyProvider>);

impl AsyncPrivateKeyMethod for Method {
    fn sign(
        &self,
        _ssl: &mut SslRef,
        input: &[u8],
        algorithm: SslSignatureAlgorithm,
        _output: &mut [u8],
    ) -> Result<BoxPrivateKeyMethodFuture, AsyncPrivateKeyMethodError> {
        Ok(completion(self.0.sign(algorithm, input), "signature"))
    }

    /// An RSA key exchange (TLS 1.2 `RSA` suites, which Hypha's own contexts do not offer, so
    /// only a context configured otherwise asks): raw RSA decryption by the provider, BoringSSL
    /// checking the padding.
    fn decrypt(
        &self,
        _ssl: &mut SslRef,
        input: &[u8],
        _output: &mut [u8],
    ) -> Result<BoxPrivateKeyMethodFuture, AsyncPrivateKeyMethodError> {
        Ok(completion(self.0.decrypt(input), "decryption"))
    }
}

/// The handshake's side of a pending operation: once the provider answers, copy its bytes into
/// BoringSSL's output buffer.
fn completion(pending: KeyFuture<Vec<u8>>, what: &'static str) -> BoxPrivateKeyMethodFuture {
    Box::pin(async move {
        let bytes = pending.await.map_err(|e| {
            tracing::warn!(error = %e, "private-key {what} failed");
            AsyncPrivateKeyMethodError
        })?;
        let finish: BoxPrivateKeyMethodFinish = Box::new(move |_: &mut SslRef, out: &mut [u8]| {
            let n = bytes.len();
            out.get_mut(..n)
                .ok_or(AsyncPrivateKeyMethodError)?
                .copy_from_slice(&bytes);
            Ok(n)
        });
        Ok(finish)
    })
}
