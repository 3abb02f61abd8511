//! The states objects go through, as types. On the wire and in YAML they
//! stay strings (as Kubernetes keeps them); in code they are these enums,
//! each with `as_str` and `FromStr`, so a misspelt phase or reason is a
//! compile error and `validate` refuses a status no controller could write.
use crate::Condition;
use std::fmt;
use std::str::FromStr;

/// A string that is none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a {what} (one of {})", .known.join(", "))]
pub struct Unknown {
    pub what: &'static str,
    pub value: String,
    pub known: Vec<&'static str>,
}

macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $v:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $v),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$v => stringify!($v)),+ }
            }
        }

        impl FromStr for $name {
            type Err = Unknown;
            fn from_str(s: &str) -> Result<Self, Unknown> {
                match s {
                    $(stringify!($v) => Ok($name::$v),)+
                    _ => Err(Unknown {
                        what: $what,
                        value: s.to_string(),
                        known: $name::ALL.iter().map(|v| v.as_str()).collect(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.as_str()
            }
        }
    };
}

string_enum!(
    /// A Test's phase.
    TestPhase, "test phase" {
        /// Waiting for its hosts.
        Pending,
        /// Claimed its hosts; its steps run.
        Running,
        Succeeded,
        Failed,
        /// Cancelled (`testbusctl cancel`, the dashboard), or deleted while
        /// it ran.
        Cancelled,
        /// Ended by the infrastructure (a host lost, a timeout).
        Error,
    }
);

impl TestPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, TestPhase::Succeeded | TestPhase::Failed | TestPhase::Cancelled | TestPhase::Error)
    }
}

string_enum!(
    /// A Process's phase; it only moves forward.
    ProcessPhase, "process phase" {
        Pending,
        /// Its files are being downloaded.
        Fetching,
        /// Gated (a `sync` step): prepared, waiting to be released.
        Ready,
        Running,
        Succeeded,
        Failed,
        /// Stopped by a request or by its agent.
        Killed,
        /// Its host or its agent's record of it is gone.
        Lost,
    }
);

impl ProcessPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, ProcessPhase::Succeeded | ProcessPhase::Failed | ProcessPhase::Killed | ProcessPhase::Lost)
    }

    /// Where a phase stands in the order phases move in (terminal phases
    /// share the last place).
    pub fn rank(self) -> u8 {
        match self {
            ProcessPhase::Pending => 0,
            ProcessPhase::Fetching => 1,
            ProcessPhase::Ready => 2,
            ProcessPhase::Running => 3,
            _ => 4,
        }
    }
}

string_enum!(
    /// A Host's phase, from its lease.
    HostPhase, "host phase" {
        /// Registered, lease not judged yet.
        Pending,
        Ready,
        NotReady,
    }
);

string_enum!(
    /// A step's phase, derived from its processes.
    StepPhase, "step phase" {
        /// For its `after` steps.
        Waiting,
        Running,
        Succeeded,
        Failed,
        /// Never ran: an `after` step cannot succeed, or the test ended.
        Skipped,
        /// Its processes were stopped by the controller.
        Stopped,
    }
);

string_enum!(
    /// A condition's status.
    ConditionStatus, "condition status" {
        True,
        False,
        /// Not decided yet (a verdict recorded while processes stop).
        Unknown,
    }
);

string_enum!(
    /// What a condition is about (its `type`).
    ConditionType, "condition type" {
        /// A test: True once it claimed its hosts; False says why it waits.
        Scheduled,
        /// A test: its verdict, Unknown while it is carried out (see
        /// [`Verdict`]).
        Finished,
        /// A test that failed keeps its hosts (`spec.holdOnFailure`).
        Held,
        /// A host: True while its agent renews its lease.
        Ready,
        /// A host made unschedulable after infrastructure failures in a row.
        Quarantined,
        /// A pool: whether it serves guests, and if not why.
        Available,
        /// Any object: False while its controller's reconcile keeps failing.
        Reconciled,
        /// A test: True while an attempt that failed for the
        /// infrastructure's sake is torn down before the next one claims.
        Retrying,
    }
);

impl Condition {
    /// The one way conditions are made: `type_` is `status` for `reason`,
    /// as of now.
    pub fn new(type_: ConditionType, status: ConditionStatus, reason: &str, message: impl Into<String>) -> Condition {
        Condition {
            r#type: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: crate::time::now(),
        }
    }

    /// Whether this is condition `type_` with status `status`.
    pub fn is(&self, type_: ConditionType, status: ConditionStatus) -> bool {
        self.r#type == type_ && self.status == status
    }
}

/// Sets `c` in `conds` (replacing the condition of its type); false if an
/// equal one (type, status, reason, message) was there already, which then
/// keeps its transition time.
pub fn set_condition(conds: &mut Vec<Condition>, c: Condition) -> bool {
    if let Some(old) = conds.iter_mut().find(|o| o.r#type == c.r#type) {
        if old.status == c.status && old.reason == c.reason && old.message == c.message {
            return false;
        }
        *old = c;
        return true;
    }
    conds.push(c);
    true
}

string_enum!(
    /// Why a Test ended (its `status.reason`, and its `Finished`
    /// condition's).
    TestReason, "test reason" {
        /// Every step is done and no recorded result failed.
        Completed,
        /// `testbusctl finish`.
        Finished,
        /// `testbusctl finish --failed`.
        FinishedFailed,
        StepFailed,
        /// A background step ended before the test did.
        BackgroundEnded,
        /// A recorded result failed.
        ResultFailed,
        Cancelled,
        TimedOut,
        HostLost,
        /// The agent of a claimed host stopped (a clean shutdown gives up
        /// its lease).
        AgentStopped,
        /// Waited longer than `spec.pendingTimeout` for hosts.
        PendingTimeout,
    }
);

/// Whether a test's phase says it has not claimed its hosts: Pending, or
/// no phase yet (a test is created without one).
pub fn unclaimed(phase: &str) -> bool {
    phase.is_empty() || *phase == TestPhase::Pending
}

/// Whether test `t` waits for hosts: unclaimed, not being deleted, and no
/// verdict recorded (a cancel ends it without hosts). The one meaning of
/// "pending" for scheduling: only these are offered hosts, made guests
/// for, or claimed.
pub fn waits_for_hosts(t: &crate::Test) -> bool {
    let (meta, status) = (t.metadata.as_ref(), t.status.as_ref());
    unclaimed(status.map_or("", |s| s.phase.as_str()))
        && meta.is_none_or(|m| m.deletion_timestamp.is_empty())
        && !Verdict::decided(status.map_or(&[], |s| s.conditions.as_slice()))
}

/// Whether a host's agent gave its lease up (it stopped cleanly): a lease
/// renewed with no duration left.
pub fn lease_given_up(s: &crate::HostStatus) -> bool {
    s.lease_duration_seconds == 0 && !s.lease_renew_time.is_empty()
}

/// Whether a host's agent holds its lease at `now` (renewed within its
/// duration, and not given up). The control plane's Ready judgement adds
/// its grace on top.
pub fn lease_live(s: &crate::HostStatus, now: std::time::SystemTime) -> bool {
    !lease_given_up(s)
        && crate::time::parse(&s.lease_renew_time)
            .is_some_and(|t| t + std::time::Duration::from_secs(u64::from(s.lease_duration_seconds.max(1))) > now)
}

impl TestReason {
    /// The phase a test ends in for this reason.
    pub fn phase(self) -> TestPhase {
        match self {
            TestReason::Completed | TestReason::Finished => TestPhase::Succeeded,
            TestReason::StepFailed
            | TestReason::BackgroundEnded
            | TestReason::ResultFailed
            | TestReason::FinishedFailed => TestPhase::Failed,
            TestReason::Cancelled => TestPhase::Cancelled,
            TestReason::TimedOut | TestReason::HostLost | TestReason::AgentStopped | TestReason::PendingTimeout => {
                TestPhase::Error
            }
        }
    }
}

string_enum!(
    /// Why a Process ended (its `status.reason`).
    ProcessReason, "process reason" {
        /// Exited with an expected code.
        Completed,
        NonZeroExit,
        Signalled,
        TimedOut,
        /// Stopped on request (its test ended or was cancelled).
        Stopped,
        AgentShutdown,
        /// Its agent restarted while it ran.
        AgentRestarted,
        /// Its agent's journal lost it, though its status says it ran.
        JournalLost,
        HostLost,
        /// The keeper that held it while its agent was away is gone (killed,
        /// or the host rebooted): its outcome is unknown.
        KeeperLost,
        /// Its argv names a `${VAR}` nobody set.
        UnknownVariable,
        /// Its argv has a malformed `${...}`.
        InvalidArgument,
        /// A `host_*` variable could not be read.
        EnvFailed,
        FetchFailed,
        FileFailed,
        WorkdirFailed,
        ContainFailed,
        SpawnFailed,
        WaitFailed,
    }
);

impl ProcessReason {
    /// Whether it ended because something besides the process failed
    /// (counts towards its host's quarantine).
    pub fn is_infrastructure(self) -> bool {
        matches!(
            self,
            ProcessReason::AgentRestarted
                | ProcessReason::JournalLost
                | ProcessReason::HostLost
                | ProcessReason::KeeperLost
                | ProcessReason::EnvFailed
                | ProcessReason::FetchFailed
                | ProcessReason::FileFailed
                | ProcessReason::WorkdirFailed
                | ProcessReason::ContainFailed
                | ProcessReason::SpawnFailed
                | ProcessReason::WaitFailed
        )
    }
}

/// The verdict protocol between whoever decides a test's end (the test
/// controller, or `testbusctl finish` through the API) and the controller
/// that carries it out: the verdict is recorded as condition `Finished` with
/// status Unknown, then processes are stopped, then the final status is
/// written. One type, used by both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub reason: TestReason,
    pub message: String,
}

impl Verdict {
    pub fn new(reason: TestReason, message: impl Into<String>) -> Verdict {
        Verdict { reason, message: message.into() }
    }

    pub fn phase(&self) -> TestPhase {
        self.reason.phase()
    }

    /// The verdict recorded in `conditions`, if one is (and not yet
    /// carried out).
    pub fn recorded(conditions: &[Condition]) -> Option<Verdict> {
        let c = conditions.iter().find(|c| c.is(ConditionType::Finished, ConditionStatus::Unknown))?;
        Some(Verdict { reason: c.reason.parse().ok()?, message: c.message.clone() })
    }

    /// Whether a verdict was recorded or carried out: the test takes no
    /// more results or env.
    pub fn decided(conditions: &[Condition]) -> bool {
        conditions.iter().any(|c| c.r#type == ConditionType::Finished)
    }

    /// The condition that records it (status Unknown, until carried out).
    pub fn condition(&self, now: String) -> Condition {
        let c = Condition::new(ConditionType::Finished, ConditionStatus::Unknown, self.reason.as_str(), &self.message);
        Condition { last_transition_time: now, ..c }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unknown_ones_are_named() {
        for p in TestPhase::ALL {
            assert_eq!(p.as_str().parse::<TestPhase>(), Ok(*p));
        }
        for r in TestReason::ALL {
            assert_eq!(r.as_str().parse::<TestReason>(), Ok(*r));
        }
        let e = "Runing".parse::<ProcessPhase>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"Runing\" is not a process phase (one of Pending, Fetching, Ready, Running, Succeeded, Failed, Killed, Lost)"
        );
        let ready: String = HostPhase::Ready.into();
        assert!(ready == HostPhase::Ready && *"Ready" == HostPhase::Ready);
        assert_eq!(TestReason::PendingTimeout.phase(), TestPhase::Error);
        assert!(ProcessReason::SpawnFailed.is_infrastructure() && !ProcessReason::NonZeroExit.is_infrastructure());
    }

    #[test]
    fn a_verdict_is_recorded_and_read_back_the_same_way_by_both_sides() {
        let v = Verdict::new(TestReason::FinishedFailed, "finished as failed");
        let mut conds = vec![v.condition("t".into())];
        assert_eq!(Verdict::recorded(&conds), Some(v));
        assert!(Verdict::decided(&conds));
        conds[0].status = "False".into();
        assert_eq!(Verdict::recorded(&conds), None, "carried out: no longer pending");
        assert!(Verdict::decided(&conds));
    }
}
