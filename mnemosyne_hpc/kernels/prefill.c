/* Flash attention of long queries (prefill chunks) on CPU with AMX tiles.
 *
 * Torch's CPU flash kernel ran at 29% of the bf16 GEMM peak at head size 64 in bench/roofline.py.
 * Here K and V are packed once per call into the tile layout every query block reads, the scores and the
 * weighted values are AMX bf16 products with fp32 sums, and the softmax is an online one over blocks
 * of BK keys with a degree-5 exp2 (relative error 2.4e-7, far below the bf16 rounding of the
 * weights that follows). Scores, weights and outputs are the flash kernel's: fp32 scores, bf16
 * weights into an fp32 sum of values. The tiles compute the next block's scores between the rows
 * of a block's softmax, so the tile unit and the vector units work at once.
 *
 * q: element (h, i, x) at h·q_head_stride + i·q_row_stride + x, for hq heads and lq rows; k, v the
 * same with hkv heads and lk rows; query head h reads KV head h / (hq / hkv). With `causal`, row i
 * sees keys j <= i + lk − lq. out: [hq][lq][d] bf16; lse: [hq][lq] fp32 (natural log).
 * Requires d a multiple of 32 up to 256, and every row to see at least one key.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "lanes.h"

#define BQ 32      /* query rows per task: two tiles */
#define BK 128     /* keys per softmax block */
#define MAX_D 256

static inline __m512 exp2_ps(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n), p = _mm512_set1_ps(0.0013276358f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0096755028f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555071309f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402212024f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469440f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192f));
    return _mm512_scalef_ps(p, n);
}

/* 32 keys as the right operand of q·kᵀ: per 16 keys and 32 dims, a tile whose row r holds dims 2r
 * and 2r+1 of each key (a 32-bit transpose). Keys from lk on are zero. */
static void pack_keys(const uint16_t *k, int64_t row_stride, int64_t lk, int d, uint32_t *packed) {
    int pieces = d / 32;
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < pieces; t++) {
            uint32_t *tile = packed + (b * pieces + t) * TILE * 16;
            for (int n = 0; n < 16; n++) {
                int64_t key = b * 16 + n;
                const uint32_t *pairs = (const uint32_t *)(k + key * row_stride) + 16 * t;
                for (int r = 0; r < TILE; r++) tile[r * 16 + n] = key < lk ? pairs[r] : 0;
            }
        }
}

/* 32 values as the right operand of p·v: per 16 dims, a tile whose row r interleaves keys 2r and
 * 2r+1 dim by dim. Keys from lk on are zero. */
static void pack_values(const uint16_t *v, int64_t row_stride, int64_t lk, int d, uint16_t *packed) {
    for (int e = 0; e < d / 16; e++) {
        uint16_t *tile = packed + e * TILE * 32;
        for (int r = 0; r < TILE; r++)
            for (int s = 0; s < 2; s++) {
                int key = 2 * r + s;
                for (int n = 0; n < 16; n++) tile[r * 32 + 2 * n + s] = key < lk ? v[key * row_stride + 16 * e + n] : 0;
            }
    }
}

/* The scores of one block of keys, as a sequence of steps the softmax of the previous block runs
 * between its rows, so the tile unit works while the vector units do: step (u, t) adds dims
 * [32t, 32t + 32) of keys [first + 32u, first + 32u + 32) to scores[BQ][BK] (fp32, unscaled). */
typedef struct {
    const uint16_t *q_block;
    const uint32_t *packed_k;
    float *scores;
    int64_t first;
    int d, step, steps;
} score_job;

static score_job score_block(const uint16_t *q_block, int d, const uint32_t *packed_k, int64_t first, int keys,
                             float *scores) {
    return (score_job){q_block, packed_k, scores, first, d, 0, keys / 32 * (d / 32)};
}

static inline void score_step(score_job *job) {
    if (job->step == job->steps) return;
    int d = job->d, pieces = d / 32, u = job->step / pieces * 32, t = job->step % pieces;
    const uint32_t *left = job->packed_k + (job->first + u) / 16 * pieces * TILE * 16;
    const uint32_t *right = left + pieces * TILE * 16;
    if (t == 0) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    }
    _tile_loadd(4, job->q_block + 32 * t, 2 * d);
    _tile_loadd(5, job->q_block + TILE * d + 32 * t, 2 * d);
    _tile_loadd(6, left + t * TILE * 16, 64);
    _tile_loadd(7, right + t * TILE * 16, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    if (t == pieces - 1) {
        _tile_stored(0, job->scores + u, 4 * BK);
        _tile_stored(1, job->scores + u + 16, 4 * BK);
        _tile_stored(2, job->scores + TILE * BK + u, 4 * BK);
        _tile_stored(3, job->scores + TILE * BK + u + 16, 4 * BK);
    }
    job->step++;
}

static inline void finish(score_job *job) {
    while (job->step < job->steps) score_step(job);
}

/* acc[BQ][d] (fp32) += weights[BQ][BK] (bf16) · values [first, first + keys), keys a multiple of 32. */
static void block_values(const uint16_t *weights, int d, const uint16_t *packed_v, int64_t first, int keys, float *acc) {
    int pieces = d / 16;
    for (int e = 0; e < pieces; e += 2) {
        _tile_loadd(0, acc + 16 * e, 4 * d);
        _tile_loadd(1, acc + 16 * e + 16, 4 * d);
        _tile_loadd(2, acc + TILE * d + 16 * e, 4 * d);
        _tile_loadd(3, acc + TILE * d + 16 * e + 16, 4 * d);
        for (int u = 0; u < keys; u += 32) {
            const uint16_t *tiles = packed_v + ((first + u) / 32 * pieces + e) * TILE * 32;
            _tile_loadd(4, weights + u, 2 * BK);
            _tile_loadd(5, weights + TILE * BK + u, 2 * BK);
            _tile_loadd(6, tiles, 64);
            _tile_loadd(7, tiles + TILE * 32, 64);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, acc + 16 * e, 4 * d);
        _tile_stored(1, acc + 16 * e + 16, 4 * d);
        _tile_stored(2, acc + TILE * d + 16 * e, 4 * d);
        _tile_stored(3, acc + TILE * d + 16 * e + 16, 4 * d);
    }
}

/* The first `count` of 16 lanes; all of them in a block no row's mask cuts (`masked` 0). */
static inline __mmask16 first_lanes(int masked, int64_t count) {
    return !masked || count >= 16 ? 0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}

/* Online softmax of 16 rows over one block of `keys` scores: rows see their first visible[i] keys.
 * Updates the running maxima and sums, writes the bf16 weights and each row's rescale factor for
 * its earlier sums of values. Rows are reduced 16 at a time so no row waits on its own reduction.
 * Between rows it issues steps of the next block's scores. */
static inline void softmax_rows(const float *scores, int keys, const int64_t *visible, int masked, float log2e_scale,
                                float *maxima, float *sums, uint16_t *weights, float *rescale, score_job *next) {
    __m512 lanes[16];
    for (int i = 0; i < 16; i++) {
        const float *s = scores + i * BK;
        __m512 m0 = _mm512_set1_ps(-FLT_MAX), m1 = m0;
        for (int j = 0; j < keys; j += 32) {
            m0 = _mm512_mask_max_ps(m0, first_lanes(masked, visible[i] - j), m0, _mm512_loadu_ps(s + j));
            m1 = _mm512_mask_max_ps(m1, first_lanes(masked, visible[i] - j - 16), m1, _mm512_loadu_ps(s + j + 16));
        }
        lanes[i] = _mm512_max_ps(m0, m1);
    }
    __m512 old_max = _mm512_loadu_ps(maxima), new_max = _mm512_max_ps(old_max, max_lanes_16(lanes));
    __m512 factor = _mm512_set1_ps(log2e_scale);
    __mmask16 moved = _mm512_cmp_ps_mask(old_max, new_max, _CMP_NEQ_UQ);
    _mm512_storeu_ps(rescale, _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), moved,
                                                 exp2_ps(_mm512_mul_ps(_mm512_sub_ps(old_max, new_max), factor))));
    _mm512_storeu_ps(maxima, new_max);
    _Alignas(64) float shifts[16];
    _mm512_store_ps(shifts, _mm512_mul_ps(new_max, factor));
    for (int i = 0; i < 16; i++) {
        const float *s = scores + i * BK;
        score_step(next);
        __m512 shift = _mm512_set1_ps(shifts[i]), sum0 = _mm512_setzero_ps(), sum1 = sum0;
        for (int j = 0; j < keys; j += 32) {
            __m512 p0 = _mm512_maskz_mov_ps(first_lanes(masked, visible[i] - j),
                                            exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), factor, shift)));
            __m512 p1 = _mm512_maskz_mov_ps(first_lanes(masked, visible[i] - j - 16),
                                            exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), factor, shift)));
            sum0 = _mm512_add_ps(sum0, p0);
            sum1 = _mm512_add_ps(sum1, p1);
            _mm512_storeu_si512(weights + i * BK + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        lanes[i] = _mm512_add_ps(sum0, sum1);
    }
    __m512 old_sums = _mm512_mul_ps(_mm512_loadu_ps(sums), _mm512_loadu_ps(rescale));
    _mm512_storeu_ps(sums, _mm512_add_ps(old_sums, sum_lanes_16(lanes)));
}

/* Keys of the block from `first` up to the last any row sees, rounded up to 32 (at most BK; 0 past it). */
static inline int block_keys(int64_t last, int64_t first) {
    int64_t keys = (last + 1 - first + 31) / 32 * 32;
    return keys < 0 ? 0 : keys > BK ? BK : (int)keys;
}

/* Rows [first_row, first_row + BQ) of one query head (rows from lq on are padding) over its KV head. */
static void attend_block(const uint16_t *q, int64_t q_row_stride, int64_t first_row, int64_t lq, int d,
                         const uint32_t *packed_k, const uint16_t *packed_v, int64_t lk, int causal, float scale,
                         uint16_t *out, float *lse) {
    _Alignas(64) uint16_t q_block[BQ * MAX_D];
    _Alignas(64) float scores[2][BQ * BK]; /* this block's, and the next one's as they are computed */
    _Alignas(64) uint16_t weights[BQ * BK];
    _Alignas(64) float acc[BQ * MAX_D];
    float maxima[BQ], sums[BQ], rescale[BQ];
    int64_t last_key[BQ], visible[BQ], block_last = 0;
    const float log2e_scale = scale * 1.4426950408889634f;
    for (int i = 0; i < BQ; i++) {
        int64_t row = first_row + i;
        if (row < lq) memcpy(q_block + i * d, q + row * q_row_stride, 2 * (size_t)d);
        else memset(q_block + i * d, 0, 2 * (size_t)d);
        last_key[i] = causal && row < lq ? row + lk - lq : lk - 1;
        if (last_key[i] > block_last) block_last = last_key[i];
        maxima[i] = -FLT_MAX; /* finite, so the first rescale is exp2 of a finite number: 0 */
        sums[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * BQ * d);
    score_job next = score_block(q_block, d, packed_k, 0, block_keys(block_last, 0), scores[0]);
    finish(&next); /* the first block's scores; each later block's come during the softmax before it */
    for (int64_t first = 0; first <= block_last; first += BK) {
        int keys = block_keys(block_last, first);
        float *current = next.scores;
        next = score_block(q_block, d, packed_k, first + BK, block_keys(block_last, first + BK),
                           scores[(first / BK + 1) % 2]);
        for (int i = 0; i < BQ; i++) visible[i] = last_key[i] + 1 - first;
        for (int i = 0; i < BQ; i += 16) {
            int masked = 0;
            for (int r = i; r < i + 16; r++) masked |= visible[r] < keys;
            if (masked) /* the block crosses the diagonal or the end of the keys */
                softmax_rows(current + i * BK, keys, visible + i, 1, log2e_scale, maxima + i, sums + i,
                             weights + i * BK, rescale + i, &next);
            else
                softmax_rows(current + i * BK, keys, visible + i, 0, log2e_scale, maxima + i, sums + i,
                             weights + i * BK, rescale + i, &next);
        }
        finish(&next); /* before the values take the tiles */
        for (int i = 0; i < BQ; i++)
            if (rescale[i] != 1.0f)
                for (int x = 0; x < d; x += 16)
                    _mm512_storeu_ps(acc + i * d + x,
                                     _mm512_mul_ps(_mm512_loadu_ps(acc + i * d + x), _mm512_set1_ps(rescale[i])));
        block_values(weights, d, packed_v, first, keys, acc);
    }
    for (int i = 0; i < BQ && first_row + i < lq; i++) {
        __m512 inverse = _mm512_set1_ps(1.0f / sums[i]);
        for (int x = 0; x < d; x += 16)
            _mm256_storeu_si256((__m256i *)(out + (first_row + i) * d + x),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + i * d + x), inverse)));
        lse[first_row + i] = maxima[i] * scale + logf(sums[i]);
    }
}

void prefill_attention(const uint16_t *q, int hq, int64_t lq, int64_t q_head_stride, int64_t q_row_stride,
                       const uint16_t *k, int64_t k_head_stride, int64_t k_row_stride, const uint16_t *v,
                       int64_t v_head_stride, int64_t v_row_stride, int hkv, int64_t lk, int d, int causal,
                       float scale, uint16_t *out, float *lse) {
    int64_t key_blocks = (lk + 31) / 32, padded = key_blocks * 32;
    uint32_t *packed_k = malloc((size_t)hkv * padded * d * 2);
    uint16_t *packed_v = malloc((size_t)hkv * padded * d * 2);
    int64_t q_blocks = (lq + BQ - 1) / BQ, tasks = q_blocks * hq;
    int group = hq / hkv;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < 2 * hkv * key_blocks; task++) {
            int h = (int)(task / (2 * key_blocks));
            int64_t b = task % (2 * key_blocks) / 2;
            if (task % 2 == 0)
                pack_keys(k + h * k_head_stride + b * 32 * k_row_stride, k_row_stride, lk - b * 32, d,
                          packed_k + ((size_t)h * padded + b * 32) * d / 2);
            else
                pack_values(v + h * v_head_stride + b * 32 * v_row_stride, v_row_stride, lk - b * 32, d,
                            packed_v + ((size_t)h * padded + b * 32) * d);
        }
        configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t block = causal ? q_blocks - 1 - task / hq : task / hq; /* the longest rows first */
            int h = (int)(task % hq), kv = h / group;
            attend_block(q + h * q_head_stride, q_row_stride, block * BQ, lq, d,
                         packed_k + (size_t)kv * padded * d / 2, packed_v + (size_t)kv * padded * d, lk, causal,
                         scale, out + (size_t)h * lq * d, lse + (size_t)h * lq);
        }
        _tile_release();
    }
    free(packed_k);
    free(packed_v);
}
