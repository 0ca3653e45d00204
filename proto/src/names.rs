//! Names that appear in topics, tags and paths: fleets, apps, channels.
//!
//! 1 to 64 characters of `a-z 0-9 - _ .`, starting with a letter or digit. Anything else
//! could escape an MQTT topic level, a git ref or a directory, so it is refused everywhere.

pub const MAX_NAME_LEN: usize = 64;

/// A name that breaks the rule; says what was being named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} name {name:?} is not 1-{MAX_NAME_LEN} characters of a-z, 0-9, '-', '_', '.' \
     starting with a letter or digit"
)]
pub struct BadName {
    pub what: String,
    pub name: String,
}

/// Checks one name; the error names what was being named.
pub fn check(what: &str, name: &str) -> Result<(), BadName> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !first_ok || !name.chars().all(ok_char) {
        return Err(BadName {
            what: what.into(),
            name: name.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::check("app", "hello-web_1.x").is_ok());
        for bad in ["", "Hello", "-x", "a/b", "a+b", "a b", &"x".repeat(65)] {
            assert!(super::check("app", bad).is_err(), "{bad:?}");
        }
    }
}
