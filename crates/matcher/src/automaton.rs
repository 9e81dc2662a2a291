//! Many patterns over one value in one pass: each pattern is a full match (anchored at both
//! ends), all of them go into one multi-pattern DFA (`regex-automata`) that walks the value
//! once and reports, at its end, every pattern that matched.
//!
//! The DFA is built dense by `regex-automata`, then repacked ([`Comb`]): only the transitions
//! that do not lead to the dead state are kept, interleaved in one array (the classic
//! "comb" table compression), a state's many transitions to one next state (a `\d` or
//! `[a-z]` step) folded into a default, and states laid out depth first so that one value's
//! walk reads neighbouring slots. A thousand regex routes take about 100 KiB, stay in the
//! CPU's caches and cost one dependent load per byte of the value.
//!
//! Budgets: a dense DFA is built within [`Budget::dfa_bytes`]. When the patterns do not fit,
//! the set is split in halves (each half its own DFA, each walked in turn; most die within a
//! few bytes), and a set that still does not fit at [`MIN_SPLIT`] patterns becomes a lazy DFA
//! whose per-thread cache is capped at [`Budget::lazy_cache_bytes`]. The default caches of the
//! regex crates thrash at about a thousand patterns; these never grow past their budget, and
//! [`Stats`] reports which shape a table took.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::hybrid;
use regex_automata::nfa::thompson::{self, WhichCaptures, NFA};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use regex_syntax::hir::{Hir, Look};
use thread_local::ThreadLocal;

use crate::{Budget, Stats};

/// Below this many patterns a set that does not fit its budget is not split further.
pub(crate) const MIN_SPLIT: usize = 32;

/// One or more automata over the same value; pattern numbers are the caller's.
#[derive(Debug)]
pub(crate) struct Automata {
    parts: Box<[Part]>,
}

#[derive(Debug)]
struct Part {
    /// The caller's number for each of this part's patterns.
    ids: Box<[u32]>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Dense(Box<Comb>),
    Lazy(Box<Lazy>),
}

#[derive(Debug)]
struct Lazy {
    dfa: hybrid::dfa::DFA,
    caches: ThreadLocal<RefCell<hybrid::dfa::Cache>>,
    /// Times a thread's cache was cleared because it was full (summed over threads).
    clears: AtomicU64,
}

impl Automata {
    /// Builds automata for `patterns` (the caller's number, an unanchored pattern), in order.
    pub(crate) fn build(
        patterns: &[(u32, Hir)],
        budget: &Budget,
        stats: &mut Stats,
    ) -> Result<Automata, String> {
        let mut parts = Vec::new();
        build_parts(patterns, budget, stats, &mut parts)?;
        Ok(Automata {
            parts: parts.into_boxed_slice(),
        })
    }

    /// Calls `found` with the number of each pattern that matches all of `value`.
    #[inline]
    pub(crate) fn for_each_match(&self, value: &[u8], found: &mut impl FnMut(u32)) {
        for part in &*self.parts {
            part.for_each_match(value, found);
        }
    }

    /// Lazy-DFA cache clears so far (a sign that its budget is too small for the traffic).
    pub(crate) fn cache_clears(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| match &p.kind {
                Kind::Lazy(lazy) => lazy.clears.load(Ordering::Relaxed),
                Kind::Dense { .. } => 0,
            })
            .sum()
    }
}

fn build_parts(
    patterns: &[(u32, Hir)],
    budget: &Budget,
    stats: &mut Stats,
    out: &mut Vec<Part>,
) -> Result<(), String> {
    if patterns.is_empty() {
        return Ok(());
    }
    let nfa = nfa(patterns)?;
    let ids: Box<[u32]> = patterns.iter().map(|(id, _)| *id).collect();
    match dense(&nfa, budget.dfa_bytes) {
        Ok(comb) => {
            stats.dense_dfas += 1;
            stats.dfa_bytes += comb.memory_usage();
            out.push(Part {
                ids,
                kind: Kind::Dense(Box::new(comb)),
            });
            Ok(())
        }
        Err(_) if patterns.len() > MIN_SPLIT => {
            stats.splits += 1;
            let (a, b) = patterns.split_at(patterns.len() / 2);
            build_parts(a, budget, stats, out)?;
            build_parts(b, budget, stats, out)
        }
        Err(_) => {
            let dfa = hybrid::dfa::Builder::new()
                .configure(
                    hybrid::dfa::Config::new()
                        .match_kind(MatchKind::All)
                        .starts_for_each_pattern(false)
                        .cache_capacity(budget.lazy_cache_bytes),
                )
                .build_from_nfa(nfa)
                .map_err(|e| format!("the rule table does not fit its lazy DFA budget: {e}"))?;
            stats.lazy_dfas += 1;
            stats.dfa_bytes += dfa.memory_usage();
            stats.lazy_cache_bytes += budget.lazy_cache_bytes;
            out.push(Part {
                ids,
                kind: Kind::Lazy(Box::new(Lazy {
                    dfa,
                    caches: ThreadLocal::new(),
                    clears: AtomicU64::new(0),
                })),
            });
            Ok(())
        }
    }
}

/// One NFA for all `patterns`, each anchored at both ends (a full match of the value).
fn nfa(patterns: &[(u32, Hir)]) -> Result<NFA, String> {
    let anchored: Vec<Hir> = patterns
        .iter()
        .map(|(_, hir)| {
            Hir::concat(vec![
                Hir::look(Look::Start),
                hir.clone(),
                Hir::look(Look::End),
            ])
        })
        .collect();
    thompson::Compiler::new()
        .configure(
            thompson::Config::new()
                .utf8(false)
                .which_captures(WhichCaptures::None)
                .nfa_size_limit(None),
        )
        .build_many_from_hir(&anchored)
        .map_err(|e| format!("the rule table's patterns do not compile together: {e}"))
}

fn dense(nfa: &NFA, limit: usize) -> Result<Comb, String> {
    let dfa = dense::Builder::new()
        .configure(
            dense::Config::new()
                .match_kind(MatchKind::All)
                .start_kind(StartKind::Anchored)
                .starts_for_each_pattern(false)
                .byte_classes(true)
                .accelerate(false)
                .minimize(false)
                .dfa_size_limit(Some(limit))
                .determinize_size_limit(Some(limit)),
        )
        .build_from_nfa(nfa)
        .map_err(|e| e.to_string())?;
    let start = dfa
        .start_state(&start::Config::new().anchored(Anchored::Yes))
        .map_err(|e| e.to_string())?;
    Comb::new(&dfa, start)
}

/// A DFA's live transitions packed into one array. State `s` is an offset into `slots`; its
/// transition on byte class `c` is in `slots[s + c]` if that slot is tagged with class `c` (a
/// slot tagged `c` at `s + c` can only belong to the state at offset `s`), and leads to the
/// dead state otherwise. Class `eoi` (one past the byte classes) holds, for states where the
/// value may end in a match, the index of their pattern list; classes `eoi + 1` and `eoi + 2`
/// a state's default, if it has one ([`defaults`]). A slot is the next state's offset shifted
/// left by [`NEXT_SHIFT`], then a bit telling whether that state has a default
/// ([`DEFAULT_BIT`]), then the class.
#[derive(Debug)]
struct Comb {
    classes: [u8; 256],
    /// The end-of-value pseudo-class.
    eoi: usize,
    start: usize,
    /// Whether the start state has a default (see [`defaults`]).
    start_default: bool,
    slots: Box<[u32]>,
    /// Class sets of the states' defaults, as bitmaps (class `c` is bit `c % 64` of word
    /// `c / 64`).
    sets: Box<[[u64; 4]]>,
    /// Pattern lists (the DFA's own pattern numbers), for the end-of-value slots.
    matches: Box<[Box<[u32]>]>,
}

/// Candidate offsets tried for a state before it is placed past the end of the table.
const PACK_TRIES: usize = 1024;

/// Bits of a slot that hold its class: 256 byte classes and three pseudo-classes.
const CLASS_BITS: u32 = 9;
const CLASS_MASK: u32 = (1 << CLASS_BITS) - 1;
/// The bit of a slot that tells whether the next state has a default (see [`defaults`]).
const DEFAULT_BIT: u32 = 1 << CLASS_BITS;
/// Where a slot's next state (or pattern list, or class set) starts.
const NEXT_SHIFT: u32 = CLASS_BITS + 1;
/// A slot no state owns (no class has this tag).
const FREE: u32 = CLASS_MASK;

impl Comb {
    fn new(dfa: &dense::DFA<Vec<u32>>, start: StateID) -> Result<Comb, String> {
        let byte_classes = dfa.byte_classes();
        let mut classes = [0u8; 256];
        let mut representative = Vec::new();
        for b in 0..=255u8 {
            let c = byte_classes.get(b);
            classes[b as usize] = c;
            if usize::from(c) == representative.len() {
                representative.push(b);
            }
        }
        let eoi = representative.len();
        // Depth-first from the start state: a path's walk, past the states all lookups share,
        // then runs through states packed next to each other (see [`pack`]). State ids are
        // premultiplied by the stride: `id >> stride2` numbers them densely.
        let stride2 = dfa.stride2();
        let slot_of = |id: StateID| id.as_usize() >> stride2;
        let mut ids = Vec::new();
        let mut index: Vec<usize> = Vec::new();
        let mut seen = |id: StateID, ids: &mut Vec<StateID>| -> (usize, bool) {
            let k = slot_of(id);
            if index.len() <= k {
                index.resize(k + 1, usize::MAX);
            }
            let new = index[k] == usize::MAX;
            if new {
                index[k] = ids.len();
                ids.push(id);
            }
            (index[k], new)
        };
        seen(start, &mut ids);
        let mut edges: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
        // The order states are packed in, each with the state and class that first led to it.
        let mut order: Vec<(usize, Option<(usize, usize)>)> = Vec::new();
        let mut stack = vec![(0, None)];
        let mut matches: Vec<Box<[u32]>> = Vec::new();
        while let Some((k, parent)) = stack.pop() {
            order.push((k, parent));
            let s = ids[k];
            let mut out = Vec::new();
            let mut children = Vec::new();
            for (c, &b) in representative.iter().enumerate() {
                let t = dfa.next_state(s, b);
                if dfa.is_quit_state(t) {
                    return Err("the DFA gives up on some input".into());
                }
                if dfa.is_dead_state(t) {
                    continue;
                }
                let (next, new) = seen(t, &mut ids);
                if new {
                    edges.push(Vec::new());
                    children.push((next, Some((k, c))));
                }
                out.push((c, next));
            }
            let e = dfa.next_eoi_state(s);
            if dfa.is_match_state(e) {
                matches.push(
                    (0..dfa.match_len(e))
                        .map(|k| dfa.match_pattern(e, k).as_u32())
                        .collect(),
                );
                // The end-of-value "transition" leads to the pattern list.
                out.push((eoi, usize::MAX - (matches.len() - 1)));
            }
            edges[k] = out;
            // The lowest class first: pushed last.
            stack.extend(children.into_iter().rev());
        }
        let (sets, has_default) = defaults(&mut edges, eoi);
        let base = pack(&edges, &order, eoi);
        let too_big = || "the DFA is too large to pack".to_string();
        let len = base
            .iter()
            .filter(|&&b| b != usize::MAX)
            .max()
            .map_or(0, |b| b + eoi + 3);
        if len >= 1 << (32 - NEXT_SHIFT) {
            return Err(too_big());
        }
        let mut slots = vec![FREE; len];
        for (k, out) in edges.iter().enumerate() {
            for &(c, t) in out {
                let value = if c == eoi {
                    (usize::MAX - t) << NEXT_SHIFT
                } else if c == eoi + 2 {
                    t << NEXT_SHIFT
                } else {
                    (base[t] << NEXT_SHIFT) | (usize::from(has_default[t]) << CLASS_BITS)
                };
                let value = u32::try_from(value | c).map_err(|_| too_big())?;
                slots[base[k] + c] = value;
            }
        }
        // Trailing slots that no state owns are never read: a lookup past the end misses.
        while slots.last() == Some(&FREE) {
            slots.pop();
        }
        Ok(Comb {
            classes,
            eoi,
            // With no transitions from the start, there are no slots and nothing matches.
            start: if base[0] == usize::MAX { 0 } else { base[0] },
            start_default: has_default[0],
            slots: slots.into_boxed_slice(),
            sets: sets.into_boxed_slice(),
            matches: matches.into_boxed_slice(),
        })
    }

    fn memory_usage(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
            + self
                .matches
                .iter()
                .map(|m| std::mem::size_of_val(&**m) + std::mem::size_of::<Box<[u32]>>())
                .sum::<usize>()
    }

    /// The DFA's numbers of the patterns that match all of `value`.
    #[inline]
    fn matches(&self, value: &[u8]) -> &[u32] {
        let (mut s, mut default) = (self.start, self.start_default);
        let d = self.eoi + 1;
        for &b in value {
            let c = usize::from(self.classes[usize::from(b)]);
            if default {
                // A state with a default owns the two slots after its end-of-value one.
                if let (Some(&next), Some(&set)) =
                    (self.slots.get(s + d), self.slots.get(s + d + 1))
                {
                    let set = &self.sets[(set >> NEXT_SHIFT) as usize];
                    if set[c >> 6] >> (c & 63) & 1 != 0 {
                        s = (next >> NEXT_SHIFT) as usize;
                        default = next & DEFAULT_BIT != 0;
                        continue;
                    }
                }
            }
            match self.slots.get(s + c) {
                Some(&slot) if slot & CLASS_MASK == c as u32 => {
                    s = (slot >> NEXT_SHIFT) as usize;
                    default = slot & DEFAULT_BIT != 0;
                }
                _ => return &[],
            }
        }
        match self.slots.get(s + self.eoi) {
            Some(&slot) if slot & CLASS_MASK == self.eoi as u32 => {
                &self.matches[(slot >> NEXT_SHIFT) as usize]
            }
            _ => &[],
        }
    }
}

/// A state needs this many transitions to one state for them to become its default.
const MIN_DEFAULT: usize = 3;

/// Drops transitions into states that have none (dead in all but name), then gives each state
/// whose transitions mostly lead to one state a default: those transitions leave the comb,
/// replaced by two pseudo-classes past the end-of-value one, `eoi + 1` (the target) and
/// `eoi + 2` (the number of the set of classes that lead there). Class sets repeat (`\d`,
/// `[a-z]`, `\w` in every route), so there are few; a state of `[0-9a-f]{8}` then takes two
/// slots instead of sixteen, and the comb stays small enough for the caches. Returns the sets
/// and which states have a default.
fn defaults(edges: &mut [Vec<(usize, usize)>], eoi: usize) -> (Vec<[u64; 4]>, Vec<bool>) {
    let mut empty: Vec<bool> = edges.iter().map(Vec::is_empty).collect();
    loop {
        let mut changed = false;
        for (k, out) in edges.iter_mut().enumerate() {
            out.retain(|&(c, t)| c == eoi || !empty[t]);
            if out.is_empty() && !empty[k] {
                empty[k] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut sets: Vec<[u64; 4]> = Vec::new();
    let mut ids: HashMap<[u64; 4], usize> = HashMap::new();
    let mut has_default = vec![false; edges.len()];
    let mut targets = Vec::new();
    for (k, out) in edges.iter_mut().enumerate() {
        targets.clear();
        targets.extend(out.iter().filter(|&&(c, _)| c < eoi).map(|&(_, t)| t));
        targets.sort_unstable();
        let Some((t, n)) = targets
            .chunk_by(|a, b| a == b)
            .map(|run| (run[0], run.len()))
            .max_by_key(|&(_, n)| n)
        else {
            continue;
        };
        if n < MIN_DEFAULT {
            continue;
        }
        let mut set = [0u64; 4];
        out.retain(|&(c, u)| {
            let to_default = c < eoi && u == t;
            if to_default {
                set[c >> 6] |= 1 << (c & 63);
            }
            !to_default
        });
        let id = *ids.entry(set).or_insert_with(|| {
            sets.push(set);
            sets.len() - 1
        });
        out.push((eoi + 1, t));
        out.push((eoi + 2, id));
        has_default[k] = true;
    }
    (sets, has_default)
}

/// Picks each state's offset: one where all its classes' slots are free and that no other
/// state has (a slot's class tag names its owner only because offsets are unique). States come
/// in depth-first order; each is first tried just past the slot that leads to it, so that a
/// walk past the shared states reads neighbouring slots (a cache line holds sixteen) instead of
/// one line per byte. A state that does not fit there fills the first hole that takes it, found
/// by jumping over used slots; one that fits nowhere within [`PACK_TRIES`] candidates goes past
/// the end, so packing stays linear in the transitions.
fn pack(
    edges: &[Vec<(usize, usize)>],
    order: &[(usize, Option<(usize, usize)>)],
    eoi: usize,
) -> Vec<usize> {
    let mut used: Vec<bool> = Vec::new();
    let mut taken: Vec<bool> = Vec::new();
    // `skip[i]`: a slot at or after `i` that may be free (path-compressed pointers).
    let mut skip: Vec<usize> = Vec::new();
    fn free_from(used: &[bool], skip: &mut [usize], mut i: usize) -> usize {
        let start = i;
        while i < used.len() && used[i] {
            i = skip[i].max(i + 1);
        }
        // Compress: everything from `start` on the way is used up to `i`.
        let mut j = start;
        while j < i && j < skip.len() {
            let next = skip[j].max(j + 1);
            skip[j] = i;
            j = next;
        }
        i
    }
    let fits = |used: &[bool], taken: &[bool], out: &[(usize, usize)], b: usize| {
        !taken.get(b).copied().unwrap_or(false)
            && out
                .iter()
                .all(|&(c, _)| !used.get(b + c).copied().unwrap_or(false))
    };
    let mut base = vec![usize::MAX; edges.len()];
    for &(k, parent) in order {
        let out = &edges[k];
        // A state without transitions (and no match at the end) is never entered.
        let Some(&(first, _)) = out.first() else {
            continue;
        };
        // Next to the slot that leads here, if that is free.
        let near = parent.and_then(|(p, c)| {
            let b = base[p].checked_add(c + 1)?.checked_sub(first)?;
            fits(&used, &taken, out, b).then_some(b)
        });
        let b = near.unwrap_or_else(|| {
            let mut pos = free_from(&used, &mut skip, first);
            let mut tries = 0;
            loop {
                let b = pos - first;
                if tries == PACK_TRIES {
                    break used.len().max(first) - first;
                }
                if fits(&used, &taken, out, b) {
                    break b;
                }
                tries += 1;
                pos = free_from(&used, &mut skip, pos + 1);
            }
        });
        let end = b + eoi + 3;
        if used.len() < end {
            let old = used.len();
            used.resize(end, false);
            taken.resize(end, false);
            skip.extend(old..end);
        }
        for &(c, _) in out {
            used[b + c] = true;
        }
        taken[b] = true;
        base[k] = b;
    }
    base
}

impl Part {
    #[inline]
    fn for_each_match(&self, value: &[u8], found: &mut impl FnMut(u32)) {
        match &self.kind {
            Kind::Dense(comb) => {
                for &p in comb.matches(value) {
                    found(self.ids[p as usize]);
                }
            }
            Kind::Lazy(lazy) => {
                let Lazy {
                    dfa,
                    caches,
                    clears,
                } = &**lazy;
                let cell = caches.get_or(|| RefCell::new(dfa.create_cache()));
                let mut cache = cell.borrow_mut();
                let before = cache.clear_count();
                // Without `minimum_cache_clear_count` the lazy DFA never gives up: a full cache
                // is cleared and the search goes on, so these calls do not fail.
                let Ok(mut sid) =
                    dfa.start_state(&mut cache, &start::Config::new().anchored(Anchored::Yes))
                else {
                    return;
                };
                for &b in value {
                    let Ok(next) = dfa.next_state(&mut cache, sid, b) else {
                        return;
                    };
                    sid = next;
                    if sid.is_dead() {
                        return;
                    }
                }
                let Ok(eoi) = dfa.next_eoi_state(&mut cache, sid) else {
                    return;
                };
                if eoi.is_match() {
                    for i in 0..dfa.match_len(&cache, eoi) {
                        found(self.ids[dfa.match_pattern(&cache, eoi, i).as_usize()]);
                    }
                }
                let cleared = cache.clear_count() - before;
                if cleared > 0 {
                    clears.fetch_add(cleared as u64, Ordering::Relaxed);
                }
            }
        }
    }
}
