//! The durable record of every Process uid this agent has started, so that
//! a process is never run twice, even across agent restarts. One line per
//! uid, appended and fsynced before the process is spawned.
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Journal {
    path: PathBuf,
    started: HashSet<String>,
}

impl Journal {
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let started = match std::fs::read_to_string(path) {
            Ok(s) => s.lines().filter(|l| !l.is_empty()).map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        Ok(Journal { path: path.to_path_buf(), started })
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.started.contains(uid)
    }

    /// Records `uid` durably; only then may the process start.
    pub fn record(&mut self, uid: &str) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(format!("{uid}\n").as_bytes())?;
        f.sync_data()?;
        self.started.insert(uid.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p).unwrap();
        assert!(!j.contains("a"));
        j.record("a").unwrap();
        let j = Journal::open(&p).unwrap();
        assert!(j.contains("a") && !j.contains("b"));
    }
}
