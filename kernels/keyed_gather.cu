// keyed_gather.cu -- the minibatch gather of NodeData: keyed random indices -> rows.
//
// For element e = r * B + j (row r of the batch, sample j):
//   k      = mix(keys[r] ^ (steps[r * step_stride] * G + 2))
//   bits   = mix(k + (j + 1) * G)                 (mix: the splitmix64 finaliser, G: golden ratio)
//   idx[e] = bits % counts[r] + starts[r]         (a row of the flat training data; the
//            remainder by a per-row reciprocal, exact)
//   A[e, :] = X[idx[e], :]
// keys[r] is data._node_keys(seed, stream, node of row r); all integer arithmetic wraps
// modulo 2^64, so the indices equal data.keyed_ints' bit for bit, and the rows are copies.
// Row loop: a grid-stride loop on the GPU; on the CPU cpu_shim.h's HPCOPT_ROW_LOOP.
#ifndef HPCOPT_CPU_SHIM
#define HPCOPT_ROW_LOOP(i, n, work) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)
#endif

__device__ __forceinline__ unsigned long long hpcopt_mix64(unsigned long long z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z;
}

// high 64 bits of a 64 x 64-bit product
#ifdef HPCOPT_CPU_SHIM
__device__ __forceinline__ unsigned long long hpcopt_mulhi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
#else
__device__ __forceinline__ unsigned long long hpcopt_mulhi(unsigned long long a, unsigned long long b) {
    return __umul64hi(a, b);
}
#endif

// a mod c with inv = floor((2^64 - 1) / c): the quotient estimate mulhi(a, inv) is never
// above floor(a / c) and at most 2 below, so two corrections make the result exact; one 64-bit
// division per row instead of one per sample (a 64-bit DIV costs up to ~90 cycles)
__device__ __forceinline__ unsigned long long hpcopt_mod(unsigned long long a, unsigned long long c,
                                                         unsigned long long inv) {
    unsigned long long m = a - hpcopt_mulhi(a, inv) * c;
    m -= c & (0ULL - (unsigned long long)(m >= c));  // two corrections without branches: a
    m -= c & (0ULL - (unsigned long long)(m >= c));  // random remainder would mispredict one
    return m;
}

extern "C" __global__ void keyed_gather(float* __restrict__ A, long long* __restrict__ idx,
                                        const float* __restrict__ X, long long f,
                                        const long long* __restrict__ keys, const long long* __restrict__ steps,
                                        long long step_stride, const long long* __restrict__ counts,
                                        const long long* __restrict__ starts, long long rows, long long B) {
    const unsigned long long G = 0x9E3779B97F4A7C15ULL;
    // one (row) per iteration: the row's key, count and start once, then its B samples
    HPCOPT_ROW_LOOP(r, rows, rows * B * f) {  // work: elements copied
        const unsigned long long s = (unsigned long long)steps[r * step_stride];
        const unsigned long long k = hpcopt_mix64((unsigned long long)keys[r] ^ (s * G + 2ULL));
        const unsigned long long c = (unsigned long long)counts[r];
        const unsigned long long inv = 0xFFFFFFFFFFFFFFFFULL / c;
        const long long start = starts[r];
        for (long long j = 0; j < B; ++j) {
            const unsigned long long bits = hpcopt_mix64(k + (unsigned long long)(j + 1) * G);
            const long long flat = (long long)hpcopt_mod(bits, c, inv) + start;
            const long long e = r * B + j;
            idx[e] = flat;
            const float* __restrict__ src = X + flat * f;
            float* __restrict__ dst = A + e * f;
            for (long long t = 0; t < f; ++t) dst[t] = src[t];
        }
    }
}
