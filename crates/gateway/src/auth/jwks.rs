//! Verification keys from a JSON Web Key Set (`--jwt-jwks-url`), as
//! OpenID Connect providers publish them (PROTOCOL.md section 9).
//!
//! [`Jwks`] holds the key set in force and the HTTP client that fetches it.
//! [`Jwks::run`] fetches the set at start (retrying until one loads), again
//! every `--jwks-refresh`, and at once when a token names a `kid` the set
//! does not have, such fetches at most once every [`MIN_REFETCH_GAP`] (the
//! start-up and periodic fetches do not delay the first of them, so a key
//! published right after a fetch is still picked up at once). A failed fetch
//! keeps the last good set.
//!
//! A token whose `kid` is unknown asks the fetch loop for a new set and is
//! refused ([`AuthError::UnknownKey`]); handshakes and `refresh` then wait
//! for that fetch ([`Jwks::settle_unknown_kid`], bounded) and verify once
//! more, so a key the provider has just published is accepted on its first
//! token. A flood of tokens with made-up `kid`s costs at most one fetch
//! every 10 s.
//!
//! The key decides the algorithms: RSA keys RS256/384/512 and PS256/384/512,
//! EC keys ES256 (P-256) or ES384 (P-384), OKP Ed25519 keys EdDSA; a JWK
//! `alg` narrows that to the one algorithm. HMAC (`oct`) keys, keys marked
//! `"use": "enc"`, other curves and keys that do not parse are skipped (and
//! logged at debug level); a set without a usable key counts as a failed
//! fetch.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, TokenData, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{key_fits, AuthError, VerifyKey, MAX_RSA_BITS, MIN_RSA_BITS};
use crate::metrics::Metrics;

/// At most one fetch for unknown `kid`s in this long (PROTOCOL.md section 9).
pub const MIN_REFETCH_GAP: Duration = Duration::from_secs(10);

/// One fetch (connect, request, body) may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A key set larger than this is refused (providers publish a few KiB).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Keys beyond this many in one set are ignored.
const MAX_KEYS: usize = 100;

/// Retries after a failed fetch start this far apart and double up to
/// [`MAX_RETRY`], or [`MAX_RETRY_UNLOADED`] while no set has loaded (the
/// node serves nobody until then), never beyond `--jwks-refresh`.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
const MAX_RETRY_UNLOADED: Duration = Duration::from_secs(2);

const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Where the keys come from (from the `--jwt-jwks-url`, `--jwks-refresh`
/// and `--jwks-ca-cert` flags).
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// The JWKS URL, `http://` or `https://`.
    pub url: String,
    /// Fetch the set again this often.
    pub refresh: Duration,
    /// PEM CA certificates trusted for an `https://` URL besides the
    /// system's store.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl JwksSettings {
    /// The URL, if it is an http(s) URL with a host and the refresh period
    /// is positive; the error is meant as the one start-up error line.
    /// Reads no file (the CA certificate is read by [`Jwks::new`]).
    pub fn check(&self) -> Result<reqwest::Url, String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("expected an http:// or https:// URL".to_owned());
        }
        if self.refresh.is_zero() {
            return Err("--jwks-refresh must be greater than 0".to_owned());
        }
        Ok(url)
    }
}

/// A key set fetched from a JWKS URL, kept fresh by [`Jwks::run`].
pub struct Jwks {
    url: reqwest::Url,
    client: reqwest::Client,
    refresh: Duration,
    /// Claim checks each key's validation starts from.
    base: Validation,
    /// The set in force; `None` until the first fetch succeeds.
    set: RwLock<Option<Arc<KeySet>>>,
    /// When an unknown `kid` last asked for a fetch (the 10 s limit).
    last_kid_fetch: Mutex<Option<Instant>>,
    /// Wakes the fetch loop for an unknown `kid`.
    wake: Notify,
    /// A fetch asked for by an unknown `kid` has not finished yet.
    kid_fetch_pending: AtomicBool,
    /// Bumped after every fetch attempt (ok or failed).
    fetched: watch::Sender<u64>,
}

/// Marks the end of a fetch attempt when dropped: after the set was
/// stored (or the failure counted), waiters of [`Jwks::settle_unknown_kid`]
/// wake and verify again.
struct FetchDone<'a>(&'a Jwks);

impl Drop for FetchDone<'_> {
    fn drop(&mut self) {
        self.0.kid_fetch_pending.store(false, Ordering::Release);
        self.0.fetched.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The keys of one fetched set.
struct KeySet {
    keys: Vec<VerifyKey>,
}

impl Jwks {
    /// Check the URL and build the HTTP client; `base` carries the claim
    /// checks. The error is meant as the one start-up error line.
    pub fn new(settings: &JwksSettings, base: Validation) -> Result<Jwks, String> {
        let url = settings.check()?;
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .user_agent(concat!("wsgate/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_cert {
            for cert in load_ca(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Jwks {
            url,
            client,
            refresh: settings.refresh,
            base,
            set: RwLock::new(None),
            last_kid_fetch: Mutex::new(None),
            wake: Notify::new(),
            kid_fetch_pending: AtomicBool::new(false),
            fetched: watch::channel(0).0,
        })
    }

    /// The URL without its query string, for logs.
    pub fn url_for_logs(&self) -> String {
        let mut url = self.url.clone();
        url.set_query(None);
        let _ = url.set_password(None);
        url.to_string()
    }

    /// Whether a key set has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Verify `token` (whose header names `alg` and `kid`) against the set.
    pub(super) fn decode(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<TokenData<Map<String, Value>>, AuthError> {
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let set = self.current().ok_or(AuthError::KeysNotLoaded)?;
        let mut candidates = set
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == kid)
            .peekable();
        if candidates.peek().is_none() {
            self.request_refetch();
            return Err(AuthError::UnknownKey);
        }
        let mut result = Err(AuthError::AlgorithmNotAllowed);
        for key in candidates.filter(|k| k.accepts(alg)) {
            result = key.decode(token);
            // Another key with the same `kid` (or without one) may still
            // match; any other error is the token's own.
            if !matches!(result, Err(AuthError::BadSignature)) {
                break;
            }
        }
        result
    }

    /// Ask the fetch loop for a new set unless an unknown `kid` already did
    /// less than [`MIN_REFETCH_GAP`] ago. Never waits.
    fn request_refetch(&self) {
        let now = Instant::now();
        {
            let mut last = self
                .last_kid_fetch
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| now.duration_since(t) < MIN_REFETCH_GAP) {
                return;
            }
            *last = Some(now);
        }
        debug!("unknown JWT kid: fetching the key set again");
        self.kid_fetch_pending.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// After a token was refused for an unknown `kid`: wait (at most the
    /// fetch timeout and a second) for the fetch that an unknown `kid` asked
    /// for to finish, so that the caller can verify once more. Returns at
    /// once when no such fetch is under way (the 10 s limit held it back,
    /// or it finished already). So a token signed with a key the provider
    /// has just published is accepted on its first attempt, and a storm of
    /// unknown `kid`s costs each handshake one wait, never a fetch.
    pub async fn settle_unknown_kid(&self) {
        let mut fetched = self.fetched.subscribe();
        if !self.kid_fetch_pending.load(Ordering::Acquire) {
            return;
        }
        let _ =
            tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), fetched.changed()).await;
    }

    /// Fetch the set now, every `--jwks-refresh`, and when woken for an
    /// unknown `kid`, until `cancel`. After a failure, retries come sooner
    /// (0.5 s doubling to 30 s, to 2 s while no set has loaded, never later
    /// than the refresh).
    pub async fn run(self: Arc<Self>, metrics: Arc<Metrics>, cancel: CancellationToken) {
        let mut retry = FIRST_RETRY;
        loop {
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return,
                fetched = self.fetch() => fetched,
            };
            // Whatever came of it, a kid's fetch under way is over once the
            // set (if any) is stored below; waiters re-check after the bump.
            let done = FetchDone(&self);
            let wait = match fetched {
                Ok(set) => {
                    let first = !self.is_loaded();
                    let keys = set.keys.len();
                    *self.set.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(set));
                    metrics.jwks_fetched(true);
                    if first {
                        info!(url = %self.url_for_logs(), keys, "JWKS loaded");
                    } else {
                        debug!(keys, "JWKS fetched");
                    }
                    retry = FIRST_RETRY;
                    self.refresh
                }
                Err(error) => {
                    metrics.jwks_fetched(false);
                    warn!(
                        url = %self.url_for_logs(),
                        %error,
                        loaded = self.is_loaded(),
                        "JWKS fetch failed; the last good key set (if any) stays in force"
                    );
                    let cap = if self.is_loaded() {
                        MAX_RETRY
                    } else {
                        MAX_RETRY_UNLOADED
                    };
                    let wait = retry.min(cap).min(self.refresh);
                    retry = (retry * 2).min(MAX_RETRY);
                    wait
                }
            };
            drop(done);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(describe)?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP status {status}"));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("key set larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("key set larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        self.parse(&body)
    }

    /// Parse a JWKS document, keeping the usable signing keys.
    fn parse(&self, body: &[u8]) -> Result<KeySet, String> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let raw: RawSet = serde_json::from_slice(body)
            .map_err(|e| format!("not a JWKS document (JSON with a `keys` array): {e}"))?;
        let mut keys = Vec::new();
        for (i, value) in raw.keys.into_iter().take(MAX_KEYS).enumerate() {
            let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
            match serde_json::from_value::<Jwk>(value)
                .map_err(|e| format!("unreadable JWK: {e}"))
                .and_then(|jwk| verify_key(&jwk, &self.base))
            {
                Ok(key) => keys.push(key),
                Err(why) => debug!(index = i, kid = kid.as_deref(), %why, "JWK skipped"),
            }
        }
        if keys.is_empty() {
            return Err("the key set has no usable signing key".to_owned());
        }
        Ok(KeySet { keys })
    }
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url_for_logs())
            .field("refresh", &self.refresh)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

/// A usable verification key from a JWK, or why it is skipped.
fn verify_key(jwk: &Jwk, base: &Validation) -> Result<VerifyKey, String> {
    if let Some(usage) = &jwk.common.public_key_use {
        if *usage != PublicKeyUse::Signature {
            return Err("not a signing key (`use` is not `sig`)".to_owned());
        }
    }
    let mut algorithms: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA_ALGORITHMS.to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err(format!("unsupported EC curve {:?}", p.curve)),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err(format!("unsupported OKP curve {:?}", p.curve)),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("HMAC (`oct`) keys are never accepted from a JWKS".to_owned())
        }
    };
    if let Some(declared) = jwk.common.key_algorithm {
        // KeyAlgorithm prints as the JOSE name for every signing algorithm.
        match Algorithm::from_str(&declared.to_string()) {
            Ok(alg) if algorithms.contains(&alg) => algorithms = vec![alg],
            _ => return Err(format!("`alg` {declared} does not fit the key type")),
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unreadable key: {e}"))?;
    if let DecodingKeyKind::RsaModulusExponent { n, e } = key.kind() {
        check_rsa_components(n, e)?;
    }
    if !algorithms.iter().all(|alg| key_fits(*alg, &key)) {
        return Err("the key does not parse (point not on the curve, bad length)".to_owned());
    }
    Ok(VerifyKey::new(
        jwk.common.key_id.clone(),
        key,
        &algorithms,
        base,
    ))
}

/// An RSA key as the RSA backend will use it, 2048 to 4096 bits.
fn check_rsa_components(n: &[u8], e: &[u8]) -> Result<(), String> {
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(n),
        rsa::BigUint::from_bytes_be(e),
    )
    .map_err(|e| format!("RSA key: {e}"))?;
    let bits = key.n().bits();
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "RSA key of {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} bits are accepted"
        ));
    }
    Ok(())
}

/// The CA certificates of a PEM file.
fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("--jwks-ca-cert {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("--jwks-ca-cert {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--jwks-ca-cert {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// A fetch error with its causes (reqwest's own text is terse), without the
/// URL (the log line carries it without its query string).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwks() -> Jwks {
        super::super::ensure_crypto_provider();
        Jwks::new(
            &JwksSettings {
                url: "http://127.0.0.1:1/jwks.json".to_owned(),
                refresh: Duration::from_secs(300),
                ca_cert: None,
            },
            base(),
        )
        .unwrap()
    }

    fn base() -> Validation {
        super::super::base_validation(super::super::VerifierSettings::default())
    }

    #[test]
    fn urls_must_be_http_or_https() {
        let settings = |url: &str| JwksSettings {
            url: url.to_owned(),
            refresh: Duration::from_secs(1),
            ca_cert: None,
        };
        for bad in [
            "",
            "ftp://example.com/jwks",
            "not a url",
            "file:///etc/jwks",
        ] {
            assert!(Jwks::new(&settings(bad), base()).is_err(), "{bad}");
        }
        assert!(Jwks::new(&settings("https://idp.example/jwks"), base()).is_ok());
    }

    #[test]
    fn hmac_enc_and_broken_keys_are_skipped() {
        let j = jwks();
        let set = j
            .parse(
                br#"{"keys":[
                {"kty":"oct","k":"c2VjcmV0","kid":"h"},
                {"kty":"EC","crv":"P-256","use":"enc","kid":"e","x":"AA","y":"AA"},
                {"kty":"EC","crv":"P-256","kid":"bad","x":"AA","y":"AA"},
                {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
                {"kty":"WHAT","kid":"w"}
            ]}"#,
            )
            .unwrap();
        let kids: Vec<_> = set.keys.iter().map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, [Some("ed")]);
        assert!(set.keys[0].accepts(Algorithm::EdDSA));
        assert!(!set.keys[0].accepts(Algorithm::ES256));

        assert!(j.parse(br#"{"keys":[]}"#).is_err());
        assert!(j
            .parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#)
            .is_err());
        assert!(j.parse(b"<html>").is_err());
    }

    #[test]
    fn declared_alg_narrows_and_must_fit() {
        let j = jwks();
        let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let doc =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","alg":"ES256","x":"{x}"}}]}}"#);
        assert!(j.parse(doc.as_bytes()).is_err());
        let doc =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","x":"{x}"}}]}}"#);
        let set = j.parse(doc.as_bytes()).unwrap();
        assert_eq!(set.keys[0].kid, None);
    }

    #[test]
    fn kid_then_algorithm_pick_the_key_and_unknown_kids_ask_for_a_fetch() {
        use jsonwebtoken::{EncodingKey, Header};
        let fixture = |name: &str| {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
            std::fs::read(format!("{dir}{name}")).unwrap()
        };
        let p256 = EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap();
        let p384 = EncodingKey::from_ec_pem(&fixture("ec384_private.pem")).unwrap();
        let rsa = EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap();
        let source = JwksSettings {
            url: "http://127.0.0.1:1/jwks.json".to_owned(),
            refresh: Duration::from_secs(300),
            ca_cert: None,
        };
        let verifier =
            super::super::Verifier::jwks(&source, super::super::VerifierSettings::default())
                .unwrap();
        let sign = |alg, key: &EncodingKey, kid: Option<&str>| {
            let mut header = Header::new(alg);
            header.kid = kid.map(str::to_owned);
            let exp = super::super::unix_now() + 60;
            jsonwebtoken::encode(&header, &serde_json::json!({"sub": "a", "exp": exp}), key)
                .unwrap()
        };
        let es256 = sign(Algorithm::ES256, &p256, Some("dup"));
        let hs256 = {
            let header = Header::new(Algorithm::HS256);
            let claims = serde_json::json!({"sub": "a", "exp": 1});
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"s")).unwrap()
        };
        let e = verifier.verify(&es256).unwrap_err();
        assert!(matches!(e, AuthError::KeysNotLoaded), "{e:?}");
        let e = verifier.verify(&hs256).unwrap_err();
        assert!(matches!(e, AuthError::AlgorithmNotAllowed), "{e:?}");

        // Two keys share the kid `dup`: the token's algorithm picks one.
        let jwk = |key: &EncodingKey, alg, kid: &str| {
            let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
            jwk.common.key_id = Some(kid.to_owned());
            serde_json::to_value(jwk).unwrap()
        };
        let doc = serde_json::json!({"keys": [
            jwk(&p384, Algorithm::ES384, "dup"),
            jwk(&p256, Algorithm::ES256, "dup"),
        ]});
        let jwks = verifier.jwks_source().unwrap();
        let set = jwks.parse(doc.to_string().as_bytes()).unwrap();
        *jwks.set.write().unwrap() = Some(Arc::new(set));
        assert_eq!(verifier.verify(&es256).unwrap().sub, "a");
        let es384 = sign(Algorithm::ES384, &p384, Some("dup"));
        assert_eq!(verifier.verify(&es384).unwrap().sub, "a");
        // Another payload under the signature: tried on every key that
        // fits, and a bad signature.
        let parts: Vec<&str> = es256.split('.').collect();
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &serde_json::json!({"sub": "mallory", "exp": super::super::unix_now() + 60}),
            &p256,
        )
        .unwrap();
        let payload = other.split('.').nth(1).unwrap();
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        let e = verifier.verify(&tampered).unwrap_err();
        assert!(matches!(e, AuthError::BadSignature), "{e:?}");
        // An algorithm no key of that kid takes.
        let e = verifier
            .verify(&sign(Algorithm::RS256, &rsa, Some("dup")))
            .unwrap_err();
        assert!(matches!(e, AuthError::AlgorithmNotAllowed), "{e:?}");
        // No key without kid: unknown, and a fetch is asked for.
        assert!(jwks.last_kid_fetch.lock().unwrap().is_none());
        let e = verifier
            .verify(&sign(Algorithm::ES256, &p256, None))
            .unwrap_err();
        assert!(matches!(e, AuthError::UnknownKey), "{e:?}");
        assert!(
            jwks.last_kid_fetch.lock().unwrap().is_some(),
            "a fetch was asked for"
        );
    }

    #[test]
    fn unknown_kid_refetch_is_rate_limited() {
        let j = jwks();
        assert!(j.last_kid_fetch.lock().unwrap().is_none());
        j.request_refetch();
        let first = j.last_kid_fetch.lock().unwrap().unwrap();
        for _ in 0..1000 {
            j.request_refetch();
        }
        assert_eq!(j.last_kid_fetch.lock().unwrap().unwrap(), first);
    }
}
