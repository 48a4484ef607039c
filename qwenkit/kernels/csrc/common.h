/* What the kernel sources share. */
#ifndef QWENKIT_COMMON_H
#define QWENKIT_COMMON_H

#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* OpenMP where the build has it (every installed variant); without it (a test build) the loops run on one thread. */
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* Multiply-adds below which a call runs on one thread: waking another costs a few microseconds, as much as
 * about half a million multiply-adds (a decode step of a small model makes hundreds of such calls). How the work
 * is split never changes a result. */
#define SMALL_WORK (1 << 19)

/* IEEE half -> float, in portable C (subnormals included). */
INLINE float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> IEEE half bits, rounding to nearest even as torch's .to(torch.float16) (F. Giesen's method: the
 * subnormal case lets a float addition do the rounding). */
INLINE uint16_t float_to_half_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint16_t o;
    if (x >= 0x47800000u) { /* 2^16 and above: infinity, or NaN */
        o = x > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (x < 0x38800000u) { /* below 2^-14: a subnormal half, or zero */
        const uint32_t magic_bits = ((127 - 15) + (23 - 10) + 1) << 23;
        float a, magic;
        memcpy(&a, &x, 4);
        memcpy(&magic, &magic_bits, 4);
        a += magic;
        uint32_t r;
        memcpy(&r, &a, 4);
        o = (uint16_t)(r - magic_bits);
    } else {
        const uint32_t odd = (x >> 13) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

#endif
