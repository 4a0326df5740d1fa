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

use proc_macro2::TokenStream;
use quote::quote;
use syn::punctuated::Punctuated;
use syn::visit_mut::{self, VisitMut};
use syn::{Expr, Macro, Path, Stmt, Token};

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
            self.errors.push(syn::Error::new_spanned(
                mac,
                format!(
                    "`yield_request!` cannot be used inside {place}; move the request into the body of the `#[task]` fn itself"
                ),
            ));
            return None;
        }
        let args = match mac.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated) {
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

impl VisitMut for Rewriter<'_> {
    fn visit_expr_mut(&mut self, expr: &mut Expr) {
        match expr {
            Expr::Macro(m) if is_yield_request(&m.mac) => {
                if let Some(new) = self.replacement(&m.mac) {
                    *expr = new;
                }
            }
            Expr::Closure(_) => self.within("a closure", |v| visit_mut::visit_expr_mut(v, expr)),
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
