//! Container names: validation and Docker-style random names.

use rand::seq::IndexedRandom;

const LEFT: &[&str] = &[
    "admiring",
    "brave",
    "clever",
    "dazzling",
    "eager",
    "festive",
    "gallant",
    "happy",
    "jolly",
    "keen",
    "lucid",
    "modest",
    "nifty",
    "optimistic",
    "peaceful",
    "quirky",
    "relaxed",
    "serene",
    "trusting",
    "vibrant",
    "wizardly",
    "youthful",
    "zealous",
    "busy",
    "calm",
    "dreamy",
    "elated",
    "focused",
    "gifted",
    "hopeful",
];
const RIGHT: &[&str] = &[
    "albattani",
    "babbage",
    "curie",
    "darwin",
    "euclid",
    "fermat",
    "galileo",
    "hopper",
    "johnson",
    "knuth",
    "lovelace",
    "mccarthy",
    "noether",
    "pascal",
    "ritchie",
    "shannon",
    "thompson",
    "turing",
    "wozniak",
    "yalow",
    "archimedes",
    "bohr",
    "dijkstra",
    "einstein",
    "feynman",
    "goodall",
    "hamilton",
    "kepler",
    "lamport",
    "newton",
];

/// A random `adjective_scientist` name.
pub fn random() -> String {
    let mut rng = rand::rng();
    let l = LEFT.choose(&mut rng).copied().unwrap_or("vessel");
    let r = RIGHT.choose(&mut rng).copied().unwrap_or("container");
    format!("{l}_{r}")
}

/// Validates a user-given name (an optional leading `/` is allowed) and
/// returns it without the slash, or Docker's error message.
pub fn validate(name: &str) -> Result<String, String> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    let mut chars = bare.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {
            bare.len() >= 2
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        _ => false,
    };
    if ok {
        Ok(bare.to_string())
    } else {
        Err(format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate("/web-1").as_deref(), Ok("web-1"));
        assert_eq!(validate("a.b_c").as_deref(), Ok("a.b_c"));
        assert!(validate("-x").is_err());
        assert!(validate("a").is_err());
        assert!(validate("bad name").is_err());
        assert!(validate("").is_err());
        assert!(validate(&random()).is_ok());
    }
}
