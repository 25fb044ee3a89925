/* All decoder layers of a Llama-family model for one decode step (one new token per sequence) in one
 * C call and one OpenMP parallel region: no Python between the ops and no fork/join per op, only
 * barriers. The same arithmetic as the per-op kernels (add_rms_norm, rope, decode_attention, silu_mul,
 * qmatmul), so the result is bit for bit theirs. Per layer, with T threads:
 *
 *   residual += y; RMSNorm; quantise -> xa     every thread, its own copies       |
 *   qkv = xa @ Wqkv^T                           weight rows split                  | barrier
 *   per (sequence, KV head): rotary on its q heads and k head, k and v to the cache slot (float32, or
 *   rounded to float16 for a float16 cache), attention,
 *   its output heads quantised -> xo            tasks split (head_dim % 32 == 0)   | barrier
 *   y = xo @ Wo^T                               weight rows split                  | barrier
 *   residual += y; RMSNorm; quantise -> xa      every thread, its own copies       |
 *   gate, up = xa @ Wgu^T; silu(gate) * up quantised -> xb
 *                                               columns split in whole blocks of 32: a thread computes
 *                                               gate and up rows j and the blocks of xb they make | barrier
 *   y = xb @ Wdown^T                            weight rows split                  | barrier
 *
 * then residual += y and the final norm. Each thread keeps its own residual stream and norm output (the
 * same values: a few microseconds of work twice) so that no barrier waits for them. y is read by the
 * norms and rewritten two barriers later; xb (the down projection's input) is not xa because the
 * gate/up phase reads xa while other threads already write their silu blocks.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include <omp.h>

typedef struct {
    int n_layers, hidden, heads, kv_heads, head_dim, inter, block_size, max_blocks;
    float eps, scale;
    int kv_type; /* every layer's cache: KV_F32 or KV_F16 */
} step_dims;

typedef struct { /* one decoder layer: raw block matrices, their qtypes, norm weights, its KV cache */
    const uint8_t *qkv, *o, *gate_up, *down;
    int qtype_qkv, qtype_o, qtype_gate_up, qtype_down;
    const float *in_norm, *post_norm;
    void *k_cache, *v_cache; /* [num_blocks, block_size, kv_heads, head_dim] of step_dims.kv_type */
} layer_ptrs;

#define ALIGN(x) (((x) + 63) / 64 * 64)

enum { MAX_THREADS = 64 };

typedef struct {
    acts xa[MAX_THREADS]; /* per thread: its copy of the norms' quantised output ... */
    float *res[MAX_THREADS]; /* ... and of the residual stream */
    acts xo, xb;
    float *qkv, *y, *gu, *scores;
    size_t scores_per_thread;
} workspace;

/* the next `bytes` (64-aligned) of the workspace at *off; NULL while only sizing it */
static uint8_t *take(uint8_t *base, size_t *off, size_t bytes) {
    uint8_t *p = base ? base + *off : NULL;
    *off += ALIGN(bytes);
    return p;
}

static acts take_acts(uint8_t *base, size_t *off, int m, int nb) {
    uint8_t *p = take(base, off, acts_bytes(m, nb));
    return p ? acts_in(p, m, nb) : (acts){0};
}

/* bytes of workspace for m sequences of at most max_len keys; with base, the buffers laid out in ws */
static size_t carve(const step_dims *dm, int m, int max_len, int nthreads, uint8_t *base, workspace *ws) {
    const int qkv_n = (dm->heads + 2 * dm->kv_heads) * dm->head_dim;
    const size_t spt = (size_t)(dm->heads / dm->kv_heads) * max_len + 8;
    size_t off = 0;
    workspace w;
    for (int t = 0; t < nthreads; t++) {
        w.xa[t] = take_acts(base, &off, m, dm->hidden / QK);
        w.res[t] = (float *)take(base, &off, (size_t)m * dm->hidden * 4);
    }
    w.xo = take_acts(base, &off, m, dm->heads * dm->head_dim / QK);
    w.xb = take_acts(base, &off, m, dm->inter / QK);
    w.qkv = (float *)take(base, &off, (size_t)m * qkv_n * 4);
    w.y = (float *)take(base, &off, (size_t)m * dm->hidden * 4);
    w.gu = (float *)take(base, &off, (size_t)m * 2 * dm->inter * 4);
    w.scores = (float *)take(base, &off, (size_t)nthreads * spt * 4);
    w.scores_per_thread = spt;
    if (ws) *ws = w;
    return off;
}

size_t decode_step_workspace(const step_dims *dm, int m, int max_len, int nthreads) {
    return carve(dm, m, max_len, nthreads, NULL, NULL) + 64;
}

/* residual row += add row (add may be NULL); its RMSNorm times weight, quantised block by block */
static void add_norm_quant(float *r, const float *add, const float *weight, float eps, int d, const acts *out,
                           int i) {
    if (add)
        for (int j = 0; j < d; j++) r[j] += add[j];
    const float inv = rms_inv(r, d, eps);
    float tmp[QK];
    for (int b = 0; b < d / QK; b++) {
        for (int j = 0; j < QK; j++) tmp[j] = r[b * QK + j] * inv * weight[b * QK + j];
        quantize_block(tmp, out, i, b);
    }
}

static void share(int n, int t, int nt, int *r0, int *r1) {
    *r0 = (int)((long)n * t / nt);
    *r1 = (int)((long)n * (t + 1) / nt);
}

/* Decode step over all layers. residual [m, hidden]: the embedded tokens in, the last residual out;
 * positions, slots (cache slot per token, < 0: not stored) int64 [m]; block_tables [m, max_blocks];
 * context_lens [m] (the new token included); out [m, hidden]: the final norm's output. work: at least
 * decode_step_workspace() bytes. Returns 0, or -1 where the shapes do not suit it (dims checked). */
int decode_step(const step_dims *dm, const layer_ptrs *layers, float *residual, const float *cos_sin,
                const int64_t *positions, const int64_t *slots, const int32_t *block_tables,
                const int32_t *context_lens, int m, const float *final_norm, float *out, uint8_t *work,
                int nthreads) {
    const int H = dm->hidden, hd = dm->head_dim, kvh = dm->kv_heads, group = dm->heads / kvh, I = dm->inter;
    const int q_size = dm->heads * hd, qkv_n = q_size + 2 * kvh * hd;
    if (H % QK || I % QK || hd % QK || hd > 512 || dm->heads % kvh || nthreads > MAX_THREADS) return -1;
    if (dm->kv_type != KV_F32 && dm->kv_type != KV_F16) return -1;
    int max_len = 0;
    for (int s = 0; s < m; s++) max_len = context_lens[s] > max_len ? context_lens[s] : max_len;
    workspace ws;
    carve(dm, m, max_len, nthreads, (uint8_t *)ALIGN((uintptr_t)work), &ws);
    const int nbI = I / QK;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *scores = ws.scores + (size_t)t * ws.scores_per_thread;
        int r0, r1;
        float *res = ws.res[t];
        const acts *xa = &ws.xa[t];
        memcpy(res, residual, sizeof(float) * (size_t)m * H);
        for (int l = 0; l < dm->n_layers; l++) {
            const layer_ptrs *L = layers + l;
            for (int i = 0; i < m; i++)
                add_norm_quant(res + (size_t)i * H, l ? ws.y + (size_t)i * H : NULL, L->in_norm, dm->eps, H, xa, i);
            share_rows(qkv_n, t, T, &r0, &r1);
            if (r1 > r0) matmul_rows(L->qtype_qkv, L->qkv, r0, r1, xa, m, ws.qkv, qkv_n);
#pragma omp barrier
            for (int task = t; task < m * kvh; task += T) {
                const int s = task / kvh, h = task % kvh, half = hd / 2;
                float *row = ws.qkv + (size_t)s * qkv_n, *q = row + (size_t)h * group * hd;
                float *k = row + q_size + (size_t)h * hd, *v = k + kvh * hd;
                const float *c = cos_sin + positions[s] * hd;
                for (int g = 0; g < group; g++) rope_head(q + g * hd, c, c + half, half);
                rope_head(k, c, c + half, half);
                if (slots[s] >= 0) {
                    kv_store(L->k_cache, ((size_t)slots[s] * kvh + h) * hd, k, hd, dm->kv_type);
                    kv_store(L->v_cache, ((size_t)slots[s] * kvh + h) * hd, v, hd, dm->kv_type);
                }
                float o[group * hd];
                attend_kv_head(q, L->k_cache, L->v_cache, dm->kv_type, block_tables + (size_t)s * dm->max_blocks,
                               context_lens[s], kvh, h, group, hd, dm->block_size, dm->scale, scores, o);
                const int b0 = h * group * hd / QK;
                for (int b = 0; b < group * hd / QK; b++) quantize_block(o + b * QK, &ws.xo, s, b0 + b);
            }
#pragma omp barrier
            share_rows(H, t, T, &r0, &r1);
            if (r1 > r0) matmul_rows(L->qtype_o, L->o, r0, r1, &ws.xo, m, ws.y, H);
#pragma omp barrier
            for (int i = 0; i < m; i++)
                add_norm_quant(res + (size_t)i * H, ws.y + (size_t)i * H, L->post_norm, dm->eps, H, xa, i);
            share(nbI, t, T, &r0, &r1); /* in blocks of 32 columns */
            if (r1 > r0) {
                matmul_rows(L->qtype_gate_up, L->gate_up, r0 * QK, r1 * QK, xa, m, ws.gu, 2 * I);
                matmul_rows(L->qtype_gate_up, L->gate_up, I + r0 * QK, I + r1 * QK, xa, m, ws.gu, 2 * I);
                for (int i = 0; i < m; i++) {
                    const float *g = ws.gu + (size_t)i * 2 * I, *u = g + I;
                    for (int b = r0; b < r1; b++) {
                        float tmp[QK];
                        for (int j = 0; j < QK; j += 8)
                            _mm256_storeu_ps(tmp + j, silu_mul8(_mm256_loadu_ps(g + b * QK + j),
                                                                _mm256_loadu_ps(u + b * QK + j)));
                        quantize_block(tmp, &ws.xb, i, b);
                    }
                }
            }
#pragma omp barrier
            share_rows(H, t, T, &r0, &r1);
            if (r1 > r0) matmul_rows(L->qtype_down, L->down, r0, r1, &ws.xb, m, ws.y, H);
#pragma omp barrier
        }
        for (int i = t; i < m; i += T) {
            float *r = residual + (size_t)i * H, *o = out + (size_t)i * H;
            const float *y = ws.y + (size_t)i * H, *ri = res + (size_t)i * H;
            for (int j = 0; j < H; j++) r[j] = ri[j] + y[j];
            const float inv = rms_inv(r, H, dm->eps);
            for (int j = 0; j < H; j++) o[j] = r[j] * inv * final_norm[j];
        }
    }
    return 0;
}
