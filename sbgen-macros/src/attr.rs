//! The macro's arguments, parsed into [`Options`] whose values remember the span of their literal,
//! so that every later error points at the token the user wrote.

use proc_macro2::{Span, TokenStream};
use sbgen_runtime::spec::{Dtype, Layout, Mask, Remainder};
use std::str::FromStr;
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, ExprLit, Lit};

/// Every key the attribute takes, in the order the errors list them.
pub const KEYS: &[&str] = &[
    "head_dim",
    "dtype",
    "mask",
    "layout",
    "remainder",
    "early_exit_bits",
    "deterministic",
    "kv_cache",
    "cache",
    "seq",
];

/// A value and the span of the literal it came from.
#[derive(Clone, Debug)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

/// The arguments as written; `None` where a key is absent.
#[derive(Default)]
pub struct Options {
    pub head_dim: Option<Spanned<u32>>,
    pub dtype: Option<Spanned<Dtype>>,
    pub mask: Option<Spanned<Mask>>,
    pub layout: Option<Spanned<Layout>>,
    pub remainder: Option<Spanned<Remainder>>,
    pub early_exit_bits: Option<Spanned<u32>>,
    pub deterministic: Option<Spanned<bool>>,
    /// The decode's KV cache: `true` for paged, `false` for contiguous.
    pub kv_cache_paged: Option<Spanned<bool>>,
    pub cache: Option<Spanned<String>>,
    pub seq: Option<Spanned<u64>>,
    /// Valid keys that were written, parsed or not (so a bad `head_dim` is not also "missing").
    pub given: Vec<&'static str>,
}

/// Errors collected over the whole expansion and reported together (`syn::Error::combine`).
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn to_compile_error(&self) -> TokenStream {
        self.0.as_ref().map(syn::Error::to_compile_error).unwrap_or_default()
    }
}

/// Parses `key = literal, ...`. A syntax error (no `=`, a stray token) ends the parse; every other
/// error (unknown key, repeated key, wrong literal type, bad value) is collected and parsing goes on.
pub fn parse(args: TokenStream, errors: &mut Errors) -> Options {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| {
        parse_one(&mut options, &meta, errors);
        Ok(())
    });
    if let Err(e) = parser.parse2(args) {
        errors.push(e);
    }
    options
}

fn parse_one(options: &mut Options, meta: &ParseNestedMeta<'_>, errors: &mut Errors) {
    let path_span = syn::spanned::Spanned::span(&meta.path);
    let key = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_else(|| path_to_string(&meta.path));
    // Given even without a value, so a bare `head_dim` is one error ("needs a value"), not two.
    if let Some(k) = KEYS.iter().find(|k| **k == key) {
        options.given.push(k);
    }
    let value = match meta.value().and_then(|v| v.parse::<Expr>()) {
        Ok(v) => v,
        Err(_) => {
            errors.at(path_span, format!("`{key}` needs a value, e.g. `{}`", example(&key)));
            return;
        }
    };
    let span = syn::spanned::Spanned::span(&value);
    let lit = match &value {
        Expr::Lit(ExprLit { lit, .. }) => Some(lit),
        _ => None,
    };
    match key.as_str() {
        "head_dim" => set(&mut options.head_dim, &key, path_span, int(&key, lit, span), errors),
        "early_exit_bits" => set(&mut options.early_exit_bits, &key, path_span, int(&key, lit, span), errors),
        "seq" => set(&mut options.seq, &key, path_span, int(&key, lit, span), errors),
        "deterministic" => set(&mut options.deterministic, &key, path_span, boolean(&key, lit, span), errors),
        "cache" => set(&mut options.cache, &key, path_span, string(&key, lit, span), errors),
        "dtype" => set(&mut options.dtype, &key, path_span, text_enum(&key, lit, span), errors),
        "mask" => set(&mut options.mask, &key, path_span, text_enum(&key, lit, span), errors),
        "layout" => {
            let parsed = text_enum(&key, lit, span).and_then(|l: Spanned<Layout>| match l.value {
                Layout::Paged => Err(syn::Error::new(
                    l.span,
                    "`layout = \"paged\"` is a decode's KV cache: `layout` is the forward's and backward's \
                     (bhnd, bnhd or thd); for a paged decode write `kv_cache = \"paged\"`",
                )),
                _ => Ok(l),
            });
            set(&mut options.layout, &key, path_span, parsed, errors)
        }
        "remainder" => set(&mut options.remainder, &key, path_span, text_enum(&key, lit, span), errors),
        "kv_cache" => {
            let parsed = string(&key, lit, span).and_then(|v| match v.value.as_str() {
                "contiguous" => Ok(Spanned { value: false, span: v.span }),
                "paged" => Ok(Spanned { value: true, span: v.span }),
                other => Err(syn::Error::new(
                    v.span,
                    format!("`kv_cache` = \"{other}\" is not a valid value: allowed \"contiguous\", \"paged\""),
                )),
            });
            set(&mut options.kv_cache_paged, &key, path_span, parsed, errors)
        }
        _ => {
            let valid = KEYS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            errors.at(path_span, format!("unknown key `{key}`: valid keys are {valid}"));
        }
    }
}

/// Stores a parsed value; a key given twice is an error at its second occurrence (the first value
/// stays). A value that failed to parse still counts as given.
fn set<T>(
    slot: &mut Option<Spanned<T>>,
    key: &str,
    key_span: Span,
    parsed: Result<Spanned<T>, syn::Error>,
    errors: &mut Errors,
) {
    if slot.is_some() {
        errors.at(key_span, format!("`{key}` is set more than once"));
        return;
    }
    match parsed {
        Ok(v) => *slot = Some(v),
        Err(e) => errors.push(e),
    }
}

fn int<T: FromStr>(key: &str, lit: Option<&Lit>, span: Span) -> Result<Spanned<T>, syn::Error>
where
    T::Err: std::fmt::Display,
{
    match lit {
        Some(Lit::Int(i)) => i
            .base10_parse::<T>()
            .map(|value| Spanned { value, span })
            .map_err(|e| syn::Error::new(span, format!("`{key}`: {e}"))),
        _ => Err(syn::Error::new(span, format!("`{key}` takes an integer literal, e.g. `{}`", example(key)))),
    }
}

fn boolean(key: &str, lit: Option<&Lit>, span: Span) -> Result<Spanned<bool>, syn::Error> {
    match lit {
        Some(Lit::Bool(b)) => Ok(Spanned { value: b.value, span }),
        _ => Err(syn::Error::new(span, format!("`{key}` takes `true` or `false`, e.g. `{}`", example(key)))),
    }
}

fn string(key: &str, lit: Option<&Lit>, span: Span) -> Result<Spanned<String>, syn::Error> {
    match lit {
        Some(Lit::Str(s)) => Ok(Spanned { value: s.value(), span }),
        _ => Err(syn::Error::new(span, format!("`{key}` takes a string literal, e.g. `{}`", example(key)))),
    }
}

/// A spec enum from a string literal, with the runtime's own parser (its error lists the values).
fn text_enum<T>(key: &str, lit: Option<&Lit>, span: Span) -> Result<Spanned<T>, syn::Error>
where
    T: FromStr<Err = sbgen_runtime::SpecError>,
{
    match lit {
        Some(Lit::Str(s)) => {
            T::from_str(&s.value()).map(|value| Spanned { value, span }).map_err(|e| syn::Error::new(span, e))
        }
        _ => Err(syn::Error::new(span, format!("`{key}` takes a string literal, e.g. `{}`", example(key)))),
    }
}

fn example(key: &str) -> String {
    match key {
        "head_dim" => "head_dim = 128".into(),
        "dtype" => "dtype = \"bf16\"".into(),
        "mask" => "mask = \"strict\"".into(),
        "layout" => "layout = \"bhnd\"".into(),
        "remainder" => "remainder = \"return\"".into(),
        "early_exit_bits" => "early_exit_bits = 24".into(),
        "deterministic" => "deterministic = true".into(),
        "kv_cache" => "kv_cache = \"paged\"".into(),
        "cache" => "cache = \"sbgen-tune.json\"".into(),
        "seq" => "seq = 4096".into(),
        other => format!("{other} = ..."),
    }
}

fn path_to_string(path: &syn::Path) -> String {
    path.segments.iter().map(|s| s.ident.to_string()).collect::<Vec<_>>().join("::")
}
