//! Shell-style patterns for one path component, as `attachments` are written: `*` (any run of
//! characters), `?` (one character) and `[...]` (one character of a set: `[abc]`, ranges
//! `[a-z]`, negated `[!a-z]` or `[^a-z]`, a `]` first in the set is itself).
//!
//! A pattern never spans a `/`: each component of a path is matched on its own. As in the shell,
//! a name starting with `.` is matched only by a pattern starting with a literal `.`. There are
//! no backslash escapes (`\` is an ordinary character, as in systemd's unit names `a\x2db`): a
//! literal `*`, `?` or `[` is written `[*]`, `[?]`, `[[]`. Pure: nothing here touches a file.

/// One element of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`
    Any,
    /// `?`
    One,
    /// `[...]`: inclusive ranges (a single character is a range of one).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A parsed pattern for one path component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    tokens: Vec<Token>,
}

/// True when `component` holds a pattern character (`*`, `?`, `[`) and so is matched, not
/// taken literally.
pub fn is_pattern(component: &str) -> bool {
    component.contains(['*', '?', '['])
}

impl Pattern {
    /// Parses one component; the error says what is wrong (an unclosed `[`, an empty set).
    pub fn parse(component: &str) -> Result<Pattern, String> {
        let chars: Vec<char> = component.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => {
                    // `**` means what `*` means: one token keeps matching linear.
                    if tokens.last() != Some(&Token::Any) {
                        tokens.push(Token::Any);
                    }
                    i += 1;
                }
                '?' => {
                    tokens.push(Token::One);
                    i += 1;
                }
                '[' => {
                    let (token, next) = parse_class(&chars, i)?;
                    tokens.push(token);
                    i = next;
                }
                c => {
                    tokens.push(Token::Char(c));
                    i += 1;
                }
            }
        }
        Ok(Pattern { tokens })
    }

    /// True when the name `name` (one component, no `/`) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        if name.first() == Some(&'.') && self.tokens.first() != Some(&Token::Char('.')) {
            return false;
        }
        let (mut t, mut n) = (0, 0);
        // Where the last `*` was, and how much of the name it has taken so far.
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            let step = match self.tokens.get(t) {
                Some(Token::Any) => {
                    star = Some((t + 1, n));
                    t += 1;
                    continue;
                }
                Some(Token::One) => true,
                Some(Token::Char(c)) => *c == name[n],
                Some(Token::Class { negated, ranges }) => {
                    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&name[n])) != *negated
                }
                None => false,
            };
            if step {
                t += 1;
                n += 1;
            } else if let Some((after, taken)) = star {
                // Let the last `*` take one more character and try again from there.
                star = Some((after, taken + 1));
                t = after;
                n = taken + 1;
            } else {
                return false;
            }
        }
        self.tokens[t..].iter().all(|tok| *tok == Token::Any)
    }
}

/// The set starting at `chars[open]` (a `[`): its token and the index after its `]`.
fn parse_class(chars: &[char], open: usize) -> Result<(Token, usize), String> {
    let mut i = open + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err("has a `[` without its closing `]`".to_string());
        };
        if c == ']' && !first {
            return Ok((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|&h| h != ']') {
            let hi = chars[i + 2];
            if hi < c {
                return Err(format!("has the range `{c}-{hi}`, which runs backwards"));
            }
            ranges.push((c, hi));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(m("*", "hostname"));
        assert!(m("vmlinuz-*", "vmlinuz-6.1.0-9-amd64"));
        assert!(!m("vmlinuz-*", "initrd.img-6.1.0-9-amd64"));
        assert!(m("*.conf", "a.conf"));
        assert!(
            !m("*.conf", ".conf.conf"),
            "a leading dot needs a literal dot"
        );
        assert!(m("*a*b*c", "xxaxxbxxc"));
        assert!(!m("*a*b*c", "xxaxxbxxcx"));
        assert!(m("a**b", "ab"));
        assert!(m("?", "x"));
        assert!(!m("?", ""));
        assert!(!m("?", "xy"));
        assert!(m("ab?d", "abcd"));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(m("*", ""));
        // Characters, not bytes.
        assert!(m("?", "é"));
        assert!(m("caf?", "café"));
    }

    #[test]
    fn sets_and_ranges() {
        assert!(m("[abc]", "b"));
        assert!(!m("[abc]", "d"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("[^a-c]x", "dx"));
        assert!(m("[]]", "]"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("[*]", "*"));
        assert!(!m("[*]", "x"));
        assert!(m("rc[0-9].d", "rc5.d"));
        assert!(!m("rc[0-9].d", "rcS.d"));
    }

    #[test]
    fn hidden_names_need_a_literal_dot() {
        assert!(!m("*", ".bashrc"));
        assert!(!m("?bashrc", ".bashrc"));
        assert!(!m("[.]bashrc", ".bashrc"));
        assert!(m(".*", ".bashrc"));
        assert!(m(".bash*", ".bashrc"));
    }

    #[test]
    fn backslash_is_an_ordinary_character() {
        assert!(m("mnt-a\\x2db.*", "mnt-a\\x2db.mount"));
        assert!(!m("a\\*", "a*"));
    }

    #[test]
    fn bad_sets_are_refused() {
        assert!(Pattern::parse("[abc").unwrap_err().contains("closing `]`"));
        assert!(Pattern::parse("[").is_err());
        assert!(
            Pattern::parse("[]").is_err(),
            "a `]` first is part of the set"
        );
        assert!(Pattern::parse("[z-a]").unwrap_err().contains("backwards"));
        assert!(is_pattern("a*") && is_pattern("a?") && is_pattern("[a]"));
        assert!(!is_pattern("a\\b") && !is_pattern("plain.conf"));
    }

    #[test]
    fn long_names_do_not_blow_up() {
        let name = "a".repeat(4000);
        let t = std::time::Instant::now();
        assert!(!m("*a*a*a*a*a*a*b", &name));
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }
}
