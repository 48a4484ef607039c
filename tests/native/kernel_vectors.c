/* The kernels of every variant on the same reference vectors: this program generates its inputs from a fixed seed
 * (its own PRNG, so every machine draws the same numbers), runs the block matmuls (plain and 8-row interleaved
 * layouts), dequantization, paged attention and RMSNorm of the variant it was compiled as, and prints each result
 * as hex bits, one case per line: "<kind> <case> <variant> <hex>...". tests/unit/test_kernel_variants.py builds it
 * for the reference and for each variant (the Arm one with Debian's cross compiler, run under qemu-user) and
 * compares: block matmuls and dequantization bit for bit, attention and norms within a float32 bound.
 *
 * Built with the kernel sources (the .c files of csrc) and without OpenMP: one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "simd.h"

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint64_t next(void) { /* xorshift64* */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) / 16777216.0); }

static void print(const char *kind, const char *name, const void *data, size_t n) {
    printf("%s %s %s", kind, name, QK_VARIANT);
    for (size_t i = 0; i < n; i++) printf(" %08x", ((const uint32_t *)data)[i]);
    printf("\n");
}

static const struct { int type, per_block, bytes, halves[2]; } TYPES[] = {
    {2, 32, 18, {0, -1}}, {6, 32, 22, {0, -1}}, {8, 32, 34, {0, -1}},
    {12, 256, 144, {0, 2}}, {13, 256, 176, {0, 2}}, {14, 256, 210, {208, -1}},
};

static uint8_t *random_blocks(int t, int64_t n, int64_t k) {
    const int64_t nb = k / TYPES[t].per_block, bytes = n * nb * TYPES[t].bytes;
    uint8_t *w = malloc((size_t)bytes);
    for (int64_t i = 0; i < bytes; i++) w[i] = (uint8_t)next();
    for (int64_t b = 0; b < n * nb; b++)
        for (int h = 0; h < 2; h++)
            if (TYPES[t].halves[h] >= 0) {
                const uint16_t d = float_to_half_bits(uniform(-0.02f, 0.02f));
                memcpy(w + b * TYPES[t].bytes + TYPES[t].halves[h], &d, 2);
            }
    return w;
}

static int matmul_cases(void) {
    static const int64_t shapes[][3] = {{8, 256, 1}, {13, 512, 3}, {37, 768, 5}, {16, 256, 4}, {45, 512, 2}};
    int cases = 0;
    char name[64];
    for (int t = 0; t < 6; t++)
        for (int s = 0; s < 5; s++) {
            const int64_t n = shapes[s][0], k = shapes[s][1], m = shapes[s][2];
            uint8_t *w = random_blocks(t, n, k);
            float *x = malloc(sizeof(float) * (size_t)(m * k)), *y = malloc(sizeof(float) * (size_t)(m * n));
            for (int64_t i = 0; i < m * k; i++) x[i] = uniform(-3.0f, 3.0f) * (0.1f + (float)(i % k) / (float)k);
            qk_part part = {w, TYPES[t].type, n};
            snprintf(name, sizeof name, "t%d-n%lld-k%lld-m%lld", TYPES[t].type, (long long)n, (long long)k,
                     (long long)m);
            if (qk_matmul(&part, 1, x, m, k, y, 1)) return -1;
            print("matmul", name, y, (size_t)(m * n));
            cases++;
            if (TYPES[t].type == 2 || TYPES[t].type == 6 || TYPES[t].type == 8) { /* the 8-row interleaved layout */
                const int64_t row_bytes = k / 32 * TYPES[t].bytes, n8 = n - n % 8;
                uint8_t *packed = malloc((size_t)(n * row_bytes));
                if (qk_repack(w, TYPES[t].type, n, k, packed)) return -1;
                qk_part parts[2] = {{packed, TYPES[t].type | 256, n8},
                                    {packed + n8 * row_bytes, TYPES[t].type, n - n8}};
                if (qk_matmul(parts, n8 < n ? 2 : 1, x, m, k, y, 1)) return -1;
                print("matmul_x8", name, y, (size_t)(m * n));
                float *d = malloc(sizeof(float) * (size_t)(n8 * k));
                if (n8 && qk_dequantize(packed, TYPES[t].type | 256, n8, k, NULL, 0, d, 0, 1)) return -1;
                print("dequantize_x8", name, d, (size_t)(n8 * k));
                free(d);
                free(packed);
                cases += 2;
            }
            float *d = malloc(sizeof(float) * (size_t)(n * k));
            if (qk_dequantize(w, TYPES[t].type, n, k, NULL, 0, d, 0, 1)) return -1;
            print("dequantize", name, d, (size_t)(n * k));
            cases++;
            free(d);
            free(w);
            free(x);
            free(y);
        }
    return cases;
}

static int attention_cases(void) {
    /* heads, kv heads, head dim, new rows, context, window, fp16 pool, q/k norms */
    static const int64_t shapes[][8] = {
        {14, 2, 64, 1, 40, 0, 1, 0}, {14, 2, 64, 5, 63, 0, 0, 0}, {8, 4, 128, 3, 50, 0, 1, 1},
        {4, 1, 80, 2, 30, 16, 1, 1}, {16, 8, 64, 1, 7, 0, 0, 1}, {6, 2, 128, 4, 64, 20, 0, 0},
    };
    int cases = 0;
    char name[64];
    for (int c = 0; c < 6; c++) {
        const int64_t H = shapes[c][0], KV = shapes[c][1], D = shapes[c][2], N = shapes[c][3], L = shapes[c][4];
        const int64_t window = shapes[c][5], half = shapes[c][6], norms = shapes[c][7], slots = 64; /* blocks of 4 */
        const int64_t esize = half ? 2 : 4;
        float *q = malloc(sizeof(float) * (size_t)(N * H * D)), *k = malloc(sizeof(float) * (size_t)(N * KV * D));
        float *v = malloc(sizeof(float) * (size_t)(N * KV * D)), *cs = malloc(sizeof(float) * (size_t)(N * D));
        float *sn = malloc(sizeof(float) * (size_t)(N * D)), *qn = malloc(sizeof(float) * (size_t)D);
        float *kn = malloc(sizeof(float) * (size_t)D), *out = malloc(sizeof(float) * (size_t)(N * H * D));
        char *kp = malloc((size_t)(KV * slots * D * esize)), *vp = malloc((size_t)(KV * slots * D * esize));
        int64_t ctx[64], write[8], starts[8], lens[8];
        for (int64_t i = 0; i < N * H * D; i++) q[i] = uniform(-2.0f, 2.0f);
        for (int64_t i = 0; i < N * KV * D; i++) k[i] = uniform(-2.0f, 2.0f), v[i] = uniform(-1.0f, 1.0f);
        for (int64_t i = 0; i < N * D; i++) {
            const float angle = uniform(-3.1f, 3.1f);
            cs[i] = cosf(angle), sn[i] = sinf(angle);
        }
        for (int64_t i = 0; i < D; i++) qn[i] = uniform(0.5f, 1.5f), kn[i] = uniform(0.5f, 1.5f);
        for (int64_t i = 0; i < KV * slots * D; i++) {
            const float a = uniform(-2.0f, 2.0f), b = uniform(-1.0f, 1.0f);
            if (half) {
                ((uint16_t *)kp)[i] = float_to_half_bits(a), ((uint16_t *)vp)[i] = float_to_half_bits(b);
            } else {
                ((float *)kp)[i] = a, ((float *)vp)[i] = b;
            }
        }
        for (int64_t i = 0; i < slots; i++) ctx[i] = i;
        for (int64_t i = slots - 1; i > 0; i--) { /* the sequence's slots in a shuffled order, as a pool gives them */
            const int64_t j = (int64_t)(next() % (uint64_t)(i + 1)), t = ctx[i];
            ctx[i] = ctx[j], ctx[j] = t;
        }
        for (int64_t n = 0; n < N; n++) write[n] = ctx[L - N + n], starts[n] = 0, lens[n] = L - N + n + 1;
        if (qk_paged_attention(q, H * D, k, KV * D, v, KV * D, N, H, KV, D, norms ? qn : NULL, norms ? kn : NULL,
                               1e-6f, cs, sn, kp, vp, (int)half, slots / 4, 2, write, ctx, starts, lens, window,
                               1.0f / sqrtf((float)D), out, 1))
            return -1;
        snprintf(name, sizeof name, "h%lld-kv%lld-d%lld-n%lld-l%lld-w%lld-%s%s", (long long)H, (long long)KV,
                 (long long)D, (long long)N, (long long)L, (long long)window, half ? "f16" : "f32",
                 norms ? "-norms" : "");
        print("attention", name, out, (size_t)(N * H * D));
        cases++;
        free(q), free(k), free(v), free(cs), free(sn), free(qn), free(kn), free(out), free(kp), free(vp);
    }
    return cases;
}

static int norm_cases(void) {
    static const int64_t shapes[][2] = {{1, 896}, {3, 1024}, {2, 100}, {4, 64}};
    char name[64];
    for (int c = 0; c < 4; c++) {
        const int64_t rows = shapes[c][0], dim = shapes[c][1];
        float *x = malloc(sizeof(float) * (size_t)(rows * dim)), *w = malloc(sizeof(float) * (size_t)dim);
        float *out = malloc(sizeof(float) * (size_t)(rows * dim));
        for (int64_t i = 0; i < rows * dim; i++) x[i] = uniform(-4.0f, 4.0f);
        for (int64_t i = 0; i < dim; i++) w[i] = uniform(0.0f, 2.0f);
        if (qk_rms_norm(x, rows, dim, w, 1e-6f, out)) return -1;
        snprintf(name, sizeof name, "r%lld-d%lld", (long long)rows, (long long)dim);
        print("rms_norm", name, out, (size_t)(rows * dim));
        free(x), free(w), free(out);
    }
    return 4;
}

int main(void) {
    const int a = matmul_cases(), b = attention_cases(), c = norm_cases();
    if (a < 0 || b < 0 || c < 0) {
        fprintf(stderr, "a kernel returned an error\n");
        return 1;
    }
    fprintf(stderr, "%s: %d block cases, %d attention cases, %d norm cases\n", QK_VARIANT, a, b, c);
    return 0;
}
