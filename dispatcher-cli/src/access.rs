//! The job's access token on the command line: `--token-file` (or
//! `DISPATCHER_TOKEN`), and `--token` for those who accept that every user
//! of the node sees it in `ps`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

/// The access token's flags, shared by `serve`, `launch`, the workers and
/// `status`: the server requires the token on every endpoint but `/health`
/// and its page; the others send it.
#[derive(Debug, Clone, Default, Args)]
pub struct TokenArgs {
    /// The job's access token (`Authorization: Bearer TOKEN`). A command
    /// line is visible to every user of the node (`ps`): prefer
    /// --token-file or the DISPATCHER_TOKEN variable.
    #[arg(
        long,
        env = "DISPATCHER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// A file holding the access token (its first line), readable by you
    /// alone.
    #[arg(long, env = "DISPATCHER_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token given, checked: printable ASCII without spaces (it
    /// travels in a header) and not empty (an empty `--token` would turn
    /// access control off without a word).
    pub fn resolve(&self) -> anyhow::Result<Option<String>> {
        let from_file = self.token_file.as_ref().map(read_token_file).transpose()?;
        let token = match (&self.token, from_file) {
            // A job's processes may inherit both (`launch` passes the token
            // by environment to processes that may see the user's file).
            (Some(token), Some(read)) if *token == read => read,
            (Some(_), Some(_)) => bail!(
                "--token (or DISPATCHER_TOKEN) and --token-file {} (or DISPATCHER_TOKEN_FILE) give different tokens: give one",
                self.token_file.as_ref().expect("read").display()
            ),
            (Some(token), None) => token.clone(),
            (None, Some(read)) => read,
            (None, None) => return Ok(None),
        };
        if token.is_empty() {
            bail!("--token (or DISPATCHER_TOKEN) is empty, which would turn access control off; give a token, or leave the flag and the variable out for a server without one");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("--token (or DISPATCHER_TOKEN, --token-file) must be printable ASCII without spaces: it travels in an HTTP header, where whitespace is trimmed and other bytes are refused");
        }
        Ok(Some(token))
    }
}

/// The token in `file`: its first line, trimmed.
fn read_token_file(file: &PathBuf) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--token-file {}: could not read it", file.display()))?;
    let first = text.lines().next().unwrap_or_default().trim();
    if first.is_empty() {
        bail!(
            "--token-file {}: its first line is empty; write the token there",
            file.display()
        );
    }
    Ok(first.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(token: Option<&str>, file: Option<PathBuf>) -> TokenArgs {
        TokenArgs {
            token: token.map(String::from),
            token_file: file,
        }
    }

    #[test]
    fn a_token_comes_from_the_flag_or_a_file_and_is_never_empty() {
        assert_eq!(args(None, None).resolve().unwrap(), None);
        assert_eq!(
            args(Some("s3cret"), None).resolve().unwrap().as_deref(),
            Some("s3cret")
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "fr0m-file\n").unwrap();
        assert_eq!(
            args(None, Some(file.clone())).resolve().unwrap().as_deref(),
            Some("fr0m-file")
        );
        let e = args(Some(""), None).resolve().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = args(Some("a b"), None).resolve().unwrap_err().to_string();
        assert!(e.contains("printable ASCII"), "{e}");
        let e = args(Some("x"), Some(file.clone()))
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("different tokens"), "{e}");
        assert_eq!(
            args(Some("fr0m-file"), Some(file.clone()))
                .resolve()
                .unwrap()
                .as_deref(),
            Some("fr0m-file")
        );
        std::fs::write(&file, "\n").unwrap();
        let e = args(None, Some(file.clone()))
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("first line is empty"), "{e}");
        let e = args(None, Some(dir.path().join("missing")))
            .resolve()
            .unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }
}
