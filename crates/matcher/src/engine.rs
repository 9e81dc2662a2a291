//! The engine behind [`crate::Table`]: rules compiled once into flat conditions (literals
//! lower-cased ahead of time for case-insensitive compares, each regex compiled once, anchored)
//! and evaluated in order, first match wins, without allocating. Private so that a
//! multi-pattern automaton can replace it without touching the public interface.

use regex::bytes::{Regex, RegexBuilder};

use crate::{Attr, CompileError, CompileErrors, Condition, Pattern, Request, Rule, Test};

/// Limit on one compiled regex program (RE2's default max_mem is 8 MiB for the whole regex;
/// a route or policy pattern never needs this much).
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Limit on the lazy DFA cache of one regex, per thread using it. It is only filled as inputs
/// need it; past the limit the regex crate falls back to slower engines, never fails.
const REGEX_DFA_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Engine {
    rules: Box<[CompiledRule]>,
}

#[derive(Debug)]
struct CompiledRule {
    conditions: Box<[CompiledCondition]>,
}

#[derive(Debug)]
struct CompiledCondition {
    attr: Subject,
    op: Op,
    invert: bool,
}

#[derive(Debug)]
enum Subject {
    Path,
    Authority,
    Method,
    Scheme,
    Header(Box<str>),
    Query(Box<str>),
}

/// The test, with literals prepared: the `*Ci` variants hold ASCII-lower-cased literals.
#[derive(Debug)]
enum Op {
    Present,
    Absent,
    Exact(Box<[u8]>),
    ExactCi(Box<[u8]>),
    Prefix(Box<[u8]>),
    PrefixCi(Box<[u8]>),
    Suffix(Box<[u8]>),
    SuffixCi(Box<[u8]>),
    Contains(Box<[u8]>),
    ContainsCi(Box<[u8]>),
    Regex(Regex),
}

impl Engine {
    pub(crate) fn compile(rules: Vec<Rule>) -> Result<Engine, CompileErrors> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (r, rule) in rules.into_iter().enumerate() {
            let mut conditions = Vec::with_capacity(rule.conditions.len());
            for (c, condition) in rule.conditions.into_iter().enumerate() {
                match compile_condition(condition) {
                    Ok(cond) => conditions.push(cond),
                    Err(message) => errors.push(CompileError {
                        rule: r,
                        condition: c,
                        message,
                    }),
                }
            }
            // A rule is a pure conjunction, so the order of its conditions is free: cheap tests
            // first, regexes last, so that most rules are rejected before running one.
            conditions.sort_by_key(CompiledCondition::cost);
            compiled.push(CompiledRule {
                conditions: conditions.into_boxed_slice(),
            });
        }
        if errors.is_empty() {
            Ok(Engine {
                rules: compiled.into_boxed_slice(),
            })
        } else {
            Err(CompileErrors { errors })
        }
    }

    pub(crate) fn first_match(&self, req: &impl Request) -> Option<usize> {
        self.rules
            .iter()
            .position(|rule| rule.conditions.iter().all(|cond| cond.holds(req)))
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }
}

fn compile_condition(condition: Condition) -> Result<CompiledCondition, String> {
    let attr = match condition.attr {
        Attr::Path => Subject::Path,
        Attr::Authority => Subject::Authority,
        Attr::Method => Subject::Method,
        Attr::Scheme => Subject::Scheme,
        Attr::Header(name) if name.is_empty() => return Err("empty header name".into()),
        Attr::Header(name) => Subject::Header(name.to_ascii_lowercase().into()),
        Attr::Query(name) if name.is_empty() => return Err("empty query parameter name".into()),
        Attr::Query(name) => Subject::Query(name.into()),
    };
    let op = match condition.test {
        Test::Present => Op::Present,
        Test::Absent => Op::Absent,
        Test::Matches(m) => {
            let ci = m.ignore_case;
            let lit = |s: String| -> Box<[u8]> {
                let mut b = s.into_bytes();
                if ci {
                    b.make_ascii_lowercase();
                }
                b.into()
            };
            match m.pattern {
                Pattern::Exact(s) if ci => Op::ExactCi(lit(s)),
                Pattern::Exact(s) => Op::Exact(lit(s)),
                Pattern::Prefix(s) if ci => Op::PrefixCi(lit(s)),
                Pattern::Prefix(s) => Op::Prefix(lit(s)),
                Pattern::Suffix(s) if ci => Op::SuffixCi(lit(s)),
                Pattern::Suffix(s) => Op::Suffix(lit(s)),
                Pattern::Contains(s) if ci => Op::ContainsCi(lit(s)),
                Pattern::Contains(s) => Op::Contains(lit(s)),
                Pattern::Regex(p) => Op::Regex(compile_regex(&p, ci)?),
            }
        }
    };
    Ok(CompiledCondition {
        attr,
        op,
        invert: condition.invert,
    })
}

/// Compiles `pattern` for a full match (Envoy's `safe_regex`, RE2 `FullMatch`).
fn compile_regex(pattern: &str, ignore_case: bool) -> Result<Regex, String> {
    // Parse the pattern on its own first, so that one like `a)|(b` cannot escape the anchoring
    // group below, and so that syntax errors point into the pattern as the user wrote it.
    let syntax = regex_automata::util::syntax::Config::new()
        .utf8(false) // as `regex::bytes`: a pattern may match bytes that are not UTF-8
        .case_insensitive(ignore_case);
    if let Err(e) = regex_automata::util::syntax::parse_with(pattern, &syntax) {
        return Err(format!("regex {pattern:?} does not compile: {e}"));
    }
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regex {pattern:?} does not compile: {e}"))
}

impl CompiledCondition {
    /// Rough relative cost of evaluating the condition, to order a rule's conditions.
    fn cost(&self) -> u8 {
        let attr = match self.attr {
            Subject::Path | Subject::Authority | Subject::Method | Subject::Scheme => 0,
            Subject::Header(_) => 1,
            Subject::Query(_) => 2,
        };
        let op = match self.op {
            Op::Present | Op::Absent => 0,
            Op::Exact(_) | Op::ExactCi(_) => 0,
            Op::Prefix(_) | Op::PrefixCi(_) | Op::Suffix(_) | Op::SuffixCi(_) => 1,
            Op::Contains(_) | Op::ContainsCi(_) => 4,
            Op::Regex(_) => 16,
        };
        attr + op
    }

    #[inline]
    fn holds(&self, req: &impl Request) -> bool {
        let value = match &self.attr {
            Subject::Path => Some(req.path()),
            Subject::Authority => Some(req.authority()),
            Subject::Method => Some(req.method()),
            Subject::Scheme => Some(req.scheme()),
            Subject::Header(name) => req.header(name),
            Subject::Query(name) => req.query(name),
        };
        let result = match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Absent, v) => v.is_none(),
            (_, None) => false,
            (op, Some(v)) => op.matches(v),
        };
        result != self.invert
    }
}

impl Op {
    #[inline]
    fn matches(&self, v: &[u8]) -> bool {
        match self {
            // Decided in `holds`, which needs no value for them.
            Op::Present | Op::Absent => true,
            Op::Exact(l) => v == &l[..],
            Op::ExactCi(l) => v.len() == l.len() && eq_lower(v, l),
            Op::Prefix(l) => v.starts_with(l),
            Op::PrefixCi(l) => v.len() >= l.len() && eq_lower(&v[..l.len()], l),
            Op::Suffix(l) => v.ends_with(l),
            Op::SuffixCi(l) => v.len() >= l.len() && eq_lower(&v[v.len() - l.len()..], l),
            Op::Contains(l) => contains(v, l, |a, b| a == b),
            Op::ContainsCi(l) => contains(v, l, |a, b| a.to_ascii_lowercase() == b),
            Op::Regex(re) => re.is_match(v),
        }
    }
}

/// `v` equals `lower` (already ASCII-lower-cased) ignoring ASCII case; same lengths.
#[inline]
fn eq_lower(v: &[u8], lower: &[u8]) -> bool {
    v.iter()
        .zip(lower)
        .all(|(a, &b)| a.to_ascii_lowercase() == b)
}

/// Naive substring search; values and needles are short (headers, paths). The replacement
/// engine will search all literals of a table at once.
#[inline]
fn contains(hay: &[u8], needle: &[u8], eq: impl Fn(u8, u8) -> bool) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    if hay.len() < needle.len() {
        return false;
    }
    (0..=hay.len() - needle.len()).any(|i| {
        eq(hay[i], first)
            && hay[i + 1..i + needle.len()]
                .iter()
                .zip(rest)
                .all(|(&a, &b)| eq(a, b))
    })
}
