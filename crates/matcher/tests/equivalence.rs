//! A large random table must give the same answer as a naive reference evaluation from the
//! documented semantics (`hypha_matcher::fuzzing::Reference`, which the fuzz targets check
//! against too). The reference is what a replacement engine must also agree with.

use hypha_matcher::fuzzing::Reference;
use hypha_matcher::{Attr, Condition, Pattern, Rule, SimpleRequest, StringMatch, Table, Test};

/// SplitMix64: tiny, deterministic, good enough to spread test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Request ids are `0..IDS`.
const IDS: usize = 400;
const SEGMENTS: &[&str] = &["", "a", "A", "api", "Api", "v1", "v2", "x", "é", "\u{ff}"];
const HEADERS: &[&str] = &["x-a", "x-b", "end-user", "x-bin"];
const PARAMS: &[&str] = &["a", "b", "c"];
const VALUES: &[&[u8]] = &[
    b"", b"a", b"A", b"ab", b"aB", b"v1", b"jason", b"\xff", b"a\xffb",
];
const METHODS: &[&[u8]] = &[b"GET", b"get", b"POST"];
const AUTHORITIES: &[&[u8]] = &[b"a", b"A:80", b""];
const REGEXES: &[&str] = &[
    "/a.*",
    "/[a-z]+",
    "/(api|v1)(/.*)?",
    "[a-z]*",
    "",
    "a|ab",
    "(?-u:[\\x80-\\xff])+",
    "/a/v[12]",
    ".*1",
];

fn random_literal(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..1 + rng.below(3) {
        if rng.chance(80) {
            s.push('/');
        }
        s.push_str(rng.pick(SEGMENTS));
    }
    s
}

fn random_condition(rng: &mut Rng) -> Condition {
    let attr = match rng.below(10) {
        0..=4 => Attr::Path,
        5 => Attr::Method,
        6 => Attr::Authority,
        7 | 8 => Attr::Header(rng.pick(HEADERS).to_owned()),
        _ => Attr::Query(rng.pick(PARAMS).to_owned()),
    };
    let test = match rng.below(20) {
        0 => Test::Present,
        1 => Test::Absent,
        _ => {
            let lit = random_literal(rng);
            let pattern = match rng.below(20) {
                0..=4 => Pattern::Exact(lit),
                5..=10 => Pattern::Prefix(lit),
                11..=13 => Pattern::Suffix(lit),
                14..=17 => Pattern::Contains(lit),
                _ => Pattern::Regex(rng.pick(REGEXES).to_owned()),
            };
            Test::Matches(StringMatch {
                pattern,
                ignore_case: rng.chance(30),
            })
        }
    };
    Condition {
        attr,
        test,
        invert: rng.chance(10),
    }
}

/// Rules that are rarely true, so that requests match at varied depths or not at all: most
/// test a request id (as a route for one tenant would) plus one random condition; the rest
/// have four random conditions. Never empty: an empty rule would end every search.
fn random_rule(rng: &mut Rng) -> Rule {
    let mut conditions = Vec::new();
    let random = if rng.chance(90) {
        let id = rng.below(IDS).to_string();
        let pattern = if rng.chance(90) {
            Pattern::Exact(id)
        } else {
            Pattern::Prefix(id)
        };
        conditions.push(Condition {
            attr: Attr::Header("x-id".to_owned()),
            test: Test::Matches(StringMatch {
                pattern,
                ignore_case: false,
            }),
            invert: false,
        });
        1
    } else {
        4
    };
    conditions.extend((0..random).map(|_| random_condition(rng)));
    rng.shuffle(&mut conditions);
    Rule { conditions }
}

/// Owned parts of a random request; borrowed into a `SimpleRequest`.
struct Parts {
    target: Vec<u8>,
    method: &'static [u8],
    authority: &'static [u8],
    headers: Vec<(&'static str, Vec<u8>)>,
}

fn random_request(rng: &mut Rng) -> Parts {
    let mut target = random_literal(rng).into_bytes();
    if rng.chance(50) {
        target.push(b'?');
        for i in 0..rng.below(4) {
            if i > 0 {
                target.push(b'&');
            }
            target.extend_from_slice(rng.pick(PARAMS).as_bytes());
            if rng.chance(80) {
                target.push(b'=');
                target.extend_from_slice(rng.pick(VALUES));
            }
        }
    }
    let mut headers: Vec<(&str, Vec<u8>)> = (0..rng.below(4))
        .map(|_| (rng.pick(HEADERS), rng.pick(VALUES).to_vec()))
        .collect();
    if rng.chance(80) {
        let at = rng.below(headers.len() + 1);
        headers.insert(at, ("x-id", rng.below(IDS).to_string().into_bytes()));
    }
    Parts {
        target,
        method: rng.pick(METHODS),
        authority: rng.pick(AUTHORITIES),
        headers,
    }
}

#[test]
fn ten_thousand_rules_agree_with_the_reference() {
    let mut rng = Rng(0x0048_7970_6861);
    let rules: Vec<Rule> = (0..10_000).map(|_| random_rule(&mut rng)).collect();
    let started = std::time::Instant::now();
    let table = Table::compile(rules.clone()).unwrap();
    eprintln!("compiled in {:?}: {:?}", started.elapsed(), table.stats());
    assert_eq!(table.len(), rules.len());

    // Two threads (the machine has two cores), each with its own requests and reference.
    let results: Vec<(usize, usize)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|seed| {
                let (rules, table) = (&rules, &table);
                scope.spawn(move || check_requests(rules, table, Rng(seed), 1_500))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let found: usize = results.iter().map(|r| r.0).sum();
    let positions: usize = results.iter().map(|r| r.1).sum();
    eprintln!("found {found}, mean index {}", positions / found.max(1));
    // The test means something only if requests match at varied depths, and not always.
    assert!(found > 1_500 && found < 2_950, "{found} of 3000 matched");
    assert!(positions / found > 500, "mean index {}", positions / found);
}

/// Checks `n` random requests; returns how many matched and the sum of the matching indices.
fn check_requests(rules: &[Rule], table: &Table, mut rng: Rng, n: usize) -> (usize, usize) {
    let mut reference = Reference::default();
    let (mut found, mut positions) = (0, 0);
    for _ in 0..n {
        let parts = random_request(&mut rng);
        let headers: Vec<(&str, &[u8])> = parts.headers.iter().map(|(n, v)| (*n, &v[..])).collect();
        let req = SimpleRequest {
            target: &parts.target,
            authority: parts.authority,
            method: parts.method,
            scheme: b"http",
            headers: &headers,
        };
        let want = reference.first_match(rules, &req);
        assert_eq!(
            table.first_match(&req),
            want,
            "target {:?}, headers {:?}",
            String::from_utf8_lossy(&parts.target),
            headers
        );
        if let Some(i) = want {
            found += 1;
            positions += i;
        }
    }
    (found, positions)
}
