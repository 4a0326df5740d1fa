//! `--group-by`, `--group-by-prefix`, `--lookahead`: prefix affinity, for
//! `serve` and for local jobs. The key of a line is a hash of what a jq
//! filter selects in it (or of its first N bytes); the ledger does the rest
//! ([`dispatcher_core::ledger::Grouping`]).

use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use dispatcher_core::ledger::Grouping;

/// Lines read ahead per MiB of `--max-pending-mib` by default: results of
/// 16 KiB on average fill it.
const LOOKAHEAD_PER_MIB: u64 = 64;

/// The grouping flags.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Grouping (prefix affinity)")]
pub struct GroupArgs {
    /// Hand lines whose jq filter selects the same value to the same
    /// worker, together, so its engine computes their shared prompt prefix
    /// once: `.messages[0].content` (a system prompt), `.doc_id` (questions
    /// on one document). Off by default; see the book, "Prefix affinity", for when it helps.
    #[arg(long, value_name = "JQ")]
    pub group_by: Option<String>,
    /// Group by the first N bytes of what --group-by selects (a few-shot
    /// template before distinct questions).
    #[arg(long, value_name = "N", requires = "group_by")]
    pub group_by_prefix: Option<usize>,
    /// Lines read ahead of issue to group at most, and results held behind
    /// a line not yet written before reading ahead stops and that line goes
    /// out first (default: 64 per MiB of --max-pending-mib, 16,384 by
    /// default, so that the results they may hold back fit in it).
    #[arg(long, value_name = "LINES", requires = "group_by")]
    pub lookahead: Option<usize>,
}

impl GroupArgs {
    /// The ledger's grouping, checked; `None` without --group-by.
    pub fn grouping(&self, max_pending_bytes: u64) -> anyhow::Result<Option<Grouping>> {
        let Some(code) = &self.group_by else {
            return Ok(None);
        };
        let filter = crate::jq::compile(code).map_err(|why| {
            anyhow::anyhow!("--group-by {code:?} is not a valid jq filter: {why}")
        })?;
        if self.group_by_prefix == Some(0) {
            bail!("--group-by-prefix must be at least 1 byte");
        }
        let lookahead = match self.lookahead {
            Some(0) => bail!("--lookahead must be at least 1 line"),
            Some(n) => n,
            None => usize::try_from(((max_pending_bytes >> 20) * LOOKAHEAD_PER_MIB).max(64))
                .unwrap_or(usize::MAX),
        };
        let key = Key {
            path: crate::jq::path::Path::parse(code),
            filter,
            prefix: self.group_by_prefix,
        };
        let key = move |line: &str| key.of(line);
        Ok(Some(Grouping {
            key: Arc::new(key),
            lookahead,
        }))
    }
}

/// How a line's group key is found.
struct Key {
    /// The filter, when it is a plain path: followed through the line's
    /// text, the filter run only where the path cannot tell.
    path: Option<crate::jq::path::Path>,
    filter: crate::jq::Filter,
    /// `--group-by-prefix`.
    prefix: Option<usize>,
}

impl Key {
    /// The key of `line`: a hash of the string the filter selects (or of
    /// the JSON text of another value), `None` for `null`, nothing, a
    /// failure or a line that is not JSON.
    fn of(&self, line: &str) -> Option<u64> {
        use crate::jq::path::Selected;
        match self.path.as_ref().map(|path| path.select(line)) {
            Some(Selected::Str(s)) => Some(self.hash(s.as_bytes())),
            Some(Selected::Null) => None,
            Some(Selected::AskJq) | None => self.by_filter(line),
        }
    }

    /// The key of `line` as the filter itself gives it.
    fn by_filter(&self, line: &str) -> Option<u64> {
        let value = crate::jq::first_value(&self.filter, line)?;
        // A string is hashed where it lies; other values by their JSON.
        let text: std::borrow::Cow<'_, [u8]> = match &value {
            jaq_json::Val::TStr(s) | jaq_json::Val::BStr(s) => std::borrow::Cow::Borrowed(s),
            jaq_json::Val::Null => return None,
            other => std::borrow::Cow::Owned(other.to_string().into_bytes()),
        };
        Some(self.hash(&text))
    }

    /// The hash of a selected value's bytes, or of their first
    /// `--group-by-prefix` bytes.
    fn hash(&self, bytes: &[u8]) -> u64 {
        let bytes = match self.prefix {
            Some(n) => &bytes[..n.min(bytes.len())],
            None => bytes,
        };
        let mut hasher = std::hash::DefaultHasher::new();
        bytes.hash(&mut hasher);
        hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(args: &GroupArgs, line: &str) -> Option<u64> {
        (args.grouping(256 << 20).unwrap().unwrap().key)(line)
    }

    #[test]
    fn the_key_is_what_the_filter_selects_or_its_prefix() {
        let by = |code: &str, prefix: Option<usize>| GroupArgs {
            group_by: Some(code.into()),
            group_by_prefix: prefix,
            lookahead: None,
        };
        let system = by(".messages[0].content", None);
        let a = r#"{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "a?"}]}"#;
        let b = r#"{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "b?"}]}"#;
        let c = r#"{"messages": [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "a?"}]}"#;
        assert_eq!(key(&system, a), key(&system, b));
        assert_ne!(key(&system, a), key(&system, c));
        assert!(key(&system, a).is_some());
        // Nothing selected, null, or not JSON: no key (handed out in order).
        assert_eq!(key(&system, r#"{"prompt": "x"}"#), None);
        assert_eq!(key(&system, "not json"), None);
        // Numbers and objects are keys by their JSON text.
        let doc = by(".doc", None);
        assert_eq!(
            key(&doc, r#"{"doc": 7, "q": 1}"#),
            key(&doc, r#"{"doc": 7, "q": 2}"#)
        );
        // The first N bytes: a shared template, distinct questions.
        let prefix = by(".prompt", Some(9));
        assert_eq!(
            key(&prefix, r#"{"prompt": "Examples: 1+1=2. Q: 3+4?"}"#),
            key(&prefix, r#"{"prompt": "Examples: 2+2=4. Q: 5+6?"}"#)
        );
        assert_ne!(
            key(&prefix, r#"{"prompt": "Examples: 1"}"#),
            key(&prefix, r#"{"prompt": "Samples: 1"}"#)
        );
    }

    #[test]
    fn a_plain_path_gives_every_line_the_key_the_filter_gives() {
        let deep = format!("{}\"x\"{}", "[".repeat(200), "]".repeat(200));
        let deep_object = format!("{}{}", r#"{"a": "#.repeat(130), "}".repeat(130));
        let lines = [
            r#"{"a": "x", "b": {"c": ["p", "q"]}, "n": 7, "f": 1.50, "z": null}"#,
            r#"{"a": "x\u00e9\n\"", "a b": "sp", "b": {"c": [null, "q"]}}"#,
            r#"{"a": "é ✓", "b": [], "n": -0, "f": 1e400}"#,
            r#"{"a": "1", "a": "2", "b": {"c": "not an array"}}"#,
            r#"{"a": "1", "a": 2}"#,
            r#"{"a": {"b": true}, "messages": [{"content": "sys"}, {"content": "u"}]}"#,
            r#"{"\u0061": "escaped key"}"#,
            r#"["x", {"a": "in an array"}]"#,
            r#""a string line""#,
            "null",
            "7",
            r#"{"a": NaN}"#,
            r#"{"a": "x"} {"a": "y"}"#,
            r#"{"a": "x\ud800"}"#,
            "{\"a\": \"tab\there\"}",
            "{\"a\": \"raw\ttab\"}",
            r#"{"a": "unterminated"#,
            "not json",
            "",
            "  {\"a\" : \"spaced\"}  ",
            &deep,
            &deep_object,
        ];
        let filters = [
            ".",
            ".a",
            ".a.b",
            ".b.c[1]",
            ".b.c[0]",
            ".b.c[9]",
            ".[0]",
            ".[1].a",
            ".n",
            ".f",
            ".z",
            ".z.y[2]",
            r#"."a b""#,
            r#".["a"]"#,
            ".messages[0].content",
            ".messages[1]",
        ];
        for code in filters {
            for prefix in [None, Some(1), Some(3)] {
                let key = Key {
                    path: crate::jq::path::Path::parse(code),
                    filter: crate::jq::compile(code).unwrap(),
                    prefix,
                };
                assert!(key.path.is_some(), "{code} is a plain path");
                for line in lines {
                    assert_eq!(
                        key.of(line),
                        key.by_filter(line),
                        "{code} (prefix {prefix:?}) on {line}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_flags_are_refused_by_name_and_lookahead_follows_the_pending_cap() {
        let e = GroupArgs {
            group_by: Some(".messages[".into()),
            ..GroupArgs::default()
        }
        .grouping(1 << 20)
        .unwrap_err();
        assert!(e.to_string().contains("--group-by \".messages[\""), "{e}");
        let g = GroupArgs {
            group_by: Some(".doc".into()),
            ..GroupArgs::default()
        };
        assert_eq!(g.grouping(256 << 20).unwrap().unwrap().lookahead, 16_384);
        assert_eq!(g.grouping(0).unwrap().unwrap().lookahead, 64);
        assert!(GroupArgs::default().grouping(1).unwrap().is_none());
    }
}
