//! How pool guests are marked on their Hosts. A guest's agent registers
//! its Host with the pool's label; the pool controller marks it clean once
//! it has been brought back to its clean state, and a claim takes the mark
//! away in the same write. A pool host without the mark is never free:
//! no test sees what an earlier one left behind.
use crate::{Host, Resource};

/// Label every pool guest's Host carries: the pool's name.
pub const POOL_LABEL: &str = "testbus.io/pool";

/// Annotation of a pool guest's Host that is clean (never used since its
/// last clean state): "true".
pub const CLEAN_ANNOTATION: &str = "testbus.io/clean";

/// Whether a libvirt URI names a daemon on another machine: it has a host
/// (`qemu+ssh://user@host/system`, `qemu+tls://host/system`), where a local
/// one has none (`qemu:///system`, `qemu+unix:///system`).
pub fn is_remote_uri(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(_, rest)| !rest.starts_with('/') && !rest.is_empty())
}

/// Whether `name` is how the pool controller names a guest of `pool`: the
/// pool's name, a dash and five hex digits (pool `a`'s guests are not
/// pool `a-b`'s).
pub fn is_guest_of(pool: &str, name: &str) -> bool {
    name.strip_prefix(pool)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|id| id.len() == 5 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pool a Host is a guest of, if any.
pub fn pool_of(h: &Host) -> Option<&str> {
    h.meta().labels.get(POOL_LABEL).map(String::as_str)
}

/// Whether a Host may be claimed as far as pools go: any host outside a
/// pool, a pool guest only when marked clean.
pub fn clean_enough(h: &Host) -> bool {
    pool_of(h).is_none() || h.meta().annotations.get(CLEAN_ANNOTATION).is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_are_matched_exactly() {
        assert!(is_guest_of("vms", "vms-0a1b2"));
        for not in ["vms-x-0a1b2", "vms-0a1b", "vms-0a1b23", "vms0a1b2", "vms-0a1bz", "vmsx-0a1b2", "vms-"] {
            assert!(!is_guest_of("vms", not), "{not}");
        }
    }

    #[test]
    fn a_uri_with_a_host_is_remote() {
        for remote in ["qemu+ssh://root@10.77.0.9/system", "qemu+tls://lab2/system", "qemu+ssh://h/system?keyfile=/k"] {
            assert!(is_remote_uri(remote), "{remote}");
        }
        for local in ["qemu:///system", "qemu+unix:///system", "test:///default", "qemu:///session", "qemu", "qemu://"]
        {
            assert!(!is_remote_uri(local), "{local}");
        }
    }
}
