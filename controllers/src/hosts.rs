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
    let alive = expires.is_some_and(|e| e > now);
    let want = if alive { phase::READY } else { phase::NOT_READY };

    let mut orphan = false;
    if let Some(c) = s.claim.as_ref().filter(|c| !c.test.is_empty()) {
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
    Ok(match expires.and_then(|e| e.duration_since(now).ok()) {
        Some(left) => Action::Requeue(left + Duration::from_millis(10)),
        None => Action::AwaitChange,
    })
}
