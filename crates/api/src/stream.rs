//! Docker's stream framing.

/// Stream ids of the multiplexed format.
#[derive(Debug, Clone, Copy)]
pub enum StreamId {
    /// Standard output.
    Stdout = 1,
    /// Standard error.
    Stderr = 2,
}

/// One frame of `application/vnd.docker.multiplexed-stream`: an 8-byte
/// header (stream id, three zero bytes, big-endian length) and the payload.
pub fn frame(stream: StreamId, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.push(stream as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Content type for raw (TTY) streams.
pub const RAW: &str = "application/vnd.docker.raw-stream";
/// Content type for multiplexed streams.
pub const MULTIPLEXED: &str = "application/vnd.docker.multiplexed-stream";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        assert_eq!(
            frame(StreamId::Stderr, b"hi"),
            vec![2, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']
        );
        assert_eq!(frame(StreamId::Stdout, b"")[..8], [1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
