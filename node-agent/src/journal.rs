//! The durable record of every Process this agent has started, so that a
//! process is never run twice, even across agent restarts.
//!
//! One record per line, appended: `start` before the process is spawned
//! (fsynced: it must outlive a machine crash), then `group` once it runs,
//! naming its process group and the start time of the group's leader, so a
//! restarted agent can end what its predecessor left running and prove it
//! is signalling that group and not a later one that reused the number.
//! The group record is not fsynced: it matters only while the machine stays
//! up (a machine crash ends the process too), and the page cache outlives a
//! crash of the agent.
//!
//! Every record carries a CRC-32 of its content. A torn write, a stray byte
//! or any line that does not check is skipped and counted, never trusted:
//! the journal is only ever read to decide what must *not* run or what may
//! be killed, so an unreadable record can cost at most a process reported
//! Lost, never a process run twice (the agent's other witnesses, the
//! process's cgroup and its reported status, cover a lost `start`) and never
//! a signal to a group it cannot prove (see [`Group::is_alive`]).
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A process group recorded by a predecessor, with what proves it is still
/// the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub pgid: i32,
    /// The leader's start time in clock ticks since boot (field 22 of
    /// /proc/PID/stat); 0 when it was not recorded (an old journal).
    pub start_ticks: u64,
}

impl Group {
    /// The group of the running process `pid`, as it would be recorded.
    pub fn of_leader(pid: i32) -> Option<Group> {
        let stat = ProcStat::read(pid)?;
        (stat.pgrp == pid).then_some(Group { pgid: pid, start_ticks: stat.start_ticks })
    }

    /// Whether the recorded group provably still exists as the one that was
    /// recorded: its leader lives, still leads that group, and started when
    /// the recorded one did. A pgid of 0 or 1 (which `killpg` would turn into
    /// "the caller's group" or "every process") never qualifies, nor does a
    /// record without a start time, nor a group whose leader is gone (its
    /// members cannot be told from those of a group that reused the number).
    pub fn is_alive(&self) -> bool {
        if self.pgid <= 1 || self.start_ticks == 0 {
            return false;
        }
        ProcStat::read(self.pgid).is_some_and(|s| s.pgrp == self.pgid && s.start_ticks == self.start_ticks)
    }

    /// SIGKILLs the group if [`Group::is_alive`]; says whether it did.
    pub fn kill_if_alive(&self) -> bool {
        if !self.is_alive() {
            return false;
        }
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid), nix::sys::signal::Signal::SIGKILL).is_ok()
    }
}

/// The fields of /proc/PID/stat the agent uses.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    /// Its state letter (R, S, D, Z for a zombie...).
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub start_ticks: u64,
}

impl ProcStat {
    pub fn read(pid: i32) -> Option<ProcStat> {
        if pid <= 0 {
            return None;
        }
        let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
        Self::parse(&stat)
    }

    fn parse(stat: &[u8]) -> Option<ProcStat> {
        // The command name (field 2) may hold spaces and parentheses: the
        // fields after it start at the last ')'.
        let close = stat.iter().rposition(|&b| b == b')')?;
        let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
        // Fields from 3 (state) on; start time is field 22.
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(ProcStat {
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            pgrp: f.get(2)?.parse().ok()?,
            start_ticks: f.get(19)?.parse().ok()?,
        })
    }
}

const MAGIC: &str = "tb1";

pub struct Journal {
    path: PathBuf,
    /// uid → its process group, once known.
    started: HashMap<String, Option<Group>>,
    /// Lines that did not check when the journal was opened.
    skipped: usize,
}

/// One decoded line.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    Start(String),
    Group(String, Group),
}

/// `payload` as one checked line (the keeper's exit records are written
/// the same way).
pub(crate) fn checksummed(payload: &str) -> String {
    format!("{MAGIC} {:08x} {payload}\n", crc32fast::hash(payload.as_bytes()))
}

/// The payload of a line [`checksummed`] wrote, if it checks.
pub(crate) fn checked(line: &str) -> Option<&str> {
    let mut parts = line.splitn(3, ' ');
    let (magic, crc, payload) = (parts.next()?, parts.next()?, parts.next()?);
    (magic == MAGIC && crc.len() == 8 && u32::from_str_radix(crc, 16).ok()? == crc32fast::hash(payload.as_bytes()))
        .then_some(payload)
}

/// Where group files are kept, beside the journal.
fn groups_dir(journal: &Path) -> std::path::PathBuf {
    journal.with_file_name("groups")
}

/// A uid as the journal accepts it: what the API generates, nothing that
/// could split a record or leave a directory.
pub(crate) fn plausible_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn decode(line: &[u8]) -> Option<Record> {
    let line = std::str::from_utf8(line).ok()?;
    if !line.starts_with(MAGIC) {
        // The unchecked format of earlier agents, `uid` or `uid pid`: the
        // uid is taken (it can only keep a process from running), its
        // unproven group never is.
        let uid = line.split(' ').next()?;
        return plausible_uid(uid).then(|| Record::Start(uid.to_string()));
    }
    let payload = checked(line)?;
    let f: Vec<&str> = payload.split(' ').collect();
    match f.as_slice() {
        ["start", uid] if plausible_uid(uid) => Some(Record::Start(uid.to_string())),
        ["group", uid, pgid, ticks] if plausible_uid(uid) => {
            Some(Record::Group(uid.to_string(), Group { pgid: pgid.parse().ok()?, start_ticks: ticks.parse().ok()? }))
        }
        _ => None,
    }
}

impl Journal {
    /// Reads the journal, skipping (and counting) every record that does
    /// not check. Fails only when the file cannot be read or written.
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let mut started = HashMap::new();
        let mut skipped = 0;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match decode(line) {
                Some(Record::Start(uid)) => {
                    started.entry(uid).or_insert(None);
                }
                Some(Record::Group(uid, g)) => {
                    started.insert(uid, Some(g));
                }
                None => skipped += 1,
            }
        }
        // A torn last line must not swallow the next record.
        if bytes.last().is_some_and(|&b| b != b'\n') {
            let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
            f.write_all(b"\n")?;
        }
        Ok(Journal { path: path.to_path_buf(), started, skipped })
    }

    /// Records that did not check when the journal was opened.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.started.contains_key(uid)
    }

    /// The process group a predecessor recorded for `uid`.
    #[cfg(test)]
    pub fn group(&self, uid: &str) -> Option<Group> {
        self.started.get(uid).copied().flatten()
    }

    /// Every uid started, with its group if recorded.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Option<Group>)> {
        self.started.iter().map(|(u, g)| (u.as_str(), *g))
    }

    fn append(&self, lines: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path)?;
        f.write_all(lines.as_bytes())?;
        f.sync_data()
    }

    /// Records `uids` durably, in one write and one fsync; only then may
    /// their processes start. A uid the journal could not read back is
    /// refused (the API generates none such).
    pub fn record_all(&mut self, uids: &[&str]) -> std::io::Result<()> {
        if let Some(bad) = uids.iter().find(|u| !plausible_uid(u)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("implausible process uid {bad:?}"),
            ));
        }
        let lines: String = uids.iter().map(|u| checksummed(&format!("start {u}"))).collect();
        self.append(&lines)?;
        self.started.extend(uids.iter().map(|u| (u.to_string(), None)));
        Ok(())
    }

    /// Records the process group of a started process.
    pub fn record_group(path: &Path, uid: &str, group: Group) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        f.write_all(checksummed(&format!("group {uid} {} {}", group.pgid, group.start_ticks)).as_bytes())
    }

    /// Also keeps `group` in a file of its own in `groups/` beside the
    /// journal at `journal`: a journal lost or cut short (the agent's
    /// disk, a hand) then still leaves a restarted agent what it needs to
    /// end the process, in every containment (a cgroup survives by itself;
    /// a process group or a PID namespace's relay does not). The group's
    /// leader's start time proves it before anything is signalled.
    pub fn record_group_file(journal: &Path, uid: &str, group: Group) -> std::io::Result<()> {
        let dir = groups_dir(journal);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{uid}.tmp"));
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{} {}\n", group.pgid, group.start_ticks).as_bytes())?;
        std::fs::rename(&tmp, dir.join(uid))
    }

    /// Forgets the group file of `uid` (its process has ended).
    pub fn forget_group_file(journal: &Path, uid: &str) {
        let _ = std::fs::remove_file(groups_dir(journal).join(uid));
    }

    /// The groups a predecessor left files of. A file that is not one (a
    /// bad name, bad content) is reported and removed, never trusted.
    pub fn group_files(journal: &Path) -> Vec<(String, Group)> {
        let dir = groups_dir(journal);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let parsed = std::fs::read_to_string(e.path()).ok().and_then(|text| {
                let (pgid, ticks) = text.trim().split_once(' ')?;
                Some(Group { pgid: pgid.parse().ok()?, start_ticks: ticks.parse().ok()? })
            });
            match parsed {
                Some(g) if plausible_uid(&name) => out.push((name, g)),
                _ => {
                    tracing::warn!(file = %e.path().display(), "not a process group record; removed, not trusted");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        out
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b7c6f2e-0000-4000-8000-00000000000a";
    const B: &str = "0b7c6f2e-0000-4000-8000-00000000000b";
    const C: &str = "0b7c6f2e-0000-4000-8000-00000000000c";

    #[test]
    fn survives_reopen_with_groups() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p).unwrap();
        assert!(!j.contains(A));
        j.record_all(&[A]).unwrap();
        j.record_all(&[B, C]).unwrap();
        Journal::record_group(&p, A, Group { pgid: 4242, start_ticks: 7 }).unwrap();
        let j = Journal::open(&p).unwrap();
        assert!(j.contains(A) && j.contains(B) && j.contains(C) && !j.contains("d"));
        assert_eq!((j.group(A), j.group(B)), (Some(Group { pgid: 4242, start_ticks: 7 }), None));
        assert_eq!(j.skipped(), 0);
    }

    #[test]
    fn garbage_torn_and_forged_records_are_skipped_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p).unwrap();
        j.record_all(&[A]).unwrap();
        Journal::record_group(&p, A, Group { pgid: 4242, start_ticks: 7 }).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        // A line of non-UTF-8 garbage, the old format's "uid 1" (which
        // once meant kill(-1): its uid counts, its group never), a record whose checksum does not match its
        // content (pgid changed to 1), and a torn record with no newline.
        bytes.extend_from_slice(b"\xff\xfe\x00garbage\n");
        bytes.extend_from_slice(format!("{B} 1\n").as_bytes());
        let forged = checksummed(&format!("group {A} 4242 7")).replace(" 4242 ", " 1 ");
        bytes.extend_from_slice(forged.as_bytes());
        let torn = checksummed(&format!("start {C}"));
        bytes.extend_from_slice(&torn.as_bytes()[..torn.len() - 5]);
        std::fs::write(&p, &bytes).unwrap();

        let mut j = Journal::open(&p).unwrap();
        assert_eq!(j.skipped(), 3);
        assert!(j.contains(A) && j.contains(B) && !j.contains(C));
        assert_eq!(j.group(B), None);
        assert_eq!(j.group(A), Some(Group { pgid: 4242, start_ticks: 7 }), "the forged record changed nothing");
        // The torn line does not swallow what is written next.
        j.record_all(&[C]).unwrap();
        let j = Journal::open(&p).unwrap();
        assert!(j.contains(C));
        assert_eq!(j.skipped(), 3);
    }

    #[test]
    fn implausible_uids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("journal")).unwrap();
        for bad in ["", "a b", "a\nstart b", &"x".repeat(65)] {
            assert!(j.record_all(&[bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_group_is_alive_only_as_recorded() {
        let me = std::process::id() as i32;
        let stat = ProcStat::read(me).unwrap();
        assert!(stat.start_ticks > 0);
        for pgid in [-1, 0, 1] {
            assert!(!Group { pgid, start_ticks: stat.start_ticks }.is_alive(), "pgid {pgid}");
        }
        let mut child = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        let mut child = child.arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let g = Group::of_leader(pid).expect("a group leader");
        assert!(g.is_alive());
        assert!(!Group { start_ticks: g.start_ticks + 1, ..g }.is_alive(), "a reused number is not the group");
        assert!(!Group { start_ticks: 0, ..g }.is_alive(), "an unproven group is not signalled");
        assert!(g.kill_if_alive());
        child.wait().unwrap();
        assert!(!g.is_alive());
    }

    #[test]
    fn stat_with_odd_command_names() {
        let s = ProcStat::parse(b"42 (a) b (c)) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0").unwrap();
        assert_eq!((s.ppid, s.pgrp, s.start_ticks), (7, 42, 12345));
        assert!(ProcStat::parse(b"42 (x").is_none());
    }
}
