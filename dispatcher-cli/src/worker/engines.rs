//! Engines given by URL: a hosted or already running default engine
//! (`--engine-url URL`) and named engines beside the launched one
//! (`--engine-url judge=URL`), with their request limits, models, API keys,
//! client-side rate limits and TLS roots.
//!
//! Everything here is checked before any engine is launched, so a typo in a
//! flag fails the job at once rather than after vLLM loaded for minutes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context};
use clap::Args;
use dispatcher_core::engine::OpenAiEngine;
use dispatcher_core::engine::{api_base, ApiKey, OpenAiEngineBuilder, RateLimit};
use dispatcher_core::task::engines::is_engine_name;

/// The variable an engine given by URL takes its API key from, unless
/// `--api-key-env` names another.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";

/// Flags of engines given by URL.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Engines by URL (hosted APIs, several models in one task)")]
pub struct EngineUrlArgs {
    /// An engine to send to: `URL` is the default engine, used instead of
    /// launching one; `NAME=URL` is one more, for requests that say
    /// `.engine("NAME")`. http:// or https://; a bare `http://host:port`
    /// gets `/v1`. Repeatable.
    #[arg(long, value_name = "[NAME=]URL")]
    pub engine_url: Vec<String>,
    /// Requests in flight at most to a named engine (default:
    /// --max-in-flight). Repeatable. `--engine-workers` is its older name.
    #[arg(long, visible_alias = "engine-workers", value_name = "NAME=N")]
    pub engine_max_in_flight: Vec<String>,
    /// The model requests to a named engine ask for when they name none
    /// (default: the first the engine lists at /models). Repeatable.
    #[arg(long, value_name = "NAME=MODEL")]
    pub engine_model: Vec<String>,
    /// The environment variable holding the API key of the engines given by
    /// --engine-url (`VAR` for all of them, `NAME=VAR` for one; default
    /// OPENAI_API_KEY, when set). Sent as a bearer token; never logged.
    #[arg(long, value_name = "[NAME=]VAR")]
    pub api_key_env: Vec<String>,
    /// Client-side limit of requests started per minute, retries included
    /// (`N` for the default engine, `NAME=N` for a named one). Repeatable.
    #[arg(long, value_name = "[NAME=]N")]
    pub max_requests_per_minute: Vec<String>,
    /// Client-side limit of prompt and completion tokens per minute,
    /// estimated before a request and corrected by the usage it reports
    /// (`N` for the default engine, `NAME=N` for a named one). Repeatable.
    #[arg(long, value_name = "[NAME=]N")]
    pub max_tokens_per_minute: Vec<String>,
    /// A PEM certificate to trust for https engines besides the system's
    /// roots (a site CA).
    #[arg(long, value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
}

impl EngineUrlArgs {
    /// The default engine's URL (`--engine-url URL` without a name), if given.
    pub fn default_url(&self) -> Option<&str> {
        self.engine_url
            .iter()
            .map(|v| split_named(v))
            .find_map(|(name, url)| name.is_none().then_some(url))
    }
}

/// `NAME=VALUE` with a valid engine name, or the whole of `v`.
fn split_named(v: &str) -> (Option<&str>, &str) {
    match v.split_once('=') {
        Some((name, rest)) if is_engine_name(name) => (Some(name), rest),
        _ => (None, v),
    }
}

/// The values of one repeatable `[NAME=]VALUE` flag: the unnamed one (at most
/// one) and one per name, each name one of `known`.
#[derive(Debug)]
struct PerEngine<T> {
    unnamed: Option<T>,
    named: BTreeMap<String, T>,
}

impl<T> PerEngine<T> {
    fn parse(
        flag: &str,
        values: &[String],
        known: &[String],
        allow_unnamed: bool,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<PerEngine<T>> {
        let mut out = PerEngine {
            unnamed: None,
            named: BTreeMap::new(),
        };
        for v in values {
            let (name, value) = split_named(v);
            let parsed = parse(value).map_err(|why| anyhow::anyhow!("--{flag} {v}: {why}"))?;
            let slot = match name {
                Some(name) => {
                    if !known.iter().any(|k| k == name) {
                        bail!(
                            "--{flag} {v}: no engine is named {name:?} (name engines with --engine-url {name}=URL{})",
                            if known.is_empty() {
                                String::new()
                            } else {
                                format!("; the named ones are {}", known.join(", "))
                            }
                        );
                    }
                    out.named.entry(name.to_string())
                }
                None if allow_unnamed => {
                    if out.unnamed.replace(parsed).is_some() {
                        bail!("--{flag} is given twice without an engine name");
                    }
                    continue;
                }
                None => bail!("--{flag} {v}: name the engine, NAME=VALUE"),
            };
            match slot {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(parsed);
                }
                std::collections::btree_map::Entry::Occupied(e) => {
                    bail!("--{flag} is given twice for the engine {:?}", e.key())
                }
            }
        }
        Ok(out)
    }

    fn get(&self, name: Option<&str>) -> Option<&T> {
        match name {
            Some(name) => self.named.get(name),
            None => self.unnamed.as_ref(),
        }
    }
}

fn positive<T: FromStr + PartialOrd + Default>(v: &str) -> Result<T, String> {
    match v.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err("must be a whole number above 0".into()),
    }
}

/// The engines the flags describe, checked; [`UrlEngines::default_backend`]
/// and [`UrlEngines::named`] make their backends.
#[derive(Debug)]
pub struct UrlEngines {
    /// The default engine's URL, when it is not launched.
    pub default_url: Option<String>,
    /// Named engines: name, URL, concurrency limit (`None`: --max-in-flight).
    named: Vec<(String, String, Option<usize>)>,
    models: BTreeMap<String, String>,
    keys: PerEngine<Option<ApiKey>>,
    default_key: Option<ApiKey>,
    rpm: PerEngine<u32>,
    tpm: PerEngine<u64>,
    ca_cert: Option<Vec<u8>>,
}

/// The API key in `var`: `Ok(None)` when unset and not asked for by name.
fn read_key(var: &str, asked: bool) -> Result<Option<ApiKey>, String> {
    let key = std::env::var(var).ok().and_then(ApiKey::new);
    if key.is_none() && asked {
        return Err(format!(
            "the variable {var} is not set (or empty) in the worker's environment"
        ));
    }
    Ok(key)
}

impl EngineUrlArgs {
    /// Checks the flags: URLs, names, numbers, the API keys' variables and
    /// the CA certificate.
    pub fn check(&self) -> anyhow::Result<UrlEngines> {
        let mut default_url = None;
        let mut named: Vec<(String, String, Option<usize>)> = Vec::new();
        for v in &self.engine_url {
            let (name, url) = split_named(v);
            api_base(url).with_context(|| format!("--engine-url {v}"))?;
            match name {
                None if default_url.is_some() => bail!(
                    "--engine-url {v}: the default engine's URL is given twice; name the others, NAME=URL"
                ),
                None => default_url = Some(url.to_string()),
                Some("default") => bail!(
                    "--engine-url {v}: \"default\" is the default engine's name; give its URL without a name"
                ),
                Some(name) if named.iter().any(|(n, ..)| n == name) => {
                    bail!("--engine-url {v}: two engines are named {name:?}")
                }
                Some(name) => named.push((name.to_string(), url.to_string(), None)),
            }
        }
        let names: Vec<String> = named.iter().map(|(n, ..)| n.clone()).collect();
        let workers = PerEngine::parse(
            "engine-max-in-flight",
            &self.engine_max_in_flight,
            &names,
            false,
            positive::<usize>,
        )?;
        let models = PerEngine::parse("engine-model", &self.engine_model, &names, false, |m| {
            Ok(m.to_string())
        })?;
        let key_vars = PerEngine::parse("api-key-env", &self.api_key_env, &names, true, |v| {
            if v.is_empty() {
                Err("name an environment variable".to_string())
            } else {
                Ok(v.to_string())
            }
        })?;
        // Each engine's variable: its own, else the unnamed one, else
        // OPENAI_API_KEY (which may be unset: then no key is sent).
        let key_of = |name: Option<&str>| -> anyhow::Result<Option<ApiKey>> {
            let (var, asked) = match key_vars.get(name).or(key_vars.unnamed.as_ref()) {
                Some(var) => (var.as_str(), true),
                None => (DEFAULT_API_KEY_ENV, false),
            };
            read_key(var, asked).map_err(|why| anyhow::anyhow!("--api-key-env {var}: {why}"))
        };
        let mut keys = PerEngine {
            unnamed: None,
            named: BTreeMap::new(),
        };
        for (name, ..) in &named {
            keys.named.insert(name.clone(), key_of(Some(name))?);
        }
        let default_key = match default_url {
            Some(_) => key_of(None)?,
            None => None,
        };
        for entry in &mut named {
            entry.2 = workers.named.get(&entry.0).copied();
        }
        let ca_cert = match &self.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("--ca-cert {}: could not read it", path.display()))?,
            ),
            None => None,
        };
        let engines = UrlEngines {
            default_url,
            named,
            models: models.named,
            keys,
            default_key,
            rpm: PerEngine::parse(
                "max-requests-per-minute",
                &self.max_requests_per_minute,
                &names,
                true,
                positive::<u32>,
            )?,
            tpm: PerEngine::parse(
                "max-tokens-per-minute",
                &self.max_tokens_per_minute,
                &names,
                true,
                positive::<u64>,
            )?,
            ca_cert,
        };
        // Build each backend once now, so a bad certificate or key fails
        // before any engine is launched.
        if let Some(url) = &engines.default_url {
            engines
                .builder(None, url)
                .build()
                .with_context(|| format!("--engine-url {url}"))?;
        }
        for (name, url, _) in &engines.named {
            engines
                .builder(Some(name), url)
                .build()
                .with_context(|| format!("--engine-url {name}={url}"))?;
        }
        Ok(engines)
    }
}

impl UrlEngines {
    /// The backend builder of the engine `name` (`None`: the default) at `url`.
    fn builder(&self, name: Option<&str>, url: &str) -> OpenAiEngineBuilder {
        let key = match name {
            Some(name) => self.keys.named.get(name).cloned().flatten(),
            // The launched engine gets no key; one given by URL does.
            None if self.default_url.is_some() => self.default_key.clone(),
            None => None,
        };
        let mut builder = OpenAiEngine::builder(url)
            .api_key(key)
            .rate_limit(RateLimit {
                requests_per_minute: self.rpm.get(name).copied(),
                tokens_per_minute: self.tpm.get(name).copied(),
            });
        if let Some(pem) = &self.ca_cert {
            builder = builder.ca_cert_pem(pem.clone());
        }
        if let Some(name) = name {
            builder = builder
                .model(self.models.get(name).cloned())
                .discover_model(true);
        }
        builder
    }

    /// The default engine's backend builder, at `url` (launched, or given).
    pub fn default_backend(&self, url: &str) -> OpenAiEngineBuilder {
        self.builder(None, url)
    }

    /// The named engines: name, backend builder, concurrency limit (`None`:
    /// --max-in-flight).
    pub fn named(&self) -> impl Iterator<Item = (&str, OpenAiEngineBuilder, Option<usize>)> {
        self.named
            .iter()
            .map(|(name, url, limit)| (name.as_str(), self.builder(Some(name), url), *limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut EngineUrlArgs)) -> EngineUrlArgs {
        let mut a = EngineUrlArgs::default();
        f(&mut a);
        a
    }

    fn error(a: EngineUrlArgs) -> String {
        format!("{:#}", a.check().unwrap_err())
    }

    #[test]
    fn named_and_unnamed_urls() {
        let e = args(|a| {
            a.engine_url = vec![
                "https://api.example.com/v1".into(),
                "judge=http://node7:8000".into(),
            ];
            a.engine_max_in_flight = vec!["judge=32".into()];
            a.max_requests_per_minute = vec!["600".into(), "judge=60".into()];
        })
        .check()
        .unwrap();
        assert_eq!(e.default_url.as_deref(), Some("https://api.example.com/v1"));
        let named: Vec<_> = e.named().map(|(n, _, l)| (n.to_string(), l)).collect();
        assert_eq!(named, vec![("judge".to_string(), Some(32))]);
        assert_eq!(e.rpm.get(None), Some(&600));
        assert_eq!(e.rpm.get(Some("judge")), Some(&60));
    }

    #[test]
    fn mistakes_name_the_flag_and_what_to_do() {
        let e = error(args(|a| a.engine_url = vec!["judge=node7:8000".into()]));
        assert!(
            e.contains("--engine-url judge=node7:8000") && e.contains("http://"),
            "{e}"
        );
        let e = error(args(|a| {
            a.engine_url = vec!["judge=http://x:1".into()];
            a.engine_max_in_flight = vec!["jugde=4".into()];
        }));
        assert!(
            e.contains("no engine is named \"jugde\"") && e.contains("judge"),
            "{e}"
        );
        let e = error(args(|a| {
            a.engine_url = vec!["judge=http://x:1".into()];
            a.engine_max_in_flight = vec!["judge=0".into()];
        }));
        assert!(
            e.contains("--engine-max-in-flight judge=0: must be a whole number above 0"),
            "{e}"
        );
        let e = error(args(|a| a.engine_max_in_flight = vec!["8".into()]));
        assert!(e.contains("name the engine"), "{e}");
        let e = error(args(|a| {
            a.engine_url = vec!["http://a:1".into(), "http://b:1".into()];
        }));
        assert!(e.contains("given twice"), "{e}");
        let e = error(args(|a| {
            a.engine_url = vec!["j=http://a:1".into(), "j=http://b:1".into()];
        }));
        assert!(e.contains("two engines are named \"j\""), "{e}");
        let e = error(args(|a| a.ca_cert = Some("/nonexistent/ca.pem".into())));
        assert!(e.contains("--ca-cert /nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_key_variable_asked_for_must_be_set_and_its_value_is_never_shown() {
        let var = "DISPATCHER_TEST_KEY_UNSET_7f3a";
        let e = error(args(|a| {
            a.engine_url = vec!["https://api.example.com/v1".into()];
            a.api_key_env = vec![var.into()];
        }));
        assert!(e.contains(var) && e.contains("not set"), "{e}");
        // A key that cannot be a header value is refused without echoing it.
        let var = "DISPATCHER_TEST_KEY_BAD_7f3a";
        std::env::set_var(var, "sk-abc\ndef");
        let e = error(args(|a| {
            a.engine_url = vec!["https://api.example.com/v1".into()];
            a.api_key_env = vec![var.into()];
        }));
        std::env::remove_var(var);
        assert!(
            e.contains("API key is not a valid HTTP header value"),
            "{e}"
        );
        assert!(!e.contains("sk-abc"), "{e}");
    }
}
