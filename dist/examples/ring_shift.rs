//! One ring shift between the GPUs of this host over NCCL, timed: each rank sends a buffer of `MIB`
//! MiB to the next rank and receives the previous rank's, on its communication stream. The first
//! shift is checked element by element (each rank fills its buffer with a pattern of its own).
//!
//! ```text
//! cargo run --release -p sbgen-dist --features nccl --example ring_shift -- [RANKS] [MIB] [REPS]
//! ```
//! Defaults: 2 ranks, 512 MiB (the K and V of 65536 tokens x 16 heads x 128 in bf16: half of a
//! 131072-token sequence), 20 shifts.

use sbgen_dist::nccl::NcclRank;
use sbgen_dist::DistError;
use std::time::Instant;

fn pattern(rank: usize, i: usize) -> f32 {
    (rank * 100_000 + i % 65_521) as f32
}

/// No GPU to run on: says why, exit status 1.
fn fail(why: &str) -> ! {
    eprintln!("error: {why}");
    std::process::exit(1)
}

/// Bad usage: says why and how, exit status 2.
fn usage(why: &str) -> ! {
    eprintln!("error: {why}: usage: ring_shift [RANKS] [MIB] [REPS] (positive integers, MIB at most 1048576)");
    std::process::exit(2)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let parsed: Result<Vec<usize>, String> = std::env::args().skip(1).map(|s| s.parse().map_err(|_| s)).collect();
    let a = match parsed {
        Ok(a) if a.len() > 3 => usage(&format!("{} arguments", a.len())),
        Ok(a) if a.contains(&0) => usage("0 is not allowed"),
        Ok(a) if a.get(1).is_some_and(|&mib| mib > 1 << 20) => usage("MIB over 1048576"),
        Ok(a) => a,
        Err(s) => usage(&format!("`{s}` is not a count")),
    };
    // SAFETY: these only probe whether the libraries can be loaded (cudarc panics on first use of
    // a missing one).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        fail("the CUDA driver library (libcuda.so) is not installed");
    }
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        fail("NCCL (libnccl.so) is not on the library path (see sbgen_dist::nccl)");
    }
    let ranks = a.first().copied().unwrap_or(2);
    let mib = a.get(1).copied().unwrap_or(512);
    let reps = a.get(2).copied().unwrap_or(20);
    let n = (mib << 20) / 4;
    let results = NcclRank::run(ranks, |r| {
        let (rank, s) = (r.rank(), r.compute_stream().clone());
        let dev = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let host: Vec<f32> = (0..n).map(|i| pattern(rank, i)).collect();
        let send = s.clone_htod(&host).map_err(dev)?;
        let mut recv = s.alloc_zeros::<f32>(n).map_err(dev)?;
        r.start_shift(&send, &mut recv)?;
        r.finish_shift()?;
        let got = s.clone_dtoh(&recv).map_err(dev)?;
        let prev = (rank + ranks - 1) % ranks;
        if let Some(i) = (0..n).find(|&i| got[i] != pattern(prev, i)) {
            return Err(DistError::Transport {
                rank,
                reason: format!("element {i}: got {}, rank {prev} sent {}", got[i], pattern(prev, i)),
            });
        }
        s.synchronize().map_err(dev)?;
        let t = Instant::now();
        for _ in 0..reps {
            r.start_shift(&send, &mut recv)?;
            r.finish_shift()?;
        }
        s.synchronize().map_err(dev)?;
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    })?;
    println!("{ranks} ranks, {mib} MiB per rank per shift, {reps} shifts; first shift checked");
    for (rank, r) in results.into_iter().enumerate() {
        let secs = r?;
        println!("rank {rank}: {:8.3} ms per shift, {:6.1} GB/s sent", secs * 1e3, (mib << 20) as f64 / secs / 1e9);
    }
    Ok(())
}
