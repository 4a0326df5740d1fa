//! Text from outside (a worker's id and hello, a failure kind from an input
//! line, a header) made safe to show on a terminal or in a log: cut short,
//! and every control character written as an escape, so that none clears a
//! screen, sets a title, rings a bell, reorders text or starts a line that
//! looks like one of ours.

use std::fmt;

/// The first `max_bytes` of `text` at most, cut at a character boundary:
/// what records and `/status` keep of a long line.
pub fn head(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text`, cut to its first `max_bytes` bytes (at a character boundary,
/// `...` marking the cut) with control characters escaped (see [`Escaped`]).
pub fn escaped(text: &str, max_bytes: usize) -> String {
    let head = head(text, max_bytes);
    let mut out = Escaped(head).to_string();
    if head.len() < text.len() {
        out.push_str("...");
    }
    out
}

/// Shows a string with every control character escaped: `\n`, `\r`, `\t`
/// and `\\` as in Rust, the rest of C0 and C1 (ESC, BEL, DEL, CSI, ...) and
/// the Unicode direction and line controls as `\u{..}`. Nothing is
/// allocated: for log fields (`tracing::info!(worker = %Escaped(id))`).
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found at a character");
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Whether `c` is written as an escape: C0, DEL, C1 (`char::is_control`),
/// the backslash that starts our escapes, and the format characters that
/// move or hide text (bidirectional overrides and isolates, line and
/// paragraph separators, the zero-width ones).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_a_terminal() {
        let nasty = "w1\x1b[2J\x1b]0;pwned\x07\nlines done   5000 / 5000\r\u{202e}txt.exe\u{9b}31m";
        let shown = escaped(nasty, 1000);
        assert!(!shown.chars().any(needs_escape_but_backslash), "{shown}");
        assert_eq!(
            shown,
            "w1\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\nlines done   5000 / 5000\\r\\u{202e}txt.exe\\u{9b}31m"
        );
        // Plain text, non-ASCII included, is shown as it is.
        assert_eq!(escaped("gpu-07 – 東京", 100), "gpu-07 – 東京");
        // A backslash is doubled, so that no text can fake an escape.
        assert_eq!(Escaped("a\\nb").to_string(), "a\\\\nb");
    }

    fn needs_escape_but_backslash(c: char) -> bool {
        c != '\\' && needs_escape(c)
    }

    #[test]
    fn long_text_is_cut_at_a_character() {
        assert_eq!(escaped("ééé", 3), "é...");
        assert_eq!(escaped("abc", 3), "abc");
    }
}
