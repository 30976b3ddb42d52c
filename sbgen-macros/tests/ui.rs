//! One compile-fail case per diagnostic of `#[stick_breaking_attention]` (`tests/ui/<error>.rs` with
//! the expected `.stderr`), and cases that must build and run without a GPU (`tests/ui/pass/`).
//! `TRYBUILD=overwrite cargo test -p sbgen-macros --test ui` rewrites the `.stderr` files.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
