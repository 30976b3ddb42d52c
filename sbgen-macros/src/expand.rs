//! Code generation: the user's struct, unchanged, plus an `impl` with the embedded kernels and typed
//! `forward` / `backward` / `decode` over `::sbgen_runtime::launcher`. The generated code names only
//! `::sbgen_runtime` (and `::core` / `::std`), so a user's crate needs `sbgen-runtime` (feature
//! `cuda`) and this macro, plus its own choice of cudarc's CUDA version.

use crate::attr::{self, Errors};
use crate::kernels::{self, Embed};
use crate::valid;
use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use sbgen_runtime::spec::{Dtype, Layout, Mask, Pass, Remainder, Spec};

pub fn stick_breaking_attention(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let options = attr::parse(args, &mut errors);
    let target = match syn::parse2::<syn::ItemStruct>(item.clone()) {
        Ok(s) => {
            if !s.generics.params.is_empty() || s.generics.where_clause.is_some() {
                errors.at(
                    syn::spanned::Spanned::span(&s.generics),
                    "#[stick_breaking_attention] takes a struct without generics, e.g. `pub struct SbAttn;`",
                );
                // No stubs: `impl SbAttn` without its generics would add a second, confusing error.
                None
            } else {
                Some(s.ident)
            }
        }
        Err(e) => {
            errors.at(e.span(), "#[stick_breaking_attention] goes on a struct, e.g. `pub struct SbAttn;`");
            None
        }
    };
    let checked = valid::check(&options, &mut errors);
    let found = checked.as_ref().and_then(|_| kernels::find_cache(&options, &mut errors));

    let (Some(name), Some(checked), Some(found), true) = (&target, &checked, &found, errors.is_empty()) else {
        // The user's item is emitted as written, with typed stubs when it is a struct, so the IDE
        // keeps working and calls to `forward` / `backward` raise no follow-on errors.
        let stubs = target
            .as_ref()
            .map(|name| stubs(name, valid::dtype(&options), valid::layout(&options)))
            .unwrap_or_default();
        let errors = errors.to_compile_error();
        return quote! { #item #stubs #errors };
    };

    let backward_spec = checked.backward;
    let error_span = options.cache.as_ref().map_or(Span::call_site(), |c| c.span);
    let ptx_dir = std::env::var_os("SBGEN_PTX_DIR").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let mut sets = Vec::new();
    let mut inputs: Vec<std::path::PathBuf> = found.file.iter().cloned().collect();
    for spec in [&checked.forward, &backward_spec, &checked.decode] {
        match kernels::pick(&found.cache, spec, checked.seq, ptx_dir.as_deref()) {
            Ok((k, files)) => {
                sets.push(k);
                inputs.extend(files);
            }
            Err(message) => errors.at(error_span, message),
        }
    }
    if !errors.is_empty() {
        let stubs = stubs(name, checked.forward.dtype, checked.forward.layout);
        let errors = errors.to_compile_error();
        return quote! { #item #stubs #errors };
    }

    let build_inputs = inputs.iter().map(|path| {
        let path = path.to_string_lossy().into_owned();
        quote! { const _: &[u8] = ::core::include_bytes!(#path); }
    });
    let element = element(checked.forward.dtype);
    let forward_spec = spec_tokens(&checked.forward);
    let backward_spec_tokens = spec_tokens(&backward_spec);
    let owner = name.to_string();
    let forward_set = set_fn(&format_ident!("forward_kernels"), &owner, &sets[0]);
    let backward_set = set_fn(&format_ident!("backward_kernels"), &owner, &sets[1]);
    let decode_set = set_fn(&format_ident!("decode_kernels"), &owner, &sets[2]);
    let forward_doc = kernel_doc("forward", &sets[0]);
    let backward_doc = kernel_doc("backward", &sets[1]);
    let decode_doc = kernel_doc("decode", &sets[2]);
    let decode_spec_tokens = spec_tokens(&checked.decode);
    let decode_spec_doc = format!("The spec of the decode kernels (`{}`).", checked.decode.slug());
    let decode_sig = decode_signature(&element, true);
    let cache_doc = cache_doc(checked.decode.layout);
    let forward_spec_doc = format!("The spec of the forward kernels (`{}`).", checked.forward.slug());
    let backward_spec_doc = format!("The spec of the backward kernels (`{}`).", backward_spec.slug());
    let rt = quote!(::sbgen_runtime);
    let l = quote!(::sbgen_runtime::launcher);
    let layout = checked.forward.layout;
    let forward_sig = signature(&format_ident!("forward"), &format_ident!("ForwardArgs"), &element, layout, true);
    let backward_sig = signature(&format_ident!("backward"), &format_ident!("BackwardArgs"), &element, layout, true);
    let forward_args = launch_args(&format_ident!("ForwardArgs"), layout);
    let backward_args = launch_args(&format_ident!("BackwardArgs"), layout);
    let varlen_doc = varlen_doc(layout);

    quote! {
        #item

        // Build inputs: the tuning cache and PTX files read at expansion, `SBGEN_CACHE` and
        // `SBGEN_PTX_DIR` (rustc records them in the crate's dep-info, so re-tuning or pointing
        // elsewhere rebuilds the crate).
        const _: () = {
            #(#build_inputs)*
            const _: ::core::option::Option<&str> = ::core::option_env!("SBGEN_CACHE");
            const _: ::core::option::Option<&str> = ::core::option_env!("SBGEN_PTX_DIR");
        };

        #[automatically_derived]
        impl #name {
            #[doc = #forward_spec_doc]
            pub const FORWARD_SPEC: #rt::Spec = #forward_spec;
            #[doc = #backward_spec_doc]
            pub const BACKWARD_SPEC: #rt::Spec = #backward_spec_tokens;
            #[doc = #decode_spec_doc]
            pub const DECODE_SPEC: #rt::Spec = #decode_spec_tokens;

            #forward_set
            #backward_set
            #decode_set

            /// The forward kernel `forward` launches on `launcher`'s device for sequence length `seq`.
            pub fn forward_kernel(launcher: &#l::Launcher, seq: usize)
                -> ::core::result::Result<&'static #l::KernelBinary, #l::LaunchError> {
                Self::forward_kernels().pick(launcher.store().compute_capability(), seq)
            }

            /// The backward kernel `backward` launches on `launcher`'s device for sequence length `seq`.
            pub fn backward_kernel(launcher: &#l::Launcher, seq: usize)
                -> ::core::result::Result<&'static #l::KernelBinary, #l::LaunchError> {
                Self::backward_kernels().pick(launcher.store().compute_capability(), seq)
            }

            /// The decode kernel `decode` launches on `launcher`'s device for a cache of `capacity`
            /// tokens per sequence.
            pub fn decode_kernel(launcher: &#l::Launcher, capacity: usize)
                -> ::core::result::Result<&'static #l::KernelBinary, #l::LaunchError> {
                Self::decode_kernels().pick(launcher.store().compute_capability(), capacity)
            }

            /// Stick-breaking attention forward: `o`, `rem`, `log2_rem` (and `o_saved` when given)
            /// from `q`, `k`, `v` (`shape.kv_heads` K/V heads: grouped-query attention when fewer
            /// than `shape.heads`). Asynchronous on the launcher's stream; every input is checked
            /// first. `scale`: `None` is 1/sqrt(head_dim).
            #[doc = #varlen_doc]
            #[doc = #forward_doc]
            #forward_sig {
                let kernel = Self::forward_kernel(launcher, shape.seq)?;
                launcher.forward::<#element>(kernel, shape, #forward_args, scale)
            }

            /// Stick-breaking attention backward: `dq`, `dk`, `dv` from the forward's inputs, its
            /// outputs (`o`, `o_saved`, `log2_rem`) and `d_o`; dk and dv sum over each K/V head's
            /// group of query heads. Asynchronous on the launcher's stream.
            #[doc = #varlen_doc]
            #[doc = #backward_doc]
            #backward_sig {
                let kernel = Self::backward_kernel(launcher, shape.seq)?;
                launcher.backward::<#element>(kernel, shape, #backward_args, scale)
            }

            /// Stick-breaking attention decode: `o` and `rem` (`[B, H, D]`, `[B, H]`) of each
            /// sequence's newest token, whose key and value are already the last of its
            /// `seqlens_k[b]` cached tokens, against the KV cache (docs/math.md#decode; split over
            /// key chunks across the GPU, early exit when the spec has it). Asynchronous on the
            /// launcher's stream, one launch (capturable in a CUDA graph after a first call); every
            /// input is checked first. Returns the split it ran. `scale`: `None` is 1/sqrt(head_dim).
            #[doc = #cache_doc]
            #[doc = #decode_doc]
            #decode_sig {
                let kernel = Self::decode_kernel(launcher, args.cache.capacity())?;
                launcher.decode::<#element>(kernel, shape, args, #l::DecodeSplit::default(), scale)
            }
        }
    }
}

/// `pub fn decode(launcher, shape, args: DecodeArgs<'_, element>, scale) -> Result<DecodePlan,
/// LaunchError>`; `named` false: every parameter is `_` (the stubs).
fn decode_signature(element: &TokenStream, named: bool) -> TokenStream {
    let l = quote!(::sbgen_runtime::launcher);
    let param = |n: &str| if named { format_ident!("{n}").into_token_stream() } else { quote!(_) };
    let (launcher, shape, args, scale) = (param("launcher"), param("shape"), param("args"), param("scale"));
    quote! {
        pub fn decode(
            #launcher: &#l::Launcher,
            #shape: #l::DecodeShape,
            #args: #l::DecodeArgs<'_, #element>,
            #scale: ::core::option::Option<f32>,
        ) -> ::core::result::Result<#l::DecodePlan, #l::LaunchError>
    }
}

fn cache_doc(layout: Layout) -> String {
    let cache = match layout {
        Layout::Paged => {
            "a paged cache: `k_cache`, `v_cache` `[num_pages, page_size, kv_heads, head_dim]` \
                          with `block_table` (i32 `[batch, max_pages]`) and `cache: KvCacheGeometry::Paged`; \
                          `page_size` a multiple of 16"
        }
        Layout::Bnhd => {
            "a contiguous cache `[batch, capacity, kv_heads, head_dim]` (`cache: \
                         KvCacheGeometry::Contiguous`, `block_table: None`)"
        }
        _ => {
            "a contiguous cache `[batch, kv_heads, capacity, head_dim]` (`cache: \
              KvCacheGeometry::Contiguous`, `block_table: None`)"
        }
    };
    format!(
        "\n\nThis struct's decode reads {cache}. Check host copies of `seqlens_k` (and the block table) with \
         `sbgen_runtime::kv_cache::check_kv_tables` before uploading them: the launcher does not read them back."
    )
}

/// `fn <name>() -> &'static EmbeddedSet` with the kernels in statics.
fn set_fn(fn_name: &Ident, owner: &str, kernels: &[Embed]) -> TokenStream {
    let l = quote!(::sbgen_runtime::launcher);
    let n = kernels.len();
    let entries = kernels.iter().map(|k| {
        let arch = match k.arch {
            Some(a) => {
                let a = a.to_string();
                quote!(::core::option::Option::Some(#a))
            }
            None => quote!(::core::option::Option::None),
        };
        let bucket = match k.seq_bucket {
            Some(b) => {
                let b = b as u64;
                quote!(::core::option::Option::Some(#b))
            }
            None => quote!(::core::option::Option::None),
        };
        let manifest = &k.manifest_json;
        let ptx = k.ptx.iter().map(|(t, p)| quote!((#t, #p)));
        let source = match &k.cuda_source {
            Some(s) => quote!(::core::option::Option::Some(#s)),
            None => quote!(::core::option::Option::None),
        };
        quote! {
            #l::EmbeddedKernel {
                arch: #arch,
                seq_bucket: #bucket,
                manifest_json: #manifest,
                ptx: &[#(#ptx),*],
                cuda_source: #source,
            }
        }
    });
    quote! {
        /// Every embedded kernel of this pass (`.binaries()` parses them; `.pick(cc, seq)` chooses).
        pub fn #fn_name() -> &'static #l::EmbeddedSet {
            static KERNELS: [#l::EmbeddedKernel; #n] = [#(#entries),*];
            static SET: #l::EmbeddedSet = #l::EmbeddedSet::new(#owner, &KERNELS);
            &SET
        }
    }
}

/// `forward` / `backward` with the right types and no kernels, emitted next to the errors.
fn stubs(name: &Ident, dtype: Dtype, layout: Layout) -> TokenStream {
    let element = element(dtype);
    let forward = signature(&format_ident!("forward"), &format_ident!("ForwardArgs"), &element, layout, false);
    let backward = signature(&format_ident!("backward"), &format_ident!("BackwardArgs"), &element, layout, false);
    let decode = decode_signature(&element, false);
    quote! {
        #[automatically_derived]
        impl #name {
            #forward {
                ::core::unreachable!("#[stick_breaking_attention] failed to expand")
            }
            #backward {
                ::core::unreachable!("#[stick_breaking_attention] failed to expand")
            }
            #decode {
                ::core::unreachable!("#[stick_breaking_attention] failed to expand")
            }
        }
    }
}

/// `pub fn <name>(launcher, shape, args: <Args><'_, element>, scale) -> Result<(), LaunchError>`; a
/// THD spec's functions take the packed batch's `cu_seqlens` and token count after `args`. `named`
/// false: every parameter is `_` (the stubs).
fn signature(name: &Ident, args_struct: &Ident, element: &TokenStream, layout: Layout, named: bool) -> TokenStream {
    let l = quote!(::sbgen_runtime::launcher);
    let param = |n: &str| if named { format_ident!("{n}").into_token_stream() } else { quote!(_) };
    let (launcher, shape, args, scale) = (param("launcher"), param("shape"), param("args"), param("scale"));
    let (generics, lifetime, varlen) = match layout {
        // attr.rs refuses the paged layout (a decode's cache) before expansion.
        Layout::Bhnd | Layout::Bnhd | Layout::Paged => (quote!(), quote!('_), quote!()),
        Layout::Thd => {
            let (cu_seqlens, total_tokens) = (param("cu_seqlens"), param("total_tokens"));
            (
                quote!(<'a>),
                quote!('a),
                quote! {
                    #cu_seqlens: &'a ::sbgen_runtime::cudarc::driver::CudaView<'a, i32>,
                    #total_tokens: usize,
                },
            )
        }
    };
    quote! {
        pub fn #name #generics(
            #launcher: &#l::Launcher,
            #shape: #l::Shape,
            #args: #l::#args_struct<#lifetime, #element>,
            #varlen
            #scale: ::core::option::Option<f32>,
        ) -> ::core::result::Result<(), #l::LaunchError>
    }
}

/// The args an entry point launches with: the caller's (the launcher refuses a `varlen` for a dense
/// layout), or for THD the caller's with `varlen` set from the `cu_seqlens` and `total_tokens`
/// parameters.
fn launch_args(args_struct: &Ident, layout: Layout) -> TokenStream {
    let l = quote!(::sbgen_runtime::launcher);
    match layout {
        Layout::Bhnd | Layout::Bnhd | Layout::Paged => quote!(args),
        Layout::Thd => quote! {
            #l::#args_struct {
                varlen: ::core::option::Option::Some(#l::Varlen { cu_seqlens, total_tokens }),
                ..args
            }
        },
    }
}

fn varlen_doc(layout: Layout) -> String {
    match layout {
        Layout::Bhnd | Layout::Bnhd | Layout::Paged => {
            "\n\n`args.varlen` must be `None` (this layout is dense; the launcher refuses a `cu_seqlens`).".into()
        }
        Layout::Thd => "\n\nPacked variable-length batch (THD): tensors `[total_tokens, heads, head_dim]`, rem and \
                        log2_rem `[heads, total_tokens]`; sequence b is tokens `cu_seqlens[b] .. cu_seqlens[b + 1]` \
                        (i32, device memory, `shape.batch + 1` entries). `shape.batch` is the number of sequences, \
                        `shape.seq` the longest (max_seqlen, which also picks the kernel). The `cu_seqlens` and \
                        `total_tokens` parameters replace `args.varlen`. Check a host `cu_seqlens` with \
                        `sbgen_runtime::varlen::check_cu_seqlens` before uploading it: the launcher does not read \
                        it back, and the kernels skip a sequence whose bounds are out of range (its outputs are then not \
                        meaningful)."
            .into(),
    }
}

fn kernel_doc(pass: &str, kernels: &[Embed]) -> String {
    let mut doc = format!("\n\nEmbedded {pass} kernels:\n");
    for k in kernels {
        let from = match (k.arch, k.seq_bucket) {
            (Some(a), Some(b)) => format!("tuned on {a}, sequence lengths up to {b}"),
            (Some(a), None) => format!("default schedule, PTX for {a}"),
            (None, _) => "default schedule, CUDA source compiled by NVRTC at first use".to_string(),
        };
        doc.push_str(&format!("- `{}` ({from})\n", k.name));
    }
    doc
}

fn element(dtype: Dtype) -> TokenStream {
    match dtype {
        Dtype::Bf16 => quote!(::sbgen_runtime::half::bf16),
        Dtype::F16 => quote!(::sbgen_runtime::half::f16),
    }
}

fn spec_tokens(spec: &Spec) -> TokenStream {
    let head_dim = spec.head_dim;
    let dtype = match spec.dtype {
        Dtype::Bf16 => quote!(Bf16),
        Dtype::F16 => quote!(F16),
    };
    let mask = match spec.mask {
        Mask::Strict => quote!(Strict),
        Mask::AttendCurrent => quote!(AttendCurrent),
    };
    let layout = match spec.layout {
        Layout::Bhnd => quote!(Bhnd),
        Layout::Bnhd => quote!(Bnhd),
        Layout::Thd => quote!(Thd),
        Layout::Paged => quote!(Paged),
    };
    let remainder = match spec.remainder {
        Remainder::Return => quote!(Return),
        Remainder::Fuse => quote!(Fuse),
    };
    let pass = match spec.pass {
        Pass::Forward => quote!(Forward),
        Pass::Backward => quote!(Backward),
        Pass::Decode => quote!(Decode),
        Pass::Segment => quote!(Segment),
        Pass::SegmentBackward => quote!(SegmentBackward),
    };
    let early_exit_bits = match spec.early_exit_bits {
        Some(t) => quote!(::core::option::Option::Some(#t)),
        None => quote!(::core::option::Option::None),
    };
    let deterministic = spec.deterministic;
    quote! {
        ::sbgen_runtime::Spec {
            head_dim: #head_dim,
            dtype: ::sbgen_runtime::Dtype::#dtype,
            mask: ::sbgen_runtime::Mask::#mask,
            layout: ::sbgen_runtime::Layout::#layout,
            remainder: ::sbgen_runtime::Remainder::#remainder,
            pass: ::sbgen_runtime::Pass::#pass,
            early_exit_bits: #early_exit_bits,
            deterministic: #deterministic,
        }
    }
}
