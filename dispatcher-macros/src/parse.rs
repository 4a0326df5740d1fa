//! Reads a `#[task]` function into a typed form, checking everything a user can
//! get wrong before any code is generated.

use proc_macro2::TokenStream;
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{
    Attribute, Block, FnArg, GenericArgument, ItemFn, Pat, Path, PathArguments, ReturnType, Token,
    Type, Visibility,
};

/// `#[task(crate = path)]`.
pub struct Args {
    /// Where `Task`, `TaskContext` and `TaskError` live; `::dispatcher` by default.
    pub krate: Path,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            krate: syn::parse_quote!(::dispatcher),
        }
    }
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Args> {
        let mut krate: Path = syn::parse_quote!(::dispatcher);
        while !input.is_empty() {
            let key: syn::Ident = if input.peek(Token![crate]) {
                let k: Token![crate] = input.parse()?;
                syn::Ident::new("crate", k.span)
            } else {
                input.parse()?
            };
            if key != "crate" {
                return Err(syn::Error::new_spanned(
                    &key,
                    format!("unknown `#[task]` option `{key}`; the only option is `crate = path`"),
                ));
            }
            input.parse::<Token![=]>()?;
            krate = input.parse()?;
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(Args { krate })
    }
}

/// A checked `#[task]` function.
pub struct TaskFn {
    pub attrs: Vec<Attribute>,
    pub vis: Visibility,
    pub name: syn::Ident,
    pub input_pat: Box<Pat>,
    pub input_ty: Box<Type>,
    /// The optional context parameter.
    pub ctx: Option<(Box<Pat>, Box<Type>)>,
    /// The declared return type, `Result<Out, TaskError>`.
    pub ret: Box<Type>,
    /// `Out`.
    pub output_ty: Type,
    /// The error type of the declared `Result`: `TaskError`, or any type
    /// that converts into it; `None` for a one-argument alias (`Result<Out>`).
    pub error_ty: Option<Type>,
    pub body: Box<Block>,
}

/// The function as written, when it parses as one: what survives an error,
/// for the fallback.
pub fn partial(item: TokenStream) -> Option<ItemFn> {
    syn::parse2(item).ok()
}

pub fn task_fn(item: TokenStream) -> syn::Result<TaskFn> {
    let f: ItemFn = syn::parse2(item)
        .map_err(|e| syn::Error::new(e.span(), "`#[task]` goes on an `async fn`"))?;
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            sig.fn_token,
            "`#[task]` requires an `async fn`",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a `#[task]` fn cannot be generic; write one task per input type",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(syn::Error::new_spanned(
            v,
            "a `#[task]` fn cannot be variadic",
        ));
    }
    let mut typed = Vec::new();
    for arg in &sig.inputs {
        match arg {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new_spanned(
                    r,
                    "a `#[task]` fn cannot take `self`; it must be a free function",
                ))
            }
            FnArg::Typed(t) => typed.push(t.clone()),
        }
    }
    let arity_error = || {
        syn::Error::new(
            if sig.inputs.is_empty() { sig.paren_token.span.join() } else { sig.inputs.span() },
            "a `#[task]` fn takes its input and, optionally, a `TaskContext`: `async fn name(input: In, ctx: TaskContext)`",
        )
    };
    let mut args = typed.into_iter();
    let input = args.next().ok_or_else(arity_error)?;
    let ctx = args.next().map(|c| (c.pat, c.ty));
    if args.next().is_some() {
        return Err(arity_error());
    }
    // A task runs detached from its caller: it owns what it is given.
    if let Type::Reference(r) = &*input.ty {
        return Err(syn::Error::new_spanned(
            r,
            "a `#[task]` fn takes its input by value (`input: In`, not `&In`): the task owns its line",
        ));
    }
    if let Some((_, ty)) = &ctx {
        if let Type::Reference(r) = &**ty {
            return Err(syn::Error::new_spanned(
                r,
                "a `#[task]` fn takes its context by value (`ctx: TaskContext`, not `&TaskContext`); pass `&ctx` on to helpers",
            ));
        }
    }
    let ret = match &sig.output {
        ReturnType::Type(_, ty) => ty.clone(),
        ReturnType::Default => {
            return Err(syn::Error::new_spanned(
                sig,
                "a `#[task]` fn must return `Result<Output, TaskError>`",
            ))
        }
    };
    let (output_ty, error_ty) = result_types(&ret).ok_or_else(|| {
        syn::Error::new_spanned(
            &ret,
            "a `#[task]` fn must return `Result<Output, TaskError>` (or `Result<Output, E>` with `E: Into<TaskError>`)",
        )
    })?;
    Ok(TaskFn {
        attrs: f.attrs,
        vis: f.vis,
        name: f.sig.ident,
        input_pat: input.pat,
        input_ty: input.ty,
        ctx,
        ret,
        output_ty,
        error_ty,
        body: f.block,
    })
}

/// Whether `output` declares a `Result` a task may return.
pub fn returns_result(output: &ReturnType) -> bool {
    matches!(output, ReturnType::Type(_, ty) if result_types(ty).is_some())
}

/// `Out` and `E` of `Result<Out, E>`, or `Out` of an alias `Result<Out>`
/// (any path ending in `Result`).
fn result_types(ty: &Type) -> Option<(Type, Option<Type>)> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    match (types.next(), types.next(), types.next()) {
        (Some(ok), err, None) => Some((ok, err)),
        _ => None,
    }
}
