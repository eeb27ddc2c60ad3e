/* Weight-only quantized (W4A16 / W8A16) matrix-vector kernel for CPU decode, compiled on the user's machine at
 * first use (see native.py).
 *
 * Layout (built by native.py from any checkpoint format):
 *   codes  4-bit (2/3/4-bit codes): uint8 [blocks][K/2][64]: byte (p, lane) of block b holds row b*64+lane's codes
 *          for inputs 2p (low nibble) and 2p+1 (high nibble): one cache line per input pair and block;
 *          8-bit: uint8 [blocks][K][64]: byte (k, lane) holds row b*64+lane's code for input k: one line per input.
 *          Either way a block is read strictly in order, one input pair at a time.
 *   scales [blocks][groups][64] float16 (the checkpoint's own values) or float32.
 *   zeros  uint8 [blocks][groups][64], or NULL with one `zero` for every group (symmetric layers).
 * Rows past N are padding (zero codes and scales) and are not stored.
 *
 * y[m, n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] * x[m, k] - zero[n, g] * sum_{k in g} x[m, k]).
 * Activations are read as float32 (bf16 / fp16 inputs converted exactly), products are accumulated in float32.
 * Why not aten's int4 kernel: its bf16 [scale, offset] table adds 4 bytes per group to the 16 of codes and needs
 * bf16 activations; here the table is the checkpoint's 2-byte scales and float32 activations stay float32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SR_AVX512 1
#endif

#define BLOCK 64
#ifndef SR_PREFETCH
#define SR_PREFETCH 64 /* lines ahead: 4 KB, past the page where the hardware prefetcher stops */
#endif

enum { SR_F32 = 0, SR_BF16 = 1, SR_F16 = 2 };

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) { /* round to nearest even */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7FFFFFFF;
    if (absx >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (absx > 0x7F800000u ? 0x200 : 0));
    if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00); /* overflows to inf */
    if (absx < 0x38800000u) { /* subnormal or zero in half */
        float a, magic = 0.5f; /* 2^-1: adding it rounds to a multiple of 2^-24 in the low mantissa bits */
        memcpy(&a, &absx, 4);
        uint32_t r;
        float sum = a + magic;
        memcpy(&r, &sum, 4);
        return (uint16_t)(sign | (r - 0x3F000000u));
    }
    uint32_t odd = (absx >> 13) & 1;
    absx += 0xC8000FFFu + odd; /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (absx >> 13));
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7FFFFFFF) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40);
    x += 0x7FFF + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

/* Whole-array conversions, one loop per dtype so that the compiler vectorises them. */
static void load_row(const void *x, int dtype, long n, float *out) {
    if (dtype == SR_F32) {
        memcpy(out, x, sizeof(float) * n);
    } else if (dtype == SR_BF16) {
        const uint16_t *b = x;
        for (long i = 0; i < n; i++) out[i] = bf16_to_float(b[i]);
    } else {
#ifdef __FLT16_MAX__ /* the compiler's own conversion: F16C / AVX512-FP16 / NEON instructions */
        const _Float16 *h = x;
        for (long i = 0; i < n; i++) out[i] = (float)h[i];
#else
        const uint16_t *h = x;
        for (long i = 0; i < n; i++) out[i] = half_to_float(h[i]);
#endif
    }
}

static void store_row(const float *v, long n, int dtype, void *y) {
    if (dtype == SR_F32) {
        memcpy(y, v, sizeof(float) * n);
    } else if (dtype == SR_BF16) {
        uint16_t *b = y;
        for (long i = 0; i < n; i++) b[i] = float_to_bf16(v[i]);
    } else {
#ifdef __FLT16_MAX__
        _Float16 *h = y;
        for (long i = 0; i < n; i++) h[i] = (_Float16)v[i];
#else
        uint16_t *h = y;
        for (long i = 0; i < n; i++) h[i] = float_to_half(v[i]);
#endif
    }
}

static inline float load_scale(const void *scales, int half, long i) {
#ifdef __FLT16_MAX__
    return half ? (float)((const _Float16 *)scales)[i] : ((const float *)scales)[i];
#else
    return half ? half_to_float(((const uint16_t *)scales)[i]) : ((const float *)scales)[i];
#endif
}

/* Bytes of one block's codes per input pair: one cache line of nibbles, or two lines of bytes. */
#define PAIR_BYTES(bits) ((bits) == 8 ? 2 * BLOCK : BLOCK)

static inline __attribute__((always_inline)) float code_lo(const int bits, const uint8_t *c, int lane) {
    return bits == 8 ? (float)c[lane] : (float)(c[lane] & 0xF);
}

static inline __attribute__((always_inline)) float code_hi(const int bits, const uint8_t *c, int lane) {
    return bits == 8 ? (float)c[BLOCK + lane] : (float)(c[lane] >> 4);
}

#ifdef SR_AVX512
/* The codes of tile t (16 rows) for the pair's two inputs, as floats.  4-bit: a table lookup (vpermps reads the low
 * 4 bits of each lane, so the low nibble needs no mask and neither nibble an int-to-float conversion). */
static inline __attribute__((always_inline)) void unpack_pair(const int bits, const uint8_t *c, int t,
                                                              __m512 code_values, __m512 *lo, __m512 *hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 16 * t)));
    if (bits == 8) {
        *lo = _mm512_cvtepi32_ps(v);
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + BLOCK + 16 * t))));
    } else {
        *lo = _mm512_permutexvar_ps(v, code_values);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code_values);
    }
}

static inline __attribute__((always_inline)) void prefetch_pair(const int bits, const uint8_t *c) {
    for (int line = 0; line < PAIR_BYTES(bits); line += BLOCK)
        _mm_prefetch((const char *)(c + SR_PREFETCH * BLOCK + line), _MM_HINT_T0);
}

static inline __attribute__((always_inline)) void group_scale_zero(const void *scales, int half, const uint8_t *zeros,
                                                                   int zero, long at, __m512 *s, __m512 *z) {
    if (half) *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)scales + at)));
    else *s = _mm512_loadu_ps((const float *)scales + at);
    if (zeros) *z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + at))));
    else *z = _mm512_set1_ps((float)zero);
}
#endif

#ifdef SR_AVX512
#define SR_MAX_ROWS 4
/* R (1..4) activation rows against one block of 64 rows: out[r * 64 + lane] = y of row b*64+lane for activation
 * row r.  Each unpacked code feeds R FMAs, so a few rows (batched decode, short prompts) cost well under R
 * single-row passes.  The 4R accumulator chains hide the FMA latency from R = 2 on; a single row splits its even
 * and odd inputs over two chains instead.  R and bits are constants at every call site, so the loops over rows
 * unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void block_rows(const int bits, const int R, const float *xf,
                                                             const float *xsum, int K, int G, const uint8_t *codes,
                                                             const void *scales, int half, const uint8_t *zeros,
                                                             int zero, float *out) {
    const int groups = K / G, pairs_per_group = G / 2;
    const __m512 code_values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int i = 0; i < R * BLOCK; i++) out[i] = 0.0f;
    for (int g = 0; g < groups; g++) {
        __m512 a[SR_MAX_ROWS][4], odd[4];
        for (int t = 0; t < 4; t++) {
            odd[t] = _mm512_setzero_ps();
            for (int r = 0; r < R; r++) a[r][t] = _mm512_setzero_ps();
        }
        const uint8_t *c = codes + (long)g * pairs_per_group * PAIR_BYTES(bits);
        for (int p = 0; p < pairs_per_group; p++, c += PAIR_BYTES(bits)) {
            prefetch_pair(bits, c);
            const long k = (long)g * G + 2 * p;
            for (int t = 0; t < 4; t++) {
                __m512 lo, hi;
                unpack_pair(bits, c, t, code_values, &lo, &hi);
                for (int r = 0; r < R; r++) {
                    a[r][t] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xf[r * (long)K + k]), a[r][t]);
                    const __m512 x1 = _mm512_set1_ps(xf[r * (long)K + k + 1]);
                    if (R == 1) odd[t] = _mm512_fmadd_ps(hi, x1, odd[t]);
                    else a[r][t] = _mm512_fmadd_ps(hi, x1, a[r][t]);
                }
            }
        }
        for (int t = 0; t < 4; t++) {
            __m512 s, z;
            group_scale_zero(scales, half, zeros, zero, (long)g * BLOCK + 16 * t, &s, &z);
            if (R == 1) a[0][t] = _mm512_add_ps(a[0][t], odd[t]);
            for (int r = 0; r < R; r++) {
                float *o = out + r * BLOCK + 16 * t;
                const __m512 gs = _mm512_set1_ps(xsum[r * (long)groups + g]);
                _mm512_storeu_ps(o, _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, gs, a[r][t]), _mm512_loadu_ps(o)));
            }
        }
    }
}
#else
/* Without AVX-512: one activation row against one block, as a plain loop that -O3 -march=native vectorises. */
static inline __attribute__((always_inline)) void block_row(const int bits, const float *xf, const float *xsum, int K,
                                                            int G, const uint8_t *codes, const void *scales, int half,
                                                            const uint8_t *zeros, int zero, float *out) {
    const int groups = K / G, pairs_per_group = G / 2;
    for (int lane = 0; lane < BLOCK; lane++) out[lane] = 0.0f;
    for (int g = 0; g < groups; g++) {
        float acc[BLOCK] = {0};
        const uint8_t *c = codes + (long)g * pairs_per_group * PAIR_BYTES(bits);
        const float *xg = xf + (long)g * G;
        for (int p = 0; p < pairs_per_group; p++, c += PAIR_BYTES(bits)) {
            const float x0 = xg[2 * p], x1 = xg[2 * p + 1];
            for (int lane = 0; lane < BLOCK; lane++) acc[lane] += code_lo(bits, c, lane) * x0 + code_hi(bits, c, lane) * x1;
        }
        for (int lane = 0; lane < BLOCK; lane++) {
            const long at = (long)g * BLOCK + lane;
            const float z = zeros ? (float)zeros[at] : (float)zero;
            out[lane] += load_scale(scales, half, at) * (acc[lane] - z * xsum[g]);
        }
    }
}
#endif

/* Up to SR_MAX_ROWS activation rows (1 without AVX-512) against one block; returns how many it took.  `bits` is a
 * constant in each of the two specialisations below, so each holds one code width's loops only. */
static inline __attribute__((always_inline)) int block_step(const int bits, int rows_left, const float *xf,
                                                            const float *xsum, int K, int G, const uint8_t *codes,
                                                            const void *scales, int half, const uint8_t *zeros,
                                                            int zero, float *out) {
#ifdef SR_AVX512
    const int R = rows_left < SR_MAX_ROWS ? rows_left : SR_MAX_ROWS;
    if (R == 4) block_rows(bits, 4, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
    else if (R == 3) block_rows(bits, 3, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
    else if (R == 2) block_rows(bits, 2, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
    else block_rows(bits, 1, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
    return R;
#else
    (void)rows_left;
    block_row(bits, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
    return 1;
#endif
}

static int block_step4(int rows_left, const float *xf, const float *xsum, int K, int G, const uint8_t *codes,
                       const void *scales, int half, const uint8_t *zeros, int zero, float *out) {
    return block_step(4, rows_left, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
}

static int block_step8(int rows_left, const float *xf, const float *xsum, int K, int G, const uint8_t *codes,
                       const void *scales, int half, const uint8_t *zeros, int zero, float *out) {
    return block_step(8, rows_left, xf, xsum, K, G, codes, scales, half, zeros, zero, out);
}

/* One layer's constant arguments, written once at load (an int64 tensor on the Python side), so that a decode call
 * passes five arguments through ctypes instead of twelve. */
enum { L_K, L_N, L_G, L_CODES, L_SCALES, L_HALF, L_ZEROS, L_ZERO, L_BITS, L_FIELDS };
#define LAYER_PTR(layer, field) ((const void *)(intptr_t)(layer)[field])

/* y[M, N] = x[M, K] @ dequant(W)^T; returns 0, or -1 if the float32 copy of x cannot be allocated. */
int signround_wq_gemm(const void *x, int dtype, int M, const int64_t *layer, void *y) {
    const int K = (int)layer[L_K], N = (int)layer[L_N], G = (int)layer[L_G], half = (int)layer[L_HALF];
    const int zero = (int)layer[L_ZERO], bits = (int)layer[L_BITS];
    const uint8_t *codes = LAYER_PTR(layer, L_CODES), *zeros = LAYER_PTR(layer, L_ZEROS);
    const void *scales = LAYER_PTR(layer, L_SCALES);
    const int groups = K / G, blocks = (N + BLOCK - 1) / BLOCK;
    float *xf = malloc(sizeof(float) * ((size_t)M * K + (size_t)M * groups));
    if (!xf) return -1;
    float *xsum = xf + (long)M * K;
    const size_t act_bytes = dtype == SR_F32 ? 4 : 2;
    for (int m = 0; m < M; m++) {
        float *row = xf + (long)m * K;
        load_row((const char *)x + m * act_bytes * K, dtype, K, row);
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int k = g * G; k < (g + 1) * G; k++) s += row[k];
            xsum[(long)m * groups + g] = s;
        }
    }
    const long block_codes = (long)K / 2 * PAIR_BYTES(bits), block_table = (long)groups * BLOCK;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        float out[4 * BLOCK];
        const int rows = N - b * BLOCK < BLOCK ? N - b * BLOCK : BLOCK;
        const void *s = half ? (const void *)((const uint16_t *)scales + b * block_table)
                             : (const void *)((const float *)scales + b * block_table);
        const uint8_t *c = codes + b * block_codes, *z = zeros ? zeros + b * block_table : NULL;
        for (int m = 0; m < M;) {
            const float *xm = xf + (long)m * K, *sm = xsum + (long)m * groups;
            const int step = bits == 8 ? block_step8(M - m, xm, sm, K, G, c, s, half, z, zero, out)
                                       : block_step4(M - m, xm, sm, K, G, c, s, half, z, zero, out);
            for (int r = 0; r < step; r++)
                store_row(out + r * BLOCK, rows, dtype, (char *)y + act_bytes * ((size_t)(m + r) * N + (size_t)b * BLOCK));
            m += step;
        }
    }
    free(xf);
    return 0;
}

/* The dense weight, transposed: Wt[K, N] = (q - zero) * scale, each product computed in float32 and rounded once to
 * `dtype` (float32 or bf16): what the dense path (long inputs) multiplies with.  [K, N] because the layout holds 64
 * output rows side by side: each input's 64 values are read from one cache line and written contiguously. */
void signround_wq_dequant(const int64_t *layer, void *wt, int dtype) {
    const int K = (int)layer[L_K], N = (int)layer[L_N], G = (int)layer[L_G], half = (int)layer[L_HALF];
    const int zero = (int)layer[L_ZERO], bits = (int)layer[L_BITS];
    const uint8_t *codes = LAYER_PTR(layer, L_CODES), *zeros = LAYER_PTR(layer, L_ZEROS);
    const void *scales = LAYER_PTR(layer, L_SCALES);
    const int groups = K / G, blocks = (N + BLOCK - 1) / BLOCK;
    const long block_codes = (long)K / 2 * PAIR_BYTES(bits), block_table = (long)groups * BLOCK;
    const size_t out_bytes = dtype == SR_F32 ? 4 : 2;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int rows = N - b * BLOCK < BLOCK ? N - b * BLOCK : BLOCK;
        float s[BLOCK], z[BLOCK], lo[BLOCK], hi[BLOCK];
        for (int g = 0; g < groups; g++) {
            const long at = b * block_table + (long)g * BLOCK;
            for (int lane = 0; lane < BLOCK; lane++) {
                s[lane] = load_scale(scales, half, at + lane);
                z[lane] = zeros ? (float)zeros[at + lane] : (float)zero;
            }
            for (int k = g * G; k < (g + 1) * G; k += 2) {
                const uint8_t *c = codes + b * block_codes + (long)(k / 2) * PAIR_BYTES(bits);
                if (bits == 8) {
                    for (int lane = 0; lane < BLOCK; lane++) {
                        lo[lane] = (code_lo(8, c, lane) - z[lane]) * s[lane];
                        hi[lane] = (code_hi(8, c, lane) - z[lane]) * s[lane];
                    }
                } else {
                    for (int lane = 0; lane < BLOCK; lane++) {
                        lo[lane] = (code_lo(4, c, lane) - z[lane]) * s[lane];
                        hi[lane] = (code_hi(4, c, lane) - z[lane]) * s[lane];
                    }
                }
                store_row(lo, rows, dtype, (char *)wt + out_bytes * ((size_t)k * N + (size_t)b * BLOCK));
                store_row(hi, rows, dtype, (char *)wt + out_bytes * ((size_t)(k + 1) * N + (size_t)b * BLOCK));
            }
        }
    }
}

int signround_wq_layer_fields(void) { return L_FIELDS; }

int signround_wq_simd(void) {
#ifdef SR_AVX512
    return 512;
#else
    return 0;
#endif
}
