//! The request as routing and authorization see it: its path normalized as Istio's
//! `pathNormalization` says, and [`View`], what the matcher reads.

/// Normalizes the request's path as Istio's default `pathNormalization: BASE` (Envoy's
/// `normalize_path`) does, before routing and authorization see it, and sends it on so:
/// backslashes become slashes and dot segments go (RFC 3986 5.2.4), `%2e` counted as a dot,
/// so `/public/../admin` is `/admin` to a policy as it will be to the app. Repeated slashes
/// stay (BASE does not merge them). A path with nothing to do costs one scan, no allocation.
pub fn normalize_path(parts: &mut http::request::Parts) {
    let Some(pq) = parts.uri.path_and_query() else {
        return;
    };
    let path = pq.path();
    if !needs_normalizing(path.as_bytes()) {
        return;
    }
    let normalized = normalized_path(path);
    let pq = match pq.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    // Only characters the original had: it parses (else the path stays as it was).
    if let Ok(pq) = pq.parse() {
        uri.path_and_query = Some(pq);
    }
    parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
}

/// Whether `path` has a backslash, or a segment that may be a dot segment (`.` or `%2e` right
/// after a slash).
fn needs_normalizing(path: &[u8]) -> bool {
    path.iter().enumerate().any(|(i, &b)| {
        b == b'\\'
            || (b == b'/'
                && matches!(
                    path.get(i + 1..),
                    Some([b'.', ..] | [b'%', b'2', b'e' | b'E', ..])
                ))
    })
}

/// `path` with backslashes as slashes and its dot segments removed.
fn normalized_path(path: &str) -> String {
    let path = path.replace('\\', "/");
    let dots = |seg: &str| -> usize {
        let mut n = 0;
        let mut rest = seg.as_bytes();
        while !rest.is_empty() {
            match rest {
                [b'.', r @ ..] => rest = r,
                [b'%', b'2', b'e' | b'E', r @ ..] => rest = r,
                _ => return 0,
            }
            n += 1;
        }
        n
    };
    let body = path.strip_prefix('/').unwrap_or(&path);
    let mut out: Vec<&str> = Vec::new();
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match dots(seg) {
            1 => {}
            2 => {
                out.pop();
            }
            _ => {
                out.push(seg);
                continue;
            }
        }
        // A dot segment at the end leaves a directory: a trailing slash.
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

/// The matcher's view of a request: borrowed from the request head, nothing allocated.
pub struct View<'a> {
    pub parts: &'a http::request::Parts,
    pub authority: &'a str,
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
        self.parts
            .headers
            .get(name)
            .map(http::HeaderValue::as_bytes)
    }
    fn query(&self, name: &str) -> Option<&[u8]> {
        hypha_matcher::query_param(self.parts.uri.query().unwrap_or("").as_bytes(), name)
    }
}

#[cfg(test)]
mod tests {
    use hyper::Request;

    use super::*;

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
            ("/a/x%2ejson", "/a/x%2ejson"),
            ("/", "/"),
            ("/a/b/", "/a/b/"),
        ] {
            let mut parts = Request::get(format!("{path}?q=/../1"))
                .body(())
                .unwrap()
                .into_parts()
                .0;
            normalize_path(&mut parts);
            assert_eq!(parts.uri.path(), want, "{path}");
            assert_eq!(parts.uri.query(), Some("q=/../1"), "{path}");
        }
        // Absolute form (HTTP proxy mode) keeps its scheme and authority.
        let mut parts = Request::get("http://web.shop:8080/x/../admin")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        normalize_path(&mut parts);
        assert_eq!(parts.uri.to_string(), "http://web.shop:8080/admin");
        // Nothing to do: the very same URI.
        for path in ["/a/b.c/d", "/a%2fb", "*"] {
            let mut parts = Request::options(path).body(()).unwrap().into_parts().0;
            normalize_path(&mut parts);
            assert_eq!(parts.uri.to_string(), path);
        }
    }
}
