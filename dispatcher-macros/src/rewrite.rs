//! Replaces `yield_request!(requests)` in a task body with a send on the task's
//! context, and refuses it where it cannot work.
//!
//! ```text
//! // Input:
//! let r = yield_request!(req);
//! // Output:
//! let r = (::dispatcher::TaskContext::send(&__dispatcher_ctx, req).await);
//! ```
//!
//! Like async-stream, the rewriter does not descend into closures, `async`
//! blocks or nested items: an `.await` there would belong to another future.
//! It does descend into other macros' arguments when they parse as
//! expressions (`format!("{}", yield_request!(r)?.text())`, `vec![..]`).

use proc_macro2::TokenStream;
use quote::quote;
use syn::punctuated::Punctuated;
use syn::visit_mut::{self, VisitMut};
use syn::{Expr, Macro, Path, Stmt, Token};

const CLOSURE: &str = "a closure";

pub struct Rewriter<'a> {
    pub krate: &'a Path,
    pub errors: Vec<syn::Error>,
    /// What the visitor is inside of, when that forbids `yield_request!`.
    inside: Option<&'static str>,
}

impl<'a> Rewriter<'a> {
    pub fn new(krate: &'a Path) -> Self {
        Rewriter {
            krate,
            errors: Vec::new(),
            inside: None,
        }
    }

    fn replacement(&mut self, mac: &Macro) -> Option<Expr> {
        if let Some(place) = self.inside {
            // In a closure the likely intent is one request per item of an
            // iterator: the simplest fix comes first.
            let first = if place == CLOSURE {
                "to send one request per item, build the requests in the closure and send them all at once from the task's body: `let responses = yield_request!(requests)?;` with `requests: Vec<Request>` gives a `Vec<Response>` in the same order. Otherwise "
            } else {
                ""
            };
            self.errors.push(syn::Error::new_spanned(
                mac,
                format!(
                    "`yield_request!` cannot be used inside {place}; {first}move the request into the body of the `#[task]` fn itself, or send it from an `async fn helper(ctx: &TaskContext, ..)` with `ctx.send(request).await` (run several with `tokio::join!`)"
                ),
            ));
            return None;
        }
        let args = match macro_args(mac) {
            Ok(args) => args,
            Err(e) => {
                self.errors.push(e);
                return None;
            }
        };
        let mut args = args.into_iter();
        let (Some(requests), None) = (args.next(), args.next()) else {
            self.errors.push(syn::Error::new_spanned(
                &mac.tokens,
                "`yield_request!` takes one request, or several as an array or a `Vec`: `yield_request!([a, b])`",
            ));
            return None;
        };
        let krate = self.krate;
        let tokens: TokenStream = quote! {
            (#krate::TaskContext::send(&__dispatcher_ctx, #requests).await)
        };
        Some(syn::parse2(tokens).expect("a parenthesized await expression parses"))
    }
}

fn is_yield_request(mac: &Macro) -> bool {
    mac.path.is_ident("yield_request")
        || mac
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "yield_request")
}

/// Whether `tokens` name `yield_request` anywhere (a cheap test before
/// parsing another macro's arguments).
fn mentions_yield_request(tokens: &TokenStream) -> bool {
    tokens.clone().into_iter().any(|t| match t {
        proc_macro2::TokenTree::Ident(i) => i == "yield_request",
        proc_macro2::TokenTree::Group(g) => mentions_yield_request(&g.stream()),
        _ => false,
    })
}

/// A macro's arguments, when they are comma-separated expressions.
fn macro_args(mac: &Macro) -> syn::Result<Punctuated<Expr, Token![,]>> {
    mac.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated)
}

/// Visits the arguments of another macro (`format!`, `vec!`, `println!`,
/// ...) with `visitor` when they mention `yield_request` and parse as
/// comma-separated expressions; elsewhere the fallback macro says where it
/// belongs.
fn visit_macro_args(mac: &mut Macro, visitor: &mut impl VisitMut) {
    if !mentions_yield_request(&mac.tokens) {
        return;
    }
    let Ok(mut args) = macro_args(mac) else {
        return;
    };
    for arg in args.iter_mut() {
        visitor.visit_expr_mut(arg);
    }
    mac.tokens = quote!(#args);
}

impl VisitMut for Rewriter<'_> {
    fn visit_macro_mut(&mut self, mac: &mut Macro) {
        visit_macro_args(mac, self);
    }

    fn visit_expr_mut(&mut self, expr: &mut Expr) {
        match expr {
            Expr::Macro(m) if is_yield_request(&m.mac) => {
                if let Some(new) = self.replacement(&m.mac) {
                    *expr = new;
                }
            }
            Expr::Closure(_) => self.within(CLOSURE, |v| visit_mut::visit_expr_mut(v, expr)),
            Expr::Async(_) => {
                self.within("an `async` block", |v| visit_mut::visit_expr_mut(v, expr))
            }
            _ => visit_mut::visit_expr_mut(self, expr),
        }
    }

    fn visit_stmt_mut(&mut self, stmt: &mut Stmt) {
        if let Stmt::Macro(m) = stmt {
            if is_yield_request(&m.mac) {
                if let Some(new) = self.replacement(&m.mac) {
                    *stmt = Stmt::Expr(new, m.semi_token.or_else(|| Some(Default::default())));
                }
                return;
            }
        }
        visit_mut::visit_stmt_mut(self, stmt);
    }

    fn visit_item_mut(&mut self, _item: &mut syn::Item) {
        // Nested items are other functions: `yield_request!` there hits the
        // fallback macro, which says where it belongs.
    }
}

impl Rewriter<'_> {
    fn within(&mut self, place: &'static str, f: impl FnOnce(&mut Self)) {
        // The outermost place is the one worth naming.
        let outer = self.inside;
        self.inside = Some(outer.unwrap_or(place));
        f(self);
        self.inside = outer;
    }
}

/// Replaces every `yield_request!`, wherever it is, with a stand-in of the
/// same type (`TaskContext::stand_in(requests)`): the body of the stand-in fn
/// emitted after an error, which must type-check without adding errors of its
/// own, and keep using what the body uses.
pub struct Stripper<'a> {
    pub krate: &'a Path,
}

impl Stripper<'_> {
    fn stand_in(&self, mac: &Macro) -> Expr {
        let krate = self.krate;
        let args = macro_args(mac).unwrap_or_default();
        let mut args = args.into_iter();
        match args.next() {
            Some(first) => {
                let rest: Vec<Expr> = args.collect();
                syn::parse_quote!({ let _ = (#(&#rest,)*); #krate::TaskContext::stand_in(#first) })
            }
            None => syn::parse_quote!(::core::unreachable!()),
        }
    }
}

impl VisitMut for Stripper<'_> {
    fn visit_expr_mut(&mut self, expr: &mut Expr) {
        if let Expr::Macro(m) = expr {
            if is_yield_request(&m.mac) {
                *expr = self.stand_in(&m.mac);
                return;
            }
        }
        visit_mut::visit_expr_mut(self, expr);
    }

    fn visit_stmt_mut(&mut self, stmt: &mut Stmt) {
        if let Stmt::Macro(m) = stmt {
            if is_yield_request(&m.mac) {
                *stmt = Stmt::Expr(self.stand_in(&m.mac), Some(Default::default()));
                return;
            }
        }
        visit_mut::visit_stmt_mut(self, stmt);
    }

    fn visit_macro_mut(&mut self, mac: &mut Macro) {
        visit_macro_args(mac, self);
    }
}

/// Whether `body` is written to return a `Result`: it uses `?`, or calls
/// `Ok(..)` or `Err(..)`, outside closures, `async` blocks and nested items.
pub fn produces_result(body: &syn::Block) -> bool {
    // A look, not a change: `visit-mut` is the syn feature at hand.
    struct Finder(bool);
    impl VisitMut for Finder {
        fn visit_expr_mut(&mut self, expr: &mut Expr) {
            match expr {
                Expr::Try(_) => self.0 = true,
                Expr::Call(call) if is_ok_or_err(&call.func) => self.0 = true,
                Expr::Closure(_) | Expr::Async(_) => {}
                _ => visit_mut::visit_expr_mut(self, expr),
            }
        }

        fn visit_item_mut(&mut self, _item: &mut syn::Item) {}
    }
    fn is_ok_or_err(func: &Expr) -> bool {
        matches!(func, Expr::Path(p) if p.path.is_ident("Ok") || p.path.is_ident("Err"))
    }
    let mut finder = Finder(false);
    finder.visit_block_mut(&mut body.clone());
    finder.0
}
