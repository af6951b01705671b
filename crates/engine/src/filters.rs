//! Pieces of Docker's list and prune filters that several object kinds
//! share: labels (`label=key[=value]`, `label!=…`) and `until`.

/// Whether an object whose labels `value_of` looks up passes one
/// `label` filter value: `key` (the label is there) or `key=value`.
pub fn label_matches<'a>(filter: &str, value_of: impl Fn(&str) -> Option<&'a String>) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => value_of(k).is_some_and(|x| x == v),
        None => value_of(filter).is_some(),
    }
}

/// Whether an object created at `created` (RFC 3339) passes an `until`
/// filter (unix seconds): created before it. A time that does not parse
/// never passes.
pub(crate) fn created_before(created: &str, until: Option<i64>) -> bool {
    until.is_none_or(|u| {
        chrono::DateTime::parse_from_rfc3339(created)
            .map(|c| c.timestamp() < u)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn labels_match_by_key_or_key_and_value() {
        let labels = HashMap::from([("team".to_string(), "a".to_string())]);
        let get = |k: &str| labels.get(k);
        assert!(label_matches("team", get));
        assert!(label_matches("team=a", get));
        assert!(!label_matches("team=b", get));
        assert!(!label_matches("other", get));
    }

    #[test]
    fn until_keeps_what_was_created_before() {
        assert!(created_before("2026-01-01T00:00:00Z", None));
        assert!(created_before("2026-01-01T00:00:00Z", Some(1_767_225_601)));
        assert!(!created_before("2026-01-01T00:00:00Z", Some(1_767_225_600)));
        assert!(!created_before("garbage", Some(i64::MAX)));
    }
}
