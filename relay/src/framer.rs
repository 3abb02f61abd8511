//! `LinkFramer`: frames on a byte line that may corrupt, drop, duplicate or
//! invent bytes. A frame is `[header][payload][crc32]`, COBS-encoded so
//! that 0x00 never appears inside it, and ended by 0x00. A receiver resyncs
//! at the next 0x00 whatever came before, so garbage costs at most the
//! frame it hit; the CRC-32 rejects every frame that was changed.

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 1024;
const HEADER: usize = 1 + 4 * 5;
const CRC: usize = 4;
/// Longest encoded frame: COBS adds one byte per 254, plus the delimiter.
pub const MAX_ENCODED: usize = HEADER + MAX_PAYLOAD + CRC + (HEADER + MAX_PAYLOAD + CRC) / 254 + 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// "I am session `src`; I know you as `dst`" (0: not yet).
    Hello = 1,
    Data = 2,
    Ack = 3,
    Ping = 4,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    /// The sender's session id (random per link incarnation, never 0).
    pub src: u32,
    /// The receiver's session id as the sender knows it (0: unknown).
    pub dst: u32,
    pub seq: u32,
    /// Cumulative acknowledgement: the next sequence number the sender
    /// expects from the receiver.
    pub ack: u32,
    /// Selective acknowledgement: bit i set means `ack + 1 + i` arrived.
    pub sack: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The frame on the wire, delimiter included.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(HEADER + self.payload.len() + CRC);
        raw.push(self.kind as u8);
        for v in [self.src, self.dst, self.seq, self.ack, self.sack] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        raw.extend_from_slice(&self.payload);
        let crc = crc32fast::hash(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        let mut out = cobs::encode_vec(&raw);
        out.push(0);
        out
    }

    /// Decodes one frame's bytes (without the delimiter); None when they
    /// are not a whole, unchanged frame.
    pub fn decode(encoded: &[u8]) -> Option<Frame> {
        if encoded.is_empty() || encoded.len() > MAX_ENCODED {
            return None;
        }
        let raw = cobs::decode_vec(encoded).ok()?;
        if raw.len() < HEADER + CRC || raw.len() > HEADER + MAX_PAYLOAD + CRC {
            return None;
        }
        let (body, crc) = raw.split_at(raw.len() - CRC);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let kind = match body[0] {
            1 => Kind::Hello,
            2 => Kind::Data,
            3 => Kind::Ack,
            4 => Kind::Ping,
            _ => return None,
        };
        let word = |i: usize| u32::from_le_bytes(body[1 + 4 * i..5 + 4 * i].try_into().unwrap_or_default());
        Some(Frame {
            kind,
            src: word(0),
            dst: word(1),
            seq: word(2),
            ack: word(3),
            sack: word(4),
            payload: body[HEADER..].to_vec(),
        })
    }
}

/// Cuts a byte stream into frames at each 0x00. Bytes of an overlong run
/// are dropped until the next delimiter.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    overlong: bool,
    /// Frames rejected (bad CRC, bad encoding, overlong): for statistics.
    pub rejected: u64,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            if b != 0 {
                if self.buf.len() < MAX_ENCODED {
                    self.buf.push(b);
                } else {
                    self.overlong = true;
                }
                continue;
            }
            if !self.buf.is_empty() {
                match (!self.overlong).then(|| Frame::decode(&self.buf)).flatten() {
                    Some(f) => out.push(f),
                    None => self.rejected += 1,
                }
            }
            self.buf.clear();
            self.overlong = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Frame {
        Frame { kind: Kind::Data, src: 7, dst: 9, seq: 3, ack: 1, sack: 0b101, payload: payload.to_vec() }
    }

    #[test]
    fn frames_round_trip_and_never_contain_zero_inside() {
        for len in [0, 1, 253, 254, 255, 1000, MAX_PAYLOAD] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 7) as u8).collect();
            let f = frame(&payload);
            let wire = f.encode();
            assert!(wire.len() <= MAX_ENCODED, "{len}");
            assert_eq!(wire.iter().filter(|&&b| b == 0).count(), 1);
            let mut r = FrameReader::default();
            let mut out = Vec::new();
            r.push(&wire, &mut out);
            assert_eq!(out, vec![f]);
        }
    }

    #[test]
    fn every_single_byte_change_is_rejected_and_the_next_frame_survives() {
        let a = frame(b"hello, serial line").encode();
        let b = frame(b"second frame").encode();
        for i in 0..a.len() - 1 {
            for change in [0x01u8, 0x80, 0xff] {
                let mut bad = a.clone();
                bad[i] ^= change;
                let mut r = FrameReader::default();
                let mut out = Vec::new();
                r.push(&bad, &mut out);
                r.push(&b, &mut out);
                // A changed byte may split the frame in two at a new 0x00;
                // neither half passes, and the next frame is intact.
                assert_eq!(out.last().map(|f| f.payload.as_slice()), Some(&b"second frame"[..]), "byte {i}");
                assert!(out.iter().all(|f| f.payload != b"hello, serial line"), "byte {i} ^ {change:#x} passed");
            }
        }
    }

    #[test]
    fn garbage_and_overlong_runs_are_skipped() {
        let mut r = FrameReader::default();
        let mut out = Vec::new();
        r.push(&[0x55; MAX_ENCODED * 3], &mut out);
        r.push(&[0, 1, 2, 3, 0], &mut out);
        r.push(&frame(b"ok").encode(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload, b"ok");
        assert_eq!(r.rejected, 2);
    }
}
