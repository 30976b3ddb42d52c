//! KV caches for decoding: where a sequence's cached keys and values live, and the host-side check of
//! `seqlens_k` and `block_table`.
//!
//! Two geometries (docs/math.md#decode):
//! - **contiguous**: k and v `[B, H_kv, capacity, D]` (a BHND kernel) or `[B, capacity, H_kv, D]`
//!   (BNHD); sequence b holds tokens `0..seqlens_k[b]`.
//! - **paged**: k and v `[num_pages, page_size, H_kv, D]` and `block_table` i32 `[B, max_pages]`: token
//!   t of sequence b is row `t % page_size` of page `block_table[b][t / page_size]` (as vLLM and
//!   flash-attn's `flash_attn_with_kvcache` lay them out).
//!
//! As with `cu_seqlens` (see [`crate::varlen`]), device-resident tables are trusted by the launcher
//! (reading them back would synchronise the stream); check a host copy here before uploading it. The
//! kernels read a length outside `0..=capacity` as an empty sequence and a page id outside
//! `0..num_pages` as a page of no keys, so bad device tables never make them read out of bounds.

/// The shape of a KV cache, besides batch, K/V heads and head_dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvCacheGeometry {
    /// `[B, H_kv, capacity, D]` or `[B, capacity, H_kv, D]`, as the kernel's layout says.
    Contiguous { capacity: usize },
    /// `[num_pages, page_size, H_kv, D]` with a `[B, max_pages]` block table.
    Paged { num_pages: usize, page_size: usize, max_pages: usize },
}

impl KvCacheGeometry {
    /// The most tokens one sequence can hold: `capacity`, or `max_pages * page_size`.
    pub fn capacity(&self) -> usize {
        match *self {
            KvCacheGeometry::Contiguous { capacity } => capacity,
            KvCacheGeometry::Paged { page_size, max_pages, .. } => max_pages.saturating_mul(page_size),
        }
    }

    /// Elements of k (and of v) for `batch` sequences of `kv_heads` heads of `head_dim`, or `None` on
    /// overflow.
    pub fn cache_elements(&self, batch: usize, kv_heads: usize, head_dim: usize) -> Option<usize> {
        let tokens = match *self {
            KvCacheGeometry::Contiguous { capacity } => batch.checked_mul(capacity)?,
            KvCacheGeometry::Paged { num_pages, page_size, .. } => num_pages.checked_mul(page_size)?,
        };
        tokens.checked_mul(kv_heads)?.checked_mul(head_dim)
    }

    /// Entries of the block table for `batch` sequences (0 for a contiguous cache).
    pub fn block_table_len(&self, batch: usize) -> Option<usize> {
        match *self {
            KvCacheGeometry::Contiguous { .. } => Some(0),
            KvCacheGeometry::Paged { max_pages, .. } => batch.checked_mul(max_pages),
        }
    }

    pub fn is_paged(&self) -> bool {
        matches!(self, KvCacheGeometry::Paged { .. })
    }
}

/// A `seqlens_k` or `block_table` that does not describe the cache, naming the first bad entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvCacheError {
    #[error("`seqlens_k` has {got} entries: it needs one per sequence, {batch}")]
    SeqlensLen { batch: usize, got: usize },
    #[error("`seqlens_k[{index}]` = {got} is out of range: allowed 0..={capacity} (the cache's tokens per sequence)")]
    Seqlen { index: usize, got: i64, capacity: usize },
    #[error("`block_table` has {got} entries: a paged cache needs batch * max_pages = {needed}")]
    BlockTableLen { needed: usize, got: usize },
    #[error("a contiguous cache takes no `block_table`")]
    BlockTableUnexpected,
    #[error(
        "`block_table[{batch_index}][{page_index}]` = {got} is out of range: allowed 0..{num_pages} (sequence \
         {batch_index} holds {len} tokens, so its first {pages_used} pages must be valid)"
    )]
    PageId { batch_index: usize, page_index: usize, got: i32, num_pages: usize, len: usize, pages_used: usize },
}

/// Checks host copies of `seqlens_k` (one length per sequence, each in `0..=capacity`) and, for a
/// paged cache, `block_table` (the pages that hold each sequence's tokens are in `0..num_pages`;
/// entries past a sequence's last page are not read and may hold anything, e.g. -1).
pub fn check_kv_tables(
    geometry: KvCacheGeometry,
    batch: usize,
    seqlens_k: &[i32],
    block_table: Option<&[i32]>,
) -> Result<(), KvCacheError> {
    if seqlens_k.len() != batch {
        return Err(KvCacheError::SeqlensLen { batch, got: seqlens_k.len() });
    }
    let capacity = geometry.capacity();
    for (index, &len) in seqlens_k.iter().enumerate() {
        if len < 0 || len as usize > capacity {
            return Err(KvCacheError::Seqlen { index, got: len as i64, capacity });
        }
    }
    match (geometry, block_table) {
        (KvCacheGeometry::Contiguous { .. }, None) => Ok(()),
        (KvCacheGeometry::Contiguous { .. }, Some(_)) => Err(KvCacheError::BlockTableUnexpected),
        (KvCacheGeometry::Paged { max_pages, .. }, None) => {
            Err(KvCacheError::BlockTableLen { needed: batch.saturating_mul(max_pages), got: 0 })
        }
        (KvCacheGeometry::Paged { num_pages, page_size, max_pages }, Some(table)) => {
            let needed = batch.saturating_mul(max_pages);
            if table.len() != needed {
                return Err(KvCacheError::BlockTableLen { needed, got: table.len() });
            }
            for (batch_index, &len) in seqlens_k.iter().enumerate() {
                let len = len as usize;
                let pages_used = len.div_ceil(page_size.max(1));
                let row = &table[batch_index * max_pages..][..pages_used];
                if let Some((page_index, &got)) =
                    row.iter().enumerate().find(|&(_, &id)| id < 0 || id as usize >= num_pages)
                {
                    return Err(KvCacheError::PageId { batch_index, page_index, got, num_pages, len, pages_used });
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGED: KvCacheGeometry = KvCacheGeometry::Paged { num_pages: 6, page_size: 16, max_pages: 3 };

    #[test]
    fn sizes_follow_the_geometry() {
        let c = KvCacheGeometry::Contiguous { capacity: 100 };
        assert_eq!(c.capacity(), 100);
        assert_eq!(c.cache_elements(2, 4, 8), Some(2 * 100 * 4 * 8));
        assert_eq!(c.block_table_len(5), Some(0));
        assert_eq!(PAGED.capacity(), 48);
        assert_eq!(PAGED.cache_elements(2, 4, 8), Some(6 * 16 * 4 * 8));
        assert_eq!(PAGED.block_table_len(5), Some(15));
        assert_eq!(KvCacheGeometry::Contiguous { capacity: usize::MAX }.cache_elements(2, 1, 1), None);
    }

    #[test]
    fn accepts_valid_tables_and_ignores_unused_pages() {
        let c = KvCacheGeometry::Contiguous { capacity: 100 };
        assert!(check_kv_tables(c, 3, &[0, 1, 100], None).is_ok());
        // Sequence 0 uses 1 page, sequence 1 none (its entries are -1), sequence 2 all three.
        let table = [5, -1, -1, -1, -1, -1, 0, 1, 2];
        assert!(check_kv_tables(PAGED, 3, &[16, 0, 33], Some(&table)).is_ok());
    }

    #[test]
    fn refuses_bad_lengths_naming_the_entry() {
        let c = KvCacheGeometry::Contiguous { capacity: 100 };
        let e = check_kv_tables(c, 3, &[0, 101, 1], None).unwrap_err();
        assert_eq!(e, KvCacheError::Seqlen { index: 1, got: 101, capacity: 100 });
        assert!(e.to_string().contains("`seqlens_k[1]` = 101") && e.to_string().contains("0..=100"), "{e}");
        let e = check_kv_tables(c, 3, &[-1, 0, 0], None).unwrap_err();
        assert!(matches!(e, KvCacheError::Seqlen { index: 0, got: -1, .. }), "{e}");
        let e = check_kv_tables(c, 3, &[1, 2], None).unwrap_err();
        assert_eq!(e, KvCacheError::SeqlensLen { batch: 3, got: 2 });
        let e = check_kv_tables(PAGED, 1, &[49], Some(&[0, 1, 2])).unwrap_err();
        assert!(matches!(e, KvCacheError::Seqlen { capacity: 48, .. }), "{e}");
    }

    #[test]
    fn refuses_bad_page_ids_and_tables() {
        let e = check_kv_tables(PAGED, 2, &[17, 1], Some(&[0, 6, -1, 3, -1, -1])).unwrap_err();
        assert_eq!(
            e,
            KvCacheError::PageId { batch_index: 0, page_index: 1, got: 6, num_pages: 6, len: 17, pages_used: 2 }
        );
        assert!(e.to_string().contains("`block_table[0][1]` = 6") && e.to_string().contains("0..6"), "{e}");
        let e = check_kv_tables(PAGED, 2, &[0, 1], Some(&[0, 0, 0, -2, 0, 0])).unwrap_err();
        assert!(matches!(e, KvCacheError::PageId { batch_index: 1, page_index: 0, got: -2, .. }), "{e}");
        let e = check_kv_tables(PAGED, 2, &[0, 1], Some(&[0; 5])).unwrap_err();
        assert_eq!(e, KvCacheError::BlockTableLen { needed: 6, got: 5 });
        let e = check_kv_tables(PAGED, 2, &[0, 1], None).unwrap_err();
        assert!(matches!(e, KvCacheError::BlockTableLen { got: 0, .. }), "{e}");
        let c = KvCacheGeometry::Contiguous { capacity: 4 };
        assert_eq!(check_kv_tables(c, 1, &[1], Some(&[0])).unwrap_err(), KvCacheError::BlockTableUnexpected);
    }
}
