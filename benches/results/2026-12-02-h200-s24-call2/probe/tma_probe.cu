// Probe: does the driver accept a rank-5 tensor map whose dims overlap (the key permutation of the
// wgmma forward's K/V tiles), and does TMA place rows as wg_kv_offset expects?
#include <cuda.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstdint>

template <int BN>
__global__ void probe(const __grid_constant__ CUtensorMap map, int row0, int col0, unsigned short* out) {
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ __align__(8) unsigned long long bar;
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(b));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(b), "r"(BN * 128) : "memory");
        asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], [%7];"
                     :: "r"(s), "l"(&map), "r"(col0), "r"(0), "r"(0), "r"(0), "r"(row0), "r"(b) : "memory");
    }
    asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0;\n@!p bra W;\n}" :: "r"(b) : "memory");
    for (int i = threadIdx.x; i < BN * 64; i += blockDim.x) out[i] = ((unsigned short*)smem)[i];
}

#define CK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { const char* m; cuGetErrorString(r, &m); printf("%s -> %d %s\n", #x, (int)r, m); } } while (0)

template <int BN>
int run(int R, int C, int row0, int col0, const unsigned short* dsrc) {
    constexpr int KPT = BN / 4;
    CUtensorMap map;
    cuuint64_t dims[5] = {(cuuint64_t)C, 2, 4, KPT / 2, (cuuint64_t)R};
    cuuint64_t rowb = (cuuint64_t)C * 2;
    cuuint64_t strides[4] = {rowb, KPT * rowb, 2 * rowb, rowb};
    cuuint32_t box[5] = {64, 2, 4, KPT / 2, 1};
    cuuint32_t es[5] = {1, 1, 1, 1, 1};
    CUresult r = cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5, (void*)dsrc, dims, strides, box, es,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { const char* m; cuGetErrorString(r, &m); printf("BN %d R %d C %d: encode -> %d %s\n", BN, R, C, (int)r, m); return 1; }
    unsigned short* dout; cudaMalloc(&dout, BN * 64 * 2);
    cudaFuncSetAttribute(probe<BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    probe<BN><<<1, 128, BN * 128 + 1024>>>(map, row0, col0, dout);
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) { printf("BN %d: kernel -> %s\n", BN, cudaGetErrorString(e)); return 1; }
    std::vector<unsigned short> out(BN * 64);
    cudaMemcpy(out.data(), dout, BN * 64 * 2, cudaMemcpyDeviceToHost);
    int bad = 0;
    for (int key = 0; key < BN; ++key) {
        int a = key / KPT, rr = key % KPT, pos = 8 * (rr >> 1) + 2 * a + (rr & 1);
        for (int c = 0; c < 64; ++c) {
            int chunk = c / 8;
            int byte = pos * 128 + (((chunk & 7) ^ (pos & 7)) << 4) + (c % 8) * 2;
            unsigned short got = out[byte / 2];
            unsigned short want = (unsigned short)(((row0 + key) * 131 + col0 + c) & 0xFFFF);
            if (got != want && bad++ < 5) printf("  key %d col %d: got %u want %u\n", key, c, got, want);
        }
    }
    printf("BN %d R %d C %d row0 %d col0 %d: %s (%d bad)\n", BN, R, C, row0, col0, bad ? "WRONG" : "ok", bad);
    cudaFree(dout);
    return bad != 0;
}

int main() {
    cuInit(0);
    int R = 1000, C = 256;
    std::vector<unsigned short> h((size_t)R * C);
    for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) h[(size_t)r * C + c] = (unsigned short)((r * 131 + c) & 0xFFFF);
    unsigned short* d; cudaMalloc(&d, h.size() * 2); cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice);
    int fails = 0;
    fails += run<64>(R, C, 0, 0, d);
    fails += run<64>(R, C, 37, 64, d);
    fails += run<64>(R, C, R - 64, 192, d);
    fails += run<32>(R, C, 5, 128, d);
    fails += run<32>(R, 64, R - 32, 0, d);
    printf("%s\n", fails ? "PROBE FAILED" : "PROBE OK");
    return 0;
}
