//! Scripted replies of the echo engine, so a dry run exercises what a task
//! does with the model's answer (a judge parsing "Score: 7", keeping the
//! longest of N samples) before a GPU is at hand.
//!
//! A script is a list of rules, tried in order on the request's last message
//! (or completion prompt); the first whose regex matches gives the reply, and
//! a request no rule matches is echoed as without a script:
//!
//! ```text
//! # The judge asks for a score: answer one its parser reads.
//! match: ^Rate the answer
//! reply: Score: {pick:3|7|9}
//!
//! # A question: answer it at varying length.
//! match: ^Question: (?P<q>.*)
//! reply: {pick:Yes.|It depends on {q}.|A long answer about {q}, seed {seed}.}
//! ```
//!
//! A reply is a template: `{prompt}` (the whole message), `{1}`.. and `{name}`
//! (the regex's groups), `{seed}` (the request's seed, 0 without one),
//! `{index}` (the choice, 0 to n-1), `{variant}` (seed + index), `{request}`
//! (the engine's request count), `{pick:a|b|c}` (one of the alternatives, by
//! variant), `{{` and `}}` for braces; `\n` in a reply is a newline.

use std::fmt::Write as _;
use std::path::Path;

use regex_bites::{Captures, Regex};

/// Scripted replies: rules of a regex on the last message and a reply.
#[derive(Debug, Clone)]
pub struct EchoScript {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: Regex,
    reply: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Prompt,
    Seed,
    Index,
    Variant,
    Request,
    Group(usize),
    Named(String),
    /// Alternatives, each a template of its own.
    Pick(Vec<Vec<Piece>>),
}

/// What a reply may use besides the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyContext {
    /// The request's seed; 0 without one.
    pub seed: u64,
    /// The choice, 0 to n-1.
    pub index: u64,
    /// Requests the engine answered before this one.
    pub request: u64,
}

impl ReplyContext {
    /// Seed plus choice: what tells samples apart.
    pub fn variant(&self) -> u64 {
        self.seed.wrapping_add(self.index)
    }
}

/// A script that does not parse: where, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}:{line}: {message}")]
pub struct ScriptError {
    origin: String,
    line: usize,
    message: String,
}

impl EchoScript {
    /// One reply to every request (`--echo-reply TEXT`).
    pub fn reply(template: &str) -> Result<EchoScript, ScriptError> {
        let error = |message| ScriptError {
            origin: "--echo-reply".into(),
            line: 1,
            message,
        };
        let pattern = Regex::new("").expect("the empty regex compiles");
        let reply = parse_template(template, &pattern).map_err(error)?;
        Ok(EchoScript {
            rules: vec![Rule { pattern, reply }],
        })
    }

    /// Reads a script file (`--echo-script FILE`).
    pub fn load(path: &Path) -> Result<EchoScript, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScriptError {
            origin: path.display().to_string(),
            line: 0,
            message: format!("cannot read the echo script: {e}"),
        })?;
        EchoScript::parse(&text, &path.display().to_string())
    }

    /// Parses a script; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<EchoScript, ScriptError> {
        let error = |line: usize, message: String| ScriptError {
            origin: origin.into(),
            line,
            message,
        };
        let mut rules = Vec::new();
        let mut pending: Option<(usize, Regex)> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(pattern) = line.strip_prefix("match:") {
                if let Some((at, _)) = pending {
                    return Err(error(
                        at,
                        "a `match:` line without its `reply:` line".into(),
                    ));
                }
                let pattern = pattern.trim();
                let regex = Regex::new(pattern)
                    .map_err(|e| error(n, format!("the regex {pattern:?} does not parse: {e}")))?;
                pending = Some((n, regex));
            } else if let Some(reply) = line.strip_prefix("reply:") {
                let Some((_, pattern)) = pending.take() else {
                    return Err(error(
                        n,
                        "a `reply:` line needs a `match:` line before it".into(),
                    ));
                };
                let reply =
                    parse_template(&unescape(reply.trim()), &pattern).map_err(|m| error(n, m))?;
                rules.push(Rule { pattern, reply });
            } else {
                return Err(error(
                    n,
                    format!(
                        "expected `match: REGEX`, `reply: TEMPLATE`, `# comment` or a blank line, not {:?}",
                        raw.chars().take(60).collect::<String>()
                    ),
                ));
            }
        }
        if let Some((at, _)) = pending {
            return Err(error(
                at,
                "a `match:` line without its `reply:` line".into(),
            ));
        }
        if rules.is_empty() {
            return Err(error(0, "the echo script has no rules".into()));
        }
        Ok(EchoScript { rules })
    }

    /// The reply of the first rule that matches `message`, if any.
    pub fn answer(&self, message: &str, context: ReplyContext) -> Option<String> {
        self.rules.iter().find_map(|rule| {
            let captures = rule.pattern.captures(message)?;
            let mut out = String::new();
            render(&rule.reply, message, &captures, context, &mut out);
            Some(out)
        })
    }
}

/// `\n`, `\t` and `\\` in a script's reply line.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn parse_template(template: &str, pattern: &Regex) -> Result<Vec<Piece>, String> {
    let mut chars = template.char_indices().peekable();
    let pieces = parse_pieces(template, &mut chars, pattern, false)?;
    Ok(pieces)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

/// Pieces up to the end, or (inside `{pick:..}`) up to the next `|` or `}`,
/// which is left for the caller.
fn parse_pieces(
    template: &str,
    chars: &mut Chars<'_>,
    pattern: &Regex,
    in_pick: bool,
) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    while let Some(&(at, c)) = chars.peek() {
        if in_pick && (c == '|' || c == '}') {
            break;
        }
        chars.next();
        match c {
            '{' if chars.peek().is_some_and(|&(_, c)| c == '{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().is_some_and(|&(_, c)| c == '}') => {
                chars.next();
                text.push('}');
            }
            '}' => {
                return Err(format!(
                    "an unmatched `}}` at byte {at} of the reply; write `}}}}` for a brace"
                ))
            }
            '{' => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(parse_placeholder(template, at, chars, pattern)?);
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn parse_placeholder(
    template: &str,
    at: usize,
    chars: &mut Chars<'_>,
    pattern: &Regex,
) -> Result<Piece, String> {
    let rest = &template[at + 1..];
    if rest.starts_with("pick:") {
        for _ in 0.."pick:".len() {
            chars.next();
        }
        let mut alternatives = vec![parse_pieces(template, chars, pattern, true)?];
        loop {
            match chars.next() {
                Some((_, '|')) => alternatives.push(parse_pieces(template, chars, pattern, true)?),
                Some((_, '}')) => return Ok(Piece::Pick(alternatives)),
                _ => {
                    return Err(format!(
                        "`{{pick:` at byte {at} of the reply has no closing `}}`"
                    ))
                }
            }
        }
    }
    let Some(len) = rest.find('}') else {
        return Err(format!(
            "`{{` at byte {at} of the reply has no closing `}}`; write `{{{{` for a brace"
        ));
    };
    let name = &rest[..len];
    for _ in 0..name.chars().count() + 1 {
        chars.next();
    }
    let piece = match name {
        "prompt" => Piece::Prompt,
        "seed" => Piece::Seed,
        "index" => Piece::Index,
        "variant" => Piece::Variant,
        "request" => Piece::Request,
        _ => match name.parse::<usize>() {
            Ok(group) if group < pattern.captures_len() => Piece::Group(group),
            Ok(group) => {
                return Err(format!(
                    "{{{group}}}: the regex has {} group(s)",
                    pattern.captures_len() - 1
                ))
            }
            Err(_) if pattern.capture_names().flatten().any(|n| n == name) => {
                Piece::Named(name.into())
            }
            Err(_) => {
                return Err(format!(
                    "unknown placeholder {{{name}}}; a reply knows {{prompt}}, {{seed}}, {{index}}, \
                     {{variant}}, {{request}}, {{pick:a|b}}, and the regex's groups by number or name"
                ))
            }
        },
    };
    Ok(piece)
}

fn render(
    pieces: &[Piece],
    message: &str,
    captures: &Captures<'_>,
    context: ReplyContext,
    out: &mut String,
) {
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Prompt => out.push_str(message),
            Piece::Seed => write!(out, "{}", context.seed).expect("writing to a String"),
            Piece::Index => write!(out, "{}", context.index).expect("writing to a String"),
            Piece::Variant => write!(out, "{}", context.variant()).expect("writing to a String"),
            Piece::Request => write!(out, "{}", context.request).expect("writing to a String"),
            Piece::Group(g) => out.push_str(captures.get(*g).map_or("", |m| m.as_str())),
            Piece::Named(n) => out.push_str(captures.name(n).map_or("", |m| m.as_str())),
            Piece::Pick(alternatives) => {
                let i = (context.variant() % alternatives.len() as u64) as usize;
                render(&alternatives[i], message, captures, context, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seed: u64, index: u64) -> ReplyContext {
        ReplyContext {
            seed,
            index,
            request: 5,
        }
    }

    #[test]
    fn the_first_matching_rule_replies_and_none_matching_leaves_the_echo() {
        let script = EchoScript::parse(
            "# a judge\nmatch: ^Rate\nreply: Score: 7\n\nmatch: ^Question: (?P<q>.*)\\?$\nreply: About {q}: {1}.\n",
            "s",
        )
        .unwrap();
        assert_eq!(
            script.answer("Rate this", at(0, 0)).as_deref(),
            Some("Score: 7")
        );
        assert_eq!(
            script.answer("Question: cats?", at(0, 0)).as_deref(),
            Some("About cats: cats.")
        );
        assert_eq!(script.answer("Hello", at(0, 0)), None);
    }

    #[test]
    fn pick_chooses_by_seed_plus_index_and_the_counters_are_available() {
        let script =
            EchoScript::reply("{pick:a|bb|c{seed}} {index} {variant} {request} {prompt} {{x}}")
                .unwrap();
        let replies: Vec<String> = (0..3)
            .map(|seed| script.answer("p", at(seed, 1)).unwrap())
            .collect();
        assert_eq!(
            replies,
            ["bb 1 1 5 p {x}", "c1 1 2 5 p {x}", "a 1 3 5 p {x}"]
        );
        let multiline = EchoScript::parse("match: .\nreply: one\\ntwo\\\\n\n", "s").unwrap();
        assert_eq!(
            multiline.answer("x", at(0, 0)).as_deref(),
            Some("one\ntwo\\n")
        );
    }

    #[test]
    fn mistakes_name_the_file_and_line() {
        let cases = [
            (
                "reply: x\n",
                "s:1: a `reply:` line needs a `match:` line before it",
            ),
            (
                "match: a\nmatch: b\nreply: x\n",
                "s:1: a `match:` line without its `reply:` line",
            ),
            (
                "match: (\nreply: x\n",
                "s:1: the regex \"(\" does not parse",
            ),
            (
                "\nmatch: a\nreply: {score}\n",
                "s:3: unknown placeholder {score}",
            ),
            (
                "match: (a)\nreply: {2}\n",
                "s:2: {2}: the regex has 1 group(s)",
            ),
            ("match: a\nreply: {pick:x|y\n", "s:2: `{pick:` at byte 0"),
            ("match: a\nreply: x}\n", "s:2: an unmatched `}`"),
            ("score = 7\n", "s:1: expected `match: REGEX`"),
            ("# nothing\n", "s:0: the echo script has no rules"),
        ];
        for (script, expected) in cases {
            let error = EchoScript::parse(script, "s").unwrap_err().to_string();
            assert!(error.starts_with(expected), "{script:?}: {error}");
        }
    }
}
