//! Unit tests of token verification, grants, extraction and minting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use axum::http::HeaderValue;
use serde_json::json;

const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/rsa_public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ec_private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ec_public.pem");
const EC384_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ec384_private.pem");
const EC384_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ec384_public.pem");
const ED25519_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ed25519_private.pem");
const ED25519_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ed25519_public.pem");

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
const EC_P521_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIGbMBAGByqGSM49AgEGBSuBBAAjA4GGAAQBBvXpZ69YSiZskHXCc2fAH/GzLSsi
x9upaBuYd0AnTnDYyflfW3r7TtxrgiUE8fwkDn2fvkubGNdJhzPer8LOAd8Aibc9
DvLZ3b9cLXaCfdtGSniyP1TAWqAb8PyzbTyFpfsM3MeAhiOZMKrp8LoR52eJjo84
00UuaEJiv8LjrLq63Qs=
-----END PUBLIC KEY-----
";
const X25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VuAyEAxG+i7R4VSl6rbt8zUdN+51rXwkJ4DMNiGuVbcTMQsgk=
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
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
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
fn es384_and_eddsa_pem_keys_pick_their_algorithm() {
    let cases = [
        (
            EC384_PUBLIC,
            Algorithm::ES384,
            EncodingKey::from_ec_pem(EC384_PRIVATE).unwrap(),
        ),
        (
            ED25519_PUBLIC,
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED25519_PRIVATE).unwrap(),
        ),
    ];
    let es256 = sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
        &valid_claims(),
    );
    for (public, alg, private) in cases {
        let v = Verifier::public_key_pem(public, settings()).unwrap();
        let token = sign(alg, &private, &valid_claims());
        assert_eq!(v.verify(&token).unwrap().sub, "alice", "{alg:?}");
        // Another algorithm, another key, HMAC with the key bytes: refused.
        let e = err(v.verify(&es256));
        assert!(
            matches!(e, AuthError::AlgorithmNotAllowed),
            "{alg:?}: {e:?}"
        );
        let hs_token = hs(Algorithm::HS256, public, &valid_claims());
        let e = err(v.verify(&hs_token));
        assert!(
            matches!(e, AuthError::AlgorithmNotAllowed),
            "{alg:?}: {e:?}"
        );
        // Tampered claims.
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = sign(alg, &private, &json!({"sub": "mallory", "exp": now() + 60}));
        parts[1] = other.split('.').nth(1).unwrap();
        let e = err(v.verify(&parts.join(".")));
        assert!(matches!(e, AuthError::BadSignature), "{alg:?}: {e:?}");
    }
    // An ES384 verifier refuses an ES384 token signed by another P-384 key
    // only by signature; a P-256 key never becomes an ES384 verifier.
    let p256 = Verifier::public_key_pem(EC_PUBLIC, settings()).unwrap();
    let es384 = sign(
        Algorithm::ES384,
        &EncodingKey::from_ec_pem(EC384_PRIVATE).unwrap(),
        &valid_claims(),
    );
    assert!(matches!(
        err(p256.verify(&es384)),
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
        (EC_P521_PUBLIC.as_bytes(), "P-384"),
        (X25519_PUBLIC.as_bytes(), "unreadable"),
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
    // `wsgate token --ttl 500000000000y` fits in a u64 but is refused with
    // a clear reason; 100 years is the longest.
    let absurd = humantime::parse_duration("500000000000y").unwrap();
    let e = mint_hs256(
        SECRET,
        &MintRequest {
            ttl: absurd,
            ..req.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("at most 100 years"), "{e}");
    assert!(mint_hs256(
        SECRET,
        &MintRequest {
            ttl: MAX_MINT_TTL,
            ..req.clone()
        }
    )
    .is_ok());
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
