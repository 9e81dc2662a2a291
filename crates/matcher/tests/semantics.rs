//! The matching semantics the router relies on (Istio `StringMatch` as Envoy evaluates it),
//! one behaviour per test, through the public interface only.

use hypha_matcher::{
    Attr, CompileErrors, Condition, Pattern, Request, Rule, SimpleRequest, StringMatch, Table, Test,
};

fn is(attr: Attr, pattern: Pattern, ignore_case: bool) -> Condition {
    Condition {
        attr,
        test: Test::Matches(StringMatch {
            pattern,
            ignore_case,
        }),
        invert: false,
    }
}

fn not(mut c: Condition) -> Condition {
    c.invert = !c.invert;
    c
}

fn test(attr: Attr, test: Test) -> Condition {
    Condition {
        attr,
        test,
        invert: false,
    }
}

fn rule(conditions: Vec<Condition>) -> Rule {
    Rule { conditions }
}

fn table(rules: Vec<Rule>) -> Table {
    Table::compile(rules).expect("rules compile")
}

fn req(target: &str) -> SimpleRequest<'_> {
    SimpleRequest {
        target: target.as_bytes(),
        authority: b"reviews.default:9080",
        method: b"GET",
        scheme: b"http",
        headers: &[],
    }
}

/// Whether the one-condition table matches `r`. Also checks that the inverted condition says
/// the opposite: a rule's positive string match is looked up in the table's automata, an
/// inverted one is evaluated on its own, so this compares the two ways of matching.
fn matches(c: Condition, r: &impl Request) -> bool {
    let direct = table(vec![rule(vec![c.clone()])]).first_match(r) == Some(0);
    let inverted = table(vec![rule(vec![not(c)])]).first_match(r) == Some(0);
    assert_ne!(direct, inverted, "a condition and its inverse agree");
    direct
}

fn path_matches(pattern: Pattern, ignore_case: bool, path: &str) -> bool {
    matches(is(Attr::Path, pattern, ignore_case), &req(path))
}

fn s(v: &str) -> String {
    v.to_owned()
}

#[test]
fn exact() {
    assert!(path_matches(Pattern::Exact(s("/api")), false, "/api"));
    assert!(path_matches(Pattern::Exact(s("/api")), false, "/api?x=1"));
    assert!(!path_matches(Pattern::Exact(s("/api")), false, "/API"));
    assert!(!path_matches(Pattern::Exact(s("/api")), false, "/api/"));
    assert!(!path_matches(Pattern::Exact(s("/api")), false, "/ap"));
    assert!(path_matches(Pattern::Exact(s("/Api")), true, "/aPI"));
    assert!(!path_matches(Pattern::Exact(s("/api")), true, "/apis"));
}

#[test]
fn prefix() {
    assert!(path_matches(Pattern::Prefix(s("/api/")), false, "/api/v1"));
    assert!(path_matches(Pattern::Prefix(s("/api/")), false, "/api/"));
    assert!(!path_matches(Pattern::Prefix(s("/api/")), false, "/API/v1"));
    assert!(!path_matches(Pattern::Prefix(s("/api/")), false, "/api"));
    assert!(path_matches(Pattern::Prefix(s("/API/")), true, "/api/v1"));
    assert!(!path_matches(Pattern::Prefix(s("/api/")), true, "/ap"));
}

#[test]
fn suffix() {
    assert!(path_matches(
        Pattern::Suffix(s(".png")),
        false,
        "/img/a.png"
    ));
    assert!(!path_matches(
        Pattern::Suffix(s(".png")),
        false,
        "/img/a.PNG"
    ));
    assert!(!path_matches(Pattern::Suffix(s(".png")), false, "/a.png/x"));
    assert!(path_matches(Pattern::Suffix(s(".PnG")), true, "/img/a.pNg"));
    assert!(!path_matches(Pattern::Suffix(s("long.png")), true, ".png"));
    // The query string is not part of the path.
    assert!(path_matches(
        Pattern::Suffix(s(".png")),
        false,
        "/a.png?v=2"
    ));
}

#[test]
fn contains() {
    assert!(path_matches(
        Pattern::Contains(s("/v1/")),
        false,
        "/api/v1/x"
    ));
    assert!(path_matches(Pattern::Contains(s("/v1/")), false, "/v1/"));
    assert!(!path_matches(
        Pattern::Contains(s("/v1/")),
        false,
        "/api/V1/x"
    ));
    assert!(!path_matches(Pattern::Contains(s("/v1/")), false, "/v1"));
    assert!(path_matches(
        Pattern::Contains(s("/V1/")),
        true,
        "/api/v1/x"
    ));
    assert!(path_matches(
        Pattern::Contains(s("/v1/")),
        true,
        "/API/V1/X"
    ));
    assert!(path_matches(Pattern::Contains(s("aab")), false, "/aaab"));
    assert!(!path_matches(
        Pattern::Contains(s("/v1/")),
        true,
        "/api/v2/x"
    ));
}

#[test]
fn regex_is_a_full_match() {
    assert!(path_matches(Pattern::Regex(s("/a.*")), false, "/a/b"));
    assert!(!path_matches(Pattern::Regex(s("/a.*")), false, "x/a"));
    assert!(path_matches(Pattern::Regex(s("/[a-z]+")), false, "/abc"));
    assert!(!path_matches(Pattern::Regex(s("/[a-z]+")), false, "/abc1"));
    assert!(!path_matches(Pattern::Regex(s("[a-z]+")), false, "/abc"));
    // Alternation is inside the anchors: neither branch may match a part only.
    assert!(!path_matches(Pattern::Regex(s("/x|/y")), false, "/xz"));
    assert!(!path_matches(Pattern::Regex(s("/x|/y")), false, "/z/y"));
    assert!(path_matches(Pattern::Regex(s("/a|/ab")), false, "/ab"));
    // Case.
    assert!(!path_matches(Pattern::Regex(s("/abc")), false, "/ABC"));
    assert!(path_matches(Pattern::Regex(s("/abc")), true, "/ABC"));
    assert!(path_matches(Pattern::Regex(s("/[a-c]+")), true, "/AbC"));
}

#[test]
fn perl_classes_and_word_boundaries_are_ascii_as_in_re2() {
    let re = |p: &str, v: &str| path_matches(Pattern::Regex(s(p)), false, v);
    assert!(re(r"/v\d+", "/v12"));
    assert!(!re(r"/v\d+", "/v\u{663}")); // ARABIC-INDIC DIGIT THREE
    assert!(re(r"/\w+", "/a_Z9"));
    assert!(!re(r"/\w+", "/caf\u{e9}"));
    // The negated classes match one UTF-8 character, not one byte.
    assert!(re(r"/\D", "/\u{e9}"));
    assert!(re(r"/\W", "/\u{e9}"));
    assert!(re(r"/\S\s\S", "/a b"));
    assert!(!re(r"/\S\s\S", "/a\u{a0}b")); // NO-BREAK SPACE is not RE2 whitespace
    assert!(re(r"/[\d.]+", "/1.2"));
    assert!(!re(r"/[^\d]", "/1"));
    assert!(re(r".*\bv1\b.*", "/api/v1/x"));
    assert!(!re(r".*\bv1\b.*", "/api/v1x"));
    // With an ASCII `\b`, an accented letter is not a word character.
    assert!(re(r".*\bx", "/\u{e9}x"));
    // `.`, bracketed and Unicode classes and case folding stay Unicode-aware.
    assert!(re(r"/.", "/\u{e9}"));
    assert!(re(r"/[^a]", "/\u{e9}"));
    assert!(re(r"/\pL+", "/caf\u{e9}"));
    assert!(path_matches(
        Pattern::Regex(s("/caf\u{c9}")),
        true,
        "/caf\u{e9}"
    ));
}

#[test]
fn regex_cannot_escape_its_anchors() {
    // On its own `a)|(b` is not a regex; wrapped as `^(?:a)|(b)$` it would be, unanchored.
    let err = Table::compile(vec![rule(vec![is(
        Attr::Path,
        Pattern::Regex(s("a)|(b")),
        false,
    )])])
    .unwrap_err();
    assert_eq!((err.errors[0].rule, err.errors[0].condition), (0, 0));
}

#[test]
fn first_match_wins() {
    let t = table(vec![
        rule(vec![is(Attr::Path, Pattern::Exact(s("/a/b")), false)]),
        rule(vec![is(Attr::Path, Pattern::Prefix(s("/a")), false)]),
        rule(vec![is(Attr::Path, Pattern::Prefix(s("/")), false)]),
        rule(vec![is(Attr::Path, Pattern::Exact(s("/a/b")), false)]),
    ]);
    assert_eq!(t.first_match(&req("/a/b")), Some(0));
    assert_eq!(t.first_match(&req("/a/c")), Some(1));
    assert_eq!(t.first_match(&req("/z")), Some(2));
    assert_eq!(t.first_match(&req("z")), None);
    assert_eq!(t.len(), 4);
    assert!(!t.is_empty());
}

#[test]
fn empty_rule_matches_everything_and_empty_table_nothing() {
    let t = table(vec![
        rule(vec![is(Attr::Path, Pattern::Exact(s("/a")), false)]),
        Rule::default(),
    ]);
    assert_eq!(t.first_match(&req("/a")), Some(0));
    assert_eq!(t.first_match(&req("")), Some(1));
    let empty = table(vec![]);
    assert!(empty.is_empty());
    assert_eq!(empty.first_match(&req("/a")), None);
}

#[test]
fn conditions_are_a_conjunction() {
    let headers: &[(&str, &[u8])] = &[("end-user", b"jason")];
    let t = table(vec![
        rule(vec![
            is(Attr::Path, Pattern::Prefix(s("/reviews")), false),
            is(Attr::Method, Pattern::Exact(s("GET")), false),
            is(
                Attr::Header(s("end-user")),
                Pattern::Exact(s("jason")),
                false,
            ),
        ]),
        rule(vec![is(Attr::Path, Pattern::Prefix(s("/reviews")), false)]),
    ]);
    let jason = SimpleRequest {
        headers,
        ..req("/reviews/1")
    };
    assert_eq!(t.first_match(&jason), Some(0));
    assert_eq!(t.first_match(&req("/reviews/1")), Some(1), "header missing");
    let post = SimpleRequest {
        method: b"POST",
        ..jason
    };
    assert_eq!(t.first_match(&post), Some(1), "method differs");
    let other = SimpleRequest {
        target: b"/ratings",
        ..jason
    };
    assert_eq!(t.first_match(&other), None, "path differs");
}

#[test]
fn authority_method_scheme_compare_as_given() {
    let r = req("/");
    assert!(matches(
        is(
            Attr::Authority,
            Pattern::Exact(s("reviews.default:9080")),
            false
        ),
        &r
    ));
    assert!(!matches(
        is(Attr::Authority, Pattern::Exact(s("reviews.default")), false),
        &r
    ));
    assert!(matches(
        is(Attr::Method, Pattern::Exact(s("GET")), false),
        &r
    ));
    assert!(!matches(
        is(Attr::Method, Pattern::Exact(s("get")), false),
        &r
    ));
    assert!(matches(
        is(Attr::Scheme, Pattern::Exact(s("http")), false),
        &r
    ));
    assert!(matches(test(Attr::Authority, Test::Present), &r));
    assert!(!matches(test(Attr::Path, Test::Absent), &r));
}

#[test]
fn headers_present_absent_invert() {
    let headers: &[(&str, &[u8])] = &[("x-canary", b"yes"), ("x-empty", b"")];
    let r = SimpleRequest {
        headers,
        ..req("/")
    };
    let h = |n: &str| Attr::Header(s(n));
    let yes = |n: &str| is(h(n), Pattern::Exact(s("yes")), false);

    assert!(matches(test(h("x-canary"), Test::Present), &r));
    assert!(
        matches(test(h("x-empty"), Test::Present), &r),
        "empty value is present"
    );
    assert!(!matches(test(h("x-missing"), Test::Present), &r));
    assert!(matches(test(h("x-missing"), Test::Absent), &r));
    assert!(!matches(test(h("x-canary"), Test::Absent), &r));
    assert!(!matches(not(test(h("x-canary"), Test::Present)), &r));
    assert!(matches(not(test(h("x-canary"), Test::Absent)), &r));
    assert!(matches(not(test(h("x-missing"), Test::Present)), &r));

    assert!(matches(yes("x-canary"), &r));
    assert!(!matches(not(yes("x-canary")), &r));
    assert!(!matches(yes("x-empty"), &r));
    assert!(matches(not(yes("x-empty")), &r));
    assert!(!matches(yes("x-missing"), &r), "absent never matches");
    assert!(matches(not(yes("x-missing")), &r), "so inverted it holds");
    // Envoy's `invert_match` (Istio `withoutHeaders`): present and not matching.
    let without = |n: &str| table(vec![rule(vec![test(h(n), Test::Present), not(yes(n))])]);
    assert_eq!(without("x-missing").first_match(&r), None);
    assert_eq!(without("x-empty").first_match(&r), Some(0));
    assert_eq!(without("x-canary").first_match(&r), None);

    // Header names in rules are compared lower-case.
    assert!(matches(yes("X-Canary"), &r));
}

#[test]
fn query_parameters_present_absent_invert() {
    let r = req("/p?a=b&c&a=second&e=");
    let q = |n: &str| Attr::Query(s(n));
    let exact = |n: &str, v: &str| is(q(n), Pattern::Exact(s(v)), false);

    assert!(matches(exact("a", "b"), &r), "first occurrence wins");
    assert!(!matches(exact("a", "second"), &r));
    assert!(matches(exact("c", ""), &r), "no `=`: empty value");
    assert!(matches(exact("e", ""), &r));
    assert!(matches(test(q("c"), Test::Present), &r));
    assert!(matches(test(q("z"), Test::Absent), &r));
    assert!(!matches(test(q("a"), Test::Absent), &r));
    assert!(!matches(exact("z", ""), &r));
    assert!(matches(not(exact("z", "")), &r));
    assert!(matches(not(exact("a", "x")), &r));
    assert!(!matches(not(test(q("c"), Test::Present)), &r));
    assert!(matches(is(q("a"), Pattern::Regex(s("[a-z]")), false), &r));
    // Parameters live in the query, never in the path.
    assert!(matches(test(q("p"), Test::Absent), &r));
    assert!(matches(test(q("a"), Test::Absent), &req("/a=b")));
}

#[test]
fn empty_strings() {
    for path in ["", "/", "/anything?q"] {
        assert!(path_matches(Pattern::Prefix(s("")), false, path));
        assert!(path_matches(Pattern::Prefix(s("")), true, path));
        assert!(path_matches(Pattern::Suffix(s("")), false, path));
        assert!(path_matches(Pattern::Contains(s("")), true, path));
    }
    assert!(path_matches(Pattern::Exact(s("")), false, ""));
    assert!(path_matches(Pattern::Exact(s("")), false, "?q=1"));
    assert!(!path_matches(Pattern::Exact(s("")), false, "/"));
    assert!(!path_matches(Pattern::Exact(s("")), true, "/"));
    assert!(path_matches(Pattern::Regex(s("")), false, ""));
    assert!(!path_matches(Pattern::Regex(s("")), false, "/"));
    // An empty pattern still needs the attribute to be there.
    let missing = is(Attr::Header(s("x")), Pattern::Prefix(s("")), false);
    assert!(!matches(missing, &req("/")));
}

#[test]
fn non_utf8_bytes() {
    let headers: &[(&str, &[u8])] = &[("x-bin", b"\xffab\xC3\x28\x80Z")];
    let r = SimpleRequest {
        target: b"/caf\xe9?k=\xfe\xff",
        headers,
        ..req("")
    };
    let h = || Attr::Header(s("x-bin"));
    assert!(matches(test(h(), Test::Present), &r));
    assert!(matches(is(h(), Pattern::Prefix(s("")), false), &r));
    assert!(matches(is(h(), Pattern::Contains(s("ab")), false), &r));
    assert!(matches(is(h(), Pattern::Contains(s("AB")), true), &r));
    assert!(matches(is(h(), Pattern::Suffix(s("z")), true), &r));
    assert!(!matches(is(h(), Pattern::Exact(s("ab")), true), &r));
    // Regexes see bytes: `(?-u:...)` matches them raw; `.` (a UTF-8 character, as in RE2)
    // does not match a lone invalid byte.
    let re = |p: &str| is(h(), Pattern::Regex(s(p)), false);
    assert!(matches(
        re(r"(?-u:\xff)ab(?-u:[\x80-\xff])\((?-u:\x80)Z"),
        &r
    ));
    assert!(matches(re(r"(?s-u:.)*Z"), &r));
    assert!(!matches(re(r".*Z"), &r));
    assert!(matches(
        is(Attr::Path, Pattern::Regex(s(r"/caf(?-u:\xe9)")), false),
        &r
    ));
    assert!(matches(
        is(Attr::Path, Pattern::Prefix(s("/caf")), true),
        &r
    ));
    assert!(matches(test(Attr::Query(s("k")), Test::Present), &r));
    assert!(matches(
        is(
            Attr::Query(s("k")),
            Pattern::Regex(s(r"(?-u:\xfe\xff)")),
            false
        ),
        &r
    ));
}

#[test]
fn ignore_case_is_ascii_only_for_literals() {
    // `É` (C3 89) and `é` (C3 A9) differ outside ASCII, as in Envoy.
    assert!(!path_matches(Pattern::Exact(s("/É")), true, "/é"));
    assert!(path_matches(Pattern::Exact(s("/É")), true, "/É"));
}

#[test]
fn every_bad_condition_is_reported_at_once() {
    // A Unicode class costs tens of KiB of program per copy: `\pL{40}` is over the 1 MiB
    // limit, while `\pL{8}` is fine. (`\w` is ASCII, as in RE2, and small.)
    let too_large = s(r"\pL{40}");
    for fine in [r"\pL{8}", r"\w{40}"] {
        assert!(Table::compile(vec![rule(vec![is(
            Attr::Path,
            Pattern::Regex(s(fine)),
            true
        )])])
        .is_ok());
    }
    let rules = vec![
        rule(vec![is(Attr::Path, Pattern::Prefix(s("/")), false)]),
        rule(vec![
            is(Attr::Path, Pattern::Prefix(s("/")), false),
            is(Attr::Path, Pattern::Regex(s("(unclosed")), false),
        ]),
        Rule::default(),
        rule(vec![
            is(Attr::Header(s("x")), Pattern::Regex(too_large), true),
            is(Attr::Path, Pattern::Regex(s("fine")), false),
            is(Attr::Query(s("q")), Pattern::Regex(s("a{2,1}")), false),
        ]),
        rule(vec![test(Attr::Header(s("")), Test::Present)]),
    ];
    let err: CompileErrors = Table::compile(rules).unwrap_err();
    let at: Vec<(usize, usize)> = err.errors.iter().map(|e| (e.rule, e.condition)).collect();
    assert_eq!(at, [(1, 1), (3, 0), (3, 2), (4, 0)]);
    assert!(
        err.errors[0].message.contains("(unclosed"),
        "{}",
        err.errors[0]
    );
    assert!(
        err.errors[1].message.contains("size limit"),
        "{}",
        err.errors[1]
    );
    assert!(
        err.errors[3].message.contains("header name"),
        "{}",
        err.errors[3]
    );

    let shown = err.to_string();
    assert!(shown.starts_with("4 invalid match condition(s)"), "{shown}");
    for e in &err.errors {
        assert!(shown.contains(&e.to_string()), "{shown}");
        assert!(
            shown.contains(&format!("rule {}, condition {}:", e.rule, e.condition)),
            "{shown}"
        );
    }
}

#[test]
fn table_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Table>();
    assert_send_sync::<CompileErrors>();
}

#[test]
fn table_is_shared_across_threads() {
    let t = std::sync::Arc::new(table(vec![
        rule(vec![is(Attr::Path, Pattern::Regex(s("/t/[0-9]+")), false)]),
        Rule::default(),
    ]));
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                let path = format!("/t/{i}");
                (0..100).all(|_| t.first_match(&req(&path)) == Some(0))
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
    assert_eq!(t.first_match(&req("/t/x")), Some(1));
}
