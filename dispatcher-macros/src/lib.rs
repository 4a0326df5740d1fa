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

/// Turns `async fn name(input: In [, ctx: TaskContext]) -> Result<Out, TaskError>`
/// into a task type `name` that implements `Task`. See `dispatcher::task`.
#[proc_macro_attribute]
pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(args.into(), item.into()).into()
}
