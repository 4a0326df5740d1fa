//! A JSON line read as text: each value the slice of the line it is, so
//! that export reads a number exactly whatever its size (as its digits,
//! never through a float) and writes a value again as it was written.
//!
//! Python's `json` writes `NaN`, `Infinity` and `-Infinity` outside strings
//! (an output of `infer` keeps them where its input had them): they are read
//! here as strings of a form no JSON writer produces (a letter escaped), so
//! that the parser takes them and [`constant`] still tells them apart.

use std::borrow::Cow;
use std::fmt;

use rustc_hash::FxHashMap;

use crate::protocol::{replace_python_constants, PYTHON_CONSTANTS};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The quoted string each of Python's constants is read as, in the order
/// of [`PYTHON_CONSTANTS`].
const QUOTED: [&str; 3] = [r#""-\u0049nfinity""#, r#""\u0049nfinity""#, r#""\u004eaN""#];

/// `text` with Python's constants outside strings quoted (see the module's
/// documentation); borrowed when it has none.
pub(super) fn quote_constants(text: &str) -> Cow<'_, str> {
    replace_python_constants(text, |constant| {
        let at = PYTHON_CONSTANTS.iter().position(|c| *c == constant);
        QUOTED[at.expect("one of the constants")]
    })
}

/// Whether a value's text is one of Python's constants, as quoted here.
pub(super) fn is_constant(raw: &str) -> bool {
    QUOTED.contains(&raw)
}

/// `raw` with Python's constants written back as Python writes them.
pub(super) fn unquote_constants(raw: &str) -> Cow<'_, str> {
    let mut text = Cow::Borrowed(raw);
    for (constant, quoted) in PYTHON_CONSTANTS.into_iter().zip(QUOTED) {
        if text.contains(quoted) {
            text = Cow::Owned(text.replace(quoted, constant));
        }
    }
    text
}

/// An object's fields in the order written; a key written twice keeps its
/// first place and its last value, as JSON parsers read it. Keys are
/// borrowed from the line where they have no escapes.
pub(super) type Fields<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// An object's key, borrowed where it can be (serde's own `Cow<str>`
/// always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        de.deserialize_str(KeyVisitor)
    }
}

/// What a value is.
pub(super) enum Value<'a> {
    Null,
    Bool,
    /// An integer or a float, as its digits.
    Number(&'a str),
    /// `NaN` or `±Infinity`.
    Constant,
    String,
    Array(Vec<&'a RawValue>),
    Object(Fields<'a>),
}

/// Reads what `raw` is; a list or object one level down (its members stay text).
pub(super) fn read(raw: &RawValue) -> Result<Value<'_>, serde_json::Error> {
    let text = raw.get();
    Ok(match text.as_bytes().first() {
        Some(b'n') => Value::Null,
        Some(b't' | b'f') => Value::Bool,
        Some(b'"') if is_constant(text) => Value::Constant,
        Some(b'"') => Value::String,
        Some(b'[') => Value::Array(serde_json::from_str(text)?),
        Some(b'{') => Value::Object(object(text)?),
        _ => Value::Number(text),
    })
}

/// The fields of the JSON object `text`; an error when it is no object.
pub(super) fn object(text: &str) -> Result<Fields<'_>, serde_json::Error> {
    let mut reader = serde_json::Deserializer::from_str(text);
    let fields = (&mut reader).deserialize_map(FieldsVisitor)?;
    reader.end()?;
    Ok(fields)
}

/// `input`'s fields with `output`'s: a field both have keeps the input's
/// place and takes the output's value.
pub(super) fn joined<'a>(input: Fields<'a>, output: Fields<'a>) -> Fields<'a> {
    let mut fields = input;
    let mut at: FxHashMap<Cow<'a, str>, usize> = fields
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.clone(), i))
        .collect();
    for (key, value) in output {
        match at.get(&key) {
            Some(&i) => fields[i].1 = value,
            None => {
                at.insert(key.clone(), fields.len());
                fields.push((key, value));
            }
        }
    }
    fields
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields: Fields<'de> = Vec::new();
        // Keys are looked up by a map only when an object has many.
        let mut at: Option<FxHashMap<Cow<'de, str>, usize>> = None;
        while let Some((Key(key), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
            if fields.len() == 16 && at.is_none() {
                at = Some(
                    fields
                        .iter()
                        .enumerate()
                        .map(|(i, (k, _))| (k.clone(), i))
                        .collect(),
                );
            }
            let seen = match &at {
                Some(at) => at.get(&key).copied(),
                None => fields.iter().position(|(k, _)| *k == key),
            };
            match seen {
                Some(i) => fields[i].1 = value,
                None => {
                    if let Some(at) = &mut at {
                        at.insert(key.clone(), fields.len());
                    }
                    fields.push((key, value));
                }
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_outside_strings_are_quoted_and_written_back() {
        let line = r#"{"a": NaN, "b": [Infinity, -Infinity], "c": "NaN and -Infinity", "d": -1}"#;
        let quoted = quote_constants(line);
        let fields = object(&quoted).unwrap();
        let kinds: Vec<_> = fields.iter().map(|(_, v)| is_constant(v.get())).collect();
        assert_eq!(kinds, [true, false, false, false]);
        assert_eq!(unquote_constants(&quoted), line);
        assert!(matches!(quote_constants(r#"{"a": 1}"#), Cow::Borrowed(_)));
    }

    #[test]
    fn a_key_written_twice_keeps_its_place_and_its_last_value() {
        let many: String = (0..40).map(|i| format!(r#""k{i}": {i}, "#)).collect();
        for text in [
            r#"{"a": 1, "b": 2, "a": 3}"#.to_string(),
            format!(r#"{{"a": 1, "b": 2, {many}"a": 3}}"#),
        ] {
            let fields = object(&text).unwrap();
            assert_eq!(fields[0].0, "a");
            assert_eq!(fields[0].1.get(), "3");
            assert_eq!(fields.iter().filter(|(k, _)| k == "a").count(), 1);
        }
    }

    #[test]
    fn a_join_keeps_the_inputs_order_and_the_outputs_values() {
        let (input, output) = (
            r#"{"id": 1, "answer": "old"}"#,
            r#"{"answer": "new", "score": 0.5}"#,
        );
        let fields = joined(object(input).unwrap(), object(output).unwrap());
        let text: Vec<_> = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", v.get()))
            .collect();
        assert_eq!(text, ["id=1", r#"answer="new""#, "score=0.5"]);
    }

    #[test]
    fn numbers_are_read_as_their_digits() {
        let text = r#"{"a": 18446744073709551615, "b": 100000000000000000000000000001, "c": 90.33333333333333}"#;
        let digits: Vec<_> = object(text)
            .unwrap()
            .into_iter()
            .map(|(_, v)| match read(v).unwrap() {
                Value::Number(n) => n.to_string(),
                _ => panic!("not a number"),
            })
            .collect();
        assert_eq!(
            digits,
            [
                "18446744073709551615",
                "100000000000000000000000000001",
                "90.33333333333333"
            ]
        );
    }
}
