/* The fp16 kernels of the portable runtime, one code path per instruction set (AVX-512, AVX2+F16C, NEON, plain
   C), chosen at run time.

   Conversions. The runtime rounds every op's output to fp16 (as CoreML computes in fp16) and widens fp16 state and
   weights to float32: round_fp16(src, dst[, isa]) writes src's float32 values rounded to the nearest fp16 value
   (ties to even; overflow to inf) into dst, as float32, in one pass (dst may be src); widen(src, dst[, isa])
   writes fp16 values as float32. The CPU's conversion instructions do this exactly as numpy's cast does, without
   its second pass and temporary array, and without torch's per-call and threading costs (a 64-row prefill
   batch's 2 MB arrays: 51 us against torch's 205 us on one thread); the plain C path is the same IEEE rounding in
   integer arithmetic.

   fp16 weight rows times a float32 column, summed in float32: a decode step's projections.

   A decode step reads every weight once, so it is bound by memory bandwidth, and fp16 weights are half the bytes
   of float32 ones. No installed library does this product at that rate on every CPU: torch's fp16 GEMV streams
   ~20 GB/s on an AMD EPYC (Zen 4) but ~9 GB/s on an Intel Xeon with AVX512-FP16 (another code path), and numpy
   has no fp16 BLAS. Each weight is widened to float32 in registers (exact) and multiplied by the column with
   float32 fused multiply-adds: the products are the float32 BLAS path's, only the order of the sums differs.

   gemv(w, x, out, cols[, isa[, threads]]): w holds rows*cols fp16 values (C order), x cols float32 ones, out rows
   float32 ones; out[r] = sum_k w[r, k] * x[k], the rows split over `threads` threads (the caller's among them),
   without the GIL. `isa` picks a code path (tests run each one this CPU has; isas() lists them): -1 the
   fastest.

   fp16 weight rows times several float32 columns: a prefill batch's projections, and fp16 mode's attention.

   gemm(w, x, out, cols, n[, threads[, batches]]), AVX-512 only: x is cols x n float32 (C order), out rows x n, or
   `batches` such products one after the other in each buffer (attention's heads); each output summed in k order
   (below). Where torch has no oneDNN fp16 GEMM (no AVX512-FP16), the other way was to widen
   weight blocks to float32 in memory for numpy's BLAS: a third of the time spent widening, and on a Zen 5 EPYC
   OpenBLAS runs its Haswell (AVX2) kernels at 160-185 GF/s where this one reaches 310-350. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { ISA_GENERIC, ISA_AVX2, ISA_AVX512, ISA_NEON, ISA_COUNT };
static const char *ISA_NAMES[ISA_COUNT] = {"generic", "avx2", "avx512", "neon"};

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);  /* inf, nan */
    } else if (exp) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant) {  /* subnormal: normalize */
        int e = -1;
        do { mant <<= 1; e++; } while (!(mant & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float32 -> nearest fp16 (ties to even), the plain C way */
static uint16_t float_to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, mag = x & 0x7fffffffu;
    if (mag > 0x7f800000u)                    /* nan: stays nan (quiet) */
        return (uint16_t)(sign | 0x7e00u | ((mag >> 13) & 0x3ffu));
    if (mag >= 0x477ff000u)                   /* 65520 and above round to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (mag >= 0x38800000u) {                 /* fp16 normal: round the mantissa at bit 13, rebias the exponent */
        uint32_t r = mag + 0x0fffu + ((mag >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    if (mag <= 0x33000000u)                   /* at most half the smallest subnormal (2**-25): zero */
        return (uint16_t)sign;
    uint32_t m = (mag & 0x7fffffu) | 0x800000u, shift = 126u - (mag >> 23);  /* subnormal: m * 2**-shift ulps */
    uint32_t r = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    r += rest > half || (rest == half && (r & 1u));
    return (uint16_t)(sign | r);             /* r may reach 0x400: the smallest normal, encoded alike */
}

static void round_generic(const float *src, float *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) dst[i] = half_to_float(float_to_half(src[i]));
}

static void widen_generic(const uint16_t *src, float *dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

static void rows_generic(const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n)
{
    for (Py_ssize_t r = 0; r < rows; r++, w += cols) {
        float acc[4] = {0, 0, 0, 0};
        Py_ssize_t k = 0;
        for (; k + 4 <= cols; k += 4)
            for (int j = 0; j < 4; j++) acc[j] += half_to_float(w[k + j]) * x[k + j];
        float sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (; k < cols; k++) sum += half_to_float(w[k]) * x[k];
        out[r] = sum;
    }
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1

#define NEAREST (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

__attribute__((target("avx,f16c")))
static void round_avx2(const float *src, float *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(src + i), NEAREST)));
    for (; i < n; i++) dst[i] = half_to_float(float_to_half(src[i]));
}

__attribute__((target("avx,f16c")))
static void widen_avx2(const uint16_t *src, float *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

__attribute__((target("avx512f")))
static void round_avx512(const float *src, float *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(src + i), NEAREST)));
    if (i < n) {  /* the tail under a mask */
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), NEAREST)));
    }
}

__attribute__((target("avx512f")))
static void widen_avx512(const uint16_t *src, float *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

__attribute__((target("avx2,fma,f16c")))
static void rows_avx2(const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n)
{
    for (Py_ssize_t r = 0; r < rows; r++, w += cols) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        Py_ssize_t k = 0;
        for (; k + 32 <= cols; k += 32) {
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k))), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 8))), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 16))), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 24))), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k + 8 <= cols; k += 8)
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k))), _mm256_loadu_ps(x + k), a0);
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        float sum = _mm_cvtss_f32(s);
        for (; k < cols; k++) sum += half_to_float(w[k]) * x[k];
        out[r] = sum;
    }
}

__attribute__((target("avx512f")))
static void rows_avx512(const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n)
{
    for (Py_ssize_t r = 0; r < rows; r++, w += cols) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        Py_ssize_t k = 0;
        for (; k + 64 <= cols; k += 64) {
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k))), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k + 16))), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k + 32))), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k + 48))), _mm512_loadu_ps(x + k + 48), a3);
        }
        for (; k + 16 <= cols; k += 16)
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + k))), _mm512_loadu_ps(x + k), a0);
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; k < cols; k++) sum += half_to_float(w[k]) * x[k];
        out[r] = sum;
    }
}

/* fp16 weight rows times several float32 columns (a prefill batch's projections), AVX-512: the blocked scheme of
   GotoBLAS-style GEMMs. Each depth block of GEMM_ROWS rows is widened once into a small float32 buffer (L1), each
   weight broadcast and multiplied with 16 columns at a time of x's rows (a GEMM_DEPTH x n block of x stays in L2),
   into GEMM_ROWS x 64 accumulators in registers. Every output sums its products in float32, one fused multiply-add
   at a time, in the order k = 0, 1, ...: the same sum whatever the rows, threads or columns. Weights are read
   from memory once per product: no float32 copy of them ever reaches DRAM. */
#define GEMM_ROWS 6      /* rows of a register tile: 6 x 4 accumulators of 16 floats, of the 32 registers */
#define GEMM_DEPTH 256   /* k per block */
#define GEMM_BLOCK 96    /* rows per block: their outputs stay in L1 across the depth blocks */

__attribute__((always_inline, target("avx512f")))
static inline void gemm_tile(const float *wb, Py_ssize_t depth, const float *x, Py_ssize_t n, float *out, int rows,
                             int vectors, __mmask16 last, int first)
{
    __m512 acc[GEMM_ROWS][4], xv[4];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < vectors; j++)
            acc[i][j] = first ? _mm512_setzero_ps()
                      : j == vectors - 1 ? _mm512_maskz_loadu_ps(last, out + i * n + 16 * j)
                                         : _mm512_loadu_ps(out + i * n + 16 * j);
    for (Py_ssize_t k = 0; k < depth; k++, x += n) {
        for (int j = 0; j < vectors; j++)
            xv[j] = j == vectors - 1 ? _mm512_maskz_loadu_ps(last, x + 16 * j) : _mm512_loadu_ps(x + 16 * j);
        for (int i = 0; i < rows; i++) {
            __m512 b = _mm512_set1_ps(wb[i * GEMM_DEPTH + k]);
            for (int j = 0; j < vectors; j++)
                acc[i][j] = _mm512_fmadd_ps(b, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < vectors; j++) {
            if (j == vectors - 1)
                _mm512_mask_storeu_ps(out + i * n + 16 * j, last, acc[i][j]);
            else
                _mm512_storeu_ps(out + i * n + 16 * j, acc[i][j]);
        }
}

/* the tile for `rows` x `vectors` as compile-time constants: a switch over the few shapes */
#define GEMM_TILE_CASE(R, V) case (R) * 8 + (V): gemm_tile(wb, depth, x, n, out, R, V, last, first); break;
#define GEMM_TILE_ROW(R) GEMM_TILE_CASE(R, 1) GEMM_TILE_CASE(R, 2) GEMM_TILE_CASE(R, 3) GEMM_TILE_CASE(R, 4)

__attribute__((target("avx512f")))
static void gemm_tile_any(const float *wb, Py_ssize_t depth, const float *x, Py_ssize_t n, float *out, int rows,
                          int vectors, __mmask16 last, int first)
{
    switch (rows * 8 + vectors) {
    GEMM_TILE_ROW(1) GEMM_TILE_ROW(2) GEMM_TILE_ROW(3) GEMM_TILE_ROW(4) GEMM_TILE_ROW(5) GEMM_TILE_ROW(6)
    }
}

__attribute__((target("avx512f")))
static void gemm_avx512(const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n)
{
    float wb[GEMM_ROWS * GEMM_DEPTH] __attribute__((aligned(64)));
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += GEMM_BLOCK) {
        Py_ssize_t r1 = r0 + GEMM_BLOCK < rows ? r0 + GEMM_BLOCK : rows;
        for (Py_ssize_t k0 = 0; k0 < cols; k0 += GEMM_DEPTH) {
            Py_ssize_t depth = cols - k0 < GEMM_DEPTH ? cols - k0 : GEMM_DEPTH;
            for (Py_ssize_t r = r0; r < r1; r += GEMM_ROWS) {
                int tile_rows = r1 - r < GEMM_ROWS ? (int)(r1 - r) : GEMM_ROWS;
                for (int i = 0; i < tile_rows; i++)
                    widen_avx512(w + (r + i) * cols + k0, wb + i * GEMM_DEPTH, depth);
                for (Py_ssize_t c = 0; c < n; c += 64) {
                    Py_ssize_t width = n - c < 64 ? n - c : 64;
                    int vectors = (int)((width + 15) / 16);
                    __mmask16 last = (__mmask16)(width % 16 ? (1u << (width % 16)) - 1u : 0xffffu);
                    gemm_tile_any(wb, depth, x + k0 * n + c, n, out + r * n + c, tile_rows, vectors, last, k0 == 0);
                }
            }
        }
    }
}
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define HAVE_NEON 1

static void round_neon(const float *src, float *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4)  /* the default rounding mode (FPCR): to nearest, ties to even */
        vst1q_f32(dst + i, vcvt_f32_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(float_to_half(src[i]));
}

static void widen_neon(const uint16_t *src, float *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4)
        vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

static void rows_neon(const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t n)
{
    for (Py_ssize_t r = 0; r < rows; r++, w += cols) {
        float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
        Py_ssize_t k = 0;
        for (; k + 16 <= cols; k += 16) {
            a0 = vfmaq_f32(a0, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k))), vld1q_f32(x + k));
            a1 = vfmaq_f32(a1, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k + 4))), vld1q_f32(x + k + 4));
            a2 = vfmaq_f32(a2, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k + 8))), vld1q_f32(x + k + 8));
            a3 = vfmaq_f32(a3, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k + 12))), vld1q_f32(x + k + 12));
        }
        float sum = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
        for (; k < cols; k++) sum += half_to_float(w[k]) * x[k];
        out[r] = sum;
    }
}
#endif

/* rows of fp16 weights (each `cols` long) times x (cols x n float32, C order) into out (rows x n); the GEMV
   kernels take n = 1 */
typedef void (*rows_fn)(const uint16_t *, const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t);

static int isa_available(int isa)
{
    switch (isa) {
    case ISA_GENERIC: return 1;
#ifdef HAVE_X86
    /* one set of features per code path, GEMV and conversions alike */
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case ISA_AVX512: return __builtin_cpu_supports("avx512f");
#endif
#ifdef HAVE_NEON
    case ISA_NEON: return 1;
#endif
    default: return 0;
    }
}

static rows_fn isa_function(int isa)
{
    switch (isa) {
#ifdef HAVE_X86
    case ISA_AVX2: return rows_avx2;
    case ISA_AVX512: return rows_avx512;
#endif
#ifdef HAVE_NEON
    case ISA_NEON: return rows_neon;
#endif
    default: return rows_generic;
    }
}

typedef void (*round_fn)(const float *, float *, Py_ssize_t);
typedef void (*widen_fn)(const uint16_t *, float *, Py_ssize_t);

static round_fn round_function(int isa)
{
    switch (isa) {
#ifdef HAVE_X86
    case ISA_AVX2: return round_avx2;
    case ISA_AVX512: return round_avx512;
#endif
#ifdef HAVE_NEON
    case ISA_NEON: return round_neon;
#endif
    default: return round_generic;
    }
}

static widen_fn widen_function(int isa)
{
    switch (isa) {
#ifdef HAVE_X86
    case ISA_AVX2: return widen_avx2;
    case ISA_AVX512: return widen_avx512;
#endif
#ifdef HAVE_NEON
    case ISA_NEON: return widen_neon;
#endif
    default: return widen_generic;
    }
}

/* Rows split over threads of our own: handing a part to a Python thread cost ~0.1 ms per product (the GIL passes
   hands several times), a tenth of a decode step's 8 MB projection. Workers wait briefly spinning, then on a
   condition variable; a process forked from one with workers starts without them (pthread_atfork). */
#if !defined(_WIN32)
#include <pthread.h>
#define HAVE_POOL 1
#define MAX_THREADS 64
/* ~0.5-1 ms of pause instructions before sleeping: longer than the other ops between two of a decode step's
   products (a 1B token: 102-106 ms against 108-113 ms with 2000) */
#define SPINS 20000

typedef struct { rows_fn fn; const uint16_t *w; const float *x; float *out; Py_ssize_t rows, cols, n; } part_t;

static struct {
    pthread_mutex_t job;              /* one split product at a time (others run on their caller's thread) */
    pthread_mutex_t lock;
    pthread_cond_t start, done;
    int workers;                      /* started */
    unsigned long round;              /* bumped once per split product */
    int busy;                         /* workers not done with this round */
    int active;                       /* workers with a part this round */
    unsigned long born[MAX_THREADS];  /* the round each worker started at */
    part_t parts[MAX_THREADS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          0, 0, 0, 0, {0}, {{0}}};

static void spin_pause(void)
{
#if defined(HAVE_X86)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    unsigned long seen = pool.born[id];
    for (;;) {
        int spins = 0;
        while (__atomic_load_n(&pool.round, __ATOMIC_ACQUIRE) == seen && spins < SPINS) {
            spin_pause();
            spins++;
        }
        if (__atomic_load_n(&pool.round, __ATOMIC_ACQUIRE) == seen) {
            pthread_mutex_lock(&pool.lock);
            while (__atomic_load_n(&pool.round, __ATOMIC_ACQUIRE) == seen)
                pthread_cond_wait(&pool.start, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = __atomic_load_n(&pool.round, __ATOMIC_ACQUIRE);
        if (id < pool.active) {
            part_t p = pool.parts[id];
            p.fn(p.w, p.x, p.out, p.rows, p.cols, p.n);
        }
        /* every worker reports every round, busy or not: none can still be in one round when the next starts */
        if (__atomic_sub_fetch(&pool.busy, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

static void forget_workers(void)  /* in a forked child: the parent's workers are not there */
{
    pthread_mutex_init(&pool.job, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.start, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.workers = 0;
    pool.busy = 0;
}

/* rows split into `threads` parts, the calling thread taking the first; called without the GIL */
static void split_rows(rows_fn fn, const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols,
                       Py_ssize_t n, int threads)
{
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 2 || rows < threads || pthread_mutex_trylock(&pool.job) != 0) {
        fn(w, x, out, rows, cols, n);
        return;
    }
    while (pool.workers < threads - 1) {  /* worker i takes part i + 1 */
        pthread_t t;
        pool.born[pool.workers] = pool.round;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)pool.workers) != 0)
            break;
        pthread_detach(t);
        pool.workers++;
    }
    int parts = pool.workers + 1 < threads ? pool.workers + 1 : threads;
    Py_ssize_t first = rows / parts;
    for (int i = 1; i < parts; i++) {
        Py_ssize_t a = rows * i / parts, b = rows * (i + 1) / parts;
        pool.parts[i - 1] = (part_t){fn, w + a * cols, x, out + a * n, b - a, cols, n};
    }
    pool.active = parts - 1;
    __atomic_store_n(&pool.busy, pool.workers, __ATOMIC_RELEASE);
    pthread_mutex_lock(&pool.lock);
    __atomic_add_fetch(&pool.round, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.lock);
    fn(w, x, out, first, cols, n);
    for (int spins = 0; __atomic_load_n(&pool.busy, __ATOMIC_ACQUIRE) && spins < SPINS; spins++)
        spin_pause();
    if (__atomic_load_n(&pool.busy, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&pool.lock);
        while (__atomic_load_n(&pool.busy, __ATOMIC_ACQUIRE))
            pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.job);
}
#else
static void split_rows(rows_fn fn, const uint16_t *w, const float *x, float *out, Py_ssize_t rows, Py_ssize_t cols,
                       Py_ssize_t n, int threads)
{
    fn(w, x, out, rows, cols, n);
}
#endif

static int best_isa = -1;

static int fastest(void)
{
    if (best_isa < 0) {
        best_isa = ISA_GENERIC;
        for (int isa = ISA_COUNT - 1; isa > ISA_GENERIC; isa--)
            if (isa_available(isa)) { best_isa = isa; break; }
    }
    return best_isa;
}

static PyObject *gemv(PyObject *self, PyObject *args)
{
    Py_buffer w, x, out;
    Py_ssize_t cols;
    int isa = -1, threads = 1;
    if (!PyArg_ParseTuple(args, "y*y*w*n|ii", &w, &x, &out, &cols, &isa, &threads))
        return NULL;
    PyObject *result = NULL;
    if (isa < 0)
        isa = fastest();
    if (isa >= ISA_COUNT || !isa_available(isa)) {
        PyErr_Format(PyExc_ValueError, "gemv: code path %d is not available on this CPU", isa);
    } else if (cols <= 0 || w.len % (2 * cols) || x.len != 4 * cols) {
        PyErr_Format(PyExc_ValueError, "gemv: %zd weight bytes and %zd column bytes do not make rows of %zd fp16 "
                     "weights and one float32 column", w.len, x.len, cols);
    } else if (out.len != 4 * (w.len / (2 * cols))) {
        PyErr_Format(PyExc_ValueError, "gemv: %zd output bytes for %zd rows", out.len, w.len / (2 * cols));
    } else if (!PyBuffer_IsContiguous(&w, 'C') || !PyBuffer_IsContiguous(&x, 'C') || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "gemv: buffers must be C-contiguous");
    } else {
        rows_fn fn = isa_function(isa);
        Py_ssize_t rows = w.len / (2 * cols);
        Py_BEGIN_ALLOW_THREADS
        split_rows(fn, (const uint16_t *)w.buf, (const float *)x.buf, (float *)out.buf, rows, cols, 1, threads);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *gemm(PyObject *self, PyObject *args)
{
    Py_buffer w, x, out;
    Py_ssize_t cols, n, batches = 1;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "y*y*w*nn|in", &w, &x, &out, &cols, &n, &threads, &batches))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t rows = cols > 0 && n > 0 && batches > 0 ? w.len / (2 * cols * batches) : 0;
#ifdef HAVE_X86
    int available = isa_available(ISA_AVX512);
#else
    int available = 0;
#endif
    if (!available) {
        PyErr_SetString(PyExc_ValueError, "gemm: needs AVX-512, which this CPU does not have");
    } else if (cols <= 0 || n <= 0 || batches <= 0 || w.len % (2 * cols * batches) || x.len != 4 * cols * n * batches) {
        PyErr_Format(PyExc_ValueError, "gemm: %zd weight bytes and %zd input bytes do not make %zd batches of rows "
                     "of %zd fp16 weights and a %zd x %zd float32 input", w.len, x.len, batches, cols, cols, n);
    } else if (out.len != 4 * rows * n * batches) {
        PyErr_Format(PyExc_ValueError, "gemm: %zd output bytes for %zd batches of %zd x %zd float32 outputs", out.len,
                     batches, rows, n);
    } else if (!PyBuffer_IsContiguous(&w, 'C') || !PyBuffer_IsContiguous(&x, 'C') || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "gemm: buffers must be C-contiguous");
    } else {
#ifdef HAVE_X86
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t b = 0; b < batches; b++)
            split_rows(gemm_avx512, (const uint16_t *)w.buf + b * rows * cols, (const float *)x.buf + b * cols * n,
                       (float *)out.buf + b * rows * n, rows, cols, n, threads);
        Py_END_ALLOW_THREADS
#endif
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* src and dst: C-contiguous buffers of n elements of src_size and 4 bytes; -1 (an exception set) if not */
static Py_ssize_t conversion_size(const char *name, Py_buffer *src, Py_buffer *dst, Py_ssize_t src_size, int *isa)
{
    if (*isa < 0)
        *isa = fastest();
    if (*isa >= ISA_COUNT || !isa_available(*isa)) {
        PyErr_Format(PyExc_ValueError, "%s: code path %d is not available on this CPU", name, *isa);
        return -1;
    }
    if (!PyBuffer_IsContiguous(src, 'C') || !PyBuffer_IsContiguous(dst, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: buffers must be C-contiguous", name);
        return -1;
    }
    if (src->len % src_size || dst->len != src->len / src_size * 4) {
        PyErr_Format(PyExc_ValueError, "%s: %zd source bytes (%zd per value) and %zd float32 output bytes do not "
                     "hold the same number of values", name, src->len, src_size, dst->len);
        return -1;
    }
    return src->len / src_size;
}

static PyObject *round_fp16(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int isa = -1;
    if (!PyArg_ParseTuple(args, "y*w*|i", &src, &dst, &isa))
        return NULL;
    Py_ssize_t n = conversion_size("round_fp16", &src, &dst, 4, &isa);
    if (n >= 0) {
        round_fn fn = round_function(isa);
        Py_BEGIN_ALLOW_THREADS
        fn((const float *)src.buf, (float *)dst.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return n >= 0 ? Py_NewRef(Py_None) : NULL;
}

static PyObject *widen(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int isa = -1;
    if (!PyArg_ParseTuple(args, "y*w*|i", &src, &dst, &isa))
        return NULL;
    Py_ssize_t n = conversion_size("widen", &src, &dst, 2, &isa);
    if (n >= 0) {
        widen_fn fn = widen_function(isa);
        Py_BEGIN_ALLOW_THREADS
        fn((const uint16_t *)src.buf, (float *)dst.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return n >= 0 ? Py_NewRef(Py_None) : NULL;
}

static PyObject *isas(PyObject *self, PyObject *unused)
{
    PyObject *names = PyDict_New();
    if (!names)
        return NULL;
    for (int isa = 0; isa < ISA_COUNT; isa++) {
        if (!isa_available(isa))
            continue;
        PyObject *code = PyLong_FromLong(isa);
        int failed = !code || PyDict_SetItemString(names, ISA_NAMES[isa], code) < 0;
        Py_XDECREF(code);
        if (failed) { Py_DECREF(names); return NULL; }
    }
    return names;
}

static PyObject *fastest_isa(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(ISA_NAMES[fastest()]);
}

static PyMethodDef methods[] = {
    {"gemv", gemv, METH_VARARGS, "gemv(w, x, out, cols[, isa[, threads]]): out[r] = sum_k w[r, k] * x[k] (fp16 w, float32 x, out)"},
    {"gemm", gemm, METH_VARARGS, "gemm(w, x, out, cols, n[, threads[, batches]]): out = w @ x (fp16 w rows x cols, float32 x cols x n, out rows x n), per batch; AVX-512"},
    {"round_fp16", round_fp16, METH_VARARGS, "round_fp16(src, dst[, isa]): dst = src rounded to fp16, as float32 (dst may be src)"},
    {"widen", widen, METH_VARARGS, "widen(src, dst[, isa]): dst = fp16 src as float32"},
    {"isas", isas, METH_NOARGS, "the code paths this CPU can run: {name: isa}"},
    {"fastest", fastest_isa, METH_NOARGS, "the code path taken by default"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fp16", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fp16(void)
{
#ifdef HAVE_POOL
    pthread_atfork(NULL, NULL, forget_workers);
#endif
    return PyModule_Create(&module);
}
