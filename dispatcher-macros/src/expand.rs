//! Writes the task type for a checked `#[task]` fn.
//!
//! ```text
//! // Input:
//! #[task]
//! pub async fn judge(input: In, ctx: TaskContext) -> Result<Out, TaskError> { body }
//! // Output:
//! #[allow(non_camel_case_types)]
//! #[derive(Debug, Clone, Copy, Default)]
//! pub struct judge {}
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
//! /// The task `judge`, as a value (a task itself: `impl Task for F: Fn() -> T`).
//! pub const fn judge() -> judge { judge {} }
//! ```
//!
//! The struct has braces so that it lives in the type namespace only: the
//! value `judge` is the function, and a `let judge = ..` elsewhere shadows it
//! (a unit struct would make that `let` a pattern that fails to compile).

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;

use crate::parse::{self, Args, TaskFn};
use crate::rewrite::{self, Rewriter, Stripper};

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
    let cfgs = cfg_attrs(&attrs);
    let value = value_fn(&attrs, &vis, &name);
    Ok(quote! {
        #(#attrs)*
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #name {}

        #(#cfgs)*
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

        #value
    })
}

/// The attributes that decide whether an item exists, for every item written.
fn cfg_attrs(attrs: &[syn::Attribute]) -> Vec<&syn::Attribute> {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg") || a.path().is_ident("cfg_attr"))
        .collect()
}

/// `fn name() -> name`: what the task is referred to by as a value.
fn value_fn(attrs: &[syn::Attribute], vis: &syn::Visibility, name: &syn::Ident) -> TokenStream {
    let cfgs = cfg_attrs(attrs);
    let doc = format!(
        "The task `{name}` as a value, to pass to `run_tasks(&[&{name}])` or `TaskTest::new({name})`: \
         a fn that makes a task is that task."
    );
    quote! {
        #(#cfgs)*
        #[doc = #doc]
        #[allow(dead_code)]
        #[inline]
        #vis const fn #name() -> #name {
            #name {}
        }
    }
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
        // A return type that was refused is reported already: a body written
        // for the right one (`?`, `Ok(..)`) must not add errors of its own.
        if !parse::returns_result(&sig.output) && rewrite::produces_result(&f.block) {
            sig.output = syn::parse_quote! {
                -> ::core::result::Result<impl ::core::marker::Sized, #krate::TaskError>
            };
        }
        let mut body = f.block.clone();
        Stripper { krate }.visit_block_mut(&mut body);
        quote! {
            #[allow(dead_code, non_snake_case, unused, unreachable_code, clippy::all)]
            #sig #body
        }
    });
    let cfgs = cfg_attrs(attrs);
    let value = value_fn(attrs, vis, name);
    quote! {
        #error
        #(#attrs)*
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #name {}

        #(#cfgs)*
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

        #value

        #stand_in
    }
}
