//! Request matching for the sidecar: the one interface through which the proxy's router (and
//! later authorization and filter-chain selection) matches a request's attributes against an
//! ordered table of rules. The first rule that matches wins.
//!
//! Callers describe rules with [`Rule`]s of [`Condition`]s (Istio `StringMatch` semantics, as
//! Envoy evaluates them), compile them once into an immutable [`Table`] when a config generation
//! arrives, and ask [`Table::first_match`] on the request path. Requests are read through the
//! [`Request`] trait, borrowed, so a lookup allocates nothing.
//!
//! Behind [`Table`], each attribute's patterns are compiled together: exact literals into a
//! hash table, everything else into one multi-pattern DFA, so a lookup reads the path once
//! whether the table has one rule or ten thousand. Every automaton is built within a memory
//! [`Budget`] and degrades (split, then lazy with a capped cache) rather than exceed it;
//! [`Table::stats`] tells which shape a table took. Regexes have RE2's meaning, as Envoy's
//! `safe_regex`: see [`Pattern::Regex`].

#![forbid(unsafe_code)]

mod automaton;
mod engine;
#[doc(hidden)]
pub mod fuzzing;
mod re2;
mod request;

pub use request::{query_param, Request, SimpleRequest};

/// How a string is compared: Istio `StringMatch` semantics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// The whole value equals this.
    Exact(String),
    /// The value starts with this (an empty prefix matches every value).
    Prefix(String),
    /// The value ends with this.
    Suffix(String),
    /// The value contains this.
    Contains(String),
    /// RE2 syntax, matched against the whole value (as Envoy's `safe_regex`): `/a.*` does not
    /// match `x/a`. As in RE2, `.`, bracketed classes and `\p{..}` match UTF-8 characters,
    /// while `\d`, `\s`, `\w` and `\b` are ASCII-only (`\d` is `[0-9]`); use `(?-u:...)` to
    /// match raw bytes.
    Regex(String),
}

/// A [`Pattern`] and whether letters compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StringMatch {
    pub pattern: Pattern,
    /// ASCII case-insensitive for the literal patterns; the `(?i)` flag for [`Pattern::Regex`].
    pub ignore_case: bool,
}

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attr {
    /// The path, without the query string.
    Path,
    /// The authority (`:authority` / `Host`), as the request carries it.
    Authority,
    /// The method, as the request carries it.
    Method,
    /// The scheme.
    Scheme,
    /// A request header, by name (compared lower-case).
    Header(String),
    /// A query parameter, by name (not percent-decoded, as in Envoy).
    Query(String),
}

/// What a condition tests about its attribute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Test {
    /// The attribute is present and its value matches.
    Matches(StringMatch),
    /// The attribute is present, with any value (including empty).
    Present,
    /// The attribute is not present.
    Absent,
}

/// One test of one attribute. Path, authority, method and scheme are always present.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Condition {
    pub attr: Attr,
    pub test: Test,
    /// Negates the result of the test, whatever it was: an absent attribute does not
    /// [`Test::Matches`], so inverted it holds. Note that Envoy's `invert_match` (Istio
    /// `withoutHeaders`) does *not* match a missing header; to reproduce it, add a
    /// [`Test::Present`] condition on the same header to the rule.
    pub invert: bool,
}

/// A rule matches when all its conditions hold (an empty rule matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    pub conditions: Vec<Condition>,
}

/// A compiled, immutable table of rules. `Send + Sync`: share it behind an `Arc` and swap it
/// whole when the config changes.
#[derive(Debug)]
pub struct Table {
    engine: engine::Engine,
}

/// Memory limits for the automata of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Largest DFA built for a pattern set, in bytes, before it is packed (the packed form
    /// keeps only live transitions and is a fraction of this). A set that would need more is
    /// split in two.
    pub dfa_bytes: usize,
    /// Cache of each lazy DFA (the last resort for patterns that do not fit a dense DFA even
    /// when split), per thread that uses it, in bytes.
    pub lazy_cache_bytes: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            dfa_bytes: 16 << 20,
            lazy_cache_bytes: 2 << 20,
        }
    }
}

/// The shape a compiled table took: for metrics and for sizing [`Budget`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub rules: usize,
    /// Distinct anchor patterns (each rule's most telling condition; identical ones shared).
    pub patterns: usize,
    /// Anchor patterns that are exact literals, looked up in hash tables.
    pub exact_literals: usize,
    /// Dense DFAs built, and the times a pattern set was split to fit the budget.
    pub dense_dfas: usize,
    pub splits: usize,
    /// Lazy DFAs: pattern sets that did not fit a dense DFA even when split.
    pub lazy_dfas: usize,
    /// Heap used by the automata (dense tables, lazy DFAs without their caches).
    pub dfa_bytes: usize,
    /// The lazy DFAs' cache budget, per thread.
    pub lazy_cache_bytes: usize,
    /// Times a lazy DFA's cache filled up and was cleared, since the table was built.
    pub lazy_cache_clears: u64,
}

impl Table {
    /// Compiles `rules`, in order, within the default [`Budget`]. Reports every bad condition
    /// at once.
    pub fn compile(rules: Vec<Rule>) -> Result<Table, CompileErrors> {
        Table::compile_with(rules, &Budget::default())
    }

    /// Compiles `rules`, in order, within `budget`.
    pub fn compile_with(rules: Vec<Rule>, budget: &Budget) -> Result<Table, CompileErrors> {
        engine::Engine::compile(rules, budget).map(|engine| Table { engine })
    }

    /// Index of the first rule that matches `req`, or `None`.
    pub fn first_match(&self, req: &impl Request) -> Option<usize> {
        self.engine.first_match(req)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.engine.len()
    }

    /// Whether the table has no rules (and so matches nothing).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape the table took, and its lazy caches' clears so far.
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }
}

/// Whether `pattern` compiles as a case-sensitive [`Pattern::Regex`] (RE2 syntax, within the size limit the
/// table compiles each regex with), so config validation refuses exactly what a [`Table`] would.
/// The error names the pattern and the problem.
pub fn check_regex(pattern: &str) -> Result<(), String> {
    engine::check_regex(pattern)
}

/// One condition that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule}, condition {condition}: {message}")]
pub struct CompileError {
    /// Index of the rule in the input.
    pub rule: usize,
    /// Index of the condition within the rule.
    pub condition: usize,
    pub message: String,
}

/// Every condition of a rule table that does not compile, in rule and condition order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} invalid match condition(s): {}", .errors.len(), join(.errors))]
pub struct CompileErrors {
    pub errors: Vec<CompileError>,
}

fn join(errors: &[CompileError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
