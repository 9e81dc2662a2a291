//! Route tables of a real mesh's shape, compiled within their memory budget and degraded
//! (split, then lazy) when given less, always with the answers of one regex per route tried in
//! order (Envoy's way).

mod common;

use common::Mix;
use hypha_matcher::{Budget, Table};

fn check(n: usize, mix: Mix, budget: &Budget) -> hypha_matcher::Stats {
    let rules = common::table(n, mix);
    let table = Table::compile_with(rules.clone(), budget).unwrap();
    let routes = common::sequential(&rules);
    let mut matched = 0;
    for path in common::paths(n, mix, 3_000, n as u64) {
        let got = common::first_match(&table, &path);
        assert_eq!(got, common::first_sequential(&routes, &path), "{path}");
        matched += usize::from(got.is_some());
    }
    // Eight in ten paths are made to match.
    assert!(
        (2_200..2_700).contains(&matched),
        "{matched} of 3000 matched"
    );
    table.stats()
}

#[test]
fn a_thousand_regex_routes_fit_in_well_under_16_mib() {
    let stats = check(1_000, Mix::Regex, &Budget::default());
    assert_eq!((stats.patterns, stats.lazy_dfas), (1_000, 0), "{stats:?}");
    assert!(stats.dfa_bytes < 16 << 20, "{stats:?}");
}

#[test]
fn mixed_tables_put_exact_routes_in_a_hash_table() {
    let stats = check(3_000, Mix::Mixed, &Budget::default());
    assert_eq!(stats.exact_literals, 1_000, "{stats:?}");
    assert_eq!(stats.lazy_dfas, 0, "{stats:?}");
}

#[test]
fn a_table_over_its_budget_is_split_and_answers_the_same() {
    let budget = Budget {
        dfa_bytes: 512 << 10,
        ..Budget::default()
    };
    let stats = check(1_000, Mix::Regex, &budget);
    assert!(stats.splits > 0 && stats.dense_dfas > 1, "{stats:?}");
    assert_eq!(stats.lazy_dfas, 0, "{stats:?}");
}

#[test]
fn patterns_that_fit_no_dense_dfa_go_lazy_and_answer_the_same() {
    let budget = Budget {
        dfa_bytes: 1 << 10,
        lazy_cache_bytes: 256 << 10,
    };
    let stats = check(1_000, Mix::Regex, &budget);
    assert!(stats.lazy_dfas > 1, "{stats:?}");
    assert_eq!(stats.lazy_cache_bytes, stats.lazy_dfas * (256 << 10));
}

#[test]
fn a_table_that_fits_no_budget_is_an_error() {
    let budget = Budget {
        dfa_bytes: 1 << 10,
        lazy_cache_bytes: 1,
    };
    let err = Table::compile_with(common::table(100, Mix::Regex), &budget).unwrap_err();
    assert!(err.to_string().contains("budget"), "{err}");
}
