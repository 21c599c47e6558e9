//! JWT verification, room grants and token minting.
//!
//! A [`Verifier`] is built once at start-up from the configured key source
//! (an HMAC secret, a PEM public key, or a JWKS URL whose key set the
//! [`jwks`] module keeps fresh) and checks every token the gateway sees: on
//! the WebSocket upgrade, on `refresh`, and on the HTTP API. It returns the
//! [`Claims`] the gateway needs, with the `rooms` and `publish` claims
//! precompiled into [`Grants`].
//!
//! The key decides the accepted algorithms (HS256/384/512 for a secret, RS256
//! for an RSA PEM key, ES256/ES384 for an EC P-256/P-384 key, EdDSA for an
//! Ed25519 key; see [`jwks`] for JWK keys); `alg: none` and HS/RS
//! confusion are refused before any signature work. Errors carry a short
//! machine [`AuthError::reason`] for logs and metrics and never the token
//! itself; [`redact_query`] keeps `?token=` out of logged URIs.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header::AUTHORIZATION, HeaderMap};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

pub mod jwks;

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
    /// The user's tokens issued at or before a revocation are refused
    /// (server API `disconnect` with `revoke`).
    #[error("token revoked")]
    Revoked,
    /// `exp` lies further beyond `iat` (or now) than `--max-token-lifetime`.
    #[error("token lifetime exceeds the maximum this gateway accepts")]
    LifetimeTooLong,
    /// The configured key is unusable (start-up error).
    #[error("bad JWT key: {0}")]
    BadKey(String),
    /// A token could not be minted.
    #[error("cannot mint token: {0}")]
    Mint(String),
    /// Keys come from a JWKS URL and no key set has been loaded yet (the
    /// HTTP layer answers 503, not 401).
    #[error("no verification keys loaded yet (the JWKS has not been fetched)")]
    KeysNotLoaded,
    /// The token's `kid` (or its lack of one) matches no key in the JWKS; a
    /// fetch of the set has been asked for (at most one every 10 s).
    #[error("no key for the token's `kid` in the key set")]
    UnknownKey,
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
            AuthError::Revoked => "revoked",
            AuthError::LifetimeTooLong => "lifetime_too_long",
            AuthError::BadKey(_) => "bad_key",
            AuthError::Mint(_) => "mint",
            AuthError::KeysNotLoaded => "keys_not_loaded",
            AuthError::UnknownKey => "unknown_key",
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
    keys: Keys,
    /// The claim checks (`iss`, `aud`, leeway, required claims); each key
    /// carries a copy with its own algorithms.
    validation: Validation,
    /// An empty HMAC secret would let anyone sign: refuse every token.
    empty_secret: bool,
}

/// Where the verification keys come from.
#[derive(Clone)]
enum Keys {
    /// One key given at start-up (`--jwt-secret`, `--jwt-public-key`); a
    /// token's `kid` is ignored.
    Static(Arc<VerifyKey>),
    /// A key set fetched from `--jwt-jwks-url`, replaced as it changes.
    Jwks(Arc<jwks::Jwks>),
}

/// One verification key and the algorithms it accepts.
pub(crate) struct VerifyKey {
    /// The JWK `kid`; `None` for a static key or a JWK without one.
    pub(crate) kid: Option<String>,
    key: DecodingKey,
    /// The verifier's validation with `algorithms` set to this key's.
    validation: Validation,
}

impl VerifyKey {
    /// Whether this key accepts `alg`.
    pub(crate) fn accepts(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        let source = match &self.keys {
            Keys::Static(key) => format!("{:?}", key.validation.algorithms),
            Keys::Jwks(jwks) => format!("jwks {}", jwks.url_for_logs()),
        };
        f.debug_struct("Verifier")
            .field("keys", &source)
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
        let mut verifier = Self::with_key(
            DecodingKey::from_secret(secret),
            &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            settings,
        );
        verifier.empty_secret = secret.is_empty();
        verifier
    }

    /// PEM public key: RSA (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`,
    /// 2048 to 4096 bits) accepts RS256 only; EC P-256 accepts ES256 only,
    /// EC P-384 ES384 only; Ed25519 EdDSA only.
    ///
    /// Anything else (not PEM, a private key, a certificate, another curve,
    /// an RSA key of the wrong size) is an error whose text is meant as the
    /// one start-up error line.
    pub fn public_key_pem(pem: &[u8], settings: VerifierSettings) -> Result<Verifier, AuthError> {
        ensure_crypto_provider();
        match pem_label(pem).as_deref() {
            None if pem.windows(11).any(|w| w == b"-----BEGIN ") => {
                return Err(AuthError::BadKey(
                    "unreadable PEM block (damaged base64 or BEGIN/END lines)".to_owned(),
                ))
            }
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
            return Ok(Self::with_key(key, &[Algorithm::RS256], settings));
        }

        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            // Building a verifier parses the point on the curve: a key on
            // another curve fails here, once, instead of on every token.
            return match [Algorithm::ES256, Algorithm::ES384]
                .into_iter()
                .find(|alg| key_fits(*alg, &key))
            {
                Some(alg) => Ok(Self::with_key(key, &[alg], settings)),
                None => Err(AuthError::BadKey(
                    "EC public key is not on curve P-256 (ES256) or P-384 (ES384)".to_owned(),
                )),
            };
        }

        match DecodingKey::from_ed_pem(pem) {
            Ok(key) if key_fits(Algorithm::EdDSA, &key) => {
                Ok(Self::with_key(key, &[Algorithm::EdDSA], settings))
            }
            _ => Err(AuthError::BadKey(
                "unsupported or unreadable public key: expected an RSA key (RS256), \
                 an EC P-256 (ES256) or P-384 (ES384) key, or an Ed25519 key (EdDSA)"
                    .to_owned(),
            )),
        }
    }

    /// Keys from a JSON Web Key Set (`--jwt-jwks-url`): nothing is accepted
    /// until [`jwks::Jwks::run`] has loaded a set (tokens get
    /// [`AuthError::KeysNotLoaded`]). The error (a bad URL or CA file) is
    /// meant as the one start-up error line.
    pub fn jwks(
        source: &jwks::JwksSettings,
        settings: VerifierSettings,
    ) -> Result<Verifier, String> {
        ensure_crypto_provider();
        let validation = base_validation(settings);
        let jwks = jwks::Jwks::new(source, validation.clone())?;
        Ok(Verifier {
            keys: Keys::Jwks(Arc::new(jwks)),
            validation,
            empty_secret: false,
        })
    }

    fn with_key(
        key: DecodingKey,
        algorithms: &[Algorithm],
        settings: VerifierSettings,
    ) -> Verifier {
        let validation = base_validation(settings);
        Verifier {
            keys: Keys::Static(Arc::new(VerifyKey::new(None, key, algorithms, &validation))),
            validation,
            empty_secret: false,
        }
    }

    /// The JWKS key source, when keys come from a JWKS URL (its fetch loop
    /// is started by [`crate::run`]).
    pub fn jwks_source(&self) -> Option<&Arc<jwks::Jwks>> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Static(_) => None,
        }
    }

    /// Whether tokens can be verified: always for a static key; for a JWKS
    /// once a key set has been loaded.
    pub fn keys_loaded(&self) -> bool {
        match &self.keys {
            Keys::Static(_) => true,
            Keys::Jwks(jwks) => jwks.is_loaded(),
        }
    }

    /// Verify a compact JWT: signature, `alg` allowed for the key (never
    /// `none`, no HS/RS confusion), `exp` required, `sub` required non-empty
    /// string, `nbf` honoured, `iat` in the future (beyond leeway) refused,
    /// `iss`/`aud` when configured, leeway applied to `exp`/`nbf`/`iat`.
    /// `rooms`/`publish`, when present, must be arrays of strings.
    ///
    /// With a JWKS, the token's `kid` picks the key; an unknown `kid` asks
    /// for a fetch of the set in the background and is refused
    /// ([`AuthError::UnknownKey`]): verification never waits for the network.
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
        let (alg, kid) = token_header(token)?;

        let data = match &self.keys {
            Keys::Static(key) => {
                if !key.accepts(alg) {
                    return Err(AuthError::AlgorithmNotAllowed);
                }
                key.decode(token)?
            }
            Keys::Jwks(jwks) => jwks.decode(token, alg, kid.as_deref())?,
        };
        let claims = data.claims;

        let iat = match claims.get("iat") {
            Some(iat) => Some(numeric_date(iat).ok_or(AuthError::Malformed)?),
            None => None,
        };
        if iat.is_some_and(|iat| iat > unix_now().saturating_add(self.validation.leeway)) {
            return Err(AuthError::IssuedInFuture);
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
            iat,
            rooms: grants_claim(&claims, "rooms")?,
            publish: grants_claim(&claims, "publish")?,
        })
    }

    /// The leeway actually applied (the configured one rounded up to whole
    /// seconds); the session closes with 4001 at `exp` + leeway.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.validation.leeway)
    }
}

impl VerifyKey {
    pub(crate) fn new(
        kid: Option<String>,
        key: DecodingKey,
        algorithms: &[Algorithm],
        base: &Validation,
    ) -> VerifyKey {
        let mut validation = base.clone();
        validation.algorithms = algorithms.to_vec();
        VerifyKey {
            kid,
            key,
            validation,
        }
    }

    /// Check the signature and the standard claims with this key.
    pub(crate) fn decode(
        &self,
        token: &str,
    ) -> Result<jsonwebtoken::TokenData<Map<String, Value>>, AuthError> {
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(map_jwt_error)
    }
}

/// Whether `key` can verify `alg` tokens: building the verifier parses the
/// key (an EC point on the curve, an Ed25519 point, the key family).
pub(crate) fn key_fits(alg: Algorithm, key: &DecodingKey) -> bool {
    let factory = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.verifier_factory;
    factory(&alg, key).is_ok()
}

/// The validation every key starts from: the configured `iss`, `aud` and
/// leeway; `exp` required and checked; `nbf` honoured.
fn base_validation(settings: VerifierSettings) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms.clear();
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
    validation
}

/// Read a token's header before any signature work: its `alg` (refused when
/// unknown to the JWT library, which covers `none`) and its `kid`.
fn token_header(token: &str) -> Result<(Algorithm, Option<String>), AuthError> {
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
    let alg = Algorithm::from_str(alg).map_err(|_| AuthError::AlgorithmNotAllowed)?;
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(AuthError::Malformed),
    };
    Ok((alg, kid))
}

/// The claims the gateway needs from a verified token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The user id (`sub`), shown to others as `from`.
    pub sub: String,
    /// Expiry (`exp`), Unix seconds.
    pub exp: u64,
    /// Issue time (`iat`), Unix seconds, when the token has one.
    pub iat: Option<u64>,
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
///
/// Sorted boxed slices rather than a hash set and a vector: every
/// connection keeps two of these for its whole life, and most hold one
/// pattern or none (40 bytes instead of 80).
#[derive(Debug, Clone, Default)]
pub struct Grants {
    any_room: bool,
    exact: Box<[String]>,
    prefixes: Box<[String]>,
}

impl Grants {
    /// Compile a list of patterns.
    pub fn from_patterns<I: IntoIterator<Item = S>, S: AsRef<str>>(patterns: I) -> Grants {
        let mut any_room = false;
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for pattern in patterns {
            let pattern = pattern.as_ref().trim();
            if pattern.is_empty() {
                continue;
            }
            if pattern == "*" {
                any_room = true;
            } else if let Some(prefix) = pattern.strip_suffix('*') {
                if !prefix.contains('*') {
                    prefixes.push(prefix.to_owned());
                }
            } else if !pattern.contains('*') {
                exact.push(pattern.to_owned());
            }
        }
        if any_room {
            exact.clear();
            prefixes.clear();
        }
        for list in [&mut exact, &mut prefixes] {
            list.sort_unstable();
            list.dedup();
        }
        Grants {
            any_room,
            exact: exact.into_boxed_slice(),
            prefixes: prefixes.into_boxed_slice(),
        }
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
            || self
                .exact
                .binary_search_by(|e| e.as_str().cmp(room))
                .is_ok()
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

/// The longest lifetime `wsgate token` mints: 100 years. A verifier takes
/// any `exp` (the session saturates its deadline), but a tool should not
/// mint absurd ones.
pub const MAX_MINT_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

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
    if req.ttl > MAX_MINT_TTL {
        return Err(AuthError::Mint(
            "ttl too large: at most 100 years (100y)".to_owned(),
        ));
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

/// The tag of the PEM block (`PUBLIC KEY`, `CERTIFICATE`, ...), if it is PEM.
fn pem_label(pem: &[u8]) -> Option<String> {
    pem::parse(pem).ok().map(|block| block.tag().to_owned())
}

/// Check an RSA public key (PKCS#1 DER, as the JWT library holds it) the way
/// the RSA backend will at verification time, so that a bad key stops the
/// start instead of failing every token as a bad signature.
fn check_rsa_public_der(der: &[u8]) -> Result<(), AuthError> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPublicKey::from_pkcs1_der(der)
        .map_err(|e| AuthError::BadKey(format!("RSA public key: {e}")))?;
    let bits = key.n().bits();
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(AuthError::BadKey(format!(
            "RSA public key: modulus of {bits} bits; RS256 needs {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
        )));
    }
    Ok(())
}

/// Decode unpadded base64url (RFC 7515 section 2); None on any bad input.
fn b64url_decode(input: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(input)
        .ok()
}

/// Form-decode a query key or value: `%XX` escapes and `+` as a space;
/// invalid UTF-8 is replaced.
fn percent_decode(input: &str) -> Cow<'_, str> {
    if !input.contains(['%', '+']) {
        return Cow::Borrowed(input);
    }
    let spaced = input.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests;
