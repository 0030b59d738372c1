//! Redaction of structured data (payloads, command params) before it leaves dispatchd through
//! instrumentation, logs, dispatch events or sinks.
//!
//! [`sanitize`](super::sanitize) masks secrets in free text by pattern; this masks the *values*
//! of object keys that name a secret. A key is split into words (`_`, `-`, `.`, spaces and
//! camelCase boundaries), and it is sensitive when one word, or two adjacent words written
//! together, is on the deny-list: `password`, `db_password`, `apiKey`, `X-Api-Key` and
//! `access_token` are masked; `tokensUsage`, `max_tokens` and `author` are not. With an
//! allow-list, every key that is not on it is masked too (the deny-list still wins), for
//! operators who prefer to name what may leave rather than what may not.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// The longest key [`Redactor::is_sensitive`] checks without allocating.
const SHORT_KEY: usize = 64;

/// What a masked value becomes.
pub const REDACTED: &str = "[REDACTED]";

/// The words that make a key sensitive, always.
pub const DEFAULT_DENY: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "authorization",
    "auth",
    "bearer",
    "cookie",
    "credential",
    "credentials",
    "privatekey",
    "connectionstring",
    "session",
    "signature",
    "ssn",
    "pin",
    "cvv",
];

/// A deny-list (the defaults plus configured words) and an optional allow-list of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redactor {
    deny: BTreeSet<String>,
    /// Which (first byte, length) pairs the deny-list has: most words are ruled out by it before
    /// a lookup (see [`Shapes`]).
    shapes: Shapes,
    /// Normalized keys (lowercase, separators removed); `None` allows every key not denied.
    allow: Option<BTreeSet<String>>,
}

impl Default for Redactor {
    fn default() -> Redactor {
        Redactor::new(std::iter::empty::<&str>(), None::<Vec<&str>>)
    }
}

impl Redactor {
    /// The default deny-list plus `deny`; with `allow`, only those keys pass unmasked.
    pub fn new<D, A>(deny: D, allow: Option<A>) -> Redactor
    where
        D: IntoIterator,
        D::Item: AsRef<str>,
        A: IntoIterator,
        A::Item: AsRef<str>,
    {
        let deny: BTreeSet<String> = DEFAULT_DENY
            .iter()
            .map(|word| (*word).to_owned())
            .chain(deny.into_iter().map(|word| normalize(word.as_ref())))
            .collect();
        let allow = allow.map(|keys| keys.into_iter().map(|k| normalize(k.as_ref())).collect());
        let shapes = Shapes::of(deny.iter().map(String::as_str));
        Redactor {
            deny,
            shapes,
            allow,
        }
    }

    /// Whether `word` (normalized) is on the deny-list.
    #[inline]
    fn denies(&self, word: &str) -> bool {
        self.shapes.may_hold(word) && self.deny.contains(word)
    }

    /// Whether the value under `key` must be masked.
    pub fn is_sensitive(&self, key: &str) -> bool {
        self.is_sensitive_ascii(key)
            .unwrap_or_else(|| self.is_sensitive_general(key))
    }

    /// [`is_sensitive`](Self::is_sensitive) for any key: splits it into words as strings.
    fn is_sensitive_general(&self, key: &str) -> bool {
        let words = words(key);
        let denied = words.iter().any(|w| self.denies(w))
            || words
                .windows(2)
                .any(|pair| self.denies(&format!("{}{}", pair[0], pair[1])))
            || self.denies(&words.concat());
        denied
            || self
                .allow
                .as_ref()
                .is_some_and(|allow| !allow.contains(&normalize(key)))
    }

    /// [`is_sensitive`](Self::is_sensitive) without allocating, for ASCII keys of at most
    /// [`SHORT_KEY`] bytes (nearly every key); `None` for the others, which take the general path.
    /// Hand-written because it runs for every key of every payload: the key is lowercased into a
    /// stack buffer without its separators, where each word, each pair of adjacent words written
    /// together and the whole key are all substrings, looked up as `&str`.
    fn is_sensitive_ascii(&self, key: &str) -> Option<bool> {
        if key.len() > SHORT_KEY || !key.is_ascii() {
            return None;
        }
        let mut joined = [0u8; SHORT_KEY];
        let mut len = 0;
        // Where each word starts in `joined`, and one past the end of the last.
        let mut starts = [0u8; SHORT_KEY + 1];
        let mut words = 0;
        let mut in_word = false;
        let mut previous_lower = false;
        for &c in key.as_bytes() {
            if !c.is_ascii_alphanumeric() {
                in_word = false;
                previous_lower = false;
                continue;
            }
            if !in_word || (c.is_ascii_uppercase() && previous_lower) {
                starts[words] = len as u8;
                words += 1;
                in_word = true;
            }
            previous_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            joined[len] = c.to_ascii_lowercase();
            len += 1;
        }
        starts[words] = len as u8;
        // Only ASCII alphanumerics were copied.
        let text = std::str::from_utf8(&joined[..len]).ok()?;
        let part = |from: usize, to: usize| &text[starts[from] as usize..starts[to] as usize];
        let denied = (0..words).any(|w| self.denies(part(w, w + 1)))
            || (1..words).any(|w| self.denies(part(w - 1, w + 1)))
            || self.denies(text);
        Some(
            denied
                || self
                    .allow
                    .as_ref()
                    .is_some_and(|allow| !allow.contains(text)),
        )
    }

    /// [`redact`](Self::redact) of a value the caller owns, in place: what is masked is
    /// replaced where it is, and nothing else is copied.
    pub fn redact_in_place(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map.iter_mut() {
                    if self.is_sensitive(key) {
                        if inner.as_str() != Some(REDACTED) {
                            *inner = Value::String(REDACTED.to_owned());
                        }
                    } else {
                        self.redact_in_place(inner);
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.redact_in_place(item);
                }
            }
            Value::String(text) => {
                if let Cow::Owned(masked) = super::sanitize(text) {
                    *text = masked;
                }
            }
            _ => {}
        }
    }

    /// `value` with the values of sensitive keys replaced by [`REDACTED`], at any depth, and
    /// string values passed through [`sanitize`](super::sanitize) (so `"postgres://u:p@h"` loses
    /// its password wherever it is). Borrows when nothing changes.
    pub fn redact<'v>(&self, value: &'v Value) -> Cow<'v, Value> {
        match value {
            Value::Object(map) => {
                let mut changed: Option<Map<String, Value>> = None;
                for (index, (key, inner)) in map.iter().enumerate() {
                    let replaced = if self.is_sensitive(key) {
                        (inner.as_str() != Some(REDACTED))
                            .then(|| Value::String(REDACTED.to_owned()))
                    } else {
                        match self.redact(inner) {
                            Cow::Borrowed(_) => None,
                            Cow::Owned(owned) => Some(owned),
                        }
                    };
                    match (&mut changed, replaced) {
                        (Some(out), Some(new)) => {
                            out.insert(key.clone(), new);
                        }
                        (Some(out), None) => {
                            out.insert(key.clone(), inner.clone());
                        }
                        (None, Some(new)) => {
                            let mut out: Map<String, Value> = map
                                .iter()
                                .take(index)
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect();
                            out.insert(key.clone(), new);
                            changed = Some(out);
                        }
                        (None, None) => {}
                    }
                }
                changed.map_or(Cow::Borrowed(value), |map| Cow::Owned(Value::Object(map)))
            }
            Value::Array(items) => {
                let mut changed: Option<Vec<Value>> = None;
                for (index, item) in items.iter().enumerate() {
                    match (self.redact(item), &mut changed) {
                        (Cow::Owned(new), Some(out)) => out.push(new),
                        (Cow::Borrowed(same), Some(out)) => out.push(same.clone()),
                        (Cow::Owned(new), None) => {
                            let mut out: Vec<Value> = items[..index].to_vec();
                            out.push(new);
                            changed = Some(out);
                        }
                        (Cow::Borrowed(_), None) => {}
                    }
                }
                changed.map_or(Cow::Borrowed(value), |items| {
                    Cow::Owned(Value::Array(items))
                })
            }
            Value::String(text) => match super::sanitize(text) {
                Cow::Borrowed(_) => Cow::Borrowed(value),
                Cow::Owned(masked) => Cow::Owned(Value::String(masked)),
            },
            _ => Cow::Borrowed(value),
        }
    }

    /// Header maps (envelope headers, outbound request headers) with sensitive values masked.
    pub fn redact_headers<'h>(
        &self,
        headers: &'h std::collections::BTreeMap<String, String>,
    ) -> Cow<'h, std::collections::BTreeMap<String, String>> {
        if !headers.keys().any(|k| self.is_sensitive(k)) {
            return Cow::Borrowed(headers);
        }
        Cow::Owned(
            headers
                .iter()
                .map(|(k, v)| {
                    let v = if self.is_sensitive(k) {
                        REDACTED.to_owned()
                    } else {
                        v.clone()
                    };
                    (k.clone(), v)
                })
                .collect(),
        )
    }
}

/// Lowercase, without separators: `X-Api_Key` → `xapikey`.
/// A filter over the deny-list by each word's first byte and length: one bit per (first byte,
/// length) pair present. It answers "maybe" for every word on the list and rules out most
/// others (`order`, `id`, `email`, `customer`...) with one load and one shift, where the
/// `BTreeSet` lookup costs five or so string comparisons. Hand-written: it is two lines, and a
/// general Bloom filter would hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shapes {
    /// By [`Shapes::bucket`] of the first byte: bit `min(len, 63)` set when a word of that length
    /// starts so.
    lengths: [u64; 37],
}

impl Shapes {
    fn of<'a>(words: impl IntoIterator<Item = &'a str>) -> Shapes {
        let mut lengths = [0; 37];
        for word in words {
            lengths[Shapes::bucket(word)] |= Shapes::bit(word);
        }
        Shapes { lengths }
    }

    /// `a`–`z` and `0`–`9` each have their own bucket; anything else (an empty word, a byte
    /// beyond ASCII, an upper-case letter) shares the last.
    #[inline]
    fn bucket(word: &str) -> usize {
        match word.as_bytes().first() {
            Some(&c @ b'a'..=b'z') => usize::from(c - b'a'),
            Some(&c @ b'0'..=b'9') => 26 + usize::from(c - b'0'),
            _ => 36,
        }
    }

    #[inline]
    fn bit(word: &str) -> u64 {
        1 << word.len().min(63)
    }

    /// False only when no word on the list has `word`'s first byte and length.
    #[inline]
    fn may_hold(&self, word: &str) -> bool {
        self.lengths[Shapes::bucket(word)] & Shapes::bit(word) != 0
    }
}

fn normalize(key: &str) -> String {
    key.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Lowercase words of a key: `_`, `-`, `.`, spaces and lower→upper case changes separate them.
fn words(key: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut previous_lower = false;
    for c in key.chars() {
        if !c.is_alphanumeric() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            previous_lower = false;
            continue;
        }
        if c.is_uppercase() && previous_lower && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        previous_lower = c.is_lowercase() || c.is_ascii_digit();
        word.extend(c.to_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_naming_secrets_are_masked_and_look_alikes_are_not() {
        let redactor = Redactor::default();
        for key in [
            "password",
            "db_password",
            "apiKey",
            "api_key",
            "X-Api-Key",
            "access_token",
            "refreshToken",
            "Authorization",
            "client.secret",
            "PRIVATE_KEY",
            "sessionId",
            "Cookie",
        ] {
            assert!(redactor.is_sensitive(key), "{key} should be masked");
        }
        for key in [
            "tokensUsage",
            "max_tokens",
            "author",
            "authority",
            "order_id",
            "message_type",
            "spinner",
            "keyboard",
        ] {
            assert!(!redactor.is_sensitive(key), "{key} should pass");
        }
    }

    #[test]
    fn redaction_reaches_every_depth_and_borrows_when_clean() {
        let redactor = Redactor::default();
        let clean = json!({"order_id": 1, "items": [{"sku": "a"}], "tokensUsage": {"total": 3}});
        assert!(matches!(redactor.redact(&clean), Cow::Borrowed(_)));

        let dirty = json!({
            "order_id": 1,
            "customer": {"name": "Ada", "password": "hunter2"},
            "calls": [{"headers": {"Authorization": "Bearer abc.def"}}, {"ok": true}],
            "dsn": "postgres://app:s3cret@db/orders",
        });
        let redacted = redactor.redact(&dirty).into_owned();
        assert_eq!(redacted["order_id"], 1);
        assert_eq!(redacted["customer"]["name"], "Ada");
        assert_eq!(redacted["customer"]["password"], REDACTED);
        assert_eq!(redacted["calls"][0]["headers"]["Authorization"], REDACTED);
        assert_eq!(redacted["calls"][1]["ok"], true);
        let text = redacted.to_string();
        for secret in ["hunter2", "abc.def", "s3cret"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    #[test]
    fn configured_words_extend_the_list_and_an_allow_list_masks_the_rest() {
        let redactor = Redactor::new(["iban"], None::<Vec<&str>>);
        assert!(redactor.is_sensitive("customer_iban"));
        assert!(redactor.is_sensitive("password"), "defaults stay");

        let strict = Redactor::new(std::iter::empty::<&str>(), Some(["order_id", "items"]));
        let value = json!({"order_id": 7, "email": "a@b.c", "password_hint": "x"});
        let redacted = strict.redact(&value).into_owned();
        assert_eq!(redacted["order_id"], 7);
        assert_eq!(redacted["email"], REDACTED);
        assert_eq!(redacted["password_hint"], REDACTED);
        let denied_even_if_allowed = Redactor::new(std::iter::empty::<&str>(), Some(["password"]));
        assert!(denied_even_if_allowed.is_sensitive("password"));
    }

    #[test]
    fn headers_are_masked_by_key() {
        let redactor = Redactor::default();
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("traceparent".to_owned(), "00-abc-def-01".to_owned());
        assert!(matches!(
            redactor.redact_headers(&headers),
            Cow::Borrowed(_)
        ));
        headers.insert("x-api-key".to_owned(), "k-123".to_owned());
        let masked = redactor.redact_headers(&headers);
        assert_eq!(masked["x-api-key"], REDACTED);
        assert_eq!(masked["traceparent"], "00-abc-def-01");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let key = prop_oneof![
                Just("password".to_owned()),
                Just("apiKey".to_owned()),
                Just("access_token".to_owned()),
                "[a-zA-Z_-]{0,12}",
            ];
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(|n| json!(n)),
                ".{0,20}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 32, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::btree_map(key.clone(), inner, 0..5)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        /// Every value under a sensitive key, at any depth.
        fn sensitive_values(redactor: &Redactor, value: &Value, out: &mut Vec<Value>) {
            match value {
                Value::Object(map) => {
                    for (key, inner) in map {
                        if redactor.is_sensitive(key) {
                            out.push(inner.clone());
                        } else {
                            sensitive_values(redactor, inner, out);
                        }
                    }
                }
                Value::Array(items) => {
                    for item in items {
                        sensitive_values(redactor, item, out);
                    }
                }
                _ => {}
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(500)))]

            #[test]
            fn nothing_under_a_sensitive_key_survives_and_redaction_is_idempotent(value in json_value()) {
                let redactor = Redactor::default();
                let once = redactor.redact(&value).into_owned();
                let mut left = Vec::new();
                sensitive_values(&redactor, &once, &mut left);
                prop_assert!(left.iter().all(|v| v == &Value::String(REDACTED.to_owned())));
                let twice = redactor.redact(&once).into_owned();
                prop_assert_eq!(twice, once);
            }

            /// Redacting in place gives exactly what redacting a borrowed value gives.
            #[test]
            fn redacting_in_place_equals_redacting_a_copy(value in json_value()) {
                for redactor in [
                    Redactor::default(),
                    Redactor::new(["iban"], Some(["amount", "items"])),
                ] {
                    let mut in_place = value.clone();
                    redactor.redact_in_place(&mut in_place);
                    prop_assert_eq!(in_place, redactor.redact(&value).into_owned());
                }
            }

            /// The allocation-free check answers exactly what the general one does.
            #[test]
            fn the_fast_sensitive_key_check_agrees_with_the_general_one(
                key in prop_oneof!["[ -~]{0,70}", "[a-zA-Z0-9_.-]{0,20}", "(api|Api|KEY|_|-|token|Tokens|iban|x|9){0,6}"],
            ) {
                for redactor in [
                    Redactor::default(),
                    Redactor::new(["iban", "x_9"], Some(["tokens_usage", "apikey", "x"])),
                ] {
                    let fast = redactor.is_sensitive_ascii(&key);
                    prop_assert_eq!(fast.is_some(), key.len() <= SHORT_KEY, "{}", key);
                    if let Some(fast) = fast {
                        prop_assert_eq!(fast, redactor.is_sensitive_general(&key), "{}", key);
                    }
                }
            }

            /// The shape filter never rules out a word on the list, whatever its bytes and length
            /// (configured words may be long, start with a digit or go beyond ASCII).
            #[test]
            fn the_shape_filter_never_hides_a_denied_word(
                listed in prop::collection::vec(prop_oneof![".{0,80}", "[a-z0-9]{1,70}"], 0..6),
                probe in prop_oneof![".{0,80}", "[a-z0-9]{1,70}"],
            ) {
                let redactor = Redactor::new(&listed, None::<Vec<&str>>);
                for word in redactor.deny.iter().map(String::as_str).chain([probe.as_str()]) {
                    prop_assert_eq!(redactor.denies(word), redactor.deny.contains(word), "{:?}", word);
                }
            }

            #[test]
            fn keys_of_any_shape_never_panic(key in ".{0,40}") {
                let _ = Redactor::default().is_sensitive(&key);
            }
        }
    }
}
