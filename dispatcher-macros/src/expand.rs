//! Writes the task type for a checked `#[task]` fn.
//!
//! ```text
//! // Input:
//! #[task]
//! pub async fn judge(input: In, ctx: TaskContext) -> Result<Out, TaskError> { body }
//! // Output:
//! #[allow(non_camel_case_types)]
//! #[derive(Debug, Clone, Copy, Default)]
//! pub struct judge;
//! impl ::dispatcher::Task for judge {
//!     type Input = In;
//!     type Output = Out;
//!     const NAME: &'static str = "judge";
//!     fn run(&self, input: In, ctx: ::dispatcher::TaskContext) -> impl Future<...> + Send + 'static {
//!         async fn __dispatcher_task_body(input: In, __dispatcher_ctx: ::dispatcher::TaskContext)
//!             -> Result<Out, TaskError>
//!         {
//!             let ctx: TaskContext = Clone::clone(&__dispatcher_ctx);
//!             body /* with yield_request! rewritten */
//!         }
//!         __dispatcher_task_body(input, ctx)
//!     }
//! }
//! ```

use proc_macro2::TokenStream;
use quote::quote;
use syn::visit_mut::VisitMut;

use crate::parse::{self, Args, TaskFn};
use crate::rewrite::Rewriter;

pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    let result = syn::parse2::<Args>(args).and_then(|args| {
        let f = parse::task_fn(item.clone())?;
        expand(&args, f)
    });
    match result {
        Ok(tokens) => tokens,
        Err(e) => fallback(e, item),
    }
}

fn expand(args: &Args, mut f: TaskFn) -> syn::Result<TokenStream> {
    let krate = &args.krate;
    let mut rewriter = Rewriter::new(krate);
    rewriter.visit_block_mut(&mut f.body);
    if let Some(mut first) = rewriter.errors.pop() {
        for e in rewriter.errors {
            first.combine(e);
        }
        return Err(first);
    }
    let TaskFn {
        attrs,
        vis,
        name,
        input_pat,
        input_ty,
        ctx,
        ret,
        output_ty,
        body,
    } = f;
    let name_str = name.to_string();
    let bind_ctx = ctx.map(|(pat, ty)| {
        quote! { let #pat: #ty = ::core::clone::Clone::clone(&__dispatcher_ctx); }
    });
    Ok(quote! {
        #(#attrs)*
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #name;

        impl #krate::Task for #name {
            type Input = #input_ty;
            type Output = #output_ty;
            const NAME: &'static str = #name_str;

            fn run(
                &self,
                input: #input_ty,
                ctx: #krate::TaskContext,
            ) -> impl ::core::future::Future<
                Output = ::core::result::Result<#output_ty, #krate::TaskError>,
            > + ::core::marker::Send + 'static {
                #[allow(clippy::needless_return, unused_mut)]
                async fn __dispatcher_task_body(
                    #input_pat: #input_ty,
                    __dispatcher_ctx: #krate::TaskContext,
                ) -> #ret {
                    #bind_ctx
                    #body
                }
                __dispatcher_task_body(input, ctx)
            }
        }
    })
}

/// After an error: the error, plus the task type with an unreachable body so
/// that uses of the task elsewhere do not add a cascade of errors.
fn fallback(error: syn::Error, item: TokenStream) -> TokenStream {
    let error = error.to_compile_error();
    match parse::partial(item) {
        Some(p) => {
            let (attrs, vis, name) = (p.attrs, p.vis, p.name);
            quote! {
                #error
                #(#attrs)*
                #[allow(non_camel_case_types, dead_code)]
                #[derive(Debug, Clone, Copy, Default)]
                #vis struct #name;
            }
        }
        None => error,
    }
}
