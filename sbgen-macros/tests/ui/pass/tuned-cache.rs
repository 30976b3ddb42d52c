// A spec the cache has entries for (tests/ui.rs points SBGEN_CACHE at tests/fixtures/tuned-cache.json:
// head_dim 128 bf16, forward and backward, sm_90, buckets 2048 and 8192, fake PTX). Every bucket is
// embedded, plus the default schedule as source for sm_80, which has no entry; with `seq`, only the
// bucket `TuningCache::lookup` picks. Runs without a GPU: it only reads the tables and the pick.
use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 128)]
pub struct SbAttn;

#[stick_breaking_attention(head_dim = 128, dtype = "bf16", seq = 3000)]
pub struct SbAttn4k;

fn main() {
    let fwd = SbAttn::forward_kernels();
    let names: Vec<(&str, Vec<&str>, bool)> = fwd
        .binaries().unwrap()
        .iter()
        .map(|k| (k.name(), k.ptx().iter().map(|(t, _)| t.as_str()).collect(), k.cuda_source().is_some()))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!((names[0].1.clone(), names[0].2), (vec!["sm_90a"], false));
    assert_eq!((names[1].1.clone(), names[1].2), (vec!["sm_90a"], false));
    assert_eq!((names[2].1.len(), names[2].2), (0, true));
    assert!(fwd.binaries().unwrap()[0].ptx()[0].1.contains("N <= 2048"));
    assert!(fwd.binaries().unwrap()[1].ptx()[0].1.contains("N <= 8192"));

    // On an H100/H200: the bucket that holds N, else the largest.
    assert_eq!(fwd.pick((9, 0), 100).unwrap().name(), names[0].0);
    assert_eq!(fwd.pick((9, 0), 2048).unwrap().name(), names[0].0);
    assert_eq!(fwd.pick((9, 0), 2049).unwrap().name(), names[1].0);
    assert_eq!(fwd.pick((9, 0), 1 << 20).unwrap().name(), names[1].0);
    // Elsewhere: the default schedule's source.
    assert_eq!(fwd.pick((8, 0), 100).unwrap().name(), names[2].0);
    assert_eq!(SbAttn::backward_kernels().binaries().unwrap().len(), 3);
    assert_eq!(SbAttn::backward_kernels().binaries().unwrap()[0].manifest().steps.len(), 2);

    let only = SbAttn4k::forward_kernels().binaries().unwrap();
    assert_eq!(only.len(), 2);
    assert!(only[0].ptx()[0].1.contains("N <= 8192"));
    assert_eq!(only[1].ptx().len(), 0);
}
