// mix_rows.cu -- the weighted neighbour sum of decentralized averaging.
//
//   out[r, :] = sum_k w[k] * src(idx[k])[:]   for k in indptr[r] .. indptr[r+1]-1
//
// in CSR form over rows. A source row j < n_local is row j of `local` (this rank's own
// nodes); j >= n_local is row j - n_local of `remote` (rows received from peer ranks), so
// received rows never have to be copied next to the local ones. Terms are added in CSR
// order, starting from 0, in float32.
//
// The work is cut into (row, column tile) pieces: on the GPU a tile is one element per
// thread and the accumulator a register; on the CPU (cpu_shim.h) a tile is a run of
// columns accumulated in place in the output, which stays in L1 while each neighbour
// row streams through once.
#ifndef HPCOPT_CPU_SHIM
#define HPCOPT_TILE 1
#define HPCOPT_TILES(r, c0, n, R, C) \
    for (long long _i = (long long)blockIdx.x * blockDim.x + threadIdx.x; \
         _i < (long long)(R) * (long long)(C); _i += (long long)blockDim.x * gridDim.x) \
    for (long long r = _i / (long long)(C), c0 = _i % (long long)(C), n = 1, _once = 1; _once; _once = 0)
#define HPCOPT_ACCUMULATOR(acc, dst) float acc[1]
#define HPCOPT_ACCUMULATOR_STORE(dst, acc, n) (dst)[0] = (acc)[0]
#endif

extern "C" __global__ void mix_rows(float* __restrict__ out, const float* __restrict__ local,
                                    const float* __restrict__ remote, long long n_local,
                                    const long long* __restrict__ indptr,
                                    const long long* __restrict__ indices,
                                    const float* __restrict__ weights, long long rows,
                                    long long d) {
    HPCOPT_TILES(r, c0, n, rows, d) {
        float* __restrict__ dst = out + r * d + c0;
        HPCOPT_ACCUMULATOR(acc, dst);
        for (long long t = 0; t < n; ++t) acc[t] = 0.0f;
        for (long long k = indptr[r]; k < indptr[r + 1]; ++k) {
            const long long j = indices[k];
            const float w = weights[k];
            const float* __restrict__ src = ((j < n_local) ? local + j * d : remote + (j - n_local) * d) + c0;
            for (long long t = 0; t < n; ++t) acc[t] = acc[t] + w * src[t];
        }
        HPCOPT_ACCUMULATOR_STORE(dst, acc, n);
    }
}
