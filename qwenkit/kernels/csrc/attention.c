/* Attention of new tokens over their sequence's KV cache, keys and values in float32 or float16.
 *
 * Each query row is computed alone, over exactly the keys it may see (causal, optionally a sliding window), in
 * the same order whatever else is in the call: a token's attention is bit-identical whether it comes in a prompt
 * chunk of 40 rows, after a prefix-cache hit as a chunk of 1, or as a decode step. That is what lets the same seed
 * give the same text when a prompt's keys come from the prefix cache. (SDPA for the chunk and a separate decode
 * kernel differ in the last bits, which 8-bit activation rounding downstream can turn into another sampled token.)
 *
 * Built in every variant of simd.h (qwenkit.kernels.build); sums run in other orders on different variants, so
 * results agree across CPUs within float32 rounding, not bit for bit (the block matmuls do agree bit for bit).
 *
 * One task per (query row, key/value head): its keys are read once for all the query heads that share them
 * (grouped-query attention), then its values once per block of up to four heads. Softmax in float32 with a
 * vectorised exp. The paged pool is read where it lies, each key through its slot, so nothing is gathered,
 * copied or converted.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "simd.h"

/* AVX-512 where the variant has it; 8 lanes of simd.h on the AVX2, AVX-VNNI and NEON variants; plain C otherwise. */
#if defined(__AVX512F__) && defined(__F16C__)
#define QK_AVX512 1
#else
#define QK_AVX512 0
#endif
#if !QK_AVX512 && !defined(QK_REFERENCE)
#define QK_VEC8 1
#else
#define QK_VEC8 0
#endif

#if QK_AVX512
INLINE __m512 load16(const void *p, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}
#endif

INLINE float element(const void *p, int64_t i, int half) {
    return half ? half_bits_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* One query row's G heads against its n keys: q and out heads `hs` floats apart; key (and value) t sits in pool
 * slot slot[t]: block slot >> shift, position slot & mask within it (k and v point at this task's head of block 0,
 * blocks `bstride` elements apart, a block's positions D apart); s a G * n scratch. Every sum runs in an order fixed
 * by n alone. */
typedef struct {
    const float *q;
    float *out;
    const char *k, *v;
    const int64_t *slot;
    float *s;
    int64_t hs, bstride, shift, mask, G, D, n;
    float scale;
} RowTask;

/* Byte offset of key (or value) t in the pool, relative to the task's head. */
#define AT(a, t, esize) \
    ((((a)->slot[t] >> (a)->shift) * (a)->bstride + ((a)->slot[t] & (a)->mask) * (a)->D) * (esize))

INLINE void softmax_rows(const RowTask *a) {
    for (int64_t g = 0; g < a->G; g++) { /* normalised in place */
        float *sg = a->s + g * a->n, mx = -INFINITY, sum = 0.0f;
        const int64_t n = a->n;
        for (int64_t t = 0; t < n; t++) mx = sg[t] > mx ? sg[t] : mx;
        int64_t t = 0;
#if !defined(QK_REFERENCE) /* 8 lanes of simd.h on every vector variant: the exps are a small part of the work */
        vf vsum = zero_f();
        for (; t + 8 <= n; t += 8) {
            const vf e = exp_f(sub_f(load_f(sg + t), set1_f(mx)));
            store_f(sg + t, e);
            vsum = add_f(vsum, e);
        }
        sum = hsum_f(vsum);
#endif
        for (; t < n; t++) {
            sg[t] = expf(sg[t] - mx);
            sum += sg[t];
        }
        const float inv = 1.0f / sum;
        for (t = 0; t < n; t++) sg[t] *= inv;
    }
}

static void row_portable(const RowTask *a, int half) {
    const int64_t G = a->G, D = a->D, n = a->n, esize = half ? 2 : 4;
    for (int64_t t = 0; t < n; t++) {
        const char *kt = a->k + AT(a, t, esize);
        for (int64_t g = 0; g < G; g++) {
            float dot = 0.0f;
            for (int64_t j = 0; j < D; j++) dot += a->q[g * a->hs + j] * element(kt, j, half);
            a->s[g * n + t] = dot * a->scale;
        }
    }
    softmax_rows(a);
    for (int64_t g = 0; g < G; g++) memset(a->out + g * a->hs, 0, sizeof(float) * (size_t)D);
    for (int64_t t = 0; t < n; t++) {
        const char *vt = a->v + AT(a, t, esize);
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < D; j++) a->out[g * a->hs + j] += a->s[g * n + t] * element(vt, j, half);
    }
}

#if QK_AVX512
#define AHEAD 32 /* keys (or values) ahead that the loops prefetch */

/* Sixteen vectors -> one: lane i is the sum of a[i]'s lanes (a transpose folded into the additions). */
INLINE __m512 reduce16(const __m512 *a) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++)
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d p = _mm512_castps_pd(x[2 * i]), q = _mm512_castps_pd(x[2 * i + 1]);
        y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    for (int i = 0; i < 2; i++)
        z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* nb heads' weighted sums of the values over lanes [j, j + 16 * nj), accumulated in registers over all n keys.
 * With nj * 16 = D each value row is read whole, in order: the cache streams from memory as it was written. */
INLINE void weigh_values(const RowTask *a, int half, int64_t g, int64_t j, const int nb, const int nj) {
    const int64_t esize = half ? 2 : 4;
    __m512 acc[16];
    for (int i = 0; i < nb * nj; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < a->n; t++) {
        const char *vt = a->v + AT(a, t, esize) + j * esize;
        if (g == 0 && t + AHEAD < a->n)
            for (int64_t at = 0; at < 16 * nj * esize; at += 64)
                _mm_prefetch(a->v + AT(a, t + AHEAD, esize) + j * esize + at, _MM_HINT_T0);
        for (int c = 0; c < nj; c++) {
            const __m512 vv = load16(vt + 16 * c * esize, half);
            for (int i = 0; i < nb; i++)
                acc[i * nj + c] = _mm512_fmadd_ps(_mm512_set1_ps(a->s[(g + i) * a->n + t]), vv, acc[i * nj + c]);
        }
    }
    for (int i = 0; i < nb; i++)
        for (int c = 0; c < nj; c++) _mm512_storeu_ps(a->out + (g + i) * a->hs + j + 16 * c, acc[i * nj + c]);
}

/* D a multiple of 16. Scores sixteen keys at a time (one reduction for all sixteen), values with the heads'
 * accumulators held in registers. */
INLINE void row_avx512(const RowTask *a, const int half) {
    const int64_t G = a->G, D = a->D, n = a->n, esize = half ? 2 : 4;
    const __m512 vscale = _mm512_set1_ps(a->scale);
    for (int64_t g = 0; g < G; g++) {
        const float *qh = a->q + g * a->hs;
        float *sg = a->s + g * n;
        int64_t t = 0;
        for (; t + 16 <= n; t += 16) {
            if (g == 0) /* the cache is cold (every layer's comes by once per token): ask for keys ahead */
                for (int64_t i = 0; i < 16 && t + AHEAD + i < n; i++)
                    for (int64_t at = 0; at < D * esize; at += 64)
                        _mm_prefetch(a->k + AT(a, t + AHEAD + i, esize) + at, _MM_HINT_T0);
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < D; j += 16) {
                const __m512 qj = _mm512_loadu_ps(qh + j);
                for (int i = 0; i < 16; i++)
                    acc[i] = _mm512_fmadd_ps(qj, load16(a->k + AT(a, t + i, esize) + j * esize, half), acc[i]);
            }
            _mm512_storeu_ps(sg + t, _mm512_mul_ps(reduce16(acc), vscale));
        }
        for (; t < n; t++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < D; j += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + j), load16(a->k + AT(a, t, esize) + j * esize, half), acc);
            sg[t] = _mm512_reduce_add_ps(acc) * a->scale;
        }
    }
    softmax_rows(a);
    int64_t g = 0; /* at most 16 accumulators: heads in blocks of 16 / (D / 16) where D is 64 or 128 */
    if (D == 64) {
        for (; g + 4 <= G; g += 4) weigh_values(a, half, g, 0, 4, 4);
        for (; g + 2 <= G; g += 2) weigh_values(a, half, g, 0, 2, 4);
        for (; g < G; g++) weigh_values(a, half, g, 0, 1, 4);
    } else if (D == 128) {
        for (; g + 2 <= G; g += 2) weigh_values(a, half, g, 0, 2, 8);
        for (; g < G; g++) weigh_values(a, half, g, 0, 1, 8);
    } else {
        for (int64_t j = 0; j < D; j += 16) {
            for (g = 0; g + 4 <= G; g += 4) weigh_values(a, half, g, j, 4, 1);
            for (; g < G; g++) weigh_values(a, half, g, j, 1, 1);
        }
    }
}
#endif

#if QK_VEC8
INLINE vf load8(const void *p, int half) { return half ? load_h8(p) : load_f((const float *)p); }

/* Ask for the cache line at p ahead of its use (the keys and values of one layer come from memory once per token,
 * through slots, where the hardware prefetcher loses the stream at every block). */
INLINE void prefetch(const void *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#endif
}
#define AHEAD8 16 /* keys (or values) ahead that the loops below ask for */

/* Scores of NH heads (g, g + 1, ...) against keys t..t+3: each key vector is loaded (and converted from fp16) once
 * for the NH heads, four keys x NH heads of independent multiply-add chains. */
INLINE void scores_4keys(const RowTask *a, const int half, int64_t g, const int NH, int64_t t) {
    const int64_t esize = half ? 2 : 4;
    vf acc[2][4];
    for (int h = 0; h < NH; h++)
        for (int i = 0; i < 4; i++) acc[h][i] = zero_f();
    for (int64_t j = 0; j < a->D; j += 8) {
        vf qj[2];
        for (int h = 0; h < NH; h++) qj[h] = load_f(a->q + (g + h) * a->hs + j);
        for (int i = 0; i < 4; i++) {
            const vf kv = load8(a->k + AT(a, t + i, esize) + j * esize, half);
            for (int h = 0; h < NH; h++) acc[h][i] = fmadd_f(qj[h], kv, acc[h][i]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int i = 0; i < 4; i++) a->s[(g + h) * a->n + t + i] = hsum_f(acc[h][i]) * a->scale;
}

/* Weighted values of NH heads over columns [j0, j0 + 8 * NC): each value vector loaded once for the NH heads. */
INLINE void values_cols(const RowTask *a, const int half, int64_t g, const int NH, int64_t j0, const int NC) {
    const int64_t esize = half ? 2 : 4, n = a->n;
    vf acc[2][4];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++) acc[h][c] = zero_f();
    for (int64_t t = 0; t < n; t++) {
        const char *vt = a->v + AT(a, t, esize) + j0 * esize;
        if (g == 0 && j0 == 0 && t + AHEAD8 < n) /* the whole row: the later column blocks then find it in cache */
            for (int64_t at = 0; at < a->D * esize; at += 64) prefetch(a->v + AT(a, t + AHEAD8, esize) + at);
        vf p[2];
        for (int h = 0; h < NH; h++) p[h] = set1_f(a->s[(g + h) * n + t]);
        for (int c = 0; c < NC; c++) {
            const vf vv = load8(vt + 8 * c * esize, half);
            for (int h = 0; h < NH; h++) acc[h][c] = fmadd_f(p[h], vv, acc[h][c]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++) store_f(a->out + (g + h) * a->hs + j0 + 8 * c, acc[h][c]);
}

/* D a multiple of 8. The query heads that share a key/value head go through in pairs: every key and value
 * vector is read and converted once per pair, not once per head. Each score and each output lane is one chain
 * whose order depends on D and n alone. */
INLINE void row_vec8(const RowTask *a, const int half) {
    const int64_t G = a->G, D = a->D, n = a->n, esize = half ? 2 : 4;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        if (t + AHEAD8 < n)
            for (int i = 0; i < 4; i++)
                for (int64_t at = 0; at < D * esize; at += 64) prefetch(a->k + AT(a, t + AHEAD8 + i, esize) + at);
        int64_t g = 0;
        for (; g + 2 <= G; g += 2) scores_4keys(a, half, g, 2, t);
        if (g < G) scores_4keys(a, half, g, 1, t);
    }
    for (; t < n; t++) /* the last keys one by one */
        for (int64_t g = 0; g < G; g++) {
            vf acc = zero_f();
            for (int64_t j = 0; j < D; j += 8)
                acc = fmadd_f(load_f(a->q + g * a->hs + j), load8(a->k + AT(a, t, esize) + j * esize, half), acc);
            a->s[g * n + t] = hsum_f(acc) * a->scale;
        }
    softmax_rows(a);
    for (int64_t j0 = 0; j0 < D;) { /* columns 32 at a time (a 64-byte line of fp16 values), then 8 */
        const int nc = D - j0 >= 32 ? 4 : 1;
        int64_t g = 0;
        for (; g + 2 <= G; g += 2) nc == 4 ? values_cols(a, half, g, 2, j0, 4) : values_cols(a, half, g, 2, j0, 1);
        if (g < G) nc == 4 ? values_cols(a, half, g, 1, j0, 4) : values_cols(a, half, g, 1, j0, 1);
        j0 += 8 * nc;
    }
}
#endif

/* RMSNorm of one row of `dim`: out = (x * (1 / sqrt(mean(x^2) + eps))) * w. */
static void rms_row(const float *x, const float *w, int64_t dim, float eps, float *out) {
    float ss = 0.0f;
    int64_t j = 0;
#if QK_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= dim; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + j);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
#elif QK_VEC8
    vf acc = zero_f();
    for (; j + 8 <= dim; j += 8) {
        const vf v = load_f(x + j);
        acc = fmadd_f(v, v, acc);
    }
    ss = hsum_f(acc);
#endif
    for (; j < dim; j++) ss += x[j] * x[j];
    const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (j = 0; j < dim; j++) out[j] = (x[j] * scale) * w[j];
}

/* One head's vector of D: RMSNorm with weight w (when given: Qwen3's q_norm/k_norm), then rotate-half RoPE with
 * cos/sin, each operation rounded as PyTorch's own ops round it (-ffp-contract=off keeps them apart). */
static void norm_rope(const float *x, const float *w, float eps, const float *cos, const float *sin, int64_t D,
                      float *y) {
    float n[512];
    const int64_t half = D / 2;
    if (w) {
        rms_row(x, w, D, eps, n);
    } else {
        memcpy(n, x, sizeof(float) * (size_t)D);
    }
    for (int64_t j = 0; j < D; j++) {
        const float rotated = j < half ? -n[j + half] : n[j - half];
        y[j] = n[j] * cos[j] + rotated * sin[j];
    }
}

INLINE void store_row(void *dst, const float *x, int64_t D, int half) {
    if (half)
        for (int64_t j = 0; j < D; j++) ((uint16_t *)dst)[j] = float_to_half_bits(x[j]);
    else
        memcpy(dst, x, sizeof(float) * (size_t)D);
}

/* The attention of N new tokens after their q/k/v projection, over a paged KV pool, in one call.
 *
 * Row n's q heads are at q + n * qs (H heads of D floats), its k and v heads at k + n * ks and v + n * vs (KV heads
 * each): views of one fused q/k/v projection or three separate ones. For every row: Qwen3's q/k RMSNorm where the
 * norm weights are given, rotate-half RoPE with cos, sin [N, D], then its key and value are stored (float16 or
 * float32) in pool slot write_slot[n]. The pools are [n_blocks, KV, 1 << block_shift, D] contiguous, slot s in
 * block s >> block_shift: one block holds every head's keys of its tokens, and a sequence's blocks, handed out in
 * order, make one run of memory (a pool laid out [KV, slots, D] spreads each step's reads over KV far-apart
 * places, which cost a third more time once the cache is cold). Once every row is stored, row n
 * attends over keys ctx[row_ctx[n] + t] for t < row_len[n] (its sequence's slots in position order, itself last),
 * only the last `window` of them when window > 0: out [N, H * D] float32.
 *
 * Each row is computed alone, in an order fixed by its own key count (see the top of this file), so a sequence's
 * numbers do not depend on what else shares the call. */
int qk_paged_attention(const float *q, int64_t qs, const float *k, int64_t ks, const float *v, int64_t vs,
                       int64_t N, int64_t H, int64_t KV, int64_t D, const float *q_norm, const float *k_norm,
                       float eps, const float *cos, const float *sin, void *k_pool, void *v_pool, int half,
                       int64_t n_blocks, int64_t block_shift, const int64_t *write_slot, const int64_t *ctx,
                       const int64_t *row_ctx, const int64_t *row_len, int64_t window, float scale, float *out,
                       int n_threads) {
    if (N <= 0 || KV <= 0 || H % KV || D <= 0 || D > 512 || D % 2 || window < 0 || n_blocks < 0 ||
        block_shift < 0 || block_shift > 16)
        return 2;
    const int64_t n_slots = n_blocks << block_shift, bs = (int64_t)1 << block_shift;
    for (int64_t n = 0; n < N; n++)
        if (write_slot[n] < 0 || write_slot[n] >= n_slots || row_len[n] <= 0) return 4;
    const int64_t G = H / KV, esize = half ? 2 : 4, bstride = KV * bs * D; /* elements from block to block */
    float *qr = malloc(sizeof(float) * (size_t)(N * H * D)); /* normed, rotated queries [N, H, D] */
    if (!qr) return 3;
    int64_t work = 0; /* multiply-adds of the scores and the weighted values */
    for (int64_t n = 0; n < N; n++) work += 2 * row_len[n] * H * D;
    if (n_threads < 1 || 4 * work < SMALL_WORK) n_threads = 1; /* float multiply-adds: four times an int8 one */
    int failed = 0;
    /* One parallel region, two loops: every row's key and value are stored (the barrier between the loops)
     * before any row attends. */
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * (H + KV); task++) {
            const int64_t n = task / (H + KV), head = task % (H + KV);
            const float *c = cos + n * D, *s = sin + n * D;
            if (head < H) {
                norm_rope(q + n * qs + head * D, q_norm, eps, c, s, D, qr + (n * H + head) * D);
            } else {
                const int64_t j = head - H, slot = write_slot[n];
                const int64_t at = ((slot >> block_shift) * bstride + (j * bs + (slot & (bs - 1))) * D) * esize;
                float key[512];
                norm_rope(k + n * ks + j * D, k_norm, eps, c, s, D, key);
                store_row((char *)k_pool + at, key, D, half);
                store_row((char *)v_pool + at, v + n * vs + j * D, D, half);
            }
        }
#pragma omp for schedule(static) reduction(| : failed)
        for (int64_t task = 0; task < N * KV; task++) {
            const int64_t n = task / KV, kvh = task % KV, hi = row_len[n];
            const int64_t lo = window > 0 && hi > window ? hi - window : 0, at = (n * H + kvh * G) * D;
            RowTask a = {qr + at, out + at, (const char *)k_pool + kvh * bs * D * esize,
                         (const char *)v_pool + kvh * bs * D * esize, ctx + row_ctx[n] + lo, NULL, D, bstride,
                         block_shift, bs - 1, G, D, hi - lo, scale};
            int bad = 0;
            for (int64_t t = 0; t < a.n; t++) bad |= a.slot[t] < 0 || a.slot[t] >= n_slots;
            a.s = bad ? NULL : malloc(sizeof(float) * (size_t)(G * a.n));
            if (!a.s) {
                failed |= bad ? 4 : 3;
                continue;
            }
#if QK_AVX512
            if (D % 16 == 0) {
                if (half)
                    row_avx512(&a, 1);
                else
                    row_avx512(&a, 0);
            } else
#elif QK_VEC8
            if (D % 8 == 0) {
                if (half)
                    row_vec8(&a, 1);
                else
                    row_vec8(&a, 0);
            } else
#endif
                row_portable(&a, half);
            free(a.s);
        }
    }
    free(qr);
    return failed & 4 ? 4 : failed ? 3 : 0;
}

/* RMSNorm of `rows` rows of `dim` (rms_row), each row alone: the hidden-state norms, one thread (a row of ~1000
 * values is less work than waking a second; PyTorch's fused op costs several times more per decode-step call). */
int qk_rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps, float *out) {
    if (rows < 0 || dim <= 0) return 2;
    for (int64_t r = 0; r < rows; r++) rms_row(x + r * dim, w, dim, eps, out + r * dim);
    return 0;
}
