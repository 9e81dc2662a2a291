//! Diagnostics: every problem found while loading and validating config, each with the file,
//! line, column and field path it concerns, so `hypha check` can list them all at once.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::yaml::Pos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    /// Something skipped on purpose (another Kubernetes kind in the same file).
    Info,
}

/// One problem (or note) about one place in the config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable, short name of the kind of problem (`invalid-regex`, `weights-sum`, ...).
    pub code: &'static str,
    pub file: Arc<str>,
    pub line: usize,
    pub column: usize,
    /// `Kind namespace/name`, when the problem belongs to a resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Field path inside the document, e.g. `spec.http[2].route[0].weight`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        if self.line == 0 {
            // No position: a whole file, or an object that did not come from YAML text.
            write!(f, "{}: {sev}[{}]", self.file, self.code)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {sev}[{}]",
                self.file, self.line, self.column, self.code
            )?;
        }
        if let Some(r) = &self.resource {
            write!(f, " {r}")?;
        }
        if !self.path.is_empty() {
            write!(f, " {}:", self.path)?;
        }
        write!(f, " {}", self.message)
    }
}

/// Where a resource came from: its file, its document, and the positions inside it.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: Arc<str>,
    pub doc: Arc<crate::yaml::Document>,
    /// `Kind namespace/name` of the resource.
    pub resource: String,
    /// Made by a source from objects that are not Istio config and that the Kubernetes API
    /// server validated already (Services, Pods): indexed for cross-references (hosts,
    /// ports), never checked as if a user had written it.
    pub derived: bool,
}

impl Source {
    pub fn pos(&self, path: &str) -> Pos {
        self.doc.position(path)
    }
}

/// Collects diagnostics; never stops at the first.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostic {
    /// A file that cannot be read: an error on the file as a whole.
    pub fn io(file: Arc<str>, message: String) -> Diagnostic {
        Diagnostic::file_error("io", file, 0, 0, message)
    }

    /// A file that is not YAML: an error at the parser's position, before any resource.
    pub fn yaml_syntax(file: Arc<str>, e: crate::yaml::SyntaxError) -> Diagnostic {
        Diagnostic::file_error("yaml-syntax", file, e.pos.line, e.pos.column, e.message)
    }

    fn file_error(
        code: &'static str,
        file: Arc<str>,
        line: usize,
        column: usize,
        message: String,
    ) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            file,
            line,
            column,
            resource: None,
            path: String::new(),
            message,
        }
    }
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }

    /// Records a problem at `path` of the resource described by `src`.
    pub fn at(
        &mut self,
        severity: Severity,
        code: &'static str,
        src: &Source,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        let path = path.into();
        let pos = src.pos(&path);
        self.items.push(Diagnostic {
            severity,
            code,
            file: src.file.clone(),
            line: pos.line,
            column: pos.column,
            resource: Some(src.resource.clone()),
            path,
            message: message.into(),
        });
    }

    pub fn error(
        &mut self,
        code: &'static str,
        src: &Source,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.at(Severity::Error, code, src, path, message);
    }

    pub fn warning(
        &mut self,
        code: &'static str,
        src: &Source,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.at(Severity::Warning, code, src, path, message);
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sorted by file, line and column, the order a person reads them in.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by(|a, b| {
            (&a.file, a.line, a.column, a.severity).cmp(&(&b.file, b.line, b.column, b.severity))
        });
        self.items
    }
}
