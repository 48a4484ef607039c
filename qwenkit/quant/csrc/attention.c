/* Attention of one new token per sequence over its KV cache (decode), keys and values in float32 or float16.
 *
 * One task per (sequence, key/value head): its keys are read once for all the query heads that share them
 * (grouped-query attention), then its values once. Softmax in float32 with a vectorised exp. The cache is read
 * where it lies (any batch/head/position strides, contiguous head_dim), so nothing is copied or converted first:
 * in PyTorch the same step was two batched matmuls plus softmax and casts, several passes over the scores.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define QK_AVX512 1
#else
#define QK_AVX512 0
#endif

#if QK_AVX512
INLINE __m512 load16(const void *p, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}

/* exp(x) for x <= 0 (scores minus their maximum): 2^n * p(f), |relative error| < 2e-7. */
INLINE __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

INLINE float element(const void *p, int64_t i, int half) {
    return half ? half_bits_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* q [B, H, D] and out [B, H, D] contiguous float32; k and v [B, KV, *, D] with element strides sb, sh, st. */
int qk_attend(const float *q, int64_t B, int64_t H, int64_t KV, int64_t D, const void *k, const void *v, int half,
              int64_t sb, int64_t sh, int64_t st, int64_t L, float scale, float *out, int n_threads) {
    if (B <= 0 || KV <= 0 || H % KV || D <= 0 || L <= 0) return 2;
    const int64_t G = H / KV, esize = half ? 2 : 4;
    const int vector = QK_AVX512 && D % 16 == 0;
    (void)vector; /* portable builds: unused */
    int failed = 0;
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : failed)
    for (int64_t task = 0; task < B * KV; task++) {
        const int64_t b = task / KV, kvh = task % KV;
        const char *kb = (const char *)k + (b * sb + kvh * sh) * esize, *vb = (const char *)v + (b * sb + kvh * sh) * esize;
        const float *qg = q + (b * H + kvh * G) * D;
        float *og = out + (b * H + kvh * G) * D;
        float *s = malloc(sizeof(float) * (size_t)(G * L));
        if (!s) {
            failed = 1;
            continue;
        }
        for (int64_t t = 0; t < L; t++) { /* scores: each key against the G query heads */
            const char *kt = kb + t * st * esize;
            for (int64_t g = 0; g < G; g++) {
                float dot = 0.0f;
#if QK_AVX512
                if (vector) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t j = 0; j < D; j += 16)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + g * D + j), load16(kt + j * esize, half), acc);
                    dot = _mm512_reduce_add_ps(acc);
                } else
#endif
                    for (int64_t j = 0; j < D; j++) dot += qg[g * D + j] * element(kt, j, half);
                s[g * L + t] = dot * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) { /* softmax, normalised at the end */
            float *sg = s + g * L, mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < L; t++) mx = sg[t] > mx ? sg[t] : mx;
            int64_t t = 0;
#if QK_AVX512
            __m512 vsum = _mm512_setzero_ps();
            for (; t + 16 <= L; t += 16) {
                const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), _mm512_set1_ps(mx)));
                _mm512_storeu_ps(sg + t, e);
                vsum = _mm512_add_ps(vsum, e);
            }
            sum = _mm512_reduce_add_ps(vsum);
#endif
            for (; t < L; t++) {
                sg[t] = expf(sg[t] - mx);
                sum += sg[t];
            }
            const float inv = 1.0f / sum;
            for (t = 0; t < L; t++) sg[t] *= inv;
            memset(og + g * D, 0, sizeof(float) * (size_t)D);
        }
        for (int64_t t = 0; t < L; t++) { /* weighted sum of the values */
            const char *vt = vb + t * st * esize;
#if QK_AVX512
            if (vector) {
                for (int64_t j = 0; j < D; j += 16) {
                    const __m512 vv = load16(vt + j * esize, half);
                    for (int64_t g = 0; g < G; g++)
                        _mm512_storeu_ps(og + g * D + j, _mm512_fmadd_ps(_mm512_set1_ps(s[g * L + t]), vv,
                                                                         _mm512_loadu_ps(og + g * D + j)));
                }
                continue;
            }
#endif
            for (int64_t g = 0; g < G; g++)
                for (int64_t j = 0; j < D; j++) og[g * D + j] += s[g * L + t] * element(vt, j, half);
        }
        free(s);
    }
    return failed ? 3 : 0;
}
