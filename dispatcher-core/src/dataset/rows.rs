//! Arrow rows as JSON lines: how a Parquet or Arrow dataset's rows become the
//! input lines a task reads.
//!
//! Each row is one JSON object, its columns in schema order. Nested lists and
//! structs become arrays and objects, nulls `null`; a map with string keys an
//! object (other keys: an array of `{"key", "value"}`); a dictionary column
//! its values. Strings stay strings; binary becomes base64 (standard, padded);
//! dates `YYYY-MM-DD`; timestamps RFC 3339 in UTC (`2024-05-01T12:00:00.000Z`,
//! with the digits of the column's unit), or without the `Z` when the column
//! has no time zone; times of day `HH:MM:SS[.fff]`; durations an integer in
//! the column's unit; decimals a string (`"12.50"`: exact, where a JSON number
//! would be read as a float); a float that is not finite `null`. Columns of
//! other types (intervals, unions, run-end encoded) are refused by name, as
//! are two columns (or struct fields) of one name and a map with a key
//! twice: a JSON object holds a key once, and one value would be lost.

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrowPrimitiveType, OffsetSizeTrait, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use base64::Engine as _;
use serde_json::{Map, Value};

/// Appends `batch`'s rows to `out`, one JSON object and a newline each.
/// Fails naming the column whose type has no JSON form.
pub fn write_lines(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<(), String> {
    let schema = batch.schema();
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let values =
            column(array.as_ref()).map_err(|e| format!("column {:?} {e}", field.name()))?;
        columns.push(values);
    }
    for row in 0..batch.num_rows() {
        let mut object = Map::with_capacity(columns.len());
        for (field, values) in schema.fields().iter().zip(columns.iter_mut()) {
            object.insert(field.name().clone(), std::mem::take(&mut values[row]));
        }
        serde_json::to_writer(&mut *out, &Value::Object(object))
            .expect("a JSON value serializes into a Vec");
        out.push(b'\n');
    }
    Ok(())
}

/// An error naming a name given twice: a JSON object holds each key once,
/// so one of the two would be lost.
/// `what` says what the names are (columns, fields).
pub fn distinct_names<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(format!(
                "has two {what} named {name:?}; a JSON object holds each key once, so one would be lost: rename one in the dataset"
            ));
        }
    }
    Ok(())
}

/// Whether a column of this type can be turned into JSON; the error says
/// which type cannot.
pub fn check_type(data_type: &DataType) -> Result<(), String> {
    match data_type {
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => check_type(f.data_type()),
        DataType::Struct(fields) => {
            distinct_names("fields", fields.iter().map(|f| f.name().as_str()))?;
            fields.iter().try_for_each(|f| {
                check_type(f.data_type()).map_err(|e| format!("(its field {:?}) {e}", f.name()))
            })
        }
        DataType::Dictionary(_, values) => check_type(values),
        t if supported_leaf(t) => Ok(()),
        t => Err(format!(
            "has type {t}, which has no JSON form here; cast it in the dataset (to a string, say)"
        )),
    }
}

fn supported_leaf(t: &DataType) -> bool {
    use DataType::*;
    matches!(
        t,
        Null | Boolean
            | Int8
            | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Float16
            | Float32
            | Float64
            | Utf8
            | LargeUtf8
            | Utf8View
            | Binary
            | LargeBinary
            | BinaryView
            | FixedSizeBinary(_)
            | Date32
            | Date64
            | Timestamp(_, _)
            | Time32(_)
            | Time64(_)
            | Duration(_)
            | Decimal128(_, _)
            | Decimal256(_, _)
    )
}

/// Every value of `array`, nulls included, in order.
fn column(array: &dyn Array) -> Result<Vec<Value>, String> {
    use DataType as T;
    let n = array.len();
    let mut values: Vec<Value> = match array.data_type() {
        T::Null => vec![Value::Null; n],
        T::Boolean => {
            let a = array.as_boolean();
            (0..n).map(|i| Value::Bool(a.value(i))).collect()
        }
        T::Int8 => primitive::<Int8Type>(array, |v| v.into()),
        T::Int16 => primitive::<Int16Type>(array, |v| v.into()),
        T::Int32 => primitive::<Int32Type>(array, |v| v.into()),
        T::Int64 => primitive::<Int64Type>(array, |v| v.into()),
        T::UInt8 => primitive::<UInt8Type>(array, |v| v.into()),
        T::UInt16 => primitive::<UInt16Type>(array, |v| v.into()),
        T::UInt32 => primitive::<UInt32Type>(array, |v| v.into()),
        T::UInt64 => primitive::<UInt64Type>(array, |v| v.into()),
        T::Float16 => primitive::<Float16Type>(array, |v| short_float(v.to_f32())),
        T::Float32 => primitive::<Float32Type>(array, short_float),
        T::Float64 => primitive::<Float64Type>(array, float),
        T::Utf8 => strings(array.as_string::<i32>().iter(), n),
        T::LargeUtf8 => strings(array.as_string::<i64>().iter(), n),
        T::Utf8View => strings(array.as_string_view().iter(), n),
        T::Binary => binaries(array.as_binary::<i32>().iter(), n),
        T::LargeBinary => binaries(array.as_binary::<i64>().iter(), n),
        T::BinaryView => binaries(array.as_binary_view().iter(), n),
        T::FixedSizeBinary(_) => binaries(array.as_fixed_size_binary().iter(), n),
        T::Date32 => primitive::<Date32Type>(array, |d| date(i64::from(d)).into()),
        T::Date64 => primitive::<Date64Type>(array, |ms| date(ms.div_euclid(86_400_000)).into()),
        T::Timestamp(unit, tz) => {
            let utc = tz.is_some();
            let f = move |v: i64| Value::String(timestamp(v, *unit, utc));
            match unit {
                TimeUnit::Second => primitive::<TimestampSecondType>(array, f),
                TimeUnit::Millisecond => primitive::<TimestampMillisecondType>(array, f),
                TimeUnit::Microsecond => primitive::<TimestampMicrosecondType>(array, f),
                TimeUnit::Nanosecond => primitive::<TimestampNanosecondType>(array, f),
            }
        }
        T::Time32(TimeUnit::Second) => {
            primitive::<Time32SecondType>(array, |v| time_of_day(v.into(), TimeUnit::Second))
        }
        T::Time32(_) => primitive::<Time32MillisecondType>(array, |v| {
            time_of_day(v.into(), TimeUnit::Millisecond)
        }),
        T::Time64(TimeUnit::Nanosecond) => {
            primitive::<Time64NanosecondType>(array, |v| time_of_day(v, TimeUnit::Nanosecond))
        }
        T::Time64(_) => {
            primitive::<Time64MicrosecondType>(array, |v| time_of_day(v, TimeUnit::Microsecond))
        }
        T::Duration(unit) => match unit {
            TimeUnit::Second => primitive::<DurationSecondType>(array, |v| v.into()),
            TimeUnit::Millisecond => primitive::<DurationMillisecondType>(array, |v| v.into()),
            TimeUnit::Microsecond => primitive::<DurationMicrosecondType>(array, |v| v.into()),
            TimeUnit::Nanosecond => primitive::<DurationNanosecondType>(array, |v| v.into()),
        },
        T::Decimal128(_, scale) => {
            let scale = *scale;
            primitive::<Decimal128Type>(array, move |v| decimal(&v.to_string(), scale).into())
        }
        T::Decimal256(_, scale) => {
            let scale = *scale;
            primitive::<Decimal256Type>(array, move |v| decimal(&v.to_string(), scale).into())
        }
        T::List(_) => list(array.as_list::<i32>())?,
        T::LargeList(_) => list(array.as_list::<i64>())?,
        T::FixedSizeList(_, size) => {
            let a = array.as_fixed_size_list();
            let mut children = column(a.values().as_ref())?;
            let size = usize::try_from(*size).unwrap_or(0);
            (0..n)
                .map(|i| {
                    let start = a.value_offset_at(i);
                    Value::Array(
                        children[start..start + size]
                            .iter_mut()
                            .map(std::mem::take)
                            .collect(),
                    )
                })
                .collect()
        }
        T::Struct(fields) => {
            let a = array.as_struct();
            let mut children = a
                .columns()
                .iter()
                .map(|c| column(c.as_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            (0..n)
                .map(|i| {
                    let mut object = Map::with_capacity(fields.len());
                    for (field, child) in fields.iter().zip(children.iter_mut()) {
                        object.insert(field.name().clone(), std::mem::take(&mut child[i]));
                    }
                    Value::Object(object)
                })
                .collect()
        }
        T::Map(_, _) => {
            let a = array.as_map();
            let string_keys = matches!(a.key_type(), T::Utf8 | T::LargeUtf8 | T::Utf8View);
            let mut keys = column(a.keys().as_ref())?;
            let mut items = column(a.values().as_ref())?;
            let offsets = a.value_offsets();
            (0..n)
                .map(|i| {
                    let range = offsets[i] as usize..offsets[i + 1] as usize;
                    if string_keys {
                        let mut object = Map::new();
                        for j in range {
                            let Value::String(key) = std::mem::take(&mut keys[j]) else {
                                continue;
                            };
                            if object.contains_key(&key) {
                                return Err(format!(
                                    "has a map with the key {key:?} twice; a JSON object holds each key once, so one value would be lost: make the keys distinct in the dataset, or cast the column to a list of key-value structs"
                                ));
                            }
                            object.insert(key, std::mem::take(&mut items[j]));
                        }
                        Ok(Value::Object(object))
                    } else {
                        Ok(Value::Array(
                            range
                                .map(|j| {
                                    let mut entry = Map::new();
                                    entry.insert("key".into(), std::mem::take(&mut keys[j]));
                                    entry.insert("value".into(), std::mem::take(&mut items[j]));
                                    Value::Object(entry)
                                })
                                .collect(),
                        ))
                    }
                })
                .collect::<Result<_, String>>()?
        }
        T::Dictionary(_, _) => {
            let a = array.as_any_dictionary();
            let dictionary = column(a.values().as_ref())?;
            a.normalized_keys()
                .into_iter()
                .map(|k| dictionary.get(k).cloned().unwrap_or(Value::Null))
                .collect()
        }
        other => return Err(check_type(other).expect_err("a type without a JSON form")),
    };
    if array.null_count() > 0 {
        for (i, value) in values.iter_mut().enumerate() {
            if array.is_null(i) {
                *value = Value::Null;
            }
        }
    }
    Ok(values)
}

fn primitive<T: ArrowPrimitiveType>(
    array: &dyn Array,
    f: impl Fn(T::Native) -> Value,
) -> Vec<Value> {
    array
        .as_primitive::<T>()
        .values()
        .iter()
        .map(|v| f(*v))
        .collect()
}

fn list<O: OffsetSizeTrait>(a: &arrow_array::GenericListArray<O>) -> Result<Vec<Value>, String> {
    let mut children = column(a.values().as_ref())?;
    let offsets = a.value_offsets();
    Ok((0..a.len())
        .map(|i| {
            let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
            Value::Array(
                children[start..end]
                    .iter_mut()
                    .map(std::mem::take)
                    .collect(),
            )
        })
        .collect())
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    out.extend(values.map(|v| v.map_or(Value::Null, |s| Value::String(s.to_owned()))));
    out
}

fn binaries<'a>(values: impl Iterator<Item = Option<&'a [u8]>>, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    out.extend(values.map(|v| {
        v.map_or(Value::Null, |b| {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        })
    }));
    out
}

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// An `f32` as the shortest decimal that reads back as it (`0.1`, not
/// `0.10000000149011612`).
fn short_float(v: f32) -> Value {
    if !v.is_finite() {
        return Value::Null;
    }
    float(v.to_string().parse().unwrap_or(f64::from(v)))
}

/// `YYYY-MM-DD` of days since 1970-01-01.
fn date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The calendar date of days since 1970-01-01 (proleptic Gregorian), after
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Ticks per second and fraction digits of a unit.
fn per_second(unit: TimeUnit) -> (i64, usize) {
    match unit {
        TimeUnit::Second => (1, 0),
        TimeUnit::Millisecond => (1_000, 3),
        TimeUnit::Microsecond => (1_000_000, 6),
        TimeUnit::Nanosecond => (1_000_000_000, 9),
    }
}

/// `HH:MM:SS` and the fraction of a count of `unit` ticks within a day.
fn clock(ticks: i64, unit: TimeUnit) -> String {
    let (per, digits) = per_second(unit);
    let (secs, frac) = (ticks.div_euclid(per), ticks.rem_euclid(per));
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if digits == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{frac:0digits$}")
    }
}

fn timestamp(ticks: i64, unit: TimeUnit, utc: bool) -> String {
    let (per, _) = per_second(unit);
    let day_ticks = 86_400 * per;
    let days = ticks.div_euclid(day_ticks);
    let within = ticks.rem_euclid(day_ticks);
    let zone = if utc { "Z" } else { "" };
    format!("{}T{}{zone}", date(days), clock(within, unit))
}

fn time_of_day(ticks: i64, unit: TimeUnit) -> Value {
    Value::String(clock(ticks, unit))
}

/// A decimal's unscaled integer (as digits with an optional sign) with
/// `scale` digits after the point.
fn decimal(unscaled: &str, scale: i8) -> String {
    let (sign, digits) = match unscaled.strip_prefix('-') {
        Some(d) => ("-", d),
        None => ("", unscaled),
    };
    if scale <= 0 {
        let zeros = "0".repeat(usize::from(scale.unsigned_abs()));
        return if digits == "0" {
            "0".into()
        } else {
            format!("{sign}{digits}{zeros}")
        };
    }
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_are_written_as_calendars_write_them() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(19_844), "2024-05-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(11_016), "2000-02-29");
        assert_eq!(
            timestamp(1_714_564_800_123, TimeUnit::Millisecond, true),
            "2024-05-01T12:00:00.123Z"
        );
        assert_eq!(
            timestamp(-1, TimeUnit::Second, false),
            "1969-12-31T23:59:59"
        );
        assert_eq!(
            timestamp(1_500, TimeUnit::Microsecond, true),
            "1970-01-01T00:00:00.001500Z"
        );
        assert_eq!(
            clock(3_723_000_000_001, TimeUnit::Nanosecond),
            "01:02:03.000000001"
        );
    }

    #[test]
    fn decimals_keep_every_digit() {
        assert_eq!(decimal("1250", 2), "12.50");
        assert_eq!(decimal("-5", 3), "-0.005");
        assert_eq!(decimal("0", 2), "0.00");
        assert_eq!(decimal("12", -2), "1200");
        assert_eq!(decimal("12", 0), "12");
    }

    #[test]
    fn floats_are_short_and_never_invalid_json() {
        assert_eq!(short_float(0.1), serde_json::json!(0.1));
        assert_eq!(short_float(f32::NAN), Value::Null);
        assert_eq!(float(f64::INFINITY), Value::Null);
    }
}
