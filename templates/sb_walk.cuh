// ---- sb_walk.cuh: the tile algebra of the right-to-left stick-breaking walk (docs/math.md#forward-blocked) --
// Expects the constants of the including template (D, DM, BM, BN, WARPS, THREADS, MT, STAGES,
// ATTEND_CURRENT, LAYOUT), its SbParams, and sb_common.cuh. D is the tile width (head_dim rounded up
// to a multiple of 32), DM the head_dim of the tensors in memory (docs/math.md#head-dims).
//
// Thread/data layout (mma.sync m16n8k16): warp w owns query rows [w*16*MT, (w+1)*16*MT) of the CTA;
// in each 16-row m-tile, lane = 4*g + t holds rows g and g+8. Scores of a key block are MT x NT
// accumulators of 16x8. The key rows of K and V are *permuted on load* (ldmatrix takes one row address
// per lane) so that lane t of a quad holds the contiguous run of keys [t*KPT, (t+1)*KPT) of its rows:
// the in-block reverse cumsum is then a sequential scan in registers plus one 4-lane shuffle scan.

constexpr int LAYOUT_BHND = 0, LAYOUT_BNHD = 1, LAYOUT_THD = 2;
constexpr int DCH = D / 8;           // 16-byte chunks per row of a head_dim-wide tile
constexpr int DT = D / 8;            // n8 tiles across head_dim
constexpr int KS = D / 16;           // k16 steps across head_dim
constexpr int NT = BN / 8;           // n8 tiles across a key block
constexpr int KPT = BN / 4;          // keys per thread per row: one contiguous run
constexpr int PK = BN / 16;          // k16 steps across a key block (for P V and dZ K)
constexpr int RPW = 16 * MT;         // query rows per warp
constexpr unsigned KV_TILE_BYTES = BN * D * 2;

static_assert(KS % 2 == 0 && DT % 2 == 0, "the tile width must be a multiple of 32");
static_assert(DM >= 1 && DM <= D && D - DM < 32, "DM is padded to the next multiple of 32");
static_assert(BM == RPW * WARPS, "block_m must equal rows per warp times warps");

// K and V tiles are read 8 *permuted* rows at a time: keys a*KPT + 2*nt + e for a in 0..3, e in 0..1.
// Their swizzle phase 2a + e is distinct across those 8 rows (row & 7 would repeat 4 times).
__device__ __forceinline__ unsigned swz_kv(int key, int chunk) {
    return swz_phase<DCH>(key, chunk, 2 * (key / KPT) + (key & 1));
}

// Key (inside the block) that score column `pos` = 8*n_tile + column holds.
__device__ __forceinline__ int key_of_position(int pos) {
    const int nt = pos >> 3, c = pos & 7;
    return (c >> 1) * KPT + 2 * nt + (c & 1);
}

// Where one query head of one sequence lives: element offsets of its token 0 in the q-shaped
// (q, o, dO, dq, o_saved) and K/V-shaped (k, v, dk, dv and their accumulators) tensors, the elements
// between consecutive tokens, the rem/log2_rem index of token 0, and the sequence length. The three
// layouts differ only here (docs/architecture.md#sequence-views).
struct SeqView {
    long long q, kv;
    long long q_step, kv_step;
    long long row;
    int len;
};

// Query head h of sequence b reads K/V head hk = h / (heads / kv_heads). A THD sequence whose bounds
// fall outside 0..=total_tokens or that is longer than max_seqlen (`seq`) gets length 0: its CTAs
// return at once, so a bad device cu_seqlens can never address memory out of bounds.
// (A template so that kernels whose parameter block has no sequences, the decode, never instantiate it.)
template <class Params>
__device__ __forceinline__ SeqView seq_view(const Params& p, int b, int h, int hk) {
    SeqView v;
    const long long H = p.heads, HK = p.kv_heads;
    if (LAYOUT == LAYOUT_THD) {
        int start = p.cu_seqlens[b], end = p.cu_seqlens[b + 1];
        if (!(0 <= start && start <= end && end <= p.total_tokens && end - start <= p.seq)) start = end = 0;
        v.q = ((long long)start * H + h) * DM;
        v.kv = ((long long)start * HK + hk) * DM;
        v.q_step = H * DM;
        v.kv_step = HK * DM;
        v.row = (long long)h * p.total_tokens + start;
        v.len = end - start;
    } else if (LAYOUT == LAYOUT_BNHD) {
        v.q = ((long long)b * p.seq * H + h) * DM;
        v.kv = ((long long)b * p.seq * HK + hk) * DM;
        v.q_step = H * DM;
        v.kv_step = HK * DM;
        v.row = ((long long)b * H + h) * p.seq;
        v.len = p.seq;
    } else {
        v.q = ((long long)b * H + h) * p.seq * DM;
        v.kv = ((long long)b * HK + hk) * p.seq * DM;
        v.q_step = DM;
        v.kv_step = DM;
        v.row = ((long long)b * H + h) * p.seq;
        v.len = p.seq;
    }
    return v;
}

// Copies ROWS tokens starting at row0 (of a sequence whose token 0 is at `src`, tokens `step` elements
// apart) into a swizzled shared tile (KV: the key-tile swizzle), from its row `tile_row` on (a block
// gathered from several pages is loaded one page run at a time). Tokens at or past `len` and columns at
// or past DM (the padding up to the tile width D) are zero-filled, so they add nothing to the matmuls.
// With DM a multiple of 8 the copy is asynchronous (cp.async, 16 bytes); otherwise token rows are not
// 16-byte aligned and each element is loaded and stored synchronously.
template <int ROWS, bool KV>
__device__ __forceinline__ void load_tile(unsigned dst, const elem_t* src, long long step, int row0, int len, int tid,
                                          int tile_row = 0) {
    constexpr int CHUNKS = ROWS * DCH;
    if constexpr (DM % 8 == 0 && (THREADS % DCH == 0 || D > 128)) {
        // Each thread copies column chunk c of rows r0, r0 + RSTEP, ...: one pointer advanced by
        // RSTEP tokens, rather than one address per row, which the compiler kept in registers
        // across the walk (spills at 256 columns on 4 warps). Above 128 columns this holds even when
        // the chunks do not divide the threads: the last THREADS % DCH threads copy nothing
        // (docs/performance.md#known-spills).
        constexpr int RSTEP = THREADS / DCH;
        if (THREADS % DCH != 0 && tid >= RSTEP * DCH) return;
        const int c = tid % DCH, r0 = tid / DCH;
        const bool column_valid = c < DM / 8;
        const elem_t* ptr = src + (row0 + r0) * step + c * 8;
        const long long advance = RSTEP * step;
#pragma unroll
        for (int it = 0; it < (ROWS + RSTEP - 1) / RSTEP; ++it) {
            const int r = r0 + it * RSTEP;
            if (ROWS % RSTEP != 0 && r >= ROWS) break;
            const bool valid = row0 + r < len && column_valid;
            cp_async_16(dst + (KV ? swz_kv(tile_row + r, c) : swz<DCH>(tile_row + r, c)), valid ? ptr : src, valid);
            ptr += advance;
        }
        return;
    }
#pragma unroll
    for (int it = 0; it < (CHUNKS + THREADS - 1) / THREADS; ++it) {
        const int i = it * THREADS + tid;
        if (CHUNKS % THREADS != 0 && i >= CHUNKS) break;
        const int r = i / DCH, c = i % DCH;
        const int n = row0 + r;
        const unsigned to = dst + (KV ? swz_kv(tile_row + r, c) : swz<DCH>(tile_row + r, c));
        if constexpr (DM % 8 == 0) {
            const bool valid = n < len && c < DM / 8;
            cp_async_16(to, src + (valid ? n * step + c * 8 : 0), valid);
        } else {
            unsigned w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = c * 8 + 2 * e;
                const elem_t* x = src + n * step + col;
                const unsigned lo = (n < len && col < DM) ? x[0] : 0;
                const unsigned hi = (n < len && col + 1 < DM) ? x[1] : 0;
                w[e] = lo | (hi << 16);
            }
            st_shared_v4(to, make_uint4(w[0], w[1], w[2], w[3]));
        }
    }
}

// A fragment (16 rows x 16 of head_dim) of a swizzled [rows x D] tile, rows from `row0`.
__device__ __forceinline__ void load_a_frag(unsigned (&a)[4], unsigned tile, int row0, int ks, int lane) {
    ldmatrix_x4(a, tile + swz<DCH>(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
}

// s[mt][nt] += A[mt] . B^T where B's rows are the block's keys (K or V tile), in permuted order.
// `a_frag(mt, ks, a)` supplies the A fragments (registers or shared memory).
// Tiles wider than 128 are walked one k-step pair at a time: unrolled, the compiler hoists every
// A fragment load ahead of the MMAs and runs out of registers (the output accumulators take 128).
constexpr int KS_UNROLL = D > 128 ? 1 : KS / 2;

template <class AFrag>
__device__ __forceinline__ void tile_dot_keys(float (&s)[MT][NT][4], AFrag a_frag, unsigned key_tile, int lane) {
#pragma unroll KS_UNROLL
    for (int ks = 0; ks < KS; ks += 2) {
        unsigned a0[MT][4], a1[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a_frag(mt, ks, a0[mt]);
            a_frag(mt, ks + 1, a1[mt]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            unsigned bfr[4];
            const int key = key_of_position(8 * nt + (lane & 7));
            ldmatrix_x4(bfr, key_tile + swz_kv(key, 2 * ks + (lane >> 3)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(s[mt][nt], a0[mt], bfr[0], bfr[1]);
                mma_16816(s[mt][nt], a1[mt], bfr[2], bfr[3]);
            }
        }
    }
}

// Packs block scores/weights (in accumulator layout) as A fragments over the block's keys.
__device__ __forceinline__ void pack_key_frags(unsigned (&a)[MT][PK][4], const float (&s)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < PK; ++kk) {
            a[mt][kk][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            a[mt][kk][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            a[mt][kk][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            a[mt][kk][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
}

// out[mt] += A[mt] (rows x block keys) . T (block keys x D), T a K or V tile in permuted key order.
__device__ __forceinline__ void tile_mul_keys(float (&out)[MT][DT][4], const unsigned (&a)[MT][PK][4], unsigned key_tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
        const int j = lane >> 3;
        const int key = key_of_position(16 * kk + (j & 1) * 8 + (lane & 7));
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
            unsigned bfr[4];
            ldmatrix_x4_trans(bfr, key_tile + swz_kv(key, dt + (j >> 1)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(out[mt][dt], a[mt][kk], bfr[0], bfr[1]);
                mma_16816(out[mt][dt + 1], a[mt][kk], bfr[2], bfr[3]);
            }
        }
    }
}

__device__ __forceinline__ bool key_allowed(int row, int key, int N) {
    return key < N && (ATTEND_CURRENT ? key <= row : key < row);
}

// stick_step's linear variant (POLY == 3, `softplus = linear`; docs/math.md#the-stick-in-linear-space):
// per score 2^x on the special-function unit, and inside a thread's run of keys products of
// (1 + 2^x) = 1 / (1 - beta) instead of sums of log2(1 - beta): one reciprocal per run rather than
// per score (the backward's beta takes its own). The runs are joined in log space as before: one
// lg2 per run and one exp2 per row-half. With every score at most LINEAR_MAX_X = 120/KPT, a run's
// product is at most (1 + 2^(120/KPT))^KPT: 2^120.0 for 8 keys, 2^120.1 for 16, 2^123.3 for 32, so
// it and its reciprocal are normal floats (an overflow would make the weights NaN). So when a score
// of the warp's block exceeds the bound, the whole warp takes the log-space walk for this block
// (one vote: the branch is warp-uniform, so the row-halves' chains still interleave).
template <bool MASKED, bool WANT_BETA>
__device__ __forceinline__ bool stick_step_linear(float (&s)[MT][NT][4], float (&beta)[MT][NT][4], float (&acc)[MT][2],
                                                  int key0, int row0, int N, float scale_log2, int lane) {
    // Local, not at namespace scope: such constants show in every kernel's PTX.
    constexpr float LINEAR_MAX_X = 120.0f / KPT;
    static_assert(KPT <= 32, "the bound keeps runs of at most 32 keys finite (64 keys could reach 2^142)");
    const int g = lane >> 2, t = lane & 3;
    float top = SB_NEG_INF;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[mt][nt][e] *= scale_log2;
                top = fmaxf(top, s[mt][nt][e]);
            }
    if (!__all_sync(SB_FULL_MASK, top <= LINEAR_MAX_X)) return false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = row0 + mt * 16 + g + 8 * hh;
            // Farthest key first: left holds the product of (1 + 2^x) over the run's keys left of m.
            // Key m's weight relative to the stick left at the run's right end is
            // beta_m prod_{k > m} (1 - beta_k) = 2^x_m left_m / (the whole run's product).
            float left = 1.0f;
#pragma unroll
            for (int m = 0; m < KPT; ++m) {
                float& v = s[mt][m >> 1][2 * hh + (m & 1)];
                const bool ok = !MASKED || key_allowed(row, key0 + t * KPT + m, N);
                const float e = fast_exp2(v);
                if (WANT_BETA) beta[mt][m >> 1][2 * hh + (m & 1)] = ok ? e * fast_rcp(1.0f + e) : 0.0f;
                v = ok ? e * left : 0.0f;
                left = ok ? fmaf(left, e, left) : left;  // left * (1 + e), without the sum
            }
            const float inv = fast_rcp(left);         // the run's product of (1 - beta)
            const float run_log2 = -fast_log2(left);  // its log2, beside the reciprocal rather than after
            float total;
            const float stick = fast_exp2(quad_suffix(run_log2, t, total) - run_log2 + acc[mt][hh]);
            // Two products, not one by inv * stick: that can flush to zero where the weight is not.
#pragma unroll
            for (int m = 0; m < KPT; ++m) {
                float& v = s[mt][m >> 1][2 * hh + (m & 1)];
                v = (v * inv) * stick;
            }
            acc[mt][hh] += total;
        }
    return true;
}

// One key block of the walk for this thread's rows. On entry s holds raw dot products q.k; on exit
// s holds the attention weights A (0 where not allowed) and acc has absorbed the block's
// sum of log2(1 - beta). With WANT_BETA, beta receives log2-space-free beta = sigmoid(z) (0 where
// not allowed). `key0` is the block's first key, `row0` the warp's first query row.
template <bool MASKED, bool WANT_BETA, int POLY>
__device__ __forceinline__ void stick_step(float (&s)[MT][NT][4], float (&beta)[MT][NT][4], float (&acc)[MT][2],
                                           int key0, int row0, int N, float scale_log2, int lane) {
    const int g = lane >> 2, t = lane & 3;
    if constexpr (POLY == 3) {
        // The scores come back scaled when the block needs the log-space walk.
        if (stick_step_linear<MASKED, WANT_BETA>(s, beta, acc, key0, row0, N, scale_log2, lane)) return;
        scale_log2 = 1.0f;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = row0 + mt * 16 + g + 8 * hh;
            // Local reverse inclusive scan over this thread's run of keys, nearest key last.
            float run = 0.0f;
#pragma unroll
            for (int m = KPT - 1; m >= 0; --m) {
                float& v = s[mt][m >> 1][2 * hh + (m & 1)];
                const float x = v * scale_log2;
                const bool ok = !MASKED || key_allowed(row, key0 + t * KPT + m, N);
                const float l = ok ? -softplus2(x) : 0.0f;
                run += l;
                if (WANT_BETA) beta[mt][m >> 1][2 * hh + (m & 1)] = ok ? fast_exp2(x + l) : 0.0f;
                v = ok ? x + run : SB_NEG_INF;  // log2 A minus what lies right of this thread's run
            }
            float total;
            const float right = quad_suffix(run, t, total) - run + acc[mt][hh];
#pragma unroll
            for (int m = 0; m < KPT; ++m) {
                float& v = s[mt][m >> 1][2 * hh + (m & 1)];
                // POLY: 0 MUFU, 1 the polynomial, 2 the polynomial for odd keys (the split between
                // the pipes). The polynomial is evaluated for masked keys too (2^-126 there) and then
                // replaced: a select, where `masked ? 0 : poly_exp2(..)` compiles to a branch.
                const bool poly = POLY == 1 || (POLY == 2 && (m & 1));
                const float w = poly ? poly_exp2(v + right) : fast_exp2(v + right);
                v = poly && v == SB_NEG_INF ? 0.0f : w;
            }
            acc[mt][hh] += total;
        }
}

// True when any of this thread's valid rows still has more than 2^-T of its stick.
__device__ __forceinline__ bool stick_alive(const float (&acc)[MT][2], int row0, int N, float neg_bits, int lane) {
    const int g = lane >> 2;
    bool alive = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
            alive |= (row0 + mt * 16 + g + 8 * hh < N) && acc[mt][hh] >= neg_bits;
    return alive;
}

// Writes a warp's [RPW x D] f32 accumulator tile as 16-bit elements into a swizzled shared tile.
__device__ __forceinline__ void stage_rows(unsigned char* tile, const float (&o)[MT][DT][4], int row0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = row0 + mt * 16 + g + 8 * hh;
                *reinterpret_cast<unsigned*>(tile + swz<DCH>(r, dt) + 4 * t) = pack2(o[mt][dt][2 * hh], o[mt][dt][2 * hh + 1]);
            }
}

// Copies a staged [BM x D] tile to tokens q0.. of a sequence (token 0 at `dst`, tokens `step` apart),
// the first DM columns of each row: 16 bytes per thread, or element by element when DM is not a
// multiple of 8.
__device__ __forceinline__ void store_tile(elem_t* dst, long long step, const unsigned char* tile, int q0, int len, int tid) {
    constexpr int CHUNKS = BM * DCH;
#pragma unroll
    for (int it = 0; it < (CHUNKS + THREADS - 1) / THREADS; ++it) {
        const int i = it * THREADS + tid;
        if (CHUNKS % THREADS != 0 && i >= CHUNKS) break;
        const int r = i / DCH, c = i % DCH;
        if (q0 + r >= len) continue;
        const uint4 val = *reinterpret_cast<const uint4*>(tile + swz<DCH>(r, c));
        elem_t* out = dst + (q0 + r) * step + c * 8;
        if constexpr (DM % 8 == 0) {
            if (c < DM / 8) *reinterpret_cast<uint4*>(out) = val;
        } else {
            const unsigned w[4] = {val.x, val.y, val.z, val.w};
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (c * 8 + e < DM) out[e] = (elem_t)(w[e / 2] >> (16 * (e & 1)));
        }
    }
}

// Stores two consecutive f32 values of a row at columns col, col + 1 (< DM each): one 8-byte store
// when DM is even (the pair is then aligned), else one element at a time.
__device__ __forceinline__ void store_f32_pair(float* row, int col, float a, float b) {
    if constexpr (DM % 2 == 0) {
        if (col < DM) *reinterpret_cast<float2*>(row + col) = make_float2(a, b);
    } else {
        if (col < DM) row[col] = a;
        if (col + 1 < DM) row[col + 1] = b;
    }
}

// ---- backward helpers ----------------------------------------------------------------------------
constexpr int PCH = BN / 8;  // 16-byte chunks per row of a [BM x BN] weight tile

// Writes a warp's block values (accumulator layout, permuted keys) as 16-bit elements into a
// [BM x BN] shared tile at their true key positions: lane t's contiguous run becomes KPT/8 chunks.
// (A template so that kernels with 16-key blocks, the decode's, which stage no weights, never
// instantiate its 32-key swizzle.)
template <int CHUNKS = PCH>
__device__ __forceinline__ void stage_keys(unsigned char* tile, const float (&s)[MT][NT][4], int row0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = row0 + mt * 16 + g + 8 * hh;
#pragma unroll
            for (int c = 0; c < KPT / 8; ++c) {
                uint4 val;
                val.x = pack2(s[mt][4 * c + 0][2 * hh], s[mt][4 * c + 0][2 * hh + 1]);
                val.y = pack2(s[mt][4 * c + 1][2 * hh], s[mt][4 * c + 1][2 * hh + 1]);
                val.z = pack2(s[mt][4 * c + 2][2 * hh], s[mt][4 * c + 2][2 * hh + 1]);
                val.w = pack2(s[mt][4 * c + 3][2 * hh], s[mt][4 * c + 3][2 * hh + 1]);
                *reinterpret_cast<uint4*>(tile + swz<CHUNKS>(r, t * (KPT / 8) + c)) = val;
            }
        }
}

// Adds two consecutive floats to global memory (one vector reduction on sm_90).
__device__ __forceinline__ void red_add2(float* dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
}

// Adds four consecutive floats (16-byte aligned) to global memory: one vector reduction on sm_90.
__device__ __forceinline__ void red_add4(float* dst, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
#else
    red_add2(dst, a, b);
    red_add2(dst + 2, c, d);
#endif
}

// Adds a pair at columns col, col + 1 of a row of an f32 accumulator (columns past DM are padding).
__device__ __forceinline__ void add_f32_pair(float* row, int col, float a, float b) {
    if constexpr (DM % 2 == 0) {
        if (col < DM) red_add2(row + col, a, b);
    } else {
        if (col < DM) atomicAdd(row + col, a);
        if (col + 1 < DM) atomicAdd(row + col + 1, b);
    }
}

// dV += P^T dO and dK += dZ^T Q for one key block: the [BN x D] tiles are split among the warps in
// groups of KG_M x KG_N pieces of 16x16 (16 keys by 16 columns), consecutive groups per warp (when they
// do not split evenly, the last warps take fewer); each group runs over the CTA's BM query rows and its
// pieces are added to the f32 accumulators (token 0 of the K/V head at `dk_acc`/`dv_acc`, tokens `step`
// apart; keys at or past `len` dropped). A group's pieces share their fragments: per 16 rows it loads
// KG_M fragments of P^T and of dZ^T and KG_N of dO and of Q, so 2 x 2 groups take half the ldmatrix
// traffic of single pieces (the backward's shared-memory pipe was its busiest; docs/performance.md#wgmma).
// The Q and dO tiles' chunk c of row r is at `rows_offset(r, c)` (the wgmma backward stores them in
// wgmma's layout). With QUADS (DM == D) the lanes of a quad pair up to add four columns per reduction
// instead of two: half the requests for the additions in L2; no faster measured, but fewer registers
// (the 256-wide wgmma backward on 128 x 32 tiles spilled 44 bytes without it). (A template for the
// reason stage_keys is.)
struct SwizzledRows {
    __device__ __forceinline__ unsigned operator()(int row, int chunk) const { return swz<DCH>(row, chunk); }
};
// ldmatrix loads per warp and 16 rows for groups of mg x ng pieces: groups per warp times loads per group.
constexpr int kg_cost(int mg, int ng) {
    return ((((BN / 16) / mg) * ((D / 16) / ng) + WARPS - 1) / WARPS) * (2 * mg + 2 * ng);
}
// key_grads' group shape, 10 * KG_M + KG_N: the one with the fewest loads among those of at most
// `max_pieces` pieces that divide the tile (ties: the fewer accumulators).
constexpr int kg_pick(int max_pieces) {
    int best = 11, cost = kg_cost(1, 1);
    const int shapes[3] = {21, 12, 22};
    for (int i = 0; i < 3; ++i) {
        const int mg = shapes[i] / 10, ng = shapes[i] % 10;
        if ((BN / 16) % mg == 0 && (D / 16) % ng == 0 && mg * ng <= max_pieces && kg_cost(mg, ng) < cost) {
            best = shapes[i];
            cost = kg_cost(mg, ng);
        }
    }
    return best;
}
// Pieces per group the registers allow: each piece holds 16 accumulators per thread beside dQ's
// MT * DT * 4 (64 at 16 rows by 128 columns per warp); wider dQ keeps single pieces, and a kernel
// bounded to several CTAs per SM (`min_blocks`, the 64-wide wgmma backward in 168 registers) two.
// (A function, not a constant of the file: those are emitted into every kernel's PTX.)
constexpr int key_grads_max_pieces(int min_blocks) { return MT * DT * 4 > 64 ? 1 : min_blocks > 1 ? 2 : 4; }
// MAX_PIECES: the most pieces per group the caller's registers allow (key_grads_max_pieces).
template <int CHUNKS = PCH, class RowsOffset = SwizzledRows, bool QUADS = false, int MAX_PIECES = 1>
__device__ __forceinline__ void key_grads(float* dk_acc, float* dv_acc, long long step, unsigned p_tile, unsigned dz_tile,
                                          unsigned q_tile, unsigned do_tile, int key0, int len, int warp, int lane,
                                          RowsOffset rows_offset = {}) {
    static_assert(!QUADS || DM == D, "four-column reductions need whole 16-byte column groups");
    constexpr int KG_M = kg_pick(MAX_PIECES) / 10, KG_N = kg_pick(MAX_PIECES) % 10;
    constexpr int NGROUPS = (D / 16) / KG_N;  // groups across head_dim
    constexpr int GROUPS = ((BN / 16) / KG_M) * NGROUPS;
    constexpr int PER_WARP = (GROUPS + WARPS - 1) / WARPS;
    const int g = lane >> 2, t = lane & 3, j = lane >> 3;
#pragma unroll 1
    for (int i = 0; i < PER_WARP; ++i) {
        const int group = warp * PER_WARP + i;
        if (GROUPS % WARPS != 0 && group >= GROUPS) break;  // warp-uniform
        const int mbase = (group / NGROUPS) * (16 * KG_M), nbase = (group % NGROUPS) * (16 * KG_N);
        if (nbase >= DM) continue;  // a group wholly in the head_dim padding (warp-uniform)
        float dv[KG_M][KG_N][2][4] = {}, dk[KG_M][KG_N][2][4] = {};
#pragma unroll
        for (int kb = 0; kb < BM; kb += 16) {
            unsigned pa[KG_M][4], za[KG_M][4], ob[KG_N][4], qb[KG_N][4];
            // A = P^T (keys x rows) from the row-major weight tile, transposed by ldmatrix.
            const int arow = kb + (j >> 1) * 8 + (lane & 7);
#pragma unroll
            for (int mg = 0; mg < KG_M; ++mg) {
                const int achunk = ((mbase + 16 * mg) >> 3) + (j & 1);
                ldmatrix_x4_trans(pa[mg], p_tile + swz<CHUNKS>(arow, achunk));
                ldmatrix_x4_trans(za[mg], dz_tile + swz<CHUNKS>(arow, achunk));
            }
            // B = dO or Q (rows x D), k = rows.
            const int brow = kb + (j & 1) * 8 + (lane & 7);
#pragma unroll
            for (int ng = 0; ng < KG_N; ++ng) {
                const int bchunk = ((nbase + 16 * ng) >> 3) + (j >> 1);
                ldmatrix_x4_trans(ob[ng], do_tile + rows_offset(brow, bchunk));
                ldmatrix_x4_trans(qb[ng], q_tile + rows_offset(brow, bchunk));
            }
#pragma unroll
            for (int mg = 0; mg < KG_M; ++mg)
#pragma unroll
                for (int ng = 0; ng < KG_N; ++ng) {
                    mma_16816(dv[mg][ng][0], pa[mg], ob[ng][0], ob[ng][1]);
                    mma_16816(dv[mg][ng][1], pa[mg], ob[ng][2], ob[ng][3]);
                    mma_16816(dk[mg][ng][0], za[mg], qb[ng][0], qb[ng][1]);
                    mma_16816(dk[mg][ng][1], za[mg], qb[ng][2], qb[ng][3]);
                }
        }
#pragma unroll
        for (int mg = 0; mg < KG_M; ++mg)
#pragma unroll
            for (int ng = 0; ng < KG_N; ++ng) {
                const int pm = mbase + 16 * mg, pn = nbase + 16 * ng;
                if (KG_N > 1 && pn >= DM) continue;  // a piece in the padding (warp-uniform)
                if constexpr (QUADS) {
                    // Lanes t and t ^ 1 swap a pair: the even lane then holds row g's columns 2t .. 2t + 3,
                    // the odd one row g + 8's columns 2t - 2 .. 2t + 1.
                    const bool odd = t & 1;
                    const int key = key0 + pm + g + (odd ? 8 : 0);
                    const long long off = key * step;
#pragma unroll
                    for (int n2 = 0; n2 < 2; ++n2) {
                        const float* pv = dv[mg][ng][n2];
                        const float* pk = dk[mg][ng][n2];
                        const int col = pn + 8 * n2 + 2 * (t & ~1);
                        const float v0 = __shfl_xor_sync(SB_FULL_MASK, odd ? pv[0] : pv[2], 1);
                        const float v1 = __shfl_xor_sync(SB_FULL_MASK, odd ? pv[1] : pv[3], 1);
                        const float k0 = __shfl_xor_sync(SB_FULL_MASK, odd ? pk[0] : pk[2], 1);
                        const float k1 = __shfl_xor_sync(SB_FULL_MASK, odd ? pk[1] : pk[3], 1);
                        if (key < len) {
                            if (odd) {
                                red_add4(dv_acc + off + col, v0, v1, pv[2], pv[3]);
                                red_add4(dk_acc + off + col, k0, k1, pk[2], pk[3]);
                            } else {
                                red_add4(dv_acc + off + col, pv[0], pv[1], v0, v1);
                                red_add4(dk_acc + off + col, pk[0], pk[1], k0, k1);
                            }
                        }
                    }
                } else {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int key = key0 + pm + g + 8 * hh;
                        if (key < len) {
                            const long long off = key * step;
#pragma unroll
                            for (int n2 = 0; n2 < 2; ++n2) {
                                const int col = pn + 8 * n2 + 2 * t;
                                add_f32_pair(dv_acc + off, col, dv[mg][ng][n2][2 * hh], dv[mg][ng][n2][2 * hh + 1]);
                                add_f32_pair(dk_acc + off, col, dk[mg][ng][n2][2 * hh], dk[mg][ng][n2][2 * hh + 1]);
                            }
                        }
                    }
                }
            }
    }
}
