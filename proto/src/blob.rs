//! Blobs: content-addressed files named `sha256:<hex>`, and how to hash
//! them (`testbus_client::transfer` moves them; both ends verify the
//! digest).
use sha2::{Digest, Sha256};
use std::path::Path;
use tokio::io::AsyncReadExt;

pub const PREFIX: &str = "sha256:";
/// Upload and download chunk size.
pub const CHUNK: usize = 256 * 1024;

/// `sha256:` and 64 lower-case hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix(PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The hex part of a valid digest (safe as a file name).
pub fn hex_of(d: &str) -> Option<&str> {
    valid_digest(d).then(|| &d[PREFIX.len()..])
}

#[derive(Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn finish(self) -> String {
        format!("{PREFIX}{}", hex::encode(self.0.finalize()))
    }
}

pub fn digest_of(data: &[u8]) -> String {
    let mut h = Hasher::default();
    h.update(data);
    h.finish()
}

/// Digest and size of a local file.
pub async fn digest_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Hasher::default();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok((h.finish(), size));
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let d = digest_of(b"hello\n");
        assert_eq!(d, "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        assert!(valid_digest(&d));
        for bad in [
            "",
            "sha256:",
            "sha256:XYZ",
            "md5:5891b5b5",
            &d.to_uppercase(),
            &format!("{d}0"),
            "sha256:../../etc/passwd",
        ] {
            assert!(!valid_digest(bad), "{bad}");
        }
    }
}
