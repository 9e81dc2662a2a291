//! Protobuf request bodies, for the kinds kubectl sends that way (its typed clients write
//! `application/vnd.kubernetes.protobuf` and do not fall back to JSON): the `k8s\0` envelope
//! (`runtime.Unknown`) and, per kind, the fields of the object's message this server reads,
//! turned into the object's JSON. Fields not described here are skipped.

use base64::Engine as _;
use serde_json::{json, Map, Value};

/// How one field of a message becomes JSON.
#[derive(Clone, Copy)]
enum F {
    Str,
    /// `bytes`: base64 in JSON.
    Bytes,
    Int,
    /// `meta.v1.Time`: RFC 3339.
    Time,
    Msg(&'static [Field]),
    /// `map<string, string>`.
    StrMap,
}

/// (number, JSON name, how, repeated)
type Field = (u64, &'static str, F, bool);

const OBJECT_META: &[Field] = &[
    (1, "name", F::Str, false),
    (2, "generateName", F::Str, false),
    (3, "namespace", F::Str, false),
    (5, "uid", F::Str, false),
    (6, "resourceVersion", F::Str, false),
    (7, "generation", F::Int, false),
    (8, "creationTimestamp", F::Time, false),
    (11, "labels", F::StrMap, false),
    (12, "annotations", F::StrMap, false),
    (14, "finalizers", F::Str, true),
];

const CSR_CONDITION: &[Field] = &[
    (1, "type", F::Str, false),
    (6, "status", F::Str, false),
    (2, "reason", F::Str, false),
    (3, "message", F::Str, false),
    (4, "lastUpdateTime", F::Time, false),
    (5, "lastTransitionTime", F::Time, false),
];

const CSR: &[Field] = &[
    (1, "metadata", F::Msg(OBJECT_META), false),
    (
        2,
        "spec",
        F::Msg(&[
            (1, "request", F::Bytes, false),
            (2, "username", F::Str, false),
            (3, "uid", F::Str, false),
            (4, "groups", F::Str, true),
            (5, "usages", F::Str, true),
            (7, "signerName", F::Str, false),
            (8, "expirationSeconds", F::Int, false),
        ]),
        false,
    ),
    (
        3,
        "status",
        F::Msg(&[
            (1, "conditions", F::Msg(CSR_CONDITION), true),
            (2, "certificate", F::Bytes, false),
        ]),
        false,
    ),
];

const NAMESPACE: &[Field] = &[
    (1, "metadata", F::Msg(OBJECT_META), false),
    (2, "spec", F::Msg(&[(1, "finalizers", F::Str, true)]), false),
];

/// The object a protobuf body holds, as JSON.
pub(crate) fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body
        .strip_prefix(b"k8s\0")
        .ok_or("a protobuf body starts with the k8s envelope")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, v) in fields(envelope)? {
        match (n, v) {
            (1, Wire::Len(type_meta)) => {
                for (n, v) in fields(type_meta)? {
                    match (n, v) {
                        (1, Wire::Len(s)) => api_version = text(s)?,
                        (2, Wire::Len(s)) => kind = text(s)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(r)) => raw = r,
            _ => {}
        }
    }
    let schema = match kind.as_str() {
        "CertificateSigningRequest" => CSR,
        "Namespace" => NAMESPACE,
        other => {
            return Err(format!(
                "protobuf bodies of kind {other:?} are not read here"
            ))
        }
    };
    let mut obj = message(raw, schema)?;
    obj.insert("apiVersion".into(), api_version.into());
    obj.insert("kind".into(), kind.into());
    Ok(Value::Object(obj))
}

enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Other,
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or("truncated varint")?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let tag = varint(b, &mut at)?;
        let value = match tag & 7 {
            0 => Wire::Varint(varint(b, &mut at)?),
            2 => {
                let len = usize::try_from(varint(b, &mut at)?).map_err(|e| e.to_string())?;
                let end = at
                    .checked_add(len)
                    .filter(|&e| e <= b.len())
                    .ok_or("truncated field")?;
                let v = &b[at..end];
                at = end;
                Wire::Len(v)
            }
            1 => {
                at += 8;
                Wire::Other
            }
            5 => {
                at += 4;
                Wire::Other
            }
            w => return Err(format!("wire type {w}")),
        };
        out.push((tag >> 3, value));
    }
    Ok(out)
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|e| e.to_string())
}

fn message(b: &[u8], schema: &[Field]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (n, wire) in fields(b)? {
        let Some(&(_, name, how, repeated)) = schema.iter().find(|f| f.0 == n) else {
            continue;
        };
        let v = match (how, wire) {
            (F::Str, Wire::Len(s)) => Value::String(text(s)?),
            (F::Bytes, Wire::Len(s)) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(s))
            }
            (F::Int, Wire::Varint(i)) => json!(i),
            (F::Time, Wire::Len(t)) => {
                let seconds = fields(t)?
                    .into_iter()
                    .find_map(|(n, v)| match (n, v) {
                        (1, Wire::Varint(s)) => Some(s),
                        _ => None,
                    })
                    .unwrap_or(0);
                if seconds == 0 {
                    // The zero time: null in JSON, so left out.
                    continue;
                }
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
                Value::String(crate::serve::rfc3339(at))
            }
            (F::Msg(inner), Wire::Len(m)) => Value::Object(message(m, inner)?),
            (F::StrMap, Wire::Len(entry)) => {
                let (mut k, mut v) = (String::new(), String::new());
                for (n, w) in fields(entry)? {
                    match (n, w) {
                        (1, Wire::Len(s)) => k = text(s)?,
                        (2, Wire::Len(s)) => v = text(s)?,
                        _ => {}
                    }
                }
                let map = out.entry(name).or_insert_with(|| json!({}));
                map[k] = Value::String(v);
                continue;
            }
            _ => return Err(format!("field {name}: unexpected wire type")),
        };
        if repeated {
            match out.entry(name).or_insert_with(|| json!([])) {
                Value::Array(a) => a.push(v),
                _ => unreachable!(),
            }
        } else {
            out.insert(name.into(), v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3 | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn an_approval_as_kubectl_sends_it() {
        let meta = [
            len(1, b"one"),
            len(6, b"7"),
            len(12, &[len(1, b"a"), len(2, b"b")].concat()),
        ]
        .concat();
        let condition = [
            len(1, b"Approved"),
            len(6, b"True"),
            len(2, b"KubectlApprove"),
        ]
        .concat();
        let spec = [
            len(1, b"\x01\x02"),
            len(5, b"client auth"),
            len(5, b"server auth"),
        ]
        .concat();
        let raw = [len(1, &meta), len(2, &spec), len(3, &len(1, &condition))].concat();
        let type_meta = [
            len(1, b"certificates.k8s.io/v1"),
            len(2, b"CertificateSigningRequest"),
        ]
        .concat();
        let body = [b"k8s\0".to_vec(), len(1, &type_meta), len(2, &raw)].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                   "metadata": {"name": "one", "resourceVersion": "7", "annotations": {"a": "b"}},
                   "spec": {"request": "AQI=", "usages": ["client auth", "server auth"]},
                   "status": {"conditions": [{"type": "Approved", "status": "True",
                                              "reason": "KubectlApprove"}]}})
        );
        assert!(decode(b"k8s\0\x0a\x05").is_err(), "truncated");
        assert!(decode(b"{}").is_err());
    }
}
