//! The claim-time `host_<role>_<var>` variables of the tests whose
//! processes run here (a Test's `status.hostVars`). Processes do not carry
//! them; each test's are read once per agent, whatever the number of its
//! processes, and shared: concurrent first readers wait on one read.
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use testbus_client::Client;
use testbus_proto::{Resource, Test};
use tokio::sync::OnceCell;
use tonic::Code;

pub type Vars = Arc<BTreeMap<String, String>>;

/// Tests remembered at most; beyond, those already read are forgotten (a
/// forgotten test is read again if another of its processes comes).
const REMEMBERED: usize = 64;
/// How long a read is retried while the API is unreachable.
const READ_LIMIT: Duration = Duration::from_secs(60);

pub struct TestVars {
    client: Client,
    /// By test uid: a new run of a test of the same name is another test.
    tests: Mutex<HashMap<String, Arc<OnceCell<Vars>>>>,
}

/// Why a test's variables cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VarsError {
    #[error("test {test} was deleted (another test has its name now)")]
    Replaced { test: String },
    #[error("test {test} was deleted")]
    Deleted { test: String },
    #[error("cannot read test {test}: {message}")]
    Unreachable { test: String, message: String },
}

impl TestVars {
    pub fn new(client: Client) -> Arc<Self> {
        Arc::new(TestVars { client, tests: Mutex::default() })
    }

    /// The variables of test `name` with `uid`; an error says why they
    /// cannot be had (the test is gone, or the API stayed unreachable).
    pub async fn of(&self, name: &str, uid: &str) -> Result<Vars, VarsError> {
        let cell = {
            let mut tests = self.tests.lock();
            if tests.len() >= REMEMBERED && !tests.contains_key(uid) {
                tests.retain(|_, c| !c.initialized());
            }
            tests.entry(uid.to_string()).or_default().clone()
        };
        cell.get_or_try_init(|| self.read(name, uid)).await.cloned()
    }

    async fn read(&self, name: &str, uid: &str) -> Result<Vars, VarsError> {
        let api = self.client.api::<Test>();
        let deadline = tokio::time::Instant::now() + READ_LIMIT;
        let mut backoff = Duration::from_millis(50);
        loop {
            match api.get(name).await {
                Ok(t) if t.meta().uid == uid => return Ok(Arc::new(t.status().host_vars.clone())),
                Ok(_) => return Err(VarsError::Replaced { test: name.into() }),
                Err(s) if s.code() == Code::NotFound => return Err(VarsError::Deleted { test: name.into() }),
                Err(s) if tokio::time::Instant::now() >= deadline => {
                    return Err(VarsError::Unreachable { test: name.into(), message: s.message().into() })
                }
                Err(s) => {
                    tracing::debug!(test = name, error = %s, "cannot read the test's variables; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
