//! Strict JSON: serde_json keeps the last of two equal keys in one object, silently dropping the
//! first. Files sbgen reads (the tuning cache, safetensors headers) are walked once with
//! [`check_no_duplicate_keys`] first, so such a file is refused instead of half read.

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::fmt;

/// Checks that no object in the JSON document `bytes` has a key twice; a syntax error is reported
/// as serde_json words it. Nothing else is checked.
pub fn check_no_duplicate_keys(bytes: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<NoDuplicateKeys>(bytes).map(|_| ())
}

/// Any JSON value whose objects have distinct keys; deserializes to nothing.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Walk)
    }
}

struct Walk;

impl<'de> Visitor<'de> for Walk {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: Error>(self, _: bool) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }

    fn visit_i64<E: Error>(self, _: i64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }

    fn visit_u64<E: Error>(self, _: u64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }

    fn visit_f64<E: Error>(self, _: f64) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }

    fn visit_str<E: Error>(self, _: &str) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }

    fn visit_unit<E: Error>(self) -> Result<NoDuplicateKeys, E> {
        Ok(NoDuplicateKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NoDuplicateKeys, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoDuplicateKeys, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(A::Error::custom(format!("the key `{}` appears twice in one object", key.escape_debug())));
            }
            map.next_value::<NoDuplicateKeys>()?;
            seen.insert(key);
        }
        Ok(NoDuplicateKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_at_any_depth_is_refused_naming_it() {
        for text in [
            r#"{"version": 1, "version": 1}"#,
            r#"{"entries": [], "entries": []}"#,
            r#"{"entries": [{"a": 1, "b": {"c": null, "c": [true]}}]}"#,
            r#"{"a": 1, "\u0061": 2}"#,
        ] {
            let err = check_no_duplicate_keys(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains("appears twice"), "{text}: {err}");
        }
        let ok = r#"{"a": [1, -2, 3.5, "x", null, false, {"a": 1}], "b": {"a": {}}}"#;
        check_no_duplicate_keys(ok.as_bytes()).unwrap();
        assert!(check_no_duplicate_keys(b"{\"a\": ").is_err());
    }
}
