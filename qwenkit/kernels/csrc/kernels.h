/* The library's entry points, for the sources that call each other and for tests/native/kernel_vectors.c
 * (qwenkit.kernels.library declares them to ctypes). */
#ifndef QWENKIT_KERNELS_H
#define QWENKIT_KERNELS_H

#include <stdint.h>

/* One stacked part of a block matmul's weight: `rows` rows of ggml block `type` (| 256: interleaved by 8). */
typedef struct {
    const uint8_t *w;
    int64_t type;
    int64_t rows;
} qk_part;

int qk_matmul(const qk_part *parts, int n_parts, const float *x, int64_t m, int64_t k, float *y, int n_threads);
int qk_paged_attention(const float *q, int64_t qs, const float *k, int64_t ks, const float *v, int64_t vs,
                       int64_t N, int64_t H, int64_t KV, int64_t D, const float *q_norm, const float *k_norm,
                       float eps, const float *cos, const float *sin, void *k_pool, void *v_pool, int half,
                       int64_t n_blocks, int64_t block_shift, const int64_t *write_slot, const int64_t *ctx,
                       const int64_t *row_ctx, const int64_t *row_len, int64_t window, float scale, float *out,
                       int n_threads);
int qk_rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps, float *out);
int qk_dequantize(const uint8_t *w, int type, int64_t n, int64_t k, const int64_t *ids, int64_t n_ids, void *out,
                  int bf16, int n_threads);
int qk_repack(const uint8_t *src, int type, int64_t n, int64_t k, uint8_t *dst);
int qk_unpack(const uint8_t *src, int type, int64_t n, int64_t k, uint8_t *dst);
const char *qk_variant(void);

#endif
