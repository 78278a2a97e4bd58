/* Attention of a few query rows per KV head over many cached bf16 keys (decode steps).
 *
 * Torch's CPU flash kernel repacks every K/V block for its matrix units, which pays off for long
 * query blocks but leaves a decode step far below memory bandwidth. Here each (KV head, key split)
 * task streams its keys once for the scores and its values once for the output, and the splits are
 * merged by their log-sum-exp. Products of bf16 values are exact in fp32 and every sum is an fp32
 * sum (AVX512-BF16 dot products for the scores), so this is the flash kernel's arithmetic.
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

static inline __m512 widen(const uint16_t *bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)bf16)), 16));
}

/* out[g] += Σ_j p[g·n + j] · v_j for G rows of weights and values of 16·T dims: every value row is
 * widened once and the G×T accumulators stay in registers. */
#define ADD_VALUES(T, G)                                                                                 \
    static void add_values_##T##x##G(const float *p, int64_t n, const uint16_t *v, int64_t row_stride,   \
                                     float *out) {                                                       \
        __m512 acc[G][T];                                                                                \
        for (int g = 0; g < G; g++)                                                                      \
            for (int t = 0; t < T; t++) acc[g][t] = _mm512_loadu_ps(out + g * 16 * T + 16 * t);          \
        for (int64_t j = 0; j < n; j++) {                                                                \
            for (int t = 0; t < T; t += 2) {                                                             \
                const uint16_t *at = v + j * row_stride + 16 * t;                                        \
                _mm_prefetch((const char *)(at + PREFETCH_KEYS * row_stride), _MM_HINT_T0);              \
                _mm_prefetch((const char *)(at + PREFETCH_KEYS_L2 * row_stride), _MM_HINT_T1);           \
            }                                                                                            \
            __m512 row[T];                                                                               \
            for (int t = 0; t < T; t++) row[t] = widen(v + j * row_stride + 16 * t);                     \
            for (int g = 0; g < G; g++) {                                                                \
                __m512 w = _mm512_set1_ps(p[g * n + j]);                                                 \
                for (int t = 0; t < T; t++) acc[g][t] = _mm512_fmadd_ps(w, row[t], acc[g][t]);           \
            }                                                                                            \
        }                                                                                                \
        for (int g = 0; g < G; g++)                                                                      \
            for (int t = 0; t < T; t++) _mm512_storeu_ps(out + g * 16 * T + 16 * t, acc[g][t]);          \
    }
ADD_VALUES(4, 4)
ADD_VALUES(4, 1)
ADD_VALUES(8, 2)
ADD_VALUES(8, 1)

/* y[r·y_stride + j] = scale · Σ_x a[r·d + x] · b[j·row_stride + x] for r < rows, j < n, in fp32 from
 * bf16 (a matrix product with fp32 results): every row of b is read from memory once. */
static void dot_rows(const uint16_t *a, int rows, int d, const uint16_t *b, int64_t row_stride, int64_t n, float scale,
                     float *y, int64_t y_stride) {
    int pieces = d / 32;
    int64_t full = n - n % KEYS;
    for (int64_t j0 = 0; j0 < full; j0 += KEYS) {
        for (int j = 0; j < KEYS; j++)
            for (int64_t byte = 0; byte < 2 * d; byte += 64) {
                _mm_prefetch((const char *)(b + (j0 + PREFETCH_KEYS + j) * row_stride) + byte, _MM_HINT_T0);
                _mm_prefetch((const char *)(b + (j0 + PREFETCH_KEYS_L2 + j) * row_stride) + byte, _MM_HINT_T1);
            }
        for (int r = 0; r < rows; r++) {
            __m512 acc[KEYS];
            for (int j = 0; j < KEYS; j++) acc[j] = _mm512_setzero_ps();
            for (int t = 0; t < pieces; t++) {
                __m512bh at = (__m512bh)_mm512_loadu_si512(a + r * d + 32 * t);
                for (int j = 0; j < KEYS; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(b + (j0 + j) * row_stride + 32 * t), at);
            }
            _mm512_storeu_ps(y + r * y_stride + j0, _mm512_mul_ps(sum_lanes_16(acc), _mm512_set1_ps(scale)));
        }
    }
    for (int64_t j = full; j < n; j++)
        for (int r = 0; r < rows; r++) y[r * y_stride + j] = dot_scalar(a + r * d, b + j * row_stride, d) * scale;
}

/* One KV head over keys [0, n) from `k`, `v`: normalised partial outputs and their log-sum-exp. */
static void attend_split(const uint16_t *q, int rows, int d, const uint16_t *k, const uint16_t *v,
                         int64_t row_stride, int64_t n, float scale, float *out, float *lse) {
    float *scores = malloc((size_t)rows * n * sizeof(float));
    float maxima[MAX_ROWS], sums[MAX_ROWS];
    dot_rows(q, rows, d, k, row_stride, n, scale, scores, n);
    for (int r = 0; r < rows; r++) {
        maxima[r] = -FLT_MAX;
        for (int64_t j = 0; j < n; j++) maxima[r] = scores[r * n + j] > maxima[r] ? scores[r * n + j] : maxima[r];
    }
    for (int r = 0; r < rows; r++) {
        float *p = scores + r * n, m = maxima[r], sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) {
            p[j] = expf(p[j] - m);
            sum += p[j];
        }
        sums[r] = sum;
    }
    memset(out, 0, (size_t)rows * d * sizeof(float));
    int group = d == 64 ? 4 : 2, r = 0;
    for (; r + group <= rows; r += group) {
        if (d == 64) add_values_4x4(scores + r * n, n, v, row_stride, out + r * d);
        else add_values_8x2(scores + r * n, n, v, row_stride, out + r * d);
    }
    for (; r < rows; r++) {
        if (d == 64) add_values_4x1(scores + r * n, n, v, row_stride, out + r * d);
        else add_values_8x1(scores + r * n, n, v, row_stride, out + r * d);
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
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t s = task / hkv; /* a split's heads are neighbouring tasks */
        int h = (int)(task % hkv), i = splits[s].seq;
        int64_t offset = h * head_stride + splits[s].slot * row_stride;
        int64_t slot = (first_split[i] * hkv + (int64_t)h * (first_split[i + 1] - first_split[i]) + s - first_split[i]);
        attend_split(q + batch_rows[i] * q_stride + (int64_t)h * rows * d, rows, d, k + offset, v + offset, row_stride,
                     splits[s].n, scale, partial_out + (size_t)slot * rows * d, partial_lse + (size_t)slot * rows);
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
