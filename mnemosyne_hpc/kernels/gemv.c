/* Y = X·Wᵀ for a few bf16 rows X (a decode step's linear layers): W [out][in] is read once from memory, as
 * one contiguous stretch per thread, and each block of 16 of its rows is summed against every row of X
 * with AVX512-BF16 dot products (the block stays in L1/L2 for the rows after the first). The sums are
 * fp32 and round once to bf16, as torch's matrix products do.
 *
 * Torch's bf16 `mv` spends about 30 µs setting up each call (a millisecond of a small model's decode
 * step) and streamed the same matrices at 14-15 GB/s; on CPUs without AMX, its bf16 `mm` of 2-8 rows
 * took 2-3x a single row's time, where reading W once makes them cost little more than one.
 */
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "lanes.h"

#define BLOCK 16 /* rows of W per block: their 16 sums reduce into one vector of outputs */
/* Each row's data two blocks ahead is requested into L2 as it is read: the hardware prefetchers alone
 * left the 33 matrices of a small model's decode step at 15-16 GB/s, this at 19-21 GB/s. */
#define BLOCKS_AHEAD 2

/* The next min(n, 32) bf16 values from p, zeros past n. */
static inline __m512bh load_pairs(const uint16_t *p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(n >= 32 ? ~0u : (1u << n) - 1, p);
}

void gemv(const uint16_t *w, int64_t out_features, int64_t in_features, const uint16_t *x, int64_t x_stride,
          int64_t x_rows, uint16_t *y) {
    int64_t blocks = (out_features + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK, n = out_features - first < BLOCK ? out_features - first : BLOCK;
        const uint16_t *rows[BLOCK];
        for (int o = 0; o < BLOCK; o++) /* past the last row of W: read it again, store nothing */
            rows[o] = w + (first + (o < n ? o : n - 1)) * in_features;
        for (int64_t r = 0; r < x_rows; r++) {
            const uint16_t *xr = x + r * x_stride;
            __m512 sums[BLOCK];
            for (int o = 0; o < BLOCK; o++) sums[o] = _mm512_setzero_ps();
            for (int64_t i = 0; i < in_features; i += 32) {
                __m512bh xs = load_pairs(xr + i, in_features - i);
                for (int o = 0; o < BLOCK; o++) {
                    if (r == 0)
                        _mm_prefetch((const char *)(rows[o] + i + BLOCKS_AHEAD * BLOCK * in_features), _MM_HINT_T1);
                    sums[o] = _mm512_dpbf16_ps(sums[o], load_pairs(rows[o] + i, in_features - i), xs);
                }
            }
            _mm256_mask_storeu_epi16(y + r * out_features + first, (__mmask16)((1u << n) - 1),
                                     floats_to_bf16(sum_lanes_16(sums)));
        }
    }
}
