//! Masks secrets in error text before it is stored in a result or logged.
//!
//! Handlers fail with messages built from whatever they had at hand: connection strings, request
//! headers, configuration. Masking works on patterns rather than on known values, so it also
//! catches secrets the runtime never saw. Keys are matched as whole `_`/`-`separated words, so
//! `db_password=…` is masked while `author=…` and `max_tokens=…` are left alone.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// The longest error text kept, in characters (the mask is applied first, then the cut).
pub const MAX_ERROR_CHARS: usize = 500;

static PEM_BLOCK: LazyLock<Regex> = LazyLock::new(|| {
    // An unterminated block (a message cut short) is masked to the end.
    Regex::new(r"-----BEGIN [A-Z0-9 ]+-----(?s:.*?)(?:-----END [A-Z0-9 ]+-----|\z)")
        .expect("static regex")
});

static URL_USERINFO: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@").expect("static regex")
});

static BEARER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?P<word>bearer)\s+[A-Za-z0-9._~+/=-]+").expect("static regex")
});

static KEY_VALUE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?ix)
        (?P<key>
            \b(?:[a-z0-9]+[_-])*
            (?:password|passwd|pwd|secret|token|api[_-]?key|apikey|credentials?|bearer
              |private[_-]?key|connection[_-]?string|authorization
              |accesstoken|authtoken|refreshtoken|clientsecret|secretkey|privatekey)
            (?:[_-][a-z0-9]+)*\b
        )
        (?P<sep>["']?\s*[:=]\s*)
        (?P<value>"[^"]*"|'[^']*'|[^\s,;&"'}\]]+)
        "#,
    )
    .expect("static regex")
});

/// Masks secrets and caps the text at [`MAX_ERROR_CHARS`] characters. Allocates only when the
/// text changes.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !may_hold_a_secret(text) {
        return truncate(Cow::Borrowed(text));
    }
    mask(text)
}

/// Every pattern, then the cut: [`sanitize`] without its prefilter.
fn mask(text: &str) -> Cow<'_, str> {
    let mut text = Cow::Borrowed(text);
    replace(&mut text, &PEM_BLOCK, "[REDACTED PEM BLOCK]");
    replace(&mut text, &URL_USERINFO, "${scheme}***@");
    replace(&mut text, &BEARER, "${word} ***");
    replace(&mut text, &KEY_VALUE, "${key}${sep}***");
    truncate(text)
}

/// Whether any pattern could match: each needs a `:` or `=` (a key's separator, a URL's
/// scheme), `-----BEGIN ` or the word `bearer` in some case. Most strings (payload values run
/// through here one by one) have none of them, and this scan is what they cost instead of four
/// regex searches with captures (measured: about 1 µs for a typical payload). Held equal to the
/// full path by a property test.
fn may_hold_a_secret(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().any(|&b| b == b':' || b == b'=')
        || text.contains("-----BEGIN ")
        || bytes.windows(6).any(|w| w.eq_ignore_ascii_case(b"bearer"))
}

fn replace(text: &mut Cow<'_, str>, pattern: &Regex, with: &str) {
    if let Cow::Owned(replaced) = pattern.replace_all(text, with) {
        *text = Cow::Owned(replaced);
    }
}

fn truncate(text: Cow<'_, str>) -> Cow<'_, str> {
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        None => text,
        Some(_) => {
            let keep: String = text.chars().take(MAX_ERROR_CHARS - 1).collect();
            Cow::Owned(keep + "…")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::proptest_cases(2000)))]

        /// Whatever the prefilter skips, the patterns would not have changed.
        #[test]
        fn the_prefilter_skips_only_text_no_pattern_changes(
            text in r"(?s)(bearer|BeArEr|token|password|-----BEGIN [A-Z]+-----|://|[:= @/a-zA-Z0-9_.\n-]|.){0,40}"
        ) {
            proptest::prop_assert_eq!(sanitize(&text), mask(&text));
        }
    }

    #[test]
    fn the_prefilter_keeps_every_pattern_reachable() {
        for text in [
            "-----BEGIN KEY-----abc",
            "https://u:p@h",
            "Bearer abc",
            "BEARER abc",
            "password=x",
            "token: y",
        ] {
            assert!(may_hold_a_secret(text), "{text}");
            assert_ne!(sanitize(text), text, "{text}");
        }
        assert!(!may_hold_a_secret("EUR"));
        assert!(!may_hold_a_secret("ana@example.com"));
    }

    #[test]
    fn masks_url_userinfo() {
        assert_eq!(
            sanitize("connect to postgres://admin:hunter2@db:5432/app failed"),
            "connect to postgres://***@db:5432/app failed"
        );
        assert_eq!(
            sanitize("GET https://ghp_abc123@github.com/x"),
            "GET https://***@github.com/x"
        );
    }

    #[test]
    fn masks_sensitive_keys_in_every_common_shape() {
        assert_eq!(
            sanitize("password=hunter2 user=bob"),
            "password=*** user=bob"
        );
        assert_eq!(sanitize("db_password: hunter2"), "db_password: ***");
        assert_eq!(sanitize("API_KEY=sk-123,next"), "API_KEY=***,next");
        assert_eq!(sanitize("apikey=abc"), "apikey=***");
        assert_eq!(
            sanitize(r#"{"client_secret": "s3cr3t"}"#),
            r#"{"client_secret": ***}"#
        );
        assert_eq!(sanitize("secret_key='x y'"), "secret_key=***");
        assert_eq!(sanitize("private_key=abc"), "private_key=***");
        assert_eq!(
            sanitize("connection_string=Server=x;Pwd=y"),
            "connection_string=***;Pwd=***"
        );
        assert_eq!(sanitize("credentials: abc"), "credentials: ***");
        assert_eq!(sanitize("accessToken=abc"), "accessToken=***");
    }

    #[test]
    fn masks_bearer_tokens_and_authorization_headers() {
        assert_eq!(sanitize("sent Bearer eyJhbGciOi.x.y"), "sent Bearer ***");
        let masked = sanitize("Authorization: Bearer eyJhbGciOi");
        assert!(!masked.contains("eyJ"), "{masked}");
    }

    #[test]
    fn masks_pem_blocks_even_when_cut_short() {
        let pem =
            "key: -----BEGIN RSA PRIVATE KEY-----\nMIIE\nabc\n-----END RSA PRIVATE KEY----- end";
        assert_eq!(sanitize(pem), "key: [REDACTED PEM BLOCK] end");
        let cut = "oops -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B";
        assert_eq!(sanitize(cut), "oops [REDACTED PEM BLOCK]");
    }

    #[test]
    fn leaves_words_that_merely_contain_a_key_alone() {
        for text in [
            "author=tolkien",
            "max_tokens=512",
            "tokens: 12",
            "tokenizer=bpe",
            "secretary=jane",
            "passwords are checked elsewhere",
            "the token bucket is empty",
            "https://example.com/path?q=1",
            "timeout after 30s",
        ] {
            assert_eq!(sanitize(text), text, "over-masked {text}");
            assert!(matches!(sanitize(text), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn caps_length_on_a_character_boundary() {
        let long = "é".repeat(2000);
        let capped = sanitize(&long);
        assert_eq!(capped.chars().count(), MAX_ERROR_CHARS);
        assert!(capped.ends_with('…'));
        let short = "x".repeat(MAX_ERROR_CHARS);
        assert_eq!(sanitize(&short), short);
    }

    #[test]
    fn masks_before_cutting_so_a_secret_cannot_straddle_the_cut() {
        let text = format!("{} password=hunter2hunter2", "x".repeat(485));
        assert!(!sanitize(&text).contains("hunter2"));
    }
}
