//! The server name of a TLS ClientHello, read from the first bytes of a connection: what
//! Envoy's TLS inspector does so that outbound filter chains can be chosen by `server_names`
//! (Istio's TLS routes, `sniHosts`).
//!
//! [`parse`] looks at the bytes a connection has sent so far and says whether they are a
//! ClientHello, and if so with which name, or that more bytes are needed. It never panics and
//! never reads past what it is given; a ClientHello may span several TLS records (they are
//! joined, up to [`MAX_HELLO`] bytes). Anything else, including a malformed ClientHello, is
//! [`Hello::NotTls`]: such a connection is not chosen by name.

#![forbid(unsafe_code)]

/// The largest ClientHello read (handshake message body), as Envoy's inspector caps its
/// buffer: a longer one is treated as not TLS.
pub const MAX_HELLO: usize = 16 * 1024;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// They may still be the start of a ClientHello: read more.
    Partial,
    /// Not a ClientHello (or a malformed one).
    NotTls,
    /// A whole ClientHello, and its `host_name` server name lower-cased, if it has one.
    Complete(Option<String>),
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;
/// A record's payload may not exceed 2^14 bytes (RFC 8446, 5.1).
const MAX_RECORD: usize = 1 << 14;

/// Reads the ClientHello at the start of `data` (the first bytes of a connection).
pub fn parse(data: &[u8]) -> Hello {
    // The handshake message: the first record's payload as it is (a ClientHello nearly
    // always fits one record), joined into a buffer only when it continues in the next.
    let mut first: &[u8] = &[];
    let mut joined: Option<Vec<u8>> = None;
    let mut rest = data;
    loop {
        let Some(header) = rest.get(..5) else {
            return partial_header(rest);
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != HANDSHAKE || header[1] != 3 || len == 0 || len > MAX_RECORD {
            return Hello::NotTls;
        }
        let Some(payload) = rest.get(5..5 + len) else {
            return Hello::Partial;
        };
        rest = &rest[5 + len..];
        let message: &[u8] = if first.is_empty() {
            first = payload;
            first
        } else {
            let buf = joined.get_or_insert_with(|| first.to_vec());
            buf.extend_from_slice(payload);
            buf
        };
        if message[0] != CLIENT_HELLO {
            return Hello::NotTls;
        }
        let Some(&[_, a, b, c]) = message.get(..4) else {
            continue;
        };
        let body = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        if body > MAX_HELLO {
            return Hello::NotTls;
        }
        if let Some(hello) = message.get(4..4 + body) {
            return match server_name(hello) {
                Some(name) => Hello::Complete(name),
                None => Hello::NotTls,
            };
        }
    }
}

/// Whether what there is of a record header can start a handshake record.
fn partial_header(header: &[u8]) -> Hello {
    match header {
        [] | [HANDSHAKE] | [HANDSHAKE, 3, ..] => Hello::Partial,
        _ => Hello::NotTls,
    }
}

/// A cursor over a message that refuses to read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a one- or two-byte length in front.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(usize::from(n)).map(Reader)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The ClientHello body's server name: `None` if it is malformed, `Some(None)` if it names
/// none.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    let version = r.take(2)?;
    if version[0] != 3 {
        return None;
    }
    r.take(32)?; // random
    let session = r.vec8()?;
    if session.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None; // compression methods: at least "null"
    }
    if r.is_empty() {
        return Some(None); // no extensions
    }
    let mut extensions = r.vec16()?;
    if !r.is_empty() {
        return None;
    }
    let mut name = None;
    let mut seen_sni = false;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        if std::mem::replace(&mut seen_sni, true) {
            return None; // an extension may appear once
        }
        let mut list = data.vec16()?;
        if !data.is_empty() || list.is_empty() {
            return None;
        }
        while !list.is_empty() {
            let kind = list.u8()?;
            let entry = list.vec16()?.0;
            if kind == HOST_NAME && name.is_none() {
                name = Some(host_name(entry)?);
            }
        }
    }
    Some(name)
}

/// A `host_name`: printable ASCII without spaces, at most 255 bytes, a trailing dot dropped
/// (as a fully qualified name is the same name), lower-cased.
fn host_name(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 255 || !raw.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

/// The `cargo fuzz` target's body (`fuzz/fuzz_targets/client_hello.rs`), also run on stable by
/// this crate's tests: no panic, a name is always a valid one, and a decided answer never
/// changes when the connection sends more.
pub fn fuzz(data: &[u8]) {
    let whole = parse(data);
    if let Hello::Complete(Some(name)) = &whole {
        assert!(!name.is_empty() && name.len() <= 255);
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
    }
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        let early = parse(&data[..cut]);
        if early != Hello::Partial {
            assert_eq!(early, whole, "a decided answer changed with more bytes");
        }
    }
}

/// A ClientHello in one or more records (`record` payload bytes each), naming `name` if given,
/// with extensions before and after the server name as clients send them. For tests and
/// benchmarks.
pub fn client_hello(name: Option<&str>, record: usize) -> Vec<u8> {
    let mut ext = Vec::new();
    // supported_groups (x25519, P-256), then the server name, then ALPN (h2).
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    if let Some(n) = name {
        let n = n.as_bytes();
        let entry_len = n.len() + 3;
        ext.extend_from_slice(&[0x00, 0x00]);
        ext.extend_from_slice(&(entry_len as u16 + 2).to_be_bytes());
        ext.extend_from_slice(&(entry_len as u16).to_be_bytes());
        ext.push(HOST_NAME);
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
    }
    ext.extend_from_slice(&[0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2']);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(32);
    body.extend_from_slice(&[9; 32]);
    body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut message = vec![CLIENT_HELLO];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in message.chunks(record.clamp(1, MAX_RECORD)) {
        out.extend_from_slice(&[HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_out_lower_case_from_one_or_many_records() {
        for record in [1, 7, 64, MAX_RECORD] {
            let hello = client_hello(Some("API.Example.com."), record);
            assert_eq!(
                parse(&hello),
                Hello::Complete(Some("api.example.com".into())),
                "{record}-byte records"
            );
            for cut in 0..hello.len() {
                assert_eq!(
                    parse(&hello[..cut]),
                    Hello::Partial,
                    "{cut} of {}",
                    hello.len()
                );
            }
        }
        assert_eq!(parse(&client_hello(None, 512)), Hello::Complete(None));
    }

    #[test]
    fn other_bytes_are_not_tls_as_soon_as_they_can_be_told() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"G"), Hello::NotTls);
        assert_eq!(parse(&[22, 2]), Hello::NotTls, "SSL 2 style version");
        // A handshake record holding a ServerHello.
        let mut hello = client_hello(Some("a"), 512);
        hello[5] = 2;
        assert_eq!(parse(&hello), Hello::NotTls);
        // Application data after a good header.
        assert_eq!(parse(&[23, 3, 3, 0, 1, 0]), Hello::NotTls);
    }

    #[test]
    fn malformed_hellos_are_not_tls() {
        let good = client_hello(Some("a.example"), 512);
        // A length inside the message that runs past its end, at every length byte.
        for at in [5 + 1, 5 + 4 + 34, 5 + 4 + 67, 5 + 4 + 73] {
            let mut bad = good.clone();
            bad[at] = 0xff;
            assert_eq!(parse(&bad), Hello::NotTls, "byte {at}");
        }
        // One more extension at the end: any other kind is skipped, a second server_name is
        // refused.
        let with = |kind: u16| {
            let mut hello = client_hello(Some("a.example"), MAX_RECORD);
            let extra = [&kind.to_be_bytes()[..], &[0, 6, 0, 4, 0, 0, 1, b'b']].concat();
            let ext_len_at = 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2;
            let len = u16::from_be_bytes([hello[ext_len_at], hello[ext_len_at + 1]]);
            let len = len + extra.len() as u16;
            hello[ext_len_at..ext_len_at + 2].copy_from_slice(&len.to_be_bytes());
            hello.extend_from_slice(&extra);
            let body = hello.len() - 9;
            hello[6..9].copy_from_slice(&(body as u32).to_be_bytes()[1..]);
            hello[3..5].copy_from_slice(&((body + 4) as u16).to_be_bytes());
            parse(&hello)
        };
        assert_eq!(with(0x15), Hello::Complete(Some("a.example".into())));
        assert_eq!(with(SERVER_NAME), Hello::NotTls);
        // A name with a space.
        assert_eq!(parse(&client_hello(Some("a b"), 512)), Hello::NotTls);
    }

    #[test]
    fn a_real_client_hello() {
        // What curl 7.88 (OpenSSL 3) sent for https://api.Example.com:<port>/.
        let hello = include_bytes!("../tests/data/curl-hello.bin");
        assert_eq!(
            parse(hello),
            Hello::Complete(Some("api.example.com".into()))
        );
        for cut in [0, 3, 5, 100, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), Hello::Partial);
        }
    }
}
