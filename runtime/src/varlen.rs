//! Packed variable-length batches (the THD layout): `cu_seqlens` and the host-side check of it.
//!
//! Sequence `b` of a packed batch is tokens `cu_seqlens[b] .. cu_seqlens[b + 1]` of q, k, v `[T, H, D]`.
//! A `cu_seqlens` the caller holds on the host is checked here before it is uploaded; a device-resident
//! one is trusted by the launcher (reading it back would synchronise the stream), and the kernels skip a
//! sequence whose bounds fall outside `0..=total_tokens` or that is longer than `max_seqlen`, so a bad
//! device `cu_seqlens` never makes them read or write out of bounds. The outputs of tokens that belong
//! to no valid sequence are not meaningful: the forward leaves their o and rem unwritten, and the
//! backward's elementwise finishing step still writes their dk (0) and dv (0, or with a fused remainder
//! a value computed from the rem rows the forward did not write).

/// A `cu_seqlens` that does not describe a packed batch, naming the first bad index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CuSeqlensError {
    #[error("`cu_seqlens` has {len} entries: it needs batch + 1 >= 2 (0 followed by each sequence's end)")]
    TooShort { len: usize },
    #[error("`cu_seqlens[0]` = {got}: it must be 0")]
    FirstNotZero { got: i32 },
    #[error("`cu_seqlens[{index}]` = {got} is less than `cu_seqlens[{}]` = {prev}: offsets must not decrease", .index - 1)]
    Decreasing { index: usize, got: i32, prev: i32 },
    #[error("`cu_seqlens[{index}]` = {got}: the last offset must equal the packed tensors' token count {total}")]
    Total { index: usize, got: i32, total: usize },
    #[error(
        "sequence {index} (`cu_seqlens[{}] - cu_seqlens[{index}]`) has {len} tokens, over `max_seqlen` = {max_seqlen}",
        .index + 1
    )]
    OverMaxSeqlen { index: usize, len: usize, max_seqlen: usize },
}

/// What a checked `cu_seqlens` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Number of sequences (`cu_seqlens.len() - 1`).
    pub batch: usize,
    /// Tokens in all (`cu_seqlens[batch]`).
    pub total_tokens: usize,
    /// The longest sequence.
    pub max_seqlen: usize,
}

/// Checks a host `cu_seqlens` against the packed tensors' token count: at least two entries, starting
/// at 0, non-decreasing, ending at `total_tokens`. Sequences of length 0 and 1 are legal.
pub fn check_cu_seqlens(cu_seqlens: &[i32], total_tokens: usize) -> Result<Packed, CuSeqlensError> {
    if cu_seqlens.len() < 2 {
        return Err(CuSeqlensError::TooShort { len: cu_seqlens.len() });
    }
    if cu_seqlens[0] != 0 {
        return Err(CuSeqlensError::FirstNotZero { got: cu_seqlens[0] });
    }
    let mut longest = 0usize;
    for index in 1..cu_seqlens.len() {
        let (prev, got) = (cu_seqlens[index - 1], cu_seqlens[index]);
        if got < prev {
            return Err(CuSeqlensError::Decreasing { index, got, prev });
        }
        longest = longest.max((got - prev) as usize);
    }
    let last = cu_seqlens.len() - 1;
    if cu_seqlens[last] as usize != total_tokens {
        return Err(CuSeqlensError::Total { index: last, got: cu_seqlens[last], total: total_tokens });
    }
    Ok(Packed { batch: last, total_tokens, max_seqlen: longest })
}

/// As [`check_cu_seqlens`], and checks a caller's `max_seqlen`: the kernels' grid covers `max_seqlen`
/// query rows per sequence, so it must be at least the longest sequence (a larger value only
/// launches idle blocks). The returned `max_seqlen` is the caller's.
pub fn check_with_max_seqlen(
    cu_seqlens: &[i32],
    total_tokens: usize,
    max_seqlen: usize,
) -> Result<Packed, CuSeqlensError> {
    let packed = check_cu_seqlens(cu_seqlens, total_tokens)?;
    for index in 0..packed.batch {
        let len = (cu_seqlens[index + 1] - cu_seqlens[index]) as usize;
        if len > max_seqlen {
            return Err(CuSeqlensError::OverMaxSeqlen { index, len, max_seqlen });
        }
    }
    Ok(Packed { max_seqlen, ..packed })
}

/// The offsets of sequences of `lens` tokens: `[0, lens[0], lens[0] + lens[1], ...]`, or `None` when the
/// total exceeds `i32::MAX`.
pub fn cu_seqlens_of(lens: &[usize]) -> Option<Vec<i32>> {
    let mut out = Vec::with_capacity(lens.len() + 1);
    let mut total = 0i32;
    out.push(0);
    for &len in lens {
        total = total.checked_add(i32::try_from(len).ok()?)?;
        out.push(total);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_empty_and_single_token_sequences() {
        let cu = cu_seqlens_of(&[0, 1, 17, 0, 1000]).unwrap();
        assert_eq!(cu, vec![0, 0, 1, 18, 18, 1018]);
        assert_eq!(check_cu_seqlens(&cu, 1018), Ok(Packed { batch: 5, total_tokens: 1018, max_seqlen: 1000 }));
        assert!(check_with_max_seqlen(&cu, 1018, 1000).is_ok());
    }

    #[test]
    fn names_the_first_bad_index() {
        assert_eq!(check_cu_seqlens(&[0], 0), Err(CuSeqlensError::TooShort { len: 1 }));
        assert_eq!(check_cu_seqlens(&[1, 4], 4), Err(CuSeqlensError::FirstNotZero { got: 1 }));
        let err = check_cu_seqlens(&[0, 5, 3, 2], 2).unwrap_err();
        assert_eq!(err, CuSeqlensError::Decreasing { index: 2, got: 3, prev: 5 });
        assert_eq!(err.to_string(), "`cu_seqlens[2]` = 3 is less than `cu_seqlens[1]` = 5: offsets must not decrease");
        assert_eq!(check_cu_seqlens(&[0, 5, 9], 10), Err(CuSeqlensError::Total { index: 2, got: 9, total: 10 }));
        let err = check_with_max_seqlen(&[0, 5, 9], 9, 4).unwrap_err();
        assert_eq!(err, CuSeqlensError::OverMaxSeqlen { index: 0, len: 5, max_seqlen: 4 });
        assert!(err.to_string().starts_with("sequence 0 (`cu_seqlens[1] - cu_seqlens[0]`) has 5 tokens"), "{err}");
        assert_eq!(check_with_max_seqlen(&[0, 5, 9], 9, 6).map(|p| p.max_seqlen), Ok(6));
        assert_eq!(check_cu_seqlens(&[0, -1], 0), Err(CuSeqlensError::Decreasing { index: 1, got: -1, prev: 0 }));
    }

    #[test]
    fn offsets_past_i32_are_refused() {
        assert_eq!(cu_seqlens_of(&[i32::MAX as usize, 1]), None);
        assert_eq!(cu_seqlens_of(&[]), Some(vec![0]));
    }
}
