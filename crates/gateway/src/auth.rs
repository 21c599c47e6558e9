//! JWT verification, room grants and token minting.
//!
//! A [`Verifier`] is built once at start-up from the configured key (an HMAC
//! secret, or an RSA / EC P-256 public key in PEM) and checks every token the
//! gateway sees: on the WebSocket upgrade, on `refresh`, and on the HTTP
//! publish API. It returns the [`Claims`] the gateway needs, with the `rooms`
//! and `publish` claims precompiled into [`Grants`].
//!
//! The key decides the accepted algorithms (HS256/384/512 for a secret, RS256
//! for an RSA key, ES256 for an EC P-256 key); `alg: none` and HS/RS
//! confusion are refused before any signature work. Errors carry a short
//! machine [`AuthError::reason`] for logs and metrics and never the token
//! itself; [`redact_query`] keeps `?token=` out of logged URIs.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header::AUTHORIZATION, HeaderMap};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// Tokens longer than this are refused as malformed without any parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Leeway is clamped to this many seconds (about 34 years) so that the time
/// arithmetic in the JWT library can never underflow.
const MAX_LEEWAY_SECS: u64 = 1 << 30;

/// RFC 7518 section 3.3: RSA keys for RS256 must be at least 2048 bits.
const MIN_RSA_BITS: usize = 2048;

/// The RSA implementation refuses larger moduli at verification time, so we
/// refuse them at start-up instead.
const MAX_RSA_BITS: usize = 4096;

/// Why a token was refused, or why a key or token could not be made.
///
/// The `Display` text is fit for a log line or an `invalid_token` error
/// message: it never contains the token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in the request (or an empty one).
    #[error("no token (expected `Authorization: Bearer <jwt>` or `?token=<jwt>`)")]
    Missing,
    /// Not a compact JWT, undecodable parts, or claims of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match the configured key.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    /// `iss` is not the configured issuer.
    #[error("wrong token issuer (iss)")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("wrong token audience (aud)")]
    WrongAudience,
    /// The header's `alg` is not one the configured key accepts (`none`,
    /// HS/RS confusion, another curve or hash).
    #[error("token algorithm not allowed for the configured key")]
    AlgorithmNotAllowed,
    /// A required claim is absent, empty, or (for `exp`) not a NumericDate:
    /// `exp`, `sub`, or a configured `iss`/`aud`.
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(&'static str),
    /// The configured key is unusable (start-up error).
    #[error("bad JWT key: {0}")]
    BadKey(String),
    /// A token could not be minted.
    #[error("cannot mint token: {0}")]
    Mint(String),
}

impl AuthError {
    /// A short, stable machine reason for logs and metric labels, e.g.
    /// `"expired"` or `"bad_signature"`. Never contains the token.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::BadKey(_) => "bad_key",
            AuthError::Mint(_) => "mint",
        }
    }
}

/// How tokens are verified, besides the key: built from the `--jwt-*` flags.
#[derive(Debug, Clone)]
pub struct VerifierSettings {
    /// Required `iss` (`--jwt-issuer`); `None` (or empty) means not checked.
    pub issuer: Option<String>,
    /// Required `aud` (`--jwt-audience`); `None` (or empty) means not checked.
    pub audience: Option<String>,
    /// Leeway on `exp`, `nbf` and `iat` (`--jwt-leeway`), rounded up to whole
    /// seconds.
    pub leeway: Duration,
}

impl Default for VerifierSettings {
    /// No issuer, no audience, the default 5 s leeway.
    fn default() -> Self {
        VerifierSettings {
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
        }
    }
}

/// How tokens are verified; built once at start-up and shared (it is cheap to
/// clone, and `Send + Sync`).
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// An empty HMAC secret would let anyone sign: refuse every token.
    empty_secret: bool,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field("leeway_secs", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// HS256/HS384/HS512 with a shared secret (all three accepted, nothing
    /// else). An empty secret gives a verifier that refuses every token with
    /// [`AuthError::BadKey`] (configuration should refuse it earlier).
    pub fn hmac(secret: &[u8], settings: VerifierSettings) -> Verifier {
        ensure_crypto_provider();
        let mut verifier = Self::build(
            DecodingKey::from_secret(secret),
            &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            settings,
        );
        verifier.empty_secret = secret.is_empty();
        verifier
    }

    /// PEM public key: RSA (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`,
    /// 2048 to 4096 bits) accepts RS256 only; EC P-256 accepts ES256 only.
    ///
    /// Anything else (not PEM, a private key, a certificate, another curve,
    /// Ed25519, an RSA key of the wrong size) is an error whose text is meant
    /// as the one start-up error line.
    pub fn public_key_pem(pem: &[u8], settings: VerifierSettings) -> Result<Verifier, AuthError> {
        ensure_crypto_provider();
        match pem_label(pem) {
            None => {
                return Err(AuthError::BadKey(
                    "not a PEM public key (no `-----BEGIN PUBLIC KEY-----` line)".to_owned(),
                ))
            }
            Some("PUBLIC KEY" | "RSA PUBLIC KEY") => {}
            Some(label) if label.contains("PRIVATE KEY") => {
                return Err(AuthError::BadKey(format!(
                    "the PEM holds a private key ({label}); configure the public key \
                     (`openssl pkey -in key.pem -pubout`)"
                )))
            }
            Some("CERTIFICATE") => {
                return Err(AuthError::BadKey(
                    "the PEM holds a certificate; configure its public key \
                     (`openssl x509 -in cert.pem -pubkey -noout`)"
                        .to_owned(),
                ))
            }
            Some(label) => {
                return Err(AuthError::BadKey(format!(
                    "unsupported PEM block `{label}`; expected `PUBLIC KEY`"
                )))
            }
        }

        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            let DecodingKeyKind::SecretOrDer(der) = key.kind() else {
                return Err(AuthError::BadKey("unreadable RSA public key".to_owned()));
            };
            check_rsa_public_der(der)?;
            return Ok(Self::build(key, &[Algorithm::RS256], settings));
        }

        match DecodingKey::from_ec_pem(pem) {
            Ok(key) => {
                // Building an ES256 verifier parses the point on P-256: a key
                // on another curve fails here, once, instead of on every token.
                let factory = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.verifier_factory;
                if factory(&Algorithm::ES256, &key).is_err() {
                    return Err(AuthError::BadKey(
                        "EC public key is not on curve P-256 (only ES256 with P-256 is supported)"
                            .to_owned(),
                    ));
                }
                Ok(Self::build(key, &[Algorithm::ES256], settings))
            }
            Err(_) => Err(AuthError::BadKey(
                "unsupported or unreadable public key: expected an RSA key (RS256) \
                 or an EC P-256 key (ES256)"
                    .to_owned(),
            )),
        }
    }

    fn build(key: DecodingKey, algorithms: &[Algorithm], settings: VerifierSettings) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = algorithms.to_vec();
        validation.leeway = ceil_secs(settings.leeway).min(MAX_LEEWAY_SECS);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = settings.issuer.filter(|s| !s.is_empty()) {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match settings.audience.filter(|s| !s.is_empty()) {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.validate_aud = true;
                required.push("aud");
            }
            // Not configured: a token's `aud` is not checked at all.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Verifier {
            key,
            validation,
            empty_secret: false,
        }
    }

    /// Verify a compact JWT: signature, `alg` allowed for the key (never
    /// `none`, no HS/RS confusion), `exp` required, `sub` required non-empty
    /// string, `nbf` honoured, `iat` in the future (beyond leeway) refused,
    /// `iss`/`aud` when configured, leeway applied to `exp`/`nbf`/`iat`.
    /// `rooms`/`publish`, when present, must be arrays of strings.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        if self.empty_secret {
            return Err(AuthError::BadKey("the HMAC secret is empty".to_owned()));
        }
        self.check_header(token)?;

        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(map_jwt_error)?;
        let claims = data.claims;

        if let Some(iat) = claims.get("iat") {
            let iat = numeric_date(iat).ok_or(AuthError::Malformed)?;
            if iat > unix_now().saturating_add(self.validation.leeway) {
                return Err(AuthError::IssuedInFuture);
            }
        }

        let sub = match claims.get("sub") {
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("sub")),
            Some(Value::String(s)) if s.is_empty() => return Err(AuthError::MissingClaim("sub")),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(AuthError::Malformed),
        };
        let exp = claims
            .get("exp")
            .map(|v| numeric_date(v).ok_or(AuthError::Malformed))
            .transpose()?
            .ok_or(AuthError::MissingClaim("exp"))?;

        Ok(Claims {
            sub,
            exp,
            rooms: grants_claim(&claims, "rooms")?,
            publish: grants_claim(&claims, "publish")?,
        })
    }

    /// The leeway actually applied (the configured one rounded up to whole
    /// seconds); the session closes with 4001 at `exp` + leeway.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.validation.leeway)
    }

    /// Refuse a token whose header is unreadable or names an algorithm the
    /// key does not accept, before any signature work. This also gives
    /// `alg: none` (which the JWT library cannot even parse) the right reason.
    fn check_header(&self, token: &str) -> Result<(), AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let bytes = b64url_decode(header).ok_or(AuthError::Malformed)?;
        let header: Value = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(AuthError::Malformed)?;
        match Algorithm::from_str(alg) {
            Ok(alg) if self.validation.algorithms.contains(&alg) => Ok(()),
            _ => Err(AuthError::AlgorithmNotAllowed),
        }
    }
}

/// The claims the gateway needs from a verified token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The user id (`sub`), shown to others as `from`.
    pub sub: String,
    /// Expiry (`exp`), Unix seconds.
    pub exp: u64,
    /// Rooms the user may join (`rooms`).
    pub rooms: Grants,
    /// Rooms the user may publish to (`publish`).
    pub publish: Grants,
}

/// A list of room patterns: exact name, prefix ending in `*` (`team.42.*`
/// matches rooms starting with `team.42.`), or `*` alone. Missing claim =
/// empty = grants nothing.
///
/// Patterns are trimmed; empty ones, and ones with a `*` anywhere but at the
/// end, grant nothing.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    any_room: bool,
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl Grants {
    /// Compile a list of patterns.
    pub fn from_patterns<I: IntoIterator<Item = S>, S: AsRef<str>>(patterns: I) -> Grants {
        let mut grants = Grants::default();
        for pattern in patterns {
            let pattern = pattern.as_ref().trim();
            if pattern.is_empty() {
                continue;
            }
            if pattern == "*" {
                grants.any_room = true;
            } else if let Some(prefix) = pattern.strip_suffix('*') {
                if !prefix.contains('*') {
                    grants.prefixes.push(prefix.to_owned());
                }
            } else if !pattern.contains('*') {
                grants.exact.insert(pattern.to_owned());
            }
        }
        if grants.any_room {
            grants.exact.clear();
            grants.prefixes.clear();
        }
        grants.prefixes.sort();
        grants.prefixes.dedup();
        grants
    }

    /// Grants for every room (the pattern `*`).
    pub fn all() -> Grants {
        Grants {
            any_room: true,
            ..Grants::default()
        }
    }

    /// Whether these grants cover `room`.
    pub fn allows(&self, room: &str) -> bool {
        self.any_room
            || self.exact.contains(room)
            || self.prefixes.iter().any(|p| room.starts_with(p.as_str()))
    }

    /// Whether these grants cover no room at all.
    pub fn is_empty(&self) -> bool {
        !self.any_room && self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// Extract the token: `Authorization: Bearer <jwt>` header first
/// (case-insensitive scheme), else the `token` query parameter
/// (percent-decoded, `+` as space, as in a form). `query` is the URI's query
/// string, without or with its leading `?`. None when absent/empty.
pub fn token_from_request(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    for value in headers.get_all(AUTHORIZATION) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        let value = value.trim();
        let Some((scheme, rest)) = value.split_once(|c: char| c.is_ascii_whitespace()) else {
            continue;
        };
        let token = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
            return Some(token.to_owned());
        }
    }

    let query = query?;
    let query = query.strip_prefix('?').unwrap_or(query);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| percent_decode(key) == "token")
        .map(|(_, value)| percent_decode(value).trim().to_owned())
        .find(|token| !token.is_empty())
}

/// Replace the value of any `token=` query parameter in a URI/path-and-query
/// string with `REDACTED` (for logs). The key is matched after
/// percent-decoding and case-insensitively, so that no spelling leaks. A
/// string without `?` that does not look like a path or URI is treated as a
/// bare query string. Borrowed when there is nothing to redact.
pub fn redact_query(uri: &str) -> Cow<'_, str> {
    let query_start = match uri.find('?') {
        Some(i) => i + 1,
        None if !uri.starts_with('/') && !uri.contains("://") && uri.contains('=') => 0,
        None => return Cow::Borrowed(uri),
    };
    let query_end = uri[query_start..]
        .find('#')
        .map_or(uri.len(), |i| query_start + i);
    let query = &uri[query_start..query_end];

    let is_token = |pair: &str| {
        pair.split_once('=')
            .is_some_and(|(key, _)| percent_decode(key).eq_ignore_ascii_case("token"))
    };
    if !query.split('&').any(is_token) {
        return Cow::Borrowed(uri);
    }

    let mut out = String::with_capacity(uri.len());
    out.push_str(&uri[..query_start]);
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if is_token(pair) => {
                out.push_str(key);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
    out.push_str(&uri[query_end..]);
    Cow::Owned(out)
}

/// What `wsgate token` and dev mode mint.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    /// The user id (`sub`); must not be empty.
    pub sub: &'a str,
    /// Room patterns for the `rooms` claim (trimmed, empty entries dropped).
    pub rooms: &'a [String],
    /// Room patterns for the `publish` claim (trimmed, empty entries dropped).
    pub publish: &'a [String],
    /// Lifetime: `exp` = now + ttl (rounded up to whole seconds).
    pub ttl: Duration,
    /// `iss`, when given.
    pub issuer: Option<&'a str>,
    /// `aud`, when given.
    pub audience: Option<&'a str>,
}

/// Mint an HS256 token (`iat` = now, `exp` = now + ttl, `rooms`/`publish`
/// arrays, `iss`/`aud` when given).
pub fn mint_hs256(secret: &[u8], req: &MintRequest<'_>) -> Result<String, AuthError> {
    ensure_crypto_provider();
    if secret.is_empty() {
        return Err(AuthError::Mint("the HMAC secret is empty".to_owned()));
    }
    if req.sub.is_empty() {
        return Err(AuthError::Mint("`sub` must not be empty".to_owned()));
    }
    let now = unix_now();
    let exp = now
        .checked_add(ceil_secs(req.ttl))
        .ok_or_else(|| AuthError::Mint("ttl too large".to_owned()))?;

    let patterns = |list: &[String]| -> Value {
        Value::Array(
            list.iter()
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
                .map(|p| Value::String(p.to_owned()))
                .collect(),
        )
    };
    let mut claims = Map::new();
    claims.insert("sub".to_owned(), Value::from(req.sub));
    claims.insert("iat".to_owned(), Value::from(now));
    claims.insert("exp".to_owned(), Value::from(exp));
    claims.insert("rooms".to_owned(), patterns(req.rooms));
    claims.insert("publish".to_owned(), patterns(req.publish));
    if let Some(issuer) = req.issuer.filter(|s| !s.is_empty()) {
        claims.insert("iss".to_owned(), Value::from(issuer));
    }
    if let Some(audience) = req.audience.filter(|s| !s.is_empty()) {
        claims.insert("aud".to_owned(), Value::from(audience));
    }

    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Value::Object(claims),
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Mint(e.to_string()))
}

/// Select the RustCrypto backend explicitly, so that the JWT library never
/// has to guess from crate features (it panics when it cannot). Installing
/// fails harmlessly when a provider is already set.
fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    });
}

fn map_jwt_error(err: jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(match claim.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            "nbf" => "nbf",
            "sub" => "sub",
            _ => "unknown",
        }),
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => {
            AuthError::BadKey("the configured key cannot verify this token".to_owned())
        }
        // InvalidToken, Base64, Json, Utf8, InvalidClaimFormat, and anything
        // the library adds later.
        _ => AuthError::Malformed,
    }
}

/// A `rooms`/`publish` claim: absent = grants nothing; present but not an
/// array of strings = malformed token.
fn grants_claim(claims: &Map<String, Value>, name: &str) -> Result<Grants, AuthError> {
    match claims.get(name) {
        None => Ok(Grants::default()),
        Some(Value::Array(items)) => {
            let mut patterns = Vec::with_capacity(items.len());
            for item in items {
                patterns.push(item.as_str().ok_or(AuthError::Malformed)?);
            }
            Ok(Grants::from_patterns(patterns))
        }
        Some(_) => Err(AuthError::Malformed),
    }
}

/// A JWT NumericDate as whole seconds, with the JWT library's rules (a
/// non-negative integer, or a finite non-negative float, rounded).
fn numeric_date(value: &Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// The label of the first `-----BEGIN <label>-----` line, if any.
fn pem_label(pem: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let len = text[start..].find("-----")?;
    Some(text[start..start + len].trim())
}

/// Check a PKCS#1 `RSAPublicKey` DER (`SEQUENCE { INTEGER n, INTEGER e }`)
/// the way the RSA backend will at verification time, so that a bad key
/// stops the start instead of failing every token as a bad signature.
fn check_rsa_public_der(der: &[u8]) -> Result<(), AuthError> {
    let bad = |what: &str| AuthError::BadKey(format!("RSA public key: {what}"));
    let (seq, rest) = der_read(der, 0x30).ok_or_else(|| bad("not a PKCS#1 RSAPublicKey"))?;
    if !rest.is_empty() {
        return Err(bad("trailing data"));
    }
    let (n, seq) = der_read(seq, 0x02).ok_or_else(|| bad("no modulus"))?;
    let (e, seq) = der_read(seq, 0x02).ok_or_else(|| bad("no exponent"))?;
    if !seq.is_empty() {
        return Err(bad("unexpected fields"));
    }
    let n = strip_leading_zeros(n);
    let e = strip_leading_zeros(e);
    let bits = match n.first() {
        Some(&first) => n.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    };
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(bad(&format!(
            "modulus of {bits} bits; RS256 needs {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
        )));
    }
    let n_odd = n.last().is_some_and(|b| b & 1 == 1);
    let e_odd = e.last().is_some_and(|b| b & 1 == 1);
    let e_value = e.iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(256).map(|v| v | u64::from(b))
    });
    let e_ok = e_odd && e_value.is_some_and(|v| (3..(1u64 << 33)).contains(&v));
    if !n_odd || !e_ok {
        return Err(bad("invalid modulus or exponent"));
    }
    Ok(())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// Read one DER element with the expected tag: its contents and the rest.
fn der_read(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&len0, mut rest) = rest.split_first()?;
    let len = if len0 < 0x80 {
        usize::from(len0)
    } else {
        let count = usize::from(len0 & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, after) = rest.split_at(count);
        rest = after;
        len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// Decode unpadded base64url (RFC 7515 section 2); None on any bad input.
fn b64url_decode(input: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'-' => Some(62),
            b'_' => Some(63),
            _ => None,
        }
    }
    let bytes = input.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        // A chunk of n characters carries n * 6 bits, of which (n - 1) bytes.
        acc <<= 6 * (4 - chunk.len() as u32);
        let [_, b0, b1, b2] = acc.to_be_bytes();
        out.extend_from_slice(&[b0, b1, b2][..chunk.len() - 1]);
    }
    Some(out)
}

/// Form-decode a query key or value: `%XX` escapes (invalid ones kept
/// literally) and `+` as a space; invalid UTF-8 is replaced.
fn percent_decode(input: &str) -> Cow<'_, str> {
    if !input.contains(['%', '+']) {
        return Cow::Borrowed(input);
    }
    fn hex(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let decoded = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h << 4) | l),
                    _ => None,
                };
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    const RSA_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/rsa_private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/rsa_public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/ec_private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/ec_public.pem");

    /// The PKCS#1 form of `rsa_public.pem`.
    const RSA_PUBLIC_PKCS1: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAnJ5dlAfbW1nx32PW4AKmObTqNdLIuaZPkewym/IBX7HjXviQC9Y2
rUey5cweJuSfNzDYIHOzRR1lbw6xfGFwSipm8ylKT1vc00v1LHzwJn1jEgNSqGJ9
TsoWjmC/CPYYpxH/jNAwYBahRPBXtO8dd/mLIflJOuITcVGvzOhb8fWuZfTvjkHc
ZXnjBjW0FYK0d1WGOux1Y6Zb/2OzA2c74HmXp4bss4qqRpMWgD9fmpw1azU2oQLU
g/SY+FnyWBdHjqTL2Fkwy5yeiWX1v9xYWMHi8Xnd+xvE73jQHDXg7aQilcH/fFuY
JsjI6YsavhPlBGPbNXd8uQO2jSOFALx3owIDAQAB
-----END RSA PUBLIC KEY-----
";

    /// Public keys the verifier must refuse (test-only, no private halves kept).
    const EC_P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEe3zmhOrCfcHP7vWIjSA8asvm3NcX0hdp
uC0qASqZDlkocydsG9D5ZgsTgAxz74bi/NKLgJFuNjO0eP8AAB2ix7ZaoNMXgtrw
ziUCNYlrXf8gIJQNCGmiqFNpNZeVkH5R
-----END PUBLIC KEY-----
";
    const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEANJwa0Mfdc1CGo6Dl31j/y0gSjE7bt5ClaeUZ4Usdm2Y=
-----END PUBLIC KEY-----
";
    const RSA_1024_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCaB5UGEmUb9NiF1IeXxV6drBGe
NctApjh8Xl7wdi1vZGF36mNaje+hBg6TfFGplaOZ1ikVYm3DFh/XEJ8pT9KqFmHl
DT9JwDfi09u6+NKYrg1vn1TlgtC/MFWT7ce0k4O7kTgopMBK5SRAu/NB4N8wGpaM
d+gf17Evevh/WtqGKwIDAQAB
-----END PUBLIC KEY-----
";

    const SECRET: &[u8] = b"test-secret-0123456789";

    fn now() -> u64 {
        unix_now()
    }

    fn settings() -> VerifierSettings {
        VerifierSettings {
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
        }
    }

    fn hmac_verifier() -> Verifier {
        Verifier::hmac(SECRET, settings())
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
        sign(alg, &EncodingKey::from_secret(secret), claims)
    }

    fn valid_claims() -> Value {
        json!({"sub": "alice", "exp": now() + 3600, "rooms": ["lobby"], "publish": ["lobby"]})
    }

    fn b64url_encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut buf = [0u8; 3];
            buf[..chunk.len()].copy_from_slice(chunk);
            let n = (u32::from(buf[0]) << 16) | (u32::from(buf[1]) << 8) | u32::from(buf[2]);
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    fn unsigned_token(header: &Value, claims: &Value) -> String {
        format!(
            "{}.{}.",
            b64url_encode(header.to_string().as_bytes()),
            b64url_encode(claims.to_string().as_bytes())
        )
    }

    /// `header.payload.signature` with a valid HS256 signature over whatever
    /// the two (already encoded) parts are.
    fn signed_raw(header: &str, payload: &str) -> String {
        let message = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{sig}")
    }

    fn err(result: Result<Claims, AuthError>) -> AuthError {
        match result {
            Ok(c) => panic!("expected an error, got claims for {:?}", c.sub),
            Err(e) => e,
        }
    }

    #[test]
    fn b64url_round_trip() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64url_decode(&b64url_encode(&data)).unwrap(), data);
        }
        assert!(b64url_decode("a").is_none());
        assert!(b64url_decode("ab=c").is_none());
        assert!(b64url_decode("ab+c").is_none());
    }

    #[test]
    fn hs256_hs384_hs512_valid() {
        let v = hmac_verifier();
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let exp = now() + 3600;
            let token = hs(
                alg,
                SECRET,
                &json!({"sub": "alice", "exp": exp, "rooms": ["lobby"]}),
            );
            let claims = v.verify(&token).unwrap();
            assert_eq!(claims.sub, "alice");
            assert_eq!(claims.exp, exp);
            assert!(claims.rooms.allows("lobby"));
            assert!(claims.publish.is_empty());
        }
    }

    #[test]
    fn wrong_secret_is_bad_signature() {
        let token = hs(Algorithm::HS256, b"another-secret", &valid_claims());
        let e = err(hmac_verifier().verify(&token));
        assert!(matches!(e, AuthError::BadSignature), "{e:?}");
        assert_eq!(e.reason(), "bad_signature");
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let token = hs(Algorithm::HS256, SECRET, &valid_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = json!({"sub": "mallory", "exp": now() + 3600, "rooms": ["*"]});
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url_encode(forged.to_string().as_bytes()),
            parts[2]
        );
        assert!(matches!(
            err(hmac_verifier().verify(&forged)),
            AuthError::BadSignature
        ));
    }

    #[test]
    fn expired_refused_and_within_leeway_accepted() {
        let token = hs(
            Algorithm::HS256,
            SECRET,
            &json!({"sub": "a", "exp": now() - 120}),
        );
        let e = err(hmac_verifier().verify(&token));
        assert!(matches!(e, AuthError::Expired), "{e:?}");
        assert_eq!(e.reason(), "expired");

        let lenient = Verifier::hmac(
            SECRET,
            VerifierSettings {
                leeway: Duration::from_secs(60),
                ..settings()
            },
        );
        let token = hs(
            Algorithm::HS256,
            SECRET,
            &json!({"sub": "a", "exp": now() - 2}),
        );
        assert_eq!(lenient.verify(&token).unwrap().sub, "a");
        // ... but not beyond it.
        let token = hs(
            Algorithm::HS256,
            SECRET,
            &json!({"sub": "a", "exp": now() - 600}),
        );
        assert!(matches!(err(lenient.verify(&token)), AuthError::Expired));
    }

    #[test]
    fn leeway_rounds_up_to_whole_seconds() {
        let v = Verifier::hmac(
            SECRET,
            VerifierSettings {
                leeway: Duration::from_millis(1500),
                ..settings()
            },
        );
        assert_eq!(v.leeway(), Duration::from_secs(2));
        assert_eq!(hmac_verifier().leeway(), Duration::from_secs(5));
        let zero = Verifier::hmac(
            SECRET,
            VerifierSettings {
                leeway: Duration::ZERO,
                ..settings()
            },
        );
        assert_eq!(zero.leeway(), Duration::ZERO);
    }

    #[test]
    fn nbf_in_future_refused() {
        let claims = json!({"sub": "a", "exp": now() + 3600, "nbf": now() + 600});
        let e = err(hmac_verifier().verify(&hs(Algorithm::HS256, SECRET, &claims)));
        assert!(matches!(e, AuthError::NotYetValid), "{e:?}");
        assert_eq!(e.reason(), "not_yet_valid");

        // nbf in the past, or slightly ahead within the leeway, is fine.
        let lenient = Verifier::hmac(
            SECRET,
            VerifierSettings {
                leeway: Duration::from_secs(60),
                ..settings()
            },
        );
        for nbf in [now() - 10, now() + 2] {
            let claims = json!({"sub": "a", "exp": now() + 3600, "nbf": nbf});
            lenient
                .verify(&hs(Algorithm::HS256, SECRET, &claims))
                .unwrap();
        }
    }

    #[test]
    fn iat_in_future_refused() {
        let claims = json!({"sub": "a", "exp": now() + 3600, "iat": now() + 600});
        let e = err(hmac_verifier().verify(&hs(Algorithm::HS256, SECRET, &claims)));
        assert!(matches!(e, AuthError::IssuedInFuture), "{e:?}");
        assert_eq!(e.reason(), "issued_in_future");

        let lenient = Verifier::hmac(
            SECRET,
            VerifierSettings {
                leeway: Duration::from_secs(60),
                ..settings()
            },
        );
        for iat in [now() - 10, now() + 2] {
            let claims = json!({"sub": "a", "exp": now() + 3600, "iat": iat});
            lenient
                .verify(&hs(Algorithm::HS256, SECRET, &claims))
                .unwrap();
        }

        let claims = json!({"sub": "a", "exp": now() + 3600, "iat": "yesterday"});
        assert!(matches!(
            err(hmac_verifier().verify(&hs(Algorithm::HS256, SECRET, &claims))),
            AuthError::Malformed
        ));
    }

    #[test]
    fn issuer_checked_when_configured() {
        let v = Verifier::hmac(
            SECRET,
            VerifierSettings {
                issuer: Some("https://auth.example".into()),
                ..settings()
            },
        );
        let with_iss = |iss: Value| {
            hs(
                Algorithm::HS256,
                SECRET,
                &json!({"sub": "a", "exp": now() + 3600, "iss": iss}),
            )
        };
        v.verify(&with_iss(json!("https://auth.example"))).unwrap();
        let e = err(v.verify(&with_iss(json!("https://evil.example"))));
        assert!(matches!(e, AuthError::WrongIssuer), "{e:?}");
        assert_eq!(e.reason(), "wrong_issuer");
        // Absent iss when one is required.
        let e = err(v.verify(&hs(Algorithm::HS256, SECRET, &valid_claims())));
        assert!(matches!(e, AuthError::MissingClaim("iss")), "{e:?}");

        // Not configured: any iss (or none) is fine.
        hmac_verifier()
            .verify(&with_iss(json!("https://evil.example")))
            .unwrap();
    }

    #[test]
    fn audience_checked_when_configured() {
        let v = Verifier::hmac(
            SECRET,
            VerifierSettings {
                audience: Some("wsgate".into()),
                ..settings()
            },
        );
        let with_aud = |aud: Value| {
            hs(
                Algorithm::HS256,
                SECRET,
                &json!({"sub": "a", "exp": now() + 3600, "aud": aud}),
            )
        };
        v.verify(&with_aud(json!("wsgate"))).unwrap();
        v.verify(&with_aud(json!(["billing", "wsgate"]))).unwrap();
        let e = err(v.verify(&with_aud(json!("billing"))));
        assert!(matches!(e, AuthError::WrongAudience), "{e:?}");
        assert_eq!(e.reason(), "wrong_audience");
        assert!(matches!(
            err(v.verify(&with_aud(json!(["billing"])))),
            AuthError::WrongAudience
        ));
        assert!(matches!(
            err(v.verify(&hs(Algorithm::HS256, SECRET, &valid_claims()))),
            AuthError::MissingClaim("aud")
        ));

        // Not configured: a token's aud is not checked.
        hmac_verifier().verify(&with_aud(json!("billing"))).unwrap();
        // Empty configuration values mean "not configured".
        let empty = Verifier::hmac(
            SECRET,
            VerifierSettings {
                issuer: Some(String::new()),
                audience: Some(String::new()),
                ..settings()
            },
        );
        empty.verify(&with_aud(json!("billing"))).unwrap();
    }

    #[test]
    fn alg_none_refused() {
        let claims = valid_claims();
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "None"}),
            json!({"alg": "NONE"}),
        ] {
            let token = unsigned_token(&header, &claims);
            let e = err(hmac_verifier().verify(&token));
            assert!(matches!(e, AuthError::AlgorithmNotAllowed), "{e:?}");
            assert_eq!(e.reason(), "algorithm_not_allowed");
            let rsa = Verifier::public_key_pem(RSA_PUBLIC, settings()).unwrap();
            assert!(matches!(
                err(rsa.verify(&token)),
                AuthError::AlgorithmNotAllowed
            ));
        }
        // An allowed alg with the signature stripped is refused too.
        let token = unsigned_token(&json!({"alg": "HS256"}), &claims);
        assert!(hmac_verifier().verify(&token).is_err());
    }

    #[test]
    fn hs_rs_confusion_refused() {
        // The classic attack: HS256 "signed" with the RSA public key bytes.
        let token = hs(Algorithm::HS256, RSA_PUBLIC, &valid_claims());
        let rsa = Verifier::public_key_pem(RSA_PUBLIC, settings()).unwrap();
        let e = err(rsa.verify(&token));
        assert!(matches!(e, AuthError::AlgorithmNotAllowed), "{e:?}");

        // And the other way round: an HMAC verifier refuses RS256 outright.
        let rs = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
            &valid_claims(),
        );
        let e = err(Verifier::hmac(RSA_PUBLIC, settings()).verify(&rs));
        assert!(matches!(e, AuthError::AlgorithmNotAllowed), "{e:?}");
    }

    #[test]
    fn rs256_valid_other_rsa_algs_refused() {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        let token = sign(Algorithm::RS256, &key, &valid_claims());
        for pem in [RSA_PUBLIC, RSA_PUBLIC_PKCS1.as_bytes()] {
            let v = Verifier::public_key_pem(pem, settings()).unwrap();
            let claims = v.verify(&token).unwrap();
            assert_eq!(claims.sub, "alice");
            assert!(claims.publish.allows("lobby"));
        }
        let v = Verifier::public_key_pem(RSA_PUBLIC, settings()).unwrap();
        for alg in [Algorithm::RS384, Algorithm::PS256] {
            let token = sign(alg, &key, &valid_claims());
            assert!(matches!(
                err(v.verify(&token)),
                AuthError::AlgorithmNotAllowed
            ));
        }
        // Tampered RS256 token.
        let sig_mid = token.rfind('.').unwrap() + 20;
        let flipped = if &token[sig_mid..=sig_mid] == "A" {
            "B"
        } else {
            "A"
        };
        let bad = format!("{}{flipped}{}", &token[..sig_mid], &token[sig_mid + 1..]);
        assert!(matches!(err(v.verify(&bad)), AuthError::BadSignature));
    }

    #[test]
    fn es256_valid_and_refuses_rs256() {
        let v = Verifier::public_key_pem(EC_PUBLIC, settings()).unwrap();
        let token = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
            &valid_claims(),
        );
        assert_eq!(v.verify(&token).unwrap().sub, "alice");

        let rs = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
            &valid_claims(),
        );
        let e = err(v.verify(&rs));
        assert!(matches!(e, AuthError::AlgorithmNotAllowed), "{e:?}");

        // An RSA verifier refuses ES256; an HS256 token with the EC key bytes too.
        let rsa = Verifier::public_key_pem(RSA_PUBLIC, settings()).unwrap();
        assert!(matches!(
            err(rsa.verify(&token)),
            AuthError::AlgorithmNotAllowed
        ));
        let hs_token = hs(Algorithm::HS256, EC_PUBLIC, &valid_claims());
        assert!(matches!(
            err(v.verify(&hs_token)),
            AuthError::AlgorithmNotAllowed
        ));
    }

    #[test]
    fn bad_public_keys_refused_with_clear_errors() {
        let cases: [(&[u8], &str); 8] = [
            (b"", "not a PEM"),
            (b"hello world", "not a PEM"),
            (
                b"-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n",
                "unreadable",
            ),
            (RSA_PRIVATE, "private key"),
            (EC_PRIVATE, "private key"),
            (EC_P384_PUBLIC.as_bytes(), "P-256"),
            (ED25519_PUBLIC.as_bytes(), "unreadable"),
            (RSA_1024_PUBLIC.as_bytes(), "1024 bits"),
        ];
        for (pem, needle) in cases {
            let e = Verifier::public_key_pem(pem, settings()).unwrap_err();
            assert!(matches!(e, AuthError::BadKey(_)), "{e:?}");
            assert_eq!(e.reason(), "bad_key");
            let text = e.to_string();
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
            assert!(!text.contains('\n'), "one line: {text:?}");
        }
    }

    #[test]
    fn missing_exp_or_sub_refused() {
        let v = hmac_verifier();
        let e = err(v.verify(&hs(Algorithm::HS256, SECRET, &json!({"sub": "a"}))));
        assert!(matches!(e, AuthError::MissingClaim("exp")), "{e:?}");
        assert_eq!(e.reason(), "missing_claim");

        for claims in [
            json!({"exp": now() + 3600}),
            json!({"sub": "", "exp": now() + 3600}),
            json!({"sub": null, "exp": now() + 3600}),
        ] {
            let e = err(v.verify(&hs(Algorithm::HS256, SECRET, &claims)));
            assert!(matches!(e, AuthError::MissingClaim("sub")), "{e:?}");
        }
        for claims in [
            json!({"sub": 42, "exp": now() + 3600}),
            json!({"sub": ["a"], "exp": now() + 3600}),
            json!({"sub": "a", "exp": now() + 3600, "nbf": "now"}),
        ] {
            let e = err(v.verify(&hs(Algorithm::HS256, SECRET, &claims)));
            assert!(matches!(e, AuthError::Malformed), "{claims}: {e:?}");
        }
        // An `exp` that is not a NumericDate counts as absent.
        for claims in [
            json!({"sub": "a", "exp": "tomorrow"}),
            json!({"sub": "a", "exp": -5}),
            json!({"sub": "a", "exp": null}),
        ] {
            let e = err(v.verify(&hs(Algorithm::HS256, SECRET, &claims)));
            assert!(
                matches!(e, AuthError::MissingClaim("exp")),
                "{claims}: {e:?}"
            );
        }
    }

    #[test]
    fn malformed_tokens_refused() {
        let v = hmac_verifier();
        assert!(matches!(err(v.verify("")), AuthError::Missing));
        assert!(matches!(err(v.verify("   ")), AuthError::Missing));
        let valid = hs(Algorithm::HS256, SECRET, &valid_claims());
        let header = valid.split('.').next().unwrap();
        for token in [
            "abc".to_owned(),
            "a.b".to_owned(),
            "a.b.c".to_owned(),
            "a.b.c.d".to_owned(),
            "...".to_owned(),
            format!("{valid}.extra"),
            format!("{}.e30.abc", b64url_encode(b"{\"typ\":\"JWT\"}")),
            format!("{}.e30.abc", b64url_encode(b"{\"alg\":256}")),
            format!("{}.e30.abc", b64url_encode(b"[1,2]")),
            "x".repeat(MAX_TOKEN_LEN + 1),
            // Correctly signed, but the payload is not a JSON object.
            signed_raw(header, "!!!"),
            signed_raw(header, &b64url_encode(b"not json")),
            signed_raw(header, &b64url_encode(b"[1,2,3]")),
        ] {
            let e = err(v.verify(&token));
            assert!(matches!(e, AuthError::Malformed), "{token:.40}: {e:?}");
            assert_eq!(e.reason(), "malformed");
        }
        // A garbage payload with a signature that does not match is refused
        // on the signature.
        assert!(matches!(
            err(v.verify(&format!("{header}.{}.abc", b64url_encode(b"not json")))),
            AuthError::BadSignature
        ));
        // Surrounding whitespace is tolerated.
        v.verify(&format!(" {valid}\n")).unwrap();
    }

    #[test]
    fn grants_claims_must_be_string_arrays() {
        let v = hmac_verifier();
        for claims in [
            json!({"sub": "a", "exp": now() + 3600, "rooms": "lobby"}),
            json!({"sub": "a", "exp": now() + 3600, "rooms": ["lobby", 3]}),
            json!({"sub": "a", "exp": now() + 3600, "publish": {"lobby": true}}),
            json!({"sub": "a", "exp": now() + 3600, "publish": null}),
        ] {
            let e = err(v.verify(&hs(Algorithm::HS256, SECRET, &claims)));
            assert!(matches!(e, AuthError::Malformed), "{claims}: {e:?}");
        }
        let claims = v
            .verify(&hs(
                Algorithm::HS256,
                SECRET,
                &json!({"sub": "a", "exp": now() + 3600}),
            ))
            .unwrap();
        assert!(claims.rooms.is_empty() && claims.publish.is_empty());
        assert!(!claims.rooms.allows("lobby"));
        let claims = v
            .verify(&hs(
                Algorithm::HS256,
                SECRET,
                &json!({"sub": "a", "exp": now() + 3600, "rooms": ["team.*"], "publish": ["*"]}),
            ))
            .unwrap();
        assert!(claims.rooms.allows("team.1") && !claims.rooms.allows("lobby"));
        assert!(claims.publish.allows("anything"));
    }

    #[test]
    fn pattern_rules() {
        let g = Grants::from_patterns(["lobby", "team.42.*"]);
        assert!(g.allows("lobby"));
        assert!(!g.allows("lobby2"));
        assert!(!g.allows("lob"));
        assert!(g.allows("team.42.chat"));
        assert!(g.allows("team.42.a.b"));
        assert!(!g.allows("team.42"));
        assert!(!g.allows("team.43.chat"));
        assert!(!g.is_empty());

        let team = Grants::from_patterns(["team.*"]);
        assert!(team.allows("team.x"));
        assert!(!team.allows("teams"));
        assert!(!team.allows("team"));

        let all = Grants::from_patterns(["*"]);
        for room in ["lobby", "admin", "team.1", "a"] {
            assert!(all.allows(room));
            assert!(Grants::all().allows(room));
        }

        let none = Grants::from_patterns(Vec::<String>::new());
        assert!(none.is_empty());
        assert!(!none.allows("lobby"));
        assert!(!Grants::default().allows("lobby"));

        // Junk patterns grant nothing; surrounding blanks are trimmed.
        let junk = Grants::from_patterns(["", "  ", "a*b", "**", "x*y*"]);
        assert!(junk.is_empty());
        for room in ["a", "ab", "axb", "x", "xy", "lobby"] {
            assert!(!junk.allows(room), "{room}");
        }
        let trimmed = Grants::from_patterns([" lobby ", " team.* "]);
        assert!(trimmed.allows("lobby") && trimmed.allows("team.1"));
    }

    #[test]
    fn token_from_header_or_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(token_from_request(&headers, None), None);
        assert_eq!(token_from_request(&headers, Some("")), None);
        assert_eq!(token_from_request(&headers, Some("room=lobby")), None);
        assert_eq!(token_from_request(&headers, Some("token=")), None);
        assert_eq!(
            token_from_request(&headers, Some("token=q.r.s")).as_deref(),
            Some("q.r.s")
        );
        assert_eq!(
            token_from_request(&headers, Some("?a=1&token=q.r.s&b=2")).as_deref(),
            Some("q.r.s")
        );
        assert_eq!(
            token_from_request(&headers, Some("token=&token=second")).as_deref(),
            Some("second")
        );
        // Percent-decoding of value and key.
        assert_eq!(
            token_from_request(&headers, Some("%74oken=a%2Eb%2ec%3D%3d")).as_deref(),
            Some("a.b.c==")
        );
        assert_eq!(
            token_from_request(&headers, Some("token=a+b%20c%zz")).as_deref(),
            Some("a b c%zz")
        );
        assert_eq!(
            token_from_request(&headers, Some("tokens=x&xtoken=y")),
            None
        );

        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer h.e.ader"));
        assert_eq!(
            token_from_request(&headers, Some("token=q.r.s")).as_deref(),
            Some("h.e.ader")
        );
        for value in ["bearer h.e.ader", "BEARER   h.e.ader  "] {
            headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(
                token_from_request(&headers, None).as_deref(),
                Some("h.e.ader"),
                "{value}"
            );
        }
        // Another scheme, or an empty bearer, falls back to the query.
        for value in ["Basic dXNlcjpwdw==", "Bearer ", "Bearer", "Bearerh.e.ader"] {
            headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(
                token_from_request(&headers, Some("token=q.r.s")).as_deref(),
                Some("q.r.s"),
                "{value}"
            );
            assert_eq!(token_from_request(&headers, None), None, "{value}");
        }
    }

    #[test]
    fn redact_query_hides_tokens() {
        let cases = [
            ("/ws?token=abc.def.ghi", "/ws?token=REDACTED"),
            ("/ws?token=abc&room=lobby", "/ws?token=REDACTED&room=lobby"),
            ("/ws?a=1&token=abc&b=2", "/ws?a=1&token=REDACTED&b=2"),
            ("/ws?a=1&token=abc", "/ws?a=1&token=REDACTED"),
            (
                "/ws?token=abc&token=def",
                "/ws?token=REDACTED&token=REDACTED",
            ),
            ("/ws?%74oken=abc", "/ws?%74oken=REDACTED"),
            ("/ws?TOKEN=abc", "/ws?TOKEN=REDACTED"),
            ("/ws?token=abc#frag", "/ws?token=REDACTED#frag"),
            (
                "ws://127.0.0.1:8080/ws?token=abc",
                "ws://127.0.0.1:8080/ws?token=REDACTED",
            ),
            ("token=abc&x=1", "token=REDACTED&x=1"),
        ];
        for (input, expected) in cases {
            let out = redact_query(input);
            assert_eq!(out, expected, "{input}");
            assert!(matches!(out, Cow::Owned(_)));
        }
        for input in [
            "/ws",
            "/ws?",
            "/ws?room=lobby",
            "/ws?tokens=1&mytoken=2&token",
            "/path/token=x",
            "",
        ] {
            let out = redact_query(input);
            assert_eq!(out, input);
            assert!(matches!(out, Cow::Borrowed(_)), "{input}");
        }
    }

    #[test]
    fn mint_then_verify_round_trip() {
        let rooms = vec!["lobby".to_owned(), " team.* ".to_owned(), String::new()];
        let publish = vec!["lobby".to_owned()];
        let req = MintRequest {
            sub: "alice",
            rooms: &rooms,
            publish: &publish,
            ttl: Duration::from_secs(3600),
            issuer: Some("wsgate-test"),
            audience: Some("wsgate"),
        };
        let before = now();
        let token = mint_hs256(SECRET, &req).unwrap();
        let after = now();

        let v = Verifier::hmac(
            SECRET,
            VerifierSettings {
                issuer: Some("wsgate-test".into()),
                audience: Some("wsgate".into()),
                ..settings()
            },
        );
        let claims = v.verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert!(claims.exp >= before + 3600 && claims.exp <= after + 3600);
        assert!(claims.rooms.allows("lobby"));
        assert!(claims.rooms.allows("team.7"));
        assert!(!claims.rooms.allows("teams"));
        assert!(claims.publish.allows("lobby"));
        assert!(!claims.publish.allows("team.7"));

        // The raw payload has the documented shape.
        let payload = token.split('.').nth(1).unwrap();
        let payload: Value = serde_json::from_slice(&b64url_decode(payload).unwrap()).unwrap();
        assert_eq!(payload["rooms"], json!(["lobby", "team.*"]));
        assert_eq!(payload["publish"], json!(["lobby"]));
        assert_eq!(payload["iss"], json!("wsgate-test"));
        assert_eq!(payload["aud"], json!("wsgate"));
        assert!(payload["iat"].as_u64().unwrap() >= before);
        let header = token.split('.').next().unwrap();
        let header: Value = serde_json::from_slice(&b64url_decode(header).unwrap()).unwrap();
        assert_eq!(header["alg"], json!("HS256"));

        // Without iss/aud the token verifies where none is configured, and
        // not with another secret.
        let plain = MintRequest {
            issuer: None,
            audience: None,
            ..req.clone()
        };
        let token = mint_hs256(SECRET, &plain).unwrap();
        hmac_verifier().verify(&token).unwrap();
        assert!(matches!(
            err(Verifier::hmac(b"other", settings()).verify(&token)),
            AuthError::BadSignature
        ));
        assert!(matches!(err(v.verify(&token)), AuthError::MissingClaim(_)));
    }

    #[test]
    fn mint_refuses_bad_input() {
        let none: Vec<String> = Vec::new();
        let req = MintRequest {
            sub: "alice",
            rooms: &none,
            publish: &none,
            ttl: Duration::from_secs(60),
            issuer: None,
            audience: None,
        };
        let e = mint_hs256(b"", &req).unwrap_err();
        // Nor does an empty secret verify anything, even a token "signed"
        // with the empty key.
        let forged = hs(Algorithm::HS256, b"", &valid_claims());
        let refused = err(Verifier::hmac(b"", settings()).verify(&forged));
        assert!(matches!(refused, AuthError::BadKey(_)), "{refused:?}");
        assert!(matches!(e, AuthError::Mint(_)));
        assert_eq!(e.reason(), "mint");
        assert!(mint_hs256(
            SECRET,
            &MintRequest {
                sub: "",
                ..req.clone()
            }
        )
        .is_err());
        assert!(mint_hs256(
            SECRET,
            &MintRequest {
                ttl: Duration::from_secs(u64::MAX),
                ..req.clone()
            }
        )
        .is_err());
        // A token with no grants verifies and grants nothing.
        let claims = hmac_verifier()
            .verify(&mint_hs256(SECRET, &req).unwrap())
            .unwrap();
        assert!(claims.rooms.is_empty() && claims.publish.is_empty());
    }

    #[test]
    fn errors_never_contain_the_token() {
        let token = hs(Algorithm::HS256, b"wrong", &valid_claims());
        let e = err(hmac_verifier().verify(&token));
        let text = format!("{e} {e:?}");
        for part in token.split('.') {
            assert!(!text.contains(part), "{text}");
        }
        let debug = format!("{:?}", hmac_verifier());
        assert!(!debug.contains("test-secret"), "{debug}");
    }
}
