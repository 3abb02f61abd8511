//! The durable record of every Process this agent has started, so that a
//! process is never run twice, even across agent restarts. One line per
//! event, appended: `uid` before the process is spawned (fsynced: it must
//! outlive a machine crash), then `uid pid` once it runs (its process group
//! id), so an agent restarted after a crash can end what its predecessor
//! left running. The pid line is not fsynced: it matters only while the
//! machine stays up (a machine crash ends the process too), and the page
//! cache outlives a crash of the agent.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Journal {
    path: PathBuf,
    /// uid → process group, once known.
    started: HashMap<String, Option<i32>>,
}

impl Journal {
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let mut started = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(s) => {
                for line in s.lines() {
                    let mut parts = line.split_whitespace();
                    let Some(uid) = parts.next() else { continue };
                    let pid = parts.next().and_then(|p| p.parse().ok());
                    let e = started.entry(uid.to_string()).or_insert(None);
                    if pid.is_some() {
                        *e = pid;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Journal { path: path.to_path_buf(), started })
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.started.contains_key(uid)
    }

    /// The process group a predecessor recorded for `uid`.
    pub fn pid(&self, uid: &str) -> Option<i32> {
        self.started.get(uid).copied().flatten()
    }

    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(line.as_bytes())?;
        f.sync_data()
    }

    /// Records `uids` durably, in one write and one fsync; only then may
    /// their processes start.
    pub fn record_all(&mut self, uids: &[&str]) -> std::io::Result<()> {
        let lines: String = uids.iter().map(|u| format!("{u}\n")).collect();
        self.append(&lines)?;
        self.started.extend(uids.iter().map(|u| (u.to_string(), None)));
        Ok(())
    }

    /// Records the process group of a started process.
    pub fn record_pid(path: &Path, uid: &str, pid: i32) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        f.write_all(format!("{uid} {pid}\n").as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_with_pids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p).unwrap();
        assert!(!j.contains("a"));
        j.record_all(&["a"]).unwrap();
        j.record_all(&["b", "c"]).unwrap();
        Journal::record_pid(&p, "a", 4242).unwrap();
        let j = Journal::open(&p).unwrap();
        assert!(j.contains("a") && j.contains("b") && j.contains("c") && !j.contains("d"));
        assert_eq!((j.pid("a"), j.pid("b")), (Some(4242), None));
    }
}
