/* What the C kernels of this folder share: the quantised activation block, small AVX2 helpers, and the
 * entry points one file offers another (quant_matmul.c: block quantisation and the row matmul;
 * layer_ops.c: attention of one KV head). Needs AVX2, FMA and F16C (-march=native on such a CPU).
 */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "these kernels need AVX2, FMA and F16C (-march=native on such a CPU)"
#endif

enum { QK = 32 };
enum { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

/* m activation rows quantised in blocks of 32 int16 (quant_matmul.c): block b of row i is
 * x ~= d[i * nb + b] * q[(i * nb + b) * 32 ..], s = d * sum(q) */
typedef struct {
    float *d, *s;
    int16_t *q;
    int nb;
} acts;

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp of 8 floats, relative error < 1e-6: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a
 * degree-6 Taylor polynomial; x is clamped to [-87, 88] (exp(-87) ~ 1.6e-38, exp(88) ~ 1.7e38) */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* silu(g) * u of 8 floats, silu(g) = g / (1 + exp(-g)) */
INLINE __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

INLINE int16_t *act_quants(const acts *a, int i, int b) { return a->q + ((size_t)i * a->nb + b) * QK; }

/* quant_matmul.c */
size_t acts_bytes(int m, int nb);           /* a buffer for m rows of nb blocks ... */
acts acts_in(void *buf, int m, int nb);     /* ... laid out in it */
void quantize_block(const float *x, const acts *a, int i, int b); /* 32 floats -> block b of row i */
/* y[i * ys + r] = activation row i (of m) . weight row r for r in [r0, r1), W repacked (repack_rows)
 * from qtype blocks into groups of 8 rows; one thread's share of a matmul: r0 is a group's first row
 * (share_rows gives such ranges). */
void matmul_rows(int qtype, const uint8_t *w, int r0, int r1, const acts *x, int m, float *y, int ys);
/* thread t of nt: its rows [r0, r1) of n, whole groups of 8 */
void share_rows(int n, int t, int nt, int *r0, int *r1);

/* The KV cache's element type, a runtime flag: float32, or float16 (IEEE halves, half the bytes to read;
 * widened by F16C on load, rounded to nearest even on store; arithmetic stays float32). */
enum { KV_F32 = 0, KV_F16 = 1 };

/* 8 cache elements from element i of cache (of kv_type) as floats */
INLINE __m256 kv_load8(const void *cache, size_t i, int kv_type) {
    if (kv_type == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    return _mm256_loadu_ps((const float *)cache + i);
}

/* n floats x (n % 8 == 0) to elements [i, i + n) of cache (of kv_type) */
INLINE void kv_store(void *cache, size_t i, const float *x, int n, int kv_type) {
    for (int j = 0; j < n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        if (kv_type == KV_F16)
            _mm_storeu_si128((__m128i *)((uint16_t *)cache + i + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        else
            _mm256_storeu_ps((float *)cache + i + j, v);
    }
}

/* layer_ops.c: the `group` query heads qs [group, head_dim] of KV head h of one sequence against its
 * len cached keys/values (block `table`, elements of kv_type); out [group, head_dim]; scores: room for
 * group * len floats */
void attend_kv_head(const float *qs, const void *k_cache, const void *v_cache, int kv_type, const int32_t *table,
                    int len, int kv_heads, int h, int group, int head_dim, int block_size, float scale,
                    float *scores, float *out);

/* rotate-half rotary embedding of one head x [2 * half] in place; c, s: cos and sin [half] of its position */
INLINE void rope_head(float *x, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
    }
}

/* out[j] = residual[j] / rms(residual) * weight[j], rms = sqrt(mean(x^2) + eps): the factor 1 / rms */
INLINE float rms_inv(const float *r, int d, float eps) {
    double ss = 0.0;
    for (int j = 0; j < d; j++) ss += (double)r[j] * r[j];
    return 1.0f / sqrtf((float)(ss / d) + eps);
}
