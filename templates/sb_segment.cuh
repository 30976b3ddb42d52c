// ---- context parallelism's segments (docs/math.md#context-parallelism) -------------------------
// Pasted into the segment passes' kernels only.

// Where query head h of sequence b lives in a segment's tensors: every pointer is at the segment's
// token 0, tokens of a head (BHND) or sequence (BNHD) q_seq (q-shaped) or kv_seq (K/V-shaped) apart,
// so the segment may be part of a longer local tensor. len is the key segment's length.
__device__ __forceinline__ SeqView segment_view(const SbParams& p, int b, int h, int hk) {
    SeqView v;
    const long long H = p.heads, HK = p.kv_heads;
    if (LAYOUT == LAYOUT_BNHD) {
        v.q = ((long long)b * p.q_seq * H + h) * DM;
        v.kv = ((long long)b * p.kv_seq * HK + hk) * DM;
        v.q_step = H * DM;
        v.kv_step = HK * DM;
    } else {
        v.q = ((long long)b * H + h) * p.q_seq * DM;
        v.kv = ((long long)b * HK + hk) * p.kv_seq * DM;
        v.q_step = DM;
        v.kv_step = DM;
    }
    v.row = ((long long)b * H + h) * p.q_seq;
    v.len = p.kv_len;
    return v;
}

__device__ __forceinline__ float2 load_f32_pair(const float* row, int col) {
    if constexpr (DM % 2 == 0) {
        return col < DM ? *reinterpret_cast<const float2*>(row + col) : make_float2(0.0f, 0.0f);
    } else {
        return make_float2(col < DM ? row[col] : 0.0f, col + 1 < DM ? row[col + 1] : 0.0f);
    }
}
