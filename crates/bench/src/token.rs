//! Tokens for the load: HS256 tokens minted locally with the gateway's
//! secret, or one token given on the command line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::cli::Common;

/// Where connection tokens come from.
#[derive(Debug, Clone)]
pub enum Tokens {
    /// Mint with this HMAC secret.
    Mint {
        /// The shared secret.
        secret: Vec<u8>,
        /// `iss` claim.
        issuer: Option<String>,
        /// `aud` claim.
        audience: Option<String>,
        /// Lifetime of minted tokens.
        ttl: Duration,
    },
    /// Use this token everywhere.
    Fixed(String),
}

/// Select the RustCrypto backend explicitly (the JWT library panics when it
/// has to guess); installing twice is harmless.
fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    });
}

impl Tokens {
    /// From the common flags; minted tokens live `ttl` (at least one hour).
    pub fn from_flags(common: &Common, ttl: Duration) -> Result<Tokens> {
        match (&common.jwt_secret, &common.token) {
            (_, Some(token)) => Ok(Tokens::Fixed(token.clone())),
            (Some(secret), None) => Ok(Tokens::Mint {
                secret: secret.as_bytes().to_vec(),
                issuer: common.jwt_issuer.clone(),
                audience: common.jwt_audience.clone(),
                ttl: ttl.max(Duration::from_secs(3600)),
            }),
            (None, None) => Err(anyhow!("give --jwt-secret or --token")),
        }
    }

    /// A token for user `sub`, allowed to join every room and publish to every room.
    pub fn for_user(&self, sub: &str) -> Result<String> {
        match self {
            Tokens::Fixed(t) => Ok(t.clone()),
            Tokens::Mint {
                secret,
                issuer,
                audience,
                ttl,
            } => mint_hs256(secret, sub, issuer.as_deref(), audience.as_deref(), *ttl),
        }
    }
}

/// Mint an HS256 token for `sub` with `rooms: ["*"]` and `publish: ["*"]`.
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    issuer: Option<&str>,
    audience: Option<&str>,
    ttl: Duration,
) -> Result<String> {
    ensure_crypto_provider();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_secs();
    let mut claims = json!({
        "sub": sub,
        "iat": now,
        "exp": now + ttl.as_secs().max(1),
        "rooms": ["*"],
        "publish": ["*"],
    });
    if let Value::Object(map) = &mut claims {
        if let Some(iss) = issuer {
            map.insert("iss".to_owned(), Value::from(iss));
        }
        if let Some(aud) = audience {
            map.insert("aud".to_owned(), Value::from(aud));
        }
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .context("cannot mint a token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn minted_token_verifies_with_the_secret() {
        let token = mint_hs256(
            b"s3cret",
            "bench-1",
            Some("me"),
            Some("you"),
            Duration::from_secs(60),
        )
        .unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["me"]);
        v.set_audience(&["you"]);
        let data = jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_secret(b"s3cret"), &v)
            .unwrap();
        assert_eq!(data.claims["sub"], "bench-1");
        assert_eq!(data.claims["rooms"], json!(["*"]));
        assert_eq!(data.claims["publish"], json!(["*"]));
        let ttl = data.claims["exp"].as_u64().unwrap() - data.claims["iat"].as_u64().unwrap();
        assert_eq!(ttl, 60);
        assert!(
            jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_secret(b"other"), &v).is_err()
        );
    }

    #[test]
    fn fixed_token_is_used_as_is() {
        let t = Tokens::Fixed("abc".to_owned());
        assert_eq!(t.for_user("x").unwrap(), "abc");
    }
}
