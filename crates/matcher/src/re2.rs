//! Regex patterns as Envoy reads them (RE2): the Perl classes `\d`, `\s`, `\w` and the word
//! boundaries `\b`, `\B` are ASCII-only, while `.`, bracketed and `\p{..}` classes and `(?i)`
//! stay Unicode-aware. The regex crates make the Perl classes Unicode by default, which both
//! changes what a route matches and multiplies automaton sizes (`\w` alone is thousands of
//! UTF-8 states), so patterns are parsed once here, rewritten to RE2's meaning, and handed on
//! as a [`Hir`] (for the table's automata) and as text (for a single-pattern regex).

use regex_syntax::ast::{
    self, Ast, ClassBracketed, ClassPerl, ClassPerlKind, ClassSet, ClassSetItem, ClassSetRange,
    ClassSetUnion, Flag, Flags, FlagsItem, FlagsItemKind, GroupKind, HexLiteralKind, Literal,
    LiteralKind,
};
use regex_syntax::hir::Hir;

/// A pattern parsed and rewritten to RE2's meaning.
pub(crate) struct Parsed {
    /// Matches what the pattern matches; not anchored.
    pub hir: Hir,
    /// The rewritten pattern as text, for `regex::bytes` (without the case-insensitive flag,
    /// which the caller passes on).
    pub text: String,
}

/// Parses `pattern` (RE2 syntax, bytes mode: it may match bytes that are not UTF-8).
pub(crate) fn parse(pattern: &str, ignore_case: bool) -> Result<Parsed, String> {
    let bad = |e: &dyn std::fmt::Display| format!("regex {pattern:?} does not compile: {e}");
    let mut ast = ast::parse::Parser::new()
        .parse(pattern)
        .map_err(|e| bad(&e))?;
    rewrite(&mut ast);
    let mut text = String::with_capacity(pattern.len() + 16);
    ast::print::Printer::new()
        .print(&ast, &mut text)
        .map_err(|e| bad(&e))?;
    let hir = regex_syntax::hir::translate::TranslatorBuilder::new()
        .utf8(false)
        .case_insensitive(ignore_case)
        .build()
        .translate(&text, &ast)
        .map_err(|e| bad(&e))?;
    Ok(Parsed { hir, text })
}

/// Replaces each Perl class by its ASCII bracketed equivalent and makes word boundaries ASCII.
/// (In place: `Ast` has its own `Drop`, so it cannot be taken apart by value.)
fn rewrite(ast: &mut Ast) {
    let replacement = match ast {
        Ast::ClassPerl(c) => Ast::class_bracketed(ClassBracketed {
            span: c.span,
            negated: c.negated,
            kind: ClassSet::Item(ClassSetItem::Union(ascii(c))),
        }),
        Ast::ClassBracketed(c) => {
            rewrite_set(&mut c.kind);
            return;
        }
        Ast::Assertion(a) => match a.kind {
            ast::AssertionKind::StartLine
            | ast::AssertionKind::EndLine
            | ast::AssertionKind::StartText
            | ast::AssertionKind::EndText => return,
            // Any word boundary: the same assertion inside `(?-u:...)`.
            _ => {
                let span = a.span;
                Ast::group(ast::Group {
                    span,
                    kind: GroupKind::NonCapturing(Flags {
                        span,
                        items: vec![
                            FlagsItem {
                                span,
                                kind: FlagsItemKind::Negation,
                            },
                            FlagsItem {
                                span,
                                kind: FlagsItemKind::Flag(Flag::Unicode),
                            },
                        ],
                    }),
                    ast: Box::new(Ast::Assertion(a.clone())),
                })
            }
        },
        Ast::Repetition(r) => {
            rewrite(&mut r.ast);
            return;
        }
        Ast::Group(g) => {
            rewrite(&mut g.ast);
            return;
        }
        Ast::Alternation(a) => {
            a.asts.iter_mut().for_each(rewrite);
            return;
        }
        Ast::Concat(c) => {
            c.asts.iter_mut().for_each(rewrite);
            return;
        }
        _ => return,
    };
    *ast = replacement;
}

fn rewrite_set(set: &mut ClassSet) {
    match set {
        ClassSet::Item(item) => rewrite_item(item),
        ClassSet::BinaryOp(op) => {
            rewrite_set(&mut op.lhs);
            rewrite_set(&mut op.rhs);
        }
    }
}

fn rewrite_item(item: &mut ClassSetItem) {
    let replacement = match item {
        ClassSetItem::Perl(c) if c.negated => ClassSetItem::Bracketed(Box::new(ClassBracketed {
            span: c.span,
            negated: true,
            kind: ClassSet::Item(ClassSetItem::Union(ascii(c))),
        })),
        ClassSetItem::Perl(c) => ClassSetItem::Union(ascii(c)),
        ClassSetItem::Bracketed(b) => {
            rewrite_set(&mut b.kind);
            return;
        }
        ClassSetItem::Union(u) => {
            u.items.iter_mut().for_each(rewrite_item);
            return;
        }
        _ => return,
    };
    *item = replacement;
}

/// RE2's members of a Perl class, not negated: `\d` `[0-9]`, `\s` `[\t\n\f\r ]`,
/// `\w` `[0-9A-Za-z_]`. Written with hex escapes so that `(?x)` cannot drop the spaces.
fn ascii(c: &ClassPerl) -> ClassSetUnion {
    let span = c.span;
    let lit = |ch: char| Literal {
        span,
        kind: LiteralKind::HexFixed(HexLiteralKind::X),
        c: ch,
    };
    let range = |a: char, b: char| {
        ClassSetItem::Range(ClassSetRange {
            span,
            start: lit(a),
            end: lit(b),
        })
    };
    let items = match c.kind {
        ClassPerlKind::Digit => vec![range('0', '9')],
        ClassPerlKind::Space => ['\t', '\n', '\x0c', '\r', ' ']
            .into_iter()
            .map(|ch| ClassSetItem::Literal(lit(ch)))
            .collect(),
        ClassPerlKind::Word => vec![
            range('0', '9'),
            range('A', 'Z'),
            range('a', 'z'),
            ClassSetItem::Literal(lit('_')),
        ],
    };
    ClassSetUnion { span, items }
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn text(p: &str) -> String {
        parse(p, false).unwrap().text
    }

    #[test]
    fn perl_classes_become_ascii() {
        assert_eq!(text(r"\d+"), r"[\x30-\x39]+");
        assert_eq!(text(r"\W"), r"[^\x30-\x39\x41-\x5A\x61-\x7A\x5F]");
        assert_eq!(text(r"[\s.]"), r"[\x09\x0A\x0C\x0D\x20.]");
        assert_eq!(text(r"[\D]"), r"[[^\x30-\x39]]");
        assert_eq!(text(r"a\bb"), r"a(?-u:\b)b");
    }

    #[test]
    fn errors_name_the_pattern() {
        let e = parse("a)|(b", false).err().unwrap();
        assert!(e.starts_with("regex \"a)|(b\" does not compile"), "{e}");
    }
}
