//! Containment: what holds every process a Process started, so that all of
//! it ends with it and none of it can pass for another Process.
//!
//! Where a writable cgroup v2 hierarchy is mounted (kernel 5.14 or later,
//! for `cgroup.kill`), each Process runs in a cgroup of its own,
//! `<agent's cgroup>/testbus-agent.<name>.<key>/p-<uid>`, joined by the child
//! between fork and exec, so no descendant is ever outside it. A process
//! cannot leave its cgroup by `setsid`, `setpgid` or double-forking; only a
//! privileged process deliberately writing another cgroup's `cgroup.procs`
//! can, which is outside what the agent defends against (a test process run
//! as root can also kill the agent). The cgroup is killed as a whole
//! (`cgroup.kill`) when the process ends, is stopped or times out, and
//! removed once empty. A cgroup left by a predecessor (the agent was killed)
//! is killed when the agent starts: it names the Process it belonged to, so
//! it also proves that Process ran.
//!
//! Without cgroup v2 (or when the agent may not create cgroups), a Process
//! gets a PID namespace of its own where the agent may make one (root; see
//! `pidns`), which holds all of it as reliably. Where neither can be had, a
//! Process is contained by its process group only: a descendant that moves
//! to a new group or session survives its test. The agent logs this once at
//! start.
use crate::journal::Journal;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a killed cgroup may take to empty before it is left for the
/// next start of the agent to remove.
const EMPTY_WAIT: Duration = Duration::from_secs(5);
const EMPTY_POLL: Duration = Duration::from_millis(5);

/// What holds each process this agent runs, chosen once at start.
#[derive(Debug, Clone)]
pub enum Containment {
    /// A cgroup v2 cgroup per process: nothing escapes it.
    Cgroup(std::sync::Arc<CgroupRoot>),
    /// A PID namespace per process, through the agent's own binary (see
    /// `pidns`): nothing escapes it either.
    PidNamespace { agent: std::sync::Arc<PathBuf> },
    /// The process group only: a descendant that calls setsid escapes.
    ProcessGroup,
}

impl Containment {
    pub fn cgroups(&self) -> Option<&CgroupRoot> {
        match self {
            Containment::Cgroup(root) => Some(root),
            _ => None,
        }
    }
}

/// This agent's cgroup for the processes it runs, under its own cgroup.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    /// Where it is in this mount namespace.
    dir: PathBuf,
    /// Its path inside the hierarchy, as /proc/PID/cgroup shows it.
    rel: String,
}

/// Why there is no cgroup containment.
#[derive(Debug, thiserror::Error)]
pub enum NoCgroups {
    #[error("no cgroup v2 hierarchy is mounted")]
    NotMounted,
    #[error("the kernel's cgroups cannot kill a cgroup (cgroup.kill needs Linux 5.14)")]
    NoKill,
    #[error("cannot create {0}: {1}")]
    Create(PathBuf, std::io::Error),
    #[error("cannot read this process's cgroup: {0}")]
    Own(std::io::Error),
}

/// The mount point and root of the cgroup2 mount in `mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = left.split(' ').collect();
        Some((PathBuf::from(unescape(f.get(4)?)), unescape(f.get(3)?)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The unified-hierarchy path in a /proc/PID/cgroup text.
fn unified_path(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

impl CgroupRoot {
    /// Finds this process's cgroup and creates the agent's under it.
    /// `key` tells apart agents on one machine.
    pub fn create(key: &str) -> Result<CgroupRoot, NoCgroups> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(NoCgroups::Own)?;
        let (mount, mount_root) = cgroup2_mount(&mountinfo).ok_or(NoCgroups::NotMounted)?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(NoCgroups::Own)?;
        let own = unified_path(&own).ok_or(NoCgroups::NotMounted)?.trim_end().to_string();
        let inside = own.strip_prefix(mount_root.trim_end_matches('/')).unwrap_or(&own);
        let rel = format!("{}/testbus-agent.{key}", inside.trim_end_matches('/'));
        let dir = mount.join(rel.trim_start_matches('/'));
        if !mount.join("cgroup.procs").exists() {
            return Err(NoCgroups::NotMounted);
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(NoCgroups::Create(dir, e)),
        }
        if !dir.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err(NoCgroups::NoKill);
        }
        Ok(CgroupRoot { dir, rel })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the agent's cgroup if it is empty (at shutdown; a cgroup
    /// still holding processes stays for the next start to end them).
    pub fn remove_if_empty(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Kills and removes every process cgroup a predecessor left behind,
    /// but those of processes a keeper holds (`held`); returns the uids
    /// they belonged to (those Processes ran).
    pub async fn end_leftovers(&self, held: &HashSet<String>) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut uids = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(uid) = name.strip_prefix("p-") else { continue };
            if held.contains(uid) {
                continue;
            }
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let cg = ProcessCgroup {
                dir: e.path(),
                procs: match std::fs::OpenOptions::new().write(true).open(e.path().join("cgroup.procs")) {
                    Ok(f) => std::sync::Arc::new(f),
                    Err(_) => continue,
                },
            };
            let killed = cg.members().len();
            cg.end().await;
            tracing::warn!(process_uid = %uid, killed, "ended what a predecessor left running of a process");
            uids.push(uid.to_string());
        }
        uids
    }

    /// Kills and removes the cgroup of Process `uid`, if there is one.
    pub async fn end_one(&self, uid: &str) {
        let dir = self.dir.join(format!("p-{uid}"));
        let Ok(procs) = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")) else { return };
        ProcessCgroup { dir, procs: std::sync::Arc::new(procs) }.end().await;
    }

    /// The uid of the Process whose cgroup `pid` is in, if any.
    pub fn uid_of(&self, pid: i32) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = unified_path(&text)?.trim_end();
        let rest = path.strip_prefix(&self.rel)?.strip_prefix("/p-")?;
        // Its own cgroup, not one nested below it (a process may create
        // those, and name them as it likes).
        (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
    }
}

/// One Process's cgroup. Its processes are killed and the cgroup removed by
/// [`ProcessCgroup::end`].
#[derive(Debug)]
pub struct ProcessCgroup {
    dir: PathBuf,
    /// Open for writing, so the child joins with one write(2) after fork.
    procs: std::sync::Arc<std::fs::File>,
}

impl ProcessCgroup {
    /// A new, empty cgroup for Process `uid` under the agent's cgroup
    /// `root` (made again if someone removed it while it was empty).
    pub fn create(root: &Path, uid: &str) -> std::io::Result<ProcessCgroup> {
        let dir = root.join(format!("p-{uid}"));
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root)?;
                std::fs::create_dir(&dir)?;
            }
            r => r?,
        }
        let procs = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
        Ok(ProcessCgroup { dir, procs: std::sync::Arc::new(procs) })
    }

    /// The cgroup's directory, open: what clone3 needs to start a process
    /// in it.
    pub fn dir_file(&self) -> std::io::Result<std::fs::File> {
        std::fs::File::open(&self.dir)
    }

    /// What the child calls between fork and exec to join the cgroup:
    /// one write(2) to an already open file, async-signal-safe, with no
    /// allocation.
    pub fn joiner(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let procs = self.procs.clone();
        move || (&*procs).write_all(b"0")
    }

    /// The pids in the cgroup now.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Sends `sig` to every process in the cgroup.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        for pid in self.members() {
            if pid > 1 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
    }

    /// SIGKILLs every process in the cgroup, at once and race-free.
    pub fn kill(&self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), b"1") {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot kill the cgroup");
        }
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills everything in the cgroup, waits (bounded) for it to empty and
    /// removes it. One that does not empty in time is left for the agent's
    /// next start, with a warning.
    pub async fn end(&self) {
        // Most processes leave nothing behind: then there is nothing to
        // kill (one read instead of a write and a read).
        if self.populated() {
            self.kill();
        }
        let deadline = tokio::time::Instant::now() + EMPTY_WAIT;
        while self.populated() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(cgroup = %self.dir.display(), "the cgroup did not empty after SIGKILL; left in place");
                return;
            }
            tokio::time::sleep(EMPTY_POLL).await;
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot remove the cgroup");
            }
        }
    }
}

/// Ends everything a predecessor of this agent left running that no keeper
/// holds (`held`): every process cgroup under `cgroups`, and every process
/// group in the journal whose leader provably is the one recorded (see
/// [`Group::is_alive`]). Returns the uids whose cgroup or group file was
/// found: those Processes ran, whatever the journal says.
pub async fn end_predecessors(
    journal: &Journal,
    cgroups: Option<&CgroupRoot>,
    held: &HashSet<String>,
) -> HashSet<String> {
    let mut ran: HashSet<String> = match cgroups {
        Some(root) => root.end_leftovers(held).await.into_iter().collect(),
        None => HashSet::new(),
    };
    for (uid, group) in journal.entries().filter(|(uid, _)| !held.contains(*uid)) {
        if group.is_some_and(|g| g.kill_if_alive()) {
            tracing::warn!(process_uid = %uid, "killed the process group a predecessor left running");
        }
    }
    // The same groups kept a file each: what a lost or cut journal forgot.
    // A group file also says its process was started (it is written before
    // the spawn): it never runs again, whatever the journal lost.
    for (uid, group) in Journal::group_files(journal.path()) {
        if held.contains(&uid) {
            continue;
        }
        if group.kill_if_alive() {
            tracing::warn!(process_uid = %uid, "killed the process group a predecessor left running (its group file)");
        }
        Journal::forget_group_file(journal.path(), &uid);
        ran.insert(uid);
    }
    ran
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_cgroup_files_are_read() {
        let mi = "24 30 0:21 / /proc rw - proc proc rw\n\
                  35 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(mi), Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into())));
        let mi = "35 25 0:30 /outer /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(mi), Some((PathBuf::from("/mnt/my cg"), "/outer".into())));
        assert_eq!(cgroup2_mount("24 30 0:21 / /proc rw - proc proc rw\n"), None);
        assert_eq!(unified_path("4:memory:/x\n0::/a/b\n"), Some("/a/b"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }
}

/// Recovery signals process groups it read from disk: these tests run in a
/// PID namespace of their own, so that a bad group (kill(-1) on the code
/// this replaced) reaches only the namespace's processes.
#[cfg(test)]
mod recovery_tests {
    use super::*;
    use crate::journal::Group;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};

    const INSIDE: &str = "TESTBUS_TEST_IN_PID_NAMESPACE";

    fn sleeper() -> Child {
        Command::new("sleep").arg("300").process_group(0).spawn().expect("sleep")
    }

    fn alive(c: &mut Child) -> bool {
        c.try_wait().expect("try_wait").is_none()
    }

    #[test]
    fn recovery_signals_only_what_it_can_prove_was_its_own() {
        if std::env::var_os(INSIDE).is_none() {
            let me = std::env::current_exe().unwrap();
            let mut cmd = Command::new("unshare");
            if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap_or(1) != 0 {
                cmd.args(["--user", "--map-root-user"]);
            }
            let st = cmd
                .args(["--pid", "--fork", "--mount-proc"])
                .arg(me)
                .args(["--exact", "containment::recovery_tests::recovery_signals_only_what_it_can_prove_was_its_own"])
                .args(["--nocapture", "--test-threads=1"])
                .env(INSIDE, "1")
                .status()
                .expect("unshare");
            assert!(st.success(), "the test inside its PID namespace failed: {st}");
            return;
        }
        assert_eq!(std::process::id(), 1, "not in a PID namespace of its own");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let uid = |i: usize| format!("00000000-0000-4000-8000-00000000000{i}");
        let mut legacy = sleeper(); // "uid 1": once kill(-1)
        let mut zero = sleeper(); // pgid 0: killpg(0) is the caller's own group
        let mut reused = sleeper(); // its number, another start time
        let mut proven = sleeper(); // as recorded: killed
        let mut j = Journal::open(&path).unwrap();
        j.record_all(&[&uid(0), &uid(1), &uid(2), &uid(3)]).unwrap();
        drop(j);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{} 1\n", uid(0)));
        std::fs::write(&path, text).unwrap();
        let g = Group::of_leader(reused.id() as i32).unwrap();
        Journal::record_group(&path, &uid(1), Group { pgid: 0, start_ticks: g.start_ticks }).unwrap();
        Journal::record_group(&path, &uid(2), Group { start_ticks: g.start_ticks + 1, ..g }).unwrap();
        Journal::record_group(&path, &uid(3), Group::of_leader(proven.id() as i32).unwrap()).unwrap();

        // A predecessor's process cgroup, whose process escaped its group
        // and session: it goes, and names its Process.
        let cgroups = match CgroupRoot::create("recovery-test") {
            Ok(root) => Some(root),
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "CI has cgroup v2: {e}");
                None
            }
        };
        let mut contained = None;
        if let Some(root) = &cgroups {
            let cg = ProcessCgroup::create(root.dir(), &uid(4)).unwrap();
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "setsid sleep 300 & echo $!; wait"]).stdout(std::process::Stdio::piped());
            // SAFETY: the joiner only writes to an open file (see its doc).
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(cg.joiner());
            }
            let mut sh = cmd.spawn().unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(sh.stdout.take().unwrap()), &mut line).unwrap();
            let escaped: i32 = line.trim().parse().unwrap();
            assert_ne!(crate::journal::ProcStat::read(escaped).unwrap().pgrp, sh.id() as i32, "it left the group");
            assert_eq!(root.uid_of(escaped), Some(uid(4)));
            contained = Some((sh, escaped));
        }

        // A group only its file still knows (the journal was cut short).
        let mut forgotten = sleeper();
        Journal::record_group_file(&path, &uid(5), Group::of_leader(forgotten.id() as i32).unwrap()).unwrap();
        std::fs::write(path.with_file_name("groups").join("not a uid"), "1 1\n").unwrap();

        let j = Journal::open(&path).unwrap();
        let ran = rt.block_on(end_predecessors(&j, cgroups.as_ref(), &HashSet::new()));
        let st = forgotten.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9), "the group only its file knew lives");
        assert_eq!(std::fs::read_dir(path.with_file_name("groups")).unwrap().count(), 0, "group files are gone");
        assert!(ran.contains(&uid(5)), "a process with a group file never runs again");

        assert!(alive(&mut legacy), "an unproven group was signalled");
        assert!(alive(&mut zero), "pgid 0 was signalled");
        assert!(alive(&mut reused), "a group with another start time was signalled");
        let st = proven.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9), "the proven group was not killed");
        if let (Some(root), Some((mut sh, escaped))) = (&cgroups, contained) {
            assert_eq!(ran, HashSet::from([uid(4), uid(5)]));
            sh.wait().unwrap();
            // The escaped sleep was reparented to us (pid 1) and killed.
            let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(escaped), None).unwrap();
            assert!(
                matches!(st, nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)),
                "{st:?}"
            );
            assert!(!root.dir().join(format!("p-{}", uid(4))).exists(), "the cgroup was removed");
            let _ = std::fs::remove_dir(root.dir());
        }
        for mut c in [legacy, zero, reused] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
