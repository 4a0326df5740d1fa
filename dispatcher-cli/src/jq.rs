//! jq filters on input lines (jaq, with jq's standard library): `infer`'s
//! `--prompt-path` and the group key of `--group-by`.

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

/// The first value `filter` gives on the JSON `line`: `None` when the line
/// is not JSON, the filter gives nothing, or it fails on the line.
pub fn first_value(filter: &Filter, line: &str) -> Option<Val> {
    let input = jaq_json::read::parse_single(line.as_bytes()).ok()?;
    let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
    filter.id.run((ctx, input)).map(unwrap_valr).next()?.ok()
}
