//! Identifiers that arrive from outside (URL paths, query parameters,
//! imported files), checked once at the edge by the platform's one rule
//! ([`shared_schema::ids`]: 1 to 128 bytes of UTF-8 without control
//! characters), the rule the event contract applies too, so every user the
//! lake holds can be served. A bad id gets a message naming the rule and
//! never reaches SQL (where ids are only ever bound parameters).

pub use shared_schema::ids::{InvalidId, MAX_ID_BYTES, check};

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
    fn every_id_the_event_contract_accepts_is_a_user_id() {
        for id in ["u-1042", "u-Zoë-東京-🛒", "u 1", "u'; DROP TABLE x", &"x".repeat(MAX_ID_BYTES)] {
            assert_eq!(UserId::parse(id).map(|u| u.as_str().to_owned()), Ok(id.to_owned()), "{id}");
        }
        assert_eq!(UserId::parse("u\n1"), Err(InvalidId::Control));
        assert_eq!(UserId::parse(""), Err(InvalidId::Empty));
    }
}
