//! Reading a JWT's `exp` without verifying it (the client only needs to know
//! when to refresh; the gateway does the verifying).

/// The `exp` claim (Unix seconds) of a JWT, or `None` when the token is not a
/// JWT with a numeric `exp`. The signature is not checked.
///
/// ```
/// // {"alg":"HS256"} . {"sub":"a","exp":1764046800} . signature
/// let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIiwiZXhwIjoxNzY0MDQ2ODAwfQ.c2ln";
/// assert_eq!(wsgate_client::jwt_exp(token), Some(1764046800));
/// assert_eq!(wsgate_client::jwt_exp("not a token"), None);
/// ```
pub fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// Base64url without padding (padding tolerated), as JWTs use it.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    }
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_base64url_of_every_length() {
        assert_eq!(base64url_decode("").unwrap(), b"");
        assert_eq!(base64url_decode("Zg").unwrap(), b"f");
        assert_eq!(base64url_decode("Zm8").unwrap(), b"fo");
        assert_eq!(base64url_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64url_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64url_decode("_-8").unwrap(), [0xff, 0xef]);
        assert!(base64url_decode("Zm9vY").is_none());
        assert!(base64url_decode("Zm9*").is_none());
    }

    #[test]
    fn reads_exp_or_nothing() {
        let make = |payload: &str| {
            let mut enc = String::new();
            // Encode with the standard table, then make it URL-safe.
            const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            for chunk in payload.as_bytes().chunks(3) {
                let mut b = [0u8; 3];
                b[..chunk.len()].copy_from_slice(chunk);
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    enc.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            format!("eyJhbGciOiJIUzI1NiJ9.{enc}.sig")
        };
        assert_eq!(jwt_exp(&make(r#"{"exp":42}"#)), Some(42));
        assert_eq!(
            jwt_exp(&make(r#"{"sub":"ü","exp":1.5e9}"#)),
            Some(1_500_000_000)
        );
        assert_eq!(jwt_exp(&make(r#"{"sub":"x"}"#)), None);
        assert_eq!(jwt_exp(&make(r#"{"exp":"soon"}"#)), None);
        assert_eq!(jwt_exp(&make("[]")), None);
        assert_eq!(jwt_exp("a"), None);
        assert_eq!(jwt_exp("a.b"), None);
    }
}
