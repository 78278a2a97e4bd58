/* Reductions of 16 vectors at once, shared by the attention kernels. */
#pragma once
#include <immintrin.h>

/* Lane i of the result = op over the 16 lanes of v[i] (a transpose-and-reduce in four steps). */
#define REDUCE_LANES_16(name, op)                                                                        \
    static inline __m512 name(__m512 v[16]) {                                                            \
        _Pragma("GCC unroll 4") for (int width = 8; width >= 1; width /= 2)                              \
            _Pragma("GCC unroll 8") for (int i = 0; i < width; i++) {                                    \
                /* pair up halves so that lane groups keep belonging to one input after each step */     \
                __m512 a = v[i], b = v[i + width], lo, hi;                                               \
                if (width == 8) {                                                                        \
                    lo = _mm512_shuffle_f32x4(a, b, 0x44); hi = _mm512_shuffle_f32x4(a, b, 0xEE);        \
                } else if (width == 4) {                                                                 \
                    lo = _mm512_shuffle_f32x4(a, b, 0x88); hi = _mm512_shuffle_f32x4(a, b, 0xDD);        \
                } else if (width == 2) {                                                                 \
                    lo = _mm512_shuffle_ps(a, b, 0x44); hi = _mm512_shuffle_ps(a, b, 0xEE);              \
                } else {                                                                                 \
                    lo = _mm512_shuffle_ps(a, b, 0x88); hi = _mm512_shuffle_ps(a, b, 0xDD);              \
                }                                                                                        \
                v[i] = op(lo, hi);                                                                       \
            }                                                                                            \
        /* the steps leave the result of v[i] in lane f(i), with f its own inverse */                    \
        const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);   \
        return _mm512_permutexvar_ps(order, v[0]);                                                       \
    }

REDUCE_LANES_16(max_lanes_16, _mm512_max_ps)
REDUCE_LANES_16(sum_lanes_16, _mm512_add_ps)
