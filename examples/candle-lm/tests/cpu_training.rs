//! The example's CPU default end to end, as CI runs it: 150 training steps of the small model must
//! bring the loss under the binary's target (2.6), then it generates through the KV caches. Run as a
//! test, the binary builds with the workspace's test features (a separate `cargo run` rebuilt
//! candle's crates with other features: 7 more minutes of CI).

use std::process::Command;

#[test]
fn the_cpu_default_trains_below_its_target_and_generates() {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-lm"))
        .args(["--steps", "150", "--generate", "80"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("candle-lm starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "candle-lm failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("trained 150 steps") && stdout.contains("generated 80 chars"), "{stdout}");
}
