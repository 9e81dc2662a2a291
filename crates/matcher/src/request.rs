//! What the matcher reads from a request: the [`Request`] trait, which the proxy implements on
//! its own view of a hyper request, and [`SimpleRequest`], a borrowed implementation for tests
//! and tools.

/// What the matcher reads from a request, borrowed, so no per-request allocation is needed.
pub trait Request {
    /// The path, without the query string.
    fn path(&self) -> &[u8];
    fn authority(&self) -> &[u8];
    fn method(&self) -> &[u8];
    fn scheme(&self) -> &[u8];
    /// The value of header `name` (lower-case), or `None` if absent. A header sent several
    /// times is seen as its values joined with `,`, as Envoy does; the implementation (or the
    /// code that builds the request view) does the joining.
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// The value of query parameter `name` (first occurrence, not percent-decoded); a
    /// parameter without `=` has the empty value.
    fn query(&self, name: &str) -> Option<&[u8]>;
}

/// A request held as borrowed parts: the request target (`/p?a=b&c`), authority, method, scheme
/// and headers. Query parameters are parsed from the target on demand, without allocating.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimpleRequest<'a> {
    /// Path and query, as on the request line (`/p?a=b&c`).
    pub target: &'a [u8],
    pub authority: &'a [u8],
    pub method: &'a [u8],
    pub scheme: &'a [u8],
    /// Header names and values; lookup takes the first with the name (ASCII case-insensitive).
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl SimpleRequest<'_> {
    /// The query string: after the first `?`, up to a `#` if any.
    fn query_string(&self) -> &[u8] {
        let Some(q) = self.target.iter().position(|&b| b == b'?') else {
            return &[];
        };
        let rest = &self.target[q + 1..];
        match rest.iter().position(|&b| b == b'#') {
            Some(end) => &rest[..end],
            None => rest,
        }
    }
}

impl Request for SimpleRequest<'_> {
    /// The target up to the first `?` or `#` (Envoy strips both before matching a path).
    fn path(&self) -> &[u8] {
        match memchr::memchr2(b'?', b'#', self.target) {
            Some(end) => &self.target[..end],
            None => self.target,
        }
    }

    fn authority(&self) -> &[u8] {
        self.authority
    }

    fn method(&self) -> &[u8] {
        self.method
    }

    fn scheme(&self) -> &[u8] {
        self.scheme
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, v)| v)
    }

    fn query(&self, name: &str) -> Option<&[u8]> {
        query_param(self.query_string(), name)
    }
}

/// The value of query parameter `name` in a query string (`a=b&c`, without the `?`): the
/// first occurrence, not percent-decoded; a parameter without `=` has the empty value. For
/// implementations of [`Request::query`].
pub fn query_param<'q>(query: &'q [u8], name: &str) -> Option<&'q [u8]> {
    let name = name.as_bytes();
    query
        .split(|&b| b == b'&')
        .find_map(|param| match param.iter().position(|&b| b == b'=') {
            Some(eq) => (&param[..eq] == name).then(|| &param[eq + 1..]),
            None => (param == name && !param.is_empty()).then_some(&[][..]),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &[u8]) -> SimpleRequest<'_> {
        SimpleRequest {
            target,
            ..SimpleRequest::default()
        }
    }

    #[test]
    fn path_stops_at_query_or_fragment() {
        assert_eq!(req(b"/a/b?x=1").path(), b"/a/b");
        assert_eq!(req(b"/a#frag").path(), b"/a");
        assert_eq!(req(b"/a").path(), b"/a");
        assert_eq!(req(b"?x").path(), b"");
    }

    #[test]
    fn query_parameters() {
        let r = req(b"/p?a=b&c&a=second&e=&=anon&x=1=2#f=g");
        assert_eq!(r.query("a"), Some(&b"b"[..]), "first occurrence wins");
        assert_eq!(r.query("c"), Some(&b""[..]));
        assert_eq!(r.query("e"), Some(&b""[..]));
        assert_eq!(r.query("x"), Some(&b"1=2"[..]));
        assert_eq!(r.query(""), Some(&b"anon"[..]));
        assert_eq!(r.query("f"), None, "the fragment is not part of the query");
        assert_eq!(r.query("missing"), None);
        assert_eq!(req(b"/p").query("a"), None);
        assert_eq!(req(b"/p?").query(""), None);
    }

    #[test]
    fn first_header_wins_and_names_ignore_case() {
        let headers: &[(&str, &[u8])] = &[("X-A", b"1"), ("x-a", b"2")];
        let r = SimpleRequest {
            headers,
            ..SimpleRequest::default()
        };
        assert_eq!(r.header("x-a"), Some(&b"1"[..]));
        assert_eq!(r.header("x-b"), None);
    }
}
