/* Matmuls of GGUF block-quantised weights (Q4_0, Q4_1, Q8_0) read as they lie in the file, for CPUs
 * with AVX2, FMA and F16C. Built and loaded by build.py; called through ops.py on torch tensors.
 *
 * y[m, n] = x[m, k] @ W[n, k]^T, float32 in and out. Blocks of 32 weights:
 *
 *   Q4_0  [d: f16][qs: 16 B]           w[j] = d * (q[j] - 8)     q[j]: low nibble of qs[j], j < 16,
 *   Q4_1  [d: f16][m: f16][qs: 16 B]   w[j] = d * q[j] + m             high nibble of qs[j - 16] above
 *   Q8_0  [d: f16][qs: 32 x int8]      w[j] = d * q[j]
 *
 * Each activation row is quantised once per call to blocks of 32 int16 with a float scale dx and
 * s = dx * sum(q) (act_block): 2^-15 of a block's largest value, finer than bfloat16 for all but that
 * value (8-bit blocks, as llama.cpp's, lose too much where a row has outliers: measured, half the greedy
 * replies of SmolLM2 then leave the float32 model's within 32 tokens). A block's dot product is then
 * integer: weights widened to int16 times the activations through _mm256_madd_epi16 (2 * 128 * 32767
 * fits easily in int32). Per block, with I = sum(qw * qx):
 *
 *   Q4_0: dw * dx * I - 8 * dw * s        Q4_1: dw * dx * I + mw * s        Q8_0: dw * dx * I
 *
 * Threads split the weight rows (each thread streams its own contiguous rows once); within a thread a
 * weight row is multiplied with TILE_M activation rows at a time while it sits in L1, so a batch of
 * rows does not multiply the weight traffic. Activation rows are taken CHUNK_M at a time so that their
 * quantised blocks stay in L2 for a long prompt.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

enum { TILE_M = 4, CHUNK_M = 64 };
static const int BLOCK_BYTES[3] = {18, 20, 34};

INLINE float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

INLINE int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* 32 floats -> one block, rounded to nearest (even) */
void quantize_block(const float *x, act_block *out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 32767.0f;
    const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
    const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    /* packs interleave the 128-bit lanes of its two inputs: [a0-3 b0-3 | a4-7 b4-7]; 0xd8 restores order */
    for (int i = 0; i < 2; i++) {
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * i], q[2 * i + 1]), 0xd8);
        _mm256_storeu_si256((__m256i *)(out->q + 16 * i), p);
    }
    out->d = d;
    out->s = d * (float)sum;
}

static void quantize_row(const float *x, int k, act_block *out) {
    for (int b = 0; b < k / QK; b++) quantize_block(x + b * QK, out + b);
}

/* a weight block's 32 quants as int16: w[0] holds weights 0-15, w[1] weights 16-31 */
INLINE void unpack_block(int qtype, const uint8_t *blk, __m256i w[2]) {
    if (qtype == Q8_0) {
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)(blk + (qtype == Q4_1 ? 4 : 2)));
        w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(v, _mm_set1_epi8(15)));
        w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)));
    }
}

/* nr (1 or 2) weight rows, the second rs bytes after the first, against mt activation rows
 * x[i * xs + b]; results to y[r + i * ys]. qtype, nr and mt are constants at every call site, so each
 * combination compiles to its own unrolled loop; two rows give two independent accumulator chains and
 * share each activation load. */
INLINE void rows_times_tile(int qtype, const uint8_t *w, size_t rs, int nr, int nb, const act_block *x, int xs,
                            int mt, float *y, int ys) {
    __m256 acc[2][TILE_M];
    float corr[2][TILE_M];
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mt; i++) acc[r][i] = _mm256_setzero_ps(), corr[r][i] = 0.0f;
    for (int b = 0; b < nb; b++) {
        float dw[2], mw[2];
        __m256i wq[2][2];
        for (int r = 0; r < nr; r++) {
            const uint8_t *blk = w + r * rs + (size_t)b * BLOCK_BYTES[qtype];
            dw[r] = f16_at(blk);
            mw[r] = qtype == Q4_1 ? f16_at(blk + 2) : qtype == Q4_0 ? -8.0f * dw[r] : 0.0f;
            unpack_block(qtype, blk, wq[r]);
        }
        for (int i = 0; i < mt; i++) {
            const act_block *xb = x + (size_t)i * xs + b;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)xb->q);
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb->q + 16));
            for (int r = 0; r < nr; r++) {
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wq[r][0], x0), _mm256_madd_epi16(wq[r][1], x1));
                acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * xb->d), _mm256_cvtepi32_ps(p), acc[r][i]);
                if (qtype != Q8_0) corr[r][i] += mw[r] * xb->s;
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mt; i++) y[r + (size_t)i * ys] = hsum(acc[r][i]) + corr[r][i];
}

#define TILE(NR, MT) rows_times_tile(qtype, wr, row_bytes, NR, nb, x + (size_t)i * nb, nb, MT, y + (size_t)i * n + r, n)

INLINE void rows_times_chunk(int qtype, const uint8_t *w, size_t row_bytes, int r0, int r1, int nb,
                             const act_block *x, int m, float *y, int n) {
    int r = r0;
    for (; r + 2 <= r1; r += 2) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        int i = 0;
        for (; i + TILE_M <= m; i += TILE_M) TILE(2, TILE_M);
        switch (m - i) {
        case 3: TILE(2, 3); break;
        case 2: TILE(2, 2); break;
        case 1: TILE(2, 1); break;
        }
    }
    if (r < r1) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        for (int i = 0; i < m; i++) TILE(1, 1);
    }
}

static void rows_dispatch(int qtype, const uint8_t *w, int r0, int r1, int nb, const act_block *x, int m,
                          float *y, int n) {
    const size_t rb = (size_t)nb * BLOCK_BYTES[qtype];
    switch (qtype) {
    case Q4_0: rows_times_chunk(Q4_0, w, rb, r0, r1, nb, x, m, y, n); break;
    case Q4_1: rows_times_chunk(Q4_1, w, rb, r0, r1, nb, x, m, y, n); break;
    default: rows_times_chunk(Q8_0, w, rb, r0, r1, nb, x, m, y, n); break;
    }
}

void matmul_rows(int qtype, const uint8_t *w, int r0, int r1, int nb, const act_block *x, int m, float *y, int ys) {
    for (int c = 0; c < m; c += CHUNK_M) {
        const int mc = m - c < CHUNK_M ? m - c : CHUNK_M;
        rows_dispatch(qtype, w, r0, r1, nb, x + (size_t)c * nb, mc, y + (size_t)c * ys, ys);
    }
}

/* a per-thread scratch buffer for the quantised activations, grown as needed */
static act_block *scratch(size_t blocks) {
    static __thread act_block *buf = NULL;
    static __thread size_t cap = 0;
    if (blocks > cap) {
        free(buf);
        buf = aligned_alloc(64, (blocks * sizeof(act_block) + 63) / 64 * 64);
        cap = buf ? blocks : 0;
    }
    return buf;
}

/* y[m, n] = x[m, k] @ W^T with W [n, k] in block format qtype (rows of k / 32 blocks, back to back).
 * Returns 0, or -1 when the scratch buffer could not be allocated. */
int qmatmul(const uint8_t *w, int qtype, int n, int k, const float *x, int m, float *y, int nthreads) {
    const int nb = k / QK;
    act_block *xq = scratch((size_t)m * nb);
    if (!xq) return -1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < m; i++) quantize_row(x + (size_t)i * k, k, xq + (size_t)i * nb);
#pragma omp for schedule(static) nowait
        for (int t = 0; t < nthreads; t++) {
            const int r0 = (int)((long)n * t / nthreads), r1 = (int)((long)n * (t + 1) / nthreads);
            matmul_rows(qtype, w, r0, r1, nb, xq, m, y, n);
        }
    }
    return 0;
}

/* out[i, :] = the dequantised row ids[i] of W [*, k] (an embedding lookup in a quantised table) */
void dequant_rows(const uint8_t *w, int qtype, int k, const int64_t *ids, int n, float *out) {
    const int nb = k / QK;
    const size_t rb = (size_t)nb * BLOCK_BYTES[qtype];
    for (int i = 0; i < n; i++) {
        const uint8_t *row = w + (size_t)ids[i] * rb;
        float *o = out + (size_t)i * k;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (size_t)b * BLOCK_BYTES[qtype];
            const float d = f16_at(blk);
            for (int j = 0; j < QK; j++) {
                if (qtype == Q8_0) {
                    o[b * QK + j] = d * (float)(int8_t)blk[2 + j];
                } else {
                    const uint8_t byte = blk[(qtype == Q4_1 ? 4 : 2) + j % 16];
                    const int q = j < 16 ? byte & 15 : byte >> 4;
                    o[b * QK + j] = qtype == Q4_1 ? d * (float)q + f16_at(blk + 2) : d * (float)(q - 8);
                }
            }
        }
    }
}

/* W [n, k] float32 -> Q8_0 blocks, as llama.cpp quantises: d = max|w| / 127 stored as float16,
 * q = round(w / d) (half away from zero). A matrix decoded from Q8_0 comes back bit for bit. */
void quantize_q8_0(const float *w, int n, int k, uint8_t *out, int nthreads) {
    const int nb = k / QK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int r = 0; r < n; r++) {
        for (int b = 0; b < nb; b++) {
            const float *x = w + (size_t)r * k + b * QK;
            uint8_t *blk = out + ((size_t)r * nb + b) * 34;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = x[j] > amax ? x[j] : -x[j] > amax ? -x[j] : amax;
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            const uint16_t h = _cvtss_sh(d, 0);
            memcpy(blk, &h, 2);
            for (int j = 0; j < QK; j++) {
                const float v = x[j] * id;
                blk[2 + j] = (uint8_t)(int8_t)(v < 0.0f ? -(int)(-v + 0.5f) : (int)(v + 0.5f));
            }
        }
    }
}
