//! The columns of an export: a type for every field, learnt from every
//! line, that holds each of its values exactly.
//!
//! - A field missing from a line, or `null` there, is null in its row.
//! - Integers make an `int64` column; past `int64`, a `uint64` one when none
//!   is negative, else a `decimal128(38, 0)`; floats (and `NaN`, `±Infinity`)
//!   a `double` one, integers among them included while a double holds them
//!   (to 2^53). Numbers no column type holds exactly (integers of over 38
//!   digits, or beyond 2^53 among floats) make a string column of their digits.
//! - Scalars of different kinds in one field (a number here, a string there)
//!   make a string column: strings as they are, others as their JSON text.
//! - A field that is an object in some lines and a list or scalar in others,
//!   an object with over [`MAX_FIELDS`] distinct keys across lines (a map,
//!   as a column each key would be a table of thousands of columns), values
//!   nested deeper than [`MAX_DEPTH`], and a failure record's `task_data`
//!   make a string column of each value's JSON text (`json.loads` reads it).

use std::fmt::Write as _;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use rustc_hash::FxHashMap;
use serde_json::value::RawValue;

use super::raw::{self, Value};

/// Distinct keys an object field may have across lines and be a struct column.
pub const MAX_FIELDS: usize = 1000;
/// Columns a table may have: lines with more distinct fields (keyed by an
/// id, say) are refused, as no reader wants such a table and writing it
/// takes gigabytes.
pub const MAX_COLUMNS: usize = 10_000;
/// Depth (objects and lists) below which values are columns; deeper ones
/// are JSON text.
pub const MAX_DEPTH: usize = 32;

/// The type learnt for one field.
#[derive(Debug, Clone, Default)]
enum Kind {
    #[default]
    Null,
    Bool,
    Number(Numbers),
    String,
    /// Scalars of different kinds.
    Scalars,
    List(Box<Kind>),
    Object(Fields),
    /// Each value's JSON text.
    Json(Why),
}

/// Why a field is written as JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// An object in some lines, another type in others.
    Mixed,
    /// An object with more distinct keys than [`MAX_FIELDS`].
    ManyKeys,
    /// Nested deeper than [`MAX_DEPTH`].
    Deep,
    /// A failure record's `task_data`: an object, or the line's text when
    /// it was not JSON.
    Record,
}

/// The numbers seen in a field.
#[derive(Debug, Clone, Copy, Default)]
struct Numbers {
    /// The least and greatest integer.
    ints: Option<(i128, i128)>,
    /// An integer beyond `i128`.
    huge: bool,
    /// A float, `NaN` or `±Infinity`.
    floats: bool,
}

/// An object's fields, in the order first seen.
#[derive(Debug, Clone, Default)]
struct Fields {
    names: Vec<String>,
    kinds: Vec<Kind>,
    at: FxHashMap<String, usize>,
    /// Whether a value below must be rewritten for the decoder (see
    /// [`Columns::write_line`]); set by [`Kind::finish`].
    rewrite: bool,
}

/// Where a value is, as far as its type depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Root,
    /// The failure record of a line (its `__ERROR__`).
    Record,
    /// The record's `task_data`.
    TaskData,
    Other,
}

impl Place {
    fn of_field(self, key: &str) -> Place {
        match (self, key) {
            (Place::Root, crate::record::ERROR_KEY) => Place::Record,
            (Place::Record, "task_data") => Place::TaskData,
            _ => Place::Other,
        }
    }
}

/// The columns learnt from the lines seen so far.
#[derive(Debug, Default)]
pub struct Columns {
    root: Fields,
}

impl Columns {
    /// Learns from one line's fields; the error says why the line does
    /// not fit a table.
    pub fn observe(&mut self, fields: &raw::Fields<'_>) -> Result<(), String> {
        match self.root.observe(fields, 0, Place::Root) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "brings the output's distinct top-level fields past {MAX_COLUMNS}: a table of that many columns is not a dataset. Put fields that vary from line to line under one field (an object), which export writes as JSON text"
            )),
            Err(e) => Err(format!("is not JSON ({e})")),
        }
    }

    /// The Arrow schema of the columns, and a note for each field written
    /// in a form users may not expect (JSON text for a map, digits as text).
    pub fn schema(&mut self) -> (Schema, Vec<String>) {
        let mut root = Kind::Object(std::mem::take(&mut self.root));
        root.finish();
        let Kind::Object(fields) = root else {
            unreachable!("the root stays an object")
        };
        self.root = fields;
        let mut notes = Vec::new();
        let schema = Schema::new(
            self.root
                .names
                .iter()
                .zip(&self.root.kinds)
                .map(|(name, kind)| kind.field(name, name, &mut notes))
                .collect::<Vec<_>>(),
        );
        (schema, notes)
    }

    /// Learns what `later` learnt from the lines after these (two parts
    /// of a file, learnt apart): the columns are then those of every line
    /// in order. `false` when that cannot be told from the two alone (a
    /// field the later part made JSON text, a table or object pushed past
    /// its most fields): learn the lines in order then.
    pub fn merge(&mut self, later: Columns) -> bool {
        self.root.merge(later.root, Place::Root)
    }

    /// Whether a line may go to the decoder as it is: no value of it must
    /// become text (call after [`Columns::schema`]).
    pub fn reads_lines_as_they_are(&self) -> bool {
        !self.root.rewrite
    }

    /// Writes a line's fields as the decoder reads them into the schema:
    /// each value whose column is JSON text as a string of its text, every
    /// other value as it was written.
    pub fn write_line(&self, fields: &raw::Fields<'_>, out: &mut Vec<u8>) {
        self.root.write(fields, out);
    }
}

impl Fields {
    /// Learns from an object's fields; `false` when it has grown past
    /// [`MAX_FIELDS`].
    fn observe(
        &mut self,
        fields: &raw::Fields<'_>,
        depth: usize,
        place: Place,
    ) -> Result<bool, serde_json::Error> {
        for (at, (key, value)) in fields.iter().enumerate() {
            let Some(i) = self.slot(key, place, at) else {
                return Ok(false);
            };
            self.kinds[i].observe(value, depth + 1, place.of_field(key))?;
        }
        Ok(true)
    }

    /// Where field `name` is, added (null so far) when it is new; `None`
    /// when it is new and the object has its most fields already
    /// ([`MAX_FIELDS`], or [`MAX_COLUMNS`] at the root). `guess` is where
    /// it is likely (its place in its line: lines mostly list their fields
    /// in one order), tried before the names' map.
    fn slot(&mut self, name: &str, place: Place, guess: usize) -> Option<usize> {
        if self.names.get(guess).is_some_and(|known| known == name) {
            return Some(guess);
        }
        if let Some(&i) = self.at.get(name) {
            return Some(i);
        }
        let most = if place == Place::Root {
            MAX_COLUMNS
        } else {
            MAX_FIELDS
        };
        if self.names.len() == most {
            return None;
        }
        self.at.insert(name.to_owned(), self.names.len());
        self.names.push(name.to_owned());
        self.kinds.push(Kind::Null);
        Some(self.names.len() - 1)
    }

    /// See [`Columns::merge`].
    fn merge(&mut self, later: Fields, place: Place) -> bool {
        for (at, (name, kind)) in later.names.into_iter().zip(later.kinds).enumerate() {
            let Some(i) = self.slot(&name, place, at) else {
                return false;
            };
            if !self.kinds[i].merge(kind) {
                return false;
            }
        }
        true
    }

    fn write(&self, fields: &raw::Fields<'_>, out: &mut Vec<u8>) {
        out.push(b'{');
        for (n, (key, value)) in fields.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, key).expect("a string serializes into a Vec");
            out.push(b':');
            match self.at.get(&**key) {
                Some(&i) => self.kinds[i].write(value, out),
                None => out.extend_from_slice(value.get().as_bytes()),
            }
        }
        out.push(b'}');
    }
}

impl Kind {
    fn observe(
        &mut self,
        value: &RawValue,
        depth: usize,
        place: Place,
    ) -> Result<(), serde_json::Error> {
        // Nothing to learn: the field is JSON text already, or the value null.
        // (Checked before the value is read a level down.)
        if matches!(self, Kind::Json(_)) || value.get() == "null" {
            return Ok(());
        }
        if place == Place::TaskData {
            *self = Kind::Json(Why::Record);
            return Ok(());
        }
        if depth > MAX_DEPTH {
            *self = Kind::Json(Why::Deep);
            return Ok(());
        }
        match raw::read(value)? {
            Value::Null => {}
            Value::Bool => self.scalar(Kind::Bool),
            Value::String => self.scalar(Kind::String),
            Value::Constant => self.number(Numbers {
                floats: true,
                ..Numbers::default()
            }),
            Value::Number(digits) => self.number(Numbers::of(digits)),
            Value::Array(items) => {
                match self {
                    Kind::Null => *self = Kind::List(Box::default()),
                    Kind::List(_) => {}
                    _ => {
                        *self = Kind::Json(Why::Mixed);
                        return Ok(());
                    }
                }
                let Kind::List(item) = self else {
                    unreachable!("a list above")
                };
                for value in items {
                    item.observe(value, depth + 1, Place::Other)?;
                }
            }
            Value::Object(fields) => {
                match self {
                    Kind::Null => *self = Kind::Object(Fields::default()),
                    Kind::Object(_) => {}
                    _ => {
                        *self = Kind::Json(Why::Mixed);
                        return Ok(());
                    }
                }
                let Kind::Object(known) = self else {
                    unreachable!("an object above")
                };
                if !known.observe(&fields, depth, place)? {
                    *self = Kind::Json(Why::ManyKeys);
                }
            }
        }
        Ok(())
    }

    /// Meets the kind the later part of the lines gave the same field
    /// (see [`Columns::merge`]): what meeting its values would make of it.
    fn merge(&mut self, later: Kind) -> bool {
        *self = match (std::mem::take(self), later) {
            (kind, Kind::Null) | (Kind::Null, kind) => kind,
            (Kind::Json(why), _) => Kind::Json(why),
            // Which of its values made it text, and why, depends on what
            // came before them.
            (_, Kind::Json(_)) => return false,
            (Kind::List(mut item), Kind::List(later)) => {
                if !item.merge(*later) {
                    return false;
                }
                Kind::List(item)
            }
            (Kind::Object(mut fields), Kind::Object(later)) => {
                if !fields.merge(later, Place::Other) {
                    return false;
                }
                Kind::Object(fields)
            }
            (Kind::Number(numbers), Kind::Number(later)) => Kind::Number(numbers.with(later)),
            (mut kind @ (Kind::Bool | Kind::String | Kind::Scalars | Kind::Number(_)), later) => {
                match later {
                    Kind::Number(numbers) => kind.number(numbers),
                    later @ (Kind::Bool | Kind::String | Kind::Scalars) => kind.scalar(later),
                    _ => kind = Kind::Json(Why::Mixed),
                }
                kind
            }
            // A list or an object, and another type.
            _ => Kind::Json(Why::Mixed),
        };
        true
    }

    /// Meets a scalar of kind `kind` (not a number).
    fn scalar(&mut self, kind: Kind) {
        *self = match (std::mem::take(self), kind) {
            (Kind::Null, kind) => kind,
            (Kind::Bool, Kind::Bool) => Kind::Bool,
            (Kind::String, Kind::String) => Kind::String,
            (Kind::Bool | Kind::String | Kind::Number(_) | Kind::Scalars, _) => Kind::Scalars,
            _ => Kind::Json(Why::Mixed),
        }
    }

    /// Meets numbers.
    fn number(&mut self, seen: Numbers) {
        *self = match std::mem::take(self) {
            Kind::Null => Kind::Number(seen),
            Kind::Number(numbers) => Kind::Number(numbers.with(seen)),
            Kind::Bool | Kind::String | Kind::Scalars => Kind::Scalars,
            _ => Kind::Json(Why::Mixed),
        }
    }

    /// Whether a value of this kind, or one below it, is rewritten.
    fn rewrites(&self) -> bool {
        match self {
            Kind::Json(_) => true,
            Kind::List(item) => item.rewrites(),
            Kind::Object(fields) => fields.rewrite,
            _ => false,
        }
    }

    /// Marks where lines must be rewritten.
    fn finish(&mut self) {
        match self {
            Kind::List(item) => item.finish(),
            Kind::Object(fields) => {
                fields.kinds.iter_mut().for_each(Kind::finish);
                fields.rewrite = fields.kinds.iter().any(Kind::rewrites);
            }
            _ => {}
        }
    }

    /// The column of a field of this kind named `name`, at `path`.
    fn field(&self, name: &str, path: &str, notes: &mut Vec<String>) -> Field {
        Field::new(name, self.data_type(path, notes), true)
    }

    fn data_type(&self, path: &str, notes: &mut Vec<String>) -> DataType {
        match self {
            Kind::Null => DataType::Null,
            Kind::Bool => DataType::Boolean,
            Kind::String | Kind::Scalars => DataType::Utf8,
            Kind::Number(numbers) => numbers.data_type().unwrap_or_else(|why| {
                notes.push(format!(
                    "field {path:?}: {why}; written as a string of its digits"
                ));
                DataType::Utf8
            }),
            Kind::List(item) => {
                DataType::List(Arc::new(item.field("item", &format!("{path}[]"), notes)))
            }
            Kind::Object(fields) => DataType::Struct(
                fields
                    .names
                    .iter()
                    .zip(&fields.kinds)
                    .map(|(name, kind)| kind.field(name, &format!("{path}.{name}"), notes))
                    .collect(),
            ),
            Kind::Json(why) => {
                let mut note = format!("field {path:?}: ");
                match why {
                    Why::Mixed => {
                        note.push_str("an object or list in some lines, another type in others")
                    }
                    Why::ManyKeys => {
                        let _ = write!(note, "objects with over {MAX_FIELDS} distinct keys");
                    }
                    Why::Deep | Why::Record => note.clear(),
                }
                if !note.is_empty() {
                    notes.push(note + "; written as a string of each value's JSON text");
                }
                DataType::Utf8
            }
        }
    }

    /// Writes a value of this field as the decoder reads it.
    fn write(&self, value: &RawValue, out: &mut Vec<u8>) {
        let text = value.get();
        match self {
            Kind::Json(_) if text != "null" => {
                serde_json::to_writer(&mut *out, &*raw::unquote_constants(text))
                    .expect("a string serializes into a Vec");
            }
            Kind::Object(fields) if fields.rewrite && text.starts_with('{') => {
                let inner = raw::object(text).expect("read whole before");
                fields.write(&inner, out);
            }
            Kind::List(item) if item.rewrites() && text.starts_with('[') => {
                let items: Vec<&RawValue> = serde_json::from_str(text).expect("read whole before");
                out.push(b'[');
                for (n, value) in items.into_iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    item.write(value, out);
                }
                out.push(b']');
            }
            _ => out.extend_from_slice(text.as_bytes()),
        }
    }
}

impl Numbers {
    fn of(digits: &str) -> Numbers {
        if digits.contains(['.', 'e', 'E']) {
            return Numbers {
                floats: true,
                ..Numbers::default()
            };
        }
        match digits.parse::<i128>() {
            Ok(n) => Numbers {
                ints: Some((n, n)),
                ..Numbers::default()
            },
            Err(_) => Numbers {
                huge: true,
                ..Numbers::default()
            },
        }
    }

    fn with(self, other: Numbers) -> Numbers {
        Numbers {
            ints: match (self.ints, other.ints) {
                (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                (a, b) => a.or(b),
            },
            huge: self.huge || other.huge,
            floats: self.floats || other.floats,
        }
    }

    /// The column type that holds every number seen, or why none does.
    fn data_type(&self) -> Result<DataType, &'static str> {
        const DOUBLE_EXACT: i128 = 1 << 53;
        const DECIMAL_MAX: i128 = 10i128.pow(38) - 1;
        let (lo, hi) = self.ints.unwrap_or((0, 0));
        if self.floats {
            if self.huge || lo < -DOUBLE_EXACT || hi > DOUBLE_EXACT {
                return Err("floats and integers a double cannot hold exactly (beyond 2^53)");
            }
            return Ok(DataType::Float64);
        }
        if self.huge || lo < -DECIMAL_MAX || hi > DECIMAL_MAX {
            return Err("integers of over 38 digits");
        }
        Ok(if lo >= i64::MIN as i128 && hi <= i64::MAX as i128 {
            DataType::Int64
        } else if lo >= 0 && hi <= u64::MAX as i128 {
            DataType::UInt64
        } else {
            DataType::Decimal128(38, 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(lines: &[&str]) -> Result<Columns, String> {
        let mut columns = Columns::default();
        for line in lines {
            let quoted = raw::quote_constants(line);
            columns.observe(&raw::object(&quoted).unwrap())?;
        }
        Ok(columns)
    }

    fn types(lines: &[&str]) -> Vec<(String, DataType)> {
        let (schema, _) = columns(lines).unwrap().schema();
        schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect()
    }

    #[test]
    fn each_number_column_holds_its_numbers_exactly() {
        let cases: [(&[&str], DataType); 7] = [
            (
                &[r#"{"n": 1}"#, r#"{"n": -9223372036854775808}"#],
                DataType::Int64,
            ),
            (
                &[r#"{"n": 18446744073709551615}"#, r#"{"n": 0}"#],
                DataType::UInt64,
            ),
            (
                &[r#"{"n": 18446744073709551615}"#, r#"{"n": -1}"#],
                DataType::Decimal128(38, 0),
            ),
            (
                &[r#"{"n": 1}"#, r#"{"n": 2.5}"#, r#"{"n": NaN}"#],
                DataType::Float64,
            ),
            (
                &[r#"{"n": 9007199254740993}"#, r#"{"n": 0.5}"#],
                DataType::Utf8,
            ),
            (
                &[r#"{"n": 1000000000000000000000000000000000000000}"#],
                DataType::Utf8,
            ),
            (
                &[r#"{"n": 1}"#, r#"{"n": "one"}"#, r#"{"n": null}"#],
                DataType::Utf8,
            ),
        ];
        for (lines, expected) in cases {
            assert_eq!(types(lines), [("n".to_string(), expected)], "{lines:?}");
        }
    }

    #[test]
    fn values_of_no_one_column_type_are_json_text_and_said() {
        let many: String = (0..=MAX_FIELDS)
            .map(|i| format!(r#""k{i}": 1, "#))
            .collect();
        let map = format!(r#"{{"m": {{{many}"last": 2}}}}"#);
        let mut columns = columns(&[
            r#"{"either": {"a": 1}, "m": {"x": 1}}"#,
            r#"{"either": [1], "__ERROR__": {"error": "e", "task_data": {"id": 1}}}"#,
            &map,
        ])
        .unwrap();
        let (schema, notes) = columns.schema();
        for name in ["either", "m"] {
            assert_eq!(
                schema.field_with_name(name).unwrap().data_type(),
                &DataType::Utf8
            );
            assert!(
                notes
                    .iter()
                    .any(|n| n.starts_with(&format!("field {name:?}"))),
                "{notes:?}"
            );
        }
        let DataType::Struct(record) = schema.field_with_name("__ERROR__").unwrap().data_type()
        else {
            panic!("a record is a struct")
        };
        assert_eq!(
            record.find("task_data").unwrap().1.data_type(),
            &DataType::Utf8
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(!columns.reads_lines_as_they_are());
        let line = r#"{"either": {"a": NaN}, "m": {"x": 1}, "n": 1}"#;
        let quoted = raw::quote_constants(line);
        let mut out = Vec::new();
        columns.write_line(&raw::object(&quoted).unwrap(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"either":"{\"a\": NaN}","m":"{\"x\": 1}","n":1}"#
        );
    }

    #[test]
    fn lines_whose_fields_vary_past_a_tables_columns_are_refused() {
        let lines: Vec<String> = (0..=MAX_COLUMNS)
            .map(|i| format!(r#"{{"id_{i}": 1}}"#))
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let refused = columns(&lines).unwrap_err();
        assert!(refused.contains("one field"), "{refused}");
        assert!(columns(&lines[..MAX_COLUMNS]).is_ok());
    }
}

#[cfg(test)]
mod merged {
    use proptest::prelude::*;

    use super::*;

    fn learn(lines: &[String]) -> Columns {
        let mut columns = Columns::default();
        for line in lines {
            let quoted = raw::quote_constants(line);
            columns.observe(&raw::object(&quoted).unwrap()).unwrap();
        }
        columns
    }

    /// A JSON value of the kinds export tells apart, nested a little.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("\"s\"".to_owned()),
            Just("NaN".to_owned()),
            Just("1.5".to_owned()),
            (-3i64..3).prop_map(|n| n.to_string()),
            Just("18446744073709551615".to_owned()),
            Just("-9223372036854775809".to_owned()),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                proptest::collection::vec((0..4usize, inner), 0..3).prop_map(|fields| {
                    let fields: Vec<String> = fields
                        .into_iter()
                        .map(|(k, v)| format!("\"k{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        })
    }

    fn line() -> impl Strategy<Value = String> {
        proptest::collection::vec((0..4usize, value()), 0..4).prop_map(|fields| {
            let fields: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("\"f{k}\":{v}"))
                .collect();
            format!("{{{}}}", fields.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Two parts learnt apart and merged give the columns (types,
        /// order, notes) of every line learnt in order, or say they cannot.
        #[test]
        fn two_parts_merged_are_the_lines_in_order(
            lines in proptest::collection::vec(line(), 0..12),
            cut in 0usize..12,
        ) {
            let cut = cut.min(lines.len());
            let mut whole = learn(&lines);
            let mut first = learn(&lines[..cut]);
            if first.merge(learn(&lines[cut..])) {
                prop_assert_eq!(first.schema(), whole.schema());
                prop_assert_eq!(first.reads_lines_as_they_are(), whole.reads_lines_as_they_are());
            }
        }
    }

    #[test]
    fn a_field_the_later_part_made_text_is_not_merged() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut first = learn(&lines(&[r#"{"a": {"b": 1}}"#]));
        assert!(!first.merge(learn(&lines(&[r#"{"a": [1]}"#, r#"{"a": {"c": 1}}"#]))));
        let mut first = learn(&lines(&[r#"{"a": {"b": 1}}"#]));
        assert!(first.merge(learn(&lines(&[r#"{"a": [1]}"#]))));
        let (schema, notes) = first.schema();
        assert_eq!(schema.field(0).data_type(), &DataType::Utf8);
        assert_eq!(notes.len(), 1, "{notes:?}");
    }
}
