//! Label and field selectors as list and watch take them (`labelSelector`, `fieldSelector`).

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<Label>,
    /// Field path (`metadata.name`) and value, `=`/`==` (true) or `!=` (false).
    fields: Vec<(String, String, bool)>,
}

/// Why a selector was refused (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selector, Invalid> {
        let mut s = Selector::default();
        if let Some(l) = labels {
            for req in split_top(l) {
                s.labels.push(parse_label(req.trim())?);
            }
        }
        if let Some(f) = fields {
            for req in f.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let (path, value, eq) = if let Some((p, v)) = req.split_once("!=") {
                    (p, v, false)
                } else if let Some((p, v)) = req.split_once("==") {
                    (p, v, true)
                } else if let Some((p, v)) = req.split_once('=') {
                    (p, v, true)
                } else {
                    return Err(Invalid(format!("invalid field selector {req:?}")));
                };
                s.fields
                    .push((path.trim().to_owned(), value.trim().to_owned(), eq));
            }
        }
        Ok(s)
    }

    /// A `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`), as webhooks'
    /// namespace and object selectors are written; null or `{}` selects everything.
    pub fn from_object(sel: &Value) -> Result<Selector, Invalid> {
        let mut s = Selector::default();
        for (k, v) in sel["matchLabels"].as_object().into_iter().flatten() {
            let v = v
                .as_str()
                .ok_or_else(|| Invalid(format!("matchLabels {k}")))?;
            s.labels.push(Label::Eq(k.clone(), v.to_owned()));
        }
        for e in sel["matchExpressions"].as_array().into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or_default().to_owned();
            let values: Vec<String> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            s.labels.push(match e["operator"].as_str() {
                Some("In") => Label::In(key, values),
                Some("NotIn") => Label::NotIn(key, values),
                Some("Exists") => Label::Exists(key),
                Some("DoesNotExist") => Label::NotExists(key),
                other => return Err(Invalid(format!("matchExpressions operator {other:?}"))),
            });
        }
        Ok(s)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            Label::Eq(k, v) => label(k) == Some(v),
            Label::NotEq(k, v) => label(k) != Some(v),
            Label::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Label::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Label::Exists(k) => label(k).is_some(),
            Label::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, value, eq)| {
                let pointer = format!("/{}", path.replace('.', "/"));
                let found = match obj.pointer(&pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (found == *value) == *eq
            })
    }
}

/// Splits a label selector at the commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().filter(|r| !r.trim().is_empty()).collect()
}

fn parse_label(req: &str) -> Result<Label, Invalid> {
    let set = |rest: &str| -> Result<Vec<String>, Invalid> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| Invalid(format!("invalid label selector {req:?}")))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some(k) = req.strip_prefix('!') {
        return Ok(Label::NotExists(k.trim().to_owned()));
    }
    if let Some((k, v)) = req.split_once("!=") {
        return Ok(Label::NotEq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
        return Ok(Label::Eq(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, rest)) = req.split_once(" notin ") {
        return Ok(Label::NotIn(k.trim().to_owned(), set(rest)?));
    }
    if let Some((k, rest)) = req.split_once(" in ") {
        return Ok(Label::In(k.trim().to_owned(), set(rest)?));
    }
    if req
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Ok(Label::Exists(req.to_owned()));
    }
    Err(Invalid(format!("invalid label selector {req:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_select_as_the_api_server_does() {
        let pod = json!({"metadata": {"name": "p1", "namespace": "shop", "labels": {"app": "web", "v": "1"}},
                         "spec": {"nodeName": "n1"}});
        let yes = |l: Option<&str>, f: Option<&str>| Selector::parse(l, f).unwrap().matches(&pod);
        assert!(yes(Some("app=web"), None));
        assert!(yes(Some("app==web,v!=2"), None));
        assert!(yes(Some("app in (web, api),!missing"), None));
        assert!(!yes(Some("app notin (web)"), None));
        assert!(yes(Some("v"), Some("metadata.name=p1,spec.nodeName=n1")));
        assert!(!yes(None, Some("metadata.name!=p1")));
        assert!(!yes(Some("app=api"), None));
        assert!(Selector::parse(Some("app in web"), None).is_err());
        let object = |sel: Value| Selector::from_object(&sel).unwrap().matches(&pod);
        assert!(object(json!({"matchLabels": {"app": "web"}})));
        assert!(object(json!(null)));
        assert!(object(json!({"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["web"]},
            {"key": "gone", "operator": "DoesNotExist"}]})));
        assert!(!object(
            json!({"matchExpressions": [{"key": "v", "operator": "NotIn", "values": ["1"]}]})
        ));
        assert!(!object(json!({"matchLabels": {"app": "api"}})));
    }
}
