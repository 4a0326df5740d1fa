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
//!         // With an error type of its own, converted into `TaskError`:
//!         async move { __dispatcher_task_body(input, ctx).await.map_err(Into::into) }
//!     }
//! }
//! ```

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;

use crate::parse::{self, Args, TaskFn};
use crate::rewrite::{Rewriter, Stripper};

pub fn task(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = match syn::parse2::<Args>(args) {
        Ok(args) => args,
        Err(e) => return fallback(e, &Args::default(), item),
    };
    match parse::task_fn(item.clone()).and_then(|f| expand(&args, f)) {
        Ok(tokens) => tokens,
        Err(e) => fallback(e, &args, item),
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
        error_ty,
        body,
    } = f;
    let name_str = name.to_string();
    let bind_ctx = ctx.map(|(pat, ty)| {
        quote! { let #pat: #ty = ::core::clone::Clone::clone(&__dispatcher_ctx); }
    });
    // The task's own error type converts into `TaskError`; a type that does
    // not is reported on the return type.
    let run_body = match &error_ty {
        Some(e) => quote_spanned! {e.span()=>
            async move {
                ::core::result::Result::map_err(
                    __dispatcher_task_body(input, ctx).await,
                    <#e as ::core::convert::Into<#krate::TaskError>>::into,
                )
            }
        },
        None => quote! { __dispatcher_task_body(input, ctx) },
    };
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
                async fn __dispatcher_task_body(
                    #input_pat: #input_ty,
                    __dispatcher_ctx: #krate::TaskContext,
                ) -> #ret {
                    #bind_ctx
                    #body
                }
                #run_body
            }
        }
    })
}

/// After an error: the error, the task type with an unreachable `impl Task`
/// (so that uses of the task elsewhere, such as `run_tasks(&[&name])`, add no
/// errors of their own), and a stand-in fn with the signature and body as
/// written but `yield_request!` taken out (so that the imports they use are not
/// reported unused). The one error is the only message.
fn fallback(error: syn::Error, args: &Args, item: TokenStream) -> TokenStream {
    let error = error.to_compile_error();
    let Some(f) = parse::partial(item) else {
        return error;
    };
    let krate = &args.krate;
    let (attrs, vis, name) = (&f.attrs, &f.vis, &f.sig.ident);
    let name_str = name.to_string();
    let stand_in = (f.sig.receiver().is_none()).then(|| {
        let mut sig = f.sig.clone();
        sig.ident = format_ident!("__dispatcher_stand_in_for_{}", name);
        sig.asyncness = Some(Default::default());
        let mut body = f.block.clone();
        Stripper { krate }.visit_block_mut(&mut body);
        quote! {
            #[allow(dead_code, non_snake_case, unused, unreachable_code, clippy::all)]
            #sig #body
        }
    });
    quote! {
        #error
        #(#attrs)*
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #name;

        impl #krate::Task for #name {
            type Input = ();
            type Output = ();
            const NAME: &'static str = #name_str;

            fn run(
                &self,
                _input: (),
                _ctx: #krate::TaskContext,
            ) -> impl ::core::future::Future<
                Output = ::core::result::Result<(), #krate::TaskError>,
            > + ::core::marker::Send + 'static {
                async { ::core::unreachable!("`{}` did not compile", #name_str) }
            }
        }

        #stand_in
    }
}
