// cpu_shim.h -- lets hpcopt's CUDA kernel sources compile as C++ for the CPU.
//
// hpcopt/kernels.py compiles kernels/*.cu with `-include cpu_shim.h -fopenmp`.
// The CUDA qualifiers become no-ops, the built-in index variables exist (a grid of one
// thread), and the loop macros used by every kernel become OpenMP loops with a static
// schedule: each core gets ONE contiguous chunk. Copying the GPU launch shape (a small
// grid with a large stride) onto CPU threads would make neighbouring threads write
// interleaved elements of the same cache lines, which is very slow.
#ifndef HPCOPT_CPU_SHIM_H
#define HPCOPT_CPU_SHIM_H
#define HPCOPT_CPU_SHIM 1

#include <math.h>
#include <stdint.h>
#include <omp.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// __restrict__ is understood by GCC and Clang in C++ as it is by nvcc.

struct hpcopt_dim3 { unsigned int x, y, z; };
static const hpcopt_dim3 threadIdx = {0u, 0u, 0u};
static const hpcopt_dim3 blockIdx = {0u, 0u, 0u};
static const hpcopt_dim3 blockDim = {1u, 1u, 1u};
static const hpcopt_dim3 gridDim = {1u, 1u, 1u};

// Element loop: one contiguous chunk per thread, vectorised inside the chunk.
// Below HPCOPT_PARALLEL_MIN elements a kernel runs on the calling thread: waking sleeping
// OpenMP threads costs tens of microseconds, more than the work. The `if` names `parallel`:
// a bare `if` on a combined `parallel for simd` applies to the simd part as well, and
// small kernels would then run as scalar loops.
#define HPCOPT_PARALLEL_MIN 32768
#define HPCOPT_PRAGMA(text) _Pragma(#text)
#define HPCOPT_LOOP(i, n) \
    HPCOPT_PRAGMA(omp parallel for simd schedule(static) if(parallel: (long long)(n) >= HPCOPT_PARALLEL_MIN)) \
    for (long long i = 0; i < (long long)(n); ++i)

// Row loop of kernels that walk a row's own inner loops (keyed_gather, linear_loss_grad):
// an OpenMP loop WITHOUT `simd` (the inner loops would otherwise be vectorised across
// rows into gathers and scatters, several times slower), in parallel once `work`
// elements reach HPCOPT_PARALLEL_MIN.
#define HPCOPT_ROW_LOOP(i, n, work) \
    HPCOPT_PRAGMA(omp parallel for schedule(static) if((long long)(work) >= HPCOPT_PARALLEL_MIN)) \
    for (long long i = 0; i < (long long)(n); ++i)

// A read hint for memory the kernel will touch soon (a no-op in the GPU build).
#define HPCOPT_PREFETCH(p) __builtin_prefetch(p)

// Row x column-tile loop: threads share out (row, tile) pieces in contiguous runs; a
// tile is up to HPCOPT_TILE columns, processed by plain (vectorised) inner loops.
#define HPCOPT_TILE 1024
#define HPCOPT_TILES(r, c0, n, R, C) \
    HPCOPT_PRAGMA(omp parallel for collapse(2) schedule(static) \
                  if((long long)(R) * (long long)(C) >= HPCOPT_PARALLEL_MIN)) \
    for (long long r = 0; r < (long long)(R); ++r) \
    for (long long c0 = 0; c0 < (long long)(C); c0 += HPCOPT_TILE) \
    for (long long n = ((long long)(C) - c0 < HPCOPT_TILE ? (long long)(C) - c0 : HPCOPT_TILE), _once = 1; \
         _once; _once = 0)

// Tile accumulator: on the CPU the tile of the output itself (it stays in L1 while the
// neighbour rows stream through), so no separate store pass is needed.
#define HPCOPT_ACCUMULATOR(acc, dst) float* __restrict__ acc = (dst)
#define HPCOPT_ACCUMULATOR_STORE(dst, acc, n)

extern "C" void hpcopt_set_threads(int n) { if (n > 0) omp_set_num_threads(n); }
extern "C" int hpcopt_get_threads(void) { return omp_get_max_threads(); }

#endif
