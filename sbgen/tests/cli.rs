//! The `sbgen` binary end to end: exit codes, messages, files written.

use std::path::PathBuf;
use std::process::{Command, Output};

fn sbgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbgen")).args(args).output().expect("the sbgen binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh folder under the target's temp dir, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn unsupported_head_dim_is_a_usage_error_naming_the_field() {
    for args in [
        &["emit", "--head-dim", "300", "--dtype", "bf16"][..],
        &["tune", "--gpu", "sm_90", "--compile-only", "--head-dim", "64,300"][..],
    ] {
        let out = sbgen(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("`head_dim` = 300") && err.contains("1..=256"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn unknown_dtype_is_a_usage_error_listing_the_allowed_values() {
    let out = sbgen(&["emit", "--head-dim", "64", "--dtype", "int7"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`dtype` = `int7`") && err.contains("bf16, f16"), "{err}");
}

#[test]
fn invalid_schedule_values_are_usage_errors() {
    let dir = scratch("bad-schedule");
    let out_dir = dir.to_str().unwrap();
    for (flag, value, field) in
        [("--block-n", "48", "`block_n`"), ("--stages", "9", "`stages`"), ("--softplus", "fast", "`softplus`")]
    {
        let out = sbgen(&["emit", "--head-dim", "64", "--dtype", "f16", flag, value, "--out", out_dir]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(field), "{err}");
    }
    assert!(!dir.exists(), "nothing is written for an invalid kernel");
}

#[test]
fn emit_writes_sources_and_manifest_and_skips_unchanged_files() {
    let dir = scratch("emit");
    let out_dir = dir.to_str().unwrap();
    let args = ["emit", "--head-dim", "128", "--dtype", "bf16", "--mask", "attend_current", "--out", out_dir];
    let out = sbgen(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let kernels = manifest.as_array().expect("a list of kernel manifests");
    assert_eq!(kernels.len(), 2, "forward and backward by default");
    for (kernel, pass) in kernels.iter().zip(["fwd", "bwd"]) {
        let name = kernel["name"].as_str().unwrap();
        assert!(name.starts_with(&format!("sb_{pass}_d128_bf16_cur_bhnd_ret_full_")), "{name}");
        // Without schedule flags, the spec's default schedule (not one fixed schedule for all).
        let spec = sbgen::ir::Spec {
            mask: sbgen::ir::Mask::AttendCurrent,
            ..sbgen::ir::Spec::new(
                128,
                sbgen::ir::Dtype::Bf16,
                if pass == "fwd" { sbgen::ir::Pass::Forward } else { sbgen::ir::Pass::Backward },
            )
        };
        // (`emit` targets sm_90 by default, where the forward's default is on wgmma.)
        let default = sbgen::ir::Schedule::default_on(&spec, sbgen::ir::Arch::Sm90);
        assert!(name.ends_with(&default.short_hash()), "{name} is not at {default}");
        let source = std::fs::read_to_string(dir.join(format!("{name}.cu"))).unwrap();
        assert!(source.contains(name), "the source defines its entry point");
        assert!(stdout.contains(&format!("{name}.cu")), "{stdout}");
    }
    assert_eq!(stdout.lines().filter(|l| l.starts_with("wrote")).count(), 3, "{stdout}");

    let before = std::fs::metadata(dir.join("manifest.json")).unwrap().modified().unwrap();
    let again = sbgen(&args);
    assert_eq!(again.status.code(), Some(0));
    let stdout = text(&again.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("unchanged")).count(), 3, "{stdout}");
    assert_eq!(std::fs::metadata(dir.join("manifest.json")).unwrap().modified().unwrap(), before);

    let fwd_only = sbgen(&["emit", "--head-dim", "64", "--dtype", "f16", "--pass", "fwd", "--out", out_dir]);
    assert_eq!(fwd_only.status.code(), Some(0));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.as_array().unwrap().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tune_compile_only_prints_one_line_per_variant_and_the_summary() {
    if let Err(e) = sbgen::compile::Toolchain::discover() {
        eprintln!("skipped: {e}");
        return;
    }
    let out = sbgen(&[
        "tune",
        "--gpu",
        "sm_90",
        "--compile-only",
        "--head-dim",
        "64",
        "--dtype",
        "bf16",
        "--pass",
        "fwd",
        "-j",
        "2",
    ]);
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let numbers: Vec<usize> = last
        .strip_prefix("compiled ")
        .map(|rest| rest.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    assert_eq!(numbers.len(), 3, "summary line missing: {stdout}\n{}", text(&out.stderr));
    assert_eq!(last, format!("compiled {} variants: {} failed, {} spilling", numbers[0], numbers[1], numbers[2]));
    let (n, failed, spilling) = (numbers[0], numbers[1], numbers[2]);
    // Every variant the search space keeps for the spec is compiled, one line each.
    let spec = sbgen::ir::Spec::new(64, sbgen::ir::Dtype::Bf16, sbgen::ir::Pass::Forward);
    let kept = sbgen::search_space::variants(spec, sbgen::ir::Arch::Sm90).filter(|(_, v)| v.is_ok()).count();
    assert!(kept >= 16, "the search space shrank to {kept}");
    assert_eq!(n, kept, "{stdout}");
    let variant_lines = stdout.lines().filter(|l| l.contains(" sb_fwd_d64_bf16_")).count();
    assert_eq!(variant_lines, n, "{stdout}");
    assert!(stdout.contains("pruned"), "pruned candidates are reported: {stdout}");
    let expected = if failed == 0 && spilling == 0 { 0 } else { 1 };
    assert_eq!(out.status.code(), Some(expected), "{stdout}");
}

#[test]
fn missing_toolchain_is_a_failure_that_says_what_to_install() {
    if std::path::Path::new("/usr/local/cuda/include/cuda_bf16.h").exists() {
        eprintln!("skipped: /usr/local/cuda has a toolchain, so it cannot be made to look missing");
        return;
    }
    // No variables, an empty cache folder, no python3 on PATH (so no site-packages).
    let out = Command::new(env!("CARGO_BIN_EXE_sbgen"))
        .args(["tune", "--gpu", "sm_80", "--compile-only", "--head-dim", "64", "--dtype", "bf16", "--pass", "fwd"])
        .env_remove("SBGEN_CUDA_HOME")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .env("SBGEN_CACHE_DIR", scratch("no-toolchain"))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CUDA toolchain not found"), "{err}");
    assert!(err.contains("source scripts/env.sh") && err.contains("SBGEN_CUDA_HOME"), "{err}");
    assert!(err.contains("nvidia-cuda-nvrtc==13.0.88"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn tune_without_compile_only_needs_a_gpu_and_says_so() {
    let out = sbgen(&["tune", "--gpu", "sm_80", "--head-dim", "64", "--dtype", "bf16", "--pass", "fwd"]);
    let err = text(&out.stderr);
    if err.contains("does not match the device found") {
        eprintln!("skipped: a CUDA device is present (this test is for machines without one)");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no CUDA device found"), "{err}");
    assert!(err.contains("--compile-only"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn help_and_missing_subcommand() {
    let help = sbgen(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help.stdout).contains("emit") && text(&help.stdout).contains("tune"));
    assert_eq!(sbgen(&[]).status.code(), Some(2));
    assert_eq!(sbgen(&["tune", "--gpu", "sm_75"]).status.code(), Some(2));
}

#[test]
fn cache_show_without_a_cache_names_the_file_and_the_command_to_create_it() {
    let dir = scratch("cache-missing");
    let path = dir.join("sbgen-tune.json");
    let out = sbgen(&["cache", "show", "--cache", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(path.to_str().unwrap()) && err.contains("sbgen tune --gpu"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cache_show_lists_the_entries_and_reports_a_corrupt_file() {
    use sbgen::cache::{CacheEntry, CandidateResult, Outcome, TuningCache};
    use sbgen::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
    let dir = scratch("cache-show");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.json");
    let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
    let schedule = Schedule::default_for(&spec);
    let mut cache = TuningCache::new();
    cache.insert(CacheEntry {
        time_ms: 0.9,
        tflops: 150.0,
        speedup_over_default: Some(1.0),
        shape: Some([8, 16, 2048, 128]),
        gpu_name: "NVIDIA H200".into(),
        driver_version: "CUDA 13.0".into(),
        sbgen_version: "0.1.0".into(),
        tuned_at: "2026-11-29T02:00:00Z".into(),
        candidates_checksum: String::new(),
        candidates: vec![CandidateResult { schedule, outcome: Outcome::Timed { ms: 0.9, tflops: 150.0 } }],
        ..CacheEntry::untimed(Kernel::new(spec, schedule, Arch::Sm90), 2048, "// ptx".into()).unwrap()
    });
    cache.save(&path).unwrap();
    let out = sbgen(&["cache", "show", "--cache", path.to_str().unwrap(), "--candidates"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for part in ["1 entries", "fwd_d128_bf16_strict_bhnd_ret_full", "2048", "150.0", "NVIDIA H200", "0.900 ms"] {
        assert!(stdout.contains(part), "{part} in {stdout}");
    }
    std::fs::write(&path, "{ not json").unwrap();
    let out = sbgen(&["cache", "show", "--cache", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a valid sbgen tuning cache") && err.contains(path.to_str().unwrap()), "{err}");
}

/// Runs `sbgen` expecting a usage error (exit 2); returns its stderr.
fn usage_error(args: &[&str]) -> String {
    let out = sbgen(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    err
}

/// A safetensors file of zeros: (name, dtype, shape) per tensor.
fn tensor_file(path: &std::path::Path, tensors: &[(&str, &str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape) in tensors {
        let size = match *dtype {
            "F32" => 4,
            "F64" => 8,
            _ => 2,
        };
        let len = shape.iter().product::<usize>() * size;
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.resize(bytes.len() + offset, 0);
    std::fs::write(path, bytes).unwrap();
}

/// A valid forward input, D = 64, in a fresh folder.
fn run_input(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let s: &[usize] = &[1, 2, 16, 64];
    tensor_file(&input, &[("q", "BF16", s), ("k", "BF16", s), ("v", "BF16", s), ("do", "BF16", s)]);
    (dir, input)
}

#[test]
fn run_refuses_an_output_it_cannot_or_must_not_write_before_the_gpu() {
    let (dir, input) = run_input("run-output");
    let before = std::fs::read(&input).unwrap();
    let dotted = dir.join(".").join("in.safetensors");
    let missing = dir.join("nowhere").join("out.safetensors");
    let mut cases = vec![
        (input.clone(), "is the input"),
        (dotted, "is the input"),
        (missing, "does not exist"),
        (dir.clone(), "is a folder"),
    ];
    if std::path::Path::new("/proc/self").is_dir() {
        cases.push((PathBuf::from("/proc/sbgen-out.safetensors"), "cannot write in the folder `/proc`"));
    }
    for (output, expected) in cases {
        let err = usage_error(&["run", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
        assert!(err.contains("`--output`") && err.contains(expected), "{output:?}: {err}");
        assert!(!err.contains("CUDA"), "refused before looking for a GPU: {err}");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before, "the input is untouched");
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["in.safetensors".to_string()], "no probe or temp file is left");
}

#[test]
fn run_refuses_a_device_or_folder_as_input_without_reading_it() {
    let dir = scratch("run-dev-zero");
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("out.safetensors");
    for input in ["/dev/zero", dir.to_str().unwrap()] {
        if !std::path::Path::new(input).exists() {
            continue;
        }
        let err = usage_error(&["run", "-i", input, "-o", output.to_str().unwrap()]);
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[test]
fn run_takes_a_negative_scale_after_a_space() {
    let (dir, input) = run_input("run-scale");
    let output = dir.join("out.safetensors");
    let out = sbgen(&["run", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--scale", "-0.5"]);
    let err = text(&out.stderr);
    assert!(!err.contains("unexpected argument"), "{err}");
    // Parsed, checked, and stopped only by the missing GPU (or run on one).
    assert_ne!(out.status.code(), Some(2), "{err}");
}

#[test]
fn run_pass_fwd_validates_only_the_forward() {
    let (dir, input) = run_input("run-fwd-only");
    let output = dir.join("out.safetensors");
    // A schedule whose forward fits some arch's shared memory and whose backward fits none.
    use sbgen::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
    let fits = |pass, s: Schedule| {
        Arch::ALL.iter().any(|&arch| Kernel::new(Spec::new(64, Dtype::Bf16, pass), s, arch).validate().is_ok())
    };
    // Warps as `--block-m` alone sets them: 16 rows each when that gives 4 or 8, else 32.
    let schedule = [64u32, 128, 256]
        .into_iter()
        .flat_map(|m| [32u32, 64, 128].into_iter().flat_map(move |n| [2u32, 3, 4].map(|st| (m, n, st))))
        .map(|(m, n, stages)| {
            let warps = if matches!(m / 16, 4 | 8) { m / 16 } else { m / 32 };
            Schedule { block_m: m, warps, block_n: n, stages, ..Schedule::DEFAULT }
        })
        .find(|&s| fits(Pass::Forward, s) && !fits(Pass::Backward, s))
        .expect("a schedule that fits the forward only");
    let (block_m, block_n, stages) =
        (schedule.block_m.to_string(), schedule.block_n.to_string(), schedule.stages.to_string());
    let run = |pass: &str| {
        let (input, output) = (input.to_str().unwrap(), output.to_str().unwrap());
        let schedule = ["--block-m", &block_m, "--block-n", &block_n, "--stages", &stages];
        sbgen(&[&["run", "-i", input, "-o", output, "--pass", pass][..], &schedule].concat())
    };
    let out = run("fwd");
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "a valid forward is not refused for its backward: {err}");
    // The same schedule with the backward is refused, before the GPU.
    let out = run("both");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("shared memory"), "{err}");
}

/// A THD input in a fresh folder: zero BF16 q, do `[T, heads, d]`, k, v `[T, kv_heads, d]` (T =
/// `cu`'s last entry) and an I32 `cu_seqlens` holding `cu`.
fn run_packed_input(name: &str, heads: usize, kv_heads: usize, d: usize, cu: &[i32]) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let tokens = cu.last().map_or(0, |&t| t.max(0) as usize);
    let cu_bytes: Vec<u8> = cu.iter().flat_map(|o| o.to_le_bytes()).collect();
    let (q, kv) = (vec![tokens, heads, d], vec![tokens, kv_heads, d]);
    let zeros = |shape: &[usize]| vec![0u8; shape.iter().product::<usize>() * 2];
    let tensors = [
        ("q", "BF16", q.clone(), zeros(&q)),
        ("k", "BF16", kv.clone(), zeros(&kv)),
        ("v", "BF16", kv.clone(), zeros(&kv)),
        ("do", "BF16", q.clone(), zeros(&q)),
        ("cu_seqlens", "I32", vec![cu.len()], cu_bytes),
    ];
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in &tensors {
        let range = [data.len(), data.len() + bytes.len()];
        header.insert(name.to_string(), serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": range }));
        data.extend_from_slice(bytes);
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&json);
    file.extend_from_slice(&data);
    std::fs::write(&input, file).unwrap();
    (dir, input)
}

#[test]
fn run_refuses_a_bad_cu_seqlens_naming_the_index_before_the_gpu() {
    let (dir, input) = run_packed_input("run-bad-cu", 4, 2, 64, &[0, 5, 3, 10]);
    let output = dir.join("out.safetensors");
    // Offsets that decrease are refused; T = 10 = the last offset, so the index named is the bad one.
    let err = usage_error(&["run", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--varlen"]);
    assert!(err.contains("`cu_seqlens[2]` = 3 is less than `cu_seqlens[1]` = 5"), "{err}");
    assert!(!err.contains("CUDA"), "refused before looking for a GPU: {err}");
    // The same file without --varlen: told to use the THD layout, not that q has 3 dimensions.
    let err = usage_error(&["run", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    assert!(err.contains("tensor `cu_seqlens`") && err.contains("use --layout thd"), "{err}");
    assert!(!output.exists());
}

#[test]
fn run_takes_a_packed_gqa_input_with_any_head_dim() {
    // Sequences of 3, 0 and 7 tokens, 4 query heads over 2 K/V heads, D = 50: parsed and checked,
    // stopped only by the missing GPU (or run on one).
    let (dir, input) = run_packed_input("run-packed", 4, 2, 50, &[0, 3, 3, 10]);
    let output = dir.join("out.safetensors");
    let (input, output) = (input.to_str().unwrap(), output.to_str().unwrap());
    for extra in [&["--varlen"][..], &["--layout", "thd", "--pass", "both", "--deterministic"][..]] {
        let out = sbgen(&[&["run", "-i", input, "-o", output][..], extra].concat());
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(2), "{extra:?}: {err}");
    }
    // `--varlen` is `--layout thd`: both at once is a usage error.
    let err = usage_error(&["run", "-i", input, "-o", output, "--varlen", "--layout", "bhnd"]);
    assert!(err.contains("--varlen") && err.contains("--layout"), "{err}");
}

#[test]
fn run_refuses_k_heads_that_do_not_divide_q_heads_and_cu_seqlens_in_a_dense_layout() {
    let (dir, input) = run_packed_input("run-gqa-3-of-4", 4, 3, 64, &[0, 4]);
    let output = dir.join("out.safetensors");
    let err = usage_error(&["run", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--varlen"]);
    assert!(err.contains("`k` has H_kv = 3 heads") && err.contains("`q`'s H = 4"), "{err}");
    let dir = scratch("run-dense-cu");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let s: &[usize] = &[1, 2, 16, 64];
    tensor_file(&input, &[("q", "BF16", s), ("k", "BF16", s), ("v", "BF16", s), ("cu_seqlens", "BF16", &[2])]);
    let err = usage_error(&["run", "-i", input.to_str().unwrap(), "-o", dir.join("o").to_str().unwrap()]);
    assert!(err.contains("tensor `cu_seqlens`") && err.contains("use --layout thd"), "{err}");
}

#[test]
fn ptx_dir_errors_name_where_the_folder_came_from() {
    let (dir, input) = run_input("ptx-dir-origin");
    let output = dir.join("out.safetensors");
    let cache = dir.join("cache.json");
    let runs: [&[&str]; 4] = [
        &["run", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()],
        &["check", "--quick"],
        &["bench"],
        &[
            "tune",
            "--gpu",
            "sm_90",
            "--head-dim",
            "64",
            "--dtype",
            "bf16",
            "--pass",
            "fwd",
            "--cache",
            cache.to_str().unwrap(),
        ],
    ];
    for args in runs {
        let out = Command::new(env!("CARGO_BIN_EXE_sbgen"))
            .args(args)
            .env("SBGEN_PTX_DIR", "/nonexistent/sbgen-ptx")
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("`SBGEN_PTX_DIR` `/nonexistent/sbgen-ptx` is not a folder"), "{err}");
        assert!(!err.contains("--ptx-dir"), "{err}");
        let err = usage_error(&[args, &["--ptx-dir", "/nonexistent/sbgen-ptx"]].concat());
        assert!(err.contains("`--ptx-dir` `/nonexistent/sbgen-ptx` is not a folder"), "{err}");
    }
}

#[test]
fn tune_checks_the_cache_path_and_refuses_flags_compile_only_ignores() {
    let dir = scratch("tune-cache-path");
    let missing = dir.join("nowhere").join("cache.json");
    let base = ["tune", "--gpu", "sm_90", "--head-dim", "64", "--dtype", "bf16", "--pass", "fwd"];
    let err = usage_error(&[&base[..], &["--cache", missing.to_str().unwrap()]].concat());
    assert!(err.contains("`--cache`") && err.contains("does not exist"), "{err}");
    for extra in [
        &["--cache", "c.json"][..],
        &["--ptx-dir", "/nonexistent"][..],
        &["--budget-s", "nan"][..],
        &["--budget-s", "-1"][..],
    ] {
        let err = usage_error(&[&base[..], &["--compile-only"], extra].concat());
        assert!(err.contains("cannot be used with") && err.contains("--compile-only"), "{err}");
    }
    for (budget, shown) in [("nan", "NaN"), ("-1", "-1")] {
        let cache = dir.with_extension("json");
        let err = usage_error(&[&base[..], &["--budget-s", budget, "--cache", cache.to_str().unwrap()]].concat());
        assert!(err.contains(&format!("`--budget-s` = {shown} is not allowed")), "{err}");
    }
}

#[test]
fn an_io_error_prints_its_cause_once() {
    let dir = scratch("io-cause");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plain");
    std::fs::write(&file, b"").unwrap();
    // A path through a regular file: ENOTDIR, neither missing nor unreadable for root.
    let path = file.join("cache.json");
    let out = sbgen(&["cache", "show", "--cache", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), format!("error: cannot read `{}`: Not a directory (os error 20)\n", path.display()));
}

#[test]
fn cache_show_escapes_what_it_prints_and_refuses_unchecked_entries() {
    use sbgen::cache::{CacheEntry, TuningCache};
    use sbgen::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
    let dir = scratch("cache-escape");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.json");
    let spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
    let mut cache = TuningCache::new();
    cache.insert(CacheEntry {
        gpu_name: "H200\u{1b}]0;owned\u{7}\u{1b}[2J".into(),
        tuned_at: "2026\r\n".into(),
        ..CacheEntry::untimed(Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90), 2048, "// ptx".into())
            .unwrap()
    });
    cache.save(&path).unwrap();
    let out = sbgen(&["cache", "show", "--cache", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("H200\\u{1b}]0;owned\\u{7}\\u{1b}[2J") && stdout.contains("2026\\r\\n"), "{stdout}");
    assert!(!stdout.contains('\u{1b}') && !stdout.contains('\r'), "{stdout:?}");
    // head_dim 300 is not something `cache show` prints as if it were tuned.
    let text_file = std::fs::read_to_string(&path).unwrap().replace("\"head_dim\": 64", "\"head_dim\": 300");
    std::fs::write(&path, text_file).unwrap();
    let out = sbgen(&["cache", "show", "--cache", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a valid sbgen tuning cache") && err.contains("head_dim"), "{err}");
}

/// A safetensors file with the given data per tensor (zeros where `data` is empty).
fn tensor_file_data(path: &std::path::Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut body = Vec::new();
    for (name, dtype, shape, data) in tensors {
        let size = match *dtype {
            "F32" | "I32" => 4,
            _ => 2,
        };
        let len = shape.iter().product::<usize>() * size;
        let start = body.len();
        body.extend_from_slice(data);
        body.resize(start + len, 0);
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [start, start + len] }),
        );
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&body);
    std::fs::write(path, bytes).unwrap();
}

fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A decode input: q [2, 4, 64], a paged cache of 5 pages of 16 tokens on 2 K/V heads, seqlens_k and
/// a [2, 3] block table.
fn decode_input(name: &str, seqlens: &[i32], table: &[i32]) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let cache = vec![5, 16, 2, 64];
    tensor_file_data(
        &input,
        &[
            ("q", "BF16", vec![2, 4, 64], vec![]),
            ("k_cache", "BF16", cache.clone(), vec![]),
            ("v_cache", "BF16", cache, vec![]),
            ("seqlens_k", "I32", vec![seqlens.len()], i32_bytes(seqlens)),
            ("block_table", "I32", vec![2, table.len() / 2], i32_bytes(table)),
        ],
    );
    (dir, input)
}

#[test]
fn run_decode_refuses_bad_lengths_pages_and_tensors_before_the_gpu() {
    let run = |input: &PathBuf, dir: &PathBuf, extra: &[&str]| {
        let (i, o) = (input.to_str().unwrap().to_string(), dir.join("out.safetensors").to_str().unwrap().to_string());
        usage_error(&[&["run", "--pass", "decode", "-i", &i, "-o", &o][..], extra].concat())
    };
    // A length past the 3 pages of 16 a sequence can hold.
    let (dir, input) = decode_input("dec-len", &[17, 49], &[0, 1, -1, 2, 3, 4]);
    let err = run(&input, &dir, &["--layout", "paged"]);
    assert!(err.contains("`seqlens_k[1]` = 49 is out of range: allowed 0..=48"), "{err}");
    assert!(!err.contains("CUDA"), "refused before looking for a GPU: {err}");
    // A page id past the pool, in a page the sequence uses; -1 past its pages is fine.
    let (dir, input) = decode_input("dec-page", &[17, 40], &[0, 1, -1, 2, 5, 4]);
    let err = run(&input, &dir, &["--layout", "paged"]);
    assert!(err.contains("`block_table[1][1]` = 5 is out of range: allowed 0..5"), "{err}");
    // A block table with a contiguous layout, and a paged layout without one.
    let err = run(&input, &dir, &[]);
    assert!(err.contains("use --layout paged"), "{err}");
    let dir = scratch("dec-no-table");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.safetensors");
    let cache = vec![2, 2, 16, 64];
    tensor_file_data(
        &input,
        &[
            ("q", "BF16", vec![2, 4, 64], vec![]),
            ("k_cache", "BF16", cache.clone(), vec![]),
            ("v_cache", "BF16", cache, vec![]),
            ("seqlens_k", "I32", vec![2], i32_bytes(&[3, 16])),
        ],
    );
    let err = run(&input, &dir, &["--layout", "paged"]);
    assert!(err.contains("tensor `block_table` is missing"), "{err}");
    // A packed layout is no KV cache; a decode is always deterministic.
    let err = run(&input, &dir, &["--layout", "thd"]);
    assert!(err.contains("not thd"), "{err}");
    let err = run(&input, &dir, &["--deterministic"]);
    assert!(err.contains("`--deterministic` is the backward's"), "{err}");
}

#[test]
fn run_decode_takes_a_valid_cache_as_far_as_the_gpu() {
    let (dir, input) = decode_input("dec-ok", &[17, 0], &[0, 1, -1, 4, 3, 2]);
    let (i, o) = (input.to_str().unwrap(), dir.join("out.safetensors"));
    let run = |extra: &[&str]| {
        let out = sbgen(
            &[&["run", "--pass", "decode", "-i", i, "-o", o.to_str().unwrap(), "--layout", "paged"], extra].concat(),
        );
        assert_ne!(out.status.code(), Some(2), "{extra:?}: {}", text(&out.stderr));
    };
    run(&["--remainder", "fuse", "--early-exit-bits", "24"]);
    // 32-key blocks on pages of 16 tokens: a block spans two pages, gathered page run by page run.
    run(&["--block-m", "16", "--block-n", "32"]);
}

#[test]
fn decode_flags_are_checked_before_the_gpu() {
    let err = usage_error(&["check", "--pass", "decode", "--varlen", "1,2"]);
    assert!(err.contains("`--varlen`"), "{err}");
    let err = usage_error(&["check", "--pass", "decode", "--page-size", "24"]);
    assert!(err.contains("`page_size` = 24"), "{err}");
    let err = usage_error(&["check", "--pass", "decode", "--layout", "thd"]);
    assert!(err.contains("not a KV cache"), "{err}");
    let err = usage_error(&["check", "--page-size", "16"]);
    assert!(err.contains("add `--pass decode`"), "{err}");
    let err = usage_error(&["check", "--pass", "decode", "--split", "coarse"]);
    assert!(err.contains("`split` = `coarse`"), "{err}");
    let err = usage_error(&["bench", "--decode", "8,32,7,1024,128"]);
    assert!(err.contains("B,H,H_kv,N,D"), "{err}");
    let err = usage_error(&["bench", "--decode", "--page-size", "8"]);
    assert!(err.contains("`page_size` = 8"), "{err}");
    let err = usage_error(&["bench", "--decode", "--shapes", "1,2,3,64"]);
    assert!(err.contains("--shapes"), "{err}");
    let err = usage_error(&["bench", "--decode", "--flush", "clean"]);
    assert!(err.contains("read or write"), "{err}");
    let err = usage_error(&["bench", "--flush", "read"]);
    assert!(err.contains("--decode"), "{err}");
}

#[test]
fn bench_over_several_gpus_refuses_what_the_ring_cannot_run_before_any_gpu_work() {
    let cases: [(&[&str], &str); 8] = [
        (&["--gpus", "0"], "`gpus` = 0"),
        (&["--scheme", "contiguous"], "`--scheme` applies to `--gpus` only"),
        (&["--gpus", "2", "--scheme", "diagonal"], "allowed zigzag, contiguous"),
        (&["--gpus", "2", "--layout", "thd"], "allowed bhnd, bnhd"),
        (&["--gpus", "2", "--shapes", "1,4,3,128"], "`N` = 3"),
        (&["--gpus", "2", "--shapes", "1,4,1024,100"], "`head_dim` = 100"),
        (&["--gpus", "2", "--block-m", "64"], "default schedule"),
        (&["--gpus", "2", "--kv-heads", "3"], "`--kv-heads` = 3"),
    ];
    for (args, want) in cases {
        let err = usage_error(&[&["bench"][..], args].concat());
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Flags of other modes conflict with `--gpus` (clap's own usage error).
    for other in [&["--decode"][..], &["--varlen-lens", "5,7"], &["--deterministic"]] {
        let out = sbgen(&[&["bench", "--gpus", "2"][..], other].concat());
        assert_eq!(out.status.code(), Some(2), "{other:?}: {}", text(&out.stderr));
    }
}

/// The committed results of an H200 run, plotted without a GPU.
#[test]
fn bench_plot_from_json_draws_the_results_and_baselines_without_a_gpu() {
    let results = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/results");
    let bench = format!("{results}/2026-11-30-h200-s7-bench-after.json");
    let baselines = format!("{results}/2026-11-30-h200-s7-baselines.json");
    let dir = scratch("bench-plot");
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("plot.svg");
    let svg_arg = svg.to_str().unwrap();
    let out =
        sbgen(&["bench", "--plot", svg_arg, "--from-json", &bench, "--baselines", &baselines, "--early-exit", "off"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("wrote `{svg_arg}`")), "{stdout}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    for name in ["sbgen fwd D=128", "sbgen fwd+bwd D=64", "cudnn_fwd D=128", "fla_sb_fwdbwd D=64", "NVIDIA H200"] {
        assert!(drawn.contains(name), "{name} missing from the SVG");
    }
    assert!(!drawn.contains("ee24"), "--early-exit off leaves the early-exit rows out");

    // Inputs the user must fix: exit 2, named.
    let missing = dir.join("missing.json");
    let err = usage_error(&["bench", "--plot", svg_arg, "--from-json", missing.to_str().unwrap()]);
    assert!(err.contains("`--from-json`") && err.contains("missing.json"), "{err}");
    let err = usage_error(&["bench", "--plot", svg_arg, "--from-json", &baselines]);
    assert!(err.contains("`--baselines`"), "a baselines file given as the bench document: {err}");
    let err = usage_error(&["bench", "--plot", svg_arg, "--from-json", &bench, "--baselines", &bench]);
    assert!(err.contains("this is a bench document"), "{err}");
    let err =
        usage_error(&["bench", "--plot", dir.join("no/such/folder.svg").to_str().unwrap(), "--from-json", &bench]);
    assert!(err.contains("`--plot`") && err.contains("does not exist"), "{err}");
    let err = usage_error(&["bench", "--from-json", &bench]);
    assert!(err.contains("--plot"), "{err}");
    let err = usage_error(&["bench", "--plot", svg_arg, "--from-json", &bench, "--shapes", "1,2,64,64"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
