//! Containment by PID namespace: the fallback where cgroups cannot be had
//! (no cgroup v2, or a kernel without `cgroup.kill`), for an agent that may
//! create namespaces (root).
//!
//! Each process is started through the agent's own binary in its
//! [`SUBCOMMAND`] mode, between fork and exec of which the agent has called
//! `unshare(CLONE_NEWPID)`, so three processes stand in for one:
//!
//! - the **relay** (the agent's child, in the agent's PID namespace) forks
//!   the namespace's init and relays signals to it; it exits as the
//!   command did (its code, or the same signal), so the agent sees no
//!   difference;
//! - the **init** (pid 1 of the new namespace) forks and execs the command,
//!   reaps whatever is orphaned inside, passes signals on to everything in
//!   the namespace, and exits when the command does, with its status told
//!   to the relay through a pipe;
//! - the **command** and all it starts.
//!
//! The kernel ends every process of a namespace when its init exits, and no
//! process can leave its PID namespace: whatever the command started, by
//! `setsid`, double-forking or anything else, ends with it. The init dies
//! with the relay (`PR_SET_PDEATHSIG`), so SIGKILL to the relay (a stop's
//! grace run out, a predecessor's leftovers) takes all of it. A process's
//! PID namespace also names it on the agent's local socket: it cannot be
//! forged or changed from inside.
//!
//! Unlike a direct spawn, a command that cannot be executed becomes exit
//! code 127 with the reason on its stderr (as a shell reports it), not a
//! `SpawnFailed` status.
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;

/// The agent's first argument that selects this mode. Not for people: the
/// relay and init expect the agent to have unshared the PID namespace.
pub const SUBCOMMAND: &str = "__testbus-contain";

/// Signals passed on to the command (and everything in its namespace).
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCONT,
];

/// What the child calls between fork and exec of the relay: its children,
/// from the init on, are in a new PID namespace. One syscall,
/// async-signal-safe.
pub fn unsharer() -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    || nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)
}

/// Whether processes can be contained this way here: runs `true` through
/// the whole mechanism once.
pub fn probe(agent: &std::path::Path) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(agent);
    cmd.arg(SUBCOMMAND).arg("true").stdin(std::process::Stdio::null());
    // SAFETY: the closure makes one syscall (unshare), async-signal-safe,
    // with no allocation or lock.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(unsharer());
    }
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "a PID namespace could not be made ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("a PID namespace could not be made: {e}")),
    }
}

/// The namespace a process's children are (or will be) in, as the inode
/// of `/proc/PID/ns/pid_for_children`, or `None` if it is gone.
pub fn children_namespace(pid: i32) -> Option<u64> {
    namespace_inode(&format!("/proc/{pid}/ns/pid_for_children"))
}

/// The PID namespace a process is in.
pub fn namespace_of(pid: i32) -> Option<u64> {
    namespace_inode(&format!("/proc/{pid}/ns/pid"))
}

fn namespace_inode(link: &str) -> Option<u64> {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(link).ok()?).into()
}

/// How the command ended, as the init tells the relay: 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Exited(i32),
    Signalled(i32),
}

impl Outcome {
    fn encode(self) -> [u8; 8] {
        let (tag, v) = match self {
            Outcome::Exited(c) => (0i32, c),
            Outcome::Signalled(s) => (1, s),
        };
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&tag.to_le_bytes());
        b[4..].copy_from_slice(&v.to_le_bytes());
        b
    }

    fn decode(b: [u8; 8]) -> Option<Outcome> {
        let tag = i32::from_le_bytes(b[..4].try_into().ok()?);
        let v = i32::from_le_bytes(b[4..].try_into().ok()?);
        match tag {
            0 => Some(Outcome::Exited(v)),
            1 => Some(Outcome::Signalled(v)),
            _ => None,
        }
    }

    fn of(st: WaitStatus) -> Option<Outcome> {
        match st {
            WaitStatus::Exited(_, c) => Some(Outcome::Exited(c)),
            WaitStatus::Signaled(_, s, _) => Some(Outcome::Signalled(s as i32)),
            _ => None,
        }
    }

    /// Ends this process the same way.
    fn reproduce(self) -> ! {
        match self {
            Outcome::Exited(c) => std::process::exit(c),
            Outcome::Signalled(s) => {
                if let Ok(sig) = Signal::try_from(s) {
                    // SAFETY: restoring the default disposition of a signal
                    // in a single-threaded process about to die by it.
                    #[allow(unsafe_code)]
                    unsafe {
                        let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl);
                    }
                    let mut one = SigSet::empty();
                    one.add(sig);
                    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&one), None);
                    let _ = kill(Pid::this(), sig);
                }
                std::process::exit(128 + s)
            }
        }
    }
}

fn die(what: &str) -> ! {
    eprintln!("testbus-agent {SUBCOMMAND}: {what}");
    std::process::exit(127)
}

/// The relay: `args` is the command. Runs before the agent starts any
/// thread or runtime, so the process is single-threaded when it forks.
pub fn main(args: Vec<OsString>) -> ! {
    if args.is_empty() {
        die("no command given");
    }
    let mut waited = SigSet::empty();
    for s in FORWARDED {
        waited.add(s);
    }
    waited.add(Signal::SIGCHLD);
    if let Err(e) = waited.thread_block() {
        die(&format!("cannot block signals: {e}"));
    }
    let (report_r, report_w) = nix::unistd::pipe().unwrap_or_else(|e| die(&format!("pipe: {e}")));
    // SAFETY: this process is single-threaded here (the agent's main
    // dispatches to this mode before starting any runtime or thread), so
    // the child may do anything after fork.
    #[allow(unsafe_code)]
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(report_r);
            init(args, std::fs::File::from(report_w), &waited)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(report_w);
            relay_signals(child, std::fs::File::from(report_r), &waited)
        }
        Err(e) => die(&format!("fork: {e}")),
    }
}

/// The relay's loop: passes signals on to the init until it exits, then
/// ends as the command did.
fn relay_signals(init: Pid, mut report: std::fs::File, waited: &SigSet) -> ! {
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(st) => {
                    let mut b = [0u8; 8];
                    let told = report.read_exact(&mut b).ok().and_then(|()| Outcome::decode(b));
                    // No report: the init itself was killed (SIGKILL from
                    // outside); that is how the command ended.
                    match told.or_else(|| Outcome::of(st)) {
                        Some(o) => o.reproduce(),
                        None => continue,
                    }
                }
                Err(e) => die(&format!("waitpid: {e}")),
            },
            Ok(sig) => {
                let _ = kill(init, sig);
            }
            Err(e) => die(&format!("sigwait: {e}")),
        }
    }
}

/// Whether the reading end of the report pipe is closed: the relay died.
fn relay_gone(report: &std::fs::File) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(report.as_fd(), nix::poll::PollFlags::POLLOUT)];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_none_or(|r| r.contains(nix::poll::PollFlags::POLLERR)),
        Err(_) => true,
    }
}

/// The namespace's init: starts the command, reaps, passes signals on,
/// reports how the command ended and exits (which ends the namespace).
fn init(args: Vec<OsString>, mut report: std::fs::File, waited: &SigSet) -> ! {
    // Dies with the relay, whatever kills it. (The relay is outside this
    // namespace, so getppid() says 0: whether it died before the line
    // above is told by its end of the report pipe.)
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || relay_gone(&report) {
        std::process::exit(127);
    }
    // kill(-1) below must reach this namespace only: refuse to run outside
    // one of our own.
    if Pid::this().as_raw() != 1 {
        die("not the init of a new PID namespace (the agent unshares it before starting this)");
    }
    let argv: Vec<CString> = args
        .into_iter()
        .map(|a| CString::new(a.into_vec()).unwrap_or_else(|_| die("an argument holds a NUL byte")))
        .collect();
    // SAFETY: single-threaded (a child of the single-threaded relay).
    #[allow(unsafe_code)]
    let command = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(report);
            let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            // Rust ignores SIGPIPE in its own programs; the command gets the
            // default, as it would from any spawn.
            // SAFETY: restoring a default disposition, single-threaded.
            #[allow(unsafe_code)]
            unsafe {
                let _ = nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl);
            }
            let e = nix::unistd::execvp(&argv[0], &argv).unwrap_err();
            die(&format!("cannot execute {}: {e}", argv[0].to_string_lossy()))
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => die(&format!("fork: {e}")),
    };
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(st) if st.pid() == Some(command) => {
                        if let Some(o) = Outcome::of(st) {
                            let _ = report.write_all(&o.encode());
                            // Exiting ends everything else in the namespace.
                            std::process::exit(0);
                        }
                    }
                    Ok(_) => {}
                }
            },
            // Everything in this namespace but the init itself.
            Ok(sig) => {
                let _ = kill(Pid::from_raw(-1), sig);
            }
            Err(e) => die(&format!("sigwait: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn outcomes_round_trip() {
        for o in [Outcome::Exited(0), Outcome::Exited(255), Outcome::Signalled(9), Outcome::Signalled(15)] {
            assert_eq!(Outcome::decode(o.encode()), Some(o));
        }
        assert_eq!(Outcome::decode([7, 0, 0, 0, 0, 0, 0, 0]), None);
    }
}
