//! A token as figures show it: what it spells, with the characters a reader could not see made
//! visible, and no quotes or Rust escape codes (a Debug print shows " Mary" as `" Mary"` and a
//! no-break space as `"\u{a0}"`). Every axis tick, hover text and table cell that names a token
//! goes through `token_label`.

/// What a space (and a no-break space) is drawn as: leading spaces are how BPE vocabularies tell
/// " Mary" from "Mary".
pub const SPACE: char = '␣';
/// What a newline is drawn as.
pub const NEWLINE: char = '↵';

/// `token` with spaces as ␣, newlines as ↵ and other control characters as `\xNN`; an empty
/// token as ∅, so its tick is not blank.
pub fn token_label(token: &str) -> String {
    if token.is_empty() {
        return "∅".into();
    }
    let mut out = String::with_capacity(token.len());
    for c in token.chars() {
        match c {
            '\n' => out.push(NEWLINE),
            ' ' | '\u{a0}' => out.push(SPACE),
            // Control characters (C0, DEL, C1) all lie below U+0100, so two hex digits name them.
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            // Other Unicode spaces (thin, ideographic, ...) are as invisible as ' '.
            c if c.is_whitespace() => out.push(SPACE),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_and_newlines_are_visible_and_nothing_is_quoted() {
        assert_eq!(token_label(" Mary"), "␣Mary");
        assert_eq!(token_label("\u{a0}"), "␣");
        assert_eq!(token_label("\u{3000}x"), "␣x", "an ideographic space");
        assert_eq!(token_label("\n\n"), "↵↵");
        assert_eq!(token_label("Mary"), "Mary");
        assert_eq!(token_label("é中"), "é中", "printable text as it is");
    }

    #[test]
    fn control_characters_are_hex_escapes() {
        assert_eq!(token_label("\t"), "\\x09");
        assert_eq!(token_label("a\rb"), "a\\x0db");
        assert_eq!(token_label("\u{7f}"), "\\x7f");
        assert_eq!(token_label("\u{85}"), "\\x85", "a C1 control");
        assert_eq!(token_label("\0"), "\\x00");
    }

    #[test]
    fn an_empty_token_is_not_a_blank_tick() {
        assert_eq!(token_label(""), "∅");
    }

    #[test]
    fn no_debug_quotes_or_unicode_escapes() {
        for t in [" Mary", "\u{a0}", "\"", "\\"] {
            let l = token_label(t);
            assert!(!l.contains("\\u{"), "{l}");
            assert!(!l.starts_with('"') || t.starts_with('"'), "{l}");
        }
        assert_eq!(token_label("\""), "\"", "a quote token is itself, not escaped");
        assert_eq!(token_label("\\"), "\\");
    }
}
