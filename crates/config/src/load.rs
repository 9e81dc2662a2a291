//! Parse step: walks a directory tree of YAML files, splits documents, dispatches on
//! `apiVersion`/`kind`, and deserializes each resource strictly (unknown fields are errors).
//! Other Kubernetes kinds are skipped with an informational note, Istio kinds Hypha does not
//! implement yet with a warning, and a misspelt kind in an Istio group is an error.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::diag::{Diagnostic, Diagnostics, Severity, Source};
use crate::types::ObjectMeta;
use crate::yaml::{self, Document};
use crate::{validate, Config, Resource};

/// The result of loading: whatever parsed, and every problem found while parsing and validating.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub config: Config,
    pub diagnostics: Diagnostics,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.has_errors()
    }

    /// The config if it has no errors, else every diagnostic.
    pub fn into_result(self) -> Result<(Config, Diagnostics), Diagnostics> {
        if self.diagnostics.has_errors() {
            Err(self.diagnostics)
        } else {
            Ok((self.config, self.diagnostics))
        }
    }
}

/// Loads and validates every `*.yaml` / `*.yml` file under `path` (a directory, walked
/// recursively in name order, or a single file).
pub fn load(path: &Path) -> Loaded {
    load_cached(path, &mut LoadCache::default())
}

/// Parsed files kept between loads of the same path, so that a reload parses again only the
/// files that changed (by size, modification time and inode); validation always sees the
/// whole config.
#[derive(Default)]
pub struct LoadCache {
    files: HashMap<PathBuf, CachedFile>,
}

struct CachedFile {
    stamp: (u64, Option<SystemTime>, u64),
    parsed: Loader,
}

/// [`load`], reusing what `cache` holds for files that did not change since it was filled.
pub fn load_cached(path: &Path, cache: &mut LoadCache) -> Loaded {
    let mut parsed = parse_cached(path, cache);
    validate(&parsed.config, &mut parsed.diagnostics);
    parsed
}

/// [`load_cached`] without the validation: for a caller that validates the files together
/// with config from elsewhere (a cluster), where a file may refer to what only that has.
pub fn parse_cached(path: &Path, cache: &mut LoadCache) -> Loaded {
    let mut files = Vec::new();
    let mut diags = Diagnostics::default();
    if let Err(e) = collect_files(path, &mut files) {
        diags.push(file_diag(path, format!("cannot read: {e}")));
    }
    files.sort();
    let mut loader = Loader::default();
    let mut seen = HashSet::new();
    for file in &files {
        let stamp = match std::fs::metadata(file) {
            Ok(m) => (
                m.len(),
                m.modified().ok(),
                std::os::unix::fs::MetadataExt::ino(&m),
            ),
            Err(e) => {
                loader
                    .diags
                    .push(file_diag(file, format!("cannot read: {e}")));
                continue;
            }
        };
        seen.insert(file.clone());
        if let Some(hit) = cache.files.get(file).filter(|c| c.stamp == stamp) {
            loader.absorb(&hit.parsed);
            continue;
        }
        let mut parsed = Loader::default();
        match std::fs::read_to_string(file) {
            Ok(src) => parsed.add(&file.display().to_string(), &src),
            Err(e) => {
                loader
                    .diags
                    .push(file_diag(file, format!("cannot read: {e}")));
                continue;
            }
        }
        loader.absorb(&parsed);
        cache
            .files
            .insert(file.clone(), CachedFile { stamp, parsed });
    }
    cache.files.retain(|f, _| seen.contains(f));
    loader.diags.extend(diags);
    Loaded {
        config: loader.config,
        diagnostics: loader.diags,
    }
}

/// Loads and validates YAML held in memory; `name` stands for the file in diagnostics.
/// The kinds Hypha reads.
const KINDS_READ: [&str; 7] = [
    "ServiceEntry",
    "WorkloadEntry",
    "VirtualService",
    "DestinationRule",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "MeshConfig",
];

/// Istio's kinds (as of 1.28) that Hypha does not implement yet, by group.
const ISTIO_KINDS_NOT_READ: [(&str, &str); 8] = [
    ("networking.istio.io", "Gateway"),
    ("networking.istio.io", "Sidecar"),
    ("networking.istio.io", "EnvoyFilter"),
    ("networking.istio.io", "WorkloadGroup"),
    ("networking.istio.io", "ProxyConfig"),
    ("telemetry.istio.io", "Telemetry"),
    ("extensions.istio.io", "WasmPlugin"),
    ("security.istio.io", "RequestAuthentication"),
];

fn istio_group(kind: &str) -> &'static str {
    match kind {
        "AuthorizationPolicy" | "PeerAuthentication" => "security.istio.io",
        _ => "networking.istio.io",
    }
}

/// The kind Hypha reads (or Istio has) nearest to `kind`: the same ignoring case, or at most
/// two edits away.
fn nearest_kind(kind: &str) -> Option<&'static str> {
    let all = KINDS_READ
        .iter()
        .copied()
        .chain(ISTIO_KINDS_NOT_READ.iter().map(|(_, k)| *k));
    all.map(|k| {
        (
            edit_distance(&kind.to_ascii_lowercase(), &k.to_ascii_lowercase()),
            k,
        )
    })
    .filter(|(d, _)| *d <= 2)
    .min_by_key(|(d, _)| *d)
    .map(|(_, k)| k)
}

/// Levenshtein distance between two short ASCII strings.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<u8> = b.bytes().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

pub fn load_str(name: &str, src: &str) -> Loaded {
    load_sources([(name, src)])
}

/// Loads and validates several in-memory files, `(name, contents)`, as one config.
pub fn load_sources<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Loaded {
    let mut loader = Loader::default();
    for (name, src) in files {
        loader.add(name, src);
    }
    loader.finish()
}

/// Parses objects read from a Kubernetes API server, each `(origin, object)` with `origin`
/// naming it in diagnostics. Not validated: the caller merges them with the rest of its config
/// and runs [`validate()`] on the whole.
pub fn parse_objects(objects: impl IntoIterator<Item = (Arc<str>, Value)>) -> Loaded {
    let mut loader = Loader::default();
    for (origin, object) in objects {
        loader.add_document(&origin, Arc::new(yaml::Document::unpositioned(object)));
    }
    Loaded {
        config: loader.config,
        diagnostics: loader.diags,
    }
}

fn file_diag(path: &Path, message: String) -> Diagnostic {
    Diagnostic::io(path.display().to_string().into(), message)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') {
            continue; // editor swap files, `..data` symlinks of ConfigMaps
        }
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(p);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Loader {
    config: Config,
    diags: Diagnostics,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope<T> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: T,
    /// Written by Kubernetes; ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<Value>,
}

enum Kind {
    ServiceEntry,
    WorkloadEntry,
    VirtualService,
    DestinationRule,
    AuthorizationPolicy,
    PeerAuthentication,
    MeshConfig,
}

impl Loader {
    fn add(&mut self, file: &str, src: &str) {
        let file: Arc<str> = file.into();
        let docs = match yaml::parse_documents(src) {
            Ok(d) => d,
            Err(e) => {
                self.diags.push(Diagnostic::yaml_syntax(file, e));
                return;
            }
        };
        for doc in docs {
            self.add_document(&file, Arc::new(doc));
        }
    }

    /// A kind Hypha does not read: an Istio kind it does not implement yet is a warning (what it
    /// configures does not happen); a near miss of a kind in an Istio group, an error naming
    /// the kind meant; a kind Hypha reads under another group, a note naming the right one; any
    /// other kind, a note.
    fn skipped_kind(&mut self, source: &Source, group: &str, api_version: &str, kind_name: &str) {
        let istio = group.ends_with(".istio.io") && group != "install.istio.io";
        let near = nearest_kind(kind_name);
        let (severity, code, message) = if ISTIO_KINDS_NOT_READ.contains(&(group, kind_name)) {
            (
                Severity::Warning,
                "unimplemented-kind",
                format!(
                    "{api_version} {kind_name} is an Istio kind Hypha does not implement yet: \
                     skipped, so what it configures does not happen"
                ),
            )
        } else if let (true, Some(k)) = (istio || group == "hypha.dev", near) {
            (
                Severity::Error,
                "unknown-kind",
                format!("{group} has no kind {kind_name:?}; did you mean {k}?"),
            )
        } else if istio {
            (
                Severity::Warning,
                "unimplemented-kind",
                format!("{api_version} {kind_name} is not an Istio kind Hypha knows; skipped"),
            )
        } else {
            let hint = match near {
                Some(k) if k == kind_name => format!(
                    " ({k} is read from {}, not from {api_version:?})",
                    if k == "MeshConfig" {
                        "hypha.dev"
                    } else {
                        istio_group(k)
                    }
                ),
                Some(k) => format!(" (did you mean {k}?)"),
                None => String::new(),
            };
            (
                Severity::Info,
                "skipped-kind",
                format!("{api_version} {kind_name} is not a kind Hypha reads; skipped{hint}"),
            )
        };
        self.diags.at(severity, code, source, "kind", message);
    }

    fn add_document(&mut self, file: &Arc<str>, doc: Arc<Document>) {
        let api_version = doc
            .value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind_name = doc.value.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = doc
            .value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let namespace = doc
            .value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let source = Source {
            file: file.clone(),
            doc: doc.clone(),
            resource: format!("{kind_name} {namespace}/{name}"),
            derived: false,
        };
        if !doc.value.is_object() || api_version.is_empty() || kind_name.is_empty() {
            self.diags.error(
                "not-a-resource",
                &source,
                "",
                "document is not a Kubernetes resource: `apiVersion` and `kind` are required",
            );
            return;
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let kind = match (group, kind_name) {
            ("networking.istio.io", k) => match k {
                "ServiceEntry" => Some(Kind::ServiceEntry),
                "WorkloadEntry" => Some(Kind::WorkloadEntry),
                "VirtualService" => Some(Kind::VirtualService),
                "DestinationRule" => Some(Kind::DestinationRule),
                _ => None,
            },
            ("security.istio.io", "AuthorizationPolicy") => Some(Kind::AuthorizationPolicy),
            ("security.istio.io", "PeerAuthentication") => Some(Kind::PeerAuthentication),
            ("hypha.dev", "MeshConfig") => Some(Kind::MeshConfig),
            _ => None,
        };
        if (group, kind_name) == ("security.istio.io", "RequestAuthentication") {
            // Skipping it would fail open: Istio rejects requests whose token is invalid.
            self.diags.error(
                "unenforced",
                &source,
                "kind",
                "RequestAuthentication (end-user JWT authentication) is not enforced by Hypha \
                 yet, so requests with invalid tokens would get through: keep it out of the \
                 mesh until JWT authentication exists",
            );
            return;
        }
        let Some(kind) = kind else {
            self.skipped_kind(&source, group, api_version, kind_name);
            return;
        };
        let versions: &[&str] = match kind {
            Kind::ServiceEntry
            | Kind::WorkloadEntry
            | Kind::VirtualService
            | Kind::DestinationRule => &["v1", "v1beta1", "v1alpha3"],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => &["v1", "v1beta1"],
            Kind::MeshConfig => &["v1alpha1"],
        };
        if !versions.contains(&version) {
            self.diags.error(
                "api-version",
                &source,
                "apiVersion",
                format!(
                    "unsupported apiVersion {api_version:?} for {kind_name}; expected {}",
                    versions
                        .iter()
                        .map(|v| format!("{group}/{v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return;
        }
        match kind {
            Kind::ServiceEntry => push(&mut self.config.service_entries, &mut self.diags, source),
            Kind::WorkloadEntry => push(&mut self.config.workload_entries, &mut self.diags, source),
            Kind::VirtualService => {
                push(&mut self.config.virtual_services, &mut self.diags, source);
            }
            Kind::DestinationRule => {
                push(&mut self.config.destination_rules, &mut self.diags, source);
            }
            Kind::AuthorizationPolicy => {
                push(
                    &mut self.config.authorization_policies,
                    &mut self.diags,
                    source,
                );
            }
            Kind::PeerAuthentication => {
                push(
                    &mut self.config.peer_authentications,
                    &mut self.diags,
                    source,
                );
            }
            Kind::MeshConfig => {
                if self.config.mesh_source.is_some() {
                    self.duplicate_mesh(&source);
                    return;
                }
                if let Some(r) = parse::<crate::MeshConfig>(&mut self.diags, source) {
                    self.config.mesh = r.spec;
                    self.config.mesh_source = Some(r.source);
                }
            }
        }
    }

    fn duplicate_mesh(&mut self, second: &Source) {
        if let Some(prev) = &self.config.mesh_source {
            let msg = format!(
                "a second MeshConfig; the first is in {} line {}",
                prev.file,
                prev.pos("").line
            );
            self.diags.error("duplicate-mesh-config", second, "", msg);
        }
    }

    /// Appends what another loader parsed (one file), as if its documents came next.
    fn absorb(&mut self, other: &Loader) {
        let (c, o) = (&mut self.config, &other.config);
        c.service_entries.extend_from_slice(&o.service_entries);
        c.workload_entries.extend_from_slice(&o.workload_entries);
        c.virtual_services.extend_from_slice(&o.virtual_services);
        c.destination_rules.extend_from_slice(&o.destination_rules);
        c.authorization_policies
            .extend_from_slice(&o.authorization_policies);
        c.peer_authentications
            .extend_from_slice(&o.peer_authentications);
        self.diags.extend(other.diags.clone());
        if let Some(source) = &o.mesh_source {
            if self.config.mesh_source.is_some() {
                self.duplicate_mesh(source);
            } else {
                self.config.mesh = o.mesh.clone();
                self.config.mesh_source = Some(source.clone());
            }
        }
    }

    fn finish(mut self) -> Loaded {
        validate(&self.config, &mut self.diags);
        Loaded {
            config: self.config,
            diagnostics: self.diags,
        }
    }
}

fn push<T: DeserializeOwned>(out: &mut Vec<Resource<T>>, diags: &mut Diagnostics, source: Source) {
    if let Some(r) = parse(diags, source) {
        out.push(r);
    }
}

fn parse<T: DeserializeOwned>(diags: &mut Diagnostics, source: Source) -> Option<Resource<T>> {
    let value = source.doc.value.clone();
    let env = deserialize::<Envelope<T>>(diags, &source, value)?;
    if env.metadata.name.is_empty() {
        diags.error(
            "missing-name",
            &source,
            "metadata.name",
            "metadata.name is required",
        );
        return None;
    }
    Some(Resource {
        name: env.metadata.name,
        namespace: env.metadata.namespace.unwrap_or_else(|| "default".into()),
        labels: env.metadata.labels,
        annotations: env.metadata.annotations,
        spec: env.spec,
        source,
    })
}

/// `value` as a `T`, or a diagnostic at the field serde stopped at (an unknown key itself,
/// not only its parent).
pub(crate) fn deserialize<T: DeserializeOwned>(
    diags: &mut Diagnostics,
    source: &Source,
    value: Value,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let mut path = e.path().to_string();
            if path == "." {
                path.clear();
            }
            let message = e.inner().to_string();
            if message.starts_with("unknown field `") {
                let field = message.split('`').nth(1).unwrap_or_default();
                if !path.ends_with(field) {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(field);
                }
            }
            let code = if message.starts_with("unknown field") {
                "unknown-field"
            } else if message.starts_with("missing field") {
                "missing-field"
            } else {
                "invalid-value"
            };
            diags.error(code, source, path, message);
            None
        }
    }
}
