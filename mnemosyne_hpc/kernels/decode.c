/* Attention of a few query rows per KV head over many cached bf16 keys (decode steps).
 *
 * Torch's CPU flash kernel repacks every K/V block for its matrix units, which pays off for long
 * query blocks but leaves a decode step far below memory bandwidth. Here each (KV head, key split)
 * task streams its keys once for the scores and its values once for the output, and the splits are
 * merged by their log-sum-exp. The scores are AMX tile products (AVX512-BF16 dot products on CPUs
 * without AMX) of keys read straight from the cache; products of bf16 values are exact in fp32 and
 * every sum is an fp32 sum, so this is the flash kernel's arithmetic, with fp32 weights.
 *
 * A sequence's queries are one row of a packed batch: [hkv][rows][d] bf16 (rows = query heads per KV
 * head × query tokens), read from a strided batch (a decode step's QKV projection) and written to
 * dense ones: out [batch rows][hkv][rows][d] bf16, lse [batch rows][hkv][rows] fp32. k, v: element
 * (h, j, x) at h·head_stride + j·row_stride + x, bf16. Requires d ∈ {64, 128} (MAX_D) and rows <= MAX_ROWS.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef WITH_AMX
#include "amx.h"
#endif
#include "bf16.h"
#include "lanes.h"

#define MAX_ROWS 16
#define MAX_D 128
#define KEYS 16          /* keys per score block: one vector of scores */
/* How far ahead keys and values are requested: into L1 just before use, and into L2 from further
 * ahead (the far requests took a decode step's attention from 12 to 14 GB/s). */
#define PREFETCH_KEYS 64
#define PREFETCH_KEYS_L2 512

static float dot_scalar(const uint16_t *a, const uint16_t *b, int d) {
    float s = 0.0f;
    for (int x = 0; x < d; x++) s += bf16_to_float(a[x]) * bf16_to_float(b[x]);
    return s;
}

/* Requests the row `PREFETCH_KEYS` rows after `row` into L1 and the one `PREFETCH_KEYS_L2` after it
 * into L2 (rows of d bf16 values, row_stride apart). */
static inline void prefetch_row(const uint16_t *row, int64_t row_stride, int d) {
    for (int byte = 0; byte < 2 * d; byte += 64) {
        _mm_prefetch((const char *)(row + PREFETCH_KEYS * row_stride) + byte, _MM_HINT_T0);
        _mm_prefetch((const char *)(row + PREFETCH_KEYS_L2 * row_stride) + byte, _MM_HINT_T1);
    }
}

static inline __m512 widen(const uint16_t *bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)bf16)), 16));
}

/* out[g] = Σ_j p[j·p_stride + g] · v_j for G rows of weights and values of 16·T dims: every value
 * row is widened once and the G×T accumulators stay in registers. */
#define WEIGH_VALUES(T, G)                                                                               \
    static void weigh_values_##T##x##G(const float *p, int p_stride, int64_t n, const uint16_t *v,       \
                                       int64_t row_stride, float *out) {                                 \
        __m512 acc[G][T];                                                                                \
        for (int g = 0; g < G; g++)                                                                      \
            for (int t = 0; t < T; t++) acc[g][t] = _mm512_setzero_ps();                                 \
        for (int64_t j = 0; j < n; j++) {                                                                \
            prefetch_row(v + j * row_stride, row_stride, 16 * T);                                        \
            __m512 row[T];                                                                               \
            for (int t = 0; t < T; t++) row[t] = widen(v + j * row_stride + 16 * t);                     \
            for (int g = 0; g < G; g++) {                                                                \
                __m512 w = _mm512_set1_ps(p[j * p_stride + g]);                                          \
                for (int t = 0; t < T; t++) acc[g][t] = _mm512_fmadd_ps(w, row[t], acc[g][t]);           \
            }                                                                                            \
        }                                                                                                \
        for (int g = 0; g < G; g++)                                                                      \
            for (int t = 0; t < T; t++) _mm512_storeu_ps(out + g * 16 * T + 16 * t, acc[g][t]);          \
    }
WEIGH_VALUES(4, 4)
WEIGH_VALUES(4, 1)
WEIGH_VALUES(8, 2)
WEIGH_VALUES(8, 1)

/* Scores are key-major: y[j·R + r] = Σ_x a[r·d + x] · b[j·row_stride + x] for query row r and key j,
 * with R = `padded_rows(rows)`, a power of two, so that lane l of every vector of scores belongs to
 * row l % R; the padding rows' scores are zero. fp32 sums of bf16 products; every key is read from
 * memory once. */
static int padded_rows(int rows) {
    int padded = 1;
    while (padded < rows) padded *= 2;
    return padded;
}

static void prefetch_keys(const uint16_t *b, int64_t row_stride, int d, int64_t j0) {
    for (int j = 0; j < KEYS; j++) prefetch_row(b + (j0 + j) * row_stride, row_stride, d);
}

static void dot_tail(const uint16_t *a, int rows, int padded, int d, const uint16_t *b, int64_t row_stride,
                     int64_t from, int64_t n, float *y) {
    for (int64_t j = from; j < n; j++)
        for (int r = 0; r < padded; r++) y[j * padded + r] = r < rows ? dot_scalar(a + r * d, b + j * row_stride, d) : 0.0f;
}

#ifdef WITH_AMX
/* With AMX: per block of 16 keys, tile 0 = keys (tiles 1, 2: 16 keys × 32 dims, straight from the
 * cache) · queries (tiles 4-7: per 32 dims, pairs of dims × R rows), stored as it is. */
static void configure_score_tiles(int padded) {
    uint16_t scores = (uint16_t)(4 * padded);
    configure_tile_rows((const uint16_t[8]){scores, 64, 64, 0, scores, scores, scores, scores});
}

static void dot_rows(const uint16_t *a, int rows, int padded, int d, const uint16_t *b, int64_t row_stride, int64_t n,
                     float *y) {
    int chunks = d / 32, stride = (int)(2 * row_stride);
    uint32_t queries[MAX_D / 32][TILE][MAX_ROWS]; /* [chunk][pair p][row]: dims 32·chunk + 2p, + 2p + 1 */
    memset(queries, 0, sizeof queries);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < chunks; c++)
            for (int p = 0; p < TILE; p++) memcpy(&queries[c][p][r], a + r * d + 32 * c + 2 * p, sizeof(uint32_t));
    _tile_loadd(4, queries[0], sizeof queries[0][0]);
    _tile_loadd(5, queries[1], sizeof queries[0][0]);
    if (chunks == 4) {
        _tile_loadd(6, queries[2], sizeof queries[0][0]);
        _tile_loadd(7, queries[3], sizeof queries[0][0]);
    }
    int64_t full = n - n % KEYS;
    for (int64_t j0 = 0; j0 < full; j0 += KEYS) {
        prefetch_keys(b, row_stride, d, j0);
        const uint16_t *keys = b + j0 * row_stride;
        _tile_zero(0);
        _tile_loadd(1, keys, stride);
        _tile_dpbf16ps(0, 1, 4);
        _tile_loadd(2, keys + 32, stride);
        _tile_dpbf16ps(0, 2, 5);
        if (chunks == 4) {
            _tile_loadd(1, keys + 64, stride);
            _tile_dpbf16ps(0, 1, 6);
            _tile_loadd(2, keys + 96, stride);
            _tile_dpbf16ps(0, 2, 7);
        }
        _tile_stored(0, y + j0 * padded, 4 * padded);
    }
    dot_tail(a, rows, padded, d, b, row_stride, full, n, y);
}
#else
/* Without AMX: AVX512-BF16 dot products, 16 keys' sums reduced together and scattered key-major. */
static void dot_rows(const uint16_t *a, int rows, int padded, int d, const uint16_t *b, int64_t row_stride, int64_t n,
                     float *y) {
    int pieces = d / 32;
    const __m512i spread = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(padded));
    int64_t full = n - n % KEYS;
    for (int64_t j0 = 0; j0 < full; j0 += KEYS) {
        prefetch_keys(b, row_stride, d, j0);
        for (int r = 0; r < padded; r++) {
            __m512 acc[KEYS];
            for (int j = 0; j < KEYS; j++) acc[j] = _mm512_setzero_ps();
            for (int t = 0; t < (r < rows ? pieces : 0); t++) { /* a padding row's sums stay zero */
                __m512bh at = (__m512bh)_mm512_loadu_si512(a + r * d + 32 * t);
                for (int j = 0; j < KEYS; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(b + (j0 + j) * row_stride + 32 * t), at);
            }
            _mm512_i32scatter_ps(y + j0 * padded + r, spread, sum_lanes_16(acc), 4);
        }
    }
    dot_tail(a, rows, padded, d, b, row_stride, full, n, y);
}
#endif

/* Key-major scores of R rows (see dot_rows) → exp(scale · score − the row's maximum), in place; the
 * maximum and the sum of row r into maxima[r], sums[r]. */
static void softmax_rows(float *scores, int64_t n, int padded, float scale, float *maxima, float *sums) {
    int64_t total = n * padded, full = total - total % 16;
    float lane_max[16], lane_sum[16] = {0}, row_max[16];
    __m512 scaling = _mm512_set1_ps(scale), top = _mm512_set1_ps(-FLT_MAX);
    for (int64_t f = 0; f < full; f += 16) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(scores + f), scaling);
        _mm512_storeu_ps(scores + f, s);
        top = _mm512_max_ps(top, s);
    }
    _mm512_storeu_ps(lane_max, top);
    for (int64_t f = full; f < total; f++) {
        scores[f] *= scale;
        lane_max[f % 16] = scores[f] > lane_max[f % 16] ? scores[f] : lane_max[f % 16];
    }
    for (int l = padded; l < 16; l++) lane_max[l % padded] = lane_max[l] > lane_max[l % padded] ? lane_max[l] : lane_max[l % padded];
    for (int l = 0; l < 16; l++) row_max[l] = lane_max[l % padded];
    for (int64_t f = 0; f < full; f += 16) {
#pragma omp simd
        for (int l = 0; l < 16; l++) {
            float p = expf(scores[f + l] - row_max[l]);
            scores[f + l] = p;
            lane_sum[l] += p;
        }
    }
    for (int64_t f = full; f < total; f++) {
        scores[f] = expf(scores[f] - row_max[f % 16]);
        lane_sum[f % 16] += scores[f];
    }
    for (int l = padded; l < 16; l++) lane_sum[l % padded] += lane_sum[l];
    for (int r = 0; r < padded; r++) {
        maxima[r] = row_max[r];
        sums[r] = lane_sum[r];
    }
}

/* One KV head over keys [0, n) from `k`, `v`: normalised partial outputs and their log-sum-exp. */
static void attend_split(const uint16_t *q, int rows, int d, const uint16_t *k, const uint16_t *v,
                         int64_t row_stride, int64_t n, float scale, float *out, float *lse) {
    int padded = padded_rows(rows);
    float *scores = malloc((size_t)padded * n * sizeof(float));
    float maxima[MAX_ROWS], sums[MAX_ROWS];
    dot_rows(q, rows, padded, d, k, row_stride, n, scores);
    softmax_rows(scores, n, padded, scale, maxima, sums);
    int group = d == 64 ? 4 : 2, r = 0;
    for (; r + group <= rows; r += group) {
        if (d == 64) weigh_values_4x4(scores + r, padded, n, v, row_stride, out + r * d);
        else weigh_values_8x2(scores + r, padded, n, v, row_stride, out + r * d);
    }
    for (; r < rows; r++) {
        if (d == 64) weigh_values_4x1(scores + r, padded, n, v, row_stride, out + r * d);
        else weigh_values_8x1(scores + r, padded, n, v, row_stride, out + r * d);
    }
    for (int r = 0; r < rows; r++) {
        float inverse = 1.0f / sums[r];
        for (int x = 0; x < d; x++) out[r * d + x] *= inverse;
        lse[r] = maxima[r] + logf(sums[r]);
    }
    free(scores);
}

/* A piece of one sequence's keys: `n` slots from `slot` on. */
typedef struct {
    int64_t slot, n;
    int seq;
} Split;

/* Sequence i, at row batch_rows[i] of the batch (q + batch_rows[i]·q_stride), attends to its keys:
 * the runs first_run[i] .. first_run[i + 1] − 1, run r being `run_lengths[r]` slots from
 * `run_starts[r]` on. Tasks are (split of at most `keys_per_split` keys of a run, KV head); each
 * sequence's splits are merged by LSE. */
void decode_attention(const uint16_t *q, int64_t q_stride, const int64_t *batch_rows, int seqs, const int64_t *first_run,
                      const int64_t *run_starts, const int64_t *run_lengths, int hkv, int rows, int d, const uint16_t *k,
                      const uint16_t *v, int64_t head_stride, int64_t row_stride, float scale, int64_t keys_per_split,
                      uint16_t *out, float *lse) {
    int64_t *first_split = malloc(((size_t)seqs + 1) * sizeof(int64_t)); /* of each sequence, per head */
    first_split[0] = 0;
    for (int i = 0; i < seqs; i++) {
        first_split[i + 1] = first_split[i];
        for (int64_t r = first_run[i]; r < first_run[i + 1]; r++)
            first_split[i + 1] += (run_lengths[r] + keys_per_split - 1) / keys_per_split;
    }
    Split *splits = malloc((size_t)first_split[seqs] * sizeof(Split));
    int64_t next = 0;
    for (int i = 0; i < seqs; i++)
        for (int64_t r = first_run[i]; r < first_run[i + 1]; r++)
            for (int64_t begin = 0; begin < run_lengths[r]; begin += keys_per_split) {
                int64_t left = run_lengths[r] - begin;
                splits[next++] = (Split){run_starts[r] + begin, left < keys_per_split ? left : keys_per_split, i};
            }
    int64_t tasks = first_split[seqs] * hkv;
    float *partial_out = malloc((size_t)tasks * rows * d * sizeof(float));
    float *partial_lse = malloc((size_t)tasks * rows * sizeof(float));
#pragma omp parallel
    {
#ifdef WITH_AMX
        configure_score_tiles(padded_rows(rows));
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t s = task / hkv; /* a split's heads are neighbouring tasks */
            int h = (int)(task % hkv), i = splits[s].seq;
            int64_t offset = h * head_stride + splits[s].slot * row_stride;
            int64_t slot = (first_split[i] * hkv + (int64_t)h * (first_split[i + 1] - first_split[i]) + s - first_split[i]);
            attend_split(q + batch_rows[i] * q_stride + (int64_t)h * rows * d, rows, d, k + offset, v + offset, row_stride,
                         splits[s].n, scale, partial_out + (size_t)slot * rows * d, partial_lse + (size_t)slot * rows);
        }
#ifdef WITH_AMX
        _tile_release();
#endif
    }
    for (int i = 0; i < seqs; i++) {
        int64_t pieces = first_split[i + 1] - first_split[i];
        for (int h = 0; h < hkv; h++) {
            int64_t base = first_split[i] * hkv + (int64_t)h * pieces;
            int64_t head = (batch_rows[i] * hkv + h) * rows; /* its first row in out and lse */
            for (int r = 0; r < rows; r++) {
                float m = -FLT_MAX, sum = 0.0f, o[MAX_D] = {0};
                for (int64_t s = 0; s < pieces; s++) {
                    float l = partial_lse[(base + s) * rows + r];
                    if (l > m) m = l;
                }
                for (int64_t s = 0; s < pieces; s++) {
                    float w = expf(partial_lse[(base + s) * rows + r] - m);
                    const float *po = partial_out + ((base + s) * rows + r) * d;
                    for (int x = 0; x < d; x++) o[x] += w * po[x];
                    sum += w;
                }
                for (int x = 0; x < d; x++) out[(head + r) * d + x] = float_to_bf16(o[x] / sum);
                lse[head + r] = m + logf(sum);
            }
        }
    }
    free(first_split);
    free(splits);
    free(partial_out);
    free(partial_lse);
}
