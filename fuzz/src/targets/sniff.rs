//! Protocol sniffing: the agent's first-bytes classifier
//! (`proxy::http::detect::classify`), on every prefix of the input, as
//! `sniff` calls it while bytes arrive. Checks that a verdict, once given,
//! never changes as more bytes come, and that it never asks for more than
//! the sniffer reads (`NeedMore` past 24 bytes would make `sniff` read
//! nothing and call the connection TCP).

use ferry_agent::proxy::http::detect::{classify, Verdict, H2_PREFACE};

/// One input (the cargo-fuzz target `sniff` and the replay test call this).
pub fn run(data: &[u8]) {
    let data = &data[..data.len().min(64)];
    let mut decided: Option<Verdict> = None;
    for n in 0..=data.len() {
        let v = classify(&data[..n]);
        if n >= H2_PREFACE.len() {
            assert_ne!(v, Verdict::NeedMore, "NeedMore after {n} bytes: {:?}", &data[..n]);
        }
        match decided {
            Some(d) => assert_eq!(v, d, "verdict changed at {n} bytes: {:?}", &data[..n]),
            None if v != Verdict::NeedMore => decided = Some(v),
            None => {}
        }
    }
}
