//! The `#[task]` attribute of `dispatcher`. Use it through the `dispatcher`
//! crate, whose docs show what it expands to.
//!
//! Layout: `parse` reads the function into a typed form and checks it,
//! `rewrite` replaces `yield_request!` in its body, `expand` writes the
//! task type (or, after an error, a best-effort stand-in).

mod expand;
mod parse;
mod rewrite;

use proc_macro::TokenStream;

/// Turns `async fn name(input: In [, ctx: TaskContext]) -> Result<Out, E>`
/// (`E` is `TaskError` or converts into it) into a task type `name` that
/// implements `Task`, with every `yield_request!` in its body sending its
/// request through the task's context.
#[proc_macro_attribute]
pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(args.into(), item.into()).into()
}
