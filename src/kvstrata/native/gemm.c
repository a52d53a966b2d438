/* Matrix products of the native step, one per weight format (see kv.h), each batch-invariant:
 *
 *   int8:  activations quantized per row (quantize_row), u8 x s8 products summed in int32: exact, so
 *          the kernel may block rows and columns however it likes. Then one float formula per element:
 *          y = (float)(acc - zp * rowsum) * (scale_x * scale_w) + b. On CPUs with AMX (Intel since
 *          Sapphire Rapids) blocks of 4 rows or more multiply on tiles, the same integer sums.
 *   fp32 / int4: a dot product per element in 16 lanes (lane l sums inputs l, l + 16, ... in order, one
 *          FMA each), then the lanes reduced in one fixed tree; int4 weights are expanded to floats
 *          (d * q + m, one FMA) right before use. The same instruction sequence runs for an element
 *          whether its row is alone or one of a tile of 4.
 *
 * Loops: rows in blocks that stay in L2 (the weights' column tile is re-read per block), then column
 * tiles, then row tiles that share each load of the weights.
 */
#include <math.h>
#include <string.h>

#include "kv.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

void quantize_row(uint8_t *q, float *scale, int32_t *zp, const float *x, int n, int npad) {
    float lo = 0.0f, hi = 0.0f;
    int i0 = 0;
#if defined(__AVX512F__)
    /* the range in 16 lanes: a minimum / maximum is exact in any order (min_ps(x, lo) is x < lo ? x : lo,
     * NaN included), so the same lo / hi as the scalar chain, whose latency made it ~80 % of this function */
    __m512 lo16 = _mm512_setzero_ps(), hi16 = _mm512_setzero_ps();
    for (; i0 + 16 <= n; i0 += 16) {
        const __m512 v = _mm512_loadu_ps(x + i0);
        lo16 = _mm512_min_ps(v, lo16);
        hi16 = _mm512_max_ps(v, hi16);
    }
    lo = _mm512_reduce_min_ps(lo16);
    hi = _mm512_reduce_max_ps(hi16);
#endif
    for (int i = i0; i < n; i++) { lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi; }
    float s = hi > lo ? (hi - lo) / 255.0f : 1.0f, inv = 1.0f / s;
    int z = (int)nearbyintf(-lo * inv);
    z = z < 0 ? 0 : (z > 255 ? 255 : z);
    for (int i = 0; i < n; i++) {
        float v = nearbyintf(x[i] * inv) + (float)z;
        v = v > 255.0f ? 255.0f : (v < 0.0f ? 0.0f : v);
        q[i] = (uint8_t)v;
    }
    for (int i = n; i < npad; i++) q[i] = 0;
    *scale = s;
    *zp = z;
}

/* ---- int8 ------------------------------------------------------------------------------------- */

static inline float i8_out(const Mat *W, const Act *A, int i, int c, int32_t acc) {
    float v = (float)(acc - A->qz[i] * W->rs[c]) * (A->qs[i] * W->s[c]);
    return W->b ? v + W->b[c] : v;
}

#if KV_VNNI
#define I8_MR 6 /* rows per tile, times up to 4 panels: 24 accumulators */
#define I8_AHEAD 64 /* weight groups (4 inputs x a quad: 256 bytes) requested ahead: 16 KB, more misses in flight than the
                       * hardware prefetcher keeps on one stream (batch-1 decode at 512 context ~165 -> ~230 tok/s) */

/* acc[i][j]: rows i < mr of A against the panels p .. p + np - 1 (one quad) */
static inline __attribute__((always_inline)) void i8_tile(const Mat *W, const Act *A, int m0, const int mr, int p,
                                                         const int np, __m512i acc[I8_MR][4]) {
    const int kq_n = W->kp / 4;
    const int8_t *w = W->wp + (size_t)(p / 4) * W->kp * 64 + (size_t)(p % 4) * 64;
    const uint8_t *a = A->q + (size_t)m0 * A->ldq;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < np; j++) acc[i][j] = _mm512_setzero_si512();
    for (int kq = 0; kq < kq_n; kq++) {
        __m512i wv[4];
        for (int j = 0; j < np; j++) _mm_prefetch((const char *)(w + (size_t)(kq + I8_AHEAD) * 256 + j * 64), _MM_HINT_T0);
        for (int j = 0; j < np; j++) wv[j] = _mm512_loadu_si512(w + (size_t)kq * 256 + j * 64);
        for (int i = 0; i < mr; i++) {
            int32_t a4;
            memcpy(&a4, a + (size_t)i * A->ldq + 4 * kq, 4);
            __m512i av = _mm512_set1_epi32(a4);
            for (int j = 0; j < np; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, wv[j]);
        }
    }
}

static void i8_store(const Mat *W, const Act *A, int m0, int mr, int p, int np, const __m512i acc[][4], float *y,
                     int ldy, int add, int c0, int c1) {
    for (int j = 0; j < np; j++) {
        int n0 = 16 * (p + j), lo = c0 > n0 ? c0 - n0 : 0, hi = c1 - n0 < 16 ? c1 - n0 : 16;
        if (hi <= lo) continue;
        __mmask16 mk = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
        __m512i rs = _mm512_maskz_loadu_epi32(mk, W->rs + n0);
        __m512 sw = _mm512_maskz_loadu_ps(mk, W->s + n0);
        __m512 b = W->b ? _mm512_maskz_loadu_ps(mk, W->b + n0) : _mm512_setzero_ps();
        for (int i = 0; i < mr; i++) {
            __m512i a = _mm512_sub_epi32(acc[i][j], _mm512_mullo_epi32(_mm512_set1_epi32(A->qz[m0 + i]), rs));
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(_mm512_set1_ps(A->qs[m0 + i]), sw));
            if (W->b) v = _mm512_add_ps(v, b);
            float *yr = y + (size_t)(m0 + i) * ldy + n0;
            if (add) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yr), v);
            _mm512_mask_storeu_ps(yr, mk, v);
        }
    }
}

#if KV_AMX
/* The same products on AMX tiles (Intel since Sapphire Rapids): TDPBUSD multiplies a tile of up to 16
 * activation rows x 64 inputs (u8) by 64 inputs x 16 weight rows (s8, in the packed layout's groups of 4:
 * one panel of 16 rows over 16 groups is a tile, rows 256 bytes apart) into 16 x 16 int32 sums. The sums
 * are exact, so they are the VNNI kernel's to the bit, and the same i8_store makes the floats. Tile 0 holds
 * the activations, 1-3 the weights, 4-7 one quad's sums. Used where the kernel grants the process its tile
 * state (arch_prctl) and k is a multiple of 64. */
#include <sys/syscall.h>
#include <unistd.h>

static int amx_state; /* 0: not asked yet; 1: tiles granted; -1: refused, or switched off */

int kv_amx(int want) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (want >= 0 || s == 0) {
        s = want != 0 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, s, __ATOMIC_RELEASE);
    }
    return s > 0;
}

typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileCfg;

/* every call configures its thread's tiles: something else on the thread (oneDNN in torch) may have
 * configured or released them since */
static void amx_config(int mr) {
    TileCfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = t >= 1 && t <= 3 ? 16 : mr;
    }
    _tile_loadconfig(&c);
}

#define AMX_AHEAD 1 /* 4 KB blocks of a quad's weights requested ahead */

static void mm_i8_amx(const Mat *W, const Act *A, int M, float *y, int ldy, int add, int c0, int c1) {
    const int MB = 96; /* rows per block, as mm_i8 */
    const int p0 = c0 / 16, p1 = (c1 + 15) / 16, kb_n = W->kp / 64;
    int32_t sums[16][64] __attribute__((aligned(64)));
    int cfg = 0;
    for (int mb = 0; mb < M; mb += MB) {
        const int me = mb + MB < M ? mb + MB : M;
        for (int p = p0; p < p1;) {
            const int np = p1 - p < 4 - p % 4 ? p1 - p : 4 - p % 4; /* the rest of p's quad */
            const int8_t *w = W->wp + (size_t)(p / 4) * W->kp * 64 + (size_t)(p % 4) * 64;
            for (int m0 = mb; m0 < me; m0 += 16) {
                const int mr = me - m0 < 16 ? me - m0 : 16;
                if (mr != cfg) {
                    amx_config(mr);
                    cfg = mr;
                }
                const uint8_t *a = A->q + (size_t)m0 * A->ldq;
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (int kb = 0; kb < kb_n; kb++) {
                    const int8_t *wk = w + (size_t)kb * 4096;
                    for (int l = 0; l < 4096; l += 64) _mm_prefetch((const char *)(wk + AMX_AHEAD * 4096 + l), _MM_HINT_T0);
                    _tile_loadd(0, a + (size_t)kb * 64, A->ldq);
                    _tile_loadd(1, wk, 256);
                    _tile_dpbusd(4, 0, 1);
                    if (np > 1) {
                        _tile_loadd(2, wk + 64, 256);
                        _tile_dpbusd(5, 0, 2);
                    }
                    if (np > 2) {
                        _tile_loadd(3, wk + 128, 256);
                        _tile_dpbusd(6, 0, 3);
                    }
                    if (np > 3) {
                        _tile_loadd(1, wk + 192, 256);
                        _tile_dpbusd(7, 0, 1);
                    }
                }
                _tile_stored(4, &sums[0][0], 256);
                _tile_stored(5, &sums[0][16], 256);
                _tile_stored(6, &sums[0][32], 256);
                _tile_stored(7, &sums[0][48], 256);
                i8_store(W, A, m0, mr, p, np, (const __m512i(*)[4])sums, y, ldy, add, c0, c1);
            }
            p += np;
        }
    }
}
#else
int kv_amx(int want) { (void)want; return 0; }
#endif

static void mm_i8(const Mat *W, const Act *A, int M, float *y, int ldy, int add, int c0, int c1) {
#if KV_AMX
    if (M >= AMX_MIN_ROWS && W->kp % 64 == 0 && kv_amx(-1)) {
        mm_i8_amx(W, A, M, y, ldy, add, c0, c1);
        return;
    }
#endif
    const int MB = 96;  /* rows per block: MB x kp bytes stay in L2 while the quads stream by */
    const int p0 = c0 / 16, p1 = (c1 + 15) / 16;
    __m512i acc[I8_MR][4];
    for (int mb = 0; mb < M; mb += MB) {
        const int me = mb + MB < M ? mb + MB : M;
        for (int p = p0; p < p1;) {
            const int np = p1 - p < 4 - p % 4 ? p1 - p : 4 - p % 4; /* the rest of p's quad */
            for (int m0 = mb; m0 < me; m0 += I8_MR) {
                const int mr = me - m0 < I8_MR ? me - m0 : I8_MR;
#define I8_NP(R)                                                                                  \
                case R:                                                                           \
                    if (np == 4) i8_tile(W, A, m0, R, p, 4, acc);                                 \
                    else if (np == 3) i8_tile(W, A, m0, R, p, 3, acc);                            \
                    else if (np == 2) i8_tile(W, A, m0, R, p, 2, acc);                            \
                    else i8_tile(W, A, m0, R, p, 1, acc);                                         \
                    break;
                switch (mr) { I8_NP(1) I8_NP(2) I8_NP(3) I8_NP(4) I8_NP(5) I8_NP(6) }
#undef I8_NP
                i8_store(W, A, m0, mr, p, np, (const __m512i(*)[4])acc, y, ldy, add, c0, c1);
            }
            p += np;
        }
    }
}
#else
int kv_amx(int want) { (void)want; return 0; }
static void mm_i8(const Mat *W, const Act *A, int M, float *y, int ldy, int add, int c0, int c1) {
    for (int c = c0; c < c1; c++) {
        for (int i = 0; i < M; i++) {
            const uint8_t *a = A->q + (size_t)i * A->ldq;
            int32_t acc = 0;
            for (int k = 0; k < W->kp; k++) acc += (int32_t)a[k] * (int32_t)W->wp[i8_off(W->kp, c, k)];
            float v = i8_out(W, A, i, c, acc);
            float *yr = y + (size_t)i * ldy + c;
            *yr = add ? *yr + v : v;
        }
    }
}
#endif

/* ---- fp32 and int4: dot products in 16 lanes -------------------------------------------------- */

#define F_MR 4
#define F_NR 4

#if defined(__AVX512F__)
/* out[i][j] = the lane sum of acc[i][j]; a full 4 x 4 tile in one transposed tree (hsum16: the bits of
 * _mm512_reduce_add_ps, which a partial tile uses per element) */
static inline __attribute__((always_inline)) void reduce_tile(__m512 acc[F_MR][F_NR], const int mr, const int nr,
                                                             float out[F_MR][F_NR]) {
    if (mr == 4 && nr == 4) {
        __m512 a[16];
        for (int i = 0; i < 16; i++) a[i] = acc[i / 4][i % 4];
        float s[16];
        _mm512_storeu_ps(s, hsum16(a));
        for (int i = 0; i < 16; i++) out[i / 4][i % 4] = s[i];
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

/* lane sums of rows [m0, m0 + mr) of A against W rows [n0, n0 + nr), reduced into out[i][j] */
static inline __attribute__((always_inline)) void f32_tile(const Mat *W, const Act *A, int m0, const int mr, int n0,
                                                          const int nr, float out[F_MR][F_NR]) {
    const int k = W->k;
    __m512 acc[F_MR][F_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    const float *a = A->f + (size_t)m0 * A->ldf, *w = W->wf + (size_t)n0 * k;
    int kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 wv[F_NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_loadu_ps(w + (size_t)j * k + kk);
        for (int i = 0; i < mr; i++) {
            __m512 av = _mm512_loadu_ps(a + (size_t)i * A->ldf + kk);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
        }
    }
    if (kk < k) {
        __mmask16 mk = (__mmask16)((1u << (k - kk)) - 1);
        __m512 wv[F_NR];
        for (int j = 0; j < nr; j++) wv[j] = _mm512_maskz_loadu_ps(mk, w + (size_t)j * k + kk);
        for (int i = 0; i < mr; i++) {
            __m512 av = _mm512_maskz_loadu_ps(mk, a + (size_t)i * A->ldf + kk);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(av, wv[j], acc[i][j]);
        }
    }
    reduce_tile(acc, mr, nr, out);
}

static inline __attribute__((always_inline)) void i4_tile(const Mat *W, const Act *A, int m0, const int mr, int n0,
                                                         const int nr, float out[F_MR][F_NR]) {
    const int G = W->k / 32;
    __m512 acc[F_MR][F_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    const float *a = A->f + (size_t)m0 * A->ldf;
    const __m512i low = _mm512_set1_epi32(15);
    for (int g = 0; g < G; g++) {
        __m512 wl[F_NR], wh[F_NR];
        for (int j = 0; j < nr; j++) {
            size_t gi = (size_t)(n0 + j) * G + g;
            __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(W->q4 + gi * 16)));
            __m512 d = _mm512_set1_ps(W->d4[gi]), mn = _mm512_set1_ps(W->m4[gi]);
            wl[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), d, mn);
            wh[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, mn);
        }
        for (int i = 0; i < mr; i++) {
            const float *ar = a + (size_t)i * A->ldf + 32 * g;
            __m512 a0 = _mm512_loadu_ps(ar), a1 = _mm512_loadu_ps(ar + 16);
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm512_fmadd_ps(a0, wl[j], acc[i][j]);
                acc[i][j] = _mm512_fmadd_ps(a1, wh[j], acc[i][j]);
            }
        }
    }
    reduce_tile(acc, mr, nr, out);
}
#else
/* Portable: the same 16-lane scheme in plain C (its own fixed order: lanes, then a fixed tree). */
static inline float lanes_reduce(float l[16]) {
    for (int w = 8; w >= 1; w /= 2)
        for (int t = 0; t < w; t++) l[t] = l[t] + l[t + w];
    return l[0];
}

static inline void f32_tile(const Mat *W, const Act *A, int m0, const int mr, int n0, const int nr,
                            float out[F_MR][F_NR]) {
    const int k = W->k;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            const float *a = A->f + (size_t)(m0 + i) * A->ldf, *w = W->wf + (size_t)(n0 + j) * k;
            float l[16] = {0};
            for (int kk = 0; kk < k; kk += 16)
                for (int t = 0; t < 16 && kk + t < k; t++) l[t] = fmaf(a[kk + t], w[kk + t], l[t]);
            out[i][j] = lanes_reduce(l);
        }
}

static inline void i4_tile(const Mat *W, const Act *A, int m0, const int mr, int n0, const int nr,
                           float out[F_MR][F_NR]) {
    const int G = W->k / 32;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            const float *a = A->f + (size_t)(m0 + i) * A->ldf;
            float l[16] = {0};
            for (int g = 0; g < G; g++) {
                size_t gi = (size_t)(n0 + j) * G + g;
                const uint8_t *q = W->q4 + gi * 16;
                float d = W->d4[gi], mn = W->m4[gi];
                for (int t = 0; t < 16; t++) l[t] = fmaf(a[32 * g + t], fmaf((float)(q[t] & 15), d, mn), l[t]);
                for (int t = 0; t < 16; t++) l[t] = fmaf(a[32 * g + 16 + t], fmaf((float)(q[t] >> 4), d, mn), l[t]);
            }
            out[i][j] = lanes_reduce(l);
        }
}
#endif

static void mm_float(const Mat *W, const Act *A, int M, float *y, int ldy, int add, int c0, int c1) {
    const int MB = 48;  /* rows per block: MB x k floats stay in L2 while the weight tiles stream by */
    float out[F_MR][F_NR];
    for (int mb = 0; mb < M; mb += MB) {
        const int me = mb + MB < M ? mb + MB : M;
        for (int n0 = c0; n0 < c1; n0 += F_NR) {
            const int nr = c1 - n0 < F_NR ? c1 - n0 : F_NR;
            for (int m0 = mb; m0 < me; m0 += F_MR) {
                const int mr = me - m0 < F_MR ? me - m0 : F_MR;
                /* constant tile shapes, so each specialization keeps its accumulators in registers */
#define F_CASE(R, C)                                                                   \
                if (mr == R && nr == C) {                                              \
                    if (W->fmt == W_F32) f32_tile(W, A, m0, R, n0, C, out);            \
                    else i4_tile(W, A, m0, R, n0, C, out);                             \
                } else
                F_CASE(4, 4) F_CASE(3, 4) F_CASE(2, 4) F_CASE(1, 4) F_CASE(4, 3) F_CASE(3, 3) F_CASE(2, 3)
                F_CASE(1, 3) F_CASE(4, 2) F_CASE(3, 2) F_CASE(2, 2) F_CASE(1, 2) F_CASE(4, 1) F_CASE(3, 1)
                F_CASE(2, 1) F_CASE(1, 1) {}
#undef F_CASE
                for (int i = 0; i < mr; i++)
                    for (int j = 0; j < nr; j++) {
                        float v = W->b ? out[i][j] + W->b[n0 + j] : out[i][j];
                        float *yr = y + (size_t)(m0 + i) * ldy + n0 + j;
                        *yr = add ? *yr + v : v;
                    }
            }
        }
    }
}

void mm(const Mat *W, const Act *A, int M, float *y, int ldy, int add, int c0, int c1) {
    if (c1 > W->n) c1 = W->n;
    if (M <= 0 || c1 <= c0) return;
    if (W->fmt == W_I8) mm_i8(W, A, M, y, ldy, add, c0, c1);
    else mm_float(W, A, M, y, ldy, add, c0, c1);
}
