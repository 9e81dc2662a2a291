//! Reading the sidecars' Prometheus text (`/metrics`): the `istio_requests_total` samples and
//! their labels.

use std::collections::BTreeMap;

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// A label's value, `""` if absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample of `metric` in `text`.
pub fn samples(text: &str, metric: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
                let end = rest.rfind('}')?;
                (parse_labels(&rest[..end])?, &rest[end + 1..])
            } else if rest.starts_with(' ') {
                (BTreeMap::new(), rest)
            } else {
                return None;
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some(Sample { labels, value })
        })
        .collect()
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        out.insert(name.trim().to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_values() {
        let text = "# TYPE istio_requests_total counter\n\
            istio_requests_total{reporter=\"source\",destination_service=\"a\\\"b\",response_code=\"200\"} 7\n\
            istio_requests_total_other{x=\"1\"} 3\n\
            istio_requests_total 2\n";
        let s = samples(text, "istio_requests_total");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label("destination_service"), "a\"b");
        assert_eq!(s[0].label("response_code"), "200");
        assert_eq!(s[0].value, 7.0);
        assert_eq!(s[1].value, 2.0);
        assert!(s[1].labels.is_empty());
    }
}
