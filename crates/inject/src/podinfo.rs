//! The sidecar's side of injection: the pod's labels as the kubelet writes them into a
//! downward API volume (`/etc/istio/pod/labels`), one `key="value"` line per label, the
//! value quoted the way Go's `%q` quotes it.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodInfoError {
    #[error("line {0}: expected key=\"value\"")]
    Line(usize),
    #[error("line {0}: bad escape in the quoted value")]
    Escape(usize),
}

/// The labels of a downward API `metadata.labels` file.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, PodInfoError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let (key, quoted) = line.split_once('=').ok_or(PodInfoError::Line(n))?;
        let inner = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .ok_or(PodInfoError::Line(n))?;
        if key.is_empty() {
            return Err(PodInfoError::Line(n));
        }
        out.insert(
            key.to_owned(),
            unquote(inner).ok_or(PodInfoError::Escape(n))?,
        );
    }
    Ok(out)
}

/// The inside of a Go double-quoted string literal, unescaped.
fn unquote(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut bytes: Vec<u8> = Vec::new();
    let mut chars = s.chars();
    let flush = |bytes: &mut Vec<u8>, out: &mut String| -> Option<()> {
        if !bytes.is_empty() {
            out.push_str(std::str::from_utf8(bytes).ok()?);
            bytes.clear();
        }
        Some(())
    };
    while let Some(c) = chars.next() {
        if c == '"' {
            return None;
        }
        if c != '\\' {
            flush(&mut bytes, &mut out)?;
            out.push(c);
            continue;
        }
        let hex = |chars: &mut std::str::Chars, n: usize| -> Option<u32> {
            let digits: String = chars.by_ref().take(n).collect();
            (digits.len() == n)
                .then(|| u32::from_str_radix(&digits, 16).ok())
                .flatten()
        };
        match chars.next()? {
            e @ ('x' | '0'..='7') => {
                // Byte escapes may spell UTF-8 sequences, so gather them before decoding.
                let byte = if e == 'x' {
                    hex(&mut chars, 2)?
                } else {
                    let rest: String = chars.by_ref().take(2).collect();
                    u32::from_str_radix(&format!("{e}{rest}"), 8).ok()?
                };
                bytes.push(u8::try_from(byte).ok()?);
                continue;
            }
            e => {
                flush(&mut bytes, &mut out)?;
                out.push(match e {
                    'a' => '\u{7}',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'v' => '\u{b}',
                    '\\' => '\\',
                    '"' => '"',
                    '\'' => '\'',
                    'u' => char::from_u32(hex(&mut chars, 4)?)?,
                    'U' => char::from_u32(hex(&mut chars, 8)?)?,
                    _ => return None,
                });
            }
        }
    }
    flush(&mut bytes, &mut out)?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kubelets_label_file() {
        let text = "app=\"reviews\"\npod-template-hash=\"5d8f9c6b4\"\nnote=\"a \\\"b\\\"\\n\\u00e9\\xc3\\xa9\\303\\251\"\n";
        let labels = parse(text).unwrap();
        assert_eq!(labels["app"], "reviews");
        assert_eq!(labels["pod-template-hash"], "5d8f9c6b4");
        assert_eq!(labels["note"], "a \"b\"\néé\u{e9}");
        assert_eq!(labels.len(), 3);
    }

    #[test]
    fn refuses_what_is_not_the_format() {
        assert_eq!(parse("app=reviews\n"), Err(PodInfoError::Line(1)));
        assert_eq!(parse("a=\"x\"\n=\"y\"\n"), Err(PodInfoError::Line(2)));
        assert_eq!(parse("a=\"\\q\"\n"), Err(PodInfoError::Escape(1)));
        assert_eq!(parse("a=\"\\xff\"\n"), Err(PodInfoError::Escape(1)));
        assert_eq!(parse("").unwrap().len(), 0);
    }
}
