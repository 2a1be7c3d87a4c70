//! Text from peers (AE titles, UIDs, error strings) made safe to print: a control character in a
//! log line or an audit line could start a forged line of its own, or drive the terminal that
//! shows it. Everything the node prints on one line goes through here: the text log's field
//! formatter ([`log_fields`]), `dicomchain audit`'s text lines and the security-event spool.
//!
//! Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and the
//! invisible formatting characters that reorder or hide text on screen (bidirectional
//! embeddings, overrides and isolates, zero-width characters, the BOM) are written as Rust
//! escapes (`\n`, `\u{202e}`); everything else, backslash included, stays as it is, so that
//! ordinary text (and a value tracing already quoted and escaped) reads unchanged.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` could end a line, drive a terminal, or make a line read other than it is.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{200b}'..='\u{200f}' // zero-width space, joiners, LRM, RLM
            | '\u{202a}'..='\u{202e}' // bidirectional embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // bidirectional isolates
            | '\u{061c}' // Arabic letter mark
            | '\u{feff}' // zero-width no-break space (BOM)
        )
}

/// `s` with every control character escaped; borrowed when there is none.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Displays a string with its control characters escaped (see [`escape`]).
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

/// The field formatter of the text log: tracing's default layout (the message, then
/// `name=value` pairs separated by spaces) with every value escaped, so that no field, whoever
/// supplied it, can put a line break into the log. tracing's own formatter escapes only the
/// terminal escape sequences, not CR or LF.
pub fn log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        if field.name() == "message" {
            write!(w, "{}", Escaped(&text))
        } else {
            write!(w, "{}={}", field.name(), Escaped(&text))
        }
    })
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert!(matches!(escape("CT1 STORE-2"), Cow::Borrowed(_)));
        assert_eq!(escape("A\nB"), "A\\nB");
        assert_eq!(escape("A\r\n2026-01-01 INFO x"), "A\\r\\n2026-01-01 INFO x");
        assert_eq!(escape("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(
            escape("x\u{85}y\u{2028}z\u{7f}"),
            "x\\u{85}y\\u{2028}z\\u{7f}"
        );
        assert_eq!(escape("a\\nb \"q\" é"), "a\\nb \"q\" é");
        assert_eq!(Escaped("a\tb").to_string(), "a\\tb");
        // Text that would read reversed or hide characters on screen.
        assert_eq!(escape("CT\u{202e}1TTA"), "CT\\u{202e}1TTA");
        assert_eq!(
            escape("A\u{200b}B\u{2066}C\u{feff}"),
            "A\\u{200b}B\\u{2066}C\\u{feff}"
        );
    }

    #[test]
    fn the_text_log_has_one_line_per_event() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(log_fields())
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let forged = "EVIL\n2026-01-01T00:00:00Z  INFO association accepted";
            let span = tracing::info_span!("association", calling = %forged);
            let _in = span.enter();
            tracing::info!(called = %forged, debug = ?forged, plain = forged, "rejected {forged}");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("calling=EVIL\\n2026"), "{text}");
        assert!(text.contains("called=EVIL\\n2026"), "{text}");
        assert!(text.contains("rejected EVIL\\n2026"), "{text}");
        assert!(text.contains("plain=\"EVIL\\n2026"), "{text}");
    }
}
