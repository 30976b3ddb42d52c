//! One compile-fail case per diagnostic of `#[stick_breaking_attention]` (`tests/ui/<error>.rs` with
//! the expected `.stderr`), and cases that must build and run without a GPU (`tests/ui/pass/`).
//! `TRYBUILD=overwrite cargo test -p sbgen-macros --test ui` rewrites the `.stderr` files.

#[test]
fn ui() {
    // The pass cases read a fixed cache (the macro reads `SBGEN_CACHE` at expansion; trybuild's
    // cargo inherits it): head_dim 128 bf16 tuned on sm_90, nothing else.
    std::env::set_var("SBGEN_CACHE", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tuned-cache.json"));
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
