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
    int L, H, KVH, D, hidden, inter, vocab, bs, max_pos;
    float eps, scale;
    QMat *qkv, *o, *gu, *dn; /* per layer */
    const float **ln1, **ln2;
    const float *norm, *embed, *cos_t, *sin_t;
    QMat head;
    /* workspace, grown on demand */
    int cap_b, cap_items;
    float *x, *h, *qkvb, *attn, *gub, *act, *xs, *po, *pml;
    int32_t *xz;
    uint8_t *xq;
    int *it_b, *it_c, *first_item;
} Model;

int kv_has_vnni(void) { return KV_VNNI; }

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    return q;
}

void *kv_model_new(const int64_t *iv, const double *fv, const int64_t *pv) {
    /* iv: L H KVH D hidden inter vocab bs max_pos; fv: eps scale;
     * pv: embed norm cos sin head(w s rs) then per layer: ln1 ln2 + 4 x (w s rs b) */
    Model *m = calloc(1, sizeof(Model));
    if (!m) return NULL;
    m->L = (int)iv[0]; m->H = (int)iv[1]; m->KVH = (int)iv[2]; m->D = (int)iv[3];
    m->hidden = (int)iv[4]; m->inter = (int)iv[5]; m->vocab = (int)iv[6]; m->bs = (int)iv[7];
    m->max_pos = (int)iv[8];
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
    if (!m->qkv || !m->o || !m->gu || !m->dn || !m->ln1 || !m->ln2) return NULL;
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
    return m;
}

void kv_model_free(void *mp) {
    Model *m = mp;
    if (!m) return;
    free(m->qkv); free(m->o); free(m->gu); free(m->dn); free(m->ln1); free(m->ln2);
    free(m->x); free(m->h); free(m->qkvb); free(m->attn); free(m->gub); free(m->act); free(m->xs); free(m->xz);
    free(m->po); free(m->pml); free(m->xq); free(m->it_b); free(m->it_c); free(m->first_item);
    free(m);
}

static int reserve(Model *m, int B, int items) {
    if (B > m->cap_b) {
        size_t nq = (size_t)(m->H + 2 * m->KVH) * m->D, maxk = m->hidden;
        if ((size_t)m->inter > maxk) maxk = m->inter;
        if ((size_t)m->H * m->D > maxk) maxk = (size_t)m->H * m->D;
        m->x = xrealloc(m->x, sizeof(float) * B * m->hidden);
        m->h = xrealloc(m->h, sizeof(float) * B * m->hidden);
        m->qkvb = xrealloc(m->qkvb, sizeof(float) * B * nq);
        m->attn = xrealloc(m->attn, sizeof(float) * B * m->H * m->D);
        m->gub = xrealloc(m->gub, sizeof(float) * B * 2 * m->inter);
        m->act = xrealloc(m->act, sizeof(float) * B * m->inter);
        m->xs = xrealloc(m->xs, sizeof(float) * B);
        m->xz = xrealloc(m->xz, sizeof(int32_t) * B);
        m->first_item = xrealloc(m->first_item, sizeof(int) * B);
        m->xq = xrealloc(m->xq, B * maxk + 64);
        if (!m->x || !m->h || !m->qkvb || !m->attn || !m->gub || !m->act || !m->xs || !m->xz || !m->xq || !m->first_item) return -1;
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

/* ---- small row ops (run by one thread; B x hidden floats) ------------------------------------ */

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
    __m512i acc = _mm512_setzero_si512();
    int i = 0;
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

/* mode 0: y = result; mode 1: y += result (residual add; each row of W is owned by one thread) */
static void qgemm(const QMat *W, const uint8_t *xq, const float *xs, const int32_t *xz, int B, float *y, int ldy, int mode) {
    const int n = W->n, k = W->k;
    #pragma omp for schedule(static)
    for (int r0 = 0; r0 < n; r0 += 16) {
        int r1 = r0 + 16 < n ? r0 + 16 : n;
        for (int r = r0; r < r1; r++) {
            const int8_t *wr = W->w + (size_t)r * k;
            const float sw = W->s[r], bias = W->b ? W->b[r] : 0.0f;
            for (int b = 0; b < B; b++) {
                int32_t acc = dot_u8s8(xq + (size_t)b * k, wr, k) - xz[b] * W->rs[r];
                float v = xs[b] * sw * (float)acc + bias;
                if (mode) y[(size_t)b * ldy + r] += v; else y[(size_t)b * ldy + r] = v;
            }
        }
    }
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
__attribute__((noinline)) static void softmax_rows(float *sc, float *pml, int H, int n) {
    for (int hh = 0; hh < H; hh++) {
        float *s = sc + hh * CHUNK, mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
        #pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) { s[t] = exp_neg(s[t] - mx); sum += s[t]; }
        pml[2 * hh] = mx; pml[2 * hh + 1] = sum;
    }
}

/* One work item: every query head of one sequence over `n` context positions whose pool rows start at
 * element offsets rows[0..n) (a position's K, or V, for all KV heads is one contiguous row; a block's
 * rows are adjacent). Writes the unnormalized output po (H, D) and (max, sum) per head; sc: (H, CHUNK). */
static void attn_item(const Model *m, const float *q, const float *kc, const float *vc, const int64_t *rows,
                      int n, float *po, float *pml, float *sc) {
    const int D = m->D, H = m->H, G = H / m->KVH;
    for (int t = 0; t < n; t++) {
        const float *kr = kc + rows[t];
        if (t + 2 < n) __builtin_prefetch(kc + rows[t + 2]);
        for (int hh = 0; hh < H; hh++) {
            const float *qh = q + (size_t)hh * D, *kh = kr + (size_t)(hh / G) * D;
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; d++) s += qh[d] * kh[d];
            sc[hh * CHUNK + t] = s * m->scale;
        }
    }
    softmax_rows(sc, pml, H, n);
    memset(po, 0, sizeof(float) * H * D);
    for (int t = 0; t < n; t++) {
        const float *vr = vc + rows[t];
        if (t + 2 < n) __builtin_prefetch(vc + rows[t + 2]);
        for (int hh = 0; hh < H; hh++) {
            float p = sc[hh * CHUNK + t], *o = po + (size_t)hh * D;
            const float *vh = vr + (size_t)(hh / G) * D;
            #pragma omp simd
            for (int d = 0; d < D; d++) o[d] += p * vh[d];
        }
    }
}

#if defined(__AVX512F__)
/* The same for head_dim = 16 * NV with AVX-512: a head's K and V rows and its output accumulator live in
 * NV registers, and each dot product is reduced with a shuffle tree instead of a scalar chain. */
#define ATTN_ITEM_AVX512(NV)                                                                                   \
static void attn_item_##NV(const Model *m, const float *q, const float *kc, const float *vc,                   \
                           const int64_t *rows, int n, float *po, float *pml, float *sc) {                     \
    const int H = m->H, KVH = m->KVH, G = H / KVH, D = 16 * NV;                                                \
    const float scale = m->scale;                                                                              \
    for (int t = 0; t < n; t++) {                                                                              \
        const float *kr = kc + rows[t];                                                                        \
        if (t + 2 < n) __builtin_prefetch(kc + rows[t + 2]);                                                   \
        for (int h = 0; h < KVH; h++) {                                                                        \
            __m512 k[NV];                                                                                      \
            for (int j = 0; j < NV; j++) k[j] = _mm512_loadu_ps(kr + h * D + 16 * j);                          \
            for (int g = 0; g < G; g++) {                                                                      \
                const float *qh = q + (size_t)(h * G + g) * D;                                                 \
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);                                         \
                for (int j = 1; j < NV; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * j), k[j], acc);   \
                sc[(h * G + g) * CHUNK + t] = _mm512_reduce_add_ps(acc) * scale;                               \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    softmax_rows(sc, pml, H, n);                                                                               \
    for (int hh = 0; hh < H; hh++) {                                                                           \
        const float *vh = vc + (size_t)(hh / G) * D, *p = sc + hh * CHUNK;                                     \
        __m512 acc[NV];                                                                                        \
        for (int j = 0; j < NV; j++) acc[j] = _mm512_setzero_ps();                                             \
        for (int t = 0; t < n; t++) {                                                                          \
            __m512 pv = _mm512_set1_ps(p[t]);                                                                  \
            for (int j = 0; j < NV; j++) acc[j] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vh + rows[t] + 16 * j), acc[j]); \
        }                                                                                                      \
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(po + (size_t)hh * D + 16 * j, acc[j]);                  \
    }                                                                                                          \
}
ATTN_ITEM_AVX512(4)
ATTN_ITEM_AVX512(8)
#endif

typedef void (*attn_fn)(const Model *, const float *, const float *, const float *, const int64_t *, int, float *,
                        float *, float *);

static attn_fn pick_attn(int D) {
#if defined(__AVX512F__)
    if (D == 64 && !getenv("KV_GENERIC")) return attn_item_4;
    if (D == 128) return attn_item_8;
#endif
    (void)D;
    return attn_item;
}

/* ---- the step -------------------------------------------------------------------------------- */

/* tok/pos/slot/len: (B,) int64; bt: (B, max_blocks) int64 block tables; kpool/vpool: the pool's
 * (layers, blocks, bs, KVH, D) fp32 base pointers; logits: (B, vocab) fp32 out. Returns 0, or -1 when
 * out of memory, -2 on a position outside the RoPE table. */
int kv_decode(void *mp, int B, const int64_t *tok, const int64_t *pos, const int64_t *slot, const int64_t *len,
              const int64_t *bt, int max_blocks, float *kpool, float *vpool, int64_t layer_stride, float *logits,
              int nthreads) {
    Model *m = mp;
    const int Hd = m->hidden, H = m->H, KVH = m->KVH, D = m->D, I = m->inter;
    const int nq = (H + 2 * KVH) * D;
    int items = 0;
    for (int b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= m->max_pos) return -2;
        items += (int)((len[b] + CHUNK - 1) / CHUNK);
    }
    if (reserve(m, B, items)) return -1;
    for (int b = 0, i = 0; b < B; b++)
        for (int c = 0; c * CHUNK < len[b]; c++, i++) {
            if (c == 0) m->first_item[b] = i;
            m->it_b[i] = b; m->it_c[i] = c;
        }
    for (int b = 0; b < B; b++) memcpy(m->x + (size_t)b * Hd, m->embed + (size_t)tok[b] * Hd, sizeof(float) * Hd);
    float *sc_all = malloc(sizeof(float) * (size_t)nthreads * (H + 2) * CHUNK);  /* scores, then row offsets */
    const attn_fn attn = pick_attn(D);
    const int64_t row_elems = (int64_t)KVH * D;
    int bs_shift = 0;
    while ((1 << bs_shift) < m->bs) bs_shift++;
    if (!sc_all) return -1;

    #pragma omp parallel num_threads(nthreads)
    {
        float *sc = sc_all + (size_t)omp_get_thread_num() * (H + 2) * CHUNK;
        int64_t *rows = (int64_t *)(sc + H * CHUNK);
#if defined(__SSE__)
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
#endif
        for (int l = 0; l < m->L; l++) {
            float *kc = kpool + (size_t)l * layer_stride, *vc = vpool + (size_t)l * layer_stride;
            #pragma omp single
            for (int b = 0; b < B; b++) {
                rmsnorm(m->h + (size_t)b * Hd, m->x + (size_t)b * Hd, m->ln1[l], Hd, m->eps);
                quantize_row(m->xq + (size_t)b * Hd, m->xs + b, m->xz + b, m->h + (size_t)b * Hd, Hd);
            }
            qgemm(&m->qkv[l], m->xq, m->xs, m->xz, B, m->qkvb, nq, 0);
            #pragma omp single
            for (int b = 0; b < B; b++) { /* RoPE on q and k, then k and v into the pool */
                float *row = m->qkvb + (size_t)b * nq;
                const float *cs = m->cos_t + (size_t)pos[b] * D, *sn = m->sin_t + (size_t)pos[b] * D;
                for (int hh = 0; hh < H + KVH; hh++) {
                    float *v = row + (size_t)hh * D, tmp[512];
                    for (int d = 0; d < D; d++) tmp[d] = v[d];
                    for (int d = 0; d < D / 2; d++) v[d] = tmp[d] * cs[d] + tmp[d + D / 2] * sn[d];
                    for (int d = D / 2; d < D; d++) v[d] = tmp[d] * cs[d] + tmp[d - D / 2] * sn[d];
                }
                memcpy(kc + (size_t)slot[b] * KVH * D, row + (size_t)H * D, sizeof(float) * KVH * D);
                memcpy(vc + (size_t)slot[b] * KVH * D, row + (size_t)(H + KVH) * D, sizeof(float) * KVH * D);
            }
            #pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < items; i++) {
                int b = m->it_b[i], c = m->it_c[i];
                int t0 = c * CHUNK, t1 = t0 + CHUNK < len[b] ? t0 + CHUNK : (int)len[b];
                const int64_t *tab = bt + (size_t)b * max_blocks;
                for (int t = t0; t < t1; t++)  /* pool row (element offset) of each position */
                    rows[t - t0] = ((tab[t >> bs_shift] << bs_shift) + (t & (m->bs - 1))) * row_elems;
                attn(m, m->qkvb + (size_t)b * nq, kc, vc, rows, t1 - t0, m->po + (size_t)i * H * D,
                     m->pml + (size_t)i * H * 2, sc);
            }
            #pragma omp for schedule(static)
            for (int bh = 0; bh < B * H; bh++) { /* merge the chunks of sequence b, head hh (items: b-major) */
                int b = bh / H, hh = bh % H, nc = (int)((len[b] + CHUNK - 1) / CHUNK), first = m->first_item[b];
                float mx = -INFINITY, sum = 0.0f, *o = m->attn + (size_t)b * H * D + (size_t)hh * D;
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
            #pragma omp single
            for (int b = 0; b < B; b++) quantize_row(m->xq + (size_t)b * H * D, m->xs + b, m->xz + b, m->attn + (size_t)b * H * D, H * D);
            qgemm(&m->o[l], m->xq, m->xs, m->xz, B, m->x, Hd, 1);
            #pragma omp single
            for (int b = 0; b < B; b++) {
                rmsnorm(m->h + (size_t)b * Hd, m->x + (size_t)b * Hd, m->ln2[l], Hd, m->eps);
                quantize_row(m->xq + (size_t)b * Hd, m->xs + b, m->xz + b, m->h + (size_t)b * Hd, Hd);
            }
            qgemm(&m->gu[l], m->xq, m->xs, m->xz, B, m->gub, 2 * I, 0);
            #pragma omp for schedule(static)
            for (int bi = 0; bi < B * I; bi++) { /* SwiGLU: silu(gate) * up */
                int b = bi / I, i = bi % I;
                float g = m->gub[(size_t)b * 2 * I + i], u = m->gub[(size_t)b * 2 * I + I + i];
                m->act[bi] = g / (1.0f + expf(-g)) * u;
            }
            #pragma omp single
            for (int b = 0; b < B; b++) quantize_row(m->xq + (size_t)b * I, m->xs + b, m->xz + b, m->act + (size_t)b * I, I);
            qgemm(&m->dn[l], m->xq, m->xs, m->xz, B, m->x, Hd, 1);
        }
        #pragma omp single
        for (int b = 0; b < B; b++) {
            rmsnorm(m->h + (size_t)b * Hd, m->x + (size_t)b * Hd, m->norm, Hd, m->eps);
            quantize_row(m->xq + (size_t)b * Hd, m->xs + b, m->xz + b, m->h + (size_t)b * Hd, Hd);
        }
        qgemm(&m->head, m->xq, m->xs, m->xz, B, logits, m->vocab, 0);
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    free(sc_all);
    return 0;
}
