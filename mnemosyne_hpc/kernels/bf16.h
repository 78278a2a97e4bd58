/* Scalar bf16 conversions, shared by the kernels. */
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
