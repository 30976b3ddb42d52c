// ---- sb_common.cuh: PTX wrappers and numeric helpers shared by every sbgen kernel ----------------
// Self-contained on purpose (no CUDA headers): NVRTC can compile it on a user's machine with no
// include path. 16-bit elements are stored as `unsigned short` and converted with PTX `cvt`.

typedef unsigned short elem_t;

#define SB_FULL_MASK 0xffffffffu
#define SB_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global->shared copy; `valid == false` fills the destination with zeros (rows past N), so
// padding rows can never inject NaN into the matmuls.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void st_shared_v4(unsigned dst, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// D (16x8, f32) += A (16x16) * B (16x8), A row-major, B column-major, 16-bit inputs.
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if SB_IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats -> one register of two 16-bit elements, `lo` at the lower address / column.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
#if SB_IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ float to_float(elem_t x) {
#if SB_IS_BF16
    return __uint_as_float(((unsigned)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(x));
    return f;
#endif
}

__device__ __forceinline__ elem_t from_float(float x) {
    return (elem_t)(pack2(x, 0.0f) & 0xffffu);
}

// Acquire load and release increment of a turn counter (the deterministic backward's locks).
__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void red_release_add(int* p, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fast_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 2^x on the FMA and integer pipes (FlashAttention-4's trick): 2^floor(x) by exponent arithmetic times
// a degree-5 polynomial for 2^frac (relative error 1.7e-7 on [0, 1], fitted for sbgen). floor(x) comes
// from rounding x - 1/2 by adding 1.5 * 2^23 (the integer lands in the low mantissa bits), not from
// floorf and a float-to-int conversion: those run on the conversion pipe, at the special-function
// unit's rate (docs/performance.md#wgmma).
__device__ __forceinline__ float poly_exp2(float x) {
    constexpr float ROUND = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
    x = fmaxf(x, -126.0f);
    const float shifted = __fadd_rn(x - 0.5f, ROUND);
    const float f = x - __fsub_rn(shifted, ROUND);  // in [0, 1]
    float p = fmaf(f, 0.00186714449f, 0.00901699997f);
    p = fmaf(p, f, 0.055799935f);
    p = fmaf(p, f, 0.240164444f);
    p = fmaf(p, f, 0.693151295f);
    p = fmaf(p, f, 1.0f);
    // Unsigned: the exponent step is negative for x < 0 (wraps to the same bits, no signed shift).
    return __uint_as_float(__float_as_uint(p) + ((__float_as_uint(shifted) - 0x4B400000u) << 23));
}

// log2(1 + 2^x), taking x itself when x > 15 (docs/math.md#forward-blocked).
__device__ __forceinline__ float softplus2(float x) {
    float s = fast_log2(1.0f + fast_exp2(x));
    return x > 15.0f ? x : s;
}

// Inclusive suffix sum across the 4 lanes of a quad (lane t gets the sum over t' >= t) and the
// quad's total. Each quad holds one row's keys, thread t the t-th contiguous run of them.
__device__ __forceinline__ float quad_suffix(float v, int t, float& total) {
    float incl = v;
    float y = __shfl_down_sync(SB_FULL_MASK, incl, 1, 4);
    if (t < 3) incl += y;
    y = __shfl_down_sync(SB_FULL_MASK, incl, 2, 4);
    if (t < 2) incl += y;
    total = __shfl_sync(SB_FULL_MASK, incl, 0, 4);
    return incl;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile whose rows hold `CHUNKS` chunks (a
// multiple of 4), with the chunk XOR-swizzled by `phase` (0..7) so that the 8 rows one ldmatrix reads
// at one column land in 8 different bank groups. Each tile kind picks the phase that is distinct
// across its 8 rows. Chunks are swizzled within their aligned group of 8, or of 4 for the last group
// of a row of 4 (mod 8) chunks (head_dim 96, 160, 224), so the offset stays inside the row.
template <int CHUNKS>
__device__ __forceinline__ unsigned swz_phase(int row, int chunk, int phase) {
    static_assert(CHUNKS % 4 == 0, "tile rows are whole groups of 4 chunks");
    constexpr int SPAN = CHUNKS < 8 ? CHUNKS : 8;
    const int mask = (CHUNKS % 8 == 0 || (chunk | 7) < CHUNKS) ? SPAN - 1 : 3;
    return (unsigned)((row * CHUNKS + (chunk ^ (phase & mask))) * 16);
}

// Tiles read 8 consecutive rows at a time (Q, dO, the staged outputs, P and dZ).
template <int CHUNKS>
__device__ __forceinline__ unsigned swz(int row, int chunk) {
    return swz_phase<CHUNKS>(row, chunk, row);
}
