//! Host leases: a host is Ready while its agent renews its lease (plus a
//! grace period), NotReady after. A claim naming a test that no longer
//! exists is released.
use crate::error::{Doing, Error};
use crate::runtime::Action;
use crate::Context;
use std::time::{Duration, SystemTime};
use testbus_proto::states::HostPhase;
use testbus_proto::states::{ConditionStatus, ConditionType};
use testbus_proto::{time, Host, Resource, Test};

/// A host whose reconcile keeps failing says so in its conditions.
pub async fn report_trouble(ctx: &Context, name: &str, trouble: crate::runtime::Trouble) {
    crate::runtime::report_trouble(ctx.client.api::<Host>(), name, trouble, |h| &mut h.status_mut().conditions).await
}

pub async fn reconcile(ctx: &Context, name: &str) -> Result<Action, Error> {
    let Some(h) = ctx.hosts.get(name) else {
        return Ok(Action::AwaitChange);
    };
    let s = h.status();
    let lease = Duration::from_secs(u64::from(s.lease_duration_seconds.max(1)));
    // Leases count from the controllers' start at the earliest: while the
    // control plane was down nobody could renew.
    let renewed = time::parse(&s.lease_renew_time).map(|t| t.max(ctx.started));
    let expires = renewed.map(|t| t + lease + ctx.cfg.lease_grace);
    let now = SystemTime::now();
    let given_up = testbus_proto::states::lease_given_up(s);
    let alive = !given_up && expires.is_some_and(|e| e > now);
    let want = if alive { HostPhase::Ready } else { HostPhase::NotReady };

    let mut orphan = false;
    if let Some(c) = s.claim.as_ref() {
        let cached = ctx.tests.get(&c.test);
        if cached.as_ref().is_none_or(|t| t.meta().uid != c.test_uid) {
            // The caches may lag each other: ask the API before releasing.
            let live =
                ctx.client.api::<Test>().get_opt(&c.test).await.doing("reading the test that claims the host")?;
            orphan = live.is_none_or(|t| t.meta().uid != c.test_uid);
        }
    }

    let ready = ready_condition(alive, given_up, &s.lease_renew_time);
    let stale = !s.conditions.iter().any(|c| {
        c.r#type == ready.r#type && c.status == ready.status && c.reason == ready.reason && c.message == ready.message
    });
    if s.phase != want || orphan || stale {
        let mut next: Host = (*h).clone();
        let st = next.status_mut();
        st.phase = want.to_string();
        st.message = if alive { String::new() } else { ready.message.clone() };
        crate::test_plan::set_condition(&mut st.conditions, ready);
        if orphan {
            st.claim = None;
        }
        ctx.client.api::<Host>().update_status(next).await.doing("writing the host's status")?;
        if s.phase != want {
            tracing::info!(host = name, phase = want.as_str(), "host phase changed");
        }
    }
    quarantine(ctx, &h).await?;
    Ok(match expires.and_then(|e| e.duration_since(now).ok()) {
        Some(left) => Action::Requeue(left + Duration::from_millis(10)),
        None => Action::AwaitChange,
    })
}

/// The host's Ready condition: True while its agent renews its lease;
/// False saying why (it stopped, or its lease ran out) after.
fn ready_condition(alive: bool, given_up: bool, renewed: &str) -> testbus_proto::Condition {
    let (status, reason, message) = if alive {
        (ConditionStatus::True, "LeaseRenewed", "its agent renews its lease".to_string())
    } else if given_up {
        (ConditionStatus::False, "AgentStopped", format!("its agent stopped (at {renewed})"))
    } else {
        let when = if renewed.is_empty() { "never" } else { renewed };
        (ConditionStatus::False, "LeaseExpired", format!("lease expired (last renewed {when})"))
    };
    testbus_proto::Condition::new(ConditionType::Ready, status, reason, message)
}

/// Counts the host's infrastructure failures in a row (`status.infraFailures`)
/// and, at the threshold, makes it unschedulable with the reason and a
/// `Quarantined` condition. Only an admin's `uncordon` lets it run again.
async fn quarantine(ctx: &Context, h: &Host) -> Result<(), Error> {
    let since = h
        .meta()
        .annotations
        .get(crate::health::HEALTHY_SINCE)
        .and_then(|t| time::parse(t))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let streak = ctx.ledger.streak(h.name(), since);
    let count = streak.len() as u32;
    let reason = crate::health::quarantine_reason(&streak, ctx.cfg.quarantine_after);
    let api = ctx.client.api::<Host>();
    if let Some(why) = reason.as_ref().filter(|_| !h.spec().unschedulable) {
        let mut next = h.clone();
        next.spec_mut().unschedulable = true;
        next.spec_mut().unschedulable_reason = why.clone();
        api.update(next).await.doing("quarantining the host")?;
        tracing::warn!(host = h.name(), failures = count, "host quarantined");
    }
    let quarantined = reason.is_some();
    let has_condition = h.status().conditions.iter().any(|c| c.is(ConditionType::Quarantined, ConditionStatus::True));
    if h.status().infra_failures != count || quarantined != has_condition {
        let why = reason.unwrap_or_default();
        api.patch_status(h.name(), |host| {
            let st = host.status_mut();
            st.infra_failures = count;
            st.conditions.retain(|c| c.r#type != ConditionType::Quarantined);
            if quarantined {
                let c = testbus_proto::Condition::new(
                    ConditionType::Quarantined,
                    ConditionStatus::True,
                    "InfraFailures",
                    &why,
                );
                st.conditions.push(c);
            }
            true
        })
        .await
        .doing("counting the host's infrastructure failures")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_condition_says_why_a_host_is_not() {
        let c = ready_condition(true, false, "2026-01-01T00:00:00Z");
        assert_eq!((c.r#type.as_str(), c.status.as_str(), c.reason.as_str()), ("Ready", "True", "LeaseRenewed"));
        let c = ready_condition(false, true, "2026-01-01T00:00:00Z");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "AgentStopped"));
        assert!(c.message.contains("2026-01-01T00:00:00Z"), "{c:?}");
        let c = ready_condition(false, false, "");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            ("False", "LeaseExpired", "lease expired (last renewed never)")
        );
    }
}
