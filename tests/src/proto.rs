//! The sample workloads' wire protocol (ferry-workload serve/client).
//! One command line, then data:
//! - `WHO`        -> `<pod-name> <client-ip:port>\n`, close;
//! - `ECHO`       -> echoes every byte until EOF, then half-closes;
//! - `SINK <n>`   -> reads n bytes, answers their sha256 (hex) and the peer;
//! - `SOURCE <n>` -> sends n deterministic bytes, closes;
//! - `HOLD`       -> `<pod-name> <client-ip:port>\n` at once, then holds the
//!   connection open until the client closes it (concurrency tests).

use sha2::{Digest, Sha256};

/// Deterministic bytes (so both ends can checksum without storing them).
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x.wrapping_mul(2654435761) >> 13) as u8;
    }
}

pub fn sha256_of_pattern(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < n {
        let k = ((n - off) as usize).min(buf.len());
        pattern(off, &mut buf[..k]);
        h.update(&buf[..k]);
        off += k as u64;
    }
    hex(&h.finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
