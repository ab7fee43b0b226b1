//! Request paths normalized before authorization, as Istio's default
//! (`pathNormalization: BASE`, RFC 3986): percent-encoded unreserved
//! characters decoded, the hex of other escapes upper-cased, dot segments
//! removed. Encoded slashes and backslashes (`%2F`, `%5C`) are kept as
//! they are, and so are repeated slashes (Istio's `MERGE_SLASHES` is not
//! the default). The app gets the normalized path, so what it serves is
//! what was authorized (`/public/../admin` is `/admin` for both).

use std::borrow::Cow;

/// `path` normalized (borrowed when already normal). A path that does not
/// start with `/` (`*`, or empty for CONNECT) is returned as it is.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    // Decoded until nothing changes: one pass can assemble a new escape
    // (`%2%65` -> `%2e`), and what the app may decode later must be what
    // was authorized. Each pass that changes something either shortens the
    // path or only upper-cases hex, so this ends.
    let mut decoded = decode_unreserved(path);
    loop {
        let again = decode_unreserved(&decoded);
        if again == decoded {
            break;
        }
        decoded = Cow::Owned(again.into_owned());
    }
    let needs_dots = decoded.split('/').any(|s| s == "." || s == "..");
    if !needs_dots {
        return decoded;
    }
    Cow::Owned(remove_dot_segments(&decoded))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `%41` -> `A`, `%2e` -> `.`, `%2f` -> `%2F`; a malformed escape is kept.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if is_unreserved(c) {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        // A path from hyper is ASCII; anything else is copied byte-safely.
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    Cow::Owned(out)
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments dropped, `..` drops
/// the segment before it (never above the root); a trailing `.` or `..`
/// leaves a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    for (i, s) in segs.iter().enumerate() {
        match *s {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn dot_segments_and_unreserved_escapes_are_normalized() {
        for (raw, want) in [
            ("/productpage", "/productpage"),
            ("/a/b/../c", "/a/c"),
            ("/public/../admin", "/admin"),
            ("/./admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("/%2e%2e/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%5Cb", "/a%5Cb"),
            ("/a//b", "/a//b"),
            ("/bad%zz", "/bad%zz"),
            ("/end%", "/end%"),
            ("/end%4", "/end%4"),
            ("/x..y/.z", "/x..y/.z"),
            // Escapes assembled by decoding are decoded too (found by fuzzing:
            // fuzz/regressions/http_path-not-idempotent).
            ("/public/%2%65%2%65/admin", "/admin"),
            ("/!22e%e%6%61dmAn", "/!22e%ejdmAn"),
            ("*", "*"),
            ("", ""),
        ] {
            assert_eq!(normalize(raw), want, "{raw}");
            assert_eq!(normalize(want), want, "idempotent on {raw}");
        }
    }
}
