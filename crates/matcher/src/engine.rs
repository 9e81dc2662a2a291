//! The engine behind [`crate::Table`]. Each rule's most telling condition, its *anchor* (a
//! positive string match, on the path when the rule has one), goes into one index per request
//! attribute: exact literals into a hash table, every other pattern into the attribute's
//! multi-pattern DFA ([`crate::automaton`]). A lookup reads each indexed attribute once, learns
//! every anchor that holds, and checks only the rules anchored there (and the few rules with
//! no anchor) for their other conditions, keeping the lowest rule number that holds: the same
//! answer as evaluating every rule in order, first match wins, without allocating.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use regex::bytes::{Regex, RegexBuilder};
use regex_syntax::hir::{Class, ClassBytes, ClassBytesRange, Hir, Repetition};

use crate::automaton::Automata;
use crate::{
    Attr, Budget, CompileError, CompileErrors, Condition, Pattern, Request, Rule, Stats,
    StringMatch, Test,
};

/// Limit on one compiled regex program (RE2's default max_mem is 8 MiB for the whole regex;
/// a route or policy pattern never needs this much).
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Limit on the lazy DFA cache of one regex, per thread using it. It is only filled as inputs
/// need it; past the limit the regex crate falls back to slower engines, never fails.
const REGEX_DFA_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Engine {
    /// Each rule's conditions other than its anchor.
    rules: Box<[CompiledRule]>,
    /// One index per attribute that anchors at least one rule.
    indexes: Box<[Index]>,
    /// For each anchor pattern, the rules it anchors, ascending.
    anchored: Box<[Box<[u32]>]>,
    /// Rules without an anchor, ascending: checked on every lookup.
    unanchored: Box<[u32]>,
    stats: Stats,
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// The anchors on one attribute.
#[derive(Debug)]
struct Index {
    subject: Subject,
    /// Exact literals: the whole value.
    exact: Literals,
    /// Suffix literals: the value's last bytes, for each suffix length in the table.
    suffix: Literals,
    /// Prefixes, and regexes that start with a literal: one set of automata.
    anchored: Automata,
    /// Contains literals and regexes that may start anywhere, in automata of their own: their
    /// leading `.*` would multiply the states of the anchored patterns if mixed with them.
    loose: Automata,
}

/// A literal anchor: the literal (lower-cased when ignoring case), whether it ignores case,
/// and its pattern number.
type Literal = (Box<[u8]>, bool, u32);

/// Literals in a hash table keyed by [`lower_hash`].
#[derive(Debug, Default)]
struct Literals {
    table: HashMap<u64, Box<[Literal]>, BuildHasherDefault<Prehashed>>,
    /// The distinct literal lengths, ascending.
    lengths: Box<[usize]>,
}

/// A rule's anchor before the indexes are built.
struct Anchor {
    subject: Subject,
    matcher: StringMatch,
}

impl Engine {
    pub(crate) fn compile(rules: Vec<Rule>, budget: &Budget) -> Result<Engine, CompileErrors> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        let mut anchors: Vec<Option<Anchor>> = Vec::with_capacity(rules.len());
        for (r, rule) in rules.into_iter().enumerate() {
            let mut conditions = Vec::with_capacity(rule.conditions.len());
            let anchor_at = pick_anchor(&rule.conditions);
            let mut anchor = None;
            for (c, condition) in rule.conditions.into_iter().enumerate() {
                let result = if Some(c) == anchor_at {
                    anchor_of(condition).map(|a| anchor = Some(a))
                } else {
                    compile_condition(condition).map(|cond| conditions.push(cond))
                };
                if let Err(message) = result {
                    errors.push(CompileError {
                        rule: r,
                        condition: c,
                        message,
                    });
                }
            }
            // A rule is a pure conjunction, so the order of its conditions is free: cheap tests
            // first, regexes last, so that most rules are rejected before running one.
            conditions.sort_by_key(CompiledCondition::cost);
            compiled.push(CompiledRule {
                conditions: conditions.into_boxed_slice(),
            });
            anchors.push(anchor);
        }
        if !errors.is_empty() {
            return Err(CompileErrors { errors });
        }
        let (indexes, anchored, unanchored, stats) =
            index(anchors, budget).map_err(|message| CompileErrors {
                errors: vec![CompileError {
                    rule: 0,
                    condition: 0,
                    message,
                }],
            })?;
        Ok(Engine {
            rules: compiled.into_boxed_slice(),
            indexes,
            anchored,
            unanchored,
            stats,
        })
    }

    pub(crate) fn first_match(&self, req: &impl Request) -> Option<usize> {
        let mut best = u32::MAX;
        for index in &*self.indexes {
            let Some(value) = index.subject.value(req) else {
                continue;
            };
            index.for_each_match(value, |pattern| {
                for &r in &*self.anchored[pattern as usize] {
                    if r >= best {
                        break;
                    }
                    if self.rules[r as usize].holds(req) {
                        best = r;
                        break;
                    }
                }
            });
        }
        for &r in &*self.unanchored {
            if r >= best {
                break;
            }
            if self.rules[r as usize].holds(req) {
                best = r;
                break;
            }
        }
        (best != u32::MAX).then_some(best as usize)
    }

    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            lazy_cache_clears: self
                .indexes
                .iter()
                .map(|i| i.anchored.cache_clears() + i.loose.cache_clears())
                .sum(),
            ..self.stats.clone()
        }
    }
}

/// Which condition anchors a rule: a positive string match, preferring the cheapest to index
/// (exact and suffix literals, hash lookups; then prefixes and regexes, the DFA; then contains)
/// and then the attributes that tell requests apart best (path, authority, headers, query,
/// then method and scheme).
fn pick_anchor(conditions: &[Condition]) -> Option<usize> {
    conditions
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match (&c.test, c.invert) {
            (Test::Matches(m), false) => {
                let attr = match c.attr {
                    Attr::Path => 0,
                    Attr::Authority => 1,
                    Attr::Header(_) => 2,
                    Attr::Query(_) => 3,
                    Attr::Method => 4,
                    Attr::Scheme => 5,
                };
                let kind = match m.pattern {
                    Pattern::Exact(_) => 0,
                    Pattern::Suffix(_) => 1,
                    Pattern::Prefix(_) | Pattern::Regex(_) => 2,
                    Pattern::Contains(_) => 3,
                };
                Some(((kind, attr), i))
            }
            _ => None,
        })
        .min()
        .map(|(_, i)| i)
}

fn anchor_of(condition: Condition) -> Result<Anchor, String> {
    let Test::Matches(matcher) = condition.test else {
        unreachable!("only string matches are picked as anchors")
    };
    let subject = subject(condition.attr)?;
    if let Pattern::Regex(p) = &matcher.pattern {
        // The same checks as a condition that is not an anchor, so that whether a pattern is
        // accepted does not depend on where it sits in its rule.
        compile_regex(p, matcher.ignore_case)?;
    }
    Ok(Anchor { subject, matcher })
}

type Indexed = (Box<[Index]>, Box<[Box<[u32]>]>, Box<[u32]>, Stats);

/// Builds the per-attribute indexes from each rule's anchor. Identical anchors share a pattern.
fn index(anchors: Vec<Option<Anchor>>, budget: &Budget) -> Result<Indexed, String> {
    let mut stats = Stats {
        rules: anchors.len(),
        ..Stats::default()
    };
    let mut ids: HashMap<(Subject, StringMatch), u32> = HashMap::new();
    let mut anchored: Vec<Vec<u32>> = Vec::new();
    let mut unanchored = Vec::new();
    // Per subject, in order of first appearance.
    let mut subjects: Vec<Subject> = Vec::new();
    let mut groups: Vec<Groups> = Vec::new();
    for (r, anchor) in anchors.into_iter().enumerate() {
        let r = u32::try_from(r).map_err(|_| "too many rules".to_string())?;
        let Some(Anchor { subject, matcher }) = anchor else {
            unanchored.push(r);
            continue;
        };
        let key = (subject, matcher);
        if let Some(&id) = ids.get(&key) {
            anchored[id as usize].push(r);
            continue;
        }
        let id = u32::try_from(anchored.len()).map_err(|_| "too many patterns".to_string())?;
        anchored.push(vec![r]);
        let (subject, matcher) = key.clone();
        ids.insert(key, id);
        let s = match subjects.iter().position(|s| *s == subject) {
            Some(s) => s,
            None => {
                subjects.push(subject);
                groups.push(Groups::default());
                subjects.len() - 1
            }
        };
        let g = &mut groups[s];
        let ci = matcher.ignore_case;
        let literal = |lit: String| -> Box<[u8]> {
            let mut lit = lit.into_bytes();
            if ci {
                lit.make_ascii_lowercase();
            }
            lit.into()
        };
        match matcher.pattern {
            Pattern::Exact(lit) => g.exact.push((literal(lit), ci, id)),
            Pattern::Suffix(lit) => g.suffix.push((literal(lit), ci, id)),
            p @ Pattern::Prefix(_) => g.anchored.push((id, hir(p, ci)?)),
            p @ Pattern::Contains(_) => g.loose.push((id, hir(p, ci)?)),
            p @ Pattern::Regex(_) => {
                let hir = hir(p, ci)?;
                let prefixes = regex_syntax::hir::literal::Extractor::new().extract(&hir);
                if prefixes.min_literal_len().is_some_and(|n| n > 0) {
                    g.anchored.push((id, hir));
                } else {
                    g.loose.push((id, hir));
                }
            }
        }
    }
    stats.patterns = anchored.len();
    let mut indexes = Vec::with_capacity(subjects.len());
    for (subject, g) in subjects.into_iter().zip(groups) {
        stats.exact_literals += g.exact.len() + g.suffix.len();
        indexes.push(Index {
            subject,
            exact: Literals::new(g.exact),
            suffix: Literals::new(g.suffix),
            anchored: Automata::build(&g.anchored, budget, &mut stats)?,
            loose: Automata::build(&g.loose, budget, &mut stats)?,
        });
    }
    Ok((
        indexes.into_boxed_slice(),
        anchored.into_iter().map(Vec::into_boxed_slice).collect(),
        unanchored.into_boxed_slice(),
        stats,
    ))
}

/// One attribute's anchor patterns, sorted by how they are indexed.
#[derive(Default)]
struct Groups {
    exact: Vec<Literal>,
    suffix: Vec<Literal>,
    anchored: Vec<(u32, Hir)>,
    loose: Vec<(u32, Hir)>,
}

impl Literals {
    fn new(literals: Vec<Literal>) -> Literals {
        let mut lengths: Vec<usize> = literals.iter().map(|(l, _, _)| l.len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let mut table: HashMap<u64, Vec<Literal>> = HashMap::new();
        for (lit, ci, id) in literals {
            table
                .entry(lower_hash(&lit))
                .or_default()
                .push((lit, ci, id));
        }
        Literals {
            table: table
                .into_iter()
                .map(|(h, v)| (h, v.into_boxed_slice()))
                .collect(),
            lengths: lengths.into_boxed_slice(),
        }
    }

    /// Calls `found` for each literal equal to `value`.
    #[inline]
    fn find(&self, value: &[u8], found: &mut impl FnMut(u32)) {
        let Some(entries) = self.table.get(&lower_hash(value)) else {
            return;
        };
        for (lit, ci, id) in &**entries {
            let hit = if *ci {
                value.len() == lit.len() && eq_lower(value, lit)
            } else {
                value == &**lit
            };
            if hit {
                found(*id);
            }
        }
    }

    /// Calls `found` for each literal that `value` ends with.
    #[inline]
    fn find_suffixes(&self, value: &[u8], found: &mut impl FnMut(u32)) {
        for &n in &*self.lengths {
            if n > value.len() {
                break;
            }
            self.find(&value[value.len() - n..], found);
        }
    }
}

/// A non-exact pattern as an unanchored [`Hir`]; literals compare bytes, ASCII letters in
/// either case when `ignore_case` (as the literal conditions do).
fn hir(pattern: Pattern, ignore_case: bool) -> Result<Hir, String> {
    let lit = |s: &str| {
        Hir::concat(
            s.bytes()
                .map(|b| {
                    if ignore_case && b.is_ascii_alphabetic() {
                        let (l, u) = (b.to_ascii_lowercase(), b.to_ascii_uppercase());
                        Hir::class(Class::Bytes(ClassBytes::new([
                            ClassBytesRange::new(l, l),
                            ClassBytesRange::new(u, u),
                        ])))
                    } else {
                        Hir::literal([b])
                    }
                })
                .collect(),
        )
    };
    let any = || {
        Hir::repetition(Repetition {
            min: 0,
            max: None,
            greedy: true,
            sub: Box::new(Hir::class(Class::Bytes(ClassBytes::new([
                ClassBytesRange::new(0, 255),
            ])))),
        })
    };
    Ok(match pattern {
        Pattern::Exact(s) => lit(&s),
        Pattern::Prefix(s) => Hir::concat(vec![lit(&s), any()]),
        Pattern::Suffix(s) => Hir::concat(vec![any(), lit(&s)]),
        Pattern::Contains(s) => Hir::concat(vec![any(), lit(&s), any()]),
        Pattern::Regex(p) => crate::re2::parse(&p, ignore_case)?.hir,
    })
}

impl Index {
    #[inline]
    fn for_each_match(&self, value: &[u8], mut found: impl FnMut(u32)) {
        if !self.exact.table.is_empty() {
            self.exact.find(value, &mut found);
        }
        self.suffix.find_suffixes(value, &mut found);
        self.anchored.for_each_match(value, &mut found);
        self.loose.for_each_match(value, &mut found);
    }
}

/// FNV-1a of the ASCII-lower-cased bytes: equal for values that differ only in ASCII case, so
/// one lookup finds both the case-sensitive and the case-insensitive literals.
#[inline]
fn lower_hash(value: &[u8]) -> u64 {
    value.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A hasher for keys that are already hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed with this; fold anything else in anyway.
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl CompiledRule {
    #[inline]
    fn holds(&self, req: &impl Request) -> bool {
        self.conditions.iter().all(|cond| cond.holds(req))
    }
}

impl Subject {
    #[inline]
    fn value<'r>(&self, req: &'r impl Request) -> Option<&'r [u8]> {
        match self {
            Subject::Path => Some(req.path()),
            Subject::Authority => Some(req.authority()),
            Subject::Method => Some(req.method()),
            Subject::Scheme => Some(req.scheme()),
            Subject::Header(name) => req.header(name),
            Subject::Query(name) => req.query(name),
        }
    }
}

fn subject(attr: Attr) -> Result<Subject, String> {
    Ok(match attr {
        Attr::Path => Subject::Path,
        Attr::Authority => Subject::Authority,
        Attr::Method => Subject::Method,
        Attr::Scheme => Subject::Scheme,
        Attr::Header(name) if name.is_empty() => return Err("empty header name".into()),
        Attr::Header(name) => Subject::Header(name.to_ascii_lowercase().into()),
        Attr::Query(name) if name.is_empty() => return Err("empty query parameter name".into()),
        Attr::Query(name) => Subject::Query(name.into()),
    })
}

fn compile_condition(condition: Condition) -> Result<CompiledCondition, String> {
    let attr = subject(condition.attr)?;
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

/// Compiles `pattern` for a full match (Envoy's `safe_regex`, RE2 `FullMatch`), with RE2's
/// ASCII Perl classes ([`crate::re2`]).
fn compile_regex(pattern: &str, ignore_case: bool) -> Result<Regex, String> {
    // Parsed on its own first, so that a pattern like `a)|(b` cannot escape the anchoring
    // group below, and so that syntax errors point into the pattern as the user wrote it.
    let parsed = crate::re2::parse(pattern, ignore_case)?;
    RegexBuilder::new(&format!("^(?:{})$", parsed.text))
        .case_insensitive(ignore_case)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regex {pattern:?} does not compile: {e}"))
}

pub(crate) fn check_regex(pattern: &str) -> Result<(), String> {
    compile_regex(pattern, false).map(drop)
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
        let value = self.attr.value(req);
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

/// Naive substring search, for conditions other than a rule's anchor; values and needles are
/// short (headers, paths).
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
