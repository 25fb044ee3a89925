/* Matmuls of GGUF block-quantised weights (Q4_0, Q4_1, Q8_0), for CPUs with AVX2, FMA and F16C. Built
 * and loaded by build.py; called through ops.py on torch tensors.
 *
 * y[m, n] = x[m, k] @ W[n, k]^T, float32 in and out. GGUF blocks of 32 weights:
 *
 *   Q4_0  [d: f16][qs: 16 B]           w[j] = d * (q[j] - 8)     q[j]: low nibble of qs[j], j < 16,
 *   Q4_1  [d: f16][m: f16][qs: 16 B]   w[j] = d * q[j] + m             high nibble of qs[j - 16] above
 *   Q8_0  [d: f16][qs: 32 x int8]      w[j] = d * q[j]
 *
 * repack_rows() lays each row out once, at load, with its scales apart from its quants (the same bytes
 * plus a little padding), so that eight blocks' scales are one 16-byte load and one conversion:
 *
 *   row = [d: f16 x nbp][m: f16 x nbp, Q4_1 only][qs of block 0][qs of block 1]...   nbp = nb rounded
 *                                                                                    up to 8, pads 0
 *
 * Each activation row is quantised once per call to blocks of 32 int16 with a float scale dx and
 * s = dx * sum(q) (acts, also scales apart from quants): 2^-15 of a block's largest value, finer than
 * bfloat16 for all but that value (8-bit blocks, as llama.cpp's, lose too much where a row has outliers:
 * measured, half the greedy replies of SmolLM2 then leave the float32 model's within 32 tokens). A
 * block's dot product is then integer: weights widened to int16 times the activations through
 * _mm256_madd_epi16 (2 * 128 * 32767 fits easily in int32). Per block, with I = sum(qw * qx):
 *
 *   Q4_0: dw * dx * I - 8 * dw * s        Q4_1: dw * dx * I + mw * s        Q8_0: dw * dx * I
 *
 * Per eight blocks the products dw * dx and the terms mw * s are computed eight at a time; the integer
 * sums I are converted and scaled block by block into eight float lanes that are summed at the end.
 *
 * Threads split the weight rows (each thread streams its own contiguous rows once); within a thread two
 * weight rows are multiplied with TILE_M activation rows at a time while they sit in L1, so a batch of
 * rows does not multiply the weight traffic. Activation rows are taken CHUNK_M at a time so that their
 * quantised blocks stay in L2 for a long prompt.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

enum { TILE_M = 4, CHUNK_M = 64 };
static const int BLOCK_BYTES[3] = {18, 20, 34};
static const int QUANT_BYTES[3] = {16, 16, 32};

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

INLINE int padded(int nb) { return (nb + 7) / 8 * 8; }

/* byte offset of the quants in a repacked row */
INLINE size_t quants_at(int qtype, int nb) { return (size_t)padded(nb) * (qtype == Q4_1 ? 4 : 2); }

size_t packed_row_bytes(int qtype, int k) {
    const int nb = k / QK;
    return quants_at(qtype, nb) + (size_t)nb * QUANT_BYTES[qtype];
}

/* GGUF rows [n, k / 32 blocks] -> the repacked layout above */
void repack_rows(const uint8_t *raw, int qtype, int n, int k, uint8_t *out) {
    const int nb = k / QK, nbp = padded(nb), qb = QUANT_BYTES[qtype];
    const size_t rb = packed_row_bytes(qtype, k);
    for (int r = 0; r < n; r++) {
        uint8_t *o = out + (size_t)r * rb;
        memset(o, 0, quants_at(qtype, nb));
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = raw + ((size_t)r * nb + b) * BLOCK_BYTES[qtype];
            memcpy(o + 2 * b, blk, 2);
            if (qtype == Q4_1) memcpy(o + 2 * (nbp + b), blk + 2, 2);
            memcpy(o + quants_at(qtype, nb) + (size_t)b * qb, blk + BLOCK_BYTES[qtype] - qb, qb);
        }
    }
}

/* 32 floats -> block b of activation row i, rounded to nearest (even) */
void quantize_block(const float *x, const acts *a, int i, int b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 32767.0f;
    const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));
    const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    int16_t *out = act_quants(a, i, b);
    /* packs interleave the 128-bit lanes of its two inputs: [a0-3 b0-3 | a4-7 b4-7]; 0xd8 restores order */
    for (int j = 0; j < 2; j++) {
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * j], q[2 * j + 1]), 0xd8);
        _mm256_storeu_si256((__m256i *)(out + 16 * j), p);
    }
    a->d[(size_t)i * a->nbp + b] = d;
    a->s[(size_t)i * a->nbp + b] = d * (float)sum;
}

static void quantize_row(const float *x, const acts *a, int i) {
    for (int b = 0; b < a->nb; b++) quantize_block(x + b * QK, a, i, b);
    for (int b = a->nb; b < a->nbp; b++) a->d[(size_t)i * a->nbp + b] = a->s[(size_t)i * a->nbp + b] = 0.0f;
}

/* a weight block's 32 quants as int16: w[0] holds weights 0-15, w[1] weights 16-31 */
INLINE void unpack_block(int qtype, const uint8_t *qs, __m256i w[2]) {
    if (qtype == Q8_0) {
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16)));
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)qs);
        w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(v, _mm_set1_epi8(15)));
        w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)));
    }
}

/* nr (1 or 2) repacked weight rows, the second rs bytes after the first, against activation rows
 * i0 .. i0 + mt - 1; results to y[r + i * ys]. qtype, nr and mt are constants at every call site, so
 * each combination compiles to its own unrolled loop; two rows give two independent accumulator chains
 * and share each activation load. */
INLINE void rows_times_tile(int qtype, const uint8_t *w, size_t rs, int nr, const acts *x, int i0, int mt,
                            float *y, int ys) {
    const int nb = x->nb, nbp = x->nbp;
    const uint8_t *qs = w + quants_at(qtype, nb);
    __m256 acc[2][TILE_M];
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mt; i++) acc[r][i] = _mm256_setzero_ps();
    for (int g = 0; g < nbp; g += 8) {
        float sc[2][TILE_M][8] __attribute__((aligned(32))); /* dw * dx of the group's blocks */
        for (int r = 0; r < nr; r++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + r * rs + 2 * g)));
            const __m256 mw = qtype == Q4_1   ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + r * rs + 2 * (nbp + g))))
                              : qtype == Q4_0 ? _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f))
                                              : _mm256_setzero_ps();
            for (int i = 0; i < mt; i++) {
                const size_t at = (size_t)(i0 + i) * nbp + g;
                _mm256_store_ps(sc[r][i], _mm256_mul_ps(dw, _mm256_loadu_ps(x->d + at)));
                if (qtype != Q8_0) acc[r][i] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x->s + at), acc[r][i]);
            }
        }
        const int bend = nb - g < 8 ? nb - g : 8;
        for (int bb = 0; bb < bend; bb++) {
            const int b = g + bb;
            __m256i wq[2][2];
            for (int r = 0; r < nr; r++) unpack_block(qtype, qs + r * rs + (size_t)b * QUANT_BYTES[qtype], wq[r]);
            for (int i = 0; i < mt; i++) {
                const int16_t *xq = act_quants(x, i0 + i, b);
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 16));
                for (int r = 0; r < nr; r++) {
                    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wq[r][0], x0), _mm256_madd_epi16(wq[r][1], x1));
                    acc[r][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r][i][bb]), _mm256_cvtepi32_ps(p), acc[r][i]);
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mt; i++) y[r + (size_t)i * ys] = hsum(acc[r][i]);
}

#define TILE(NR, MT) rows_times_tile(qtype, wr, row_bytes, NR, x, i, MT, y + (size_t)i * ys + r, ys)

INLINE void rows_times_chunk(int qtype, const uint8_t *w, size_t row_bytes, int r0, int r1, const acts *x,
                             int c0, int c1, float *y, int ys) {
    int r = r0;
    for (; r + 2 <= r1; r += 2) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        int i = c0;
        for (; i + TILE_M <= c1; i += TILE_M) TILE(2, TILE_M);
        switch (c1 - i) {
        case 3: TILE(2, 3); break;
        case 2: TILE(2, 2); break;
        case 1: TILE(2, 1); break;
        }
    }
    if (r < r1) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        for (int i = c0; i < c1; i++) TILE(1, 1);
    }
}

void matmul_rows(int qtype, const uint8_t *w, int r0, int r1, const acts *x, int m, float *y, int ys) {
    const size_t rb = quants_at(qtype, x->nb) + (size_t)x->nb * QUANT_BYTES[qtype];
    for (int c = 0; c < m; c += CHUNK_M) {
        const int c1 = m - c < CHUNK_M ? m : c + CHUNK_M;
        switch (qtype) {
        case Q4_0: rows_times_chunk(Q4_0, w, rb, r0, r1, x, c, c1, y, ys); break;
        case Q4_1: rows_times_chunk(Q4_1, w, rb, r0, r1, x, c, c1, y, ys); break;
        default: rows_times_chunk(Q8_0, w, rb, r0, r1, x, c, c1, y, ys); break;
        }
    }
}

size_t acts_bytes(int m, int nb) { return (size_t)m * (8 * padded(nb) + 2 * QK * nb) + 64; }

acts acts_in(void *buf, int m, int nb) {
    const int nbp = padded(nb);
    float *d = (float *)(((uintptr_t)buf + 31) / 32 * 32);
    return (acts){d, d + (size_t)m * nbp, (int16_t *)(d + 2 * (size_t)m * nbp), nb, nbp};
}

/* a per-thread scratch buffer for the quantised activations, grown as needed */
static void *scratch(size_t bytes) {
    static __thread void *buf = NULL;
    static __thread size_t cap = 0;
    if (bytes > cap) {
        free(buf);
        buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        cap = buf ? bytes : 0;
    }
    return buf;
}

/* y[m, n] = x[m, k] @ W^T with W [n, k] repacked (repack_rows) from block format qtype.
 * Returns 0, or -1 when the scratch buffer could not be allocated. */
int qmatmul(const uint8_t *w, int qtype, int n, int k, const float *x, int m, float *y, int nthreads) {
    const int nb = k / QK;
    void *buf = scratch(acts_bytes(m, nb));
    if (!buf) return -1;
    const acts xq = acts_in(buf, m, nb);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < m; i++) quantize_row(x + (size_t)i * k, &xq, i);
#pragma omp for schedule(static) nowait
        for (int t = 0; t < nthreads; t++) {
            const int r0 = (int)((long)n * t / nthreads), r1 = (int)((long)n * (t + 1) / nthreads);
            matmul_rows(qtype, w, r0, r1, &xq, m, y, n);
        }
    }
    return 0;
}

/* out[i, :] = the dequantised row ids[i] of the repacked W [*, k] (an embedding lookup) */
void dequant_rows(const uint8_t *w, int qtype, int k, const int64_t *ids, int n, float *out) {
    const int nb = k / QK, nbp = padded(nb);
    const size_t rb = packed_row_bytes(qtype, k);
    for (int i = 0; i < n; i++) {
        const uint8_t *row = w + (size_t)ids[i] * rb, *qs = row + quants_at(qtype, nb);
        float *o = out + (size_t)i * k;
        for (int b = 0; b < nb; b++) {
            const float d = f16_at(row + 2 * b);
            const uint8_t *q = qs + (size_t)b * QUANT_BYTES[qtype];
            for (int j = 0; j < QK; j++) {
                if (qtype == Q8_0) {
                    o[b * QK + j] = d * (float)(int8_t)q[j];
                } else {
                    const int v = j < 16 ? q[j] & 15 : q[j - 16] >> 4;
                    o[b * QK + j] = qtype == Q4_1 ? d * (float)v + f16_at(row + 2 * (nbp + b)) : d * (float)(v - 8);
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
