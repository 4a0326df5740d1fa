//! jq filters on input lines (jaq, with jq's standard library): `infer`'s
//! `--prompt-path` and the group key of `--group-by`.

pub mod path;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
use jaq_json::Val;

/// A compiled filter.
pub type Filter = jaq_core::Filter<data::JustLut<Val>>;

/// Compiles a jq filter with jq's standard library; the error says why not,
/// in words to put after the flag's name.
pub fn compile(code: &str) -> Result<Filter, String> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let modules = loader
        .load(&arena, File { code, path: () })
        .map_err(|errs| {
            format!(
                "it does not parse ({} error(s); check brackets and quotes)",
                errs.len()
            )
        })?;
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errs| {
            let names: Vec<String> = errs
                .into_iter()
                .flat_map(|(_, e)| e.into_iter().map(|(name, _)| name.to_string()))
                .collect();
            format!(
                "it names undefined filters or variables: {}",
                names.join(", ")
            )
        })
}

/// Arrays and objects nested deeper than this in an input line are not
/// read: jaq's reader recurses once per level, so one line nested some
/// thousands deep would overflow a worker's stack (and the server's, with
/// `--group-by`), and serde_json, which every reader of the output uses,
/// stops at 128 too.
pub const MAX_DEPTH: usize = 128;

/// Why a line is not read as JSON.
#[derive(Debug)]
pub enum ParseError {
    /// Nested deeper than [`MAX_DEPTH`] (the depth reached, in levels).
    TooDeep(usize),
    /// Not one JSON value.
    NotJson(String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::TooDeep(depth) => write!(
                f,
                "its arrays and objects are nested more than {MAX_DEPTH} levels deep ({depth} at least)"
            ),
            ParseError::NotJson(why) => f.write_str(why),
        }
    }
}

/// `line` read as JSON (jq's reader: `NaN` and `Infinity` included), unless
/// it nests deeper than [`MAX_DEPTH`], which is checked first without
/// recursion.
pub fn parse_line(line: &str) -> Result<Val, ParseError> {
    if let Some(depth) = deeper_than(line.as_bytes(), MAX_DEPTH) {
        return Err(ParseError::TooDeep(depth));
    }
    jaq_json::read::parse_single(line.as_bytes()).map_err(|e| ParseError::NotJson(e.to_string()))
}

/// The depth `text` reaches past `max` levels of `[`/`{` (outside strings),
/// or `None` when it stays within them. One pass, no recursion.
fn deeper_than(text: &[u8], max: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0_usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The first value `filter` gives on the JSON `line`: `None` when the line
/// is not JSON (or nested too deep), the filter gives nothing, or it fails
/// on the line.
pub fn first_value(filter: &Filter, line: &str) -> Option<Val> {
    first_output(filter, parse_line(line).ok()?)?.ok()
}

/// The first output of `filter` on `input`: `None` when it gives nothing,
/// why when it fails.
pub fn first_output(filter: &Filter, input: Val) -> Option<Result<Val, String>> {
    let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
    let first = filter.id.run((ctx, input)).map(unwrap_valr).next()?;
    Some(first.map_err(|e| e.to_string()))
}

/// `v` as serde reads it; a value serde cannot hold (`NaN`) is `null`.
pub fn to_json(v: &Val) -> serde_json::Value {
    serde_json::from_str(&v.to_string()).unwrap_or(serde_json::Value::Null)
}

/// What kind of JSON value `v` is, in words (`a string`), for messages.
pub fn kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_nested_too_deep_are_refused_before_the_reader_recurses() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(parse_line(&deep), Err(ParseError::TooDeep(129))));
        let ok = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_line(&ok).is_ok());
        // Brackets in strings are text, also after an escaped quote.
        let text = format!(r#"{{"a": "\"{}"}}"#, "[".repeat(1000));
        assert!(parse_line(&text).is_ok(), "{text}");
        let filter = compile(".a").unwrap();
        assert!(first_value(&filter, &deep).is_none());
    }
}
