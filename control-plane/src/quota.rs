//! How much of a bounded resource one identity may hold at once: watches,
//! the dashboard's live streams. A server-wide cap alone lets one caller
//! take all of it; these keep every other caller's share.
use crate::authz::Caller;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::Status;

/// At most `max` of `what` per identity. The local socket and `--insecure`
/// listeners (the controllers, an operator on the machine) are not
/// counted.
pub struct Quota {
    what: &'static str,
    max: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// One unit of a quota, given back when dropped.
pub struct QuotaGuard {
    quota: Arc<Quota>,
    key: String,
}

impl Quota {
    pub fn new(what: &'static str, max: usize) -> Arc<Quota> {
        Arc::new(Quota { what, max, held: Mutex::default() })
    }

    /// One more for `caller`, or ResourceExhausted naming the limit.
    pub fn take(self: &Arc<Self>, caller: &Caller) -> Result<Option<QuotaGuard>, Status> {
        let key = match caller {
            Caller::Certified { .. } => caller.subject().map(|s| s.to_string()).unwrap_or_default(),
            Caller::Anonymous => "anonymous".to_string(),
            Caller::Local | Caller::Insecure => return Ok(None),
        };
        let mut held = self.held.lock();
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return Err(crate::error::ApiError::ResourceExhausted(format!(
                "{} holds {} {}, the most one identity may at once: close some first",
                caller.describe(),
                self.max,
                self.what
            ))
            .into());
        }
        *n += 1;
        Ok(Some(QuotaGuard { quota: self.clone(), key }))
    }

    /// How many `caller`'s key holds (for tests).
    pub fn held(&self, key: &str) -> usize {
        self.held.lock().get(key).copied().unwrap_or(0)
    }
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        let mut held = self.quota.held.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_holds_its_share_and_gives_it_back() {
        let q = Quota::new("watches", 2);
        let alice = Caller::Certified {
            name: "alice".into(),
            role: testbus_pki::Role::Viewer,
            issued: std::time::SystemTime::now(),
            pool: None,
        };
        let host = Caller::Certified {
            name: "alice".into(),
            role: testbus_pki::Role::Agent,
            issued: std::time::SystemTime::now(),
            pool: None,
        };
        let a = q.take(&alice).unwrap();
        let b = q.take(&alice).unwrap();
        let e = q.take(&alice).err().expect("a third is refused");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("viewer \"alice\" holds 2 watches, the most one identity may"), "{e:?}");
        assert!(q.take(&host).unwrap().is_some(), "host alice is another identity");
        assert!(q.take(&Caller::Local).unwrap().is_none(), "the local socket is not counted");
        drop((a, b));
        assert_eq!(q.held("user:alice"), 0);
        assert!(q.take(&alice).is_ok());
    }
}
