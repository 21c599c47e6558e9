//! Tokens: the test secret, HS256 tokens for it, and hand-made JWTs (any
//! algorithm, unsigned) for the verifier's tests.

use std::time::Duration;

/// The HMAC secret every test node uses.
pub const SECRET: &str = "wsgate-test-secret";

/// A token for `sub` with these grants, valid for `ttl`.
pub fn token(sub: &str, rooms: &[&str], publish: &[&str], ttl: Duration) -> String {
    let rooms: Vec<String> = rooms.iter().map(|s| s.to_string()).collect();
    let publish: Vec<String> = publish.iter().map(|s| s.to_string()).collect();
    wsgate::auth::mint_hs256(
        SECRET.as_bytes(),
        &wsgate::auth::MintRequest {
            sub,
            rooms: &rooms,
            publish: &publish,
            ttl,
            issuer: None,
            audience: None,
        },
    )
    .unwrap()
}

/// A token that may join and publish to every room for an hour.
pub fn any_token(sub: &str) -> String {
    token(sub, &["*"], &["*"], Duration::from_secs(3600))
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub` that may join and publish everywhere, issued now,
/// valid for an hour; edit the returned object to make a bad token.
pub fn claims(sub: &str) -> serde_json::Value {
    let now = now_secs();
    serde_json::json!({
        "sub": sub,
        "iat": now,
        "exp": now + 3600,
        "rooms": ["*"],
        "publish": ["*"],
    })
}

/// Sign `claims` as a compact JWT with `alg` (`"HS256"`, `"RS256"`,
/// `"ES256"`, ...): `key` is the HMAC secret for HS*, else a PEM private key.
pub fn sign(alg: &str, key: &[u8], claims: &serde_json::Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let alg: Algorithm = alg.parse().unwrap();
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(key),
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            EncodingKey::from_rsa_pem(key).unwrap()
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key).unwrap(),
        other => panic!("sign: unsupported algorithm {other:?}"),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
}

/// Sign `claims` with HS256 and the test secret.
pub fn sign_hs256(claims: &serde_json::Value) -> String {
    sign("HS256", SECRET.as_bytes(), claims)
}

/// An unsigned token (`alg: none`, empty signature).
pub fn unsigned(claims: &serde_json::Value) -> String {
    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}
