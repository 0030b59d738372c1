//! API tokens: who may call what.
//!
//! Owns: the token set (each token with a name and scopes), the scope an HTTP request needs,
//! and the check. Tokens are kept only as SHA-256 digests, and a presented token is compared with
//! every configured digest in constant time (no early exit, equal lengths), so neither timing nor
//! a failed comparison tells a caller anything about the tokens that exist.
//!
//! Must not: print a token. [`Secret`] and [`ApiToken`] never show one in `Debug` or `Display`,
//! and nothing here logs.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `POST /api/v1/messages/{topic}`.
    Ingest,
    /// The dispatcher API: listing, registering, heartbeats and unregistering workers.
    Admin,
    /// `GET /metrics` and `GET /api/v1/stats`.
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Ingest, Scope::Admin, Scope::Metrics];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
            Scope::Metrics => "metrics",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == text)
    }
}

/// A token's SHA-256 digest. The token itself is not kept.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(token: &str) -> Secret {
        Secret(Sha256::digest(token.as_bytes()).into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One configured token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// Who holds it (for the operator; never sent to a client).
    pub name: String,
    pub secret: Secret,
    pub scopes: Vec<Scope>,
}

/// The shortest token accepted: shorter ones can be guessed.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer …` header (or not a bearer one).
    Missing,
    /// A token that matches none configured.
    Invalid,
    /// A valid token without the scope the request needs.
    Forbidden,
}

impl Denied {
    /// The `reason` label of `http_auth_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Invalid => "invalid",
            Denied::Forbidden => "forbidden",
        }
    }
}

/// The configured tokens. Empty means access control is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    tokens: Vec<ApiToken>,
}

impl Tokens {
    pub fn new(tokens: Vec<ApiToken>) -> Tokens {
        Tokens { tokens }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[ApiToken] {
        &self.tokens
    }

    /// Whether some token has `scope`: `/metrics` is open until a metrics token exists.
    pub fn any_with(&self, scope: Scope) -> bool {
        self.tokens.iter().any(|t| t.scopes.contains(&scope))
    }

    /// Checks an `Authorization` header value for `scope`. Returns the token's name.
    pub fn check(&self, authorization: Option<&[u8]>, scope: Scope) -> Result<&str, Denied> {
        let presented = authorization
            .and_then(bearer)
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Missing)?;
        let digest = Secret::new(presented);
        // Compare with every token, whatever matched before: the time taken does not depend on
        // which token (if any) matched.
        let mut found: Option<&ApiToken> = None;
        for token in &self.tokens {
            if bool::from(token.secret.0.ct_eq(&digest.0)) {
                found = Some(token);
            }
        }
        let token = found.ok_or(Denied::Invalid)?;
        if token.scopes.contains(&scope) {
            Ok(&token.name)
        } else {
            Err(Denied::Forbidden)
        }
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(vec![
            ApiToken {
                name: "ingester".into(),
                secret: Secret::new("ingest-token-0123456789"),
                scopes: vec![Scope::Ingest],
            },
            ApiToken {
                name: "operator".into(),
                secret: Secret::new("admin-token-0123456789"),
                scopes: vec![Scope::Admin, Scope::Metrics],
            },
        ])
    }

    #[test]
    fn a_token_is_accepted_for_its_scopes_only() {
        let tokens = tokens();
        let ingest = Some(&b"Bearer ingest-token-0123456789"[..]);
        assert_eq!(tokens.check(ingest, Scope::Ingest), Ok("ingester"));
        assert_eq!(tokens.check(ingest, Scope::Admin), Err(Denied::Forbidden));
        let admin = Some(&b"bearer   admin-token-0123456789 "[..]);
        assert_eq!(tokens.check(admin, Scope::Admin), Ok("operator"));
        assert_eq!(tokens.check(admin, Scope::Metrics), Ok("operator"));
        assert_eq!(tokens.check(admin, Scope::Ingest), Err(Denied::Forbidden));
    }

    #[test]
    fn missing_malformed_and_wrong_tokens_are_refused() {
        let tokens = tokens();
        assert_eq!(tokens.check(None, Scope::Ingest), Err(Denied::Missing));
        for header in [
            &b"ingest-token-0123456789"[..],
            b"Basic aW5nZXN0",
            b"Bearer ",
            b"Bearer",
            b"\xff\xfe",
        ] {
            assert_eq!(
                tokens.check(Some(header), Scope::Ingest),
                Err(Denied::Missing),
                "{header:?}"
            );
        }
        for header in [
            &b"Bearer ingest-token-012345678"[..],
            b"Bearer ingest-token-01234567890",
            b"Bearer INGEST-TOKEN-0123456789",
        ] {
            assert_eq!(
                tokens.check(Some(header), Scope::Ingest),
                Err(Denied::Invalid),
                "{header:?}"
            );
        }
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let text = format!("{:?}", tokens());
        assert!(!text.contains("ingest-token"), "{text}");
        assert!(text.contains("Secret(***)"));
    }

    #[test]
    fn metrics_stay_open_until_a_metrics_token_exists() {
        assert!(tokens().any_with(Scope::Metrics));
        let only_ingest = Tokens::new(tokens().tokens[..1].to_vec());
        assert!(!only_ingest.any_with(Scope::Metrics));
        assert!(Tokens::default().is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::proptest_cases(500)))]

        /// Any header value: a decision, never a panic, and never a grant without the token.
        #[test]
        fn arbitrary_authorization_headers_are_refused(header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let tokens = tokens();
            proptest::prop_assert!(tokens.check(Some(&header), Scope::Ingest).is_err());
        }
    }
}
