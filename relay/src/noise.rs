//! A line that damages bytes at a configured rate: for tests and
//! benchmarks of the serial link layer (never used by the relay itself).
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-byte probabilities of each kind of damage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noise {
    /// One bit of the byte flipped.
    pub corrupt: f64,
    /// The byte lost.
    pub drop: f64,
    /// The byte sent twice.
    pub duplicate: f64,
    /// A random byte inserted after it.
    pub invent: f64,
}

impl Noise {
    /// Every kind of damage at `rate` per byte.
    pub fn uniform(rate: f64) -> Noise {
        Noise { corrupt: rate, drop: rate, duplicate: rate, invent: rate }
    }
}

/// Copies `from` to `to`, damaging bytes as `noise` says (seeded, so a run
/// can be repeated), until either side closes. Returns the bytes damaged.
pub async fn copy_noisy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    noise: Noise,
    seed: u64,
) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 4096];
    let mut damaged = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return damaged,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n + 16);
        for &b in &buf[..n] {
            let mut r: f64 = rng.random();
            let mut hit = |p: f64| {
                let h = r < p;
                r -= p;
                h
            };
            if hit(noise.corrupt) {
                out.push(b ^ (1 << rng.random_range(0..8)));
            } else if hit(noise.drop) {
            } else if hit(noise.duplicate) {
                out.extend_from_slice(&[b, b]);
            } else if hit(noise.invent) {
                out.extend_from_slice(&[b, rng.random()]);
            } else {
                out.push(b);
                continue;
            }
            damaged += 1;
        }
        if to.write_all(&out).await.is_err() || to.flush().await.is_err() {
            return damaged;
        }
    }
}
