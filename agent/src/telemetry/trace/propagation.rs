//! Trace context in HTTP headers: W3C Trace Context (`traceparent`,
//! `tracestate`) and B3 (the single `b3` header and the `x-b3-*` headers).
//!
//! Reading is total: any malformed, oversized, repeated or non-UTF-8 value
//! is ignored (as if absent), never an error or a panic. `traceparent`
//! wins over `b3`, which wins over `x-b3-*`. Writing replaces every
//! context header with one consistent context: `traceparent` (version 00),
//! `tracestate` passed on as received (only with a valid `traceparent`),
//! the `x-b3-*` headers (128-bit trace id), and `b3` when the request came
//! with one.

use std::fmt;

use hyper::{header::HeaderValue, HeaderMap};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const X_B3_TRACEID: &str = "x-b3-traceid";
pub const X_B3_SPANID: &str = "x-b3-spanid";
pub const X_B3_PARENTSPANID: &str = "x-b3-parentspanid";
pub const X_B3_SAMPLED: &str = "x-b3-sampled";
pub const X_B3_FLAGS: &str = "x-b3-flags";
/// A `tracestate` longer than this is dropped (W3C asks for at least 512).
pub const MAX_TRACESTATE: usize = 512;

/// A 16-byte trace id, never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id, never all zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let b: [u8; 16] = rand::random();
            if b != [0; 16] {
                return Self(b);
            }
        }
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let b: [u8; 8] = rand::random();
            if b != [0; 8] {
                return Self(b);
            }
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, b: &[u8]) -> fmt::Result {
    for x in b {
        write!(f, "{x:02x}")?;
    }
    Ok(())
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The caller's span, as its headers name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

/// What a request's headers say about its trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The caller's span, if the headers name a valid one.
    pub parent: Option<Parent>,
    /// The caller's sampling decision, if it made one (B3 may carry one
    /// without ids: `b3: 0`).
    pub sampled: Option<bool>,
    /// `tracestate`, kept with a valid `traceparent` only.
    pub trace_state: Option<String>,
    /// The request carried a `b3` single header (so the answer does too).
    pub b3_single: bool,
}

/// The one value of header `name`, as text; a repeated or non-UTF-8
/// header counts as absent.
fn one<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut all = h.get_all(name).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    v.to_str().ok().map(str::trim)
}

/// `N` bytes from `2N` hex digits (lowercase only when `strict`).
fn hex<const N: usize>(s: &str, strict: bool) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !strict => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

fn trace_id(s: &str, strict: bool) -> Option<TraceId> {
    let id = match s.len() {
        // B3's 64-bit trace ids, widened to 128 bits with leading zeros.
        16 if !strict => {
            let low: [u8; 8] = hex(s, strict)?;
            let mut b = [0u8; 16];
            b[8..].copy_from_slice(&low);
            b
        }
        _ => hex::<16>(s, strict)?,
    };
    (id != [0; 16]).then_some(TraceId(id))
}

fn span_id(s: &str, strict: bool) -> Option<SpanId> {
    let id = hex::<8>(s, strict)?;
    (id != [0; 8]).then_some(SpanId(id))
}

/// W3C `traceparent`: `version-traceid-parentid-flags`. Version `ff` is
/// invalid; a later version may append fields after a `-`.
fn traceparent(v: &str) -> Option<(Parent, bool)> {
    if v.len() < 55 {
        return None;
    }
    let version = hex::<1>(v.get(0..2)?, true)?[0];
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v.as_bytes()[55] != b'-') {
        return None;
    }
    let b = v.as_bytes();
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = trace_id(v.get(3..35)?, true)?;
    let span_id = span_id(v.get(36..52)?, true)?;
    let flags = hex::<1>(v.get(53..55)?, true)?[0];
    Some((Parent { trace_id, span_id }, flags & 1 == 1))
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// B3 single: `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or just
/// the sampling state.
fn b3_single(v: &str) -> Option<(Option<Parent>, Option<bool>)> {
    let parts: Vec<&str> = v.split('-').collect();
    match parts.as_slice() {
        [s] => Some((None, Some(b3_sampled(s)?))),
        [t, s, rest @ ..] if rest.len() <= 2 => {
            let parent = Parent {
                trace_id: trace_id(t, false)?,
                span_id: span_id(s, false)?,
            };
            let sampled = match rest.first() {
                Some(x) => Some(b3_sampled(x)?),
                None => None,
            };
            if let Some(p) = rest.get(1) {
                span_id(p, false)?;
            }
            Some((Some(parent), sampled))
        }
        _ => None,
    }
}

/// The trace context of a request (see the module doc).
pub fn extract(h: &HeaderMap) -> Extracted {
    let b3_present = h.contains_key(B3);
    let mut out = Extracted {
        b3_single: b3_present,
        ..Default::default()
    };
    if let Some((p, sampled)) = one(h, TRACEPARENT).and_then(traceparent) {
        out.parent = Some(p);
        out.sampled = Some(sampled);
        out.trace_state = trace_state(h);
        return out;
    }
    if let Some((p, s)) = one(h, B3).and_then(b3_single) {
        out.parent = p;
        out.sampled = s;
        return out;
    }
    let debug = one(h, X_B3_FLAGS) == Some("1");
    let sampled = if debug {
        Some(true)
    } else {
        one(h, X_B3_SAMPLED).and_then(b3_sampled)
    };
    let parent = match (one(h, X_B3_TRACEID), one(h, X_B3_SPANID)) {
        (Some(t), Some(s)) => trace_id(t, false).zip(span_id(s, false)),
        _ => None,
    };
    out.parent = parent.map(|(trace_id, span_id)| Parent { trace_id, span_id });
    out.sampled = sampled;
    out
}

/// `tracestate` values joined by `,` (a header may be split), if printable
/// ASCII and no longer than [`MAX_TRACESTATE`].
fn trace_state(h: &HeaderMap) -> Option<String> {
    let mut s = String::new();
    for v in h.get_all(TRACESTATE) {
        let v = v.to_str().ok()?.trim();
        if v.is_empty() {
            continue;
        }
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(v);
    }
    let ok = !s.is_empty() && s.len() <= MAX_TRACESTATE && s.bytes().all(|b| (0x20..0x7f).contains(&b));
    ok.then_some(s)
}

/// The context sent on: `span` is the span the receiver's span will be a
/// child of, `parent` that span's own parent (for `x-b3-parentspanid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing<'a> {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub trace_state: Option<&'a str>,
    pub b3_single: bool,
}

/// Replaces every context header of `h` with `o` (see the module doc).
pub fn inject(h: &mut HeaderMap, o: &Outgoing<'_>) {
    let flag = if o.sampled { "1" } else { "0" };
    let set = |h: &mut HeaderMap, name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    set(h, TRACEPARENT, format!("00-{}-{}-0{flag}", o.trace_id, o.span_id));
    h.remove(TRACESTATE);
    if let Some(ts) = o.trace_state {
        set(h, TRACESTATE, ts.to_owned());
    }
    set(h, X_B3_TRACEID, o.trace_id.to_string());
    set(h, X_B3_SPANID, o.span_id.to_string());
    match o.parent {
        Some(p) => set(h, X_B3_PARENTSPANID, p.to_string()),
        None => {
            h.remove(X_B3_PARENTSPANID);
        }
    }
    h.insert(
        X_B3_SAMPLED,
        HeaderValue::from_static(if o.sampled { "1" } else { "0" }),
    );
    h.remove(X_B3_FLAGS);
    h.remove(B3);
    if o.b3_single {
        let parent = o.parent.map(|p| format!("-{p}")).unwrap_or_default();
        set(h, B3, format!("{}-{}-{flag}{parent}", o.trace_id, o.span_id));
    }
}

/// Parent-based sampling: the caller's decision when it made one, else a
/// new trace is sampled when `roll` (uniform in [0, 1)) is below `rate`.
pub fn decide(incoming: Option<bool>, rate: f64, roll: f64) -> bool {
    incoming.unwrap_or(roll < rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn reads_a_w3c_traceparent_and_its_tracestate() {
        let e = extract(&headers(&[
            (TRACEPARENT, TP),
            (TRACESTATE, "congo=t61rcWkgMzE"),
            (TRACESTATE, "rojo=00f067aa0ba902b7"),
        ]));
        let p = e.parent.unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(e.sampled, Some(true));
        assert_eq!(
            e.trace_state.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let e = extract(&headers(&[(TRACEPARENT, &TP.replace("-01", "-00"))]));
        assert_eq!(e.sampled, Some(false));
        // A later version may append fields.
        let future = format!("cc{}-what-comes-next", &TP[2..]);
        assert!(extract(&headers(&[(TRACEPARENT, &future)])).parent.is_some());
    }

    #[test]
    fn ignores_bad_traceparents() {
        let bad = [
            "",
            "00",
            &TP.to_uppercase(),
            &TP.replace("4bf92f3577b34da6a3ce929d0e0e4736", "00000000000000000000000000000000"),
            &TP.replace("00f067aa0ba902b7", "0000000000000000"),
            &TP.replacen("00-", "ff-", 1),
            &format!("{TP}-extra"),
            &TP.replace('-', "_"),
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        ];
        for v in bad {
            let Ok(hv) = HeaderValue::from_str(v) else { continue };
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, hv);
            h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
            assert_eq!(extract(&h), Extracted::default(), "{v:?}");
        }
        // Twice: ambiguous, ignored.
        assert_eq!(extract(&headers(&[(TRACEPARENT, TP), (TRACEPARENT, TP)])).parent, None);
        // Not UTF-8.
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_bytes(b"00-\xff\xfe").unwrap());
        assert_eq!(extract(&h), Extracted::default());
        // An oversized tracestate is dropped, the context kept.
        let long = "k=".to_owned() + &"v".repeat(MAX_TRACESTATE);
        let e = extract(&headers(&[(TRACEPARENT, TP), (TRACESTATE, &long)]));
        assert!(e.parent.is_some() && e.trace_state.is_none());
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let e = extract(&headers(&[(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        assert_eq!(e.parent.unwrap().span_id.to_string(), "e457b5a2e4d86bd1");
        assert_eq!(e.sampled, Some(true));
        assert!(e.b3_single);
        let e = extract(&headers(&[(B3, "0")]));
        assert_eq!((e.parent, e.sampled), (None, Some(false)));
        let e = extract(&headers(&[(B3, "e457b5a2e4d86bd1-05e3ac9a4f6e3b90")]));
        let p = e.parent.unwrap();
        assert_eq!(
            p.trace_id.to_string(),
            "0000000000000000e457b5a2e4d86bd1",
            "64-bit ids widened"
        );
        assert_eq!(e.sampled, None);
        let e = extract(&headers(&[
            (X_B3_TRACEID, "80F198EE56343BA864FE8B2A57D3EFF7"),
            (X_B3_SPANID, "e457b5a2e4d86bd1"),
            (X_B3_SAMPLED, "0"),
        ]));
        assert_eq!(
            e.parent.unwrap().trace_id.to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(e.sampled, Some(false));
        let e = extract(&headers(&[(X_B3_FLAGS, "1"), (X_B3_SAMPLED, "0")]));
        assert_eq!((e.parent, e.sampled), (None, Some(true)), "debug means sampled");
        for bad in [
            "",
            "x",
            "1-2",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-2",
            "a-b-c-d-e",
            "--",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-zz",
        ] {
            let e = extract(&headers(&[(B3, bad)]));
            assert_eq!((e.parent, e.sampled), (None, None), "{bad:?}");
        }
        // traceparent wins over B3.
        let e = extract(&headers(&[(B3, "0"), (TRACEPARENT, TP)]));
        assert_eq!(e.sampled, Some(true));
    }

    #[test]
    fn writes_one_consistent_context() {
        let mut h = headers(&[(X_B3_FLAGS, "1"), (X_B3_PARENTSPANID, "1111111111111111"), (B3, "1")]);
        let o = Outgoing {
            trace_id: TraceId([0xab; 16]),
            span_id: SpanId([0x01; 8]),
            parent: Some(SpanId([0x02; 8])),
            sampled: true,
            trace_state: Some("a=b"),
            b3_single: true,
        };
        inject(&mut h, &o);
        let t = "abababababababababababababababab";
        assert_eq!(h[TRACEPARENT], format!("00-{t}-0101010101010101-01").as_str());
        assert_eq!(h[TRACESTATE], "a=b");
        assert_eq!(h[X_B3_TRACEID], t);
        assert_eq!(h[X_B3_SPANID], "0101010101010101");
        assert_eq!(h[X_B3_PARENTSPANID], "0202020202020202");
        assert_eq!(h[X_B3_SAMPLED], "1");
        assert_eq!(h[B3], format!("{t}-0101010101010101-1-0202020202020202").as_str());
        assert!(h.get(X_B3_FLAGS).is_none());
        // What was written reads back.
        let e = extract(&h);
        assert_eq!(e.parent.unwrap().span_id, SpanId([0x01; 8]));
        inject(
            &mut h,
            &Outgoing {
                parent: None,
                sampled: false,
                trace_state: None,
                b3_single: false,
                ..o
            },
        );
        assert!(h.get(X_B3_PARENTSPANID).is_none() && h.get(B3).is_none() && h.get(TRACESTATE).is_none());
        assert_eq!(h[X_B3_SAMPLED], "0");
        assert!(h[TRACEPARENT].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn sampling_is_parent_based() {
        assert!(decide(Some(true), 0.0, 0.5));
        assert!(!decide(Some(false), 1.0, 0.0));
        assert!(decide(None, 1.0, 0.999));
        assert!(!decide(None, 0.0, 0.0));
        assert!(decide(None, 0.01, 0.005) && !decide(None, 0.01, 0.02));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for n in 0..5000 {
            let mut v = Vec::new();
            for _ in 0..(n % 80) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Mostly hex digits and dashes, so some values get far.
                let pool = b"0123456789abcdef-ABCDEF\xff\t d1";
                v.push(pool[(seed % pool.len() as u64) as usize]);
            }
            let Ok(hv) = HeaderValue::from_bytes(&v) else { continue };
            for name in [
                TRACEPARENT,
                TRACESTATE,
                B3,
                X_B3_TRACEID,
                X_B3_SPANID,
                X_B3_SAMPLED,
                X_B3_FLAGS,
            ] {
                let mut h = HeaderMap::new();
                h.insert(name, hv.clone());
                if name == TRACESTATE {
                    h.insert(TRACEPARENT, HeaderValue::from_static(TP));
                }
                let _ = extract(&h);
            }
        }
    }
}
