//! A test's outcome as cases — one per process of each step, one per result
//! the test recorded — in text, JSON, JUnit XML or TAP. `testbusctl results`
//! and the dashboard's downloads render the same report.
#![forbid(unsafe_code)]
use serde_json::json;
use testbus_proto::states::{ProcessPhase, StepPhase};
use testbus_proto::states::{TestPhase, TestReason};
use testbus_proto::{phase, time, Resource, Test};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
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
    /// The process the case is, if it is one (its output goes with it).
    process: Option<String>,
    /// A result recorded at a dotted path (`testbusctl result`).
    recorded: bool,
}

impl Case {
    /// How text and TAP name the case: `step/role@host` for a process, the
    /// dotted path as recorded (`users.verify-name`) for a recorded result.
    fn id(&self) -> String {
        match (self.recorded, self.group.as_str()) {
            (true, RESULTS_GROUP) => self.name.clone(),
            (true, group) => format!("{group}.{}", self.name),
            (false, group) => format!("{group}/{}", self.name),
        }
    }
}

/// Whether XML 1.0 can carry `c` at all (its `Char` production): not the
/// C0 controls but tab, newline and carriage return, nor U+FFFE/U+FFFF.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// `s` as XML text or attribute value: markup escaped, and each character
/// XML 1.0 cannot carry (ESC, BEL, VT, ...) written out as `\u{1b}`, so
/// that every report a CI server reads is well-formed and loses nothing.
fn xml(s: &str) -> String {
    let visible: std::borrow::Cow<'_, str> = if s.chars().all(xml_char) {
        s.into()
    } else {
        s.chars()
            .map(|c| if xml_char(c) { c.to_string() } else { format!("\\u{{{:x}}}", u32::from(c)) })
            .collect::<String>()
            .into()
    };
    quick_xml::escape::escape(visible.as_ref()).into_owned()
}

/// The group of a recorded result whose path has no dot.
const RESULTS_GROUP: &str = "results";

/// A process's output as a report carries it: the tail of each stream.
#[derive(Debug, Default, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Bytes of each stream a report keeps per process (the tail).
pub const OUTPUT_IN_REPORT: usize = 64 << 10;

/// Why the processes a test stopped did not finish: when the test ended
/// because of the infrastructure or a user (a timeout, a lost host, a
/// cancel), each is an error naming that; when it ended because a step
/// failed, the others were only cut short (skipped).
fn stop_outcome(t: &Test) -> (Outcome, String) {
    let s = t.status();
    let why = if s.message.is_empty() { s.reason.clone() } else { format!("{}: {}", s.reason, s.message) };
    match s.reason.parse::<TestReason>().map(|r| r.phase()) {
        Ok(TestPhase::Error | TestPhase::Cancelled) => (Outcome::Error, format!("stopped: {why}")),
        _ => (Outcome::Skip, format!("stopped when the test ended ({why})")),
    }
}

fn seconds(start: &str, end: &str) -> f64 {
    match (time::parse(start), time::parse(end)) {
        (Some(a), Some(b)) => b.duration_since(a).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        _ => 0.0,
    }
}

fn cases(t: &Test) -> Vec<Case> {
    let mut out = Vec::new();
    let (stopped, stopped_why) = stop_outcome(t);
    let ended = if t.status().reason.is_empty() { "the test ended".to_string() } else { t.status().reason.clone() };
    for st in &t.status().steps {
        if st.processes.is_empty() {
            let (outcome, message) = if st.phase == StepPhase::Skipped {
                match stopped {
                    Outcome::Error => (Outcome::Error, format!("not run: {ended}")),
                    _ => (Outcome::Skip, "not run: an earlier step failed".to_string()),
                }
            } else {
                (Outcome::Error, st.phase.clone())
            };
            out.push(Case {
                group: st.name.clone(),
                name: st.name.clone(),
                outcome,
                message,
                seconds: 0.0,
                process: None,
                recorded: false,
            });
            continue;
        }
        for p in &st.processes {
            let (outcome, message) = match (st.phase.parse().ok(), p.phase.parse().ok()) {
                (Some(StepPhase::Succeeded), _) | (_, Some(ProcessPhase::Succeeded)) => (Outcome::Pass, String::new()),
                (_, Some(ProcessPhase::Failed)) if p.message.contains("timed out") => {
                    (Outcome::Error, p.message.clone())
                }
                (_, Some(ProcessPhase::Failed)) => (Outcome::Fail, p.message.clone()),
                (_, Some(ProcessPhase::Killed)) => (stopped, stopped_why.clone()),
                _ => (Outcome::Error, format!("{}: {}", p.phase, p.message)),
            };
            out.push(Case {
                group: st.name.clone(),
                name: format!("{}@{}", p.role, p.host),
                outcome,
                message,
                seconds: seconds(&p.start_time, &p.finish_time),
                process: Some(p.name.clone()),
                recorded: false,
            });
        }
    }
    for r in &t.status().results {
        let (group, name) = r.path.rsplit_once('.').unwrap_or((RESULTS_GROUP, r.path.as_str()));
        let outcome = match r.outcome.as_str() {
            "pass" => Outcome::Pass,
            "skip" => Outcome::Skip,
            _ => Outcome::Fail,
        };
        out.push(Case {
            group: group.into(),
            name: name.into(),
            outcome,
            message: r.message.clone(),
            seconds: 0.0,
            process: None,
            recorded: true,
        });
    }
    out
}

/// The report of `t`; JUnit carries each process's output from `outputs`
/// (by process name) as `system-out`/`system-err`.
/// How each earlier attempt of a test ended (retried for the
/// infrastructure's sake): "attempt 1: HostLost on host-0: why".
fn attempt_lines(t: &Test) -> Vec<(u32, String)> {
    t.status()
        .attempts
        .iter()
        .map(|a| {
            let why = if a.message.is_empty() { String::new() } else { format!(": {}", a.message) };
            (a.number, format!("{} on {}{why}", a.reason, a.hosts.join(", ")))
        })
        .collect()
}

pub fn render(t: &Test, fmt: ReportFormat, outputs: &std::collections::HashMap<String, Output>) -> String {
    let cs = cases(t);
    let s = t.status();
    let attempts = attempt_lines(t);
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
            for (n, line) in &attempts {
                out.push_str(&format!("  attempt {n} (retried): {line}\n"));
            }
            let width = cs.iter().map(|c| c.id().len()).max().unwrap_or(0);
            for c in &cs {
                let id = c.id();
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
                "attempts": s.attempts.len() + 1,
                "earlierAttempts": s.attempts.iter().map(|a| json!({
                    "number": a.number, "reason": a.reason, "message": a.message, "hosts": a.hosts,
                    "startTime": a.start_time, "finishTime": a.finish_time,
                })).collect::<Vec<_>>(),
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
                xml(name),
                cs.len(),
                count(Outcome::Fail),
                count(Outcome::Error),
                count(Outcome::Skip)
            ));
            out.push_str(&format!(
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{total:.3}\" timestamp=\"{}\">\n",
                xml(name),
                cs.len(),
                count(Outcome::Fail),
                count(Outcome::Error),
                count(Outcome::Skip),
                xml(&s.start_time)
            ));
            if !attempts.is_empty() {
                // The final attempt is the suite; the earlier ones are
                // properties.
                out.push_str("    <properties>\n");
                out.push_str(&format!(
                    "      <property name=\"testbus.attempts\" value=\"{}\"/>\n",
                    attempts.len() + 1
                ));
                for (n, line) in &attempts {
                    out.push_str(&format!("      <property name=\"testbus.attempt.{n}\" value=\"{}\"/>\n", xml(line)));
                }
                out.push_str("    </properties>\n");
            }
            for c in &cs {
                out.push_str(&format!(
                    "    <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\"",
                    xml(name),
                    xml(&c.group),
                    xml(&c.name),
                    c.seconds
                ));
                let body = match c.outcome {
                    Outcome::Pass => None,
                    Outcome::Fail => Some("failure"),
                    Outcome::Error => Some("error"),
                    Outcome::Skip => Some("skipped"),
                };
                let output = c.process.as_ref().and_then(|p| outputs.get(p));
                if body.is_none() && output.is_none_or(|o| o.stdout.is_empty() && o.stderr.is_empty()) {
                    out.push_str("/>\n");
                    continue;
                }
                out.push_str(">\n");
                if let Some(tag) = body {
                    out.push_str(&format!("      <{tag} message=\"{}\"/>\n", xml(&c.message)));
                }
                if let Some(o) = output {
                    for (tag, text) in [("system-out", &o.stdout), ("system-err", &o.stderr)] {
                        if !text.is_empty() {
                            out.push_str(&format!("      <{tag}>{}</{tag}>\n", xml(text.as_str())));
                        }
                    }
                }
                out.push_str("    </testcase>\n");
            }
            out.push_str("  </testsuite>\n</testsuites>\n");
            out
        }
        ReportFormat::Tap => {
            let mut out = format!("TAP version 13\n1..{}\n", cs.len());
            for (n, line) in &attempts {
                out.push_str(&format!("# attempt {n} (retried): {}\n", line.replace('\n', " ")));
            }
            for (i, c) in cs.iter().enumerate() {
                let id = c.id().replace('#', "\\#");
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

/// How many of a failed process's last stderr lines are shown beside its
/// test (`describe`, `apply --wait`, the dashboard's test page).
pub const FAILED_TAIL_LINES: usize = 10;

/// The processes of `t`'s steps (of `step` only, when given) that ended
/// without succeeding, with their step's name: in step order, then by role.
pub fn failed_processes<'a>(t: &'a Test, step: Option<&str>) -> Vec<(&'a str, &'a testbus_proto::ProcessResult)> {
    let mut out: Vec<(&str, &testbus_proto::ProcessResult)> = Vec::new();
    for st in t.status().steps.iter().filter(|st| step.is_none_or(|s| s == st.name)) {
        let mut failed: Vec<_> = st
            .processes
            .iter()
            .filter(|p| phase::process_terminal(&p.phase) && p.phase != ProcessPhase::Succeeded)
            .map(|p| (st.name.as_str(), p))
            .collect();
        failed.sort_by(|a, b| a.1.role.cmp(&b.1.role));
        out.extend(failed);
    }
    out
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().rev().take(n).map(str::to_string).collect();
    lines.reverse();
    lines
}

/// Collects one process's output as a report keeps it: the last
/// [`OUTPUT_IN_REPORT`] bytes of each stream, characters XML 1.0 cannot
/// carry dropped. Memory stays bounded however much is fed.
#[derive(Debug, Default)]
pub struct OutputTail {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl OutputTail {
    /// Adds a chunk of stream `stream` (1: stderr, else stdout).
    pub fn push(&mut self, stream: i32, data: &[u8]) {
        let buf = if stream == 1 { &mut self.stderr } else { &mut self.stdout };
        buf.extend_from_slice(data);
        if buf.len() > 2 * OUTPUT_IN_REPORT {
            buf.drain(..buf.len() - OUTPUT_IN_REPORT);
        }
    }

    pub fn finish(self) -> Output {
        let text = |b: &[u8]| {
            let tail = &b[b.len().saturating_sub(OUTPUT_IN_REPORT)..];
            String::from_utf8_lossy(tail)
                .chars()
                .filter(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r'))
                .collect::<String>()
        };
        Output { stdout: text(&self.stdout), stderr: text(&self.stderr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_tail_keeps_the_end_and_drops_what_xml_cannot_carry() {
        let mut t = OutputTail::default();
        for _ in 0..5 {
            t.push(0, &vec![b'a'; OUTPUT_IN_REPORT]);
        }
        t.push(0, b"end\x07\n");
        t.push(1, b"err");
        let o = t.finish();
        assert_eq!(o.stdout.len(), OUTPUT_IN_REPORT - 1);
        assert!(o.stdout.ends_with("aend\n"));
        assert_eq!(o.stderr, "err");
    }

    #[test]
    fn what_xml_cannot_carry_is_written_out() {
        assert_eq!(
            xml("a\u{1b}[31mred\u{7}\u{b}<&>\"'\u{fffe}\n"),
            "a\\u{1b}[31mred\\u{7}\\u{b}&lt;&amp;&gt;&quot;&apos;\\u{fffe}\n"
        );
    }

    fn test_with(name: &str, step: &str, role: &str, message: &str, result: (&str, &str)) -> Test {
        let mut t = Test::default();
        t.meta_mut().name = name.into();
        let s = t.status_mut();
        s.phase = ProcessPhase::Failed.into();
        s.reason = message.into();
        s.message = message.into();
        s.start_time = message.into();
        s.steps.push(testbus_proto::StepStatus {
            name: step.into(),
            phase: ProcessPhase::Failed.into(),
            processes: vec![testbus_proto::ProcessResult {
                name: "p".into(),
                role: role.into(),
                host: message.into(),
                phase: ProcessPhase::Failed.into(),
                message: message.into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        s.steps.push(testbus_proto::StepStatus { name: role.into(), phase: message.into(), ..Default::default() });
        s.results.push(testbus_proto::TestResult {
            path: result.0.into(),
            outcome: "fail".into(),
            message: result.1.into(),
            ..Default::default()
        });
        s.attempts.push(testbus_proto::Attempt {
            number: 1,
            reason: message.into(),
            message: result.1.into(),
            hosts: vec![role.into(), step.into()],
            ..Default::default()
        });
        t
    }

    /// The final attempt is what a report shows; earlier attempts (retried
    /// for the infrastructure's sake) are said beside it: JUnit properties,
    /// TAP comments, text and JSON lines.
    #[test]
    fn earlier_attempts_are_shown_beside_the_final_one() {
        let mut t = test_with("t", "s", "a", "boom", ("r", "m"));
        t.status_mut().attempts[0] = testbus_proto::Attempt {
            number: 1,
            reason: "HostLost".into(),
            message: "host host-0 (a) was lost: lease expired".into(),
            hosts: vec!["host-0".into()],
            ..Default::default()
        };
        let none = Default::default();
        let junit = render(&t, ReportFormat::Junit, &none);
        assert!(junit.contains(r#"<property name="testbus.attempts" value="2"/>"#), "{junit}");
        assert!(
            junit.contains(r#"<property name="testbus.attempt.1" value="HostLost on host-0: host host-0 (a) was lost: lease expired"/>"#),
            "{junit}"
        );
        let tap = render(&t, ReportFormat::Tap, &none);
        assert!(tap.contains("\n# attempt 1 (retried): HostLost on host-0: host host-0 (a) was lost"), "{tap}");
        let text = render(&t, ReportFormat::Text, &none);
        assert!(text.contains("  attempt 1 (retried): HostLost on host-0"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render(&t, ReportFormat::Json, &none)).unwrap();
        assert_eq!(json["attempts"], 2);
        assert_eq!(json["earlierAttempts"][0]["hosts"][0], "host-0");
        t.status_mut().attempts.clear();
        assert!(!render(&t, ReportFormat::Junit, &none).contains("<properties>"), "no attempts, no properties");
    }

    proptest::proptest! {
        /// Whatever the bytes in output, messages and names, JUnit is
        /// well-formed XML (checked by a strict XML 1.0 parser), with a case
        /// for every process, step and result.
        #[test]
        fn junit_is_well_formed_whatever_it_carries(
            name in ".*", step in ".*", role in ".*", message in ".*",
            path in ".*", result in ".*",
            out in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            err in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let t = test_with(&name, &step, &role, &message, (&path, &result));
            let mut tail = OutputTail::default();
            tail.push(0, &out);
            tail.push(1, &err);
            let outputs = [("p".to_string(), tail.finish())].into();
            let text = render(&t, ReportFormat::Junit, &outputs);
            let doc = roxmltree::Document::parse(&text);
            proptest::prop_assert!(doc.is_ok(), "{:?}\n{}", doc.err(), text);
            let doc = doc.unwrap();
            proptest::prop_assert_eq!(doc.descendants().filter(|n| n.has_tag_name("testcase")).count(), 3);
        }
    }
}
