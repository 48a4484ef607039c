/* The vector operations the block kernels are written in: 32 bytes (vi8), 8 int32 lanes (vi32), 8 float lanes (vf),
 * with one implementation per instruction set. The build compiles the kernels once per variant, each with its own
 * flags (qwenkit.kernels.build), and the macros below pick the implementation those flags allow:
 *
 *   avx512vnni  AVX512-VNNI (+BW, VL): vpdpbusd on 256-bit vectors
 *   avxvnni     AVX-VNNI (Alder Lake and later, Zen 5): the same instruction, VEX-encoded
 *   avx2        AVX2 + FMA + F16C: vpmaddubsw then vpmaddwd, as ggml does
 *   neon        Armv8.2 NEON with the dot-product extension (sdot), two 128-bit halves per vector
 *   i8mm        neon, and the int8 matrix multiply (smmla: Cortex-A510/A710/X2 and later, Apple M2 and later):
 *               the 8-row block kernels take two activation rows per instruction (dot2_x8)
 *   reference   plain C, one lane at a time
 *
 * Every variant gives the same bits. Integer dot products sum the same four products into the same lane (vpdpbusd,
 * vpmaddubsw + vpmaddwd and sdot group bytes 4l..4l+3 alike; no operand ever reaches vpmaddubsw's saturation: see
 * dot_us and dot_ss). The float operations are IEEE single ops in a fixed order: multiply-adds are fused on every
 * variant (fmaf in the reference), and hsum adds the lanes in one fixed tree. So a model's numbers, and its greedy
 * text, do not depend on the CPU it runs on.
 */
#ifndef QWENKIT_SIMD_H
#define QWENKIT_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
#define QK_VARIANT "avx512vnni"
#define QK_X86 1
#elif defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_VARIANT "avxvnni"
#define QK_X86 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_VARIANT "avx2"
#define QK_X86 1
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD) && defined(__ARM_FEATURE_MATMUL_INT8) && \
    defined(__aarch64__)
#define QK_VARIANT "i8mm"
#define QK_NEON 1
#define QK_I8MM 1
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
#define QK_VARIANT "neon"
#define QK_NEON 1
#else
#define QK_VARIANT "reference"
#define QK_REFERENCE 1
#endif

/* ---- x86: AVX2 registers, three ways to multiply bytes -------------------------------------------------------- */
#if defined(QK_X86)
#include <immintrin.h>

typedef __m256i vi8;
typedef __m256i vi32;
typedef __m256 vf;

INLINE vi8 load_i8(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
INLINE vi8 set1_i8(int8_t v) { return _mm256_set1_epi8(v); }
INLINE vi8 set4_i8(const void *p) { /* 4 bytes repeated 8 times */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
INLINE vi8 and_i8(vi8 a, vi8 b) { return _mm256_and_si256(a, b); }
INLINE vi8 or_i8(vi8 a, vi8 b) { return _mm256_or_si256(a, b); }
/* Byte shifts by way of 16-bit ones: the bits that cross into the neighbouring byte are garbage, and every use
 * masks them off (the other variants shift bytes exactly; the masked results are the same). */
#define SHL_I8(x, n) _mm256_slli_epi16((x), (n))
#define SRL_I8(x, n) _mm256_srli_epi16((x), (n))
INLINE vi8 nibbles_32(const uint8_t *p) { /* 16 bytes -> 32 values: low nibbles, then high nibbles */
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}
/* Byte j all ones where bit j of m is set. */
INLINE vi8 bits_to_bytes(uint32_t m) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_movm_epi8((__mmask32)m);
#else
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m),
                                               _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL,
                                                                  0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL); /* every bit but bit j of each byte j % 8 */
    return _mm256_cmpeq_epi8(_mm256_or_si256(spread, bit), _mm256_set1_epi64x(-1));
#endif
}
INLINE vi8 test_i8(vi8 a, vi8 bit) { return _mm256_cmpeq_epi8(_mm256_and_si256(a, bit), bit); } /* bit: one bit */

INLINE vi32 zero_i32(void) { return _mm256_setzero_si256(); }
INLINE vi32 add_i32(vi32 a, vi32 b) { return _mm256_add_epi32(a, b); }

/* acc + per lane l: sum of u[4l+i] * s[4l+i] over i < 4, u unsigned, s signed. Callers keep u <= 127 and
 * |s| <= 127 (or u <= 128 with |s| <= 127, dot_ss), so a pair of products never passes vpmaddubsw's 16-bit
 * saturation (2 * 128 * 127 = 32512). */
INLINE vi32 dot_us(vi32 acc, vi8 u, vi8 s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
/* The same for signed w against x in [-127, 127]: |w| times x with w's sign. */
INLINE vi32 dot_ss(vi32 acc, vi8 w, vi8 x) { return dot_us(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }

INLINE vf zero_f(void) { return _mm256_setzero_ps(); }
INLINE vf set1_f(float v) { return _mm256_set1_ps(v); }
INLINE vf set2_f(float lo, float hi) { return _mm256_set_m128(_mm_set1_ps(hi), _mm_set1_ps(lo)); } /* 4 + 4 */
INLINE vf cvt_f(vi32 a) { return _mm256_cvtepi32_ps(a); }
INLINE vf mul_f(vf a, vf b) { return _mm256_mul_ps(a, b); }
INLINE vf fmadd_f(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }  /* a * b + c, one rounding */
INLINE vf fnmadd_f(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); } /* c - a * b, one rounding */
INLINE vf load_h8(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INLINE vf load_f(const float *p) { return _mm256_loadu_ps(p); }
INLINE vf add_f(vf a, vf b) { return _mm256_add_ps(a, b); }
INLINE vf sub_f(vf a, vf b) { return _mm256_sub_ps(a, b); }
INLINE vf max_f(vf a, vf b) { return _mm256_max_ps(a, b); }
INLINE vf round_f(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
INLINE vf pow2i_f(vf n) { /* 2^n for whole n in [-126, 127] */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
INLINE void store_f(float *p, vf a) { _mm256_storeu_ps(p, a); }
INLINE float hsum_f(vf v) { /* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
INLINE float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* ---- Arm: two 128-bit halves ------------------------------------------------------------------------------ */
#elif defined(QK_NEON)
#include <arm_neon.h>

typedef struct { int8x16_t lo, hi; } vi8;
typedef struct { int32x4_t lo, hi; } vi32;
typedef struct { float32x4_t lo, hi; } vf;

INLINE vi8 load_i8(const void *p) { return (vi8){vld1q_s8((const int8_t *)p), vld1q_s8((const int8_t *)p + 16)}; }
INLINE vi8 set1_i8(int8_t v) { return (vi8){vdupq_n_s8(v), vdupq_n_s8(v)}; }
INLINE vi8 set4_i8(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    const int8x16_t r = vreinterpretq_s8_s32(vdupq_n_s32(v));
    return (vi8){r, r};
}
INLINE vi8 and_i8(vi8 a, vi8 b) { return (vi8){vandq_s8(a.lo, b.lo), vandq_s8(a.hi, b.hi)}; }
INLINE vi8 or_i8(vi8 a, vi8 b) { return (vi8){vorrq_s8(a.lo, b.lo), vorrq_s8(a.hi, b.hi)}; }
#define SHL_I8(x, n) ((vi8){vshlq_n_s8((x).lo, (n)), vshlq_n_s8((x).hi, (n))})
#define SRL_I8(x, n)                                                                                            \
    ((vi8){vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8((x).lo), (n))),                                 \
           vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8((x).hi), (n)))})
INLINE vi8 nibbles_32(const uint8_t *p) {
    const uint8x16_t t = vld1q_u8(p);
    return (vi8){vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(t, 4))};
}
INLINE vi8 bits_to_bytes(uint32_t m) {
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t b = vld1q_u8(bit);
    const uint8x16_t lo = vcombine_u8(vdup_n_u8((uint8_t)m), vdup_n_u8((uint8_t)(m >> 8)));
    const uint8x16_t hi = vcombine_u8(vdup_n_u8((uint8_t)(m >> 16)), vdup_n_u8((uint8_t)(m >> 24)));
    return (vi8){vreinterpretq_s8_u8(vtstq_u8(lo, b)), vreinterpretq_s8_u8(vtstq_u8(hi, b))};
}
INLINE vi8 test_i8(vi8 a, vi8 bit) {
    return (vi8){vreinterpretq_s8_u8(vtstq_s8(a.lo, bit.lo)), vreinterpretq_s8_u8(vtstq_s8(a.hi, bit.hi))};
}

INLINE vi32 zero_i32(void) { return (vi32){vdupq_n_s32(0), vdupq_n_s32(0)}; }
INLINE vi32 add_i32(vi32 a, vi32 b) { return (vi32){vaddq_s32(a.lo, b.lo), vaddq_s32(a.hi, b.hi)}; }
/* sdot: the unsigned operand is at most 127 at every call, so it reads the same as signed. */
INLINE vi32 dot_us(vi32 acc, vi8 u, vi8 s) {
    return (vi32){vdotq_s32(acc.lo, u.lo, s.lo), vdotq_s32(acc.hi, u.hi, s.hi)};
}
INLINE vi32 dot_ss(vi32 acc, vi8 w, vi8 x) {
    return (vi32){vdotq_s32(acc.lo, w.lo, x.lo), vdotq_s32(acc.hi, w.hi, x.hi)};
}

INLINE vf zero_f(void) { return (vf){vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
INLINE vf set1_f(float v) { return (vf){vdupq_n_f32(v), vdupq_n_f32(v)}; }
INLINE vf set2_f(float lo, float hi) { return (vf){vdupq_n_f32(lo), vdupq_n_f32(hi)}; }
INLINE vf cvt_f(vi32 a) { return (vf){vcvtq_f32_s32(a.lo), vcvtq_f32_s32(a.hi)}; }
INLINE vf mul_f(vf a, vf b) { return (vf){vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
INLINE vf fmadd_f(vf a, vf b, vf c) { return (vf){vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
INLINE vf fnmadd_f(vf a, vf b, vf c) { return (vf){vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi)}; }
INLINE vf load_h8(const void *p) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)p));
    return (vf){vcvt_f32_f16(vget_low_f16(h)), vcvt_f32_f16(vget_high_f16(h))};
}
INLINE vf load_f(const float *p) { return (vf){vld1q_f32(p), vld1q_f32(p + 4)}; }
INLINE vf add_f(vf a, vf b) { return (vf){vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
INLINE vf sub_f(vf a, vf b) { return (vf){vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)}; }
INLINE vf max_f(vf a, vf b) { return (vf){vmaxq_f32(a.lo, b.lo), vmaxq_f32(a.hi, b.hi)}; }
INLINE vf round_f(vf a) { return (vf){vrndnq_f32(a.lo), vrndnq_f32(a.hi)}; }
INLINE vf pow2i_f(vf n) {
    const int32x4_t b = vdupq_n_s32(127);
    return (vf){vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.lo), b), 23)),
                vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n.hi), b), 23))};
}
INLINE void store_f(float *p, vf a) {
    vst1q_f32(p, a.lo);
    vst1q_f32(p + 4, a.hi);
}
INLINE float hsum_f(vf v) {
    const float32x4_t s = vaddq_f32(v.lo, v.hi);
    return (vgetq_lane_f32(s, 0) + vgetq_lane_f32(s, 2)) + (vgetq_lane_f32(s, 1) + vgetq_lane_f32(s, 3));
}
INLINE float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_bits_to_float(h);
}

/* ---- reference: plain C, lane by lane --------------------------------------------------------------------- */
#else

typedef struct { int8_t b[32]; } vi8;
typedef struct { int32_t l[8]; } vi32;
typedef struct { float l[8]; } vf;

INLINE vi8 load_i8(const void *p) {
    vi8 r;
    memcpy(r.b, p, 32);
    return r;
}
INLINE vi8 set1_i8(int8_t v) {
    vi8 r;
    memset(r.b, (unsigned char)v, 32);
    return r;
}
INLINE vi8 set4_i8(const void *p) {
    vi8 r;
    for (int i = 0; i < 8; i++) memcpy(r.b + 4 * i, p, 4);
    return r;
}
INLINE vi8 and_i8(vi8 a, vi8 b) {
    for (int i = 0; i < 32; i++) a.b[i] &= b.b[i];
    return a;
}
INLINE vi8 or_i8(vi8 a, vi8 b) {
    for (int i = 0; i < 32; i++) a.b[i] |= b.b[i];
    return a;
}
INLINE vi8 shl_i8(vi8 a, int n) {
    for (int i = 0; i < 32; i++) a.b[i] = (int8_t)((uint8_t)a.b[i] << n);
    return a;
}
INLINE vi8 srl_i8(vi8 a, int n) {
    for (int i = 0; i < 32; i++) a.b[i] = (int8_t)((uint8_t)a.b[i] >> n);
    return a;
}
#define SHL_I8(x, n) shl_i8((x), (n))
#define SRL_I8(x, n) srl_i8((x), (n))
INLINE vi8 nibbles_32(const uint8_t *p) {
    vi8 r;
    for (int i = 0; i < 16; i++) r.b[i] = (int8_t)(p[i] & 0x0F), r.b[i + 16] = (int8_t)(p[i] >> 4);
    return r;
}
INLINE vi8 bits_to_bytes(uint32_t m) {
    vi8 r;
    for (int i = 0; i < 32; i++) r.b[i] = (int8_t)((m >> i) & 1u ? -1 : 0);
    return r;
}
INLINE vi8 test_i8(vi8 a, vi8 bit) {
    for (int i = 0; i < 32; i++) a.b[i] = (int8_t)(a.b[i] & bit.b[i] ? -1 : 0);
    return a;
}

INLINE vi32 zero_i32(void) {
    vi32 r = {{0}};
    return r;
}
INLINE vi32 add_i32(vi32 a, vi32 b) {
    for (int i = 0; i < 8; i++) a.l[i] += b.l[i];
    return a;
}
INLINE vi32 dot_us(vi32 acc, vi8 u, vi8 s) {
    for (int l = 0; l < 8; l++)
        for (int i = 0; i < 4; i++) acc.l[l] += (int32_t)(uint8_t)u.b[4 * l + i] * (int32_t)s.b[4 * l + i];
    return acc;
}
INLINE vi32 dot_ss(vi32 acc, vi8 w, vi8 x) {
    for (int l = 0; l < 8; l++)
        for (int i = 0; i < 4; i++) acc.l[l] += (int32_t)w.b[4 * l + i] * (int32_t)x.b[4 * l + i];
    return acc;
}

INLINE vf zero_f(void) {
    vf r = {{0}};
    return r;
}
INLINE vf set1_f(float v) {
    vf r;
    for (int i = 0; i < 8; i++) r.l[i] = v;
    return r;
}
INLINE vf set2_f(float lo, float hi) {
    vf r;
    for (int i = 0; i < 8; i++) r.l[i] = i < 4 ? lo : hi;
    return r;
}
INLINE vf cvt_f(vi32 a) {
    vf r;
    for (int i = 0; i < 8; i++) r.l[i] = (float)a.l[i];
    return r;
}
INLINE vf mul_f(vf a, vf b) {
    for (int i = 0; i < 8; i++) a.l[i] *= b.l[i];
    return a;
}
INLINE vf fmadd_f(vf a, vf b, vf c) {
    for (int i = 0; i < 8; i++) c.l[i] = fmaf(a.l[i], b.l[i], c.l[i]);
    return c;
}
INLINE vf fnmadd_f(vf a, vf b, vf c) {
    for (int i = 0; i < 8; i++) c.l[i] = fmaf(-a.l[i], b.l[i], c.l[i]);
    return c;
}
INLINE vf load_h8(const void *p) {
    vf r;
    uint16_t h[8];
    memcpy(h, p, sizeof h);
    for (int i = 0; i < 8; i++) r.l[i] = half_bits_to_float(h[i]);
    return r;
}
INLINE void store_f(float *p, vf a) { memcpy(p, a.l, sizeof a.l); }
INLINE vf load_f(const float *p) {
    vf r;
    memcpy(r.l, p, sizeof r.l);
    return r;
}
INLINE vf add_f(vf a, vf b) {
    for (int i = 0; i < 8; i++) a.l[i] += b.l[i];
    return a;
}
INLINE vf sub_f(vf a, vf b) {
    for (int i = 0; i < 8; i++) a.l[i] -= b.l[i];
    return a;
}
INLINE vf max_f(vf a, vf b) {
    for (int i = 0; i < 8; i++) a.l[i] = a.l[i] > b.l[i] ? a.l[i] : b.l[i];
    return a;
}
INLINE vf round_f(vf a) {
    for (int i = 0; i < 8; i++) a.l[i] = nearbyintf(a.l[i]);
    return a;
}
INLINE vf pow2i_f(vf n) {
    for (int i = 0; i < 8; i++) n.l[i] = ldexpf(1.0f, (int)n.l[i]);
    return n;
}
INLINE float hsum_f(vf v) {
    const float a0 = v.l[0] + v.l[4], a1 = v.l[1] + v.l[5], a2 = v.l[2] + v.l[6], a3 = v.l[3] + v.l[7];
    return (a0 + a2) + (a1 + a3);
}
INLINE float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_bits_to_float(h);
}
#endif

/* acc + the dots of n pairs (u[i], s[i]): lane by lane the same sum as n calls of dot_us (integer addition is
 * exact, so any grouping gives the same bits). Without VNNI the pairs' 16-bit products are summed in 16 bits
 * first and widened once, a third of the instructions: callers keep n * 2 * max(u) * 127 <= 32767 (n <= 8 for
 * 4-bit values, n <= 4 for 5-bit ones). Elsewhere two independent chains halve the dot's latency. n is even. */
INLINE vi32 dot_us_n(vi32 acc, const vi8 *u, const vi8 *s, const int n) {
#if defined(QK_X86) && !defined(__AVX512VNNI__) && !defined(__AVXVNNI__)
    __m256i t = _mm256_maddubs_epi16(u[0], s[0]);
    for (int i = 1; i < n; i++) t = _mm256_add_epi16(t, _mm256_maddubs_epi16(u[i], s[i]));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(t, _mm256_set1_epi16(1)));
#else
    vi32 p0 = dot_us(acc, u[0], s[0]), p1 = dot_us(zero_i32(), u[1], s[1]);
    for (int i = 2; i < n; i += 2) p0 = dot_us(p0, u[i], s[i]), p1 = dot_us(p1, u[i + 1], s[i + 1]);
    return add_i32(p0, p1);
#endif
}

#if defined(QK_I8MM)
/* Two activation rows a and b against 8 interleaved weight rows: w[j] holds the 8 rows' values 4j..4j+3 (row i in
 * bytes 4i..4i+3), met by activation bytes 4j..4j+3; *sa, *sb get lane i = row i's integer dot with a, with b.
 * smmla multiplies a 2x8 by an 8x2 block of signed bytes: two weight rows' 8 values (chunks j and j + 1 zipped)
 * against two activation rows' 8 bytes, four sums at once. The sums are exact, so equal to dot_us/dot_ss's. */
INLINE void dot2_x8(const vi8 w[8], const int8_t *a, const int8_t *b, vi32 *sa, vi32 *sb) {
    int32x4_t acc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)}; /* rows 01, 23, 45, 67 */
    for (int j = 0; j < 8; j += 2) {
        const int8x16_t x = vcombine_s8(vld1_s8(a + 4 * j), vld1_s8(b + 4 * j));
        const int32x4_t lo0 = vreinterpretq_s32_s8(w[j].lo), lo1 = vreinterpretq_s32_s8(w[j + 1].lo);
        const int32x4_t hi0 = vreinterpretq_s32_s8(w[j].hi), hi1 = vreinterpretq_s32_s8(w[j + 1].hi);
        acc[0] = vmmlaq_s32(acc[0], vreinterpretq_s8_s32(vzip1q_s32(lo0, lo1)), x);
        acc[1] = vmmlaq_s32(acc[1], vreinterpretq_s8_s32(vzip2q_s32(lo0, lo1)), x);
        acc[2] = vmmlaq_s32(acc[2], vreinterpretq_s8_s32(vzip1q_s32(hi0, hi1)), x);
        acc[3] = vmmlaq_s32(acc[3], vreinterpretq_s8_s32(vzip2q_s32(hi0, hi1)), x);
    }
    /* acc[p] = [row 2p . a, row 2p . b, row 2p+1 . a, row 2p+1 . b] */
    *sa = (vi32){vuzp1q_s32(acc[0], acc[1]), vuzp1q_s32(acc[2], acc[3])};
    *sb = (vi32){vuzp2q_s32(acc[0], acc[1]), vuzp2q_s32(acc[2], acc[3])};
}
#endif

/* exp(x) for x <= 0 (scores minus their maximum): 2^n * p(f), |relative error| < 2e-7 (Cephes' expf polynomial,
 * with ln 2 split in two for the reduction). */
INLINE vf exp_f(vf x) {
    x = max_f(x, set1_f(-87.0f));
    const vf n = round_f(mul_f(x, set1_f(1.44269504088896341f)));
    vf f = fnmadd_f(n, set1_f(0.693359375f), x);
    f = fnmadd_f(n, set1_f(-2.12194440e-4f), f);
    vf p = set1_f(1.9875691500e-4f);
    p = fmadd_f(p, f, set1_f(1.3981999507e-3f));
    p = fmadd_f(p, f, set1_f(8.3334519073e-3f));
    p = fmadd_f(p, f, set1_f(4.1665795894e-2f));
    p = fmadd_f(p, f, set1_f(1.6666665459e-1f));
    p = fmadd_f(p, f, set1_f(5.0000001201e-1f));
    p = fmadd_f(p, mul_f(f, f), add_f(f, set1_f(1.0f)));
    return mul_f(p, pow2i_f(n));
}

#endif
