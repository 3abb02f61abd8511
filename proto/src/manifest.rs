//! Manifests: YAML or JSON documents (several per file, `---` separated) that
//! map to API objects with camelCase field names. Every error names the
//! document and the field (`spec.hosts[1].count: ...`).
use crate::resource::{Kind, Object};
use crate::{Host, Process, Test};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}{}{}: {path}{}{message}", at_suffix(*.at), document_suffix(*.document), if .path.is_empty() { "" } else { ": " })]
pub struct ManifestError {
    /// File name or `-`.
    pub source_name: String,
    /// Line and column (one-based) where the YAML parser stopped, for a
    /// syntax error; None for errors found in well-formed YAML.
    pub at: Option<(usize, usize)>,
    /// Zero-based document index within the source.
    pub document: usize,
    /// The field, as `spec.hosts[1].count`; empty for the whole document.
    pub path: String,
    pub message: String,
}

/// `:LINE:COLUMN`, as compilers print it (editors jump there).
fn at_suffix(at: Option<(usize, usize)>) -> String {
    at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default()
}

/// ` (document N)` for every document but the first.
pub fn document_suffix(d: usize) -> String {
    if d == 0 {
        String::new()
    } else {
        format!(" (document {})", d + 1)
    }
}

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Deepest nesting accepted in a manifest (real ones stay below 15). Checked
/// before parsing: the YAML parser's cost grows with the square of the depth
/// (100,000 levels took 48 s), and its own recursion limit only applies
/// after that work is done.
pub const MAX_NESTING: usize = 64;

/// The first line (1-based) at which `text` nests deeper than `limit`, by
/// a conservative scan: block indentation levels, compact `- ` entries on
/// one line, and open flow brackets outside quotes and comments. Block
/// scalars (`|`, `>`) are skipped. It may overcount odd but valid YAML,
/// never undercount.
fn too_deep(text: &str, limit: usize) -> Option<usize> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // While inside a block scalar: the indentation of the line that began it.
    let mut scalar_of: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        let indent = line.len() - body.len();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if let Some(parent) = scalar_of {
            if indent > parent {
                continue;
            }
            scalar_of = None;
        }
        if flow == 0 {
            while indents.last().is_some_and(|&i| i > indent) {
                indents.pop();
            }
            if indents.last().is_none_or(|&i| i < indent) {
                indents.push(indent);
            }
        }
        let mut rest = body;
        let mut dashes = 0;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
            dashes += 1;
            rest = r.trim_start_matches(' ');
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut deepest = flow;
        for c in rest.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '\'' | '"' if prev == ' ' || "[{:,".contains(prev) => quote = Some(c),
                    '#' if prev == ' ' => break,
                    '[' | '{' => {
                        flow += 1;
                        deepest = deepest.max(flow);
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
        }
        if indents.len() + dashes + deepest > limit {
            return Some(n + 1);
        }
        let t = rest.trim_end();
        let header = t.rsplit_once(' ').map_or(t, |(_, last)| last);
        if flow == 0 && (header.starts_with('|') || header.starts_with('>')) && header.len() <= 3 {
            scalar_of = Some(indent);
        }
    }
    None
}

/// Parses every document of a YAML or JSON text into objects.
pub fn parse(source_name: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    Ok(parse_documents(source_name, text)?.into_iter().map(|(_, o)| o).collect())
}

/// Like [`parse`], with each object's zero-based document index.
pub fn parse_documents(source_name: &str, text: &str) -> Result<Vec<(usize, Object)>, ManifestError> {
    let err = |document, path: String, message: String| ManifestError {
        source_name: source_name.to_string(),
        document,
        path,
        message,
        at: None,
    };
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(err(0, String::new(), format!("manifest larger than {MAX_MANIFEST_BYTES} bytes")));
    }
    if let Some(line) = too_deep(text, MAX_NESTING) {
        return Err(err(0, String::new(), format!("line {line}: nested deeper than {MAX_NESTING} levels")));
    }
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value: StrictValue = match serde_path_to_error::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                let path = display_path(e.path());
                let inner = e.into_inner();
                let at = inner.location().map(|l| (l.line(), l.column()));
                // The parser may name the field itself: say it once.
                let message = clean_message(&inner.to_string());
                let message = message.strip_prefix(&format!("{path}: ")).map(str::to_string).unwrap_or(message);
                return Err(ManifestError { at, ..err(i, path, message) });
            }
        };
        if value.0.is_null() {
            continue; // an empty document, such as a trailing `---`
        }
        out.push((i, from_value(value.0).map_err(|(path, message)| err(i, path, message))?));
    }
    if out.is_empty() {
        return Err(err(0, String::new(), "no objects in manifest".into()));
    }
    Ok(out)
}

/// Converts one document's value into an object of the kind it names.
pub fn from_value(value: Value) -> Result<Object, (String, String)> {
    let Value::Object(map) = &value else {
        return Err((String::new(), "expected a mapping with apiVersion, kind, metadata and spec".into()));
    };
    match map.get("apiVersion") {
        Some(Value::String(v)) if v == crate::API_VERSION => {}
        Some(Value::String(v)) => {
            return Err(("apiVersion".into(), format!("unsupported {v:?}, expected {:?}", crate::API_VERSION)))
        }
        Some(_) => return Err(("apiVersion".into(), "must be a string".into())),
        None => return Err(("apiVersion".into(), format!("required (use {:?})", crate::API_VERSION))),
    }
    let kind = match map.get("kind") {
        Some(Value::String(k)) => match Kind::parse(k) {
            Some(kind) if kind.name() == k => kind,
            _ => {
                return Err((
                    "kind".into(),
                    format!("unknown kind {k:?}, expected one of Host, Test, Process, HostPool"),
                ))
            }
        },
        Some(_) => return Err(("kind".into(), "must be a string".into())),
        None => return Err(("kind".into(), "required".into())),
    };
    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(v)
            .map_err(|e| (display_path(e.path()), clean_message(&e.into_inner().to_string())))
    }
    Ok(match kind {
        Kind::Host => Object::Host(typed::<Host>(value)?),
        Kind::Test => Object::Test(typed::<Test>(value)?),
        Kind::Process => Object::Process(typed::<Process>(value)?),
        Kind::HostPool => Object::HostPool(typed::<crate::HostPool>(value)?),
    })
}

fn display_path(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." {
        String::new()
    } else {
        s
    }
}

/// serde's messages name Rust's view of things; keep them but drop the
/// location suffix the YAML parser appends (the path says where).
fn clean_message(m: &str) -> String {
    match m.find(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m.to_string(),
    }
}

/// Removes empty values (null, "", false, [], {}) for display: `-o yaml`
/// shows what is set, as kubectl does.
pub fn prune(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, prune(v))).filter(|(_, v)| !is_empty(v)).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(prune).collect()),
        v => v,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Number(_) => false,
    }
}

/// A JSON value read from YAML that rejects duplicate mapping keys (YAML
/// allows the parser to keep the last one silently; we never do).
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("not a finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<MapKey>()? {
            if out.contains_key(&key.0) {
                return Err(de::Error::custom(format!("duplicate key {:?}", key.0)));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key.0, v);
        }
        Ok(Value::Object(out))
    }
}

/// Mapping keys must be scalars; numbers and booleans become their text.
struct MapKey(String);

impl<'de> Deserialize<'de> for MapKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E>(self, v: &str) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_u64<E>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_bool<E>(self, v: bool) -> Result<String, E> {
                Ok(v.to_string())
            }
        }
        d.deserialize_any(V).map(MapKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
apiVersion: testbus/v1
kind: Test
metadata: {generateName: nfs-, labels: {suite: nfs}}
spec:
  timeout: 10m
  env: {EXPORT: /srv/export}
  files:
    - {source: ./krb5.conf, path: /etc/krb5.conf, mode: "0644"}
  hosts:
    - {role: server, capabilities: [nfs-server]}
    - {role: client, capabilities: [nfs-client], count: 4}
  steps:
    - name: export
      on: [server]
      argv: [exportfs, -o, rw, "*:${EXPORT}"]
    - name: mount
      on: [client]            # client0..client3; "client2" targets one
      after: [export]
      sync: true              # all four start together
      argv: [mount, "${host_server_ipv4addr}:${EXPORT}", /mnt]
    - name: io
      on: [client]
      after: [mount]
      script: |
        #!/bin/sh
        dd if=/dev/zero of=/mnt/$TESTBUS_HOST bs=1M count=10
      timeout: 2m
      exitCodes: [0]
"#;

    /// A YAML syntax error says where, as `FILE:LINE:COLUMN`.
    #[test]
    fn a_syntax_error_names_its_line_and_column() {
        let text = "apiVersion: testbus/v1\nkind: Test\nmetadata:\n  name: a\nspec:\n  hosts: [\n   - role: x\n";
        let e = parse_documents("t.yaml", text).unwrap_err();
        let (line, _) = e.at.expect("a location");
        assert!((6..=8).contains(&line), "{e} {:?}", e.at);
        assert!(e.to_string().starts_with(&format!("t.yaml:{line}:")), "{e}");
        let tab = parse_documents("t.yaml", "kind: Test\nmetadata:\n  name: a\n\tspec: 1\n").unwrap_err();
        assert!(tab.to_string().starts_with("t.yaml:4:"), "{tab}");
        // In the second document: its line in the file, and which document.
        let second = "apiVersion: testbus/v1\nkind: Host\nmetadata: {name: a}\n---\nkind: Test\nmetadata: {name: b\n";
        let e = parse_documents("t.yaml", second).unwrap_err();
        assert!(e.to_string().starts_with("t.yaml:7:") || e.to_string().starts_with("t.yaml:6:"), "{e}");
        assert!(e.to_string().contains("(document 2)"), "{e}");
        // A field error in well-formed YAML has its path instead.
        let e =
            parse_documents("t.yaml", "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: a}\nspec: {hosts: 3}\n")
                .unwrap_err();
        assert_eq!(e.at, None, "{e}");
        assert!(e.to_string().contains("spec.hosts"), "{e}");
        // The field is named once, not twice.
        let e = parse_documents(
            "t.yaml",
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: a}\nspec:\n  timeout: 1s\n  timeout: 2s\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains(": spec: duplicate key") && !e.to_string().contains("spec: spec:"), "{e}");
    }

    #[test]
    fn design_manifest_parses_as_written() {
        let objs = parse("design.yaml", DESIGN_EXAMPLE).unwrap();
        let Object::Test(t) = &objs[0] else { panic!("not a test") };
        let spec = t.spec.as_ref().unwrap();
        assert_eq!(spec.hosts[1].count, Some(4));
        assert_eq!(spec.steps[1].after, vec!["export"]);
        assert!(spec.steps[1].sync);
        assert_eq!(spec.steps[2].exit_codes, vec![0]);
        assert_eq!(spec.files[0].mode, "0644");
        assert_eq!(t.metadata.as_ref().unwrap().generate_name, "nfs-");
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            parse("m.yaml", "apiVersion: testbus/v1\nkind: Test\nspec: {hosts: [{role: a, count: x}]}\n").unwrap_err();
        assert_eq!(e.path, "spec.hosts[0].count");
        let e = parse("m.yaml", "apiVersion: testbus/v1\nkind: Test\nspec: {bogus: 1}\n").unwrap_err();
        assert_eq!(e.path, "spec.bogus");
        assert!(e.message.contains("unknown field `bogus`"), "{}", e.message);
        let e = parse("m.yaml", "apiVersion: testbus/v1\nkind: Widget\n").unwrap_err();
        assert_eq!(e.path, "kind");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let e = parse("m.yaml", "apiVersion: testbus/v1\nkind: Test\nspec:\n  env: {A: x, A: y}\n").unwrap_err();
        assert!(e.message.contains("duplicate key"), "{e}");
        assert_eq!(e.path, "spec.env");
    }

    #[test]
    fn several_documents() {
        let two = "apiVersion: testbus/v1\nkind: Host\nmetadata: {name: a}\n---\napiVersion: testbus/v1\nkind: Host\nmetadata: {name: b}\n---\n";
        assert_eq!(parse("m.yaml", two).unwrap().len(), 2);
        let e = parse("m.yaml", "apiVersion: testbus/v1\nkind: Host\n---\nkind: Host\n").unwrap_err();
        assert_eq!(e.document, 1);
        assert!(e.to_string().contains("document 2"), "{e}");
    }

    #[test]
    fn prune_drops_empty_values() {
        let v = serde_json::json!({"a": "", "b": [], "c": {"d": null}, "e": 0, "f": false, "g": "x"});
        assert_eq!(prune(v), serde_json::json!({"e": 0, "g": "x"}));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let started = std::time::Instant::now();
        for deep in ["[".repeat(100_000), "{a: ".repeat(50_000), "- ".repeat(100_000) + "x", {
            let mut s = String::new();
            for i in 0..2000 {
                s.push_str(&" ".repeat(i));
                s.push_str("a:\n");
            }
            s
        }] {
            let e = parse("deep.yaml", &deep).unwrap_err();
            assert!(e.to_string().contains("nested deeper than 64 levels"), "{e}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused quickly");
        // A block scalar's content (a script's braces and indentation) and
        // brackets in quotes or comments do not count.
        let script = (0..80).map(|i| format!("{}{{\n", " ".repeat(8 + i))).collect::<String>();
        let ok = format!(
            "apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: t}}  # [[[[\nspec:\n  hosts: [{{role: a}}]\n  env: {{X: \"[[[[[[\"}}\n  steps:\n    - name: s\n      on: [a]\n      script: |\n{script}"
        );
        parse("ok.yaml", &ok).unwrap();
    }
}
