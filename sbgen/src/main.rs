//! The `sbgen` binary; everything lives in [`sbgen::cli`].

fn main() -> std::process::ExitCode {
    sbgen::cli::main()
}
