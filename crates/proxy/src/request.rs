//! The request as routing and authorization see it: its method checked, its path normalized as
//! the HTTP connection manager says (Istio's `pathNormalization`), and [`View`], what the
//! matcher reads, with repeated headers joined.

use std::borrow::Cow;

use crate::model::{EscapedSlashes, PathNormalization};

/// Why a request is refused before routing (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A method with lower-case letters: Envoy's and Istio's rules match methods as sent, so
    /// `get` would pass a DENY on `GET` and reach an app that may take it for one.
    Method,
    /// `%00` in the path, or an escaped slash where `path_with_escaped_slashes_action` rejects
    /// them.
    Path,
    /// Two authorities that disagree (the absolute-form target or `:authority`, and `Host`),
    /// or two `Host` headers: routing might follow one and a policy or the app the other.
    Authority,
}

/// Checks the request's method and that it names one authority, and normalizes its path as
/// `n` says, before routing and
/// authorization see it; the request goes on with that path, so `/public/../admin` is
/// `/admin` to a policy as it will be to the app. A path with nothing to do costs one scan,
/// no allocation.
pub fn normalize(parts: &mut http::request::Parts, n: PathNormalization) -> Result<(), Invalid> {
    if parts
        .method
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        return Err(Invalid::Method);
    }
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next(), parts.uri.authority()) {
        (Some(_), Some(_), _) => return Err(Invalid::Authority),
        (Some(host), None, Some(authority))
            if !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            return Err(Invalid::Authority)
        }
        // A Host that is not a plain `host[:port]` (userinfo, a path, a query) may be read one
        // way by a policy and another by the app: refused, as Envoy does.
        (Some(host), None, _) if !plain_authority(host.as_bytes()) => {
            return Err(Invalid::Authority)
        }
        (_, _, Some(authority)) if !plain_authority(authority.as_str().as_bytes()) => {
            return Err(Invalid::Authority)
        }
        _ => {}
    }
    let Some(pq) = parts.uri.path_and_query() else {
        return Ok(());
    };
    // Origin form, or `*` for OPTIONS: an HTTP/2 `:path` without its `/` would change
    // meaning once joined to an authority upstream.
    let path = pq.path();
    let asterisk = path == "*" && parts.method == http::Method::OPTIONS;
    if !(path.starts_with('/') || asterisk) {
        return Err(Invalid::Path);
    }
    let Some(normalized) = normalized_path(pq.path(), n)? else {
        return Ok(());
    };
    let pq = match pq.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    // Characters the original had, or unreserved ones it had escaped: it parses.
    uri.path_and_query = Some(pq.parse().map_err(|_| Invalid::Path)?);
    parts.uri = http::Uri::from_parts(uri).map_err(|_| Invalid::Path)?;
    Ok(())
}

/// Whether `a` is `host[:port]` and nothing else: it parses as an authority and has no
/// userinfo.
/// One scan, no allocation: only the characters a host (name, IPv4, `[IPv6]`) and a port are
/// made of.
pub fn plain_authority(a: &[u8]) -> bool {
    // Without an early exit: a valid authority is read whole anyway, and the loop has no
    // branch.
    !a.is_empty()
        && a.iter()
            .fold(true, |ok, &c| ok & HOST_BYTES[usize::from(c)])
}

/// Which bytes a plain authority is made of, one table lookup per byte.
const HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']' | b'%');
        i += 1;
    }
    t
};

/// `path` normalized as `n` says, or `None` when that changes nothing. In Envoy's order:
/// escaped slashes (`%2F`, `%5C`) kept, refused or decoded; then RFC 3986 normalization
/// (`normalize_path`: escapes of unreserved characters decoded, `%00` refused, backslashes as
/// slashes, dot segments removed); then repeated slashes merged (`merge_slashes`).
pub fn normalized_path(path: &str, n: PathNormalization) -> Result<Option<String>, Invalid> {
    // Only origin-form paths (not `*`).
    if !path.starts_with('/') || !needs_work(path.as_bytes(), n) {
        return Ok(None);
    }
    let mut p = Cow::Borrowed(path);
    match n.escaped_slashes {
        EscapedSlashes::Keep => {}
        EscapedSlashes::Reject if escaped_slash(p.as_bytes()).is_some() => {
            return Err(Invalid::Path)
        }
        EscapedSlashes::Reject => {}
        EscapedSlashes::Unescape => {
            if escaped_slash(p.as_bytes()).is_some() {
                p = Cow::Owned(unescape_slashes(&p));
            }
        }
    }
    if n.normalize {
        p = Cow::Owned(remove_dot_segments(&decode_unreserved(&p)?));
    }
    if n.merge_slashes && p.contains("//") {
        p = Cow::Owned(merge_slashes(&p));
    }
    Ok(match p {
        Cow::Owned(s) if s != path => Some(s),
        _ => None,
    })
}

/// Whether `path` may change: a `%`, a backslash or a segment starting with `.` under
/// `normalize`, a `%` where escaped slashes are handled, a `//` where slashes merge.
fn needs_work(path: &[u8], n: PathNormalization) -> bool {
    let escapes = n.normalize || n.escaped_slashes != EscapedSlashes::Keep;
    let escape = |b: u8| (b == b'%') & escapes;
    let backslash = |b: u8| (b == b'\\') & n.normalize;
    // Each byte with the next, without branches (the usual path has nothing to do and is
    // read whole).
    let Some((&last, head)) = path.split_last() else {
        return false;
    };
    head.iter()
        .zip(&path[1..])
        .fold(false, |work, (&b, &next)| {
            let slash = b == b'/';
            work | escape(b)
                | backslash(b)
                | (slash & (next == b'.') & n.normalize)
                | (slash & (next == b'/') & n.merge_slashes)
        })
        | escape(last)
        | backslash(last)
}

/// The value of the escape at the start of `s` (`%` and two hex digits).
fn escape(s: &[u8]) -> Option<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    match s {
        [b'%', h, l, ..] => Some(u8::try_from(hex(*h)? * 16 + hex(*l)?).ok()?),
        _ => None,
    }
}

/// Where the first `%2F` or `%5C` (either case) is.
fn escaped_slash(path: &[u8]) -> Option<usize> {
    (0..path.len()).find(|&i| matches!(escape(&path[i..]), Some(b'/' | b'\\')))
}

fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match escape(&b[i..]) {
            Some(c @ (b'/' | b'\\')) => {
                out.push(char::from(c));
                i += 3;
            }
            _ => {
                let next = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'%')
                    .map_or(b.len(), |j| i + 1 + j);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    out
}

/// RFC 3986's unreserved characters, which an escape may stand for without changing the URI.
fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Escapes of unreserved characters decoded, other escapes kept as they are, backslashes as
/// slashes; `%00` refused, and a `%` that starts no escape too: decoding `%%30%30` once would
/// make a `%00` (or `%%32%65` a `%2e`) that the policy never saw.
fn decode_unreserved(path: &str) -> Result<String, Invalid> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], escape(&b[i..])) {
            (b'%', Some(0) | None) => return Err(Invalid::Path),
            (b'%', Some(c)) if unreserved(c) => {
                out.push(c);
                i += 3;
                continue;
            }
            (b'\\', _) => out.push(b'/'),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    // Bytes of `path` and ASCII in place of whole escapes: still UTF-8.
    String::from_utf8(out).map_err(|_| Invalid::Path)
}

/// RFC 3986 5.2.4 on a path of segments: `.` goes, `..` takes the segment before it, and a dot
/// segment at the end leaves a directory (a trailing slash).
fn remove_dot_segments(path: &str) -> String {
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut out: Vec<&str> = Vec::new();
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => {
                out.push(seg);
                continue;
            }
        }
        if last {
            out.push("");
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for seg in out {
        normalized.push('/');
        normalized.push_str(seg);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    normalized
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// The matcher's view of a request, borrowed from the request head. A header sent more than
/// once is seen as its values joined with `,` (cookies with `; `), as Envoy matches them, so a
/// rule on `x-tenant` sees every value a client sent; only such requests allocate.
pub struct View<'a> {
    pub parts: &'a http::request::Parts,
    pub authority: &'a str,
    /// The joined values of the headers sent more than once.
    joined: Vec<(&'a str, Vec<u8>)>,
}

impl<'a> View<'a> {
    pub fn new(parts: &'a http::request::Parts, authority: &'a str) -> View<'a> {
        let headers = &parts.headers;
        let mut joined = Vec::new();
        if headers.keys_len() < headers.len() {
            for name in headers.keys() {
                let mut values = headers.get_all(name).iter();
                let (Some(first), Some(_)) = (values.next(), values.next()) else {
                    continue;
                };
                let sep: &[u8] = if name == http::header::COOKIE {
                    b"; "
                } else {
                    b","
                };
                let mut value = first.as_bytes().to_vec();
                for v in headers.get_all(name).iter().skip(1) {
                    value.extend_from_slice(sep);
                    value.extend_from_slice(v.as_bytes());
                }
                joined.push((name.as_str(), value));
            }
        }
        View {
            parts,
            authority,
            joined,
        }
    }
}

impl hypha_matcher::Request for View<'_> {
    fn path(&self) -> &[u8] {
        self.parts.uri.path().as_bytes()
    }
    fn authority(&self) -> &[u8] {
        self.authority.as_bytes()
    }
    fn method(&self) -> &[u8] {
        self.parts.method.as_str().as_bytes()
    }
    fn scheme(&self) -> &[u8] {
        b"http"
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        if let Some((_, v)) = self.joined.iter().find(|(n, _)| *n == name) {
            return Some(v);
        }
        self.parts
            .headers
            .get(name)
            .map(http::HeaderValue::as_bytes)
    }
    fn query(&self, name: &str) -> Option<&[u8]> {
        hypha_matcher::query_param(self.parts.uri.query().unwrap_or("").as_bytes(), name)
    }
}

/// The body of the `normalize` fuzz target (`fuzz/`), here so the workspace's tests run it on
/// stable: paths built from the bytes are normalized in every mode and compared with a
/// reference written from RFC 3986 5.2.4 as it reads (an input buffer and an output buffer),
/// decoding one character at a time.
pub mod fuzzing {
    use super::*;

    /// Path pieces the bytes pick from: what normalization acts on, and what it must leave.
    const PIECES: &[&str] = &[
        "/",
        "/",
        ".",
        "..",
        "a",
        "%2e",
        "%2E",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "\\",
        "%41",
        "%7e",
        "%00",
        "%20",
        "%zz",
        "%",
        "-",
        "~",
        "%2d",
        "//",
        "%e4%b8%ad",
        "x.y",
        "%3a",
        "%25",
    ];

    /// Every mode Istio's `pathNormalization` and Envoy's escaped-slash actions make.
    pub fn modes() -> Vec<PathNormalization> {
        let mut all = Vec::new();
        for normalize in [false, true] {
            for merge_slashes in [false, true] {
                for escaped_slashes in [
                    EscapedSlashes::Keep,
                    EscapedSlashes::Reject,
                    EscapedSlashes::Unescape,
                ] {
                    all.push(PathNormalization {
                        normalize,
                        merge_slashes,
                        escaped_slashes,
                    });
                }
            }
        }
        all
    }

    pub fn normalize(data: &[u8]) {
        let mut path = String::from("/");
        for &b in data {
            path.push_str(PIECES[usize::from(b) % PIECES.len()]);
        }
        for n in modes() {
            let fast = normalized_path(&path, n).map(|p| p.unwrap_or_else(|| path.clone()));
            let slow = reference(&path, n);
            assert_eq!(fast.ok(), slow, "{path:?} under {n:?}");
        }
    }

    /// The reference: `None` where the request is refused.
    pub fn reference(path: &str, n: PathNormalization) -> Option<String> {
        let mut p: Vec<u8> = path.as_bytes().to_vec();
        let hex = |s: &[u8]| -> Option<u8> {
            if s.len() < 3 || s[0] != b'%' {
                return None;
            }
            let h = std::str::from_utf8(&s[1..3]).ok()?;
            u8::from_str_radix(h, 16).ok()
        };
        if n.escaped_slashes != EscapedSlashes::Keep {
            let mut out = Vec::new();
            let mut i = 0;
            while i < p.len() {
                match hex(&p[i..]) {
                    Some(c @ (b'/' | b'\\')) => {
                        if n.escaped_slashes == EscapedSlashes::Reject {
                            return None;
                        }
                        out.push(c);
                        i += 3;
                    }
                    _ => {
                        out.push(p[i]);
                        i += 1;
                    }
                }
            }
            p = out;
        }
        if n.normalize {
            let mut decoded = Vec::new();
            let mut i = 0;
            while i < p.len() {
                match hex(&p[i..]) {
                    Some(0) => return None,
                    None if p[i] == b'%' => return None,
                    Some(c)
                        if c.is_ascii_uppercase()
                            || c.is_ascii_lowercase()
                            || c.is_ascii_digit()
                            || b"-._~".contains(&c) =>
                    {
                        decoded.push(c);
                        i += 3;
                    }
                    _ => {
                        decoded.push(if p[i] == b'\\' { b'/' } else { p[i] });
                        i += 1;
                    }
                }
            }
            // RFC 3986 5.2.4, step by step.
            let mut input = String::from_utf8(decoded).ok()?;
            let mut output = String::new();
            while !input.is_empty() {
                if let Some(rest) = input.strip_prefix("../") {
                    input = rest.to_owned();
                } else if let Some(rest) = input.strip_prefix("./") {
                    input = rest.to_owned();
                } else if input.starts_with("/./") {
                    input = input[2..].to_owned();
                } else if input == "/." {
                    input = "/".into();
                } else if input.starts_with("/../") || input == "/.." {
                    input = format!("/{}", &input[if input == "/.." { 3 } else { 4 }..]);
                    match output.rfind('/') {
                        Some(j) => output.truncate(j),
                        None => output.clear(),
                    }
                } else if input == "." || input == ".." {
                    input.clear();
                } else {
                    let start = usize::from(input.starts_with('/'));
                    let end = input[start..].find('/').map_or(input.len(), |j| j + start);
                    output.push_str(&input[..end]);
                    input = input[end..].to_owned();
                }
            }
            p = output.into_bytes();
        }
        if n.merge_slashes {
            p.dedup_by(|b, a| *a == b'/' && *b == b'/');
        }
        String::from_utf8(p).ok()
    }
}

#[cfg(test)]
mod tests {
    use hyper::Request;

    use super::*;

    const BASE: PathNormalization = PathNormalization {
        normalize: true,
        merge_slashes: false,
        escaped_slashes: EscapedSlashes::Keep,
    };

    fn parts(target: &str) -> http::request::Parts {
        Request::get(target).body(()).unwrap().into_parts().0
    }

    #[test]
    fn paths_are_normalized_as_istio_base_does() {
        for (path, want) in [
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin/x", "/admin/x"),
            ("/public/.%2E/admin", "/admin"),
            ("/a/./b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a\\..\\admin", "/admin"),
            ("/a//b/../c", "/a//c"),
            ("/a/..b/.c/...", "/a/..b/.c/..."),
            ("/a/x%2ejson", "/a/x.json"),
            ("/%61dmin", "/admin"),
            ("/%41%7e%2D_", "/A~-_"),
            ("/a%2fb", "/a%2fb"),
            ("/%e4%b8%ad", "/%e4%b8%ad"),
            ("/", "/"),
            ("/a/b/", "/a/b/"),
        ] {
            let mut p = parts(&format!("{path}?q=/../1"));
            normalize(&mut p, BASE).unwrap();
            assert_eq!(p.uri.path(), want, "{path}");
            assert_eq!(p.uri.query(), Some("q=/../1"), "{path}");
        }
        // `%00` is refused, and a `%` that starts no escape (one decoding would make new ones).
        for path in [
            "/a%00b",
            "/100%",
            "/%%30%30",
            "/%%32%65%%32%65/admin",
            "/%zz",
        ] {
            assert_eq!(
                normalize(&mut parts(path), BASE),
                Err(Invalid::Path),
                "{path}"
            );
        }
        // Absolute form (HTTP proxy mode) keeps its scheme and authority.
        let mut p = parts("http://web.shop:8080/x/../admin");
        normalize(&mut p, BASE).unwrap();
        assert_eq!(p.uri.to_string(), "http://web.shop:8080/admin");
        // Nothing to do: the very same URI.
        for path in ["/a/b.c/d", "/a%2fb", "*"] {
            let mut p = Request::options(path).body(()).unwrap().into_parts().0;
            normalize(&mut p, BASE).unwrap();
            assert_eq!(p.uri.to_string(), path);
        }
    }

    #[test]
    fn every_istio_mode_does_what_it_says() {
        let mode = |normalize, merge_slashes, escaped_slashes| PathNormalization {
            normalize,
            merge_slashes,
            escaped_slashes,
        };
        let none = mode(false, false, EscapedSlashes::Keep);
        let merge = mode(true, true, EscapedSlashes::Keep);
        let decode = mode(true, true, EscapedSlashes::Unescape);
        let path = "/a//b/%2e%2e/c%2F..%2Fd";
        let run = |n| {
            let mut p = parts(path);
            normalize(&mut p, n).map(|()| p.uri.path().to_owned())
        };
        assert_eq!(run(none).unwrap(), path);
        assert_eq!(run(BASE).unwrap(), "/a//c%2F..%2Fd");
        assert_eq!(run(merge).unwrap(), "/a/c%2F..%2Fd");
        assert_eq!(run(decode).unwrap(), "/a/d");
        assert_eq!(
            run(mode(true, false, EscapedSlashes::Reject)),
            Err(Invalid::Path)
        );
        // NONE leaves `%00` to the app, as Envoy does without `normalize_path`.
        assert!(normalize(&mut parts("/a%00"), none).is_ok());
    }

    #[test]
    fn methods_with_lower_case_letters_are_refused() {
        for (method, ok) in [
            ("GET", true),
            ("M-SEARCH", true),
            ("get", false),
            ("Post", false),
        ] {
            let mut p = Request::builder()
                .method(method)
                .uri("/")
                .body(())
                .unwrap()
                .into_parts()
                .0;
            assert_eq!(normalize(&mut p, BASE).is_ok(), ok, "{method}");
        }
    }

    #[test]
    fn a_request_names_one_authority() {
        let check = |uri: &str, hosts: &[&str]| {
            let mut b = Request::get(uri);
            for h in hosts {
                b = b.header("host", *h);
            }
            normalize(&mut b.body(()).unwrap().into_parts().0, BASE)
        };
        assert_eq!(check("http://web.shop/x", &["web.shop"]), Ok(()));
        assert_eq!(check("http://web.shop/x", &["WEB.shop"]), Ok(()));
        assert_eq!(check("/x", &["web.shop"]), Ok(()));
        assert_eq!(check("http://web.shop/x", &[]), Ok(()));
        assert_eq!(
            check("http://web.shop/x", &["admin.shop"]),
            Err(Invalid::Authority)
        );
        assert_eq!(
            check("/x", &["web.shop", "admin.shop"]),
            Err(Invalid::Authority)
        );
        // Only `host[:port]`: no userinfo, nothing after it.
        for host in ["evil@admin.shop", "admin.shop/x", "admin.shop?x", ""] {
            assert_eq!(check("/x", &[host]), Err(Invalid::Authority), "{host:?}");
        }
        assert_eq!(check("/x", &["[::1]:8080"]), Ok(()));
    }

    #[test]
    fn repeated_headers_are_seen_joined() {
        use hypha_matcher::Request as _;
        let p = Request::get("/")
            .header("x-tenant", "a")
            .header("x-tenant", "b")
            .header("cookie", "s=1")
            .header("cookie", "t=2")
            .header("x-one", "1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let v = View::new(&p, "web");
        assert_eq!(v.header("x-tenant"), Some(&b"a,b"[..]));
        assert_eq!(v.header("cookie"), Some(&b"s=1; t=2"[..]));
        assert_eq!(v.header("x-one"), Some(&b"1"[..]));
        assert_eq!(v.header("x-two"), None);
    }
}
