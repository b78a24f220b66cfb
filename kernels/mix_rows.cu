// mix_rows.cu -- the weighted neighbour sum of decentralized averaging.
//
//   out[r, :] = sum_k w[k] * src(idx[k])[:]   for k in indptr[r] .. indptr[r+1]-1
//
// in CSR form over rows. A source row j < n_local is row j of `local` (this rank's own
// nodes); j >= n_local is row j - n_local of `remote` (rows received from peer ranks), so
// received rows never have to be copied next to the local ones. Terms are added in CSR
// order, starting from 0, in float32.
#ifndef HPCOPT_CPU_SHIM
#define HPCOPT_LOOP2(r, c, R, C) \
    for (long long _i = (long long)blockIdx.x * blockDim.x + threadIdx.x, \
                   r = (C) ? _i / (long long)(C) : 0, c = (C) ? _i % (long long)(C) : 0; \
         _i < (long long)(R) * (long long)(C); \
         _i += (long long)blockDim.x * gridDim.x, r = _i / (long long)(C), c = _i % (long long)(C))
#endif

extern "C" __global__ void mix_rows(float* __restrict__ out, const float* __restrict__ local,
                                    const float* __restrict__ remote, long long n_local,
                                    const long long* __restrict__ indptr,
                                    const long long* __restrict__ indices,
                                    const float* __restrict__ weights, long long rows,
                                    long long d) {
    HPCOPT_LOOP2(r, c, rows, d) {
        float acc = 0.0f;
        for (long long k = indptr[r]; k < indptr[r + 1]; ++k) {
            long long j = indices[k];
            const float* src = (j < n_local) ? local + j * d : remote + (j - n_local) * d;
            acc = acc + weights[k] * src[c];
        }
        out[r * d + c] = acc;
    }
}
