/* kvstrata native step: shared types of step.c, gemm.c and attn.c.
 *
 * Batch invariance is the rule every function here keeps: the floating-point operations that produce
 * one row's values (one token of one sequence) are fixed by that row's own inputs, never by how many
 * rows share the call, where a row sits in the step, how rows or columns are split over threads, or
 * the memory address of a buffer. Integer sums are exact in any order; every float sum has one order
 * written out in the code (no -ffast-math, no FMA contraction, no alignment peeling: see CFLAGS).
 */
#ifndef KV_H
#define KV_H
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KV_VNNI 1
#else
#define KV_VNNI 0
#endif

#if KV_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define KV_AMX 1
#else
#define KV_AMX 0
#endif
/* int8 products of AMX_MIN_ROWS rows or more go through AMX tiles where the CPU has them (gemm.c); fewer
 * stream the weights through VNNI, which is as fast there (at 2 rows 2 % faster, at 8 rows 9 % slower) */
#define AMX_MIN_ROWS 4

#define CHUNK 128 /* context positions per attention partial (fixed: a query's split never moves) */
#define KV_HIDDEN __attribute__((visibility("hidden")))

enum { W_F32 = 0, W_I8 = 1, W_I4 = 2 };   /* weight formats of a Mat */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 }; /* element types of the KV pool */

/* y (M, n) = x (M, k) W^T + b, W in one of three formats:
 *   W_F32: w (n, k) row-major floats (the caller's tensor, not copied);
 *   W_I8:  int8 rows with one scale each (symmetric), packed in panels of 16 rows: for every group of 4
 *          inputs, 16 rows x 4 bytes (64 bytes), so one VNNI instruction multiplies 4 inputs into 16
 *          outputs (i8_off); kp = k rounded up to 4 (padding zero); rs = each row's int8 sum;
 *   W_I4:  groups of 32 inputs with a scale d and a minimum m each (w = d * q + m, q in 0..15, as GGUF
 *          Q4_1), 16 bytes per group: byte j holds q of element j (low nibble) and j + 16 (high). */
typedef struct {
    int fmt, n, k, kp;
    const float *b;
    const float *wf;
    const int8_t *wp;
    const float *s;
    const int32_t *rs;
    const uint8_t *q4;
    const float *d4, *m4;
} Mat;

/* Activation rows as a matrix reads them: fp32 rows (W_F32, W_I4), or u8 rows with a scale and zero
 * point each (W_I8: x ~ qs * (q - qz)). Row i of the block is f + i * ldf, q + i * ldq. */
typedef struct {
    const float *f;
    const uint8_t *q;
    const float *qs;
    const int32_t *qz;
    int ldf, ldq;
} Act;

/* gemm.c: columns [c0, c1) of y for all M rows; add: y += (the residual), else y =. c0 is a multiple of
 * 16. Each output element's arithmetic depends only on its row of x and its row of W. */
KV_HIDDEN void mm(const Mat *W, const Act *A, int M, float *y, int ldy, int add, int c0, int c1);
/* Byte offset of int8 weight (row r, input c) in the packed layout: quads of 4 panels of 16 rows, and in
 * a quad, for each group of 4 inputs, the 4 panels' 64 bytes side by side, so a tile of a whole quad
 * reads one sequential stream (four separate panel streams read 30 % slower at batch 1). */
static inline size_t i8_off(int kp, int r, int c) {
    return (size_t)(r / 64) * kp * 64 + (size_t)(c / 4) * 256 + (size_t)((r % 64) / 16) * 64 + (size_t)(r % 16) * 4 + c % 4;
}
/* u8 quantization of one row over [min(x, 0), max(x, 0)] in 255 steps (fbgemm's dynamic scheme for
 * one row); q is padded with zeros from n to npad. */
/* Whether int8 products use AMX tiles: want 1 asks the kernel for the tile state (once granted, used),
 * 0 stops using them, -1 only answers (asking on first use). Always 0 on a build without AMX. */
int kv_amx(int want);
KV_HIDDEN void quantize_row(uint8_t *q, float *scale, int32_t *zp, const float *x, int n, int npad);

/* attn.c */
typedef struct {
    int H, KVH, D, kvt;
    float scale;
} AttnShape;
/* One partial: every query head of one query over n <= CHUNK context positions whose pool rows start at
 * element offsets rows[0..n). Writes the unnormalized output po (H, D) and (max, sum) per head into pml;
 * sc: scratch (H, CHUNK). */
typedef void (*attn_fn)(const AttnShape *s, const float *q, const void *kc, const void *vc, const int64_t *rows,
                        int n, float *po, float *pml, float *sc);
KV_HIDDEN attn_fn pick_attn(int D, int kvt);
/* nq queries of one sequence over one chunk (a prefill): query j (at q + j * qstride) sees the first nj[j]
 * of the chunk's positions; its partial goes to po + j * postride, pml + j * pmlstride. Each query gets
 * the bits attn_fn gives it alone. sc: scratch (nq, H, CHUNK). */
typedef void (*attn_block_fn)(const AttnShape *s, const float *q, size_t qstride, int nq, const int *nj, const void *kc,
                              const void *vc, const int64_t *rows, float *po, size_t postride, float *pml,
                              size_t pmlstride, float *sc);
KV_HIDDEN attn_block_fn pick_attn_block(int D, int kvt);
/* The same contract for a few queries in decode's loop (K rows loaded once per position for all). */
KV_HIDDEN attn_block_fn pick_attn_multi(int D, int kvt);
/* Merges nc partials (chunk order, po (nc, H, D), pml (nc, H, 2)) into out (H, D). */
KV_HIDDEN void merge_partials(const AttnShape *s, int nc, const float *po, const float *pml, float *out);

/* e^x for x <= 0 (softmax arguments), vectorizable: 2^t = 2^n * 2^f, n = rint(t), |f| <= 1/2, with a
 * degree-7 Taylor polynomial of 2^f (relative error < 1e-8 before float rounding). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.4426950408889634f;
    float n = __builtin_nearbyintf(t);
    float f = (t - n) * 0.6931471805599453f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.16666667f + f * (0.041666668f + f * (0.008333334f +
              f * (0.0013888889f + f * 0.00019841270f))))));
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    return p * u.f;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* Four reductions at once with _mm512_reduce_add_ps's tree (halves of 256, then of 128, then lanes i and
 * i + 2, then 0 and 1; additions commute, so each result has the bits of its own reduction): the sums of
 * a[0..3] in lanes 0, 4, 8 and 12. */
static inline __m512 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 u = _mm512_add_ps(z, _mm512_permute_ps(z, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* Sums of the 16 lanes of each of a[0..15] -> lane i holds a[i]'s sum, with the very pairing of
 * _mm512_reduce_add_ps (lanes i + 8, then i + 4, then i + 2, then i + 1; float adds commute exactly), so a
 * score reduced here has the bits a one-at-a-time reduction gives; 46 instructions for 16 sums. */
static inline __m512 hsum16(const __m512 a[16]) {
    __m512 w[8], z[4], r[2];
    for (int p = 0; p < 8; p++)
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int p = 0; p < 4; p++) /* quarter c of z[p]: source 4p + c */
        z[p] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                             _mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    for (int p = 0; p < 2; p++) /* quarter c of r[p]: sources 8p + c, 8p + 4 + c, two partials each */
        r[p] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * p], z[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(z[2 * p], z[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* lane 4c + m holds source 4m + c */
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), s);
}

#endif

#endif
