// fused_update.cu -- one pass over memory per optimizer step.
//
// Every kernel works on flat float32 arrays (all of a rank's nodes' rows back to back),
// reads each operand once and writes each result once. Scalars arrive with explicit
// dtypes (float32 / int64) and are precomputed on the host (for example 1 - beta and the
// bias-correction reciprocals), so the CPU build and hpcopt.kernels' NumPy references
// perform the same float32 operations in the same order.
//
// Common form: gg = g + wd * x (coupled weight decay), then the method's step.
// Scaling follows the clipped diagonal of Chezhegov et al. 2024: D_hat = max(alpha, D),
// with the usual Adam epsilon added after clipping (alpha = 0, eps = 1e-8 is plain Adam).
#ifndef HPCOPT_CPU_SHIM
#define HPCOPT_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)
#endif

// max(alpha, s) with NumPy's NaN rule (a NaN s propagates); unlike fmaxf it vectorises.
__device__ __forceinline__ float clip_below(float alpha, float s) { return alpha >= s ? alpha : s; }

// x -= lr * (g + wd x)
extern "C" __global__ void sgd_update(float* __restrict__ x, const float* __restrict__ g,
                                      float lr, float wd, long long n) {
    HPCOPT_LOOP(i, n) {
        float gg = g[i] + wd * x[i];
        x[i] = x[i] - lr * gg;
    }
}

// heavy ball: m = mu m + gg; x -= lr m.  Nesterov: x -= lr (gg + mu m).
extern "C" __global__ void momentum_update(float* __restrict__ x, const float* __restrict__ g,
                                           float* __restrict__ m, float lr, float mu, float wd,
                                           long long nesterov, long long n) {
    HPCOPT_LOOP(i, n) {
        float gg = g[i] + wd * x[i];
        float mi = mu * m[i] + gg;
        m[i] = mi;
        float step = nesterov ? gg + mu * mi : mi;
        x[i] = x[i] - lr * step;
    }
}

// v = beta v + (1 - beta) gg^2; x -= lr gg / (max(alpha, sqrt(v)) + eps)
extern "C" __global__ void rmsprop_update(float* __restrict__ x, const float* __restrict__ g,
                                          float* __restrict__ v, float lr, float beta,
                                          float one_minus_beta, float alpha, float eps, float wd,
                                          long long n) {
    HPCOPT_LOOP(i, n) {
        float gg = g[i] + wd * x[i];
        float vi = beta * v[i] + one_minus_beta * (gg * gg);
        v[i] = vi;
        float denom = clip_below(alpha, sqrtf(vi)) + eps;
        x[i] = x[i] - (lr * gg) / denom;
    }
}

// m = b1 m + (1-b1) gg; v = b2 v + (1-b2) gg^2;
// x -= lr (m / bc1) / (max(alpha, sqrt(v / bc2)) + eps), bias corrections as reciprocals.
extern "C" __global__ void adam_update(float* __restrict__ x, const float* __restrict__ g,
                                       float* __restrict__ m, float* __restrict__ v, float lr,
                                       float b1, float one_minus_b1, float b2, float one_minus_b2,
                                       float inv_bc1, float inv_bc2, float alpha, float eps,
                                       float wd, long long n) {
    HPCOPT_LOOP(i, n) {
        float gg = g[i] + wd * x[i];
        float mi = b1 * m[i] + one_minus_b1 * gg;
        float vi = b2 * v[i] + one_minus_b2 * (gg * gg);
        m[i] = mi;
        v[i] = vi;
        float denom = clip_below(alpha, sqrtf(vi * inv_bc2)) + eps;
        x[i] = x[i] - (lr * (mi * inv_bc1)) / denom;
    }
}

// Apply a given diagonal (OASIS, or any scaling frozen for a round):
// x -= lr gg / max(alpha, |d|)
extern "C" __global__ void scaled_update(float* __restrict__ x, const float* __restrict__ g,
                                         const float* __restrict__ d, float lr, float alpha,
                                         float wd, long long n) {
    HPCOPT_LOOP(i, n) {
        float gg = g[i] + wd * x[i];
        x[i] = x[i] - (lr * gg) / clip_below(alpha, fabsf(d[i]));
    }
}
