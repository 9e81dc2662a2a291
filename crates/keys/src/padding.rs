//! RSA signature encodings (RFC 8017 §9): what a raw private-key engine is given to sign.
//! BoringSSL does this inside its own RSA code; a provider that only has the raw operation
//! (the multi-buffer engine) encodes here first.

use boring::hash::{hash, MessageDigest};

use crate::KeyError;

/// DER of `DigestInfo` up to the digest bytes, for EMSA-PKCS1-v1_5 (here and for a token's
/// raw RSA mechanism).
pub(crate) fn digest_info_prefix(md: MessageDigest) -> Option<&'static [u8]> {
    const SHA256: &[u8] = &[
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    const SHA384: &[u8] = &[
        0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
        0x05, 0x00, 0x04, 0x30,
    ];
    const SHA512: &[u8] = &[
        0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
        0x05, 0x00, 0x04, 0x40,
    ];
    match md.size() {
        32 if md == MessageDigest::sha256() => Some(SHA256),
        48 if md == MessageDigest::sha384() => Some(SHA384),
        64 if md == MessageDigest::sha512() => Some(SHA512),
        _ => None,
    }
}

/// EMSA-PKCS1-v1_5 of `message` for a `k`-byte modulus: `00 01 FF..FF 00 DigestInfo`.
pub(crate) fn pkcs1_v15(md: MessageDigest, message: &[u8], k: usize) -> Result<Vec<u8>, KeyError> {
    let prefix = digest_info_prefix(md)
        .ok_or_else(|| KeyError::Algorithm("PKCS#1 v1.5 with this digest".into()))?;
    let digest = hash(md, message)?;
    let t_len = prefix.len() + digest.len();
    if k < t_len + 11 {
        return Err(KeyError::Algorithm(
            "modulus too short for PKCS#1 v1.5".into(),
        ));
    }
    let mut em = vec![0xff; k];
    em[0] = 0;
    em[1] = 1;
    em[k - t_len - 1] = 0;
    em[k - t_len..k - digest.len()].copy_from_slice(prefix);
    em[k - digest.len()..].copy_from_slice(&digest);
    Ok(em)
}

/// MGF1 with `md`: `mask` XORed in place with the mask generated from `seed`.
fn mgf1_xor(md: MessageDigest, seed: &[u8], mask: &mut [u8]) -> Result<(), KeyError> {
    for (counter, chunk) in mask.chunks_mut(md.size()).enumerate() {
        let mut input = Vec::with_capacity(seed.len() + 4);
        input.extend_from_slice(seed);
        input.extend_from_slice(&u32::try_from(counter).unwrap_or(u32::MAX).to_be_bytes());
        let block = hash(md, &input)?;
        for (b, m) in chunk.iter_mut().zip(block.iter()) {
            *b ^= m;
        }
    }
    Ok(())
}

/// EMSA-PSS of `message` for a modulus of `mod_bits` bits, MGF1 with the same digest and a
/// salt as long as the digest (what TLS 1.3 requires), returned as `k` bytes.
pub(crate) fn pss(md: MessageDigest, message: &[u8], mod_bits: usize) -> Result<Vec<u8>, KeyError> {
    let h_len = md.size();
    let em_bits = mod_bits - 1;
    let em_len = em_bits.div_ceil(8);
    let k = mod_bits.div_ceil(8);
    if em_len < 2 * h_len + 2 {
        return Err(KeyError::Algorithm("modulus too short for PSS".into()));
    }
    let m_hash = hash(md, message)?;
    let mut salt = vec![0u8; h_len];
    boring::rand::rand_bytes(&mut salt)?;
    let mut m_prime = vec![0u8; 8];
    m_prime.extend_from_slice(&m_hash);
    m_prime.extend_from_slice(&salt);
    let h = hash(md, &m_prime)?;

    // EM = maskedDB || H || 0xbc, DB = PS (zeros) || 0x01 || salt.
    let db_len = em_len - h_len - 1;
    let mut em = vec![0u8; k];
    let start = k - em_len;
    let db = &mut em[start..start + db_len];
    db[db_len - h_len - 1] = 1;
    db[db_len - h_len..].copy_from_slice(&salt);
    mgf1_xor(md, &h, db)?;
    db[0] &= 0xff >> (8 * em_len - em_bits);
    em[start + db_len..k - 1].copy_from_slice(&h);
    em[k - 1] = 0xbc;
    Ok(em)
}
