//! Output: tables (`-o table|wide`), YAML, JSON and names.
use testbus_proto::{phase, time, Host, Kind, Object, Process, Resource, Test};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
}

pub fn kind_slug(k: Kind) -> &'static str {
    match k {
        Kind::Host => "host",
        Kind::Test => "test",
        Kind::Process => "process",
    }
}

/// The column names of a table of `kind` (more with `-o wide`).
pub fn header(kind: Kind, fmt: Format) -> Vec<&'static str> {
    let wide = fmt == Format::Wide;
    let mut h = match kind {
        Kind::Host => vec!["NAME", "PHASE", "CLAIMED-BY", "CAPABILITIES", "AGE"],
        Kind::Test => vec!["NAME", "PHASE", "HOSTS", "STEPS", "AGE"],
        Kind::Process => vec!["NAME", "PHASE", "HOST", "ROLE", "STEP", "EXIT", "AGE"],
    };
    if wide {
        h.extend(match kind {
            Kind::Host => vec!["ADDRESS", "OS", "KERNEL", "TRANSPORT"],
            Kind::Test => vec!["REASON", "MESSAGE"],
            Kind::Process => vec!["PID", "MESSAGE"],
        });
    }
    h
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s.to_string()
    }
}

/// One object as a table row (more columns with `-o wide`).
pub fn row(o: &Object, fmt: Format) -> Vec<String> {
    let wide = fmt == Format::Wide;
    match o {
        Object::Host(h) => host_row(h, wide),
        Object::Test(t) => test_row(t, wide),
        Object::Process(p) => process_row(p, wide),
    }
}

fn host_row(h: &Host, wide: bool) -> Vec<String> {
    let s = h.status();
    let mut ph = or_none(&s.phase);
    if h.spec().unschedulable {
        ph.push_str(",Cordoned");
    }
    let claim = s.claim.as_ref().map(|c| format!("{}/{}", c.test, c.role));
    let mut caps: Vec<&String> = s.capabilities.iter().chain(h.spec().capabilities.iter()).collect();
    caps.sort();
    caps.dedup();
    let mut r = vec![
        h.name().to_string(),
        ph,
        claim.unwrap_or_else(|| "<none>".into()),
        or_none(&caps.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(",")),
        time::age(&h.meta().creation_timestamp),
    ];
    if wide {
        let f = s.facts.clone().unwrap_or_default();
        r.extend([
            or_none(s.vars.get("ipv4addr").map(String::as_str).unwrap_or("")),
            or_none(&f.os),
            or_none(&f.kernel),
            or_none(&f.transport),
        ]);
    }
    r
}

fn test_row(t: &Test, wide: bool) -> Vec<String> {
    let s = t.status();
    let hosts: u32 = t.spec().hosts.iter().map(|h| h.count.unwrap_or(1)).sum();
    let done = s.steps.iter().filter(|st| st.phase == phase::SUCCEEDED).count();
    let mut r = vec![
        t.name().to_string(),
        or_none(&s.phase),
        hosts.to_string(),
        // Child tests' steps count too, as `describe`, `logs` and `results`
        // show them.
        format!("{done}/{}", testbus_proto::steps::expand(t.spec()).len()),
        time::age(&t.meta().creation_timestamp),
    ];
    if wide {
        r.extend([or_none(&s.reason), or_none(&s.message)]);
    }
    r
}

fn process_row(p: &Process, wide: bool) -> Vec<String> {
    let s = p.status();
    let exit = match (s.exit_code, s.signal.is_empty()) {
        (Some(c), _) => c.to_string(),
        (None, false) => s.signal.clone(),
        _ => "<none>".into(),
    };
    let mut r = vec![
        p.name().to_string(),
        or_none(&s.phase),
        p.spec().host_name.clone(),
        p.spec().role.clone(),
        p.spec().step.clone(),
        exit,
        time::age(&p.meta().creation_timestamp),
    ];
    if wide {
        r.extend([if s.pid > 0 { s.pid.to_string() } else { "<none>".into() }, or_none(&s.message)]);
    }
    r
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
pub fn table(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..n).map(|i| rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{c:<w$}   ", w = widths[i]));
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn to_yaml(v: &serde_json::Value) -> String {
    serde_norway::to_string(v).unwrap_or_default()
}

/// A list as kubectl prints one.
pub fn list_value(items: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({"apiVersion": testbus_proto::API_VERSION, "kind": "List", "items": items})
}

/// How many objects a command asked for: one by name prints as the object
/// itself in YAML/JSON, several as a List.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    One,
    Many,
}

pub fn print(objs: &[Object], fmt: Format, asked: Asked) {
    match fmt {
        Format::Table | Format::Wide => {
            let Some(first) = objs.first() else {
                eprintln!("No resources found.");
                return;
            };
            let mut rows = vec![header(first.kind(), fmt).into_iter().map(String::from).collect()];
            rows.extend(objs.iter().map(|o| row(o, fmt)));
            print!("{}", table(&rows));
        }
        Format::Name => {
            for o in objs {
                println!("{}/{}", kind_slug(o.kind()), o.meta().name);
            }
        }
        Format::Yaml | Format::Json => {
            let v = if asked == Asked::One && objs.len() == 1 {
                objs[0].to_json()
            } else {
                list_value(objs.iter().map(Object::to_json).collect())
            };
            if fmt == Format::Yaml {
                print!("{}", to_yaml(&v));
            } else {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
    }
}
