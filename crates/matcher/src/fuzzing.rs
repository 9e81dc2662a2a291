//! The bodies of the `cargo fuzz` targets (`fuzz/`), here so that the workspace's tests run
//! them on stable Rust too (`tests/fuzz_bodies.rs`). Each turns arbitrary bytes into rule
//! tables and requests, and panics on a wrong answer; neither may panic otherwise.

use std::collections::HashMap;

use regex::bytes::Regex;

use crate::{
    Attr, Budget, Condition, Pattern, Request, Rule, SimpleRequest, StringMatch, Table, Test,
};

/// A budget small enough that tables of a few patterns are split and go lazy.
fn tight() -> Budget {
    Budget {
        dfa_bytes: 2 << 10,
        lazy_cache_bytes: 64 << 10,
    }
}

/// The pattern compiler: bytes split at `\0` into patterns (the first byte of each picks the
/// kind and case), one path rule each. Compiling must not panic; when the table compiles both
/// within the default budget and within a tight one (split, lazy), the two must agree on
/// every pattern's own text and on a few other values.
pub fn compile(data: &[u8]) {
    let rules: Vec<Rule> = data
        .split(|&b| b == 0)
        .filter_map(|chunk| {
            let (&kind, text) = chunk.split_first()?;
            let text = String::from_utf8_lossy(text).into_owned();
            let pattern = match kind % 5 {
                0 => Pattern::Exact(text),
                1 => Pattern::Prefix(text),
                2 => Pattern::Suffix(text),
                3 => Pattern::Contains(text),
                _ => Pattern::Regex(text),
            };
            Some(Rule {
                conditions: vec![Condition {
                    attr: Attr::Path,
                    test: Test::Matches(StringMatch {
                        pattern,
                        ignore_case: kind & 0x80 != 0,
                    }),
                    invert: kind & 0x40 != 0,
                }],
            })
        })
        .take(64)
        .collect();
    let Ok(table) = Table::compile(rules.clone()) else {
        return;
    };
    let Ok(small) = Table::compile_with(rules, &tight()) else {
        return;
    };
    let values = data
        .split(|&b| b == 0)
        .map(|c| c.get(1..).unwrap_or_default())
        .chain([&b""[..], b"/", b"/a", b"\xff\xfe"]);
    for v in values {
        let req = SimpleRequest {
            target: v,
            ..SimpleRequest::default()
        };
        assert_eq!(table.first_match(&req), small.first_match(&req), "{v:?}");
    }
}

/// Regexes for [`matcher`]: without Perl classes, so that `regex::bytes` in Unicode mode (the
/// reference) and RE2's meaning agree.
const REGEXES: &[&str] = &[
    "/a.*",
    "/[a-z]+",
    "/(api|v1)(/.*)?",
    "[a-z]*",
    "",
    "a|ab",
    "(?-u:[\\x80-\\xff])+",
    ".*1",
    "/A/.",
];
const WORDS: &[&[u8]] = &[
    b"", b"/", b"a", b"A", b"/a", b"/A", b"api", b"aPi", b"1", b"\xff", b"/v1", b"/V1",
];
const HEADERS: &[&str] = &["x-a", "x-b"];

/// Reads choices from the fuzzer's bytes; zeros once they run out.
struct Bytes<'a>(std::slice::Iter<'a, u8>);

impl Bytes<'_> {
    fn pick(&mut self, n: usize) -> usize {
        usize::from(self.0.next().copied().unwrap_or(0)) % n
    }

    fn word(&mut self) -> Vec<u8> {
        (0..self.pick(4))
            .flat_map(|_| WORDS[self.pick(WORDS.len())].iter().copied())
            .collect()
    }
}

/// The matcher: a table of up to 32 rules and a request, both from the bytes; the table's
/// answer (default and tight budgets) must be sequential evaluation's.
pub fn matcher(data: &[u8]) {
    let mut b = Bytes(data.iter());
    let n = 1 + b.pick(32);
    // Rarely an empty rule: it matches everything and ends every search.
    let rules: Vec<Rule> = (0..n)
        .map(|_| Rule {
            conditions: (0..usize::from(b.pick(16) != 0) * (1 + b.pick(3)))
                .map(|_| {
                    let attr = match b.pick(6) {
                        0 | 1 => Attr::Path,
                        2 => Attr::Method,
                        3 => Attr::Authority,
                        4 => Attr::Header(HEADERS[b.pick(2)].to_owned()),
                        _ => Attr::Query("q".to_owned()),
                    };
                    let text = String::from_utf8_lossy(&b.word()).into_owned();
                    let test = match b.pick(8) {
                        0 => Test::Present,
                        1 => Test::Absent,
                        k => Test::Matches(StringMatch {
                            pattern: match k {
                                2 => Pattern::Exact(text),
                                3 => Pattern::Prefix(text),
                                4 => Pattern::Suffix(text),
                                5 => Pattern::Contains(text),
                                _ => Pattern::Regex(REGEXES[b.pick(REGEXES.len())].to_owned()),
                            },
                            ignore_case: b.pick(2) == 1,
                        }),
                    };
                    Condition {
                        attr,
                        test,
                        invert: b.pick(5) == 0,
                    }
                })
                .collect(),
        })
        .collect();
    let mut target = b.word();
    if b.pick(2) == 1 {
        target.extend_from_slice(b"?q=");
        target.extend(b.word());
    }
    let values: Vec<Vec<u8>> = (0..b.pick(3)).map(|_| b.word()).collect();
    let headers: Vec<(&str, &[u8])> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (HEADERS[i % 2], &v[..]))
        .collect();
    let authority = b.word();
    let req = SimpleRequest {
        target: &target,
        authority: &authority,
        method: [&b"GET"[..], b"get", b"POST"][b.pick(3)],
        scheme: b"http",
        headers: &headers,
    };
    let want = Reference::default().first_match(&rules, &req);
    let table = Table::compile(rules.clone()).expect("generated rules compile");
    assert_eq!(table.first_match(&req), want, "{rules:?} {req:?}");
    let small = Table::compile_with(rules.clone(), &tight()).expect("generated rules compile");
    assert_eq!(
        small.first_match(&req),
        want,
        "tight budget: {rules:?} {req:?}"
    );
}

/// The reference the matcher is checked against (here and by the equivalence tests): each
/// rule in order, each condition straight from the documented semantics, allocating freely.
/// Regexes are compiled once each.
#[derive(Default)]
pub struct Reference {
    regexes: HashMap<(String, bool), Regex>,
}

impl Reference {
    /// The first rule all of whose conditions hold.
    pub fn first_match(&mut self, rules: &[Rule], req: &impl Request) -> Option<usize> {
        rules
            .iter()
            .position(|r| r.conditions.iter().all(|c| self.holds(c, req)))
    }

    fn holds(&mut self, c: &Condition, req: &impl Request) -> bool {
        let value = match &c.attr {
            Attr::Path => Some(req.path()),
            Attr::Authority => Some(req.authority()),
            Attr::Method => Some(req.method()),
            Attr::Scheme => Some(req.scheme()),
            Attr::Header(n) => req.header(n),
            Attr::Query(n) => req.query(n),
        };
        let result = match (&c.test, value) {
            (Test::Present, v) => v.is_some(),
            (Test::Absent, v) => v.is_none(),
            (Test::Matches(_), None) => false,
            (Test::Matches(m), Some(v)) => self.string_match(m, v),
        };
        result != c.invert
    }

    fn string_match(&mut self, m: &StringMatch, value: &[u8]) -> bool {
        let fold = |x: &[u8]| {
            if m.ignore_case {
                x.to_ascii_lowercase()
            } else {
                x.to_vec()
            }
        };
        let v = fold(value);
        match &m.pattern {
            Pattern::Exact(l) => v == fold(l.as_bytes()),
            Pattern::Prefix(l) => v.starts_with(&fold(l.as_bytes())),
            Pattern::Suffix(l) => v.ends_with(&fold(l.as_bytes())),
            Pattern::Contains(l) => {
                let l = fold(l.as_bytes());
                l.is_empty() || v.windows(l.len()).any(|w| w == l)
            }
            Pattern::Regex(p) => self
                .regexes
                .entry((p.clone(), m.ignore_case))
                .or_insert_with(|| {
                    let flags = if m.ignore_case { "(?i)" } else { "" };
                    Regex::new(&format!("{flags}^(?:{p})$")).expect("listed regexes compile")
                })
                .is_match(value),
        }
    }
}
