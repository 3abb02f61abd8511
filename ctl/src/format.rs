//! Output: tables (`-o table|wide`), YAML, JSON, names, and kubectl's
//! `jsonpath=` and `custom-columns=`.
use crate::jsonpath::{Columns, Template};
use testbus_proto::states::StepPhase;
use testbus_proto::{phase, time, Host, HostPool, Kind, Object, Process, Resource, Test};

#[derive(Debug, Clone)]
pub enum Format {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
    JsonPath(Template),
    CustomColumns(Columns),
}

/// What `-o` accepts, for `--help` and errors.
pub const FORMATS: &str = "table, wide, yaml, json, name, jsonpath=TEMPLATE, custom-columns=HEADER:PATH[,...]";

impl Format {
    /// `-o`'s value.
    pub fn parse(s: &str) -> Result<Format, String> {
        Ok(match s {
            "table" => Format::Table,
            "wide" => Format::Wide,
            "yaml" => Format::Yaml,
            "json" => Format::Json,
            "name" => Format::Name,
            _ => match s.split_once('=') {
                Some(("jsonpath", t)) => Format::JsonPath(Template::parse(t)?),
                Some(("custom-columns", c)) => Format::CustomColumns(Columns::parse(c)?),
                _ => return Err(format!("unknown format {s:?} (one of: {FORMATS})")),
            },
        })
    }

    pub fn is_table(&self) -> bool {
        matches!(self, Format::Table | Format::Wide | Format::CustomColumns(_))
    }
}

pub fn kind_slug(k: Kind) -> &'static str {
    match k {
        Kind::Host => "host",
        Kind::Test => "test",
        Kind::Process => "process",
        Kind::HostPool => "hostpool",
    }
}

/// What a table shows besides its kind's columns, as kubectl's flags say:
/// `--no-headers`, `--show-labels`, `-L KEY`.
#[derive(Debug, Clone, Default)]
pub struct TableOpts {
    pub no_headers: bool,
    pub show_labels: bool,
    /// A column per label key, its values.
    pub label_columns: Vec<String>,
}

/// [`header`] with the columns `opts` adds.
pub fn header_with(kind: Kind, fmt: &Format, opts: &TableOpts) -> Vec<String> {
    let mut h = header(kind, fmt);
    // kubectl heads a label column with the key's last part, upper-cased.
    h.extend(opts.label_columns.iter().map(|k| k.rsplit('/').next().unwrap_or(k).to_uppercase()));
    if opts.show_labels {
        h.push("LABELS".into());
    }
    h
}

/// [`row`] with the columns `opts` adds.
pub fn row_with(o: &Object, fmt: &Format, opts: &TableOpts) -> Vec<String> {
    let mut r = row(o, fmt);
    let labels = &o.meta().labels;
    r.extend(opts.label_columns.iter().map(|k| labels.get(k).cloned().unwrap_or_default()));
    if opts.show_labels {
        let all: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        r.push(or_none(&all.join(",")));
    }
    r
}

/// The column names of a table of `kind` (more with `-o wide`).
pub fn header(kind: Kind, fmt: &Format) -> Vec<String> {
    if let Format::CustomColumns(c) = fmt {
        return c.header();
    }
    let wide = matches!(fmt, Format::Wide);
    let mut h = match kind {
        Kind::Host => vec!["NAME", "PHASE", "CLAIMED-BY", "CAPABILITIES", "AGE"],
        Kind::Test => vec!["NAME", "PHASE", "HOSTS", "STEPS", "AGE"],
        Kind::Process => vec!["NAME", "PHASE", "HOST", "ROLE", "STEP", "EXIT", "AGE"],
        Kind::HostPool => vec!["NAME", "PROVIDER", "GUESTS", "READY", "MIN", "MAX", "AGE"],
    };
    if wide {
        h.extend(match kind {
            Kind::Host => vec!["ADDRESS", "OS", "KERNEL", "TRANSPORT", "MESSAGE"],
            Kind::Test => vec!["REASON", "MESSAGE"],
            Kind::Process => vec!["PID", "MESSAGE"],
            Kind::HostPool => vec!["CAPABILITIES", "MESSAGE"],
        });
    }
    h.into_iter().map(String::from).collect()
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s.to_string()
    }
}

/// One object as a table row (more columns with `-o wide`).
pub fn row(o: &Object, fmt: &Format) -> Vec<String> {
    if let Format::CustomColumns(c) = fmt {
        return c.row(&o.to_json());
    }
    let wide = matches!(fmt, Format::Wide);
    match o {
        Object::Host(h) => host_row(h, wide),
        Object::Test(t) => test_row(t, wide),
        Object::Process(p) => process_row(p, wide),
        Object::HostPool(p) => pool_row(p, wide),
    }
}

fn pool_row(p: &HostPool, wide: bool) -> Vec<String> {
    let (sp, s) = (p.spec(), p.status());
    let ready = s.guests.iter().filter(|g| g.phase == "Ready").count();
    let mut r = vec![
        p.name().to_string(),
        sp.provider.clone(),
        s.guests.len().to_string(),
        ready.to_string(),
        sp.min.to_string(),
        sp.max.map(|m| m.to_string()).unwrap_or_else(|| "<default>".into()),
        time::age(&p.meta().creation_timestamp),
    ];
    if wide {
        r.extend([or_none(&sp.capabilities.join(",")), or_none(&s.message)]);
    }
    r
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
            or_none(&host_message(h)),
        ]);
    }
    r
}

/// Why a host is as it is: the reason it was cordoned with, else its
/// status message.
pub fn host_message(h: &Host) -> String {
    match (h.spec().unschedulable, h.spec().unschedulable_reason.as_str()) {
        (true, "") => "cordoned".into(),
        (true, why) => format!("cordoned: {why}"),
        (false, _) => h.status().message.clone(),
    }
}

fn test_row(t: &Test, wide: bool) -> Vec<String> {
    let s = t.status();
    let hosts: u32 = t.spec().hosts.iter().map(|h| h.count.unwrap_or(1)).sum();
    let done = s.steps.iter().filter(|st| st.phase == StepPhase::Succeeded).count();
    // As kubectl shows a pod being deleted: its test is being cancelled.
    let shown = match s.phase.as_str() {
        p if !t.meta().deletion_timestamp.is_empty() && !phase::test_terminal(p) => "Terminating".to_string(),
        p => or_none(p),
    };
    let mut r = vec![
        t.name().to_string(),
        shown,
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
/// The widths only grow: rows printed one at a time (`get -w`) stay
/// aligned with those before them.
#[derive(Debug, Default)]
pub struct Aligned {
    widths: Vec<usize>,
}

impl Aligned {
    /// Widens the columns to fit `rows`.
    pub fn fit(&mut self, rows: &[Vec<String>]) {
        for r in rows {
            if self.widths.len() < r.len() {
                self.widths.resize(r.len(), 0);
            }
            for (w, c) in self.widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
    }

    pub fn line(&self, r: &[String]) -> String {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{c:<w$}   ", w = self.widths.get(i).copied().unwrap_or(0)));
            } else {
                line.push_str(c);
            }
        }
        format!("{}\n", line.trim_end())
    }
}

pub fn table(rows: &[Vec<String>]) -> String {
    let mut a = Aligned::default();
    a.fit(rows);
    rows.iter().map(|r| a.line(r)).collect()
}

/// What of an object `get -w` shows: it prints an event only when this
/// changed. A host's lease renewals and a new resourceVersion alone are
/// not changes; in a table, neither is the AGE column.
pub fn change_key(o: &Object, fmt: &Format) -> String {
    if fmt.is_table() {
        let mut r = row(o, fmt);
        if let Some(age) = header(o.kind(), fmt).iter().position(|h| h == "AGE") {
            r.remove(age);
        }
        return r.join("\u{0}");
    }
    let mut v = o.to_json();
    if let Some(m) = v.get_mut("metadata").and_then(serde_json::Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    if let Some(s) = v.get_mut("status").and_then(serde_json::Value::as_object_mut) {
        s.remove("leaseRenewTime");
    }
    v.to_string()
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

/// The JSON a whole answer is: the object itself when one was asked for by
/// name, else a List.
fn answer_value(objs: &[Object], asked: Asked) -> serde_json::Value {
    if asked == Asked::One && objs.len() == 1 {
        objs[0].to_json()
    } else {
        list_value(objs.iter().map(Object::to_json).collect())
    }
}

pub fn print(objs: &[Object], fmt: &Format, asked: Asked, opts: &TableOpts) {
    match fmt {
        Format::Table | Format::Wide | Format::CustomColumns(_) => {
            let Some(first) = objs.first() else {
                eprintln!("No resources found.");
                return;
            };
            let mut rows = vec![header_with(first.kind(), fmt, opts)];
            rows.extend(objs.iter().map(|o| row_with(o, fmt, opts)));
            let text = table(&rows);
            match opts.no_headers {
                true => print!("{}", text.split_once('\n').map(|(_, rest)| rest).unwrap_or("")),
                false => print!("{text}"),
            }
        }
        Format::Name => {
            for o in objs {
                println!("{}/{}", kind_slug(o.kind()), o.meta().name);
            }
        }
        Format::JsonPath(t) => print!("{}", t.render(&answer_value(objs, asked))),
        Format::Yaml => print!("{}", to_yaml(&answer_value(objs, asked))),
        Format::Json => println!("{}", serde_json::to_string_pretty(&answer_value(objs, asked)).unwrap_or_default()),
    }
}
