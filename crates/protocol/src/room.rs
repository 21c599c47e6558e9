//! Room names: 1 to 128 characters of `A-Z a-z 0-9 _ - . :`.

/// Longest room name, in characters (all allowed characters are ASCII).
pub const MAX_ROOM_LEN: usize = 128;

/// Longest idempotency key (PROTOCOL.md section 11), in characters.
pub const MAX_KEY_LEN: usize = 64;

fn is_name(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Whether `name` is a valid room name.
pub fn is_valid_room(name: &str) -> bool {
    is_name(name, MAX_ROOM_LEN)
}

/// Whether `key` is a valid idempotency key: 1 to 64 characters of
/// `A-Z a-z 0-9 _ - . :`.
pub fn is_valid_key(key: &str) -> bool {
    is_name(key, MAX_KEY_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_allowed_characters() {
        assert!(is_valid_room("lobby"));
        assert!(is_valid_room("team.42:chat_room-1"));
        assert!(is_valid_room(&"a".repeat(MAX_ROOM_LEN)));
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert!(!is_valid_room(""));
        assert!(!is_valid_room(&"a".repeat(MAX_ROOM_LEN + 1)));
        for bad in ["a b", "a/b", "é", "a*", "lobby\n", "a\"b"] {
            assert!(!is_valid_room(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_are_short_names() {
        assert!(is_valid_key("c1:retry-2.x_y"));
        assert!(is_valid_key(&"k".repeat(MAX_KEY_LEN)));
        assert!(!is_valid_key(&"k".repeat(MAX_KEY_LEN + 1)));
        assert!(!is_valid_key(""));
        assert!(!is_valid_key("a b"));
    }
}
