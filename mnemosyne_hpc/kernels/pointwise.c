/* The element-wise steps of a decoder layer on bf16 rows, one pass over memory each where torch
 * takes two to five: RMSNorm (with the residual add before it), SiLU(gate)·up and the rotary embedding.
 *
 * Each rounds to bf16 exactly where the unfused torch ops (and Hugging Face's Llama) do, with the
 * math between roundings in fp32; only the order of the fp32 sum of squares and SiLU's exp may differ.
 * Plain C that the compiler vectorises for the CPU it is built on; rows are split over OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define PARALLEL_ELEMENTS (1 << 16) /* fewer (a decode step's rows) run on the calling thread alone */

/* out[r] = weight · bf16(x[r] / rms(x[r])), after x[r] = bf16(x[r] + residual[r]) in place when residual
 * is given. Rows are `stride` elements apart in x and residual, contiguous in out. */
void rms_norm(uint16_t *x, const uint16_t *residual, int64_t rows, int64_t stride, int64_t dim,
              const uint16_t *weight, float eps, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows * dim >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *row = x + r * stride, *normed = out + r * dim;
        if (residual != NULL) {
            const uint16_t *add = residual + r * stride;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) row[i] = float_to_bf16(bf16_to_float(row[i]) + bf16_to_float(add[i]));
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < dim; i++) squares += bf16_to_float(row[i]) * bf16_to_float(row[i]);
        float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++)
            normed[i] = float_to_bf16(bf16_to_float(weight[i]) * round_to_bf16(bf16_to_float(row[i]) * inverse));
    }
}

/* out[r] = bf16(bf16(silu(gate)) · up) for gate_up[r] = [gate | up], each `width` wide. */
void silu_mul(const uint16_t *gate_up, int64_t rows, int64_t width, uint16_t *out) {
#pragma omp parallel for schedule(static) if (rows * width >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + 2 * r * width, *up = gate + width;
        uint16_t *product = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) {
            float g = bf16_to_float(gate[i]);
            product[i] = float_to_bf16(round_to_bf16(g / (1.0f + expf(-g))) * bf16_to_float(up[i]));
        }
    }
}

/* Rotary embedding in place, as Hugging Face Llama rotates (half split): each head x of `dim` becomes
 * bf16(bf16(x·cos) + roll(x, dim/2)·signed_sin). Row r holds `heads` heads of `dim` from x + r·stride;
 * cos and signed_sin are [rows][dim]. */
void rope(uint16_t *x, int64_t rows, int64_t stride, int64_t heads, int64_t dim, const uint16_t *cos,
          const uint16_t *signed_sin) {
    int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * dim >= PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * dim, *s = signed_sin + r * dim, *c2 = c + half, *s2 = s + half;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *first = x + r * stride + h * dim, *second = first + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = bf16_to_float(first[i]), b = bf16_to_float(second[i]);
                first[i] = float_to_bf16(round_to_bf16(a * bf16_to_float(c[i])) + b * bf16_to_float(s[i]));
                second[i] = float_to_bf16(round_to_bf16(b * bf16_to_float(c2[i])) + a * bf16_to_float(s2[i]));
            }
        }
    }
}
