//! Credentials out of everything debimg shows or keeps: a URL's password (or a user name that
//! stands alone, as access tokens do) becomes `***` in logs, errors, `build.log` and metadata.
//!
//! The programs debimg runs (apt, mmdebstrap) still get the real URLs; only text meant for
//! people and files goes through [`text`].

use std::borrow::Cow;

/// What a hidden credential is shown as.
pub const MASK: &str = "***";

/// `text` with the credentials of every URL in it masked: `http://user:pw@host` becomes
/// `http://user:***@host`, `https://token@host` becomes `https://***@host`. Text without
/// `://` comes back borrowed.
pub fn text(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query or fragment, or where the URL ends in the text.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '`' | '<' | '>' | '\\')
                    || c.is_whitespace()
                    || c.is_control()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                if let Some((user, _)) = userinfo.split_once(':') {
                    out.push_str(user);
                    out.push(':');
                }
                out.push_str(MASK);
                out.push_str(&authority[at..]);
                changed = true;
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

/// [`text`] as an owned string, for fields that keep it.
pub fn owned(s: &str) -> String {
    text(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_masked() {
        assert_eq!(
            text("http://user:secret@m.example/debian"),
            "http://user:***@m.example/debian"
        );
        assert_eq!(
            text("deb https://ghp_token@m.example/x bookworm main"),
            "deb https://***@m.example/x bookworm main"
        );
        assert_eq!(
            text("fetching http://a:b@h1/x and http://c:d@h2:8080?q=1 failed"),
            "fetching http://a:***@h1/x and http://c:***@h2:8080?q=1 failed"
        );
        // A password holding `@` and `:` is masked whole.
        assert_eq!(text("http://u:p@ss:w@host/"), "http://u:***@host/");
        assert_eq!(text("`http://u:p@host`"), "`http://u:***@host`");
    }

    #[test]
    fn text_without_credentials_is_unchanged() {
        for s in [
            "no url here",
            "http://m.example/debian",
            "file:///srv/repo",
            "mail me at a@b.example",
            "http://host/path@not-userinfo",
            "",
        ] {
            assert!(matches!(text(s), Cow::Borrowed(_)), "{s}");
            assert_eq!(text(s), s);
        }
    }
}
