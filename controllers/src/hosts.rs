//! Host leases: a host is Ready while its agent renews its lease (plus a
//! grace period), NotReady after. A claim naming a test that no longer
//! exists is released.
use crate::runtime::Action;
use crate::Context;
use std::time::{Duration, SystemTime};
use testbus_proto::{phase, time, Host, Resource, Test};
use tonic::Status;

/// A host whose reconcile keeps failing says so in its conditions.
pub async fn report_trouble(ctx: &Context, name: &str, trouble: crate::runtime::Trouble) {
    crate::runtime::report_trouble(ctx.client.api::<Host>(), name, trouble, |h| &mut h.status_mut().conditions).await
}

pub async fn reconcile(ctx: &Context, name: &str) -> Result<Action, Status> {
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
    let want = if alive { phase::READY } else { phase::NOT_READY };

    let mut orphan = false;
    if let Some(c) = s.claim.as_ref() {
        let cached = ctx.tests.get(&c.test);
        if cached.as_ref().is_none_or(|t| t.meta().uid != c.test_uid) {
            // The caches may lag each other: ask the API before releasing.
            let live = ctx.client.api::<Test>().get_opt(&c.test).await?;
            orphan = live.is_none_or(|t| t.meta().uid != c.test_uid);
        }
    }

    if s.phase != want || orphan {
        let mut next: Host = (*h).clone();
        let st = next.status_mut();
        st.phase = want.to_string();
        st.message = if alive {
            String::new()
        } else if given_up {
            format!("its agent stopped (at {})", s.lease_renew_time)
        } else {
            format!(
                "lease expired (last renewed {})",
                if s.lease_renew_time.is_empty() { "never" } else { &s.lease_renew_time }
            )
        };
        if orphan {
            st.claim = None;
        }
        ctx.client.api::<Host>().update_status(next).await?;
        if want != s.phase {
            tracing::info!(host = name, phase = want, "host phase changed");
        }
    }
    quarantine(ctx, &h).await?;
    Ok(match expires.and_then(|e| e.duration_since(now).ok()) {
        Some(left) => Action::Requeue(left + Duration::from_millis(10)),
        None => Action::AwaitChange,
    })
}

/// Counts the host's infrastructure failures in a row (`status.infraFailures`)
/// and, at the threshold, makes it unschedulable with the reason and a
/// `Quarantined` condition. Only an admin's `uncordon` lets it run again.
async fn quarantine(ctx: &Context, h: &Host) -> Result<(), Status> {
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
        api.update(next).await?;
        tracing::warn!(host = h.name(), failures = count, "host quarantined");
    }
    let quarantined = reason.is_some();
    let has_condition = h.status().conditions.iter().any(|c| c.r#type == "Quarantined" && c.status == "True");
    if h.status().infra_failures != count || quarantined != has_condition {
        let why = reason.unwrap_or_default();
        api.patch_status(h.name(), |host| {
            let st = host.status_mut();
            st.infra_failures = count;
            st.conditions.retain(|c| c.r#type != "Quarantined");
            if quarantined {
                st.conditions.push(testbus_proto::Condition {
                    r#type: "Quarantined".into(),
                    status: "True".into(),
                    reason: "InfraFailures".into(),
                    message: why.clone(),
                    last_transition_time: time::now(),
                });
            }
            true
        })
        .await?;
    }
    Ok(())
}
