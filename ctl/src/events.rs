//! The events `describe` shows: a timeline of an object, made from the
//! times it records (created, each condition's last transition, started,
//! each step's start and end, ended, deletion). Each is the latest of its
//! kind: a condition that changed twice shows its last change only.
use testbus_proto::states::{ProcessPhase, StepPhase, TestPhase};
use testbus_proto::{Object, Resource};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// RFC 3339, as stored.
    pub time: String,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

fn ev(time: &str, warning: bool, reason: &str, message: String) -> Option<Event> {
    (!time.is_empty()).then(|| Event { time: time.to_string(), warning, reason: reason.to_string(), message })
}

/// An object's events, oldest first.
pub fn of(o: &Object) -> Vec<Event> {
    let m = o.meta();
    let mut out: Vec<Option<Event>> =
        vec![ev(&m.creation_timestamp, false, "Created", format!("{} created", o.kind()))];
    let conditions = match o {
        Object::Test(t) => &t.status().conditions,
        Object::Host(h) => &h.status().conditions,
        Object::Process(p) => &p.status().conditions,
        Object::HostPool(p) => &p.status().conditions,
    };
    for c in conditions {
        let msg = if c.message.is_empty() { format!("{} {}", c.r#type, c.status) } else { c.message.clone() };
        let reason = if c.reason.is_empty() { c.r#type.clone() } else { c.reason.clone() };
        out.push(ev(&c.last_transition_time, c.status == testbus_proto::states::ConditionStatus::False, &reason, msg));
    }
    match o {
        Object::Test(t) => {
            let s = t.status();
            // Each earlier attempt: when it started, and how it failed.
            for a in &s.attempts {
                let claims: Vec<String> = a.claims.iter().map(|(r, h)| format!("{r}={h}")).collect();
                out.push(ev(&a.start_time, false, "Started", format!("attempt {} on {}", a.number, claims.join(" "))));
                let msg = format!(
                    "attempt {} failed on {}: {}; retried on other hosts",
                    a.number,
                    a.hosts.join(", "),
                    a.message
                );
                out.push(ev(&a.finish_time, true, "Retried", msg));
            }
            let claims: Vec<String> = s.claims.iter().map(|(r, h)| format!("{r}={h}")).collect();
            out.push(ev(&s.start_time, false, "Started", format!("running on {}", claims.join(" "))));
            for st in &s.steps {
                out.push(ev(&st.start_time, false, "StepStarted", format!("step {}", st.name)));
                let failed = st.phase != StepPhase::Succeeded;
                let mut msg = format!("step {} {}", st.name, st.phase);
                if !st.message.is_empty() {
                    msg.push_str(&format!(": {}", st.message));
                }
                out.push(ev(&st.completion_time, failed, &format!("Step{}", st.phase), msg));
            }
            let mut msg = s.phase.clone();
            if !s.message.is_empty() {
                msg.push_str(&format!(": {}", s.message));
            }
            let reason = if s.reason.is_empty() { s.phase.clone() } else { s.reason.clone() };
            out.push(ev(&s.completion_time, s.phase != TestPhase::Succeeded, &reason, msg));
        }
        Object::Process(p) => {
            let s = p.status();
            out.push(ev(&s.start_time, false, "Started", format!("pid {} on {}", s.pid, p.spec().host_name)));
            let end = match (s.exit_code, s.signal.is_empty()) {
                (Some(c), _) => format!("exit {c}"),
                (None, false) => s.signal.clone(),
                _ => String::new(),
            };
            let mut msg = [s.phase.as_str(), end.as_str(), s.message.as_str()]
                .iter()
                .filter(|x| !x.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            if msg.is_empty() {
                msg = "ended".into();
            }
            let reason = if s.reason.is_empty() { s.phase.clone() } else { s.reason.clone() };
            out.push(ev(&s.finish_time, s.phase != ProcessPhase::Succeeded, &reason, msg));
        }
        Object::Host(_) | Object::HostPool(_) => {}
    }
    out.push(ev(&m.deletion_timestamp, false, "Deleting", "deletion requested".into()));
    let mut out: Vec<Event> = out.into_iter().flatten().collect();
    // RFC 3339 in UTC sorts as text.
    out.sort_by(|a, b| a.time.cmp(&b.time));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbus_proto::{manifest, Condition};

    #[test]
    fn a_failed_test_reads_as_a_timeline() {
        let text = "apiVersion: testbus/v1\nkind: Test\nmetadata: {name: t}\nspec:\n  hosts: [{role: a}]\n  steps: [{name: s, on: [a], argv: [\"false\"]}]\n";
        let (_, o) = manifest::parse_documents("t", text).unwrap().remove(0);
        let Object::Test(mut t) = o else { panic!("a test") };
        t.metadata.as_mut().unwrap().creation_timestamp = "2026-11-26T10:00:00Z".into();
        let s = t.status.get_or_insert_with(Default::default);
        s.phase = ProcessPhase::Failed.into();
        s.message = "step s failed".into();
        s.start_time = "2026-11-26T10:00:02Z".into();
        s.completion_time = "2026-11-26T10:00:05Z".into();
        s.claims.insert("a".into(), "h1".into());
        s.conditions.push(Condition {
            r#type: "Scheduled".into(),
            status: "True".into(),
            reason: "Claimed".into(),
            message: String::new(),
            last_transition_time: "2026-11-26T10:00:01Z".into(),
        });
        s.steps.push(testbus_proto::StepStatus {
            name: "s".into(),
            phase: ProcessPhase::Failed.into(),
            start_time: "2026-11-26T10:00:03Z".into(),
            completion_time: "2026-11-26T10:00:04Z".into(),
            ..Default::default()
        });
        let evs = of(&Object::Test(t));
        let reasons: Vec<&str> = evs.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["Created", "Claimed", "Started", "StepStarted", "StepFailed", "Failed"]);
        assert!(evs[4].warning && evs[5].warning && !evs[2].warning);
        assert_eq!(evs[2].message, "running on a=h1");
        assert_eq!(evs[5].message, "Failed: step s failed");
    }
}
