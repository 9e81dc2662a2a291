//! Just enough DER to swap the signature of a signed structure (`Certificate`,
//! `CertificationRequest`: `SEQUENCE { tbs, signatureAlgorithm, signatureValue }`): split it
//! and re-assemble it with a signature computed elsewhere (a [`crate::Signer`], a key in a
//! token) over the exact `tbs` bytes.

use crate::CaError;

/// One TLV at the start of `buf`: (tag, whole element, content).
fn tlv(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), CaError> {
    let short = CaError::Encoding("truncated DER");
    let (&tag, rest) = buf.split_first().ok_or(short)?;
    let (&first, rest) = rest
        .split_first()
        .ok_or(CaError::Encoding("truncated DER"))?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(CaError::Encoding("bad DER length"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    let end = hdr
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or(CaError::Encoding("DER length past the end"))?;
    Ok((tag, &buf[..end], &buf[hdr..end]))
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(u8::try_from(len).unwrap());
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | u8::try_from(bytes.len() - skip).unwrap());
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// `(tbs, signatureAlgorithm)` as complete DER elements.
pub fn split_signed(cert: &[u8]) -> Result<(&[u8], &[u8]), CaError> {
    let (tag, _, content) = tlv(cert)?;
    if tag != 0x30 {
        return Err(CaError::Encoding("certificate is not a SEQUENCE"));
    }
    let (tag, tbs, _) = tlv(content)?;
    if tag != 0x30 {
        return Err(CaError::Encoding("tbsCertificate is not a SEQUENCE"));
    }
    let (tag, alg, _) = tlv(&content[tbs.len()..])?;
    if tag != 0x30 {
        return Err(CaError::Encoding("signatureAlgorithm is not a SEQUENCE"));
    }
    Ok((tbs, alg))
}

/// The signed structure from its parts and the raw signature value.
pub fn join_signed(tbs: &[u8], alg: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut bits = vec![0x03];
    push_len(&mut bits, signature.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(signature);
    let body = tbs.len() + alg.len() + bits.len();
    let mut out = Vec::with_capacity(body + 6);
    out.push(0x30);
    push_len(&mut out, body);
    out.extend_from_slice(tbs);
    out.extend_from_slice(alg);
    out.extend_from_slice(&bits);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_round_trip() {
        let tbs = {
            let mut v = vec![0x30, 0x82, 0x01, 0x00];
            v.extend(std::iter::repeat_n(7u8, 256));
            v
        };
        let alg = [0x30, 0x00];
        let cert = join_signed(&tbs, &alg, &[1, 2, 3]);
        let (t, a) = split_signed(&cert).unwrap();
        assert_eq!(t, &tbs[..]);
        assert_eq!(a, &alg[..]);
        assert_eq!(&cert[cert.len() - 6..], &[0x03, 0x04, 0x00, 1, 2, 3]);
    }

    #[test]
    fn truncated_input_is_an_error() {
        assert!(split_signed(&[0x30, 0x82, 0x01]).is_err());
        assert!(split_signed(&[0x30, 0x05, 0x30, 0x10]).is_err());
    }
}
