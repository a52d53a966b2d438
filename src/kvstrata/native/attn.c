/* Attention of one query over its context in the paged pool, as partials over fixed chunks of CHUNK
 * positions (flash-decoding), merged in chunk order. A query's chunks are fixed by its absolute
 * positions, so its arithmetic is the same in a prefill chunk, a decode step, alone or batched. */
#include <math.h>
#include <string.h>

#include "kv.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Softmax over each head's scores in sc (H, CHUNK), in place; (max, sum) per head into pml. */
static void softmax_rows(float *sc, float *pml, int H, int n) {
    for (int hh = 0; hh < H; hh++) {
        float *s = sc + hh * CHUNK, mx = -INFINITY, sum = 0.0f;
#if defined(__AVX512F__)
        /* the maximum in 16 lanes (a max is exact in any order: the same value as one scalar chain) */
        __m512 m16 = _mm512_set1_ps(-INFINITY);
        int t = 0;
        for (; t + 16 <= n; t += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(s + t));
        if (t < n) m16 = _mm512_mask_max_ps(m16, (__mmask16)((1u << (n - t)) - 1), m16, _mm512_loadu_ps(s + t));
        mx = _mm512_reduce_max_ps(m16);
#else
        for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
#endif
        #pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) { s[t] = exp_neg(s[t] - mx); sum += s[t]; }
        pml[2 * hh] = mx; pml[2 * hh + 1] = sum;
    }
}

/* K / V element types of the pool: fp32, fp16 or bf16 (half the bytes; stored with round-to-nearest-
 * even, as torch's .to() rounds, read back exactly). */
typedef _Float16 f16;
typedef uint16_t bf16;
static inline float ld_f32(const float *p, int i) { return p[i]; }
static inline float ld_f16(const f16 *p, int i) { return (float)p[i]; }
static inline float ld_bf16(const bf16 *p, int i) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)p[i] << 16;
    return v.f;
}

/* One work item: every query head of one sequence over `n` context positions whose pool rows start at
 * element offsets rows[0..n) (a position's K, or V, for all KV heads is one contiguous row; a block's
 * rows are adjacent). Writes the unnormalized output po (H, D) and (max, sum) per head; sc: (H, CHUNK). */
#define ATTN_ITEM_C(SUF, T)                                                                                    \
static void attn_item_c##SUF(const AttnShape *m, const float *q, const void *kcv, const void *vcv,                 \
                             const int64_t *rows, int n, float *po, float *pml, float *sc) {                   \
    const T *kc = kcv, *vc = vcv;                                                                              \
    const int D = m->D, H = m->H, G = H / m->KVH;                                                              \
    for (int t = 0; t < n; t++) {                                                                              \
        const T *kr = kc + rows[t];                                                                            \
        if (t + 2 < n) __builtin_prefetch(kc + rows[t + 2]);                                                   \
        for (int hh = 0; hh < H; hh++) {                                                                       \
            const float *qh = q + (size_t)hh * D;                                                              \
            const T *kh = kr + (size_t)(hh / G) * D;                                                           \
            float s = 0.0f;                                                                                    \
            _Pragma("omp simd reduction(+ : s)")                                                               \
            for (int d = 0; d < D; d++) s += qh[d] * ld##SUF(kh, d);                                           \
            sc[hh * CHUNK + t] = s * m->scale;                                                                 \
        }                                                                                                      \
    }                                                                                                          \
    softmax_rows(sc, pml, H, n);                                                                               \
    memset(po, 0, sizeof(float) * H * D);                                                                      \
    for (int t = 0; t < n; t++) {                                                                              \
        const T *vr = vc + rows[t];                                                                            \
        if (t + 2 < n) __builtin_prefetch(vc + rows[t + 2]);                                                   \
        for (int hh = 0; hh < H; hh++) {                                                                       \
            float p = sc[hh * CHUNK + t], *o = po + (size_t)hh * D;                                            \
            const T *vh = vr + (size_t)(hh / G) * D;                                                           \
            _Pragma("omp simd")                                                                                \
            for (int d = 0; d < D; d++) o[d] += p * ld##SUF(vh, d);                                            \
        }                                                                                                      \
    }                                                                                                          \
}
ATTN_ITEM_C(_f32, float)
ATTN_ITEM_C(_f16, f16)
ATTN_ITEM_C(_bf16, bf16)

#if defined(__AVX512F__)
static inline void prefetch_row(const void *r, int bytes) {
    for (int i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)r + i);
}
static inline __m512 ld16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16_f16(const f16 *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512 ld16_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Values of one query: po (H, D) = sum over its n positions of p * V, each V row loaded once per group of
 * up to VG query heads that share it, their outputs accumulating in registers (position order). */
#define PV_AVX512(NV, SUF, T)                                                                                  \
static inline __attribute__((always_inline)) void pv_##NV##SUF(const AttnShape *m, const T *vc,               \
        const int64_t *rows, int n, const float *sc, float *po) {                                              \
    const int H = m->H, KVH = m->KVH, G = H / KVH, D = 16 * NV;                                                \
    enum { VG = 16 / NV }; /* query heads per pass over V: VG * NV accumulator registers */                    \
    for (int h = 0; h < KVH; h++) {                                                                            \
        const T *vh = vc + (size_t)h * D;                                                                      \
        for (int g0 = 0; g0 < G; g0 += VG) {                                                                   \
            const int gn = G - g0 < VG ? G - g0 : VG;                                                          \
            const float *p = sc + (h * G + g0) * CHUNK;                                                        \
            __m512 acc[VG][NV];                                                                                \
            for (int g = 0; g < VG; g++)                                                                       \
                for (int j = 0; j < NV; j++) acc[g][j] = _mm512_setzero_ps();                                  \
            for (int t = 0; t < n; t++) {                                                                      \
                __m512 v[NV];                                                                                  \
                for (int j = 0; j < NV; j++) v[j] = ld16##SUF(vh + rows[t] + 16 * j);                          \
                for (int g = 0; g < VG; g++) {                                                                 \
                    if (g >= gn) break;                                                                        \
                    __m512 pv = _mm512_set1_ps(p[g * CHUNK + t]);                                              \
                    for (int j = 0; j < NV; j++) acc[g][j] = _mm512_fmadd_ps(pv, v[j], acc[g][j]);             \
                }                                                                                              \
            }                                                                                                  \
            for (int g = 0; g < gn; g++)                                                                       \
                for (int j = 0; j < NV; j++) _mm512_storeu_ps(po + (size_t)(h * G + g0 + g) * D + 16 * j, acc[g][j]); \
        }                                                                                                      \
    }                                                                                                          \
}

/* The same for head_dim = 16 * NV with AVX-512, one query (decode): a head's K row and its output
 * accumulators live in registers and each dot product is reduced with a shuffle tree. Memory: whole K rows
 * are prefetched PF_AHEAD positions ahead (a pool block is only block_size rows, too short for the
 * hardware prefetchers to ramp up on), and each position's V row is requested as its K row is read, so the
 * two streams share the score loop and the value loop finds its rows in cache (requesting all of V in one
 * burst before the softmax was 12 % slower at 4,096 context). */
#define PF_AHEAD 8
#define PVX 6 /* query heads per pass over V in pvx4 */

/* Scores for head_dim 64 (NV = 4), four positions at a time: their K rows (per KV head, 16 registers) are
 * loaded once for every query head of every query, and one query head's four dot products are reduced
 * together (hsum4) and stored as four adjacent scores, instead of four heads' products of one position
 * gathered through the stack. Each score is the product loop and reduction tree of the one-position loop
 * below (which head_dim 128 keeps: its 4 positions would take 32 registers), so the same bits; a 5-row
 * draft step at 2,800 context took 0.96x the time, a lone decode at 4,096 the same. */
#define ATTN_ROWS4P(SUF, T)                                                                                    \
static inline __attribute__((always_inline)) void scores4p##SUF(const AttnShape *m, const float *q,           \
        size_t qstride, int nq, const int *nj, int n, const T *kc, const T *vc, const int64_t *rows, float *sc) { \
    const int H = m->H, KVH = m->KVH, G = H / KVH, D = 64, row = KVH * D * (int)sizeof(T);                     \
    const __m512 vscale = _mm512_set1_ps(m->scale);                                                            \
    const __m512i pick = _mm512_set_epi32(15, 14, 13, 11, 10, 9, 7, 6, 5, 3, 2, 1, 12, 8, 4, 0);             \
    for (int t = 0; t < n && t < PF_AHEAD; t++) prefetch_row(kc + rows[t], row);                               \
    for (int t0 = 0; t0 < n; t0 += 4) {                                                                        \
        const int tn = n - t0 < 4 ? n - t0 : 4;                                                                \
        const T *kr[4];                                                                                        \
        for (int i = 0; i < 4; i++) {                                                                          \
            const int t = t0 + (i < tn ? i : tn - 1);                                                          \
            kr[i] = kc + rows[t];                                                                              \
            if (i < tn) {                                                                                      \
                if (t + PF_AHEAD < n) prefetch_row(kc + rows[t + PF_AHEAD], row);                              \
                prefetch_row(vc + rows[t], row);                                                               \
            }                                                                                                  \
        }                                                                                                      \
        for (int h = 0; h < KVH; h++) {                                                                        \
            __m512 k[4][4];                                                                                    \
            for (int i = 0; i < 4; i++)                                                                        \
                for (int j = 0; j < 4; j++) k[i][j] = ld16##SUF(kr[i] + h * D + 16 * j);                       \
            for (int qi = 0; qi < nq; qi++) {                                                                  \
                if (t0 >= nj[qi]) continue;                                                                    \
                for (int g = 0; g < G; g++) {                                                                  \
                    const float *qh = q + qi * qstride + (size_t)(h * G + g) * D;                              \
                    const __m512 q0 = _mm512_loadu_ps(qh), q1 = _mm512_loadu_ps(qh + 16),                      \
                                 q2 = _mm512_loadu_ps(qh + 32), q3 = _mm512_loadu_ps(qh + 48);                 \
                    __m512 a[4];                                                                               \
                    for (int i = 0; i < 4; i++) {                                                              \
                        a[i] = _mm512_mul_ps(q0, k[i][0]);                                                     \
                        a[i] = _mm512_fmadd_ps(q1, k[i][1], a[i]);                                             \
                        a[i] = _mm512_fmadd_ps(q2, k[i][2], a[i]);                                             \
                        a[i] = _mm512_fmadd_ps(q3, k[i][3], a[i]);                                             \
                    }                                                                                          \
                    __m512 s = _mm512_permutexvar_ps(pick, _mm512_mul_ps(hsum4(a[0], a[1], a[2], a[3]), vscale)); \
                    _mm512_mask_storeu_ps(sc + ((size_t)qi * H + h * G + g) * CHUNK + t0, (__mmask16)((1u << tn) - 1), s); \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
}                                                                                                              \
/* Values for head_dim 64 of every query of a chunk (sc: (nq, H, CHUNK), each query's softmax done): the  \
 * query heads of all queries that share a KV head go through its V rows in passes of up to PVX (24         \
 * accumulator registers), each V row converted once per pass, not once per query. Each output still      \
 * accumulates p * V from zero in position order over its own query's positions (pv above), so the same   \
 * bits; past the shortest query of the pass (the drafts' last chunk), a V row goes to the queries that     \
 * reach it. */                                                                                           \
static inline __attribute__((always_inline)) void pvx4##SUF(const AttnShape *m, const T *vc, const int64_t *rows, \
        int h0, int h1, size_t hstride, int nq, const int *nj, const float *sc, float *po, size_t postride) {   \
    const int H = m->H, G = H / m->KVH, D = 64;                                                                \
    for (int h = h0; h < h1; h++) {                                                                            \
        const T *vh = vc + (size_t)h * hstride;                                                                \
        for (int idx = 0; idx < nq * G;) {                                                                     \
            const float *p[PVX];                                                                               \
            float *o[PVX];                                                                                     \
            int n[PVX], cnt = 0, nmin = CHUNK, nmax = 0;                                                       \
            for (; idx < nq * G && cnt < PVX; idx++) {                                                         \
                const int j = idx / G, g = idx % G;                                                            \
                if (nj[j] <= 0) continue;                                                                      \
                p[cnt] = sc + ((size_t)j * H + h * G + g) * CHUNK;                                             \
                o[cnt] = po + j * postride + (size_t)(h * G + g) * D;                                          \
                n[cnt] = nj[j];                                                                                \
                nmin = nj[j] < nmin ? nj[j] : nmin;                                                            \
                nmax = nj[j] > nmax ? nj[j] : nmax;                                                            \
                cnt++;                                                                                         \
            }                                                                                                  \
            if (cnt == 0) break;                                                                               \
            __m512 acc[PVX][4];                                                                                \
            for (int i = 0; i < PVX; i++)                                                                      \
                for (int k = 0; k < 4; k++) acc[i][k] = _mm512_setzero_ps();                                   \
            for (int t = 0; t < nmin; t++) {                                                                   \
                __m512 v[4];                                                                                   \
                for (int k = 0; k < 4; k++) v[k] = ld16##SUF(vh + rows[t] + 16 * k);                           \
                for (int i = 0; i < PVX; i++) {                                                                \
                    if (i >= cnt) break;                                                                       \
                    const __m512 pv = _mm512_set1_ps(p[i][t]);                                                 \
                    for (int k = 0; k < 4; k++) acc[i][k] = _mm512_fmadd_ps(pv, v[k], acc[i][k]);              \
                }                                                                                              \
            }                                                                                                  \
            for (int t = nmin; t < nmax; t++) {                                                                \
                __m512 v[4];                                                                                   \
                for (int k = 0; k < 4; k++) v[k] = ld16##SUF(vh + rows[t] + 16 * k);                           \
                for (int i = 0; i < PVX; i++) {                                                                \
                    if (i >= cnt) break;                                                                       \
                    if (t >= n[i]) continue;                                                                   \
                    const __m512 pv = _mm512_set1_ps(p[i][t]);                                                 \
                    for (int k = 0; k < 4; k++) acc[i][k] = _mm512_fmadd_ps(pv, v[k], acc[i][k]);              \
                }                                                                                              \
            }                                                                                                  \
            for (int i = 0; i < cnt; i++)                                                                      \
                for (int k = 0; k < 4; k++) _mm512_storeu_ps(o[i] + 16 * k, acc[i][k]);                        \
        }                                                                                                      \
    }                                                                                                          \
}
#define ATTN_ITEM_AVX512(NV, SUF, T)                                                                           \
PV_AVX512(NV, SUF, T)                                                                                          \
/* Each query's softmax over its scores (sc: (nq, H, CHUNK)) and its values, as one query alone (head_dim \
 * 64: the values of all of them in shared passes over V, pvx4, the same bits). */                        \
static inline __attribute__((always_inline)) void values_##NV##SUF(const AttnShape *m, const T *vc,           \
        const int64_t *rows, int nq, const int *nj, float *sc, float *po, size_t postride, float *pml,         \
        size_t pmlstride, float *vf) {                                                                         \
    for (int j = 0; j < nq; j++) {                                                                             \
        if (nj[j] <= 0) continue;                                                                              \
        float *scj = sc + (size_t)j * m->H * CHUNK;                                                            \
        softmax_rows(scj, pml + j * pmlstride, m->H, nj[j]);                                                   \
        if (NV != 4) pv_##NV##SUF(m, vc, rows, nj[j], scj, po + j * postride);                                 \
    }                                                                                                          \
    if (NV == 4 && vf != NULL && sizeof(T) != 4) { /* KV head by KV head, over its V rows converted once */    \
        int n = 0;                                                                                             \
        int64_t frows[CHUNK];                                                                                  \
        for (int j = 0; j < nq; j++) n = nj[j] > n ? nj[j] : n;                                                \
        for (int t = 0; t < n; t++) frows[t] = (int64_t)t * 64;                                                \
        for (int h = 0; h < m->KVH; h++) {                                                                     \
            for (int t = 0; t < n; t++)                                                                        \
                for (int k = 0; k < 4; k++)                                                                    \
                    _mm512_store_ps(vf + t * 64 + 16 * k, ld16##SUF(vc + rows[t] + (size_t)h * 64 + 16 * k));  \
            pvx4_f32(m, vf, frows, h, h + 1, 0, nq, nj, sc, po, postride);                                     \
        }                                                                                                      \
    } else if (NV == 4) {                                                                                      \
        pvx4##SUF(m, vc, rows, 0, m->KVH, 64, nq, nj, sc, po, postride);                                       \
    }                                                                                                          \
}                                                                                                              \
/* nq consecutive queries of one sequence over one chunk (nq = 1: a decode; more: a decode row and its     \
 * drafts), each position's K row loaded once for all of them; each query's scores, softmax and values are \
 * computed as they would be alone, so a query gets the same bits in either. head_dim 64 goes through     \
 * scores4p; here (head_dim 128) a position's dot products are reduced four at a time (hsum4: the tree of \
 * _mm512_reduce_add_ps, so the same bits; measured at head_dim 64 before scores4p: a draft step at 2,800   \
 * context 0.94-0.96x the time of one reduction each, a lone decode 0.99x). */                             \
static inline __attribute__((always_inline)) void attn_rows_##NV##SUF(const AttnShape *m, const float *q,     \
        size_t qstride, int nq, const int *nj, const void *kcv, const void *vcv, const int64_t *rows,          \
        float *po, size_t postride, float *pml, size_t pmlstride, float *sc) {                                 \
    const T *kc = kcv, *vc = vcv;                                                                              \
    const int H = m->H, KVH = m->KVH, G = H / KVH, D = 16 * NV, row = KVH * D * (int)sizeof(T);                \
    const float scale = m->scale;                                                                              \
    int n = 0;                                                                                                 \
    for (int j = 0; j < nq; j++) n = nj[j] > n ? nj[j] : n;                                                    \
    if (NV == 4) {                                                                                             \
        scores4p##SUF(m, q, qstride, nq, nj, n, kc, vc, rows, sc);                                             \
        values_##NV##SUF(m, vc, rows, nq, nj, sc, po, postride, pml, pmlstride, NULL);                         \
        return;                                                                                                \
    }                                                                                                          \
    for (int t = 0; t < n && t < PF_AHEAD; t++) prefetch_row(kc + rows[t], row);                               \
    const __m512 vscale = _mm512_set1_ps(scale);                                                               \
    for (int t = 0; t < n; t++) {                                                                              \
        const T *kr = kc + rows[t];                                                                            \
        if (t + PF_AHEAD < n) prefetch_row(kc + rows[t + PF_AHEAD], row);                                      \
        prefetch_row(vc + rows[t], row);                                                                       \
        __m512 pend[4];                                                                                        \
        float *dst[4];                                                                                         \
        int np = 0;                                                                                            \
        for (int h = 0; h < KVH; h++) {                                                                        \
            __m512 k[NV];                                                                                      \
            for (int j = 0; j < NV; j++) k[j] = ld16##SUF(kr + h * D + 16 * j);                                \
            for (int qi = 0; qi < nq; qi++) {                                                                  \
                if (t >= nj[qi]) continue;                                                                     \
                for (int g = 0; g < G; g++) {                                                                  \
                    const float *qh = q + qi * qstride + (size_t)(h * G + g) * D;                              \
                    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);                                     \
                    for (int j = 1; j < NV; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * j), k[j], acc); \
                    pend[np] = acc;                                                                            \
                    dst[np++] = sc + ((size_t)qi * H + h * G + g) * CHUNK + t;                                 \
                    if (np == 4) {                                                                             \
                        float r[16];                                                                           \
                        _mm512_storeu_ps(r, _mm512_mul_ps(hsum4(pend[0], pend[1], pend[2], pend[3]), vscale)); \
                        *dst[0] = r[0]; *dst[1] = r[4]; *dst[2] = r[8]; *dst[3] = r[12];                       \
                        np = 0;                                                                                \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int i = 0; i < np; i++) *dst[i] = _mm512_reduce_add_ps(pend[i]) * scale;                          \
    }                                                                                                          \
    values_##NV##SUF(m, vc, rows, nq, nj, sc, po, postride, pml, pmlstride, NULL);                             \
}                                                                                                              \
static void attn_item_##NV##SUF(const AttnShape *m, const float *q, const void *kcv, const void *vcv,          \
                                const int64_t *rows, int n, float *po, float *pml, float *sc) {                \
    attn_rows_##NV##SUF(m, q, 0, 1, &n, kcv, vcv, rows, po, 0, pml, 0, sc);                                    \
}                                                                                                              \
static void attn_multi_##NV##SUF(const AttnShape *m, const float *q, size_t qstride, int nq, const int *nj,    \
                                 const void *kcv, const void *vcv, const int64_t *rows, float *po,             \
                                 size_t postride, float *pml, size_t pmlstride, float *sc) {                   \
    attn_rows_##NV##SUF(m, q, qstride, nq, nj, kcv, vcv, rows, po, postride, pml, pmlstride, sc);              \
}                                                                                                              \
/* Scores of one query head over up to 16 positions: the same products as above (q * k, then FMAs, in  \
 * lanes), the 16 lane vectors reduced together (hsum16: the bits of 16 separate reductions). */          \
static inline __attribute__((always_inline)) void scores16_##NV##SUF(const T *kc, const int64_t *rows,        \
        const float *qh, int kvo, int tn, float scale, float *out) {                                           \
    __m512 qv[NV], acc[16];                                                                                    \
    for (int j = 0; j < NV; j++) qv[j] = _mm512_loadu_ps(qh + 16 * j);                                        \
    for (int i = 0; i < 16; i++) {                                                                             \
        if (i < tn) {                                                                                          \
            const T *kh = kc + rows[i] + kvo;                                                                  \
            __m512 a = _mm512_mul_ps(qv[0], ld16##SUF(kh));                                                    \
            for (int j = 1; j < NV; j++) a = _mm512_fmadd_ps(qv[j], ld16##SUF(kh + 16 * j), a);                \
            acc[i] = a;                                                                                        \
        } else {                                                                                               \
            acc[i] = _mm512_setzero_ps();                                                                      \
        }                                                                                                      \
    }                                                                                                          \
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << tn) - 1), _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale))); \
}                                                                                                              \
/* Several queries of one sequence over one chunk (prefill): each group of 16 K rows is read from L1 by every  \
 * query head of every query before the next group; values per query as above. A 16-bit pool's rows are        \
 * converted to fp32 once per KV head (exact), not once per query head, then the same products in the same     \
 * order: K per group of 16 (a 256-row chunk over 1,024 positions: 0.75x the time), V per chunk (0.98x;        \
 * not in decode's few-row steps, where it cost 4 % at 4 rows). */                                             \
static void attn_block_##NV##SUF(const AttnShape *m, const float *q, size_t qstride, int nq, const int *nj,    \
                                 const void *kcv, const void *vcv, const int64_t *rows, float *po,             \
                                 size_t postride, float *pml, size_t pmlstride, float *sc) {                   \
    const T *kc = kcv, *vc = vcv;                                                                              \
    const int H = m->H, KVH = m->KVH, G = H / KVH, D = 16 * NV, row = KVH * D * (int)sizeof(T);                \
    int n = 0;                                                                                                 \
    for (int j = 0; j < nq; j++) n = nj[j] > n ? nj[j] : n;                                                    \
    for (int t = 0; t < n && t < 16; t++) prefetch_row(kc + rows[t], row);                                     \
    float kf[16 * D] __attribute__((aligned(64))), vf[NV == 4 ? CHUNK * 64 : 1] __attribute__((aligned(64))); \
    int64_t kfrows[16];                                                                                        \
    for (int i = 0; i < 16; i++) kfrows[i] = (int64_t)i * D;                                                   \
    for (int t0 = 0; t0 < n; t0 += 16) {                                                                       \
        for (int t = t0 + 16; t < t0 + 32 && t < n; t++) prefetch_row(kc + rows[t], row);                      \
        const int tg = n - t0 < 16 ? n - t0 : 16;                                                              \
        for (int h = 0; h < KVH; h++) {                                                                        \
            if (sizeof(T) != 4)                                                                                \
                for (int i = 0; i < tg; i++)                                                                   \
                    for (int j = 0; j < NV; j++)                                                               \
                        _mm512_store_ps(kf + i * D + 16 * j, ld16##SUF(kc + rows[t0 + i] + h * D + 16 * j));   \
            for (int j = 0; j < nq; j++) {                                                                     \
                const int tn = nj[j] - t0 < 16 ? nj[j] - t0 : 16;                                              \
                if (tn <= 0) continue;                                                                         \
                for (int g = 0; g < G; g++) {                                                                  \
                    const int hq = h * G + g;                                                                  \
                    const float *qh = q + j * qstride + (size_t)hq * D;                                        \
                    float *out = sc + ((size_t)j * H + hq) * CHUNK + t0;                                       \
                    if (sizeof(T) != 4) {                                                                      \
                        if (tn == 16) scores16_##NV##_f32(kf, kfrows, qh, 0, 16, m->scale, out);               \
                        else scores16_##NV##_f32(kf, kfrows, qh, 0, tn, m->scale, out);                        \
                    } else {                                                                                   \
                        if (tn == 16) scores16_##NV##SUF(kc, rows + t0, qh, h * D, 16, m->scale, out);         \
                        else scores16_##NV##SUF(kc, rows + t0, qh, h * D, tn, m->scale, out);                  \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    values_##NV##SUF(m, vc, rows, nq, nj, sc, po, postride, pml, pmlstride, vf);                               \
}
ATTN_ROWS4P(_f32, float)
ATTN_ROWS4P(_f16, f16)
ATTN_ROWS4P(_bf16, bf16)
ATTN_ITEM_AVX512(4, _f32, float)
ATTN_ITEM_AVX512(8, _f32, float)
ATTN_ITEM_AVX512(4, _f16, f16)
ATTN_ITEM_AVX512(8, _f16, f16)
ATTN_ITEM_AVX512(4, _bf16, bf16)
ATTN_ITEM_AVX512(8, _bf16, bf16)
#endif

/* Without a vectorized block kernel: each query through its one-query kernel (the same bits by definition). */
static void attn_block_each(const AttnShape *m, const float *q, size_t qstride, int nq, const int *nj, const void *kc,
                            const void *vc, const int64_t *rows, float *po, size_t postride, float *pml,
                            size_t pmlstride, float *sc) {
    attn_fn one = pick_attn(m->D, m->kvt);
    for (int j = 0; j < nq; j++)
        if (nj[j] > 0) one(m, q + j * qstride, kc, vc, rows, nj[j], po + j * postride, pml + j * pmlstride, sc);
}

attn_block_fn pick_attn_block(int D, int kvt) {
#if defined(__AVX512F__)
    if (D == 64) return kvt == KV_F16 ? attn_block_4_f16 : kvt == KV_BF16 ? attn_block_4_bf16 : attn_block_4_f32;
    if (D == 128) return kvt == KV_F16 ? attn_block_8_f16 : kvt == KV_BF16 ? attn_block_8_bf16 : attn_block_8_f32;
#endif
    return attn_block_each;
}

attn_block_fn pick_attn_multi(int D, int kvt) {
#if defined(__AVX512F__)
    if (D == 64) return kvt == KV_F16 ? attn_multi_4_f16 : kvt == KV_BF16 ? attn_multi_4_bf16 : attn_multi_4_f32;
    if (D == 128) return kvt == KV_F16 ? attn_multi_8_f16 : kvt == KV_BF16 ? attn_multi_8_bf16 : attn_multi_8_f32;
#endif
    return attn_block_each;
}

attn_fn pick_attn(int D, int kvt) {
#if defined(__AVX512F__)
    if (D == 64) return kvt == KV_F16 ? attn_item_4_f16 : kvt == KV_BF16 ? attn_item_4_bf16 : attn_item_4_f32;
    if (D == 128) return kvt == KV_F16 ? attn_item_8_f16 : kvt == KV_BF16 ? attn_item_8_bf16 : attn_item_8_f32;
#endif
    return kvt == KV_F16 ? attn_item_c_f16 : kvt == KV_BF16 ? attn_item_c_bf16 : attn_item_c_f32;
}

/* The partials of one query, in chunk order, merged with the usual max / sum rescaling: one formula for
 * every query, however its chunks were spread over threads. */
void merge_partials(const AttnShape *m, int nc, const float *po, const float *pml, float *out) {
    const int H = m->H, D = m->D;
    float w[nc]; /* each chunk's weight e^(max_c - max), computed once per head for all outputs */
    for (int hh = 0; hh < H; hh++) {
        float mx = -INFINITY, sum = 0.0f, *o = out + (size_t)hh * D;
        for (int c = 0; c < nc; c++) { float v = pml[(size_t)c * H * 2 + 2 * hh]; mx = v > mx ? v : mx; }
        for (int c = 0; c < nc; c++) {
            const float *ml = pml + (size_t)c * H * 2 + 2 * hh;
            w[c] = expf(ml[0] - mx);
            sum += w[c] * ml[1];
        }
        const float inv = 1.0f / sum;
        int d0 = 0;
#if defined(__AVX512F__)
        /* 64 outputs at a time in registers: each element's o + w * p in chunk order, two roundings, as in
         * the loop below (which keeps o in memory: a store-to-load chain per chunk, ~4 % of a 5-row step) */
        for (; d0 + 64 <= D; d0 += 64) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int c = 0; c < nc; c++) {
                const __m512 wv = _mm512_set1_ps(w[c]);
                const float *pc = po + ((size_t)c * H + hh) * D + d0;
                for (int j = 0; j < 4; j++) acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(wv, _mm512_loadu_ps(pc + 16 * j)));
            }
            const __m512 iv = _mm512_set1_ps(inv);
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(o + d0 + 16 * j, _mm512_mul_ps(acc[j], iv));
        }
#endif
        for (int d = d0; d < D; d++) o[d] = 0.0f;
        for (int c = 0; c < nc && d0 < D; c++) {
            const float *pc = po + ((size_t)c * H + hh) * D;
            for (int d = d0; d < D; d++) o[d] += w[c] * pc[d];
        }
        for (int d = d0; d < D; d++) o[d] *= inv;
    }
}
