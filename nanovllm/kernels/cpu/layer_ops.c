/* The small operations of a decoder layer between the quantised matmuls, one C call each instead of
 * several torch ops (each of which costs microseconds of dispatch on a CPU): residual add + RMSNorm,
 * rotary embedding in place, SiLU(gate) * up, and decode attention over the paged KV cache (float32 or
 * float16 elements). Built with quant_matmul.c into one library (build.py); called through ops.py.
 * float32 arithmetic throughout.
 */
#include <stdlib.h>

#include "cpu_kernels.h"

/* residual[i] += add[i] (add may be NULL); out[i] = residual[i] / rms(residual[i]) * weight.
 * rows of d floats, n rows; rms = sqrt(mean(x^2) + eps) */
void add_rms_norm(float *residual, const float *add, const float *weight, float eps, int n, int d, float *out) {
    for (int i = 0; i < n; i++) {
        float *r = residual + (size_t)i * d;
        if (add)
            for (int j = 0; j < d; j++) r[j] += add[(size_t)i * d + j];
        const float inv = rms_inv(r, d, eps);
        float *o = out + (size_t)i * d;
        for (int j = 0; j < d; j++) o[j] = r[j] * inv * weight[j];
    }
}

/* Rotate-half rotary embedding in place on the first `heads` heads of each token's row:
 * x[t] lives at qk + t * stride, head h at + h * head_dim; cos_sin [max_pos, head_dim] holds
 * [cos(half) | sin(half)] per position. x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. */
void rope(float *qk, int n, int stride, int heads, int head_dim, const float *cos_sin, const int64_t *pos) {
    const int half = head_dim / 2;
    for (int t = 0; t < n; t++) {
        const float *c = cos_sin + pos[t] * head_dim, *s = c + half;
        for (int h = 0; h < heads; h++) rope_head(qk + (size_t)t * stride + (size_t)h * head_dim, c, s, half);
    }
}

/* out[t, j] = silu(gate_up[t, j]) * gate_up[t, inter + j], silu(g) = g / (1 + exp(-g)) */
void silu_mul(const float *gate_up, int n, int inter, float *out) {
    for (int t = 0; t < n; t++) {
        const float *g = gate_up + (size_t)t * 2 * inter, *u = g + inter;
        float *o = out + (size_t)t * inter;
        int j = 0;
        for (; j + 8 <= inter; j += 8) {
            _mm256_storeu_ps(o + j, silu_mul8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j)));
        }
        for (; j < inter; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* Rows read this many positions ahead are prefetched while the scores are computed (K into L1, V into L2
 * for the value pass). One KV head's row is only 2-4 cache lines every kv_heads * head_dim elements: the
 * hardware prefetcher kept too few of them in flight (batch 32 x 120 tokens, SmolLM2's 30 layers, 2
 * threads: a float16 cache took 24.8 ms per step without, 15.9 ms with; float32 18.8 and 18.4). */
enum { PREFETCH = 8 };

/* attend_kv_head for one cache type: inlined into attend_kv_head once per type, so that kv_type is a
 * constant in each copy and the loads below compile to plain loads or F16C conversions, no branch. */
INLINE void attend_typed(const float *qs, const void *k_cache, const void *v_cache, const int kv_type,
                         const int32_t *table, int len, int kv_heads, int h, int group, int head_dim,
                         int block_size, float scale, float *scores, float *out) {
    const int hv = head_dim / 8;
    const size_t row = (size_t)kv_heads * head_dim; /* elements from one cache slot to the next */
    const int esize = kv_type == KV_F16 ? 2 : 4;
    for (int p0 = 0; p0 < len; p0 += block_size) { /* a cache block at a time: one table lookup each */
        const size_t kb = (size_t)table[p0 / block_size] * block_size * row + (size_t)h * head_dim;
        const int pn = len - p0 < block_size ? len - p0 : block_size;
        for (int p = 0; p < pn; p++) {
            if (p + PREFETCH < pn) {
                const size_t ahead = (kb + (p + PREFETCH) * row) * esize;
                for (int off = 0; off < head_dim * esize; off += 64) {
                    _mm_prefetch((const char *)k_cache + ahead + off, _MM_HINT_T0);
                    _mm_prefetch((const char *)v_cache + ahead + off, _MM_HINT_T1);
                }
            }
            __m256 k[64]; /* the key row, widened once for all query heads of the group */
            for (int j = 0; j < hv; j++) k[j] = kv_load8(k_cache, kb + p * row + 8 * j, kv_type);
            for (int g = 0; g < group; g++) {
                __m256 acc = _mm256_setzero_ps();
                for (int j = 0; j < hv; j++)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qs + g * head_dim + 8 * j), k[j], acc);
                scores[(size_t)g * len + p0 + p] = hsum(acc) * scale;
            }
        }
    }
    for (int g = 0; g < group; g++) {
        float *sc = scores + (size_t)g * len, mx = -INFINITY, sum = 0.0f;
        for (int p = 0; p < len; p++) mx = sc[p] > mx ? sc[p] : mx;
        int p = 0;
        __m256 vsum = _mm256_setzero_ps();
        for (; p + 8 <= len; p += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + p), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(sc + p, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum(vsum);
        for (; p < len; p++) sum += sc[p] = expf(sc[p] - mx);
        const float inv = 1.0f / sum;
        __m256 acc[64];
        for (int j = 0; j < hv; j++) acc[j] = _mm256_setzero_ps();
        for (int p0 = 0; p0 < len; p0 += block_size) {
            const size_t vb = (size_t)table[p0 / block_size] * block_size * row + (size_t)h * head_dim;
            const int pn = len - p0 < block_size ? len - p0 : block_size;
            for (p = 0; p < pn; p++) {
                const __m256 w = _mm256_set1_ps(sc[p0 + p]);
                for (int j = 0; j < hv; j++)
                    acc[j] = _mm256_fmadd_ps(w, kv_load8(v_cache, vb + p * row + 8 * j, kv_type), acc[j]);
            }
        }
        float *o = out + (size_t)g * head_dim;
        for (int j = 0; j < hv; j++) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
    }
}

void attend_kv_head(const float *qs, const void *k_cache, const void *v_cache, int kv_type, const int32_t *table,
                    int len, int kv_heads, int h, int group, int head_dim, int block_size, float scale,
                    float *scores, float *out) {
    if (kv_type == KV_F16)
        attend_typed(qs, k_cache, v_cache, KV_F16, table, len, kv_heads, h, group, head_dim, block_size, scale,
                     scores, out);
    else
        attend_typed(qs, k_cache, v_cache, KV_F32, table, len, kv_heads, h, group, head_dim, block_size, scale,
                     scores, out);
}

/* One new token per sequence attending to its context_lens[s] cached keys (its own included).
 * q [n, heads, head_dim] (token s at q + s * q_stride); caches [num_blocks, block_size, kv_heads,
 * head_dim] of kv_type; block_tables [n, max_blocks] int32; out [n, heads, head_dim]. The query heads of one KV
 * head (heads / kv_heads of them) share each K/V row read; threads split the (sequence, KV head)
 * pairs. Returns -1 when a scores buffer could not be allocated or head_dim is not a multiple of 8. */
int decode_attention(const float *q, int q_stride, const void *k_cache, const void *v_cache, int kv_type,
                     const int32_t *block_tables, int max_blocks, const int32_t *context_lens, int n, int heads,
                     int kv_heads, int head_dim, int block_size, float scale, float *out, int nthreads) {
    if (head_dim % 8 || head_dim > 512) return -1;
    const int group = heads / kv_heads;
    int max_len = 0;
    for (int s = 0; s < n; s++) max_len = context_lens[s] > max_len ? context_lens[s] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n * kv_heads > 1)
    {
        float *scores = malloc(sizeof(float) * ((size_t)group * max_len + 8));
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (int task = 0; task < n * kv_heads; task++) {
            if (!scores) continue;
            const int s = task / kv_heads, h = task % kv_heads;
            attend_kv_head(q + (size_t)s * q_stride + (size_t)h * group * head_dim, k_cache, v_cache, kv_type,
                           block_tables + (size_t)s * max_blocks, context_lens[s], kv_heads, h, group, head_dim,
                           block_size, scale, scores, out + ((size_t)s * heads + (size_t)h * group) * head_dim);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
