//! Room names: 1 to 128 characters of `A-Z a-z 0-9 _ - . :`.

/// Longest room name, in characters (all allowed characters are ASCII).
pub const MAX_ROOM_LEN: usize = 128;

/// Whether `name` is a valid room name.
pub fn is_valid_room(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROOM_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
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
}
