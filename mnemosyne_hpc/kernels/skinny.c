/* y = x·Wᵀ for a few rows of x (2 to 64: a decode step of several sequences) with AMX tiles.
 *
 * W's rows are the tiles' left operand, read straight from memory 16 at a time; xᵀ, packed once
 * per call by all threads, is the right one, so W is streamed once whatever the row count. Products
 * of bf16 values are exact in fp32 and the sums are fp32, rounded once to bf16, as torch's matrix
 * products.
 * Torch's bf16 GEMM took 22-30 ms for the 33 matrices of a small model's decode step at 16-32 rows
 * (about twice the time to stream them), this 18-23 ms.
 *
 * x: rows (at most 64, four accumulator tiles) of `in` bf16 values, x_stride apart; w: [out][in]
 * bf16, in a multiple of 32; y: [rows][out].
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "bf16.h"

#define BLOCKS_AHEAD 2 /* W's rows two blocks ahead are requested into L2 as a block is read */

/* xᵀ as right operands: per group g of 16 rows of x and chunk k of 32 inputs, a tile whose row p
 * holds inputs 32k + 2p and 32k + 2p + 1 of each row (zeros past the last row); that is, a 16 × 16
 * transpose of x's pairs of inputs, gathered one tile row at a time. */
static void pack_tile(const uint16_t *x, int64_t rows, int64_t x_stride, int64_t chunks, int64_t tile,
                      uint32_t *packed) {
    int64_t g = tile / chunks, k = tile % chunks, present = rows - g * TILE;
    __mmask16 mask = present >= TILE ? 0xFFFF : (__mmask16)((1u << present) - 1);
    __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32((int)x_stride)); /* in bf16 values */
    const uint16_t *pairs = x + g * TILE * x_stride + 32 * k;
    for (int p = 0; p < TILE; p++)
        _mm512_storeu_si512(packed + (tile * TILE + p) * TILE,
                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets, pairs + 2 * p, 2));
}

#define ACCUMULATE(group, left, right, k)                                                             \
    if (groups > (group)) {                                                                           \
        _tile_loadd(right, packed + ((group) * chunks + (k)) * TILE * TILE, 64);                      \
        _tile_dpbf16ps(group, left, right);                                                           \
    }
#define STORE(group, sums)                                                                            \
    if (g == (group)) _tile_stored(group, sums, 64)

void skinny_linear(const uint16_t *x, int64_t rows, int64_t x_stride, const uint16_t *w, int64_t out,
                   int64_t in, uint16_t *y) {
    int64_t chunks = in / 32, blocks = (out + TILE - 1) / TILE, last = out - (blocks - 1) * TILE;
    int groups = (int)((rows + TILE - 1) / TILE);
    uint32_t *packed = malloc((size_t)groups * chunks * TILE * TILE * sizeof(uint32_t));
    uint16_t *tail = NULL; /* the last block of W, padded with zero rows, where `out` is not a multiple of 16 */
    if (last < TILE) {
        tail = calloc((size_t)TILE * in, sizeof(uint16_t));
        memcpy(tail, w + (blocks - 1) * TILE * in, (size_t)last * in * sizeof(uint16_t));
    }
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(TILE));
#pragma omp parallel
    {
        configure_tiles();
        float sums[TILE][TILE]; /* row i: output i of the block for each row of x */
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < groups * chunks; tile++) pack_tile(x, rows, x_stride, chunks, tile, packed);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint16_t *a = tail != NULL && b == blocks - 1 ? tail : w + b * TILE * in;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t k = 0; k < chunks; k++) {
                for (int i = 0; i < TILE; i++)
                    _mm_prefetch((const char *)(a + (BLOCKS_AHEAD * TILE + i) * in + 32 * k), _MM_HINT_T1);
                _tile_loadd(4, a + 32 * k, 2 * in);
                ACCUMULATE(0, 4, 5, k)
                ACCUMULATE(1, 4, 6, k)
                ACCUMULATE(2, 4, 5, k)
                ACCUMULATE(3, 4, 6, k)
            }
            int n = b == blocks - 1 ? (int)last : TILE;
            for (int g = 0; g < groups; g++) {
                STORE(0, sums); STORE(1, sums); STORE(2, sums); STORE(3, sums);
                for (int r = 0; r < TILE && g * TILE + r < rows; r++) /* column r: row g·16 + r of y */
                    _mm256_mask_storeu_epi16(y + (g * TILE + r) * out + b * TILE, (__mmask16)((1u << n) - 1),
                                             floats_to_bf16(_mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(r)),
                                                                         &sums[0][0], 4)));
            }
        }
        _tile_release();
    }
    free(packed);
    free(tail);
}
