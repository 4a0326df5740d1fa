//! A worker's engines as specs, one [`EngineSpec`] per engine (where it is,
//! its model, request slots, API key and rate limits), built once from the
//! flags and handed to the launcher and the task manager
//! ([`EngineSpecs::start`]). The flags of engines given by URL live here: a
//! hosted or already running default engine (`--engine-url URL`) and named
//! engines beside the launched one (`--engine-url judge=URL`).
//!
//! Everything here is checked before any engine is launched, so a typo in a
//! flag fails the job at once rather than after vLLM loaded for minutes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dispatcher_core::engine::spawn::{self, RunningEngine, SpawnConfig};
use dispatcher_core::engine::{
    api_base, ApiKey, OpenAiEngine, OpenAiEngineBuilder, RateLimit, RetryPolicy,
};
use dispatcher_core::metrics::WorkerMetrics;
use dispatcher_core::task::engines::{is_engine_name, DEFAULT_ENGINE};
use dispatcher_core::task::Engines;

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

/// Where an engine is.
#[derive(Debug, Clone)]
pub enum Place {
    /// Launched by this worker.
    Launch(Box<SpawnConfig>),
    /// Already running at this address (`--no-launch`).
    Running {
        /// Its host.
        host: String,
        /// Its port.
        port: u16,
    },
    /// At this URL (`--engine-url`): hosted, or elsewhere.
    Url(String),
}

/// One engine as the flags describe it: checked once, then handed to the
/// launcher (where it is launched) and to the task manager (its backend and
/// its request slots).
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// Its name; `None` for the default engine.
    pub name: Option<String>,
    /// Where it is.
    pub place: Place,
    /// The model requests that name none get; `None`: the first the engine
    /// lists at `/models`, asked once it runs.
    pub model: Option<String>,
    /// Requests in flight to it at most; `None`: `--max-in-flight`.
    pub max_in_flight: Option<usize>,
    /// Its API key (a sensitive header, never logged).
    pub api_key: Option<ApiKey>,
    /// Client-side rate limits.
    pub rate: RateLimit,
}

/// Every engine of a worker, and what their backends share.
#[derive(Debug)]
pub struct EngineSpecs {
    /// The default engine: requests that name none go to it.
    pub default: EngineSpec,
    /// The named engines (`--engine-url NAME=URL`).
    pub named: Vec<EngineSpec>,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// Retries after a connection error, a 429 or a 5xx.
    pub retry: RetryPolicy,
    /// A PEM certificate to trust beside the system's roots.
    pub ca_cert: Option<Vec<u8>>,
}

impl EngineSpecs {
    /// The backend of `spec`, whose API is at `url`.
    fn backend(&self, spec: &EngineSpec, url: &str) -> OpenAiEngineBuilder {
        let mut builder = OpenAiEngine::builder(url)
            .api_key(spec.api_key.clone())
            .rate_limit(spec.rate)
            .timeout(self.request_timeout)
            .retry(self.retry.clone());
        if let Some(pem) = &self.ca_cert {
            builder = builder.ca_cert_pem(pem.clone());
        }
        if spec.name.is_some() {
            builder = builder.model(spec.model.clone()).discover_model(true);
        }
        builder
    }

    /// Builds the backend of every engine given by URL once, so that a bad
    /// certificate or key fails before any engine is launched.
    pub(super) fn check_backends(&self) -> anyhow::Result<()> {
        for spec in std::iter::once(&self.default).chain(&self.named) {
            if let Place::Url(url) = &spec.place {
                let flag = match &spec.name {
                    Some(name) => format!("--engine-url {name}={url}"),
                    None => format!("--engine-url {url}"),
                };
                self.backend(spec, url).build().context(flag)?;
            }
        }
        Ok(())
    }

    /// Launches (or connects to) the default engine and builds the backends
    /// of every engine, each with its request slots (`max_in_flight` where
    /// its spec names none); requests are counted in `metrics`.
    pub async fn start(
        &self,
        max_in_flight: usize,
        metrics: &Arc<WorkerMetrics>,
    ) -> anyhow::Result<(RunningEngine, Engines)> {
        let engine = match &self.default.place {
            Place::Url(url) => spawn::connect_url(url),
            Place::Running { host, port } => spawn::connect(host, *port),
            Place::Launch(config) => spawn::spawn(config).await?,
        };
        let backend = self
            .backend(&self.default, engine.base_url())
            .build()?
            .with_metrics(metrics.clone(), DEFAULT_ENGINE);
        let model = match &self.default.model {
            Some(model) => Some(model.clone()),
            None => backend.discover_model().await,
        };
        tracing::info!(url = engine.base_url(), model = ?model, "engine ready");
        let slots = self.default.max_in_flight.unwrap_or(max_in_flight);
        let mut engines = Engines::new(Arc::new(backend.with_model(model)), slots, metrics);
        for spec in &self.named {
            let (Some(name), Place::Url(url)) = (&spec.name, &spec.place) else {
                unreachable!("named engines are given by URL")
            };
            let backend = self
                .backend(spec, url)
                .build()?
                .with_metrics(metrics.clone(), name);
            tracing::info!(
                engine = %name,
                url = backend.api_base(),
                model = backend.model().unwrap_or("(the first at /models)"),
                "named engine"
            );
            let slots = spec.max_in_flight.unwrap_or(max_in_flight);
            engines = engines.with_named(name, Arc::new(backend), slots, metrics)?;
        }
        Ok((engine, engines))
    }
}

/// What the URL flags describe: the default engine when it is given by URL,
/// and the named engines.
#[derive(Debug)]
pub struct UrlSpecs {
    /// The default engine, when given by URL.
    pub default: Option<EngineSpec>,
    /// The named engines.
    pub named: Vec<EngineSpec>,
    /// The unnamed rate limits, which are the default engine's wherever it is.
    pub default_rate: RateLimit,
    /// `--ca-cert`, read.
    pub ca_cert: Option<Vec<u8>>,
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
    /// Checks the flags (URLs, names, numbers, the API keys' variables and
    /// the CA certificate) into one spec per engine given by URL.
    pub fn specs(&self) -> anyhow::Result<UrlSpecs> {
        let mut default_url = None;
        let mut named: Vec<(String, String)> = Vec::new();
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
                Some(name) if named.iter().any(|(n, _)| n == name) => {
                    bail!("--engine-url {v}: two engines are named {name:?}")
                }
                Some(name) => named.push((name.to_string(), url.to_string())),
            }
        }
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let in_flight = PerEngine::parse(
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
        let rpm = PerEngine::parse(
            "max-requests-per-minute",
            &self.max_requests_per_minute,
            &names,
            true,
            positive::<u32>,
        )?;
        let tpm = PerEngine::parse(
            "max-tokens-per-minute",
            &self.max_tokens_per_minute,
            &names,
            true,
            positive::<u64>,
        )?;
        // Each engine's variable: its own, else the unnamed one, else
        // OPENAI_API_KEY (which may be unset: then no key is sent).
        let key_of = |name: Option<&str>| -> anyhow::Result<Option<ApiKey>> {
            let (var, asked) = match key_vars.get(name).or(key_vars.unnamed.as_ref()) {
                Some(var) => (var.as_str(), true),
                None => (DEFAULT_API_KEY_ENV, false),
            };
            read_key(var, asked).map_err(|why| anyhow::anyhow!("--api-key-env {var}: {why}"))
        };
        let rate = |name: Option<&str>| RateLimit {
            requests_per_minute: rpm.get(name).copied(),
            tokens_per_minute: tpm.get(name).copied(),
        };
        let default = match default_url {
            Some(url) => Some(EngineSpec {
                name: None,
                place: Place::Url(url),
                model: None,
                max_in_flight: None,
                api_key: key_of(None)?,
                rate: rate(None),
            }),
            None => None,
        };
        let named = named
            .into_iter()
            .map(|(name, url)| {
                Ok(EngineSpec {
                    model: models.named.get(&name).cloned(),
                    max_in_flight: in_flight.named.get(&name).copied(),
                    api_key: key_of(Some(&name))?,
                    rate: rate(Some(&name)),
                    place: Place::Url(url),
                    name: Some(name),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ca_cert = match &self.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("--ca-cert {}: could not read it", path.display()))?,
            ),
            None => None,
        };
        Ok(UrlSpecs {
            default,
            named,
            default_rate: rate(None),
            ca_cert,
        })
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

    /// The error of the flags, from reading them or from building the
    /// backends, as a worker does before launching anything.
    fn error(a: EngineUrlArgs) -> String {
        let checked = a.specs().and_then(|urls| {
            let specs = EngineSpecs {
                default: urls.default.unwrap_or(EngineSpec {
                    name: None,
                    place: Place::Running {
                        host: "127.0.0.1".into(),
                        port: 1,
                    },
                    model: None,
                    max_in_flight: None,
                    api_key: None,
                    rate: urls.default_rate,
                }),
                named: urls.named,
                request_timeout: Duration::from_secs(1),
                retry: RetryPolicy::default(),
                ca_cert: urls.ca_cert,
            };
            specs.check_backends()
        });
        format!("{:#}", checked.unwrap_err())
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
        .specs()
        .unwrap();
        let default = e.default.unwrap();
        assert!(matches!(&default.place, Place::Url(u) if u == "https://api.example.com/v1"));
        assert_eq!(default.rate.requests_per_minute, Some(600));
        let named: Vec<_> = e
            .named
            .iter()
            .map(|s| {
                (
                    s.name.clone().unwrap(),
                    s.max_in_flight,
                    s.rate.requests_per_minute,
                )
            })
            .collect();
        assert_eq!(named, vec![("judge".to_string(), Some(32), Some(60))]);
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
