//! `results`: a test's outcome as cases — one per process of each step, one
//! per result the test recorded — in text, JSON, JUnit XML or TAP.
use quick_xml::escape::escape;
use serde_json::json;
use testbus_proto::{phase, time, Resource, Test};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Junit,
    Tap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
    Error,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::Error => "error",
        }
    }
}

struct Case {
    /// Dotted group: the step, or the recorded path without its last part.
    group: String,
    name: String,
    outcome: Outcome,
    message: String,
    seconds: f64,
}

fn seconds(start: &str, end: &str) -> f64 {
    match (time::parse(start), time::parse(end)) {
        (Some(a), Some(b)) => b.duration_since(a).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        _ => 0.0,
    }
}

fn cases(t: &Test) -> Vec<Case> {
    let mut out = Vec::new();
    for st in &t.status().steps {
        if st.processes.is_empty() {
            let outcome = if st.phase == phase::SKIPPED { Outcome::Skip } else { Outcome::Error };
            out.push(Case {
                group: st.name.clone(),
                name: st.name.clone(),
                outcome,
                message: if st.phase == phase::SKIPPED {
                    "not run: an earlier step failed".into()
                } else {
                    st.phase.clone()
                },
                seconds: 0.0,
            });
            continue;
        }
        for p in &st.processes {
            let outcome = match (st.phase.as_str(), p.phase.as_str()) {
                (phase::SUCCEEDED, _) | (_, phase::SUCCEEDED) => Outcome::Pass,
                (_, phase::FAILED) => Outcome::Fail,
                (_, phase::KILLED) => Outcome::Skip,
                _ => Outcome::Error,
            };
            out.push(Case {
                group: st.name.clone(),
                name: format!("{}@{}", p.role, p.host),
                outcome,
                message: if outcome == Outcome::Pass { String::new() } else { p.message.clone() },
                seconds: seconds(&p.start_time, &p.finish_time),
            });
        }
    }
    for r in &t.status().results {
        let (group, name) = r.path.rsplit_once('.').unwrap_or(("results", r.path.as_str()));
        let outcome = match r.outcome.as_str() {
            "pass" => Outcome::Pass,
            "skip" => Outcome::Skip,
            _ => Outcome::Fail,
        };
        out.push(Case { group: group.into(), name: name.into(), outcome, message: r.message.clone(), seconds: 0.0 });
    }
    out
}

pub fn render(t: &Test, fmt: ReportFormat) -> String {
    let cs = cases(t);
    let s = t.status();
    let count = |o: Outcome| cs.iter().filter(|c| c.outcome == o).count();
    let name = t.name();
    match fmt {
        ReportFormat::Text => {
            let mut out = format!("test/{name}: {}", s.phase);
            if !s.reason.is_empty() {
                out.push_str(&format!(
                    " ({}{})",
                    s.reason,
                    if s.message.is_empty() { String::new() } else { format!(": {}", s.message) }
                ));
            }
            out.push('\n');
            let width = cs.iter().map(|c| c.group.len() + c.name.len() + 1).max().unwrap_or(0);
            for c in &cs {
                let id = format!("{}/{}", c.group, c.name);
                out.push_str(&format!(
                    "  {:<5} {id:<width$}  {:>7.2}s  {}\n",
                    c.outcome.word().to_uppercase(),
                    c.seconds,
                    c.message
                ));
            }
            out.push_str(&format!(
                "passed: {}, failed: {}, errors: {}, skipped: {}\n",
                count(Outcome::Pass),
                count(Outcome::Fail),
                count(Outcome::Error),
                count(Outcome::Skip)
            ));
            out
        }
        ReportFormat::Json => {
            let v = json!({
                "test": name,
                "phase": s.phase,
                "reason": s.reason,
                "message": s.message,
                "startTime": s.start_time,
                "completionTime": s.completion_time,
                "cases": cs.iter().map(|c| json!({
                    "group": c.group, "name": c.name, "outcome": c.outcome.word(),
                    "message": c.message, "seconds": c.seconds,
                })).collect::<Vec<_>>(),
            });
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        ReportFormat::Junit => {
            let total: f64 = cs.iter().map(|c| c.seconds).sum();
            let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
            out.push_str(&format!(
                "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{total:.3}\">\n",
                escape(name),
                cs.len(),
                count(Outcome::Fail),
                count(Outcome::Error),
                count(Outcome::Skip)
            ));
            out.push_str(&format!(
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{total:.3}\" timestamp=\"{}\">\n",
                escape(name),
                cs.len(),
                count(Outcome::Fail),
                count(Outcome::Error),
                count(Outcome::Skip),
                escape(&s.start_time)
            ));
            for c in &cs {
                out.push_str(&format!(
                    "    <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\"",
                    escape(name),
                    escape(&c.group),
                    escape(&c.name),
                    c.seconds
                ));
                let body = match c.outcome {
                    Outcome::Pass => None,
                    Outcome::Fail => Some("failure"),
                    Outcome::Error => Some("error"),
                    Outcome::Skip => Some("skipped"),
                };
                match body {
                    None => out.push_str("/>\n"),
                    Some(tag) => out
                        .push_str(&format!(">\n      <{tag} message=\"{}\"/>\n    </testcase>\n", escape(&c.message))),
                }
            }
            out.push_str("  </testsuite>\n</testsuites>\n");
            out
        }
        ReportFormat::Tap => {
            let mut out = format!("TAP version 13\n1..{}\n", cs.len());
            for (i, c) in cs.iter().enumerate() {
                let id = format!("{}/{}", c.group, c.name).replace('#', "\\#");
                let msg = c.message.replace('\n', " ");
                match c.outcome {
                    Outcome::Pass => out.push_str(&format!("ok {} - {id}\n", i + 1)),
                    Outcome::Skip => out.push_str(&format!("ok {} - {id} # SKIP {msg}\n", i + 1)),
                    _ => {
                        out.push_str(&format!("not ok {} - {id}\n", i + 1));
                        if !msg.is_empty() {
                            out.push_str(&format!(
                                "  ---\n  message: {}\n  ...\n",
                                serde_json::to_string(&msg).unwrap_or_default()
                            ));
                        }
                    }
                }
            }
            out
        }
    }
}
