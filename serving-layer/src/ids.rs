//! Identifiers that arrive from outside (URL paths, imported files).
//!
//! User and product ids are checked once, here, against the shape the shop
//! uses (`u-1042`, `p-317`, e-mail-like or namespaced ids): at most
//! [`MAX_ID_BYTES`] bytes of `[A-Za-z0-9._:@-]`. Anything else is refused at
//! the edge with a message naming the rule, so a bad id never reaches SQL
//! and never turns into a server error.

/// Longest accepted id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Why a string is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long; at most {MAX_ID_BYTES} are allowed")]
    TooLong(usize),
    #[error("may contain only letters, digits and . _ : @ -")]
    Characters,
}

/// Checks that `raw` is an id (see the module docs).
pub fn check(raw: &str) -> Result<(), InvalidId> {
    if raw.is_empty() {
        return Err(InvalidId::Empty);
    }
    if raw.len() > MAX_ID_BYTES {
        return Err(InvalidId::TooLong(raw.len()));
    }
    if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')) {
        return Err(InvalidId::Characters);
    }
    Ok(())
}

/// A user id that passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        check(raw)?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shop_ids_pass() {
        for id in ["u-1042", "p-317", "a.b_c:d@e-f", "U9", &"x".repeat(MAX_ID_BYTES)] {
            assert_eq!(check(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn bad_ids_are_refused_with_the_rule() {
        assert_eq!(check(""), Err(InvalidId::Empty));
        assert_eq!(check(&"x".repeat(MAX_ID_BYTES + 1)), Err(InvalidId::TooLong(129)));
        for id in ["u 1", "u/1", "u'1", "u\n1", "ü", "u%201", "u;drop"] {
            assert_eq!(check(id), Err(InvalidId::Characters), "{id:?}");
        }
    }
}
