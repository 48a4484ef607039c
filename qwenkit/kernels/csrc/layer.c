/* The front of a decoder layer in one call, for the rows of a decode step: everything from the layer's input to
 * its MLP's gate/up projection.
 *
 *   h = rms_norm(x, input_norm); qkv = h W_qkv^T (+ bias); a = attention(qkv); x += a W_o^T (+ bias);
 *   h = rms_norm(x, post_norm); gate_up = h W_gate_up^T
 *
 * Each step is the library's own kernel (qk_rms_norm, qk_matmul, qk_paged_attention), called in the order and with
 * the operations the PyTorch modules call them for these rows (qwenkit.model.qwen.DecoderLayer on block weights),
 * and the additions are the same IEEE single additions: the result is bit for bit the modules'. What it saves is
 * the Python between the kernels: some twenty calls and their checks per layer, which on a small model cost as
 * much as a sixth of a decode step. The MLP's activation and down projection stay in PyTorch
 * (qwenkit.engine.fused): its SiLU is PyTorch's own.
 */
#include <stdint.h>
#include <stdlib.h>

#include "common.h"
#include "kernels.h"

/* What stays the same from step to step: the layer's weights and shapes, and its KV pools. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter2; /* inter2: the gate/up projection's width */
    const qk_part *qkv, *o, *gate_up;
    int64_t n_qkv, n_o, n_gate_up;
    const float *qkv_bias, *o_bias; /* or NULL */
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm, k_norm: Qwen3's, or NULL */
    float eps, qk_eps, scale; /* scale: the attention's, head_dim^-0.5 as the modules round it */
    int64_t window; /* sliding window, 0: none */
    void *k_pool, *v_pool; /* [n_blocks, kv_heads, 1 << block_shift, head_dim] */
    int64_t half, n_blocks, block_shift;
} qk_layer;

/* What changes every step: the rows and where they read and write in the pools (qk_paged_attention's). */
typedef struct {
    int64_t rows;
    const float *cos, *sin; /* [rows, head_dim] */
    const int64_t *write_slot, *ctx, *row_ctx, *row_len;
} qk_step;

static void add_rows(float *y, const float *bias, int64_t rows, int64_t width) { /* y[r] += bias */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < width; j++) y[r * width + j] += bias[j];
}

/* x [rows, hidden] is updated in place (x + attention); gate_up [rows, inter2] receives the MLP's projection. */
int qk_layer_front(const qk_layer *L, const qk_step *s, float *x, float *gate_up, int n_threads) {
    const int64_t n = s->rows, d = L->head_dim, q_dim = L->heads * d, kv_dim = L->kv_heads * d;
    const int64_t qkv_dim = q_dim + 2 * kv_dim;
    float *h = malloc(sizeof(float) * (size_t)(n * L->hidden)), *qkv = malloc(sizeof(float) * (size_t)(n * qkv_dim));
    float *att = malloc(sizeof(float) * (size_t)(n * q_dim)), *o = malloc(sizeof(float) * (size_t)(n * L->hidden));
    int rc = h && qkv && att && o ? 0 : 3;
    if (!rc) rc = qk_rms_norm(x, n, L->hidden, L->input_norm, L->eps, h);
    if (!rc) rc = qk_matmul(L->qkv, (int)L->n_qkv, h, n, L->hidden, qkv, n_threads);
    if (!rc && L->qkv_bias) add_rows(qkv, L->qkv_bias, n, qkv_dim);
    if (!rc)
        rc = qk_paged_attention(qkv, qkv_dim, qkv + q_dim, qkv_dim, qkv + q_dim + kv_dim, qkv_dim, n, L->heads,
                                L->kv_heads, d, L->q_norm, L->k_norm, L->qk_eps, s->cos, s->sin, L->k_pool,
                                L->v_pool, (int)L->half, L->n_blocks, L->block_shift, s->write_slot, s->ctx, s->row_ctx, s->row_len,
                                L->window, L->scale, att, n_threads);
    if (!rc) rc = qk_matmul(L->o, (int)L->n_o, att, n, q_dim, o, n_threads);
    if (!rc) {
        if (L->o_bias) add_rows(o, L->o_bias, n, L->hidden);
        for (int64_t i = 0; i < n * L->hidden; i++) x[i] += o[i];
        rc = qk_rms_norm(x, n, L->hidden, L->post_norm, L->eps, h);
    }
    if (!rc) rc = qk_matmul(L->gate_up, (int)L->n_gate_up, h, n, L->hidden, gate_up, n_threads);
    free(h);
    free(qkv);
    free(att);
    free(o);
    return rc;
}
