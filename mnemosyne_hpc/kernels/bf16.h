/* bf16 conversions, shared by the kernels. */
#pragma once
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t widened = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

/* Round to nearest, ties to even (as torch converts), for finite values. */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* value rounded to bf16, kept as a float: where torch would store a bf16 intermediate. */
static inline float round_to_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

#ifdef __AVX512F__
#include <immintrin.h>

/* float_to_bf16 of 16 lanes (the CPU's conversion instruction would also flush subnormals). */
static inline __m256i floats_to_bf16(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}
#endif
