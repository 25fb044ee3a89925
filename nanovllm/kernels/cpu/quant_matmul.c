/* Matmuls of GGUF block-quantised weights (Q4_0, Q4_1, Q8_0), for CPUs with AVX2, FMA and F16C. Built
 * and loaded by build.py; called through ops.py on torch tensors.
 *
 * y[m, n] = x[m, k] @ W[n, k]^T, float32 in and out. GGUF blocks of 32 weights:
 *
 *   Q4_0  [d: f16][qs: 16 B]           w[j] = d * (q[j] - 8)     q[j]: low nibble of qs[j], j < 16,
 *   Q4_1  [d: f16][m: f16][qs: 16 B]   w[j] = d * q[j] + m             high nibble of qs[j - 16] above
 *   Q8_0  [d: f16][qs: 32 x int8]      w[j] = d * q[j]
 *
 * Each activation row is quantised once per call to blocks of 32 int16 with a float scale dx and
 * s = dx * sum(q) (acts, scales apart from quants): 2^-15 of a block's largest value, finer than
 * bfloat16 for all but that value (8-bit blocks, as llama.cpp's, lose too much where a row has outliers:
 * measured, half the greedy replies of SmolLM2 then leave the float32 model's within 32 tokens).
 *
 * repack_rows() lays the weights out once, at load, in groups of GR = 8 rows whose blocks are
 * interleaved, so that one vector holds the same two columns of eight rows (the same bytes, the last
 * group padded with zero rows):
 *
 *   group g = [block 0 of rows 8g..8g+7][block 1 ...] ...,   a group-block = [d: f16 x 8][m: f16 x 8,
 *   Q4_1 only][quants]: Q8_0: 16 chunks p of 16 bytes, byte 2r + e = q[r][2p + e]; Q4: 8 chunks j of
 *   16 bytes, byte 2r + e holds q[r][4j + e] (low nibble) and q[r][4j + 2 + e] (high nibble).
 *
 * A chunk widened to int16 is then [q[0][c], q[0][c + 1], q[1][c], q[1][c + 1], ...], and
 * _mm256_madd_epi16 with the activation pair (x[c], x[c + 1]) broadcast to every lane adds the two
 * products of each of the eight rows into its int32 lane: 16 multiply-adds of one block's exact integer
 * sum per instruction and one add, with no horizontal sums (2 * 128 * 32767 * 16 fits in int32). Per
 * block and activation row the eight sums I are scaled at once:
 *
 *   Q4_0: dw * dx * I - 8 * dw * s        Q4_1: dw * dx * I + mw * s        Q8_0: dw * dx * I
 *
 * and the eight float lanes are the outputs of the eight rows, stored as they are.
 *
 * Threads split the groups (each thread streams its own contiguous groups once); within a thread a
 * group is multiplied with MT activation rows at a time while its bytes sit in L1, so a batch of rows
 * does not multiply the weight traffic. Activation rows are taken CHUNK_M at a time so that their
 * quantised blocks stay in L2 for a long prompt.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

enum { GR = 8, MT = 4, CHUNK_M = 64 };
static const int BLOCK_BYTES[3] = {18, 20, 34};
static const int QUANT_BYTES[3] = {16, 16, 32};
static const int SCALE_BYTES[3] = {16, 32, 16}; /* a group-block's 8 d (and 8 m) as float16 */

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

INLINE size_t group_bytes(int qtype, int nb) { return (size_t)nb * GR * BLOCK_BYTES[qtype]; }

size_t packed_bytes(int qtype, int n, int k) { return (size_t)((n + GR - 1) / GR) * group_bytes(qtype, k / QK); }

/* A GGUF block's quants qs (row r of its group) into a group-block's quants o, or back (to_gguf). Q4: byte
 * 2r + e of chunk j holds columns 4j + e and 4j + 2 + e, which GGUF keeps in the low nibbles of bytes
 * 4j + e and 4j + 2 + e for j < 4 and in the high nibbles of bytes 4j + e - 16 and 4j + e - 14 above. */
INLINE void move_quants(int qtype, uint8_t *qs, uint8_t *o, int r, int to_gguf) {
    if (qtype == Q8_0) {
        for (int p = 0; p < QK / 2; p++) {
            if (to_gguf) memcpy(qs + 2 * p, o + 16 * p + 2 * r, 2);
            else memcpy(o + 16 * p + 2 * r, qs + 2 * p, 2);
        }
        return;
    }
    if (to_gguf) memset(qs, 0, 16);
    for (int j = 0; j < QK / 4; j++) {
        for (int e = 0; e < 2; e++) {
            const int a = (4 * j + e) % 16, high = j >= 4; /* a, a + 2: the GGUF bytes holding them */
            uint8_t *byte = o + 16 * j + 2 * r + e;
            if (to_gguf) {
                qs[a] |= (uint8_t)((*byte & 15) << (4 * high));
                qs[a + 2] |= (uint8_t)((*byte >> 4) << (4 * high));
            } else {
                *byte = high ? (uint8_t)((qs[a] >> 4) | (qs[a + 2] & 0xF0)) : (uint8_t)((qs[a] & 15) | (qs[a + 2] << 4));
            }
        }
    }
}

/* GGUF rows [n, k / 32 blocks] <-> the grouped layout above (packed_bytes(qtype, n, k) bytes), a
 * group-block at a time (its bytes written in order) */
static void regroup(uint8_t *raw, int qtype, int n, int k, uint8_t *w, int to_gguf) {
    const int nb = k / QK, bb = BLOCK_BYTES[qtype], sb = SCALE_BYTES[qtype], scales = qtype == Q4_1 ? 2 : 1;
    const int ng = (n + GR - 1) / GR;
    if (!to_gguf && n % GR) memset(w + (size_t)(ng - 1) * group_bytes(qtype, nb), 0, group_bytes(qtype, nb));
    for (int g = 0; g < ng; g++) {
        const int rows = n - g * GR < GR ? n - g * GR : GR;
        for (int b = 0; b < nb; b++) {
            uint8_t *o = w + (size_t)g * group_bytes(qtype, nb) + (size_t)b * GR * bb;
            for (int r = 0; r < rows; r++) {
                uint8_t *blk = raw + ((size_t)(g * GR + r) * nb + b) * bb;
                for (int j = 0; j < scales; j++) {
                    if (to_gguf) memcpy(blk + 2 * j, o + 16 * j + 2 * r, 2);
                    else memcpy(o + 16 * j + 2 * r, blk + 2 * j, 2);
                }
                move_quants(qtype, blk + bb - QUANT_BYTES[qtype], o + sb, r, to_gguf);
            }
        }
    }
}

void repack_rows(const uint8_t *raw, int qtype, int n, int k, uint8_t *out) {
    regroup((uint8_t *)raw, qtype, n, k, out, 0);
}

void unpack_rows(const uint8_t *w, int qtype, int n, int k, uint8_t *raw) {
    regroup(raw, qtype, n, k, (uint8_t *)w, 1);
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
    a->d[(size_t)i * a->nb + b] = d;
    a->s[(size_t)i * a->nb + b] = d * (float)sum;
}

static void quantize_row(const float *x, const acts *a, int i) {
    for (int b = 0; b < a->nb; b++) quantize_block(x + b * QK, a, i, b);
}

/* activation pair (x[2p], x[2p + 1]) of a block's quants xq, in every 32-bit lane */
INLINE __m256i pair(const int16_t *xq, int p) {
    int32_t v;
    memcpy(&v, xq + 2 * p, 4);
    return _mm256_set1_epi32(v);
}

/* One group of GR weight rows (wg: its first group-block) against activation rows i0 .. i0 + mt - 1;
 * the first nv rows of the group (the rest are padding) to y[r + i * ys]. qtype and mt are constants at
 * every call site, so each combination compiles to its own unrolled loop. */
INLINE void group_times_tile(int qtype, const uint8_t *wg, const acts *x, int i0, int mt, float *y, int ys,
                             int nv) {
    const int nb = x->nb, gb = GR * BLOCK_BYTES[qtype];
    __m256 acc[MT];
    for (int i = 0; i < mt; i++) acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *o = wg + (size_t)b * gb, *qs = o + SCALE_BYTES[qtype];
        const int16_t *xq[MT];
        __m256i s[MT];
        for (int i = 0; i < mt; i++) {
            xq[i] = act_quants(x, i0 + i, b);
            s[i] = _mm256_setzero_si256();
        }
        if (qtype == Q8_0) {
#pragma GCC unroll 2 /* fully unrolled, gcc 12 spills the products to the stack */
            for (int p = 0; p < QK / 2; p++) {
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * p)));
                for (int i = 0; i < mt; i++) s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(w, pair(xq[i], p)));
            }
        } else {
#pragma GCC unroll 2
            for (int j = 0; j < QK / 4; j++) {
                const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * j)));
                const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
                for (int i = 0; i < mt; i++) {
                    s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(lo, pair(xq[i], 2 * j)));
                    s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(hi, pair(xq[i], 2 * j + 1)));
                }
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)o));
        const __m256 mw = qtype == Q4_1   ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(o + 16)))
                          : qtype == Q4_0 ? _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f))
                                          : _mm256_setzero_ps();
        for (int i = 0; i < mt; i++) {
            const size_t at = (size_t)(i0 + i) * nb + b;
            const __m256 sc = _mm256_mul_ps(dw, _mm256_broadcast_ss(x->d + at));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), sc, acc[i]);
            if (qtype != Q8_0) acc[i] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(x->s + at), acc[i]);
        }
    }
    if (nv == GR) {
        for (int i = 0; i < mt; i++) _mm256_storeu_ps(y + (size_t)(i0 + i) * ys, acc[i]);
    } else {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nv), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int i = 0; i < mt; i++) _mm256_maskstore_ps(y + (size_t)(i0 + i) * ys, mask, acc[i]);
    }
}

#define TILE(MT_) group_times_tile(qtype, wg, x, i, MT_, y + (size_t)g * GR, ys, nv)

INLINE void groups_times_chunk(int qtype, const uint8_t *w, int r0, int r1, const acts *x, int c0, int c1,
                               float *y, int ys) {
    const size_t gbytes = group_bytes(qtype, x->nb);
    for (int g = r0 / GR; g * GR < r1; g++) {
        const uint8_t *wg = w + (size_t)g * gbytes;
        const int nv = r1 - g * GR < GR ? r1 - g * GR : GR;
        int i = c0;
        for (; i + MT <= c1; i += MT) TILE(MT);
        switch (c1 - i) {
        case 3: TILE(3); break;
        case 2: TILE(2); break;
        case 1: TILE(1); break;
        }
    }
}

/* r0 must be a multiple of GR (a group's first row); r1 the end of a group or of the matrix */
void matmul_rows(int qtype, const uint8_t *w, int r0, int r1, const acts *x, int m, float *y, int ys) {
    for (int c = 0; c < m; c += CHUNK_M) {
        const int c1 = m - c < CHUNK_M ? m : c + CHUNK_M;
        switch (qtype) {
        case Q4_0: groups_times_chunk(Q4_0, w, r0, r1, x, c, c1, y, ys); break;
        case Q4_1: groups_times_chunk(Q4_1, w, r0, r1, x, c, c1, y, ys); break;
        default: groups_times_chunk(Q8_0, w, r0, r1, x, c, c1, y, ys); break;
        }
    }
}

void share_rows(int n, int t, int nt, int *r0, int *r1) {
    const int ng = (n + GR - 1) / GR;
    const int g0 = (int)((long)ng * t / nt), g1 = (int)((long)ng * (t + 1) / nt);
    *r0 = g0 * GR;
    *r1 = g1 * GR < n ? g1 * GR : n;
}

size_t acts_bytes(int m, int nb) { return (size_t)m * nb * (8 + 2 * QK) + 64; }

acts acts_in(void *buf, int m, int nb) {
    float *d = (float *)(((uintptr_t)buf + 31) / 32 * 32);
    return (acts){d, d + (size_t)m * nb, (int16_t *)(d + 2 * (size_t)m * nb), nb};
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
            int r0, r1;
            share_rows(n, t, nthreads, &r0, &r1);
            if (r1 > r0) matmul_rows(qtype, w, r0, r1, &xq, m, y, n);
        }
    }
    return 0;
}

/* out[i, :] = the dequantised row ids[i] of the grouped W [*, k] (an embedding lookup) */
void dequant_rows(const uint8_t *w, int qtype, int k, const int64_t *ids, int n, float *out) {
    const int nb = k / QK;
    for (int i = 0; i < n; i++) {
        const int r = (int)(ids[i] % GR);
        const uint8_t *group = w + (size_t)(ids[i] / GR) * group_bytes(qtype, nb);
        float *o = out + (size_t)i * k;
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = (uint8_t *)group + (size_t)b * GR * BLOCK_BYTES[qtype], qs[QK];
            move_quants(qtype, qs, blk + SCALE_BYTES[qtype], r, 1); /* this row's quants, GGUF order */
            const float d = f16_at(blk + 2 * r), mn = qtype == Q4_1 ? f16_at(blk + 16 + 2 * r) : 0.0f;
            for (int c = 0; c < QK; c++) {
                const int v = qtype == Q8_0 ? (int8_t)qs[c] : c < 16 ? qs[c] & 15 : qs[c - 16] >> 4;
                o[b * QK + c] = qtype == Q4_1 ? d * (float)v + mn : d * (float)(qtype == Q4_0 ? v - 8 : v);
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
