/* kvstrata native step: every layer of a Llama-family decoder for the T rows (tokens) of one engine step,
 * in one call and one OpenMP team: decode rows and prefill-chunk rows of any number of sequences alike,
 * over fp32, int8 or int4 weights and the engine's paged KV pool (fp32, fp16 or bf16).
 *
 * Why one function for every row: a token's logits, and the K / V it leaves in the pool, must not depend
 * on what else the engine computes in the same step (batch invariance, see kv.h), nor on whether the
 * token came in a prefill chunk of any length or as a decode, so that a prefix restored from the cache
 * gives exactly what recomputing it gives. Every stage is per row: RMSNorm (double sum, in order),
 * activation quantization per row (int8), matrix products whose element arithmetic ignores the other
 * rows (gemm.c), RoPE, attention of the row's query over its own context in fixed 128-position chunks
 * (attn.c), SwiGLU. How rows are spread over threads changes who computes a value, never the value.
 *
 * Speed: at batch 1 the torch path issues ~1,000 ATen ops per token, 5-8 us each, more than the int8
 * weights take to stream from memory (docs/peers.md); here the stages of a layer are OpenMP loops
 * separated by barriers, with no Python, no dispatcher and no allocation per step.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "kv.h"

#define SMALL_T 8 /* up to this many rows every thread prepares every row itself: no barrier per stage */
#define NQB 8     /* consecutive query rows of one sequence attended together (sharing K loads) */

typedef struct {
    int L, H, KVH, D, hidden, inter, vocab, bs, bs_shift, max_pos, kvt, nq;
    float eps;
    AttnShape as;
    Mat *qkv, *o, *gu, *dn, head;
    const float **ln1, **ln2;
    const float *norm, *embed, *cos_t, *sin_t;
    void *arena; /* the int8 / int4 weights, packed in the order a step reads them */
    size_t arena_bytes;
    void *map;   /* the caller's map the arena lies in (unmapped on free), or NULL: the arena is malloc'd */
    size_t map_len;
    int ldf, ldq; /* strides of activation rows: the widest matmul input, in floats (x16) and bytes (x64) */
    char *ws;     /* workspace, grown on demand */
    size_t ws_cap;
} Model;

int kv_has_vnni(void) { return KV_VNNI; }
size_t kv_model_weight_bytes(void *mp) { return ((Model *)mp)->arena_bytes; }
/* whether the arena lies in the map given to kv_model_new */
int kv_model_arena_mapped(void *mp) { return ((Model *)mp)->map != NULL; }
void kv_model_free(void *mp);

static size_t up(size_t v, size_t a) { return (v + a - 1) / a * a; }

/* ---- weights ---------------------------------------------------------------------------------- */

static size_t mat_bytes(const Mat *w) {
    size_t n16 = up((size_t)w->n, 16);
    if (w->fmt == W_I8) return up(up((size_t)w->n, 64) * w->kp, 64) + 3 * up(4 * n16, 64);
    return 0;
}

/* Copies an int8 matrix into the arena at p, as VNNI panels with row sums; fp32 and int4 matrices stay
 * where the caller keeps them. Returns the next free byte. */
static char *pack_mat(Mat *w, const int64_t *ptr, char *p) {
    const size_t n = w->n, k = w->k, n16 = up(n, 16);
    const float *b = (const float *)ptr[3];
    if (w->fmt == W_F32) {
        w->wf = (const float *)ptr[0];
        w->b = b;
        return p;
    }
    if (w->fmt == W_I8) {
        const int8_t *src = (const int8_t *)ptr[0];
        int8_t *wp = (int8_t *)p;
        int32_t *rs = (int32_t *)(p + up(up(n, 64) * w->kp, 64) + up(4 * n16, 64));
        memset(rs, 0, 4 * n16);
        /* panels of 64 rows (kp * 64 contiguous bytes, i8_off) on every core, each zeroed (its padding) and
         * filled while in cache: the arena's first touch, which on a VM can cost more than the copy, is
         * shared by the cores too. Each group of 4 inputs is 4 adjacent bytes of a panel, moved as one
         * word: byte by byte, this copy was most of a start. */
        const size_t panels = up(n, 64) / 64, panel_bytes = (size_t)w->kp * 64;
        #pragma omp parallel for schedule(static)
        for (size_t pn = 0; pn < panels; pn++) {
            memset(wp + pn * panel_bytes, 0, panel_bytes);
            const size_t r_end = (pn + 1) * 64 < n ? (pn + 1) * 64 : n;
            for (size_t r = pn * 64; r < r_end; r++) {
                const int8_t *sr = src + r * k;
                int8_t *dr = wp + i8_off(w->kp, (int)r, 0);
                int32_t sum = 0;
                for (size_t c = 0; c < k; c++) sum += sr[c];
                rs[r] = sum;
                size_t c = 0;
                for (; c + 4 <= k; c += 4) memcpy(dr + (c / 4) * 256, sr + c, 4);
                for (; c < k; c++) dr[(c / 4) * 256 + c % 4] = sr[c];
            }
        }
        w->wp = wp;
        p += up(up(n, 64) * w->kp, 64);
        float *s = (float *)p;
        memset(s, 0, 4 * n16);
        memcpy(s, (const float *)ptr[1], 4 * n);
        w->s = s;
        p += up(4 * n16, 64);
        w->rs = rs;
        p += up(4 * n16, 64);
        float *bb = (float *)p;
        if (b) { memset(bb, 0, 4 * n16); memcpy(bb, b, 4 * n); }
        w->b = b ? bb : NULL;
        return p + up(4 * n16, 64);
    }
    w->q4 = (const uint8_t *)ptr[0]; /* int4: read where the caller keeps it, as fp32 */
    w->d4 = (const float *)ptr[1];
    w->m4 = (const float *)ptr[2];
    w->b = b;
    return p;
}

static void mat_shape(Mat *w, int fmt, int n, int k) {
    w->fmt = fmt; w->n = n; w->k = k; w->kp = (int)up((size_t)k, 4);
}

/* iv: L H KVH D hidden inter vocab bs max_pos kvt; fv: eps scale; fm: formats of the head then of each
 * layer's qkv, o, gate_up, down; pv: embed norm cos sin, the head's 4 pointers, then per layer ln1 ln2 and
 * 4 pointers per matrix (fp32: w, -, -, b; int8: w, scales, -, b; int4: q, d, m, b). map, map_len: an
 * anonymous map the caller backed for the arena (startup.py), or NULL; the model owns it either way (it
 * holds the arena at its first 2 MiB boundary when large enough, else it is unmapped at once). */
void *kv_model_new(const int64_t *iv, const double *fv, const int64_t *fm, const int64_t *pv, void *map,
                   size_t map_len) {
    Model *m = calloc(1, sizeof(Model));
    if (!m) {
        if (map) munmap(map, map_len);
        return NULL;
    }
    m->map = map; m->map_len = map_len; /* owned from here: unmapped by kv_model_free if not used */
    m->L = (int)iv[0]; m->H = (int)iv[1]; m->KVH = (int)iv[2]; m->D = (int)iv[3];
    m->hidden = (int)iv[4]; m->inter = (int)iv[5]; m->vocab = (int)iv[6]; m->bs = (int)iv[7];
    m->max_pos = (int)iv[8]; m->kvt = (int)iv[9];
    while ((1 << m->bs_shift) < m->bs) m->bs_shift++;
    if ((1 << m->bs_shift) != m->bs) { kv_model_free(m); return NULL; }
    m->eps = (float)fv[0];
    m->as = (AttnShape){m->H, m->KVH, m->D, m->kvt, (float)fv[1]};
    m->nq = (m->H + 2 * m->KVH) * m->D;
    const int L = m->L;
    m->qkv = calloc(L, sizeof(Mat)); m->o = calloc(L, sizeof(Mat));
    m->gu = calloc(L, sizeof(Mat)); m->dn = calloc(L, sizeof(Mat));
    m->ln1 = calloc(L, sizeof(float *)); m->ln2 = calloc(L, sizeof(float *));
    if (!m->qkv || !m->o || !m->gu || !m->dn || !m->ln1 || !m->ln2) { kv_model_free(m); return NULL; }
    int kmax = m->hidden > m->inter ? m->hidden : m->inter;
    kmax = kmax > m->H * m->D ? kmax : m->H * m->D;
    m->ldf = (int)up((size_t)kmax, 16);
    m->ldq = (int)up((size_t)kmax, 64);
    mat_shape(&m->head, (int)fm[0], m->vocab, m->hidden);
    size_t total = mat_bytes(&m->head);
    for (int l = 0; l < L; l++) {
        Mat *mats[4] = {&m->qkv[l], &m->o[l], &m->gu[l], &m->dn[l]};
        int ns[4] = {m->nq, m->hidden, 2 * m->inter, m->hidden}, ks[4] = {m->hidden, m->H * m->D, m->hidden, m->inter};
        for (int j = 0; j < 4; j++) {
            mat_shape(mats[j], (int)fm[1 + 4 * l + j], ns[j], ks[j]);
            total += mat_bytes(mats[j]);
        }
    }
    const size_t huge = (size_t)2 << 20;
    total = up(total ? total : 1, huge);
    char *in_map = m->map ? (char *)up((size_t)m->map, huge) : NULL;
    if (in_map && in_map + total <= (char *)m->map + m->map_len) {
        m->arena = in_map; /* backed (and advised huge) by the caller while the process started */
    } else {
        if (m->map) munmap(m->map, m->map_len); /* too small (the model changed since it was sized): our own */
        m->map = NULL;
        if (posix_memalign(&m->arena, huge, total)) { m->arena = NULL; kv_model_free(m); return NULL; }
#ifdef MADV_HUGEPAGE
        madvise(m->arena, total, MADV_HUGEPAGE); /* advice only: without THP the copy still works */
#endif
    }
    m->arena_bytes = total;
    int p = 0;
    m->embed = (const float *)pv[p++]; m->norm = (const float *)pv[p++];
    m->cos_t = (const float *)pv[p++]; m->sin_t = (const float *)pv[p++];
    const int64_t *head_ptrs = pv + p;
    p += 4;
    char *a = m->arena;
    for (int l = 0; l < L; l++) {
        m->ln1[l] = (const float *)pv[p++]; m->ln2[l] = (const float *)pv[p++];
        Mat *mats[4] = {&m->qkv[l], &m->o[l], &m->gu[l], &m->dn[l]};
        for (int j = 0; j < 4; j++, p += 4) a = pack_mat(mats[j], pv + p, a);
    }
    pack_mat(&m->head, head_ptrs, a);
    return m;
}

void kv_model_free(void *mp) {
    Model *m = mp;
    if (!m) return;
    if (m->map) munmap(m->map, m->map_len);
    else free(m->arena);
    free(m->qkv); free(m->o); free(m->gu); free(m->dn); free(m->ln1); free(m->ln2);
    free(m->ws);
    free(m);
}

/* ---- per-row operations ------------------------------------------------------------------------ */

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* silu(g) * u with the vectorizable exponential: sigmoid(g) = 1 / (1 + e^-g) for g >= 0, e^g / (1 + e^g)
 * below, both from e = e^-|g| <= 1. */
static void swiglu(float *a, const float *g, const float *u, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) {
        float e = exp_neg(-fabsf(g[i])), r = 1.0f / (1.0f + e);
        a[i] = g[i] * (g[i] >= 0.0f ? r : e * r) * u[i];
    }
}

/* Activation buffers one matmul reads: fp32 rows h, and for int8 weights their u8 quantization. */
typedef struct {
    float *h;
    uint8_t *q;
    float *qs;
    int32_t *qz;
} Rows;

static Act act_of(const Model *m, const Rows *r) { return (Act){r->h, r->q, r->qs, r->qz, m->ldf, m->ldq}; }

/* h row i is ready: quantize it when the next matmul is int8 */
static void prep(const Model *m, const Rows *a, int i, int k, int fmt) {
    if (fmt == W_I8) quantize_row(a->q + (size_t)i * m->ldq, a->qs + i, a->qz + i, a->h + (size_t)i * m->ldf, k, (int)up((size_t)k, 4));
}

static void rope_write(const Model *m, int hh, int T, float *qkvb, const int64_t *pos, const int64_t *slot, char *kc,
                       char *vc) {
    const int H = m->H, KVH = m->KVH, D = m->D;
    const size_t row = (size_t)KVH * D;
    for (int r = 0; r < T; r++) {
        float *v = qkvb + (size_t)r * m->nq + (size_t)hh * D;
        if (hh < H + KVH) { /* RoPE, sign-folded sin table: x * cos + swap_halves(x) * sin, two roundings */
            const float *cs = m->cos_t + (size_t)pos[r] * D, *sn = m->sin_t + (size_t)pos[r] * D;
            float tmp[512];
            memcpy(tmp, v, sizeof(float) * D);
            for (int d = 0; d < D / 2; d++) v[d] = tmp[d] * cs[d] + tmp[d + D / 2] * sn[d];
            for (int d = D / 2; d < D; d++) v[d] = tmp[d] * cs[d] + tmp[d - D / 2] * sn[d];
        }
        if (hh < H) continue;
        char *base = hh < H + KVH ? kc : vc;
        size_t off = (size_t)slot[r] * row + (size_t)(hh < H + KVH ? hh - H : hh - H - KVH) * D;
        if (m->kvt == KV_F16) {
            _Float16 *dst = (_Float16 *)base + off;
            for (int d = 0; d < D; d++) dst[d] = (_Float16)v[d];
        } else if (m->kvt == KV_BF16) { /* round to nearest even, as torch's .to(bfloat16) */
            uint16_t *dst = (uint16_t *)base + off;
            for (int d = 0; d < D; d++) {
                union { float f; uint32_t u; } c = {v[d]};
                dst[d] = isnan(v[d]) ? 0x7fc0 : (uint16_t)((c.u + 0x7fff + ((c.u >> 16) & 1)) >> 16);
            }
        } else {
            memcpy((float *)base + off, v, sizeof(float) * D);
        }
    }
}

/* How many of the chunk starting at t0 each of the nqr queries at rows r0.. sees (0 .. CHUNK). */
static inline void chunk_lengths(const int64_t *pos, int r0, int nqr, int t0, int *nj) {
    for (int j = 0; j < nqr; j++) {
        const int v = (int)pos[r0 + j] + 1 - t0;
        nj[j] = v < 0 ? 0 : (v > CHUNK ? CHUNK : v);
    }
}

/* pool rows (element offsets) of positions [t0, t1) of the sequence whose block table is tab */
static void pool_rows(const Model *m, const int64_t *tab, int t0, int t1, int64_t *rows) {
    const int64_t re = (int64_t)m->KVH * m->D;
    const int sh = m->bs_shift, mask = m->bs - 1; /* block_size is a power of two (EngineConfig checks) */
    for (int p = t0; p < t1; p++) rows[p - t0] = ((tab[p >> sh] << sh) + (p & mask)) * re;
}

/* every thread: columns of W in its share of whole 16-column panels, then wait for the team */
static void mm_team(const Mat *W, const Act *A, int M, float *y, int ldy, int add) {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads(), P = (W->n + 15) / 16;
    const int p0 = (int)((int64_t)P * tid / nt), p1 = (int)((int64_t)P * (tid + 1) / nt);
    mm(W, A, M, y, ldy, add, 16 * p0, 16 * p1);
    #pragma omp barrier
}

/* ---- the step ---------------------------------------------------------------------------------- */

typedef struct {
    float *x, *qkvb, *gub, *po, *pml;
    Rows shared;
    int *it_r, *it_c, *first;
    char *per_thread;
    size_t per_thread_bytes;
} Work;

static size_t rows_bytes(const Model *m, int n) { return up((size_t)n * (4 * m->ldf + m->ldq + 8), 64) + 3 * 64; }

static Rows rows_at(const Model *m, int n, char *p) {
    Rows r;
    r.h = (float *)p; p += up((size_t)4 * n * m->ldf, 64);
    r.q = (uint8_t *)p; p += up((size_t)n * m->ldq, 64);
    r.qs = (float *)p; p += up((size_t)4 * n, 64);
    r.qz = (int32_t *)p;
    return r;
}

/* Per thread: attention scores (NQB, H, CHUNK), pool rows (CHUNK), a block of queries' partials (NQB x
 * maxch chunks) and, for small steps, its own activation rows. */
static size_t thread_bytes(const Model *m, int T, int maxch, int small) {
    size_t b = up((size_t)4 * NQB * m->H * CHUNK, 64) + 8 * CHUNK + up((size_t)4 * NQB * maxch * m->H * (m->D + 2), 64) + 64;
    return up(b + (small ? rows_bytes(m, T) : 0), 64);
}

static int workspace(Model *m, int T, int items, int maxch, int small, int nt, Work *w) {
    const size_t nx = up((size_t)4 * T * m->hidden, 64), nqkv = up((size_t)4 * T * m->nq, 64),
                 ngu = up((size_t)4 * T * 2 * m->inter, 64), npo = up((size_t)4 * items * m->H * m->D, 64),
                 npml = up((size_t)8 * items * m->H, 64), nit = up((size_t)4 * items, 64), nfirst = up((size_t)4 * (T + 1), 64),
                 nrows = small ? 0 : rows_bytes(m, T);
    w->per_thread_bytes = thread_bytes(m, T, maxch, small);
    const size_t need = nx + nqkv + ngu + npo + npml + 2 * nit + nfirst + nrows + w->per_thread_bytes * nt;
    if (need > m->ws_cap) {
        free(m->ws);
        m->ws = aligned_alloc(64, need);
        m->ws_cap = m->ws ? need : 0;
        if (!m->ws) return -1;
    }
    char *p = m->ws;
    w->x = (float *)p; p += nx;
    w->qkvb = (float *)p; p += nqkv;
    w->gub = (float *)p; p += ngu;
    w->po = (float *)p; p += npo;
    w->pml = (float *)p; p += npml;
    w->it_r = (int *)p; p += nit;
    w->it_c = (int *)p; p += nit;
    w->first = (int *)p; p += nfirst;
    if (!small) w->shared = rows_at(m, T, p);
    p += nrows;
    w->per_thread = p;
    return 0;
}

/* tok/pos/slot/rseq: (T,) int64 per row: token, position, pool slot, index of its sequence's block table in
 * bt (S, max_blocks); a row attends over positions 0..pos of its sequence (the rows before it in this step
 * included: their K / V are written first). kpool / vpool: the pool's (layers, blocks, bs, KVH, D) bases,
 * layer_stride in elements. logits (n_out, vocab) for rows out_rows. Returns 0; -1 out of memory, -2 a
 * position outside the RoPE table, -3 a token outside the vocabulary; nothing is written before a check. */
int kv_step(void *mp, int T, const int64_t *tok, const int64_t *pos, const int64_t *slot, const int64_t *rseq,
            const int64_t *bt, int max_blocks, void *kpool, void *vpool, int64_t layer_stride, int n_out,
            const int64_t *out_rows, float *logits, int nthreads) {
    Model *m = mp;
    const int Hd = m->hidden, H = m->H, D = m->D, I = m->inter, nq = m->nq;
    const int small = T <= SMALL_T;
    int maxch = 1;
    for (int r = 0; r < T; r++) {
        if (pos[r] < 0 || pos[r] >= m->max_pos) return -2;
        if (tok[r] < 0 || tok[r] >= m->vocab) return -3;
        int nc = (int)((pos[r] + CHUNK) / CHUNK);
        maxch = nc > maxch ? nc : maxch;
    }
    for (int j = 0; j < n_out; j++)
        if (out_rows[j] < 0 || out_rows[j] >= T) return -3;
    if (nthreads < 1) nthreads = 1;
    Work w;
    if (workspace(m, T, small ? T * maxch : 0, maxch, small, nthreads, &w)) return -1;
    /* blocks of up to NQB consecutive positions of one sequence (first[b] = the block's first row): a
     * prefill chunk's rows, or a decode row and its drafts, which read each K row once for all of them */
    int nblocks = 0, items = 0;
    for (int r = 0; r < T; r++)
        if (r == 0 || rseq[r] != rseq[r - 1] || pos[r] != pos[r - 1] + 1 || r - w.first[nblocks - 1] == NQB)
            w.first[nblocks++] = r;
    w.first[nblocks] = T;
    if (small) /* work items: (block, chunk of its last row's context); a row's partials at [row][chunk] */
        for (int b = 0; b < nblocks; b++)
            for (int c = 0; c * CHUNK <= pos[w.first[b + 1] - 1]; c++, items++) {
                w.it_r[items] = b; w.it_c[items] = c;
            }
    for (int r = 0; r < T; r++) memcpy(w.x + (size_t)r * Hd, m->embed + (size_t)tok[r] * Hd, sizeof(float) * Hd);
    const attn_fn attn = pick_attn(D, m->kvt);
    const attn_block_fn attn_block = pick_attn_block(D, m->kvt), attn_multi = pick_attn_multi(D, m->kvt);
    const size_t esz = m->kvt == KV_F32 ? 4 : 2;

    #pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        char *mine = w.per_thread + w.per_thread_bytes * tid;
        float *sc = (float *)mine;
        int64_t *prow = (int64_t *)(mine + up((size_t)4 * NQB * H * CHUNK, 64));
        float *part = (float *)((char *)prow + 8 * CHUNK);
        float *part_ml = part + (size_t)NQB * maxch * H * D;
        const size_t pstride = (size_t)maxch * H * D, mlstride = (size_t)maxch * H * 2;
        const Rows a = small ? rows_at(m, T, mine + w.per_thread_bytes - rows_bytes(m, T)) : w.shared;
        const Act A = act_of(m, &a);
        /* the rows this thread prepares: all of them in a small step, else its share (then a barrier) */
        const int r0 = small ? 0 : (int)((int64_t)T * tid / nt), r1 = small ? T : (int)((int64_t)T * (tid + 1) / nt);
#if defined(__SSE__)
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040); /* flush denormals (tiny softmax weights) to zero, on every thread alike */
#endif
#define SYNC() do { if (!small) { _Pragma("omp barrier") } } while (0)
        for (int r = r0; r < r1; r++) {
            rmsnorm(a.h + (size_t)r * m->ldf, w.x + (size_t)r * Hd, m->ln1[0], Hd, m->eps);
            prep(m, &a, r, Hd, m->qkv[0].fmt);
        }
        SYNC();
        for (int l = 0; l < m->L; l++) {
            char *kc = (char *)kpool + (size_t)l * layer_stride * esz, *vc = (char *)vpool + (size_t)l * layer_stride * esz;
            /* q, k, v one head (D columns) at a time: the thread that computed a head applies its RoPE and
             * writes K / V into the pool */
            #pragma omp for schedule(static)
            for (int hh = 0; hh < H + 2 * m->KVH; hh++) {
                mm(&m->qkv[l], &A, T, w.qkvb, nq, 0, hh * D, (hh + 1) * D);
                rope_write(m, hh, T, w.qkvb, pos, slot, kc, vc);
            }
            if (small) { /* few rows: spread their blocks' chunks over the team, then every thread merges all */
                #pragma omp for schedule(dynamic, 1)
                for (int i = 0; i < items; i++) {
                    const int b = w.it_r[i], c = w.it_c[i], r0 = w.first[b], nqr = w.first[b + 1] - r0;
                    const int last = (int)pos[r0 + nqr - 1], t0 = c * CHUNK, t1 = t0 + CHUNK < last + 1 ? t0 + CHUNK : last + 1;
                    float *po = w.po + ((size_t)r0 * maxch + c) * H * D, *pml = w.pml + ((size_t)r0 * maxch + c) * H * 2;
                    pool_rows(m, bt + (size_t)rseq[r0] * max_blocks, t0, t1, prow);
                    if (nqr == 1) {
                        attn(&m->as, w.qkvb + (size_t)r0 * nq, kc, vc, prow, t1 - t0, po, pml, sc);
                    } else {
                        int nj[NQB];
                        chunk_lengths(pos, r0, nqr, t0, nj);
                        attn_multi(&m->as, w.qkvb + (size_t)r0 * nq, nq, nqr, nj, kc, vc, prow, po, pstride, pml,
                                   mlstride, sc);
                    }
                }
                for (int r = 0; r < T; r++) {
                    merge_partials(&m->as, (int)(pos[r] / CHUNK) + 1, w.po + (size_t)r * pstride,
                                   w.pml + (size_t)r * mlstride, a.h + (size_t)r * m->ldf);
                    prep(m, &a, r, H * D, m->o[l].fmt);
                }
            } else { /* many rows: a block of one sequence's consecutive queries each, chunk by chunk */
                #pragma omp for schedule(dynamic, 1)
                for (int bi = 0; bi < nblocks; bi++) {
                    const int r0 = w.first[bi], nqr = w.first[bi + 1] - r0, last = (int)pos[r0 + nqr - 1];
                    const int64_t *tab = bt + (size_t)rseq[r0] * max_blocks;
                    int nj[NQB];
                    for (int c = 0; c * CHUNK <= last; c++) {
                        const int t0 = c * CHUNK, t1 = t0 + CHUNK < last + 1 ? t0 + CHUNK : last + 1;
                        pool_rows(m, tab, t0, t1, prow);
                        chunk_lengths(pos, r0, nqr, t0, nj);
                        attn_block(&m->as, w.qkvb + (size_t)r0 * nq, nq, nqr, nj, kc, vc, prow, part + (size_t)c * H * D,
                                   pstride, part_ml + (size_t)c * H * 2, mlstride, sc);
                    }
                    for (int j = 0; j < nqr; j++) {
                        merge_partials(&m->as, (int)(pos[r0 + j] / CHUNK) + 1, part + j * pstride, part_ml + j * mlstride,
                                       a.h + (size_t)(r0 + j) * m->ldf);
                        prep(m, &a, r0 + j, H * D, m->o[l].fmt);
                    }
                }
            }
            mm_team(&m->o[l], &A, T, w.x, Hd, 1);
            for (int r = r0; r < r1; r++) {
                rmsnorm(a.h + (size_t)r * m->ldf, w.x + (size_t)r * Hd, m->ln2[l], Hd, m->eps);
                prep(m, &a, r, Hd, m->gu[l].fmt);
            }
            SYNC();
            mm_team(&m->gu[l], &A, T, w.gub, 2 * I, 0);
            for (int r = r0; r < r1; r++) {
                const float *g = w.gub + (size_t)r * 2 * I;
                swiglu(a.h + (size_t)r * m->ldf, g, g + I, I);
                prep(m, &a, r, I, m->dn[l].fmt);
            }
            SYNC();
            mm_team(&m->dn[l], &A, T, w.x, Hd, 1);
            if (l + 1 < m->L) {
                for (int r = r0; r < r1; r++) {
                    rmsnorm(a.h + (size_t)r * m->ldf, w.x + (size_t)r * Hd, m->ln1[l + 1], Hd, m->eps);
                    prep(m, &a, r, Hd, m->qkv[l + 1].fmt);
                }
                SYNC();
            }
        }
        /* the final norm and the LM head, for the rows whose next token is wanted */
        const int j0 = small ? 0 : (int)((int64_t)n_out * tid / nt), j1 = small ? n_out : (int)((int64_t)n_out * (tid + 1) / nt);
        for (int j = j0; j < j1; j++) {
            rmsnorm(a.h + (size_t)j * m->ldf, w.x + (size_t)out_rows[j] * Hd, m->norm, Hd, m->eps);
            prep(m, &a, j, Hd, m->head.fmt);
        }
        SYNC();
        mm_team(&m->head, &A, n_out, logits, m->vocab, 0);
#undef SYNC
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    return 0;
}
