//! Plain paths: a jq filter made of field names and indices only
//! (`.messages[0].content`, `.doc_id`, `."a b"`, `.["k"][2]`), followed
//! through a line's text by serde_json without building the line's value.
//!
//! `--group-by` evaluates its filter on every line the server reads ahead,
//! under the ledger's lock; jaq builds the whole line's value first, which
//! cost more than the rest of handing the line out. A plain path needs none
//! of it: every value beside the path is skipped as it is read (checked,
//! not kept), and the selected string is borrowed from the line where it
//! has no escapes.
//!
//! Only what jq would answer the same way is answered here: a string, or
//! `null` for a missing field, an index past the end or a `null` on the
//! way. Anything else (a number or an object selected, a step on a value of
//! the wrong type, a line serde_json does not read, such as `NaN`, or one
//! nested too deep) is [`Selected::AskJq`]: the caller runs the filter
//! itself, so both ways give the same key for every line.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a plain path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// `.name`, `."name"`, `.["name"]`.
    Field(String),
    /// `.[n]`, `[n]`.
    Index(usize),
}

/// A jq filter that is a plain path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<Step>);

/// What a plain path selects in a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Selected<'a> {
    /// A string (unescaped).
    Str(Cow<'a, str>),
    /// `null`: the value is `null`, or a field is missing, or an index is
    /// past the end, or a value on the way is `null`.
    Null,
    /// Something jq must answer (see the module docs).
    AskJq,
}

impl Path {
    /// `code` as a plain path, or `None` when it is any other filter
    /// (spaces, pipes, `?`, negative indices, string escapes included).
    pub fn parse(code: &str) -> Option<Path> {
        let mut rest = code.trim();
        let mut steps = Vec::new();
        if rest == "." {
            return Some(Path(steps));
        }
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                rest = after;
                if let Some((name, after)) = identifier(rest).or_else(|| quoted(rest)) {
                    steps.push(Step::Field(name));
                    rest = after;
                    continue;
                }
            }
            let inner = rest.strip_prefix('[')?;
            let (step, after) = match quoted(inner) {
                Some((name, after)) => (Step::Field(name), after),
                None => {
                    let digits = inner.bytes().take_while(u8::is_ascii_digit).count();
                    let index = inner[..digits].parse().ok()?;
                    (Step::Index(index), &inner[digits..])
                }
            };
            rest = after.strip_prefix(']')?;
            steps.push(step);
        }
        (!steps.is_empty()).then_some(Path(steps))
    }

    /// What the path selects in the JSON `line`.
    pub fn select<'a>(&self, line: &'a str) -> Selected<'a> {
        let mut de = serde_json::Deserializer::from_str(line);
        match Follow(&self.0).deserialize(&mut de) {
            Ok(found) if de.end().is_ok() => found,
            _ => Selected::AskJq,
        }
    }
}

/// A jq identifier at the start of `s` (letters, digits and `_`, not
/// starting with a digit), and what follows it.
fn identifier(s: &str) -> Option<(String, &str)> {
    let len = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let first = s.as_bytes().first()?;
    (len > 0 && !first.is_ascii_digit()).then(|| (s[..len].to_owned(), &s[len..]))
}

/// A double-quoted string without escapes at the start of `s` (jq's
/// escapes and interpolation are left to jq), and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let inner = s.strip_prefix('"')?;
    let end = inner.find(['"', '\\'])?;
    (inner.as_bytes()[end] == b'"').then(|| (inner[..end].to_owned(), &inner[end + 1..]))
}

/// Follows the steps left through the value being read.
struct Follow<'p>(&'p [Step]);

impl<'de, 'p> DeserializeSeed<'de> for Follow<'p> {
    type Value = Selected<'de>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Selected<'de>, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de, 'p> Visitor<'de> for Follow<'p> {
    type Value = Selected<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Selected<'de>, E> {
        Ok(self.leaf(|| Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Selected<'de>, E> {
        Ok(self.leaf(|| Cow::Owned(s.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Selected<'de>, E> {
        Ok(Selected::Null)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Selected<'de>, E> {
        Ok(Selected::AskJq)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Selected<'de>, E> {
        Ok(Selected::AskJq)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Selected<'de>, E> {
        Ok(Selected::AskJq)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Selected<'de>, E> {
        Ok(Selected::AskJq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Selected<'de>, A::Error> {
        let Some((Step::Field(name), rest)) = self.0.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Selected::AskJq);
        };
        // A missing field is null; of fields named twice, the last counts
        // (as jq reads them).
        let mut found = Selected::Null;
        while let Some(is_it) = map.next_key_seed(KeyIs(name))? {
            if is_it {
                found = map.next_value_seed(Follow(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Selected<'de>, A::Error> {
        let Some((&Step::Index(index), rest)) = self.0.split_first() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Selected::AskJq);
        };
        let mut found = Selected::Null;
        let mut at = 0;
        loop {
            if at == index {
                match seq.next_element_seed(Follow(rest))? {
                    Some(selected) => found = selected,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            at += 1;
        }
        Ok(found)
    }
}

impl Follow<'_> {
    /// A string read: selected when no steps are left.
    fn leaf<'de>(&self, s: impl FnOnce() -> Cow<'de, str>) -> Selected<'de> {
        if self.0.is_empty() {
            Selected::Str(s())
        } else {
            Selected::AskJq
        }
    }
}

/// Reads an object's key and tells whether it is the one wanted, without
/// keeping it.
struct KeyIs<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(code: &str) -> Path {
        Path::parse(code).unwrap_or_else(|| panic!("{code} is a plain path"))
    }

    #[test]
    fn plain_paths_are_field_names_and_indices_only() {
        let field = |s: &str| Step::Field(s.into());
        assert_eq!(path(".").0, vec![]);
        assert_eq!(path(" .doc_id ").0, vec![field("doc_id")]);
        assert_eq!(
            path(".messages[0].content").0,
            vec![field("messages"), Step::Index(0), field("content")]
        );
        assert_eq!(
            path(r#"."a b".["c"][12].[3]"#).0,
            vec![field("a b"), field("c"), Step::Index(12), Step::Index(3)]
        );
        for other in [
            "",
            "..",
            ".a | .b",
            ".a?",
            ".[-1]",
            ".a[]",
            ".[1:2]",
            r#"."a\"b""#,
            r#"."\(.x)""#,
            ".1a",
            ".a .b",
            "length",
            ".a.",
            "[.a]",
        ] {
            assert_eq!(Path::parse(other), None, "{other:?} is not plain");
        }
    }

    #[test]
    fn strings_and_nulls_are_selected_the_rest_is_left_to_jq() {
        let s = |v: &str| Selected::Str(Cow::Owned(v.into()));
        let line = r#"{"messages": [{"role": "system", "content": "Be \"terse\"."}, {"content": "q"}], "n": 7, "o": {}}"#;
        assert_eq!(
            path(".messages[0].content").select(line),
            s("Be \"terse\".")
        );
        assert_eq!(path(".messages[1].content").select(line), s("q"));
        assert!(matches!(
            path(".messages[1].content").select(line),
            Selected::Str(Cow::Borrowed("q"))
        ));
        // Missing field, index past the end, null on the way.
        assert_eq!(path(".missing").select(line), Selected::Null);
        assert_eq!(path(".messages[5].content").select(line), Selected::Null);
        assert_eq!(path(".missing.deeper[3]").select(line), Selected::Null);
        // A number or an object, a step on the wrong type, a bad line.
        assert_eq!(path(".n").select(line), Selected::AskJq);
        assert_eq!(path(".o").select(line), Selected::AskJq);
        assert_eq!(path(".messages.role").select(line), Selected::AskJq);
        assert_eq!(path(".n[0]").select(line), Selected::AskJq);
        assert_eq!(path(".a").select(r#"{"a": "x"} trailing"#), Selected::AskJq);
        assert_eq!(path(".a").select(r#"{"a": NaN}"#), Selected::AskJq);
        assert_eq!(path(".a").select(""), Selected::AskJq);
        // The last of a field named twice.
        assert_eq!(path(".a").select(r#"{"a": "1", "a": "2"}"#), s("2"));
    }
}
