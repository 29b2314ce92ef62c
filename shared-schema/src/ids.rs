//! The one rule for identifiers (user, product, session and event ids),
//! applied alike by the event contract, the serving API, the model import
//! and the dashboard: **1 to 128 bytes of UTF-8 without control
//! characters**. Unicode and spaces are fine (`u-Zoë-東京`, `Home & Garden`),
//! so every user the lake holds can be served: a URL path carries the id
//! percent-encoded (`/api/recommendations/u-Zo%C3%AB`). Anything else is
//! refused at the door with the reason: a bad record goes to the DLQ, a bad
//! request gets a 400, a bad model row stops the import. Ids only ever reach
//! SQL as bound parameters.

/// Longest identifier, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Why a string is not an identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidId {
    Empty,
    TooLong(usize),
    Control,
}

impl std::fmt::Display for InvalidId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "is empty"),
            Self::TooLong(n) => write!(f, "is {n} bytes long; at most {MAX_ID_BYTES} are allowed"),
            Self::Control => write!(f, "holds control characters"),
        }
    }
}

impl std::error::Error for InvalidId {}

/// Checks `s` against the rule (see the module docs).
pub fn check(s: &str) -> Result<(), InvalidId> {
    if s.is_empty() {
        return Err(InvalidId::Empty);
    }
    if s.len() > MAX_ID_BYTES {
        return Err(InvalidId::TooLong(s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err(InvalidId::Control);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_shops_send_passes() {
        for id in
            ["u-1042", "p-317", "a.b_c:d@e-f", "u-Zoë-東京-🛒", "u 1", "u/1", "u'; DROP TABLE x", &"x".repeat(128)]
        {
            assert_eq!(check(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn the_rest_is_refused_with_the_reason() {
        assert_eq!(check(""), Err(InvalidId::Empty));
        assert_eq!(check(&"x".repeat(129)), Err(InvalidId::TooLong(129)));
        // 43 four-byte characters: 172 bytes, though only 43 characters.
        assert_eq!(check(&"🛒".repeat(43)), Err(InvalidId::TooLong(172)));
        for id in ["u\n1", "u\t1", "u\u{7f}", "u\u{85}", "\u{0}"] {
            assert_eq!(check(id), Err(InvalidId::Control), "{id:?}");
        }
    }
}
