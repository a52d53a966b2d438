/* kvstrata native decode step: every layer of a Llama-family decoder for B decoding sequences, in one
 * call, over int8 weights and the engine's paged fp32 KV pool.
 *
 * Why: at batch 1 the torch path issues ~1,000 ATen ops per token, 5-8 us each, which is more than the
 * time the int8 weights take to stream from memory (see docs/peers.md). Here one OpenMP team runs the
 * whole step; the stages of a layer are `omp for` loops separated by barriers, so there is no Python,
 * no dispatcher and no allocation per token.
 *
 * Arithmetic (same as model/quant.py's int8 path up to activation rounding):
 *   - weights: int8, symmetric, one fp32 scale per output channel (the scales kvstrata already uses);
 *   - activations: each row quantized to u8 with its own scale and zero point over [min, max], as
 *     fbgemm's dynamic linear does for one row; dot products accumulate exactly in int32 and the zero
 *     point comes off with the weight row sums: y = sx * sw * (sum(q w) - zp * sum(w)) (+ bias);
 *   - RMSNorm, RoPE (sign-folded sin table), softmax and attention in fp32; attention is split over
 *     chunks of the context (flash-decoding) and merged with the usual max / sum rescaling.
 * With AVX512-VNNI the dot products use vpdpbusd (u8 x s8); elsewhere a plain loop that the compiler vectorizes for the host (-march=native).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <sys/mman.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define KV_VNNI 1
#else
#define KV_VNNI 0
#endif

#define CHUNK 128 /* context positions per attention work item */

typedef struct {
    const int8_t *w;  /* (n, k) row-major */
    const float *s;   /* (n,) per-row scale */
    const int32_t *rs;/* (n,) sum of each row's int8 weights (the zero-point correction) */
    const float *b;   /* (n,) bias or NULL */
    int n, k;
} QMat;

typedef struct {
    int L, H, KVH, D, hidden, inter, vocab, bs, max_pos, kv16; /* kv16: the pool holds fp16, else fp32 */
    float eps, scale;
    QMat *qkv, *o, *gu, *dn; /* per layer */
    const float **ln1, **ln2;
    const float *norm, *embed, *cos_t, *sin_t;
    QMat head;
    void *arena;        /* every QMat's arrays, packed by pack_weights */
    size_t arena_bytes;
    /* shared workspace, grown on demand (per-thread scratch: see Scratch) */
    int cap_b, cap_items;
    float *x, *qkvb, *gub, *act, *po, *pml;
    int *it_b, *it_c, *first_item;
    char *scratch;        /* per-thread Scratch areas, nthreads x scratch_bytes(B) rounded to 64 */
    size_t scratch_cap;
} Model;

int kv_has_vnni(void) { return KV_VNNI; }

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    return q;
}

void kv_model_free(void *mp);

/* Copies every int8 matrix with its scales, row sums and bias into one arena, in the order a step reads
 * them, on 2 MiB-aligned memory advised for transparent huge pages: the step then streams one region
 * front to back with few TLB misses. The caller's copies can be dropped afterwards. */
static int pack_weights(Model *m) {
    QMat **all = malloc(sizeof(QMat *) * (4 * (size_t)m->L + 1));
    int n = 0;
    if (!all) return -1;
    for (int l = 0; l < m->L; l++) { all[n++] = &m->qkv[l]; all[n++] = &m->o[l]; all[n++] = &m->gu[l]; all[n++] = &m->dn[l]; }
    all[n++] = &m->head;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        size_t rows = (size_t)all[i]->n;
        total += ((rows * all[i]->k + 63) & ~(size_t)63) + 3 * ((4 * rows + 63) & ~(size_t)63);
    }
    const size_t huge = (size_t)2 << 20;
    total = (total + huge - 1) & ~(huge - 1);
    void *arena = NULL;
    if (posix_memalign(&arena, huge, total)) { free(all); return -1; }
#ifdef MADV_HUGEPAGE
    madvise(arena, total, MADV_HUGEPAGE);  /* advice only: without THP the copy still works */
#endif
    char *p = arena;
    for (int i = 0; i < n; i++) {
        QMat *q = all[i];
        size_t rows = (size_t)q->n, wb = (rows * q->k + 63) & ~(size_t)63, vb = (4 * rows + 63) & ~(size_t)63;
        memcpy(p, q->w, rows * q->k); q->w = (const int8_t *)p; p += wb;
        memcpy(p, q->s, 4 * rows); q->s = (const float *)p; p += vb;
        memcpy(p, q->rs, 4 * rows); q->rs = (const int32_t *)p; p += vb;
        if (q->b) { memcpy(p, q->b, 4 * rows); q->b = (const float *)p; }
        p += vb;
    }
    free(all);
    m->arena = arena;
    m->arena_bytes = total;
    return 0;
}

size_t kv_model_weight_bytes(void *mp) { return ((Model *)mp)->arena_bytes; }

void *kv_model_new(const int64_t *iv, const double *fv, const int64_t *pv) {
    /* iv: L H KVH D hidden inter vocab bs max_pos kv16; fv: eps scale;
     * pv: embed norm cos sin head(w s rs) then per layer: ln1 ln2 + 4 x (w s rs b) */
    Model *m = calloc(1, sizeof(Model));
    if (!m) return NULL;
    m->L = (int)iv[0]; m->H = (int)iv[1]; m->KVH = (int)iv[2]; m->D = (int)iv[3];
    m->hidden = (int)iv[4]; m->inter = (int)iv[5]; m->vocab = (int)iv[6]; m->bs = (int)iv[7];
    m->max_pos = (int)iv[8];
    m->kv16 = (int)iv[9];
    m->eps = (float)fv[0]; m->scale = (float)fv[1];
    int p = 0;
    m->embed = (const float *)pv[p++]; m->norm = (const float *)pv[p++];
    m->cos_t = (const float *)pv[p++]; m->sin_t = (const float *)pv[p++];
    m->head.w = (const int8_t *)pv[p++]; m->head.s = (const float *)pv[p++]; m->head.rs = (const int32_t *)pv[p++];
    m->head.b = NULL; m->head.n = m->vocab; m->head.k = m->hidden;
    int L = m->L;
    m->qkv = calloc(L, sizeof(QMat)); m->o = calloc(L, sizeof(QMat));
    m->gu = calloc(L, sizeof(QMat)); m->dn = calloc(L, sizeof(QMat));
    m->ln1 = calloc(L, sizeof(float *)); m->ln2 = calloc(L, sizeof(float *));
    if (!m->qkv || !m->o || !m->gu || !m->dn || !m->ln1 || !m->ln2) { kv_model_free(m); return NULL; }
    int nq = (m->H + 2 * m->KVH) * m->D;
    for (int l = 0; l < L; l++) {
        m->ln1[l] = (const float *)pv[p++]; m->ln2[l] = (const float *)pv[p++];
        QMat *mats[4] = {&m->qkv[l], &m->o[l], &m->gu[l], &m->dn[l]};
        int ns[4] = {nq, m->hidden, 2 * m->inter, m->hidden};
        int ks[4] = {m->hidden, m->H * m->D, m->hidden, m->inter};
        for (int j = 0; j < 4; j++) {
            mats[j]->w = (const int8_t *)pv[p++]; mats[j]->s = (const float *)pv[p++];
            mats[j]->rs = (const int32_t *)pv[p++]; mats[j]->b = (const float *)pv[p++];
            mats[j]->n = ns[j]; mats[j]->k = ks[j];
        }
    }
    if (pack_weights(m)) { kv_model_free(m); return NULL; }
    return m;
}

void kv_model_free(void *mp) {
    Model *m = mp;
    if (!m) return;
    free(m->arena);
    free(m->qkv); free(m->o); free(m->gu); free(m->dn); free(m->ln1); free(m->ln2);
    free(m->x); free(m->qkvb); free(m->gub); free(m->act);
    free(m->po); free(m->pml); free(m->it_b); free(m->it_c); free(m->first_item); free(m->scratch);
    free(m);
}

static int reserve(Model *m, int B, int items) {
    if (B > m->cap_b) {
        size_t nq = (size_t)(m->H + 2 * m->KVH) * m->D;
        m->x = xrealloc(m->x, sizeof(float) * B * m->hidden);
        m->qkvb = xrealloc(m->qkvb, sizeof(float) * B * nq);
        m->gub = xrealloc(m->gub, sizeof(float) * B * 2 * m->inter);
        m->act = xrealloc(m->act, sizeof(float) * B * m->inter);
        m->first_item = xrealloc(m->first_item, sizeof(int) * B);
        if (!m->x || !m->qkvb || !m->gub || !m->act || !m->first_item) return -1;
        m->cap_b = B;
    }
    if (items > m->cap_items) {
        m->po = xrealloc(m->po, sizeof(float) * (size_t)items * m->H * m->D);
        m->pml = xrealloc(m->pml, sizeof(float) * (size_t)items * m->H * 2);
        m->it_b = xrealloc(m->it_b, sizeof(int) * items);
        m->it_c = xrealloc(m->it_c, sizeof(int) * items);
        if (!m->po || !m->pml || !m->it_b || !m->it_c) return -1;
        m->cap_items = items;
    }
    return 0;
}

/* ---- small row ops (B x hidden floats) ------------------------------------ */

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* Asymmetric u8 per-row quantization, as fbgemm's dynamic linear does it: the range [min, max] (widened
 * to hold 0) in 255 steps, x ~ scale * (q - zp). Stores q, the scale and the zero point. */
static void quantize_row(uint8_t *q, float *scale, int32_t *zp, const float *x, int n) {
    float lo = 0.0f, hi = 0.0f;
    for (int i = 0; i < n; i++) { lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi; }
    float s = hi > lo ? (hi - lo) / 255.0f : 1.0f, inv = 1.0f / s;
    int z = (int)nearbyintf(-lo * inv);
    z = z < 0 ? 0 : (z > 255 ? 255 : z);
    for (int i = 0; i < n; i++) {
        float v = nearbyintf(x[i] * inv) + (float)z;
        v = v > 255.0f ? 255.0f : (v < 0.0f ? 0.0f : v);
        q[i] = (uint8_t)v;
    }
    *scale = s;
    *zp = z;
}

/* ---- int8 GEMV / skinny GEMM: y (B, n) = X (B, k) W^T, rows of W split over the team ------------ */

static inline int32_t dot_u8s8(const uint8_t *a, const int8_t *w, int k) {
#if KV_VNNI
    __m512i acc = _mm512_setzero_si512(), acc1 = acc;
    int i = 0;
    for (; i + 128 <= k; i += 128) {
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a + i), _mm512_loadu_si512(w + i));
        acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(a + i + 64), _mm512_loadu_si512(w + i + 64));
    }
    acc = _mm512_add_epi32(acc, acc1);
    for (; i + 64 <= k; i += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a + i), _mm512_loadu_si512(w + i));
    if (i < k) {
        __mmask64 mk = ((__mmask64)-1) >> (64 - (k - i));
        acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(mk, a + i), _mm512_maskz_loadu_epi8(mk, w + i));
    }
    return _mm512_reduce_add_epi32(acc);
#else
    int32_t acc = 0;
    for (int i = 0; i < k; i++) acc += (int32_t)a[i] * (int32_t)w[i];
    return acc;
#endif
}

/* ---- attention ------------------------------------------------------------------------------- */

/* e^x for x <= 0 (softmax arguments), vectorizable: 2^t = 2^n * 2^f, n = rint(t), |f| <= 1/2, with a
 * degree-7 Taylor polynomial of 2^f (relative error < 1e-8 before float rounding). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.4426950408889634f;
    float n = nearbyintf(t);
    float f = (t - n) * 0.6931471805599453f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.16666667f + f * (0.041666668f + f * (0.008333334f +
              f * (0.0013888889f + f * 0.00019841270f))))));
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    return p * u.f;
}

/* Softmax over each head's scores in sc (H, CHUNK), in place; (max, sum) per head into pml. */
static void softmax_rows(float *sc, float *pml, int H, int n) {
    for (int hh = 0; hh < H; hh++) {
        float *s = sc + hh * CHUNK, mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
        #pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) { s[t] = exp_neg(s[t] - mx); sum += s[t]; }
        pml[2 * hh] = mx; pml[2 * hh + 1] = sum;
    }
}

/* K / V element types of the pool: fp32, or fp16 (half the bytes; stored with round-to-nearest-even,
 * as torch's .to(float16) rounds, read back exactly). */
typedef _Float16 f16;
static inline float ld_f32(const float *p, int i) { return p[i]; }
static inline float ld_f16(const f16 *p, int i) { return (float)p[i]; }

/* One work item: every query head of one sequence over `n` context positions whose pool rows start at
 * element offsets rows[0..n) (a position's K, or V, for all KV heads is one contiguous row; a block's
 * rows are adjacent). Writes the unnormalized output po (H, D) and (max, sum) per head; sc: (H, CHUNK). */
#define ATTN_ITEM_C(SUF, T)                                                                                    \
static void attn_item_c##SUF(const Model *m, const float *q, const void *kcv, const void *vcv,                 \
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

#if defined(__AVX512F__)
#define PF_AHEAD 8 /* positions ahead whose whole K row is prefetched */

static inline void prefetch_row(const void *r, int bytes) {
    for (int i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)r + i);
}
static inline __m512 ld16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16_f16(const f16 *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* The same for head_dim = 16 * NV with AVX-512: a head's K row and its output accumulators live in
 * registers and each dot product is reduced with a shuffle tree instead of a scalar chain. Memory: whole
 * K rows are prefetched PF_AHEAD positions ahead (a pool block is only block_size rows, too short for the
 * hardware prefetchers to ramp up on), and each position's V row is requested as its K row is read, so
 * the two streams share the score loop and the value loop finds its rows in cache (requesting all of V
 * in one burst before the softmax was 12 % slower at 4,096 context). Values: each V row is loaded once
 * per group of up to VG query heads that share it, their outputs accumulating in registers. */
#define ATTN_ITEM_AVX512(NV, SUF, T)                                                                           \
static void attn_item_##NV##SUF(const Model *m, const float *q, const void *kcv, const void *vcv,              \
                                const int64_t *rows, int n, float *po, float *pml, float *sc) {                \
    const T *kc = kcv, *vc = vcv;                                                                              \
    const int H = m->H, KVH = m->KVH, G = H / KVH, D = 16 * NV, row = KVH * D * (int)sizeof(T);                \
    const float scale = m->scale;                                                                              \
    for (int t = 0; t < n && t < PF_AHEAD; t++) prefetch_row(kc + rows[t], row);                               \
    for (int t = 0; t < n; t++) {                                                                              \
        const T *kr = kc + rows[t];                                                                            \
        if (t + PF_AHEAD < n) prefetch_row(kc + rows[t + PF_AHEAD], row);                                      \
        prefetch_row(vc + rows[t], row);                                                                       \
        for (int h = 0; h < KVH; h++) {                                                                        \
            __m512 k[NV];                                                                                      \
            for (int j = 0; j < NV; j++) k[j] = ld16##SUF(kr + h * D + 16 * j);                                \
            for (int g = 0; g < G; g++) {                                                                      \
                const float *qh = q + (size_t)(h * G + g) * D;                                                 \
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);                                         \
                for (int j = 1; j < NV; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * j), k[j], acc);   \
                sc[(h * G + g) * CHUNK + t] = _mm512_reduce_add_ps(acc) * scale;                               \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    softmax_rows(sc, pml, H, n);                                                                               \
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
ATTN_ITEM_AVX512(4, _f32, float)
ATTN_ITEM_AVX512(8, _f32, float)
ATTN_ITEM_AVX512(4, _f16, f16)
ATTN_ITEM_AVX512(8, _f16, f16)
#endif

typedef void (*attn_fn)(const Model *, const float *, const void *, const void *, const int64_t *, int, float *,
                        float *, float *);

static attn_fn pick_attn(int D, int kv16) {
#if defined(__AVX512F__)
    if (D == 64) return kv16 ? attn_item_4_f16 : attn_item_4_f32;
    if (D == 128) return kv16 ? attn_item_8_f16 : attn_item_8_f32;
#endif
    return kv16 ? attn_item_c_f16 : attn_item_c_f32;
}

/* ---- the step -------------------------------------------------------------------------------- */

/* silu(g) * u with the vectorizable exponential: sigmoid(g) = 1 / (1 + e^-g) for g >= 0, e^g / (1 + e^g)
 * below, both from e = e^-|g| <= 1. */
static void swiglu(float *a, const float *g, const float *u, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) {
        float e = exp_neg(-fabsf(g[i])), r = 1.0f / (1.0f + e);
        a[i] = g[i] * (g[i] >= 0.0f ? r : e * r) * u[i];
    }
}

/* Per-thread scratch: every thread computes the small row operations (norms, activation quantization,
 * the attention merge) itself, into its own buffers, instead of one thread doing them while the others
 * wait at a barrier. */
typedef struct {
    float *h, *attn, *act, *xs, *sc;
    int32_t *xz;
    uint8_t *xq;
    int64_t *rows;
} Scratch;

static size_t scratch_bytes(const Model *m, int B) {
    size_t maxk = (size_t)m->hidden;
    if ((size_t)m->inter > maxk) maxk = m->inter;
    if ((size_t)m->H * m->D > maxk) maxk = (size_t)m->H * m->D;
    size_t f = (size_t)B * m->hidden + (size_t)B * m->H * m->D + (size_t)B * m->inter + B + (size_t)m->H * CHUNK;
    return 4 * f + 4 * (size_t)B + 8 * (size_t)CHUNK + B * maxk + 256;
}

static Scratch scratch_at(const Model *m, int B, char *base) {
    Scratch t;
    float *f = (float *)base;
    t.h = f; f += (size_t)B * m->hidden;
    t.attn = f; f += (size_t)B * m->H * m->D;
    t.act = f; f += (size_t)B * m->inter;
    t.xs = f; f += B;
    t.sc = f; f += (size_t)m->H * CHUNK;
    t.xz = (int32_t *)f;
    t.rows = (int64_t *)(((uintptr_t)(t.xz + B) + 63) & ~(uintptr_t)63);
    t.xq = (uint8_t *)(t.rows + CHUNK);
    return t;
}

/* every thread: rmsnorm of the residual rows, quantized into its own activation buffer */
static void norm_quant(const Model *m, const Scratch *t, const float *x, const float *w, int B) {
    for (int b = 0; b < B; b++) {
        rmsnorm(t->h + (size_t)b * m->hidden, x + (size_t)b * m->hidden, w, m->hidden, m->eps);
        quantize_row(t->xq + (size_t)b * m->hidden, t->xs + b, t->xz + b, t->h + (size_t)b * m->hidden, m->hidden);
    }
}

/* rows [r0, r1) of W for all B activation rows */
static void qgemm_rows(const QMat *W, const Scratch *t, int B, float *y, int ldy, int mode, int r0, int r1) {
    const int k = W->k;
    for (int r = r0; r < r1; r++) {
        const int8_t *wr = W->w + (size_t)r * k;
        /* the row 8 ahead: more misses in flight than the hardware prefetcher keeps on its own (4,096
         * context: 7.6 -> 7.0 ms per token; past the last row it touches the next matrix, a hint only) */
        for (int i = 0; i < k; i += 64) __builtin_prefetch(wr + (size_t)8 * k + i);
        const float sw = W->s[r], bias = W->b ? W->b[r] : 0.0f;
        for (int b = 0; b < B; b++) {
            int32_t acc = dot_u8s8(t->xq + (size_t)b * k, wr, k) - t->xz[b] * W->rs[r];
            float v = t->xs[b] * sw * (float)acc + bias;
            if (mode) y[(size_t)b * ldy + r] += v; else y[(size_t)b * ldy + r] = v;
        }
    }
}

/* mode 0: y = x W^T (+ b); mode 1: y += x W^T (the residual add; each row of W belongs to one thread) */
static void qgemm(const QMat *W, const Scratch *t, int B, float *y, int ldy, int mode) {
    #pragma omp for schedule(static)
    for (int r0 = 0; r0 < W->n; r0 += 16)
        qgemm_rows(W, t, B, y, ldy, mode, r0, r0 + 16 < W->n ? r0 + 16 : W->n);
}

/* tok/pos/slot/len: (B,) int64; bt: (B, max_blocks) int64 block tables; kpool/vpool: the pool's
 * (layers, blocks, bs, KVH, D) base pointers, fp32 or fp16 (Model.kv16), layer_stride in elements; logits: (B, vocab) fp32 out. Returns 0, or -1 when
 * out of memory, -2 on a position outside the RoPE table. */
int kv_decode(void *mp, int B, const int64_t *tok, const int64_t *pos, const int64_t *slot, const int64_t *len,
              const int64_t *bt, int max_blocks, void *kpool, void *vpool, int64_t layer_stride, float *logits,
              int nthreads) {
    Model *m = mp;
    const int Hd = m->hidden, H = m->H, KVH = m->KVH, D = m->D, I = m->inter;
    const int nq = (H + 2 * KVH) * D;
    int items = 0;
    for (int b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= m->max_pos) return -2;
        items += (int)((len[b] + CHUNK - 1) / CHUNK);
    }
    if (nthreads < 1) nthreads = 1;
    if (reserve(m, B, items)) return -1;
    for (int b = 0, i = 0; b < B; b++)
        for (int c = 0; c * CHUNK < len[b]; c++, i++) {
            if (c == 0) m->first_item[b] = i;
            m->it_b[i] = b; m->it_c[i] = c;
        }
    for (int b = 0; b < B; b++) memcpy(m->x + (size_t)b * Hd, m->embed + (size_t)tok[b] * Hd, sizeof(float) * Hd);
    const size_t per_thread = (scratch_bytes(m, B) + 63) & ~(size_t)63;
    if (per_thread * nthreads > m->scratch_cap) {  /* kept between steps, grown on demand */
        free(m->scratch);
        m->scratch = aligned_alloc(64, per_thread * nthreads);
        m->scratch_cap = m->scratch ? per_thread * nthreads : 0;
        if (!m->scratch) return -1;
    }
    char *scratch = m->scratch;
    const attn_fn attn = pick_attn(D, m->kv16);
    const size_t esz = m->kv16 ? 2 : 4;  /* bytes per pool element */
    const int64_t row_elems = (int64_t)KVH * D;
    int bs_shift = 0;
    while ((1 << bs_shift) < m->bs) bs_shift++;
    const int split_swiglu = B > 4;  /* small batches: each thread does all of it, no barrier */

    #pragma omp parallel num_threads(nthreads)
    {
        const Scratch t = scratch_at(m, B, scratch + per_thread * omp_get_thread_num());
#if defined(__SSE__)
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);  /* flush denormals (tiny softmax weights) to zero */
#endif
        norm_quant(m, &t, m->x, m->ln1[0], B);
        for (int l = 0; l < m->L; l++) {
            char *kc = (char *)kpool + (size_t)l * layer_stride * esz, *vc = (char *)vpool + (size_t)l * layer_stride * esz;
            /* q, k, v one head (D rows) at a time, so the thread that computed a head applies its RoPE
             * and writes K / V into the pool */
            #pragma omp for schedule(static)
            for (int hh = 0; hh < H + 2 * KVH; hh++) {
                qgemm_rows(&m->qkv[l], &t, B, m->qkvb, nq, 0, hh * D, (hh + 1) * D);
                for (int b = 0; b < B; b++) {
                    float *v = m->qkvb + (size_t)b * nq + (size_t)hh * D;
                    if (hh < H + KVH) {
                        const float *cs = m->cos_t + (size_t)pos[b] * D, *sn = m->sin_t + (size_t)pos[b] * D;
                        float tmp[512];
                        memcpy(tmp, v, sizeof(float) * D);
                        for (int d = 0; d < D / 2; d++) v[d] = tmp[d] * cs[d] + tmp[d + D / 2] * sn[d];
                        for (int d = D / 2; d < D; d++) v[d] = tmp[d] * cs[d] + tmp[d - D / 2] * sn[d];
                    }
                    if (hh >= H) {
                        char *base = hh < H + KVH ? kc : vc;
                        size_t off = (size_t)slot[b] * row_elems + (size_t)(hh < H + KVH ? hh - H : hh - H - KVH) * D;
                        if (m->kv16) {
                            f16 *dst = (f16 *)base + off;
                            for (int d = 0; d < D; d++) dst[d] = (f16)v[d];
                        } else {
                            memcpy((float *)base + off, v, sizeof(float) * D);
                        }
                    }
                }
            }
            #pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < items; i++) {
                int b = m->it_b[i], c = m->it_c[i];
                int t0 = c * CHUNK, t1 = t0 + CHUNK < len[b] ? t0 + CHUNK : (int)len[b];
                const int64_t *tab = bt + (size_t)b * max_blocks;
                for (int p = t0; p < t1; p++)  /* pool row (element offset) of each position */
                    t.rows[p - t0] = ((tab[p >> bs_shift] << bs_shift) + (p & (m->bs - 1))) * row_elems;
                attn(m, m->qkvb + (size_t)b * nq, kc, vc, t.rows, t1 - t0, m->po + (size_t)i * H * D,
                     m->pml + (size_t)i * H * 2, t.sc);
            }
            for (int bh = 0; bh < B * H; bh++) { /* every thread: merge the chunks of (b, head), items b-major */
                int b = bh / H, hh = bh % H, nc = (int)((len[b] + CHUNK - 1) / CHUNK), first = m->first_item[b];
                float mx = -INFINITY, sum = 0.0f, *o = t.attn + (size_t)b * H * D + (size_t)hh * D;
                for (int c = 0; c < nc; c++) { float v = m->pml[(size_t)(first + c) * H * 2 + 2 * hh]; mx = v > mx ? v : mx; }
                for (int d = 0; d < D; d++) o[d] = 0.0f;
                for (int c = 0; c < nc; c++) {
                    const float *ml = m->pml + (size_t)(first + c) * H * 2 + 2 * hh;
                    float w = expf(ml[0] - mx);
                    sum += w * ml[1];
                    const float *pc = m->po + ((size_t)(first + c) * H + hh) * D;
                    for (int d = 0; d < D; d++) o[d] += w * pc[d];
                }
                float inv = 1.0f / sum;
                for (int d = 0; d < D; d++) o[d] *= inv;
            }
            for (int b = 0; b < B; b++)
                quantize_row(t.xq + (size_t)b * H * D, t.xs + b, t.xz + b, t.attn + (size_t)b * H * D, H * D);
            qgemm(&m->o[l], &t, B, m->x, Hd, 1);
            norm_quant(m, &t, m->x, m->ln2[l], B);
            qgemm(&m->gu[l], &t, B, m->gub, 2 * I, 0);
            const float *act = t.act;
            if (split_swiglu) {
                #pragma omp for schedule(static)
                for (int b = 0; b < B; b++)
                    swiglu(m->act + (size_t)b * I, m->gub + (size_t)b * 2 * I, m->gub + (size_t)b * 2 * I + I, I);
                act = m->act;
            } else {
                for (int b = 0; b < B; b++)
                    swiglu(t.act + (size_t)b * I, m->gub + (size_t)b * 2 * I, m->gub + (size_t)b * 2 * I + I, I);
            }
            for (int b = 0; b < B; b++) quantize_row(t.xq + (size_t)b * I, t.xs + b, t.xz + b, act + (size_t)b * I, I);
            qgemm(&m->dn[l], &t, B, m->x, Hd, 1);
            norm_quant(m, &t, m->x, l + 1 < m->L ? m->ln1[l + 1] : m->norm, B);
        }
        qgemm(&m->head, &t, B, logits, m->vocab, 0);
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    return 0;
}
