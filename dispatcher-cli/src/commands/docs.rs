//! What is generated from the command line's own definitions, so that it cannot
//! drift from the flags: `dispatcher completions SHELL` (a shell's completion
//! script), and two hidden commands for the release and the book:
//! `dispatcher man --out DIR` (a man page per command) and
//! `dispatcher reference --out DIR` (the book's reference page per command,
//! in Markdown).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Arg, ArgAction, Args, Command};

/// Flags of `dispatcher completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell. Bash:
    /// `dispatcher completions bash > ~/.local/share/bash-completion/completions/dispatcher`.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Flags of the hidden `dispatcher man` and `dispatcher reference`.
#[derive(Debug, Args)]
pub struct OutArgs {
    /// The folder to write the pages to (created if missing; pages in it replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// `dispatcher completions SHELL`: the script on stdout. A reader that goes
/// away early (`| head`) ends it quietly, as it does `cat`.
pub fn completions(args: CompletionsArgs, mut command: Command) -> anyhow::Result<()> {
    use std::io::Write as _;
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut script);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the completion script to stdout")
        }
        _ => Ok(()),
    }
}

/// `dispatcher man --out DIR`: `dispatcher.1`, and `dispatcher-<command>.1`
/// for each visible subcommand.
pub fn man(args: OutArgs, mut command: Command) -> anyhow::Result<()> {
    create(&args.out)?;
    command.build();
    let root = command.get_name().to_owned();
    write_man(&args.out, &command, &format!("{root}.1"))?;
    for sub in visible(&command) {
        let name = format!("{root}-{}", sub.get_name());
        let page = sub.clone().name(name.clone()).display_name(name.clone());
        write_man(&args.out, &page, &format!("{name}.1"))?;
    }
    Ok(())
}

/// `dispatcher reference --out DIR`: `<command>.md` for each visible
/// subcommand, and `task-binary.md` for a task binary's command line.
pub fn reference(args: OutArgs, command: Command, task: Command) -> anyhow::Result<()> {
    create(&args.out)?;
    for (file, page) in reference_pages(command, task) {
        write_page(&args.out, &file, page.as_bytes())?;
    }
    Ok(())
}

/// Each reference page, with its file name: one per visible subcommand of
/// `command` (the `dispatcher` binary), then one for a task binary.
pub fn reference_pages(mut command: Command, mut task: Command) -> Vec<(String, String)> {
    command.build();
    task.build();
    let root = command.get_name().to_owned();
    let mut pages: Vec<(String, String)> = visible(&command)
        .map(|sub| {
            let title = format!("{root} {}", sub.get_name());
            (format!("{}.md", sub.get_name()), markdown(&title, sub))
        })
        .collect();
    pages.push((
        "task-binary.md".to_owned(),
        markdown("A task binary (`cargo run --example NAME --`)", &task),
    ));
    pages
}

fn visible(command: &Command) -> impl Iterator<Item = &Command> {
    command
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
}

fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn write_man(dir: &Path, command: &Command, file: &str) -> anyhow::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .with_context(|| format!("cannot render the man page {file}"))?;
    write_page(dir, file, &page)
}

fn write_page(dir: &Path, file: &str, page: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))
}

/// One command's reference page: what it does, its usage, and a table of its
/// arguments with their values, defaults, variables and help.
fn markdown(title: &str, command: &Command) -> String {
    let mut page = String::new();
    let _ = writeln!(page, "# {title}\n");
    page.push_str("<!-- Generated from the command line's definitions by `dispatcher reference`; edit the flags' doc comments, not this page. -->\n\n");
    if let Some(about) = command.get_long_about().or(command.get_about()) {
        let _ = writeln!(page, "{about}\n");
    }
    let usage = command.clone().render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ");
    let _ = writeln!(page, "```text\n{usage}\n```\n");
    let args: Vec<&Arg> = command
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_id() != "help" && a.get_id() != "version")
        .collect();
    if args.is_empty() {
        return page;
    }
    page.push_str("| argument | default | meaning |\n|---|---|---|\n");
    for arg in args {
        let _ = writeln!(
            page,
            "| {} | {} | {} |",
            cell(&spelling(arg)),
            cell(&default(arg)),
            cell(&meaning(arg)),
        );
    }
    page
}

/// `--flag NAME`, `-f`, aliases, or `<NAME>` for a positional argument.
fn spelling(arg: &Arg) -> String {
    let value = value_names(arg);
    let mut names: Vec<String> = Vec::new();
    if let Some(long) = arg.get_long() {
        names.push(format!("--{long}{value}"));
    }
    if let Some(short) = arg.get_short() {
        names.push(format!("-{short}"));
    }
    if let Some(aliases) = arg.get_visible_aliases() {
        names.extend(aliases.into_iter().map(|a| format!("--{a}")));
    }
    if names.is_empty() {
        return format!("`{}`", value.trim());
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn value_names(arg: &Arg) -> String {
    if !matches!(arg.get_action(), ArgAction::Set | ArgAction::Append) {
        return String::new();
    }
    let names = arg
        .get_value_names()
        .map(|n| n.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap_or_else(|| vec![arg.get_id().as_str().to_uppercase()]);
    let repeat = if matches!(arg.get_action(), ArgAction::Append) {
        "..."
    } else {
        ""
    };
    format!(" {}{repeat}", names.join(" "))
}

fn default(arg: &Arg) -> String {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return "off".to_owned();
    }
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| format!("`{}`", v.to_string_lossy()))
        .collect();
    if !values.is_empty() {
        values.join(", ")
    } else if arg.is_required_set() {
        "required".to_owned()
    } else {
        String::new()
    }
}

fn meaning(arg: &Arg) -> String {
    let mut text = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    // Doc comments lose their last full stop in clap's help; the page's
    // sentences that follow need it back.
    if !text.is_empty() && !text.ends_with(['.', '!', '?']) {
        text.push('.');
    }
    let choices: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    if !choices.is_empty() && matches!(arg.get_action(), ArgAction::Set | ArgAction::Append) {
        let _ = write!(text, " One of {}.", choices.join(", "));
    }
    if let Some(var) = arg.get_env() {
        let _ = write!(text, " Variable: `{}`.", var.to_string_lossy());
    }
    text
}

/// Text fit for one cell of a Markdown table: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// The book's reference pages are these functions' output: a flag added,
    /// renamed or documented anew without `dispatcher reference --out
    /// docs/src/reference/commands` fails here, naming the page.
    #[test]
    fn the_books_reference_pages_match_the_command_line() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/src/reference/commands");
        let pages = reference_pages(crate::Cli::command(), crate::TaskCli::command());
        assert!(pages.len() >= 12, "{} pages", pages.len());
        let mut stale = Vec::new();
        for (file, page) in &pages {
            let path = dir.join(file);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(page.as_str()) {
                stale.push(file.clone());
            }
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.retain(|f| !pages.iter().any(|(p, _)| p == f));
        assert!(
            stale.is_empty() && on_disk.is_empty(),
            "the reference pages in {} are out of date: {stale:?} differ, {on_disk:?} name no \
             command; run `cargo run -p dispatcher-cli -- reference --out {}`",
            dir.display(),
            dir.display()
        );
    }

    #[test]
    fn a_flags_table_row_names_its_value_default_choices_and_variable() {
        let page = markdown(
            "dispatcher serve",
            &crate::Cli::command()
                .find_subcommand("serve")
                .unwrap()
                .clone(),
        );
        let row = |flag: &str| {
            page.lines()
                .find(|l| l.starts_with(&format!("| `{flag}")))
                .unwrap_or_else(|| panic!("no row for {flag} in\n{page}"))
                .to_owned()
        };
        let work_timeout = row("--work-timeout");
        assert!(work_timeout.contains("| `1200` |"), "{work_timeout}");
        let infile = row("--infile");
        assert!(
            infile.contains("`--input`") && infile.contains("required"),
            "{infile}"
        );
        let token = row("--token-file");
        assert!(
            token.contains("Variable: `DISPATCHER_TOKEN_FILE`"),
            "{token}"
        );
        assert!(!page.contains("| `--help"), "help is not a documented flag");
    }

    #[test]
    fn man_pages_are_written_one_per_command() {
        let dir = tempfile::tempdir().unwrap();
        man(
            OutArgs {
                out: dir.path().to_owned(),
            },
            crate::Cli::command(),
        )
        .unwrap();
        let serve = std::fs::read_to_string(dir.path().join("dispatcher-serve.1")).unwrap();
        assert!(
            serve.contains(".TH dispatcher-serve") && serve.contains("work\\-timeout"),
            "{serve}"
        );
        assert!(dir.path().join("dispatcher.1").exists());
        assert!(dir.path().join("dispatcher-launch.1").exists());
        assert!(
            !dir.path().join("dispatcher-man.1").exists(),
            "hidden commands have no page"
        );
    }
}
