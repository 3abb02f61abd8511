//! kubectl's JSONPath templates (`-o jsonpath=…`, `-o custom-columns=…`,
//! `--sort-by`), evaluated by `serde_json_path` (RFC 9535). This module only
//! translates kubectl's notation: `{.metadata.name}`, `{range .items[*]}…
//! {end}`, `{"\n"}`, and keys with escaped dots (`.metadata.labels.a\.b`).
use serde_json::Value;
use serde_json_path::JsonPath;

/// A path as kubectl writes it, relative to the current object:
/// `.status.phase`, `.items[*].metadata.name`, `.spec.hosts[0].role`,
/// `.metadata.labels.testbus\.io/run`, or `@` for the object itself. One
/// already in RFC 9535 form (`$…`) is taken as it is.
#[derive(Debug, Clone)]
pub struct Path {
    query: JsonPath,
}

impl Path {
    pub fn parse(text: &str) -> Result<Path, String> {
        let t = text.trim();
        let rfc = if t.starts_with('$') { t.to_string() } else { to_rfc9535(t)? };
        let query = JsonPath::parse(&rfc).map_err(|e| format!("{text:?}: not a JSONPath expression: {e}"))?;
        Ok(Path { query })
    }

    /// Every value the path selects in `v`.
    pub fn query<'a>(&self, v: &'a Value) -> Vec<&'a Value> {
        self.query.query(v).all()
    }
}

/// `.a.b[0].c\.d` -> `$['a']['b'][0]['c.d']`.
fn to_rfc9535(t: &str) -> Result<String, String> {
    let rest = t.strip_prefix('@').unwrap_or(t);
    if !rest.is_empty() && !rest.starts_with('.') && !rest.starts_with('[') {
        return Err(format!("{t:?}: a path starts with '.' (like .metadata.name)"));
    }
    let mut out = String::from("$");
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    match n {
                        '\\' => {
                            chars.next();
                            name.extend(chars.next());
                        }
                        '.' | '[' => break,
                        _ => {
                            name.push(n);
                            chars.next();
                        }
                    }
                }
                if name.is_empty() {
                    return Err(format!("{t:?}: an empty name after '.'"));
                }
                out.push_str(&format!("['{}']", name.replace('\\', "\\\\").replace('\'', "\\'")));
            }
            '[' => {
                // An index, a wildcard or a filter: RFC 9535 writes them alike.
                let mut depth = 1;
                let mut inner = String::new();
                for n in chars.by_ref() {
                    depth += match n {
                        '[' => 1,
                        ']' => -1,
                        _ => 0,
                    };
                    if depth == 0 {
                        break;
                    }
                    inner.push(n);
                }
                if depth != 0 {
                    return Err(format!("{t:?}: '[' without ']'"));
                }
                // kubectl's filters are `?(@.x == "y")`; RFC 9535 drops the
                // parentheses' need but accepts them.
                out.push('[');
                out.push_str(&inner);
                out.push(']');
            }
            c => return Err(format!("{t:?}: unexpected {c:?}")),
        }
    }
    Ok(out)
}

/// A value as a cell or template output: strings bare, the rest as JSON.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// A parsed `-o jsonpath=` template.
#[derive(Debug, Clone)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Path(Path),
    Range(Path, Vec<Piece>),
}

impl Template {
    /// kubectl's syntax; a template with no `{` is one path
    /// (`-o jsonpath=.metadata.name`).
    pub fn parse(text: &str) -> Result<Template, String> {
        if !text.contains('{') {
            return Ok(Template(vec![Piece::Path(Path::parse(text)?)]));
        }
        let mut stack: Vec<(Option<Path>, Vec<Piece>)> = vec![(None, Vec::new())];
        let mut rest = text;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                stack.last_mut().expect("the top level").1.push(Piece::Text(rest.to_string()));
                break;
            };
            if open > 0 {
                stack.last_mut().expect("the top level").1.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = closing_brace(after).ok_or_else(|| format!("{text:?}: '{{' without '}}'"))?;
            let inner = after[..close].trim();
            rest = &after[close + 1..];
            if let Some(lit) = inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                let unescaped = lit.replace("\\n", "\n").replace("\\t", "\t").replace("\\\"", "\"");
                stack.last_mut().expect("the top level").1.push(Piece::Text(unescaped));
            } else if let Some(p) = inner.strip_prefix("range ") {
                stack.push((Some(Path::parse(p)?), Vec::new()));
            } else if inner == "end" {
                let (Some(path), body) = stack.pop().expect("the top level") else {
                    return Err(format!("{text:?}: {{end}} without {{range}}"));
                };
                stack.last_mut().expect("the top level").1.push(Piece::Range(path, body));
            } else {
                stack.last_mut().expect("the top level").1.push(Piece::Path(Path::parse(inner)?));
            }
        }
        match stack.pop() {
            Some((None, pieces)) if stack.is_empty() => Ok(Template(pieces)),
            _ => Err(format!("{text:?}: {{range}} without {{end}}")),
        }
    }

    pub fn render(&self, v: &Value) -> String {
        let mut out = String::new();
        render(&self.0, v, &mut out);
        out
    }
}

/// Where the `}` closing a `{` is, skipping quoted text and brackets.
fn closing_brace(s: &str) -> Option<usize> {
    let (mut quoted, mut depth) = (false, 0i32);
    let mut prev = ' ';
    for (i, c) in s.char_indices() {
        match c {
            '"' if prev != '\\' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => depth -= 1,
            '}' if !quoted && depth == 0 => return Some(i),
            _ => {}
        }
        prev = c;
    }
    None
}

fn render(pieces: &[Piece], v: &Value, out: &mut String) {
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            // Several results are printed space-separated, as kubectl does.
            Piece::Path(path) => out.push_str(&path.query(v).into_iter().map(show).collect::<Vec<_>>().join(" ")),
            Piece::Range(path, body) => {
                for item in path.query(v) {
                    render(body, item, out);
                }
            }
        }
    }
}

/// `-o custom-columns=NAME:.metadata.name,PHASE:.status.phase`.
#[derive(Debug, Clone)]
pub struct Columns(pub Vec<(String, Path)>);

impl Columns {
    pub fn parse(spec: &str) -> Result<Columns, String> {
        let mut cols = Vec::new();
        for part in split_top_level(spec) {
            let Some((head, path)) = part.split_once(':') else {
                return Err(format!("custom-columns: {part:?}: expected HEADER:PATH"));
            };
            if head.is_empty() {
                return Err(format!("custom-columns: {part:?}: the header is empty"));
            }
            // kubectl takes `metadata.name` as `.metadata.name` here.
            let path = match path.trim() {
                p if p.starts_with(['.', '$', '@', '[']) => p.to_string(),
                p => format!(".{p}"),
            };
            cols.push((head.to_string(), Path::parse(&path).map_err(|e| format!("custom-columns: {e}"))?));
        }
        if cols.is_empty() {
            return Err("custom-columns: give HEADER:PATH[,HEADER:PATH...]".into());
        }
        Ok(Columns(cols))
    }

    pub fn header(&self) -> Vec<String> {
        self.0.iter().map(|(h, _)| h.clone()).collect()
    }

    /// One object's cells: several results joined by commas, none as
    /// `<none>`.
    pub fn row(&self, v: &Value) -> Vec<String> {
        self.0
            .iter()
            .map(|(_, p)| {
                let found = p.query(v);
                if found.is_empty() {
                    "<none>".to_string()
                } else {
                    found.into_iter().map(show).collect::<Vec<_>>().join(",")
                }
            })
            .collect()
    }
}

/// Splits on commas outside brackets (a filter may contain commas).
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Orders values for `--sort-by`: missing first, then numbers by value,
/// then strings (RFC 3339 times sort as strings), then anything else by
/// its JSON text.
pub fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().unwrap_or(0.0).total_cmp(&y.as_f64().unwrap_or(0.0))
        }
        (Some(Value::Number(_)), Some(_)) => Ordering::Less,
        (Some(_), Some(Value::Number(_))) => Ordering::Greater,
        (Some(x), Some(y)) => show(x).cmp(&show(y)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj() -> Value {
        json!({
            "metadata": {"name": "t1", "labels": {"testbus.io/run": "true", "suite": "nfs"}},
            "spec": {"hosts": [{"role": "server", "count": 1}, {"role": "client", "count": 4}]},
            "status": {"phase": "Running"}
        })
    }

    #[test]
    fn templates_as_kubectl_writes_them() {
        let o = obj();
        let r = |t: &str| Template::parse(t).unwrap().render(&o);
        assert_eq!(r("{.metadata.name}"), "t1");
        assert_eq!(r(".status.phase"), "Running");
        assert_eq!(r("{.spec.hosts[*].role}"), "server client");
        assert_eq!(r("{.spec.hosts[1].count}"), "4");
        assert_eq!(r(r"{.metadata.labels.testbus\.io/run}"), "true");
        assert_eq!(r(r#"{range .spec.hosts[*]}{.role}={.count}{"\n"}{end}"#), "server=1\nclient=4\n");
        assert_eq!(r(r#"name: {.metadata.name}{"\t"}{.nothing}|"#), "name: t1\t|");
        assert_eq!(r(r#"{.spec.hosts[?(@.count > 1)].role}"#), "client");
        assert_eq!(r("{@.status}"), r#"{"phase":"Running"}"#);
        let list = json!({"items": [obj(), obj()]});
        assert_eq!(Template::parse("{.items[*].metadata.name}").unwrap().render(&list), "t1 t1");
    }

    #[test]
    fn malformed_templates_are_refused_with_the_reason() {
        for (t, why) in [
            ("{.metadata.name", "without '}'"),
            ("{range .items[*]}{.x}", "without {end}"),
            ("{end}", "without {range}"),
            ("{metadata}", "starts with '.'"),
            ("{.a..b}", "empty name"),
            (".a[0", "without ']'"),
            ("{.a[?(@.x ==)]}", "not a JSONPath"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn custom_columns_and_sorting() {
        let c = Columns::parse("NAME:.metadata.name,ROLES:.spec.hosts[*].role,X:.nope").unwrap();
        assert_eq!(c.header(), ["NAME", "ROLES", "X"]);
        assert_eq!(c.row(&obj()), ["t1", "server,client", "<none>"]);
        assert!(Columns::parse("NAME").unwrap_err().contains("HEADER:PATH"));
        assert!(Columns::parse("").is_err());
        assert!(Columns::parse(":.a").unwrap_err().contains("header is empty"));
        let (one, two, s) = (json!(1), json!(10), json!("a"));
        assert!(compare(Some(&one), Some(&two)).is_lt(), "numbers by value, not as text");
        assert!(compare(None, Some(&one)).is_lt());
        assert!(compare(Some(&two), Some(&s)).is_lt());
    }
}
