//! Just enough of RFC 6455's framing to relay a WebSocket without buffering its messages:
//! a cursor that follows the frame boundaries in a byte stream chunk by chunk (so the relay
//! knows where it may insert a frame of its own and how many messages went by), reads the
//! code of a close frame, and builds the few frames the gateway sends itself (close, ping).

/// Opcodes the relay cares about.
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;

/// What a chunk of the stream completed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Data messages completed (final frames of text, binary or continuation).
    pub(crate) messages: u64,
    /// A close frame ended in this chunk, with its status code (1005 when it had none).
    pub(crate) close: Option<u16>,
}

/// Where the stream is: in a frame's header, or in its payload.
#[derive(Debug, Default)]
pub(crate) struct FrameCursor {
    header: [u8; 14],
    /// Header bytes read of the current frame.
    have: usize,
    /// Payload bytes still to come of the current frame (once its header is complete).
    payload_left: u64,
    in_payload: bool,
    /// The current frame is a close frame: its first two payload bytes are the code.
    close_code: Option<[u8; 2]>,
    close_code_have: usize,
    /// Payload offset within the current frame (for unmasking the close code).
    payload_seen: u64,
}

/// The length of a frame header whose second byte is `b1` (the mask bit and the 7-bit length
/// decide it; the first byte never does).
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl FrameCursor {
    /// Between two frames: the relay may put a frame of its own into this stream now.
    pub(crate) fn at_boundary(&self) -> bool {
        self.have == 0 && !self.in_payload
    }

    /// Follows `chunk` through the stream; says which messages and close frames it ended.
    pub(crate) fn advance(&mut self, mut chunk: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !chunk.is_empty() {
            if !self.in_payload {
                // Header: its length is known once the second byte is in.
                let want = if self.have < 2 {
                    2
                } else {
                    header_len(self.header[1])
                };
                let take = (want - self.have).min(chunk.len());
                self.header[self.have..self.have + take].copy_from_slice(&chunk[..take]);
                self.have += take;
                chunk = &chunk[take..];
                if self.have < want || (want == 2 && header_len(self.header[1]) > 2) {
                    continue;
                }
                self.start_payload();
                if self.payload_left == 0 {
                    self.end_frame(&mut seen);
                }
                continue;
            }
            let take = (self.payload_left.min(chunk.len() as u64)) as usize;
            if self.close_code.is_some() && self.close_code_have < 2 {
                let need = (2 - self.close_code_have).min(take);
                for (i, b) in chunk[..need].iter().enumerate() {
                    let at = self.payload_seen as usize + i;
                    let mask = self.mask_byte(at);
                    if let Some(code) = self.close_code.as_mut() {
                        code[self.close_code_have + i] = b ^ mask;
                    }
                }
                self.close_code_have += need;
            }
            self.payload_left -= take as u64;
            self.payload_seen += take as u64;
            chunk = &chunk[take..];
            if self.payload_left == 0 {
                self.end_frame(&mut seen);
            }
        }
        seen
    }

    fn opcode(&self) -> u8 {
        self.header[0] & 0x0f
    }

    fn mask_byte(&self, at: usize) -> u8 {
        if self.header[1] & 0x80 == 0 {
            return 0;
        }
        let key_at = header_len(self.header[1]) - 4;
        self.header[key_at + at % 4]
    }

    fn start_payload(&mut self) {
        let b1 = self.header[1];
        self.payload_left = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(n)
            }
            n => u64::from(n),
        };
        self.in_payload = true;
        self.payload_seen = 0;
        self.close_code = (self.opcode() == OP_CLOSE).then_some([0, 0]);
        self.close_code_have = 0;
    }

    fn end_frame(&mut self, seen: &mut Seen) {
        let fin = self.header[0] & 0x80 != 0;
        match self.opcode() {
            OP_TEXT | OP_BINARY | OP_CONTINUATION if fin => seen.messages += 1,
            OP_CLOSE => {
                seen.close = Some(match (self.close_code, self.close_code_have) {
                    (Some(code), 2) => u16::from_be_bytes(code),
                    // No status code in the frame.
                    _ => 1005,
                })
            }
            _ => {}
        }
        self.have = 0;
        self.in_payload = false;
        self.payload_left = 0;
        self.close_code = None;
    }
}

/// A close frame with `code` and a short `reason`; masked (as a client must) with `mask`.
pub(crate) fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    control_frame(OP_CLOSE, &payload, mask)
}

/// A control frame (close, ping: payload of at most 125 bytes).
pub(crate) fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let len = payload.len().min(125);
    let mut frame = Vec::with_capacity(6 + len);
    frame.push(0x80 | opcode);
    match mask {
        Some(key) => {
            frame.push(0x80 | len as u8);
            frame.extend_from_slice(&key);
            frame.extend(
                payload[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[i % 4]),
            );
        }
        None => {
            frame.push(len as u8);
            frame.extend_from_slice(&payload[..len]);
        }
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data frame as a peer would send it.
    fn data(opcode: u8, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    #[test]
    fn follows_frames_across_any_chunking() {
        let mask = Some([1, 2, 3, 4]);
        let mut stream = Vec::new();
        stream.extend(data(OP_TEXT, true, b"hello", None));
        stream.extend(data(OP_BINARY, false, &[7; 300], mask));
        stream.extend(control_frame(OP_PING, b"p", mask));
        stream.extend(data(OP_CONTINUATION, true, &[8; 70_000], mask));
        stream.extend(close_frame(1001, "going away", mask));
        // Every way of cutting the stream in two chunks sees the same thing.
        for cut in [
            0,
            1,
            2,
            3,
            7,
            8,
            9,
            300,
            310,
            320,
            70_000,
            stream.len() - 3,
            stream.len(),
        ] {
            let mut c = FrameCursor::default();
            let a = c.advance(&stream[..cut]);
            let b = c.advance(&stream[cut..]);
            assert_eq!(a.messages + b.messages, 2, "cut at {cut}");
            assert_eq!(a.close.or(b.close), Some(1001), "cut at {cut}");
            assert!(c.at_boundary());
        }
        // And byte by byte.
        let mut c = FrameCursor::default();
        let mut messages = 0;
        let mut close = None;
        for b in &stream {
            let s = c.advance(std::slice::from_ref(b));
            messages += s.messages;
            close = close.or(s.close);
        }
        assert_eq!((messages, close), (2, Some(1001)));
    }

    #[test]
    fn mid_frame_is_not_a_boundary_and_a_bare_close_is_1005() {
        let mut c = FrameCursor::default();
        let f = data(OP_TEXT, true, b"abcdef", None);
        c.advance(&f[..4]);
        assert!(!c.at_boundary());
        c.advance(&f[4..]);
        assert!(c.at_boundary());
        let bare = control_frame(OP_CLOSE, &[], None);
        assert_eq!(c.advance(&bare).close, Some(1005));
    }

    #[test]
    fn built_frames_parse_back() {
        let mut c = FrameCursor::default();
        let s = c.advance(&close_frame(1012, "upstream gone", Some([9, 8, 7, 6])));
        assert_eq!(s.close, Some(1012));
        let s = c.advance(&close_frame(1011, "x", None));
        assert_eq!(s.close, Some(1011));
    }
}
