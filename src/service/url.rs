//! URL paths of the API, as the server names them and the clients ask for them.

/// `name` with each path segment percent-encoded (the `/` between segments kept).
pub fn encode_path(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One path segment: `/` inside it encoded too.
pub fn segment(s: &str) -> String {
    encode_path(s).replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_paths_are_encoded_per_segment() {
        assert_eq!(
            encode_path("m.attachments/boot/vmlinuz-6.1"),
            "m.attachments/boot/vmlinuz-6.1"
        );
        assert_eq!(encode_path("a b?#"), "a%20b%3F%23");
    }

    #[test]
    fn a_segment_keeps_no_slash() {
        assert_eq!(segment("a/b"), "a%2Fb");
    }
}
