// linear_loss_grad.cu -- loss and gradient of hpcopt's linear models on keyed minibatches.
//
// keyed_linear_loss_grad: for node row r, the minibatch keyed_gather.cu would draw (the
// same keys, steps, counts and starts, so the same sample rows), read where the rows lie
// in the flat training data instead of being copied into a batch first. With the row's
// parameters x = (w_0 .. w_{f-1} [, b]), sample rows a_j, targets y_j, weights w_j = 1/B:
//   z_j  = <w, a_j> (+ b)
//   quadratic (no bias):  l_j = (z_j - y_j)^2 / 2,                      dz_j = z_j - y_j
//   logistic (bias b):    e = exp(-|z_j|), l_j = max(z_j, 0) + log1p(e) - y_j z_j,
//                         dz_j = (z_j >= 0 ? 1 : e) / (1 + e) - y_j   (stable for any z)
//   loss[r] = sum_j w_j l_j + l2/2 ||x||^2
//   G[r]    = sum_j (w_j dz_j) a_j (+ the bias entry sum_j w_j dz_j) + l2 x
// exp and log1p are hpcopt's own (below: float32 additions, multiplications, one division,
// rint and a power of two, all exactly rounded), not the C library's, and the dot product
// runs in 8 interleaved partial sums combined in a fixed order, so the compiled build and
// the NumPy reference (hpcopt.kernels.ref_keyed_gather then ref_linear_loss_grad) agree
// bit for bit, and a row's result never depends on the other rows of the call (rank counts
// and row subsets never change a node's gradient). Samples are summed in order j = 0..B-1.
// Needs keyed_gather.cu's hpcopt_mix64 / hpcopt_mod (KERNEL_FILES compiles it first).
#ifndef HPCOPT_PREFETCH
#define HPCOPT_PREFETCH(p)
#endif

// 2^n for -126 <= n <= 127, built from its exponent bits
#ifdef HPCOPT_CPU_SHIM
__device__ __forceinline__ float hpcopt_pow2(int n) {
    const unsigned int bits = (unsigned int)(n + 127) << 23;
    float out;
    __builtin_memcpy(&out, &bits, sizeof out);
    return out;
}
#else
__device__ __forceinline__ float hpcopt_pow2(int n) { return __int_as_float((n + 127) << 23); }
#endif

// exp(x) for x <= 0: x = n ln2 + r (Cody-Waite: ln2 = 0.693359375 - 2.1219444e-4, the first
// part exact in 9 bits), |r| <= ln2 / 2, exp(r) by its Taylor polynomial to degree 7
// (truncation below 6e-9 relative), times 2^n; 0 below -87 (float32's normal range ends).
__device__ __forceinline__ float hpcopt_exp_nonpos(float x) {
    const float n = rintf((x < -87.0f ? -87.0f : x) * 1.442695f);
    const float r = (x - n * 0.6933594f) - n * -0.00021219444f;
    float p = 0.0001984127f;
    p = p * r + 0.0013888889f;
    p = p * r + 0.008333334f;
    p = p * r + 0.041666668f;
    p = p * r + 0.16666667f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return x < -87.0f ? 0.0f : p * hpcopt_pow2((int)n);  // p 2^n: exactly ldexp(p, n)
}

// log1p(e) for 0 <= e <= 1 as 2 atanh(s), s = e / (2 + e) <= 1/3: 2 s (1 + q/3 + ... + q^8/17),
// q = s^2 (truncation below 2e-9 relative); no cancellation, since s comes from e directly.
__device__ __forceinline__ float hpcopt_log1p_unit(float e) {
    const float s = e / (2.0f + e);
    const float q = s * s;
    float p = 0.05882353f;
    p = p * q + 0.06666667f;
    p = p * q + 0.07692308f;
    p = p * q + 0.09090909f;
    p = p * q + 0.11111111f;
    p = p * q + 0.14285715f;
    p = p * q + 0.2f;
    p = p * q + 0.33333334f;
    p = p * q + 1.0f;
    return (2.0f * s) * p;
}

// <x, a> over f entries in 8 partial sums (lane k: t = k mod 8, in order),
// combined as ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)); named accumulators, so the compiler keeps
// them in one vector register
__device__ __forceinline__ float hpcopt_dot8(const float* __restrict__ x, const float* __restrict__ a,
                                             long long f) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f, s5 = 0.0f, s6 = 0.0f, s7 = 0.0f;
    long long t = 0;
    for (; t + 8 <= f; t += 8) {
        s0 = s0 + x[t] * a[t];
        s1 = s1 + x[t + 1] * a[t + 1];
        s2 = s2 + x[t + 2] * a[t + 2];
        s3 = s3 + x[t + 3] * a[t + 3];
        s4 = s4 + x[t + 4] * a[t + 4];
        s5 = s5 + x[t + 5] * a[t + 5];
        s6 = s6 + x[t + 6] * a[t + 6];
        s7 = s7 + x[t + 7] * a[t + 7];
    }
    if (t < f) s0 = s0 + x[t] * a[t];
    if (t + 1 < f) s1 = s1 + x[t + 1] * a[t + 1];
    if (t + 2 < f) s2 = s2 + x[t + 2] * a[t + 2];
    if (t + 3 < f) s3 = s3 + x[t + 3] * a[t + 3];
    if (t + 4 < f) s4 = s4 + x[t + 4] * a[t + 4];
    if (t + 5 < f) s5 = s5 + x[t + 5] * a[t + 5];
    if (t + 6 < f) s6 = s6 + x[t + 6] * a[t + 6];
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
}

// One node's loss and gradient. Samples go in chunks of HPCOPT_CHUNK: `fill(j0, m, a, yc,
// wc)` gives the chunk's feature rows (pointers), targets and weights; then their dot
// products, their losses and derivatives in one branch-free loop over the chunk
// (vectorised across samples: the polynomials are long dependency chains, so one sample
// at a time would be latency-bound), then the sums in sample order.
#define HPCOPT_CHUNK 64

template <class Fill>
__device__ __forceinline__ float hpcopt_linear_row(const float* __restrict__ x, float* __restrict__ g, long long f,
                                                   long long B, long long logistic, float l2, const Fill& fill) {
    const long long d = f + (logistic ? 1 : 0);
    const float bias = logistic ? x[f] : 0.0f;
    for (long long t = 0; t < f; ++t) g[t] = 0.0f;
    float gb = 0.0f, total = 0.0f;
    const float* a[HPCOPT_CHUNK];
    float yc[HPCOPT_CHUNK], wc[HPCOPT_CHUNK], zc[HPCOPT_CHUNK], lc[HPCOPT_CHUNK], cc[HPCOPT_CHUNK];
    for (long long j0 = 0; j0 < B; j0 += HPCOPT_CHUNK) {
        const long long m = B - j0 < HPCOPT_CHUNK ? B - j0 : HPCOPT_CHUNK;
        fill(j0, m, a, yc, wc);
        for (long long j = 0; j < m; ++j) zc[j] = hpcopt_dot8(x, a[j], f);
        if (logistic) {
            for (long long j = 0; j < m; ++j) {
                const float z = zc[j] + bias;
                const float e = hpcopt_exp_nonpos(-fabsf(z));
                const float sp = (z > 0.0f ? z : 0.0f) + hpcopt_log1p_unit(e);
                lc[j] = wc[j] * (sp - yc[j] * z);
                cc[j] = wc[j] * ((z >= 0.0f ? 1.0f : e) / (1.0f + e) - yc[j]);
            }
        } else {
            for (long long j = 0; j < m; ++j) {
                const float res = zc[j] - yc[j];
                lc[j] = wc[j] * (0.5f * (res * res));
                cc[j] = wc[j] * res;
            }
        }
        for (long long j = 0; j < m; ++j) {
            total = total + lc[j];
            gb = gb + cc[j];
        }
        // g[u] += c_j a_j[u] for j in order: 8 columns at a time held in registers over the
        // chunk's samples (each column's sum keeps its order j = 0, 1, ...)
        long long u = 0;
        for (; u + 8 <= f; u += 8) {
            float g0 = g[u], g1 = g[u + 1], g2 = g[u + 2], g3 = g[u + 3];
            float g4 = g[u + 4], g5 = g[u + 5], g6 = g[u + 6], g7 = g[u + 7];
            for (long long j = 0; j < m; ++j) {
                const float c = cc[j];
                const float* __restrict__ aj = a[j] + u;
                g0 = g0 + c * aj[0];
                g1 = g1 + c * aj[1];
                g2 = g2 + c * aj[2];
                g3 = g3 + c * aj[3];
                g4 = g4 + c * aj[4];
                g5 = g5 + c * aj[5];
                g6 = g6 + c * aj[6];
                g7 = g7 + c * aj[7];
            }
            g[u] = g0; g[u + 1] = g1; g[u + 2] = g2; g[u + 3] = g3;
            g[u + 4] = g4; g[u + 5] = g5; g[u + 6] = g6; g[u + 7] = g7;
        }
        if (u < f) {  // the last f - u < 8 columns as one partial tile, each column's order kept
            const long long rem = f - u;
            float gt[8];
            for (long long k = 0; k < rem; ++k) gt[k] = g[u + k];
            for (long long j = 0; j < m; ++j) {
                const float c = cc[j];
                const float* __restrict__ aj = a[j] + u;
                for (long long k = 0; k < rem; ++k) gt[k] = gt[k] + c * aj[k];
            }
            for (long long k = 0; k < rem; ++k) g[u + k] = gt[k];
        }
    }
    if (logistic) g[f] = gb;
    if (l2 != 0.0f) {
        float sq = 0.0f;
        for (long long u = 0; u < d; ++u) {
            sq = sq + x[u] * x[u];
            g[u] = g[u] + l2 * x[u];
        }
        total = total + (0.5f * l2) * sq;
    }
    return total;
}

// the chunk of a keyed minibatch drawn in place (keyed_gather.cu's indices, never copied):
// rows of the node's flat training data, its targets, the uniform weight w
struct HpcoptKeyed {
    const float* X;
    const float* y;
    float w;
    long long f;
    unsigned long long k, c, inv;
    long long start;
    __device__ void operator()(long long j0, long long m, const float** a, float* yc, float* wc) const {
        const unsigned long long G = 0x9E3779B97F4A7C15ULL;
        for (long long j = 0; j < m; ++j) {
            const unsigned long long bits = hpcopt_mix64(k + (unsigned long long)(j0 + j + 1) * G);
            const long long flat = (long long)hpcopt_mod(bits, c, inv) + start;
            a[j] = X + flat * f;
            HPCOPT_PREFETCH(a[j]);  // every row of the chunk in flight at once: they are random
            HPCOPT_PREFETCH(a[j] + f - 1);  // rows of the data, often outside L1 and L2
            yc[j] = y[flat];
            wc[j] = w;
        }
    }
};

// linear_loss_grad on the minibatch keyed_gather would draw (same keys, steps, counts,
// starts; sample weights all w), reading the rows where they lie: the same bits as the
// gather followed by linear_loss_grad, without writing and re-reading the batch.
extern "C" __global__ void keyed_linear_loss_grad(float* __restrict__ loss, float* __restrict__ G,
                                                  const float* __restrict__ X, const float* __restrict__ data,
                                                  const float* __restrict__ y, const long long* __restrict__ keys,
                                                  const long long* __restrict__ steps, long long step_stride,
                                                  const long long* __restrict__ counts,
                                                  const long long* __restrict__ starts, float w, float l2,
                                                  long long rows, long long B, long long f, long long logistic) {
    const unsigned long long G0 = 0x9E3779B97F4A7C15ULL;
    const long long d = f + (logistic ? 1 : 0);
    // work in element units (HPCOPT_PARALLEL_MIN's): every sample reads f features twice, so
    // a few hundred nodes of a few dozen features already fill two threads
    HPCOPT_ROW_LOOP(r, rows, rows * B * f) {
        const unsigned long long s = (unsigned long long)steps[r * step_stride];
        const unsigned long long c = (unsigned long long)counts[r];
        const HpcoptKeyed fill = {data, y, w, f, hpcopt_mix64((unsigned long long)keys[r] ^ (s * G0 + 2ULL)), c,
                                  0xFFFFFFFFFFFFFFFFULL / c, starts[r]};
        loss[r] = hpcopt_linear_row(X + r * d, G + r * d, f, B, logistic, l2, fill);
    }
}
