/* Matrix products straight from GGUF's quantized blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K), for decode.
 *
 * The weights stay in the file's own bytes: nothing is converted at load, and a decode step reads exactly as many
 * weight bytes as llama.cpp does. The activations are quantized per 32 values to int8 with a float scale (as
 * llama.cpp's Q8_0, finer than its Q8_K for the K-quants), then each weight block's integers meet the activation's
 * in an integer dot product (simd.h: vpdpbusd, vpmaddubsw, sdot or plain C), summed in int32, scaled in fp32. A
 * zero point (Q4_0's 8, Q6_K's 32, the K-quants' mins) costs one multiply-add per block against the activation
 * block's sum, computed once per call.
 *
 * Every activation row is computed on its own, by the same instructions whatever the number of rows: a row's
 * result does not depend on its batch (the serving engine relies on it). And every variant (simd.h) computes the
 * same bits, so it does not depend on the CPU either.
 *
 * Built once per variant by qwenkit.kernels.build (-O3 -fopenmp -ffp-contract=off and the variant's flags); OpenMP
 * here is PyTorch's own libgomp (same soname, loaded first), so these loops share PyTorch's threads instead of
 * fighting them for cores.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "simd.h"

enum { T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };
/* A part's type | X8: its rows come in groups of 8 interleaved block by block (see qk_repack), so one vector
 * instruction works on 8 rows at once. */
#define X8 256

enum { QK_OK = 0, QK_BAD_TYPE = 1, QK_BAD_SHAPE = 2, QK_NO_MEMORY = 3, QK_BAD_ROW = 4 };

#define MAX_M 4 /* activation rows per pass over a weight row (their accumulators live in registers) */

/* ---- scalars -------------------------------------------------------------------------------------------- */


INLINE uint16_t float_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* Q4_K / Q5_K: 6-bit scale and min of sub-block j from the 12 packed bytes. */
INLINE void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* ---- block geometry ------------------------------------------------------------------------------------- */

static int block_elements(int type) {
    switch (type & ~X8) {
    case T_Q4_0: case T_Q5_0: case T_Q8_0: return 32;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return 256;
    default: return 0;
    }
}

static int block_bytes(int type) {
    switch (type & ~X8) {
    case T_Q4_0: return 18;
    case T_Q5_0: return 22;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
    }
}


/* ---- 8-row interleaving (Q4_0, Q5_0, Q8_0) -------------------------------------------------------------- */
/* Per block of 32 values, the 8 rows' blocks (8 x block_bytes) become: the 8 fp16 scales; for Q5_0 the fifth bits
 * as 8 masks of 32 bits (for c = 0..3: lo, hi; bit 4r+i = row r's value 4c+i, resp. 16+4c+i); then the value
 * bytes as chunks of 4 per row: chunk c of every row in turn (32 bytes per c). Lane r of a 32-byte vector is then
 * row r, and vpdpbusd against 4 activation bytes broadcast gives each row's partial dot in its own lane. */

static int interleavable(int type) { return type == T_Q4_0 || type == T_Q5_0 || type == T_Q8_0; }

static void interleave_block(int type, const uint8_t *const rows[8], uint8_t *dst) {
    const int vals = type == T_Q8_0 ? 32 : 16, at = type == T_Q5_0 ? 6 : 2; /* value bytes per row, their offset */
    for (int r = 0; r < 8; r++) memcpy(dst + 2 * r, rows[r], 2);
    uint8_t *q = dst + 16;
    if (type == T_Q5_0) {
        uint32_t masks[8] = {0};
        for (int r = 0; r < 8; r++) {
            uint32_t qh;
            memcpy(&qh, rows[r] + 2, 4);
            for (int c = 0; c < 4; c++)
                for (int i = 0; i < 4; i++) {
                    masks[2 * c] |= ((qh >> (4 * c + i)) & 1u) << (4 * r + i);
                    masks[2 * c + 1] |= ((qh >> (16 + 4 * c + i)) & 1u) << (4 * r + i);
                }
        }
        memcpy(q, masks, 32);
        q += 32;
    }
    for (int c = 0; c < vals / 4; c++)
        for (int r = 0; r < 8; r++) memcpy(q + 32 * c + 4 * r, rows[r] + at + 4 * c, 4);
}

/* Row r (0..7) of an interleaved block group back into its own block. */
static void deinterleave_block(int type, const uint8_t *src, int r, uint8_t *out) {
    const int vals = type == T_Q8_0 ? 32 : 16, at = type == T_Q5_0 ? 6 : 2;
    memcpy(out, src + 2 * r, 2);
    const uint8_t *q = src + 16;
    if (type == T_Q5_0) {
        uint32_t masks[8], qh = 0;
        memcpy(masks, q, 32);
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 4; i++) {
                qh |= ((masks[2 * c] >> (4 * r + i)) & 1u) << (4 * c + i);
                qh |= ((masks[2 * c + 1] >> (4 * r + i)) & 1u) << (16 + 4 * c + i);
            }
        memcpy(out + 2, &qh, 4);
        q += 32;
    }
    for (int c = 0; c < vals / 4; c++) memcpy(out + at + 4 * c, q + 32 * c + 4 * r, 4);
}

/* The first n - n % 8 rows of a [n, k] tensor interleaved by 8 (the rest copied as they are) into dst, same size. */
int qk_repack(const uint8_t *src, int type, int64_t n, int64_t k, uint8_t *dst) {
    if (!interleavable(type)) return QK_BAD_TYPE;
    if (k <= 0 || k % 32) return QK_BAD_SHAPE;
    const int bb = block_bytes(type);
    const int64_t nb = k / 32, row_bytes = nb * bb, groups = n / 8;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *rows[8];
            for (int r = 0; r < 8; r++) rows[r] = src + (8 * g + r) * row_bytes + b * bb;
            interleave_block(type, rows, dst + 8 * g * row_bytes + 8 * b * bb);
        }
    memcpy(dst + 8 * groups * row_bytes, src + 8 * groups * row_bytes, (size_t)((n - 8 * groups) * row_bytes));
    return QK_OK;
}

/* The inverse of qk_repack. */
int qk_unpack(const uint8_t *src, int type, int64_t n, int64_t k, uint8_t *dst) {
    if (!interleavable(type)) return QK_BAD_TYPE;
    if (k <= 0 || k % 32 || n % 8) return QK_BAD_SHAPE;
    const int bb = block_bytes(type);
    const int64_t nb = k / 32, row_bytes = nb * bb;
    for (int64_t row = 0; row < n; row++)
        for (int64_t b = 0; b < nb; b++)
            deinterleave_block(type, src + (row / 8) * 8 * row_bytes + 8 * b * bb, (int)(row % 8),
                               dst + row * row_bytes + b * bb);
    return QK_OK;
}

/* Block `blk` of row `row` of a weight of `type` (X8 or not) as a plain block: a pointer into w, or into tmp. */
static const uint8_t *plain_block(int type, const uint8_t *w, int64_t row, int64_t blk, int64_t nb, uint8_t *tmp) {
    const int bb = block_bytes(type);
    if (!(type & X8)) return w + (row * nb + blk) * bb;
    deinterleave_block(type & ~X8, w + (row / 8) * 8 * nb * bb + blk * 8 * bb, (int)(row % 8), tmp);
    return tmp;
}

/* ---- dequantization (prompt chunks, embedding rows): exactly gguf-py's float32 values ------------------- */

/* One block into out[0 .. block_elements): the operations and their order are gguf-py's (no fused multiply-add;
 * the library is built with -ffp-contract=off), so the values are bit for bit the reference's. */
static void dequantize_block(int type, const uint8_t *b, float *out) {
    switch (type) {
    case T_Q4_0: {
        const float d = half_to_float(b);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (float)((b[2 + j] & 0xF) - 8);
            out[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
        break;
    }
    case T_Q5_0: {
        const float d = half_to_float(b);
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        for (int j = 0; j < 16; j++) {
            const int lo = (b[6 + j] & 0xF) | (((qh >> j) & 1) << 4);
            const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            out[j] = d * (float)(lo - 16);
            out[j + 16] = d * (float)(hi - 16);
        }
        break;
    }
    case T_Q8_0: {
        const float d = half_to_float(b);
        for (int j = 0; j < 32; j++) out[j] = d * (float)(int8_t)b[2 + j];
        break;
    }
    case T_Q4_K: case T_Q5_K: {
        const float d = half_to_float(b), dmin = half_to_float(b + 2);
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = type == T_Q4_K ? b + 16 : b + 48;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, mn;
            scale_min_k4(j, scales, &sc, &mn);
            const float dl = d * (float)sc, ml = dmin * (float)mn;
            const uint8_t *q = qs + 32 * (j / 2);
            for (int l = 0; l < 32; l++) {
                int v = j % 2 ? q[l] >> 4 : q[l] & 0xF;
                if (type == T_Q5_K) v |= ((qh[l] >> j) & 1) << 4;
                out[32 * j + l] = dl * (float)v - ml;
            }
        }
        break;
    }
    case T_Q6_K: {
        const float d = half_to_float(b + 208);
        const int8_t *scales = (const int8_t *)(b + 192);
        for (int n = 0; n < 2; n++) {
            const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
            const int8_t *sc = scales + 8 * n;
            float *y = out + 128 * n;
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = (d * (float)sc[is]) * (float)q1;
                y[l + 32] = (d * (float)sc[is + 2]) * (float)q2;
                y[l + 64] = (d * (float)sc[is + 4]) * (float)q3;
                y[l + 96] = (d * (float)sc[is + 6]) * (float)q4;
            }
        }
        break;
    }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* float_to_bf16 on 16 lanes. */
INLINE __m256i bf16_16(__m512 y) {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

/* Eight interleaved Q4_0 or Q8_0 rows' block `blk` (of nb per row) into rows r0..r0+7 of out [*, k]: a gather
 * brings back each row's value bytes in order, then 16 values per vector. The same products as dequantize_block,
 * so the same float32 values and bfloat16 roundings; a prompt chunk dequantizes every weight this way. */
static void dequantize_group_x8(int type, const uint8_t *g, int64_t r0, int64_t blk, int64_t k, void *out, int bf16) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
    float scales[8];
    _mm256_storeu_ps(scales, d);
    const int *values = (const int *)(g + 16);
    __m512i rows4[2]; /* Q4_0: rows 0-3 and 4-7, each row's 16 value bytes back in order */
    if (type == T_Q4_0) {
        const __m512i a = _mm512_loadu_si512(g + 16), b = _mm512_loadu_si512(g + 80); /* chunks 0-1, 2-3 */
        const __m512i idx = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
        rows4[0] = _mm512_permutex2var_epi32(a, idx, b);
        rows4[1] = _mm512_permutex2var_epi32(a, _mm512_add_epi32(idx, _mm512_set1_epi32(4)), b);
    }
    for (int r = 0; r < 8; r++) {
        __m512 v[2];
        if (type == T_Q4_0) {
            __m128i q;
            switch (r & 3) { /* the lane index must be a constant */
            case 0: q = _mm512_extracti32x4_epi32(rows4[r >> 2], 0); break;
            case 1: q = _mm512_extracti32x4_epi32(rows4[r >> 2], 1); break;
            case 2: q = _mm512_extracti32x4_epi32(rows4[r >> 2], 2); break;
            default: q = _mm512_extracti32x4_epi32(rows4[r >> 2], 3); break;
            }
            const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
            v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(q, m4), eight)));
            v[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4),
                                                                         eight)));
        } else {
            const __m256i idx = _mm256_setr_epi32(r, 8 + r, 16 + r, 24 + r, 32 + r, 40 + r, 48 + r, 56 + r);
            const __m256i q = _mm256_i32gather_epi32(values, idx, 4);
            v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            v[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        }
        const __m512 scale = _mm512_set1_ps(scales[r]);
        const int64_t at = (r0 + r) * k + 32 * blk;
        for (int h = 0; h < 2; h++) {
            const __m512 y = _mm512_mul_ps(scale, v[h]);
            if (!bf16) {
                _mm512_storeu_ps((float *)out + at + 16 * h, y);
                continue;
            }
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + at + 16 * h), bf16_16(y));
        }
    }
}
#endif

/* Rows of a [n, k] tensor (all of them, or those in `ids`) into float32 or bfloat16 `out` [len, k]. */
int qk_dequantize(const uint8_t *w, int type, int64_t n, int64_t k, const int64_t *ids, int64_t n_ids,
                  void *out, int bf16, int n_threads) {
    const int be = block_elements(type);
    if (!be) return QK_BAD_TYPE;
    if (k <= 0 || k % be) return QK_BAD_SHAPE;
    if ((type & X8) && (!interleavable(type & ~X8) || n % 8)) return QK_BAD_TYPE;
    const int64_t rows = ids ? n_ids : n, nb = k / be;
    if (ids)
        for (int64_t i = 0; i < n_ids; i++)
            if (ids[i] < 0 || ids[i] >= n) return QK_BAD_ROW;
    if (n_threads < 1) n_threads = 1;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (!ids && (type == (T_Q4_0 | X8) || type == (T_Q8_0 | X8))) { /* whole weights of the interleaved types */
        const int64_t group_bytes = 8 * nb * block_bytes(type), bb8 = 8 * block_bytes(type);
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t grp = 0; grp < n / 8; grp++)
            for (int64_t blk = 0; blk < nb; blk++)
                dequantize_group_x8(type & ~X8, w + grp * group_bytes + blk * bb8, 8 * grp, blk, k, out, bf16);
        return QK_OK;
    }
#endif
#pragma omp parallel for num_threads(n_threads) schedule(static) if (rows * k >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        const int64_t row = ids ? ids[r] : r;
        float tmp[256];
        uint8_t plain[256];
        for (int64_t blk = 0; blk < nb; blk++) {
            float *dst = bf16 ? tmp : (float *)out + r * k + blk * be;
            dequantize_block(type & ~X8, plain_block(type, w, row, blk, nb, plain), dst);
            if (bf16) {
                uint16_t *o = (uint16_t *)out + r * k + blk * be;
                for (int j = 0; j < be; j++) o[j] = float_to_bf16(tmp[j]);
            }
        }
    }
    return QK_OK;
}

/* ---- activations ---------------------------------------------------------------------------------------- */

typedef struct {
    int64_t k;
    const int8_t *q; /* [m, k] */
    const float *d;  /* [m, k/32] scale of each block of 32 */
    const float *s;  /* [m, k/32] d * (sum of the block's integers): for zero points */
    const float *s16; /* [m, k/16] d * (sum of each half block's integers): for Q6_K's 16-value sub-blocks */
} acts;

static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s, float *s16) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inv = scale > 0.0f ? 127.0f / amax : 0.0f;
        int sum[2] = {0, 0};
        for (int j = 0; j < 32; j++) {
            const int v = (int)nearbyintf(xb[j] * inv);
            q[32 * b + j] = (int8_t)v;
            sum[j / 16] += v;
        }
        d[b] = scale;
        s[b] = scale * (float)(sum[0] + sum[1]);
        s16[2 * b] = scale * (float)sum[0];
        s16[2 * b + 1] = scale * (float)sum[1];
    }
}

/* `name`: `kernel` over m activation rows, in chunks of MAX_M, each chunk's M a compile-time constant. The same
 * code runs a row whatever its chunk: a row's result does not depend on its batch. */
#define OVER_ROWS(name, kernel)                                                                                  \
    static void name(int type, const uint8_t *w, const acts *a, int64_t m, float *y, int64_t stride) {          \
        int64_t m0 = 0;                                                                                          \
        for (; m0 + 4 <= m; m0 += 4) kernel(type, w, a, m0, 4, y + m0 * stride, stride);                         \
        switch (m - m0) {                                                                                        \
        case 3: kernel(type, w, a, m0, 3, y + m0 * stride, stride); break;                                       \
        case 2: kernel(type, w, a, m0, 2, y + m0 * stride, stride); break;                                       \
        case 1: kernel(type, w, a, m0, 1, y + m0 * stride, stride); break;                                       \
        }                                                                                                        \
    }

/* ---- one weight row against up to MAX_M activation rows ------------------------------------------------- */
/* Each kernel writes y[r * stride] for r < M. M is a compile-time constant at every call (see row_dot). */

/* acc[r] += float(dot(wq, x_r)) * (ws * d_r); off[r] += wo * s_r. One block of 32, unsigned weight values. */
#define BLOCK_32(wq, ws, wo, blk)                                                                                \
    for (int r = 0; r < M; r++) {                                                                                \
        const vi8 x = load_i8(a->q + (m0 + r) * a->k + 32 * (blk));                                              \
        const vi32 dot = dot_us(zero_i32(), (wq), x);                                                            \
        const int64_t at = (m0 + r) * nb32 + (blk);                                                              \
        acc[r] = fmadd_f(cvt_f(dot), set1_f((ws) * a->d[at]), acc[r]);                                           \
        off[r] += (wo) * a->s[at];                                                                               \
    }

INLINE void row_q4_5_0(const uint8_t *w, const acts *a, int64_t m0, const int M, float *y, int64_t stride,
                       const int five) { /* Q4_0, or Q5_0 (the same plus a fifth bit per value) */
    const int64_t nb32 = a->k / 32;
    vf acc[MAX_M];
    float off[MAX_M];
    for (int r = 0; r < M; r++) acc[r] = zero_f(), off[r] = 0.0f;
    for (int64_t b = 0; b < nb32; b++, w += five ? 22 : 18) {
        const float d = half_to_float(w);
        vi8 q = nibbles_32(w + (five ? 6 : 2));
        if (five) {
            uint32_t qh;
            memcpy(&qh, w + 2, 4);
            q = or_i8(q, and_i8(bits_to_bytes(qh), set1_i8(16))); /* bit j: value j's fifth bit */
        }
        BLOCK_32(q, d, d, b)
    }
    for (int r = 0; r < M; r++) y[r * stride] = hsum_f(acc[r]) - (five ? 16.0f : 8.0f) * off[r];
}

INLINE void row_q8_0(const uint8_t *w, const acts *a, int64_t m0, const int M, float *y, int64_t stride) {
    const int64_t nb32 = a->k / 32;
    vf acc[MAX_M];
    for (int r = 0; r < M; r++) acc[r] = zero_f();
    for (int64_t b = 0; b < nb32; b++, w += 34) {
        const float d = half_to_float(w);
        const vi8 q = load_i8(w + 2);
        for (int r = 0; r < M; r++) {
            const vi32 dot = dot_ss(zero_i32(), q, load_i8(a->q + (m0 + r) * a->k + 32 * b));
            acc[r] = fmadd_f(cvt_f(dot), set1_f(d * a->d[(m0 + r) * nb32 + b]), acc[r]);
        }
    }
    for (int r = 0; r < M; r++) y[r * stride] = hsum_f(acc[r]);
}

INLINE void row_qk45(const uint8_t *w, const acts *a, int64_t m0, const int M, float *y, int64_t stride,
                     const int five) {
    const int64_t nb32 = a->k / 32, bytes = five ? 176 : 144;
    const vi8 m4 = set1_i8(0x0F), b16 = set1_i8(16);
    vf acc[MAX_M];
    float off[MAX_M];
    for (int r = 0; r < M; r++) acc[r] = zero_f(), off[r] = 0.0f;
    for (int64_t sb = 0; sb < nb32 / 8; sb++, w += bytes) {
        const float d = half_to_float(w), dmin = half_to_float(w + 2);
        const uint8_t *qs = w + (five ? 48 : 16);
        const vi8 hbits = five ? load_i8(w + 16) : set1_i8(0);
        for (int i = 0; i < 4; i++) {
            const vi8 t = load_i8(qs + 32 * i);
            vi8 lo = and_i8(t, m4), hi = and_i8(SRL_I8(t, 4), m4);
            if (five) {
                lo = or_i8(lo, and_i8(test_i8(hbits, set1_i8((int8_t)(1 << (2 * i)))), b16));
                hi = or_i8(hi, and_i8(test_i8(hbits, set1_i8((int8_t)(2 << (2 * i)))), b16));
            }
            uint8_t sc, mn;
            scale_min_k4(2 * i, w + 4, &sc, &mn);
            BLOCK_32(lo, d * (float)sc, dmin * (float)mn, 8 * sb + 2 * i)
            scale_min_k4(2 * i + 1, w + 4, &sc, &mn);
            BLOCK_32(hi, d * (float)sc, dmin * (float)mn, 8 * sb + 2 * i + 1)
        }
    }
    for (int r = 0; r < M; r++) y[r * stride] = hsum_f(acc[r]) - off[r];
}

INLINE void row_q6_k(const uint8_t *w, const acts *a, int64_t m0, const int M, float *y, int64_t stride) {
    const int64_t nb32 = a->k / 32;
    const vi8 m4 = set1_i8(0x0F), m30 = set1_i8(0x30);
    vf acc[MAX_M];
    float off[MAX_M];
    for (int r = 0; r < M; r++) acc[r] = zero_f(), off[r] = 0.0f;
    for (int64_t sb = 0; sb < nb32 / 8; sb++, w += 210) {
        const float d = half_to_float(w + 208);
        const int8_t *scales = (const int8_t *)(w + 192);
        for (int n = 0; n < 2; n++) {
            const vi8 l0 = load_i8(w + 64 * n), l1 = load_i8(w + 64 * n + 32), h = load_i8(w + 128 + 32 * n);
            vi8 q[4];
            q[0] = or_i8(and_i8(l0, m4), and_i8(SHL_I8(h, 4), m30));
            q[1] = or_i8(and_i8(l1, m4), and_i8(SHL_I8(h, 2), m30));
            q[2] = or_i8(and_i8(SRL_I8(l0, 4), m4), and_i8(h, m30));
            q[3] = or_i8(and_i8(SRL_I8(l1, 4), m4), and_i8(SRL_I8(h, 2), m30));
            for (int g = 0; g < 4; g++) {
                /* 32 values, two sub-blocks of 16 with their own scales: lanes 0-3 and 4-7 of the dot. */
                const float s0 = d * (float)scales[8 * n + 2 * g], s1 = d * (float)scales[8 * n + 2 * g + 1];
                const vf sv = set2_f(s0, s1);
                const int64_t blk = 8 * sb + 4 * n + g;
                for (int r = 0; r < M; r++) {
                    const vi32 dot = dot_us(zero_i32(), q[g], load_i8(a->q + (m0 + r) * a->k + 32 * blk));
                    const int64_t at = (m0 + r) * nb32 + blk;
                    acc[r] = fmadd_f(mul_f(cvt_f(dot), sv), set1_f(a->d[at]), acc[r]);
                    off[r] += s0 * a->s16[2 * at] + s1 * a->s16[2 * at + 1];
                }
            }
        }
    }
    for (int r = 0; r < M; r++) y[r * stride] = hsum_f(acc[r]) - 32.0f * off[r];
}

INLINE void row_kernel(int type, const uint8_t *w, const acts *a, int64_t m0, const int M, float *y,
                       int64_t stride) {
    switch (type) {
    case T_Q4_0: row_q4_5_0(w, a, m0, M, y, stride, 0); break;
    case T_Q5_0: row_q4_5_0(w, a, m0, M, y, stride, 1); break;
    case T_Q8_0: row_q8_0(w, a, m0, M, y, stride); break;
    case T_Q4_K: row_qk45(w, a, m0, M, y, stride, 0); break;
    case T_Q5_K: row_qk45(w, a, m0, M, y, stride, 1); break;
    case T_Q6_K: row_q6_k(w, a, m0, M, y, stride); break;
    }
}


/* Eight interleaved rows (qk_repack) against M activation rows: y[r * stride + i] for row i of the group. */
INLINE void group_x8(const int type, const uint8_t *w, const acts *a, int64_t m0, const int M, float *y,
                     int64_t stride) {
    const int64_t nb32 = a->k / 32, bytes = 8 * (type == T_Q4_0 ? 18 : type == T_Q5_0 ? 22 : 34);
    const vi8 m4 = set1_i8(0x0F), b16 = set1_i8(16);
    vf acc[MAX_M], off[MAX_M];
    for (int r = 0; r < M; r++) acc[r] = off[r] = zero_f();
    for (int64_t b = 0; b < nb32; b++, w += bytes) {
        const vf d = load_h8(w); /* the 8 rows' scales */
        /* Each row's integer sum over the block, lane i = weight row i. Integer addition is exact, so how the
         * partial sums are grouped (dot_us_n, dot2_x8) changes no result. */
        vi32 sums[MAX_M];
        const int8_t *x0 = a->q + m0 * a->k + 32 * b;
        /* The weights' values in activation order: vals[j] holds the 8 rows' values 4j..4j+3, met by activation
         * bytes 4j..4j+3 of each row. Q4_0/Q5_0 keep values j and 16 + j in one byte's low and high nibble. */
        vi8 vals[8];
        if (type == T_Q8_0) {
            for (int c = 0; c < 8; c++) vals[c] = load_i8(w + 16 + 32 * c);
        } else {
            const uint8_t *qs = w + (type == T_Q5_0 ? 48 : 16);
            for (int c = 0; c < 4; c++) {
                const vi8 t = load_i8(qs + 32 * c);
                vals[c] = and_i8(t, m4), vals[4 + c] = and_i8(SRL_I8(t, 4), m4);
                if (type == T_Q5_0) { /* the fifth bits */
                    uint32_t ml, mh;
                    memcpy(&ml, w + 16 + 8 * c, 4);
                    memcpy(&mh, w + 20 + 8 * c, 4);
                    vals[c] = or_i8(vals[c], and_i8(bits_to_bytes(ml), b16));
                    vals[4 + c] = or_i8(vals[4 + c], and_i8(bits_to_bytes(mh), b16));
                }
            }
        }
        int r = 0;
#if defined(QK_I8MM)
        for (; r + 2 <= M; r += 2) dot2_x8(vals, x0 + r * a->k, x0 + (r + 1) * a->k, &sums[r], &sums[r + 1]);
#endif
        for (; r < M; r++) {
            const int8_t *xr = x0 + r * a->k;
            vi8 xv[8];
            for (int j = 0; j < 8; j++) xv[j] = set4_i8(xr + 4 * j);
            if (type == T_Q8_0) { /* signed weights: no 16-bit shortcut (a pair of products can reach 32512) */
                vi32 dot[4] = {zero_i32(), zero_i32(), zero_i32(), zero_i32()};
                for (int j = 0; j < 8; j++) dot[j & 3] = dot_ss(dot[j & 3], vals[j], xv[j]);
                sums[r] = add_i32(add_i32(dot[0], dot[1]), add_i32(dot[2], dot[3]));
            } else {
                sums[r] = type == T_Q4_0 ? dot_us_n(zero_i32(), vals, xv, 8) /* 4-bit values: 8 pairs fit 16 bits */
                                         : dot_us_n(dot_us_n(zero_i32(), vals, xv, 4), vals + 4, xv + 4, 4);
            }
        }
        for (int r = 0; r < M; r++) {
            const int64_t at = (m0 + r) * nb32 + b;
            const vi32 sum = sums[r];
            acc[r] = fmadd_f(cvt_f(sum), mul_f(d, set1_f(a->d[at])), acc[r]);
            if (type != T_Q8_0) off[r] = fmadd_f(d, set1_f(a->s[at]), off[r]);
        }
    }
    const vf zp = set1_f(type == T_Q4_0 ? 8.0f : type == T_Q5_0 ? 16.0f : 0.0f);
    for (int r = 0; r < M; r++) store_f(y + r * stride, fnmadd_f(zp, off[r], acc[r]));
}

INLINE void group_kernel(int type, const uint8_t *w, const acts *a, int64_t m0, const int M, float *y,
                         int64_t stride) {
    switch (type) {
    case T_Q4_0: group_x8(T_Q4_0, w, a, m0, M, y, stride); break;
    case T_Q5_0: group_x8(T_Q5_0, w, a, m0, M, y, stride); break;
    case T_Q8_0: group_x8(T_Q8_0, w, a, m0, M, y, stride); break;
    }
}

OVER_ROWS(group_dot, group_kernel)

OVER_ROWS(row_dot, row_kernel)

/* ---- y = x W^T over weights given in parts (fused q/k/v, gate/up: each part its own type) --------------- */

/* x [m, k] float32; parts' rows stacked make W [n, k]; y [m, n] float32. */
int qk_matmul(const qk_part *parts, int n_parts, const float *x, int64_t m, int64_t k, float *y, int n_threads) {
    int64_t n = 0;
    for (int p = 0; p < n_parts; p++) {
        const int type = (int)parts[p].type, be = block_elements(type);
        if (!be || ((type & X8) && !interleavable(type & ~X8))) return QK_BAD_TYPE;
        if (k <= 0 || k % be || parts[p].rows < 0 || ((type & X8) && parts[p].rows % 8)) return QK_BAD_SHAPE;
        n += parts[p].rows;
    }
    if (m <= 0 || n == 0) return QK_OK;
    int8_t *q = malloc((size_t)(m * k));
    float *f = malloc(sizeof(float) * (size_t)(m * (k / 32) * 4));
    if (!q || !f) {
        free(q);
        free(f);
        return QK_NO_MEMORY;
    }
    acts a = {k, q, f, f + m * (k / 32), f + 2 * m * (k / 32)};
    for (int64_t r = 0; r < m; r++)
        quantize_row(x + r * k, k, q + r * k, f + r * (k / 32), f + m * (k / 32) + r * (k / 32),
                     f + 2 * m * (k / 32) + r * (k / 16));
    if (n_threads < 1 || m * n * k < SMALL_WORK) n_threads = 1; /* waking a second thread costs more than it saves */
    if (n_threads > n) n_threads = (int)n;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t first = n * t / nt, last = n * (t + 1) / nt; /* this thread's rows of W */
        int64_t base = 0;
        for (int p = 0; p < n_parts; p++) {
            const int64_t end = base + parts[p].rows;
            const int64_t lo = first > base ? first : base, hi = last < end ? last : end;
            const int type = (int)parts[p].type;
            const int64_t row_bytes = k / block_elements(type) * block_bytes(type);
            if (type & X8) { /* whole groups of 8, each computed by the thread that holds its first row */
                for (int64_t row = lo + (8 - (lo - base) % 8) % 8; row < hi; row += 8)
                    group_dot(type & ~X8, parts[p].w + (row - base) * row_bytes, &a, m, y + row, n);
                base += parts[p].rows;
                continue;
            }
            for (int64_t row = lo; row < hi; row++)
                row_dot(type, parts[p].w + (row - base) * row_bytes, &a, m, y + row, n);
            base += parts[p].rows;
        }
    }
    free(q);
    free(f);
    return QK_OK;
}

/* Which variant of simd.h this library was built as. */
const char *qk_variant(void) { return QK_VARIANT; }
