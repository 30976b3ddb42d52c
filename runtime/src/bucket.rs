//! Sequence-length buckets: a kernel is tuned for the lengths of one power-of-two bucket, and one
//! rule picks among tuned kernels for a length, both in the tuning cache (`sbgen`) and among the
//! kernels `#[stick_breaking_attention]` embeds (docs/architecture.md#cache).

/// The upper bound of the power-of-two bucket holding sequence length `n`: 1, 2, 4, ..., 2^31
/// (`seq_bucket(1000) == 1024`, `seq_bucket(1024) == 1024`, `seq_bucket(1025) == 2048`).
pub fn seq_bucket(n: usize) -> u32 {
    let n = n.clamp(1, 1 << 31);
    n.next_power_of_two() as u32
}

/// Of `entries` (each an item and its bucket; `u64::MAX` holds every length), the one whose bucket
/// is the nearest at or above `seq_len`'s bucket, else the one with the largest bucket. Ties go to
/// the first entry for the nearest bucket and to the last for the largest.
pub fn pick<T>(entries: impl IntoIterator<Item = (T, u64)>, seq_len: usize) -> Option<T> {
    let wanted = u64::from(seq_bucket(seq_len));
    let mut nearest: Option<(T, u64)> = None;
    let mut largest: Option<(T, u64)> = None;
    for (item, bucket) in entries {
        // `match` rather than `is_none_or`: the workspace's rust-version (1.80) predates it.
        let nearer = match &nearest {
            Some((_, b)) => bucket < *b,
            None => true,
        };
        let larger = match &largest {
            Some((_, b)) => bucket >= *b,
            None => true,
        };
        if bucket >= wanted && nearer {
            nearest = Some((item, bucket));
        } else if nearest.is_none() && larger {
            largest = Some((item, bucket));
        }
    }
    nearest.or(largest).map(|(item, _)| item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_upper_bounds() {
        assert_eq!(seq_bucket(0), 1);
        assert_eq!(seq_bucket(1), 1);
        assert_eq!(seq_bucket(1000), 1024);
        assert_eq!(seq_bucket(1024), 1024);
        assert_eq!(seq_bucket(1025), 2048);
        assert_eq!(seq_bucket(usize::MAX), 1 << 31);
    }

    #[test]
    fn picks_the_nearest_bucket_at_or_above_else_the_largest() {
        let at = |buckets: &[u64], n| pick(buckets.iter().map(|&b| (b, b)), n);
        let tuned = [8192, 2048];
        assert_eq!(at(&tuned, 1), Some(2048));
        assert_eq!(at(&tuned, 2048), Some(2048));
        assert_eq!(at(&tuned, 2049), Some(8192));
        assert_eq!(at(&tuned, 5000), Some(8192));
        assert_eq!(at(&tuned, 100_000), Some(8192));
        assert_eq!(at(&[], 100), None);
        // A bucket of every length holds the longest sequences too.
        assert_eq!(at(&[1024, u64::MAX], 1 << 40), Some(u64::MAX));
        // The length's bucket is compared, not the length: 2^31 holds every longer length.
        assert_eq!(at(&[1 << 30, 1 << 31], usize::MAX), Some(1 << 31));
    }

    #[test]
    fn ties_take_the_first_nearest_and_the_last_largest() {
        let entries = [("a", 1024), ("b", 1024), ("c", 64), ("d", 64)];
        assert_eq!(pick(entries, 100), Some("a"));
        assert_eq!(pick(entries[2..].iter().copied().chain([("e", 32)]), 100), Some("d"));
        assert_eq!(pick([("x", 64), ("y", 64)], 100), Some("y"));
    }
}
