//! Label selectors (`a=b,c!=d,e in (x,y),f notin (z),g,!h`, as Kubernetes) and the few field
//! selectors the API serves (`spec.hostName=H`, `spec.test=T`,
//! `metadata.name=N`).
use crate::{Object, Process, Resource};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// What is wrong with a label or field selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid label selector {selector:?}: unbalanced parentheses")]
    Unbalanced { selector: String },
    #[error("invalid label selector {selector:?}: '(' without ')'")]
    Unclosed { selector: String },
    /// `why` is empty or starts with ": ".
    #[error("invalid label selector {selector:?}: bad requirement {part:?}{why}")]
    BadRequirement { selector: String, part: String, why: &'static str },
    #[error("invalid field selector {part:?}: expected FIELD=VALUE")]
    NotFieldValue { part: String },
    #[error("unsupported field selector {field:?} (supported: metadata.name, spec.hostName, spec.test)")]
    UnsupportedField { field: String },
    #[error("invalid field selector {selector:?}: {field} is given more than once")]
    RepeatedField { selector: String, field: String },
}

/// Label requirements, all of which must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

/// A label key (`prefix/name` allowed) or value: at most 253 of
/// `[A-Za-z0-9-_./]`, a value possibly empty.
fn label_token(s: &str, may_be_empty: bool) -> bool {
    (may_be_empty || !s.is_empty())
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// Splits on commas outside parentheses: `a in (x,y),b` is two parts.
fn requirements(s: &str) -> Result<Vec<&str>, SelectorError> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(SelectorError::Unbalanced { selector: s.into() });
        }
    }
    if depth != 0 {
        return Err(SelectorError::Unclosed { selector: s.into() });
    }
    parts.push(&s[start..]);
    Ok(parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect())
}

/// `key in (a,b)` / `key notin (a,b)`: the key, whether it is `notin`, and
/// the values; None if the part has neither form.
fn set_requirement(part: &str) -> Option<(&str, bool, &str)> {
    let open = part.find('(')?;
    let values = part[open + 1..].strip_suffix(')')?;
    let head = part[..open].trim_end();
    if let Some(k) = head.strip_suffix(" notin") {
        return Some((k.trim(), true, values));
    }
    head.strip_suffix(" in").map(|k| (k.trim(), false, values))
}

impl LabelSelector {
    /// Kubernetes' syntax: `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
    /// `k notin (a,b)`, `k` (exists) and `!k`, comma-separated.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in requirements(s)? {
            let bad = |why| SelectorError::BadRequirement { selector: s.into(), part: part.into(), why };
            let req = if let Some((k, not, values)) = set_requirement(part) {
                let vs: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
                if vs.iter().all(String::is_empty) {
                    return Err(bad(": a set needs at least one value"));
                }
                if vs.iter().any(|v| !label_token(v, false)) {
                    return Err(bad(""));
                }
                if not {
                    Req::NotIn(k.into(), vs)
                } else {
                    Req::In(k.into(), vs)
                }
            } else if part.contains('(') || part.contains(')') {
                return Err(bad(": expected KEY in (V,...) or KEY notin (V,...)"));
            } else if let Some((k, v)) = part.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else {
                Req::Exists(part.into())
            };
            let (key, value) = match &req {
                Req::Eq(k, v) | Req::Ne(k, v) => (k, Some(v)),
                Req::In(k, _) | Req::NotIn(k, _) | Req::Exists(k) | Req::NotExists(k) => (k, None),
            };
            // As Kubernetes: a key is a label name, a value empty or one;
            // `a=b=c` and `!!a` are mistakes, not selectors.
            if !label_token(key, false) || !value.is_none_or(|v| label_token(v, true)) {
                return Err(bad(""));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => labels.get(k) == Some(v),
            Req::Ne(k, v) => labels.get(k) != Some(v),
            Req::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            // As Kubernetes: a missing label is not in the set.
            Req::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Req::Exists(k) => labels.contains_key(k),
            Req::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// A field selector: equality on one of the served fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub name: Option<String>,
    pub host_name: Option<String>,
    pub test: Option<String>,
}

impl FieldSelector {
    /// `FIELD=VALUE` (or `==`), comma-separated, each field at most once:
    /// a repeated field is an error, never a second value that one reader
    /// (authorization) sees and another (the filter) does not.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut f = FieldSelector::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let not_field_value = || SelectorError::NotFieldValue { part: part.into() };
            let (k, v) = part.split_once('=').ok_or_else(not_field_value)?;
            let v = v.strip_prefix('=').unwrap_or(v).trim();
            if v.is_empty() || v.contains('=') {
                return Err(not_field_value());
            }
            let slot = match k.trim() {
                "metadata.name" => &mut f.name,
                "spec.hostName" => &mut f.host_name,
                "spec.test" => &mut f.test,
                other => return Err(SelectorError::UnsupportedField { field: other.into() }),
            };
            if slot.is_some() {
                return Err(SelectorError::RepeatedField { selector: s.into(), field: k.trim().into() });
            }
            *slot = Some(v.to_string());
        }
        Ok(f)
    }

    pub fn matches(&self, obj: &Object) -> bool {
        if let Some(n) = &self.name {
            if &obj.meta().name != n {
                return false;
            }
        }
        if self.host_name.is_none() && self.test.is_none() {
            return true;
        }
        let Object::Process(p) = obj else {
            return false;
        };
        self.matches_process(p)
    }

    fn matches_process(&self, p: &Process) -> bool {
        self.host_name.as_ref().is_none_or(|h| &p.spec().host_name == h)
            && self.test.as_ref().is_none_or(|t| &p.spec().test == t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors() {
        let l: BTreeMap<String, String> = [("suite".to_string(), "nfs".to_string())].into();
        assert!(LabelSelector::parse("suite=nfs").unwrap().matches(&l));
        assert!(!LabelSelector::parse("suite!=nfs").unwrap().matches(&l));
        assert!(LabelSelector::parse("suite,!gpu").unwrap().matches(&l));
        assert!(!LabelSelector::parse("gpu").unwrap().matches(&l));
        assert!(LabelSelector::parse("").unwrap().matches(&l));
        assert!(LabelSelector::parse("=x").is_err());
        for bad in ["a=b=c", "!!a", "a!=b=c", "a==b=c", "a b", "a=b c", "a\u{0}"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(LabelSelector::parse("testbus.io/suite=nfs-4.2,a=").is_ok());
    }

    #[test]
    fn set_based_label_selectors() {
        let l: BTreeMap<String, String> =
            [("suite".to_string(), "nfs".to_string()), ("tier".to_string(), "1".to_string())].into();
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&l);
        assert!(m("suite in (nfs,smb)"));
        assert!(m("suite in ( smb , nfs )"));
        assert!(!m("suite in (smb)"));
        assert!(m("suite notin (smb,iscsi)"));
        assert!(!m("suite notin (nfs)"));
        assert!(m("gpu notin (yes)"), "a missing label is not in the set");
        assert!(!m("gpu in (yes)"));
        assert!(m("suite in (nfs,smb),tier=1,!gpu"));
        assert!(!m("suite in (nfs,smb),tier!=1"));
        for bad in [
            "suite in ()",
            "suite in (a",
            "suite in a,b)",
            "suite in (a b)",
            "suite (a)",
            "in (a)",
            "suite in ((a))",
            "suite notin (a,,b)x",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn field_selectors() {
        assert!(FieldSelector::parse("spec.hostName=a").unwrap().host_name.is_some());
        assert!(FieldSelector::parse("status.phase=x").is_err());
        assert_eq!(FieldSelector::parse(" spec.hostName == a ").unwrap().host_name.as_deref(), Some("a"));
        // One field, one value: a second one would be seen by one reader
        // and not the other.
        for bad in [
            "spec.hostName=t1,spec.hostName=t2",
            "spec.hostName=t2, spec.hostName=t1",
            "spec.hostName=t1,metadata.name=x,spec.hostName=t1",
            "spec.hostName=",
            "spec.hostName=a=b",
            "spec.hostName!=a",
        ] {
            assert!(FieldSelector::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
