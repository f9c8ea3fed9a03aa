/* Fused CPU kernels of the quantizing codecs: the same bytes as reference.py. Each group is read
 * twice while it is in cache (its min and max, then its codes); nothing block-sized is allocated.
 *
 * Built by cpu_kernels.py with gcc -O3 -march=native -ffp-contract=off. No fast-math: every step is
 * the IEEE fp32 operation reference.py performs, in the same order. Work goes LANES elements at a
 * time as gcc vectors (vf, vi), which gcc maps onto the machine's SIMD registers; fp16 conversions
 * use the F16C/AVX-512 instructions where the CPU has them (gcc 12 does not vectorize _Float16) and
 * exact integer arithmetic elsewhere (-DTIERED_PORTABLE forces that path).
 *
 * A batch is n blocks of one shape [H, T, D] and dtype. The channel axis D of every tensor is
 * contiguous; heads and tokens have element strides. offs[6] are the payload's byte offsets of
 * key_min, key_scale, value_min, value_scale, key_codes, value_codes (-1: no mins, fp8).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if !defined(TIERED_PORTABLE) && (defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__))
#include <immintrin.h>
#endif

enum { DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2 };
enum { KIND_INT = 0, KIND_FP8 = 1 };
#define LANES 16
#define FP8_MAX 448.0f
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));
typedef uint16_t vh __attribute__((vector_size(LANES * 2))); /* fp16 or bf16 bits */
typedef uint8_t vb __attribute__((vector_size(LANES)));

#define LANE_INDEX ((vi){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})

INLINE vf splat(float x) { return (vf){0} + x; }
INLINE vu usplat(uint32_t x) { return (vu){0} + x; }
INLINE vf fselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
INLINE vu uselect(vi mask, vu a, vu b) { return ((vu)mask & a) | (~(vu)mask & b); }
/* a < b ? a : b and a > b ? a : b, per lane: exactly what x86's minps and maxps compute. gcc 12
 * makes 3 instructions of the select under AVX-512, and compares 16-lane floats one lane at a time
 * under AVX2, so both use the instructions themselves (AVX2: on two halves). */
#if !defined(TIERED_PORTABLE) && !defined(__AVX512F__) && defined(__AVX__)
INLINE vf halves(vf a, vf b, int max) {
    __m256 x[2], y[2];
    memcpy(x, &a, sizeof x), memcpy(y, &b, sizeof y);
    for (int k = 0; k < 2; k++) x[k] = max ? _mm256_max_ps(x[k], y[k]) : _mm256_min_ps(x[k], y[k]);
    memcpy(&a, x, sizeof a);
    return a;
}
#endif
INLINE vf vmin(vf a, vf b) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif !defined(TIERED_PORTABLE) && defined(__AVX__)
    return halves(a, b, 0);
#else
    return fselect(a < b, a, b);
#endif
}
INLINE vf vmax(vf a, vf b) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif !defined(TIERED_PORTABLE) && defined(__AVX__)
    return halves(a, b, 1);
#else
    return fselect(a > b, a, b);
#endif
}
INLINE vf vabs(vf x) { return (vf)((vu)x & 0x7FFFFFFFu); }
INLINE vi nonfinite(vf x) { /* inf or NaN */
#if !defined(TIERED_PORTABLE) && !defined(__AVX512F__) && defined(__AVX2__) /* as in vmin: on two halves */
    __m256i h[2], e = _mm256_set1_epi32(0x7F800000);
    memcpy(h, &x, sizeof h);
    for (int k = 0; k < 2; k++) h[k] = _mm256_cmpeq_epi32(_mm256_and_si256(h[k], e), e);
    vi mask;
    memcpy(&mask, h, sizeof mask);
    return mask;
#else
    return ((vu)x & 0x7F800000u) == 0x7F800000u;
#endif
}

/* fp16 bits -> fp32, exact. */
INLINE vf f16_to_f32(vh h) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    __m256i bits;
    memcpy(&bits, &h, sizeof bits);
    return (vf)_mm512_cvtph_ps(bits);
#elif !defined(TIERED_PORTABLE) && defined(__F16C__)
    __m128i lo, hi;
    memcpy(&lo, &h, 16), memcpy(&hi, (const char *)&h + 16, 16);
    __m256 out[2] = {_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi)};
    vf x;
    memcpy(&x, out, sizeof x);
    return x;
#else
    vu u = __builtin_convertvector(h, vu), sign = (u & 0x8000u) << 16, em = u & 0x7FFFu;
    vi infnan = em >= 0x7C00u, subnormal = em < 0x0400u;
    /* rebias the exponent from 15 to 127; inf and NaN go from 31 to 255 */
    vu normal = (em << 13) + (112u << 23) + ((vu)infnan & (112u << 23));
    vu tiny = (vu)(__builtin_convertvector((vi)em, vf) * 0x1p-24f); /* subnormals and zero: exact */
    return (vf)(sign | uselect(subnormal, tiny, normal));
#endif
}

/* fp32 -> fp16 bits, round to nearest even (overflow to inf), as torch does. */
INLINE vh f32_to_f16(vf x) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    __m256i bits = _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vh h;
    memcpy(&h, &bits, sizeof h);
    return h;
#elif !defined(TIERED_PORTABLE) && defined(__F16C__)
    __m256 in[2];
    memcpy(in, &x, sizeof x);
    __m128i out[2] = {_mm256_cvtps_ph(in[0], _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(in[1], _MM_FROUND_TO_NEAREST_INT)};
    vh h;
    memcpy(&h, out, sizeof h);
    return h;
#else
    vu u = (vu)x, sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    vu normal = (u + 0xFFFu + ((u >> 13) & 1u) - (112u << 23)) >> 13; /* a carry may reach inf */
    /* below 2^-14: adding 0.5 leaves a unit of 2^-24 in the last place, so the FPU rounds */
    vu tiny = (vu)((vf)u + 0.5f) - 0x3F000000u;
    vu big = 0x7C00u | ((vu)(u > 0x7F800000u) & 0x200u); /* inf for |x| >= 65520, or NaN */
    vu h = uselect(u >= 0x47800000u, big, uselect(u >= 0x38800000u, normal, tiny));
    return __builtin_convertvector(sign | h, vh);
#endif
}

/* fp32 -> bf16 bits, round to nearest even (finite inputs), as torch does. */
INLINE vh f32_to_bf16(vf x) {
    vu u = (vu)x;
    return __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, vh);
}

/* fp32 (|y| <= 448) -> e4m3fn bits, round to nearest even: torch's float8_e4m3fn conversion. */
INLINE vu f32_to_e4m3(vf y) {
    vu u = (vu)y, sign = (u >> 24) & 0x80u;
    u &= 0x7FFFFFFFu;
    /* normal: keep 3 mantissa bits (nearest even), rebias the exponent from 127 to 7 */
    vu normal = ((u + 0x7FFFFu + ((u >> 20) & 1u)) >> 20) - (120u << 3);
    /* subnormal (< 2^-6): adding 2^14 leaves a unit of 2^-9 in the last place, so the FPU rounds */
    vu subnormal = (vu)((vf)u + 16384.0f) - 0x46800000u;
    return sign | uselect(u >= 0x3C800000u, normal, subnormal);
}

INLINE vf e4m3_to_f32(vu c) {
    vu e = (c >> 3) & 15u, m = c & 7u;
    vu normal = ((e + 120u) << 23) | (m << 20);
    vu tiny = (vu)(__builtin_convertvector((vi)m, vf) * (1.0f / 512.0f));
    vu mag = uselect((c & 0x7Fu) == 0x7Fu, usplat(0x7FC00000u), uselect(e == 0u, tiny, normal));
    return (vf)(((c & 0x80u) << 24) | mag);
}

/* n <= LANES elements of a row -> fp32. A short read repeats the first element, which leaves
 * every min and max unchanged. */
INLINE vf load(const void *src, int64_t n, const int dtype) {
    size_t esize = dtype == DT_F32 ? 4 : 2;
    char buf[LANES * 4];
    if (n < LANES) {
        memcpy(buf, src, (size_t)n * esize);
        for (int64_t k = n; k < LANES; k++) memcpy(buf + k * esize, src, esize);
        src = buf;
    }
    vh h;
    vf x;
    if (dtype == DT_F32) {
        memcpy(&x, src, sizeof x);
        return x;
    }
    memcpy(&h, src, sizeof h);
    return dtype == DT_F16 ? f16_to_f32(h) : (vf)(__builtin_convertvector(h, vu) << 16);
}

INLINE void store(void *dst, vf x, int64_t n, const int dtype) {
    size_t esize = dtype == DT_F32 ? 4 : 2;
    vh h;
    if (dtype == DT_F16) h = f32_to_f16(x);
    if (dtype == DT_BF16) h = f32_to_bf16(x);
    const void *src = dtype == DT_F32 ? (const void *)&x : (const void *)&h;
    if (n == LANES) /* a constant size: one vector store */
        memcpy(dst, src, LANES * esize);
    else
        memcpy(dst, src, (size_t)n * esize);
}

INLINE vu load_codes(const uint8_t *src, int64_t n) {
    vb b = {0};
    if (n == LANES)
        memcpy(&b, src, LANES);
    else
        memcpy(&b, src, (size_t)n);
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__) /* gcc 12 widens bytes one by one */
    __m128i bytes;
    memcpy(&bytes, &b, sizeof bytes);
    return (vu)_mm512_cvtepu8_epi32(bytes);
#else
    return __builtin_convertvector(b, vu);
#endif
}

INLINE void store_codes(uint8_t *dst, vu codes, int64_t n) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    __m128i bytes = _mm512_cvtepi32_epi8((__m512i)codes);
    if (n == LANES) {
        _mm_storeu_si128((__m128i *)dst, bytes);
        return;
    }
    vb b;
    memcpy(&b, &bytes, sizeof b);
#else
    vb b = __builtin_convertvector(codes, vb);
#endif
    if (n == LANES)
        memcpy(dst, &b, LANES);
    else
        memcpy(dst, &b, (size_t)n);
}

/* LANES codes (< 2^bits, bits 2 or 4) packed into LANES·bits/8 bytes at dst, as pack() does:
 * narrowed to bytes, then each 16-bit (int4) or 32-bit (int2) word of those makes one byte. */
typedef uint16_t vw8 __attribute__((vector_size(16)));
typedef uint32_t vd4 __attribute__((vector_size(16)));
typedef uint8_t vb8 __attribute__((vector_size(8)));
typedef uint8_t vb4 __attribute__((vector_size(4)));
INLINE void store_packed(uint8_t *dst, vu codes, int bits) {
    uint8_t bytes[LANES];
    store_codes(bytes, codes, LANES);
    if (bits == 4) {
        vw8 w;
        memcpy(&w, bytes, sizeof w);
        vb8 b = __builtin_convertvector((w & 0xFu) | ((w >> 4) & 0xF0u), vb8);
        memcpy(dst, &b, sizeof b);
    } else {
        vd4 w;
        memcpy(&w, bytes, sizeof w);
        vb4 b = __builtin_convertvector((w & 0x3u) | ((w >> 6) & 0xCu) | ((w >> 12) & 0x30u) | ((w >> 18) & 0xC0u), vb4);
        memcpy(dst, &b, sizeof b);
    }
}

/* Group params from reductions (lo = min, hi = max; or hi = max |x| for fp8). Stores the fp16
 * min (int) and scale; returns min32/inv32 for the codes and a mask of params that do not fit. */
typedef struct {
    vf min32, inv32;
    vi bad;
} Params;

INLINE Params make_params(const int kind, float qmax, vf lo, vf hi, uint16_t *min16, uint16_t *scale16, int64_t n) {
    Params p = {splat(0.0f), splat(0.0f), (vi){0}};
    vh scale_bits;
    if (kind == KIND_INT) {
        vh min_bits = f32_to_f16(lo + 0.0f);
        p.min32 = f16_to_f32(min_bits);
        vf span = hi - p.min32;
        scale_bits = f32_to_f16(vmax(span, splat(0.0f)) / qmax); /* span > 0 ? span : 0 */
        memcpy(min16, &min_bits, (size_t)n * 2);
    } else {
        scale_bits = f32_to_f16(hi / FP8_MAX);
    }
    memcpy(scale16, &scale_bits, (size_t)n * 2);
    vf scale = f16_to_f32(scale_bits);
    /* scale > 0 as integers (a NaN scale is bad anyway): no float compare, see vmin */
    p.inv32 = fselect((vi)scale > 0, 1.0f / scale, splat(0.0f));
    p.bad = nonfinite(p.min32) | nonfinite(scale);
    return p;
}

INLINE vu make_codes(const int kind, float qmax, vf x, vf min32, vf inv32) {
    if (kind == KIND_INT) {
        vf y = vmin(vmax((x - min32) * inv32, splat(0.0f)), splat(qmax));
        return (vu)__builtin_convertvector(y + 0.5f, vi); /* truncates; y + 0.5 < 2^31 */
    }
    return f32_to_e4m3(vmax(vmin(x * inv32, splat(FP8_MAX)), splat(-FP8_MAX)));
}

INLINE vf decode_codes(const int kind, vu codes, vf min32, vf scale32) {
    return kind == KIND_INT ? min32 + __builtin_convertvector((vi)codes, vf) * scale32 : e4m3_to_f32(codes) * scale32;
}

INLINE int any(vi mask) {
    int32_t acc = 0;
    for (int k = 0; k < LANES; k++) acc |= mask[k];
    return acc != 0;
}

/* codes [count] -> packed bytes (bits < 8), zero-padded to `nbytes`. Each 32-bit word of codes
 * (little-endian: the first code in the low byte) packs to one byte (int2) or two (int4). */
static void pack(const uint8_t *restrict codes, int64_t count, int bits, uint8_t *restrict out, int64_t nbytes) {
    int64_t words = count / 4;
    for (int64_t i = 0; i < words; i++) {
        uint32_t w;
        memcpy(&w, codes + 4 * i, 4);
        if (bits == 2) {
            out[i] = (uint8_t)((w & 0x3u) | ((w >> 6) & 0xCu) | ((w >> 12) & 0x30u) | ((w >> 18) & 0xC0u));
        } else {
            uint16_t h = (uint16_t)((w & 0xFu) | ((w >> 4) & 0xF0u) | ((w >> 8) & 0xF00u) | ((w >> 12) & 0xF000u));
            memcpy(out + 2 * i, &h, 2);
        }
    }
    int64_t done = words * bits / 2; /* bytes written */
    memset(out + done, 0, (size_t)(nbytes - done));
    for (int64_t j = words * 4; j < count; j++) out[j * bits / 8] |= (uint8_t)(codes[j] << (j * bits % 8));
}

static void unpack(const uint8_t *restrict packed, int64_t count, int bits, uint8_t *restrict codes) {
    int64_t words = count / 4;
    for (int64_t i = 0; i < words; i++) {
        uint32_t w;
        if (bits == 2) {
            uint32_t b = packed[i];
            w = (b & 0x3u) | ((b & 0xCu) << 6) | ((b & 0x30u) << 12) | ((b & 0xC0u) << 18);
        } else {
            uint16_t h16;
            memcpy(&h16, packed + 2 * i, 2);
            uint32_t h = h16;
            w = (h & 0xFu) | ((h & 0xF0u) << 4) | ((h & 0xF00u) << 8) | ((h & 0xF000u) << 12);
        }
        memcpy(codes + 4 * i, &w, 4);
    }
    for (int64_t j = words * 4; j < count; j++) codes[j] = (packed[j * bits / 8] >> (j * bits % 8)) & ((1u << bits) - 1u);
}

typedef struct {
    int64_t H, T, D, G, offs[6];
    int bits, direct; /* direct: codes of bits < 8 packed as they are made (every store whole) */
    float qmax;
    float *lo, *hi, *min32, *inv32; /* [T·⌈D/G⌉ + LANES] each: one head's value groups */
    uint8_t *codes;                 /* [H·T·D] unpacked codes, for bits < 8 */
} Ctx;

/* encoding: codes may be packed as they are made; decoding unpacks into the scratch. */
static int ctx_init(Ctx *c, int64_t H, int64_t T, int64_t D, int bits, int64_t group, const int64_t *offs, int encoding) {
    c->H = H, c->T = T, c->D = D, c->G = group, c->bits = bits;
    c->qmax = (float)((1 << bits) - 1);
    c->direct = encoding && bits < 8 && D % LANES == 0 && group % LANES == 0 && D % group == 0;
    memcpy(c->offs, offs, sizeof c->offs);
    int64_t n = T * ((D + group - 1) / group) + LANES;
    c->lo = malloc(sizeof(float) * (size_t)(4 * n));
    c->codes = bits < 8 && !c->direct ? malloc((size_t)(H * T * D)) : NULL;
    if (c->lo) c->hi = c->lo + n, c->min32 = c->hi + n, c->inv32 = c->min32 + n;
    return c->lo == NULL || (bits < 8 && !c->direct && c->codes == NULL);
}

static void ctx_free(Ctx *c) { free(c->lo), free(c->codes); }

/* Codes [index, index + n) of a tensor: bytes into `codes` (bits 8, or the unpacked scratch), or
 * packed straight into the payload's section (c->direct). */
INLINE void put_codes(const Ctx *c, uint8_t *codes, int64_t index, vu v, int64_t n) {
    if (c->direct)
        store_packed(codes + index * c->bits / 8, v, c->bits);
    else
        store_codes(codes + index, v, n);
}

/* Codes [index, index + 4·LANES) from 4 vectors, as put_codes() of each: narrowed together. */
INLINE void put_codes4(const Ctx *c, uint8_t *codes, int64_t index, vu v0, vu v1, vu v2, vu v3) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512BW__)
    /* packs work within 128-bit lanes: lane k ends with dwords (v0, v1, v2, v3)[4k..4k+3] as bytes */
    __m512i x = _mm512_packus_epi16(_mm512_packus_epi32((__m512i)v0, (__m512i)v1), _mm512_packus_epi32((__m512i)v2, (__m512i)v3));
    x = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), x);
    if (!c->direct) {
        _mm512_storeu_si512(codes + index, x);
    } else if (c->bits == 4) { /* each 16-bit word of two codes -> one byte */
        __m512i w = _mm512_or_si512(_mm512_and_si512(x, _mm512_set1_epi16(0xF)), _mm512_and_si512(_mm512_srli_epi16(x, 4), _mm512_set1_epi16(0xF0)));
        _mm256_storeu_si256((__m256i *)(codes + index / 2), _mm512_cvtepi16_epi8(w));
    } else { /* int2: each 32-bit word of four codes -> one byte */
        __m512i m = _mm512_set1_epi32(0x3), w = _mm512_and_si512(x, m);
        w = _mm512_or_si512(w, _mm512_and_si512(_mm512_srli_epi32(x, 6), _mm512_set1_epi32(0xC)));
        w = _mm512_or_si512(w, _mm512_and_si512(_mm512_srli_epi32(x, 12), _mm512_set1_epi32(0x30)));
        w = _mm512_or_si512(w, _mm512_and_si512(_mm512_srli_epi32(x, 18), _mm512_set1_epi32(0xC0)));
        _mm_storeu_si128((__m128i *)(codes + index / 4), _mm512_cvtepi32_epi8(w));
    }
#else
    put_codes(c, codes, index, v0, LANES), put_codes(c, codes, index + LANES, v1, LANES);
    put_codes(c, codes, index + 2 * LANES, v2, LANES), put_codes(c, codes, index + 3 * LANES, v3, LANES);
#endif
}

INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The min (lo) and max (hi; max |x| for fp8) of LANES items, each given as one vector: item j
 * in lane j. Pairs of vectors are folded together level by level (each lane of a level holds a
 * partial of one item), 2 shuffles and 1 op per fold instead of a butterfly per item. */
INLINE vf fold(vf a, vf b, const vi first, const vi second, int max) {
    vf x = __builtin_shuffle(a, b, first), y = __builtin_shuffle(a, b, second);
    return max ? vmax(x, y) : vmin(x, y);
}

INLINE vf reduce_items(vf *v, int max) {
    const vi a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi b1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi a2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi b2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vi a3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const vi b3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const vi a4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vi b4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vf l1[8], l2[4], l3[2];
    for (int j = 0; j < 8; j++) l1[j] = fold(v[2 * j], v[2 * j + 1], a1, b1, max);
    for (int j = 0; j < 4; j++) l2[j] = fold(l1[2 * j], l1[2 * j + 1], a2, b2, max);
    for (int j = 0; j < 2; j++) l3[j] = fold(l2[2 * j], l2[2 * j + 1], a3, b3, max);
    return fold(l3[0], l3[1], a4, b4, max);
}

#define KCOLS 4
/* Keys, channels [d, d + cols·LANES) of one group (rows, len tokens) of a head: the min/max
 * of `cols` vectors at a time (independent chains), then their codes. cols is a constant. */
INLINE vi key_columns(Ctx *c, const int kind, const int dtype, const char *rows, int64_t st, int64_t len, int64_t d,
                      int64_t n, const int cols, uint16_t *mins, uint16_t *scales, uint8_t *codes, int64_t first) {
    int64_t esize = dtype == DT_F32 ? 4 : 2, D = c->D;
    vf lo[KCOLS], hi[KCOLS];
    vi bad[KCOLS];
    for (int j = 0; j < cols; j++) {
        lo[j] = load(rows + (d + j * LANES) * esize, n, dtype);
        hi[j] = kind == KIND_INT ? lo[j] : vabs(lo[j]);
        bad[j] = nonfinite(lo[j]);
    }
    for (int64_t r = 1; r < len; r++) {
        for (int j = 0; j < cols; j++) {
            vf x = load(rows + (r * st + d + j * LANES) * esize, n, dtype);
            bad[j] |= nonfinite(x);
            if (kind == KIND_INT) lo[j] = vmin(x, lo[j]);
            hi[j] = vmax(kind == KIND_INT ? x : vabs(x), hi[j]);
        }
    }
    vi any_bad = {0};
    Params q[KCOLS];
    for (int j = 0; j < cols; j++) {
        q[j] = make_params(kind, c->qmax, lo[j], hi[j], mins ? mins + d + j * LANES : NULL, scales + d + j * LANES, n);
        any_bad |= q[j].bad | bad[j];
    }
    for (int64_t r = 0; r < len; r++) {
        const char *row = rows + (r * st + d) * esize;
        vu v[KCOLS];
        for (int j = 0; j < cols; j++) v[j] = make_codes(kind, c->qmax, load(row + j * LANES * esize, n, dtype), q[j].min32, q[j].inv32);
        if (cols == KCOLS)
            put_codes4(c, codes, first + r * D + d, v[0], v[1], v[2], v[3]);
        else
            for (int j = 0; j < cols; j++) put_codes(c, codes, first + r * D + d + j * LANES, v[j], n);
    }
    return any_bad;
}

/* Keys: a group is up to G tokens of one channel; KCOLS vectors of channels at a time, then the
 * rest one vector at a time. Returns nonzero on a value that cannot be encoded. */
INLINE int encode_keys(Ctx *c, const int kind, const int dtype, const char *src, int64_t sh, int64_t st,
                       uint8_t *payload, uint8_t *codes) {
    int64_t H = c->H, T = c->T, D = c->D, G = c->G, esize = dtype == DT_F32 ? 4 : 2, ng = (T + G - 1) / G;
    int64_t wide = D / (KCOLS * LANES) * (KCOLS * LANES);
    uint16_t *mins = kind == KIND_INT ? (uint16_t *)(payload + c->offs[0]) : NULL;
    uint16_t *scales = (uint16_t *)(payload + c->offs[1]);
    vi bad = {0};
    for (int64_t h = 0; h < H; h++) {
        for (int64_t g = 0; g < ng; g++) {
            int64_t t0 = g * G, len = min64(G, T - t0), p = (h * ng + g) * D;
            const char *rows = src + (h * sh + t0 * st) * esize;
            uint16_t *m = mins ? mins + p : NULL;
            for (int64_t d = 0; d < wide; d += KCOLS * LANES)
                bad |= key_columns(c, kind, dtype, rows, st, len, d, LANES, KCOLS, m, scales + p, codes, (h * T + t0) * D);
            for (int64_t d = wide; d < D; d += LANES)
                bad |= key_columns(c, kind, dtype, rows, st, len, d, min64(LANES, D - d), 1, m, scales + p, codes, (h * T + t0) * D);
        }
    }
    return any(bad);
}

/* Values of any group size: a group is up to G channels of one token. Reductions for a head's
 * rows, then their params LANES groups at a time, then the codes. Returns nonzero on a bad value. */
INLINE int encode_values_any(Ctx *c, const int kind, const int dtype, const char *src, int64_t sh, int64_t st,
                             uint8_t *payload, uint8_t *codes) {
    int64_t H = c->H, T = c->T, D = c->D, G = c->G, esize = dtype == DT_F32 ? 4 : 2, ng = (D + G - 1) / G;
    float *lo = c->lo, *hi = c->hi, *min32 = c->min32, *inv32 = c->inv32;
    vi bad = {0};
    for (int64_t h = 0; h < H; h++) {
        for (int64_t t = 0; t < T; t++) {
            const char *row = src + (h * sh + t * st) * esize;
            for (int64_t g = 0; g < ng; g++) {
                int64_t d0 = g * G, end = min64(D, d0 + G);
                vf l = load(row + d0 * esize, min64(LANES, end - d0), dtype), u = kind == KIND_INT ? l : vabs(l);
                bad |= nonfinite(l);
                for (int64_t d = d0 + LANES; d < end; d += LANES) {
                    vf x = load(row + d * esize, min64(LANES, end - d), dtype);
                    bad |= nonfinite(x);
                    if (kind == KIND_INT) l = vmin(x, l);
                    u = vmax(kind == KIND_INT ? x : vabs(x), u);
                }
                for (int w = LANES / 2; w > 0; w /= 2) { /* butterfly: every lane ends with the result */
                    vi swap = LANE_INDEX ^ w;
                    l = vmin(__builtin_shuffle(l, swap), l);
                    u = vmax(__builtin_shuffle(u, swap), u);
                }
                lo[t * ng + g] = l[0], hi[t * ng + g] = u[0];
            }
        }
        uint16_t *mins = kind == KIND_INT ? (uint16_t *)(payload + c->offs[2]) + h * T * ng : NULL;
        uint16_t *scales = (uint16_t *)(payload + c->offs[3]) + h * T * ng;
        for (int64_t i = 0; i < T * ng; i += LANES) {
            int64_t n = min64(LANES, T * ng - i);
            Params q = make_params(kind, c->qmax, load(lo + i, n, DT_F32), load(hi + i, n, DT_F32),
                                   mins ? mins + i : NULL, scales + i, n);
            bad |= q.bad;
            memcpy(min32 + i, &q.min32, sizeof q.min32), memcpy(inv32 + i, &q.inv32, sizeof q.inv32);
        }
        for (int64_t t = 0; t < T; t++) {
            const char *row = src + (h * sh + t * st) * esize;
            for (int64_t g = 0; g < ng; g++) {
                vf m = splat(min32[t * ng + g]), inv = splat(inv32[t * ng + g]);
                for (int64_t d = g * G, end = min64(D, d + G); d < end; d += LANES) {
                    int64_t n = min64(LANES, end - d);
                    put_codes(c, codes, (h * T + t) * D + d, make_codes(kind, c->qmax, load(row + d * esize, n, dtype), m, inv), n);
                }
            }
        }
    }
    return any(bad);
}

/* Values whose groups are whole vectors (G % LANES == 0, D % G == 0): LANES groups (token t,
 * group g: item t·ng + g) at a time, each reduced to one vector, folded together, their params
 * made, then their codes while the rows are in cache. Returns nonzero on a bad value. */
INLINE int encode_values(Ctx *c, const int kind, const int dtype, const char *src, int64_t sh, int64_t st,
                         uint8_t *payload, uint8_t *codes) {
    int64_t H = c->H, T = c->T, D = c->D, G = c->G, esize = dtype == DT_F32 ? 4 : 2, ng = D / G;
    if (G % LANES || D % G) return encode_values_any(c, kind, dtype, src, sh, st, payload, codes);
    vi bad = {0};
    for (int64_t h = 0; h < H; h++) {
        uint16_t *mins = kind == KIND_INT ? (uint16_t *)(payload + c->offs[2]) + h * T * ng : NULL;
        uint16_t *scales = (uint16_t *)(payload + c->offs[3]) + h * T * ng;
        for (int64_t i0 = 0; i0 < T * ng; i0 += LANES) {
            int64_t n = min64(LANES, T * ng - i0);
            vf lo[LANES], hi[LANES];
            for (int64_t j = 0; j < LANES; j++) {
                int64_t i = i0 + min64(j, n - 1); /* past the end: the last item again */
                const char *group = src + (h * sh + i / ng * st + i % ng * G) * esize;
                vf l = load(group, LANES, dtype), u = kind == KIND_INT ? l : vabs(l);
                bad |= nonfinite(l);
                for (int64_t d = LANES; d < G; d += LANES) {
                    vf x = load(group + d * esize, LANES, dtype);
                    bad |= nonfinite(x);
                    if (kind == KIND_INT) l = vmin(x, l);
                    u = vmax(kind == KIND_INT ? x : vabs(x), u);
                }
                lo[j] = l, hi[j] = u;
            }
            vf l = kind == KIND_INT ? reduce_items(lo, 0) : splat(0.0f);
            Params q = make_params(kind, c->qmax, l, reduce_items(hi, 1), mins ? mins + i0 : NULL, scales + i0, n);
            bad |= q.bad;
            for (int64_t j = 0; j < n; j++) {
                int64_t i = i0 + j;
                const char *group = src + (h * sh + i / ng * st + i % ng * G) * esize;
                int64_t first = (h * T + i / ng) * D + i % ng * G;
                vf m = splat(q.min32[j]), inv = splat(q.inv32[j]);
                int64_t d = 0;
                for (; d + 4 * LANES <= G; d += 4 * LANES) {
                    vu v[4];
                    for (int k = 0; k < 4; k++) v[k] = make_codes(kind, c->qmax, load(group + (d + k * LANES) * esize, LANES, dtype), m, inv);
                    put_codes4(c, codes, first + d, v[0], v[1], v[2], v[3]);
                }
                for (; d < G; d += LANES)
                    put_codes(c, codes, first + d, make_codes(kind, c->qmax, load(group + d * esize, LANES, dtype), m, inv), LANES);
            }
        }
    }
    return any(bad);
}

INLINE void decode_keys(Ctx *c, const int kind, const int dtype, const uint8_t *payload, const uint8_t *codes,
                        char *dst, int64_t sh, int64_t st) {
    int64_t H = c->H, T = c->T, D = c->D, G = c->G, esize = dtype == DT_F32 ? 4 : 2, ng = (T + G - 1) / G;
    const uint16_t *mins = kind == KIND_INT ? (const uint16_t *)(payload + c->offs[0]) : NULL;
    const uint16_t *scales = (const uint16_t *)(payload + c->offs[1]);
    for (int64_t h = 0; h < H; h++) {
        for (int64_t g = 0; g < ng; g++) {
            int64_t t0 = g * G, len = min64(G, T - t0);
            for (int64_t d = 0; d < D; d += LANES) {
                int64_t n = min64(LANES, D - d), p = (h * ng + g) * D + d;
                vf m = kind == KIND_INT ? load(mins + p, n, DT_F16) : splat(0.0f), s = load(scales + p, n, DT_F16);
                for (int64_t r = 0; r < len; r++) {
                    vf y = decode_codes(kind, load_codes(codes + (h * T + t0 + r) * D + d, n), m, s);
                    store(dst + (h * sh + (t0 + r) * st + d) * esize, y, n, dtype);
                }
            }
        }
    }
}

INLINE void decode_values(Ctx *c, const int kind, const int dtype, const uint8_t *payload, const uint8_t *codes,
                          char *dst, int64_t sh, int64_t st) {
    int64_t H = c->H, T = c->T, D = c->D, G = c->G, esize = dtype == DT_F32 ? 4 : 2, ng = (D + G - 1) / G;
    const uint16_t *mins = kind == KIND_INT ? (const uint16_t *)(payload + c->offs[2]) : NULL;
    const uint16_t *scales = (const uint16_t *)(payload + c->offs[3]);
    for (int64_t h = 0; h < H; h++) {
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *code = codes + (h * T + t) * D;
            char *row = dst + (h * sh + t * st) * esize;
            for (int64_t g = 0; g < ng; g++) {
                int64_t p = (h * T + t) * ng + g;
                vf m = splat(kind == KIND_INT ? f16_to_f32((vh){mins[p]})[0] : 0.0f);
                vf s = splat(f16_to_f32((vh){scales[p]})[0]);
                for (int64_t d = g * G, end = min64(D, d + G); d < end; d += LANES) {
                    int64_t k = min64(LANES, end - d);
                    store(row + d * esize, decode_codes(kind, load_codes(code + d, k), m, s), k, dtype);
                }
            }
        }
    }
}

/* One block each: the bodies the dispatchers below specialize for every (kind, dtype). */
INLINE int encode_one(Ctx *c, const int kind, const int dtype, const char *keys, const char *values,
                      const int64_t *s, uint8_t *payload) {
    int64_t count = c->H * c->T * c->D, nbytes = c->offs[5] - c->offs[4];
    int bad = 0;
    for (int part = 0; part < 2; part++) {
        uint8_t *section = payload + c->offs[4 + part], *codes = c->bits < 8 && !c->direct ? c->codes : section;
        bad |= part == 0 ? encode_keys(c, kind, dtype, keys, s[0], s[1], payload, codes)
                         : encode_values(c, kind, dtype, values, s[2], s[3], payload, codes);
        if (c->bits < 8 && !c->direct)
            pack(c->codes, count, c->bits, section, nbytes);
        else /* zero the padding to whole 16-bit words */
            memset(section + count * c->bits / 8, 0, (size_t)(nbytes - count * c->bits / 8));
    }
    return bad;
}

INLINE void decode_one(Ctx *c, const int kind, const int dtype, const uint8_t *payload, char *keys, char *values,
                       const int64_t *s) {
    int64_t count = c->H * c->T * c->D;
    for (int part = 0; part < 2; part++) {
        const uint8_t *codes = payload + c->offs[4 + part];
        if (c->bits < 8) unpack(codes, count, c->bits, c->codes), codes = c->codes;
        if (part == 0)
            decode_keys(c, kind, dtype, payload, codes, keys, s[0], s[1]);
        else
            decode_values(c, kind, dtype, payload, codes, values, s[2], s[3]);
    }
}

#define DISPATCH(CALL)                                                                                             \
    switch (kind * 3 + dtype) {                                                                                    \
    case 0: CALL(KIND_INT, DT_F16); break;                                                                         \
    case 1: CALL(KIND_INT, DT_BF16); break;                                                                        \
    case 2: CALL(KIND_INT, DT_F32); break;                                                                         \
    case 3: CALL(KIND_FP8, DT_F16); break;                                                                         \
    case 4: CALL(KIND_FP8, DT_BF16); break;                                                                        \
    default: CALL(KIND_FP8, DT_F32); break;                                                                        \
    }

/* Any fp16 param not finite? (decode's check of a payload it did not write) */
static int params_bad(const uint8_t *payload, int64_t offset, int64_t count) {
    if (offset < 0) return 0;
    const uint16_t *p = (const uint16_t *)(payload + offset);
    uint32_t bad = 0;
    for (int64_t i = 0; i < count; i++) bad |= (p[i] & 0x7C00u) == 0x7C00u;
    return bad != 0;
}

/* A batch's arguments. table: key, value and payload addresses [3][n], then [n][4] element strides
 * of (key head, key token, value head, value token). shape: H, T, D, dtype, kind, bits, group, then
 * the 6 payload offsets. */
#define BATCH_ARGS                                                                                                 \
    const int64_t *keys = table, *values = table + n, *payloads = table + 2 * n, *strides = table + 3 * n;         \
    int64_t H = shape[0], T = shape[1], D = shape[2], group = shape[6];                                            \
    int dtype = (int)shape[3], kind = (int)shape[4], bits = (int)shape[5];                                         \
    const int64_t *offs = shape + 7;

/* Encode blocks [begin, end) of a batch of n. Returns 0, 1 + the first block that cannot be
 * encoded, or -1 (no memory). */
int64_t tiered_encode(int64_t begin, int64_t end, const int64_t *table, int64_t n, const int64_t *shape) {
    BATCH_ARGS
    Ctx c;
    if (ctx_init(&c, H, T, D, bits, group, offs, 1)) return ctx_free(&c), -1;
    int64_t result = 0;
    for (int64_t i = begin; i < end && !result; i++) {
        int bad;
#define ENCODE(K, DT)                                                                                              \
    bad = encode_one(&c, K, DT, (const char *)keys[i], (const char *)values[i], strides + 4 * i, (uint8_t *)payloads[i])
        DISPATCH(ENCODE)
#undef ENCODE
        if (bad) result = i + 1;
    }
    ctx_free(&c);
    return result;
}

/* Decode blocks [begin, end) of a batch of n into keys and values (arguments as for encode).
 * Returns 0, 1 + the first block whose params are not finite (it and later ones are not written),
 * or -1 (no memory). */
int64_t tiered_decode(int64_t begin, int64_t end, const int64_t *table, int64_t n, const int64_t *shape) {
    BATCH_ARGS
    Ctx c;
    if (ctx_init(&c, H, T, D, bits, group, offs, 0)) return ctx_free(&c), -1;
    int64_t kparams = H * ((T + group - 1) / group) * D, vparams = H * T * ((D + group - 1) / group), result = 0;
    for (int64_t i = begin; i < end; i++) {
        const uint8_t *payload = (const uint8_t *)payloads[i];
        if (params_bad(payload, offs[0], kparams) || params_bad(payload, offs[1], kparams) ||
            params_bad(payload, offs[2], vparams) || params_bad(payload, offs[3], vparams)) {
            result = i + 1;
            break;
        }
#define DECODE(K, DT) decode_one(&c, K, DT, payload, (char *)keys[i], (char *)values[i], strides + 4 * i)
        DISPATCH(DECODE)
#undef DECODE
    }
    ctx_free(&c);
    return result;
}

/* ---- Attention over quantized blocks where they lie (int kinds): see attend_reference.py ------
 *
 * Keys per channel: a score is (q ⊙ scale[g]) · code[t] + q · min[g], with q ⊙ scale[g] and
 * q · min[g] made once per key group. Values per token: each token's weight p[t] takes its scale
 * (p[t] · scale[t, c] times the codes) and its min (Σ p[t] · min[t, c] per channel group c, added
 * at the end). Softmax runs online over the blocks (running max and sum per query row), so nothing
 * block-sized is made but the unpacked codes of one head of one block (bits < 8). Work is split
 * over KV heads [h_begin, h_end). Rows are copied into vectors of LANES padded with zeros.
 * Tokens go AL at a time: their codes are widened once for every query row, a row's AL scores are
 * AL independent sums (one horizontal reduction for all of them), and a row's output takes AL
 * tokens' values per load and store. */

/* The attention loops use vectors of 8 floats: gcc keeps those in AVX2 registers, where a
 * 16-lane vf accumulator would go through the stack on every iteration. */
#define AL 8
typedef float v8 __attribute__((vector_size(AL * 4)));
typedef int32_t v8i __attribute__((vector_size(AL * 4)));
typedef uint8_t v8b __attribute__((vector_size(AL)));
#define AL_INDEX ((v8i){0, 1, 2, 3, 4, 5, 6, 7})

INLINE v8 load8(const float *p) {
    v8 x;
    memcpy(&x, p, sizeof x);
    return x;
}
INLINE void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
INLINE v8 splat8(float x) { return (v8){0} + x; }
INLINE v8 select8(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }
INLINE float hsum8(v8 x) {
#if !defined(TIERED_PORTABLE) && defined(__AVX2__)
    __m256 s;
    memcpy(&s, &x, sizeof s);
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
#else
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
#endif
}

/* hsum8 of each of x0..x7: one vector of the 8 sums. By value, so the sums stay in registers. */
INLINE v8 hsum8x8(v8 x0, v8 x1, v8 x2, v8 x3, v8 x4, v8 x5, v8 x6, v8 x7) {
#if !defined(TIERED_PORTABLE) && defined(__AVX2__)
    __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)x0, (__m256)x1), _mm256_hadd_ps((__m256)x2, (__m256)x3));
    __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)x4, (__m256)x5), _mm256_hadd_ps((__m256)x6, (__m256)x7));
    return (v8)_mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
#else
    return (v8){hsum8(x0), hsum8(x1), hsum8(x2), hsum8(x3), hsum8(x4), hsum8(x5), hsum8(x6), hsum8(x7)};
#endif
}

/* Vectors along head_dim: 16 floats where AVX-512 keeps them in registers, else 8. */
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
#define DW 16
#else
#define DW 8
#endif
typedef float vd __attribute__((vector_size(DW * 4)));

INLINE vd loadd(const float *p) {
    vd x;
    memcpy(&x, p, sizeof x);
    return x;
}
INLINE void stored(float *p, vd x) { memcpy(p, &x, sizeof x); }
INLINE vd splatd(float x) { return (vd){0} + x; }
/* a · b + c, one rounding where the CPU fuses it (the kernels build with -ffp-contract=off). */
INLINE vd fmad(vd a, vd b, vd c) {
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    return (vd)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif !defined(TIERED_PORTABLE) && defined(__FMA__)
    return (vd)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
/* x's lanes folded to 8: lane i + lane i + 8. */
INLINE v8 fold8(vd x) {
#if DW == 16
    __m512d wide = _mm512_castps_pd((__m512)x);
    return (v8)_mm256_add_ps(_mm256_castpd_ps(_mm512_castpd512_pd256(wide)), _mm256_castpd_ps(_mm512_extractf64x4_pd(wide, 1)));
#else
    return x;
#endif
}

/* e^x for the softmax weights (x <= 0): Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6
 * Taylor polynomial (relative error ~2e-7), times 2^n; 0 below -87 (and for -inf). */
INLINE v8 vexp8(v8 x) {
    const float magic = 12582912.0f; /* 1.5 · 2^23: adding it rounds to an integer */
    v8i tiny = x < -87.0f;
    x = select8(tiny, splat8(-87.0f), x);
    v8 n = (x * 1.44269504f + magic) - magic;
    v8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    v8 p = splat8(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f, p = p * r + 1.0f / 24.0f, p = p * r + 1.0f / 6.0f, p = p * r + 0.5f;
    p = p * r + 1.0f, p = p * r + 1.0f;
    v8 two_n = (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
    return select8(tiny, splat8(0.0f), p * two_n);
}

INLINE float f16_scalar(uint16_t bits) { return f16_to_f32((vh){bits})[0]; }

/* fp16 src[n] -> fp32 dst[padded], zeros past n. */
static void f16_row(const uint16_t *src, int64_t n, float *dst, int64_t padded) {
    for (int64_t i = 0; i < padded; i += LANES) {
        vh h = {0};
        if (i < n) memcpy(&h, src + i, (size_t)min64(LANES, n - i) * 2);
        { vf x = f16_to_f32(h); memcpy(dst + i, &x, sizeof x); }
    }
}

/* codes src[i, i + DW) as fp32, zeros past n. */
INLINE vd codes_vec(const uint8_t *src, int64_t i, int64_t n) {
    uint8_t b[DW] = {0};
    if (i + DW <= n)
        memcpy(b, src + i, DW);
    else if (i < n)
        memcpy(b, src + i, (size_t)(n - i));
    vd x;
#if !defined(TIERED_PORTABLE) && defined(__AVX512F__)
    __m128i bytes;
    memcpy(&bytes, b, DW);
    __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
#elif !defined(TIERED_PORTABLE) && defined(__AVX2__) /* gcc widens bytes one by one */
    __m128i bytes = _mm_cvtsi64_si128(0);
    memcpy(&bytes, b, DW);
    __m256 wide = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
#else
    v8b lo;
    memcpy(&lo, b, AL);
    v8 wide = __builtin_convertvector(__builtin_convertvector(lo, v8i), v8);
#endif
    memcpy(&x, &wide, sizeof x);
    return x;
}

/* codes src[n] -> fp32 dst[padded], zeros past n (padded: a multiple of DW). */
INLINE void codes_row(const uint8_t *src, int64_t n, float *dst, int64_t padded) {
    for (int64_t i = 0; i < padded; i += DW) stored(dst + i, codes_vec(src, i, n));
}

/* The codes of elements [first, first + count) of a packed section, one per byte. */
static const uint8_t *codes_of(const uint8_t *packed, int64_t first, int64_t count, int bits, uint8_t *scratch) {
    if (bits == 8) return packed + first;
    if ((first * bits) % 8 == 0) {
        unpack(packed + first * bits / 8, count, bits, scratch);
    } else {
        for (int64_t j = 0; j < count; j++) {
            int64_t e = first + j;
            scratch[j] = (packed[e * bits / 8] >> (e * bits % 8)) & ((1u << bits) - 1u);
        }
    }
    return scratch;
}

/* Whether KV head h sees any key of positions [first, first + count): pages of vpage positions,
 * visible[h * vpages + page] (a sparse step's choice), or every one when visible is NULL. */
INLINE int sees(const uint8_t *visible, int64_t vpages, int64_t vpage, int64_t h, int64_t first, int64_t count) {
    if (visible == NULL) return 1;
    for (int64_t p = first / vpage, last = (first + count - 1) / vpage; p <= last; p++)
        if (visible[h * vpages + p]) return 1;
    return 0;
}

/* q: [H, R, D] fp32, scaled; qpos: [n] or NULL (every key visible); row r is query r % n.
 * Blocks b: payload address, tokens, first position and 6 offsets (as for encode). visible: NULL,
 * or [H, vpages] bytes: KV head h sees only the positions of the pages (vpage positions each)
 * marked in its row, and skips the AL keys at a time and the blocks it sees nothing of. out: [H, R, D] normalized over these blocks, lse: [H, R]
 * (-inf, out 0 where a row sees no key). Returns 0 or -1 (no memory). */
int64_t tiered_attend(int64_t h_begin, int64_t h_end, const float *q, const int64_t *qpos, int64_t n, int64_t R,
                      int64_t H, int64_t D, int64_t nblocks, const int64_t *payloads, const int64_t *tokens,
                      const int64_t *starts, const int64_t *offs, int bits, int64_t G, float *out, float *lse,
                      const uint8_t *visible, int64_t vpages, int64_t vpage) {
    int64_t Dp = (D + LANES - 1) / LANES * LANES, ngv = (D + G - 1) / G, tmax = 1;
    for (int64_t b = 0; b < nblocks; b++) tmax = tokens[b] > tmax ? tokens[b] : tmax;
    int64_t tcodes = tmax;
    tmax = (tmax + LANES - 1) / LANES * LANES + AL; /* score rows padded to whole vectors, and a chunk of AL past */
    size_t floats = (size_t)(3 * R * Dp + R * ngv + 3 * R + R * tmax + (AL + 3) * Dp + (AL + 1) * ngv);
    float *mem = malloc(sizeof(float) * floats);
    uint8_t *scratch = bits < 8 ? malloc((size_t)(tcodes * D)) : NULL;
    if (mem == NULL || (bits < 8 && scratch == NULL)) return free(mem), free(scratch), -1;
    float *qh = mem, *qs = qh + R * Dp, *acc = qs + R * Dp, *zsum = acc + R * Dp, *qz = zsum + R * ngv;
    /* cf: AL rows of widened codes [AL, Dp]; vs: one token's value scales; vm: AL tokens' value mins [ngv, AL] */
    float *m = qz + R, *l = m + R, *s = l + R, *cf = s + R * tmax, *kmin = cf + AL * Dp, *kscale = kmin + Dp;
    float *lane_scale = kscale + Dp, *vs = lane_scale + Dp, *vm = vs + ngv;
    int whole = G % DW == 0; /* every vector of a row lies in one value group */
    for (int64_t h = h_begin; h < h_end; h++) {
        memset(qh, 0, sizeof(float) * (size_t)(R * Dp));
        for (int64_t r = 0; r < R; r++) memcpy(qh + r * Dp, q + (h * R + r) * D, sizeof(float) * (size_t)D);
        memset(acc, 0, sizeof(float) * (size_t)(R * Dp)), memset(zsum, 0, sizeof(float) * (size_t)(R * ngv));
        for (int64_t r = 0; r < R; r++) m[r] = -__builtin_inff(), l[r] = 0.0f;
        for (int64_t b = 0; b < nblocks; b++) {
            const uint8_t *p = (const uint8_t *)payloads[b];
            const int64_t *o = offs + 6 * b;
            int64_t T = tokens[b], ng = (T + G - 1) / G;
            if (!sees(visible, vpages, vpage, h, starts[b], T)) continue;
            /* scores */
            const uint8_t *kc = codes_of(p + o[4], h * T * D, T * D, bits, scratch);
            for (int64_t g = 0; g < ng; g++) {
                f16_row((const uint16_t *)(p + o[0]) + (h * ng + g) * D, D, kmin, Dp);
                f16_row((const uint16_t *)(p + o[1]) + (h * ng + g) * D, D, kscale, Dp);
                for (int64_t r = 0; r < R; r++) {
                    vd z = splatd(0.0f);
                    for (int64_t i = 0; i < Dp; i += DW) {
                        vd x = loadd(qh + r * Dp + i);
                        stored(qs + r * Dp + i, x * loadd(kscale + i));
                        z = fmad(x, loadd(kmin + i), z);
                    }
                    qz[r] = hsum8(fold8(z));
                }
                for (int64_t t = g * G, end = min64(T, t + G); t < end; t += AL) {
                    int64_t nt = min64(AL, end - t); /* scores past the group's end are written, then overwritten */
                    if (!sees(visible, vpages, vpage, h, starts[b] + t, nt)) continue; /* masked below */
                    for (int64_t j = 0; j < AL; j++)
                        if (j < nt) codes_row(kc + (t + j) * D, D, cf + j * Dp, Dp);
                        else memset(cf + j * Dp, 0, sizeof(float) * (size_t)Dp);
                    for (int64_t r = 0; r < R; r++) {
                        vd d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, d4 = {0}, d5 = {0}, d6 = {0}, d7 = {0};
                        for (int64_t i = 0; i < Dp; i += DW) { /* AL named sums: an array would live on the stack */
                            vd x = loadd(qs + r * Dp + i);
                            const float *c = cf + i;
                            d0 = fmad(x, loadd(c), d0), d1 = fmad(x, loadd(c + Dp), d1);
                            d2 = fmad(x, loadd(c + 2 * Dp), d2), d3 = fmad(x, loadd(c + 3 * Dp), d3);
                            d4 = fmad(x, loadd(c + 4 * Dp), d4), d5 = fmad(x, loadd(c + 5 * Dp), d5);
                            d6 = fmad(x, loadd(c + 6 * Dp), d6), d7 = fmad(x, loadd(c + 7 * Dp), d7);
                        }
                        v8 sums = hsum8x8(fold8(d0), fold8(d1), fold8(d2), fold8(d3), fold8(d4), fold8(d5), fold8(d6), fold8(d7));
                        store8(s + r * tmax + t, sums + qz[r]);
                    }
                }
            }
            /* mask, then online softmax: s becomes the weights p[t] */
            for (int64_t r = 0; r < R; r++) {
                float *sr = s + r * tmax, best = -__builtin_inff();
                if (qpos != NULL)
                    for (int64_t t = 0; t < T; t++)
                        if (starts[b] + t > qpos[r % n]) sr[t] = -__builtin_inff();
                if (visible != NULL)
                    for (int64_t t = 0; t < T; t++)
                        if (!visible[h * vpages + (starts[b] + t) / vpage]) sr[t] = -__builtin_inff();
                v8 top8 = splat8(-__builtin_inff());
                for (int64_t t = 0; t < T; t += AL) {
                    v8 x = select8(AL_INDEX < (int)(T - t), load8(sr + t), splat8(-__builtin_inff()));
                    top8 = select8(x > top8, x, top8);
                }
                for (int j = 0; j < AL; j++) best = top8[j] > best ? top8[j] : best;
                if (best == -__builtin_inff()) { /* this row sees nothing of the block */
                    memset(sr, 0, sizeof(float) * (size_t)((T + AL - 1) / AL * AL));
                    continue;
                }
                float top = best > m[r] ? best : m[r], alpha = expf(m[r] - top), sum = 0.0f;
                if (alpha != 1.0f) {
                    for (int64_t i = 0; i < Dp; i += DW) stored(acc + r * Dp + i, loadd(acc + r * Dp + i) * alpha);
                    for (int64_t c = 0; c < ngv; c++) zsum[r * ngv + c] *= alpha;
                    l[r] *= alpha;
                }
                v8 total = splat8(0.0f);
                for (int64_t t = 0; t < T; t += AL) {
                    v8 e = select8(AL_INDEX < (int)(T - t), vexp8(load8(sr + t) - top), splat8(0.0f));
                    store8(sr + t, e);
                    total += e;
                }
                sum = hsum8(total);
                m[r] = top, l[r] += sum;
            }
            /* values */
            const uint8_t *vc = codes_of(p + o[5], h * T * D, T * D, bits, scratch);
            const uint16_t *vmin16 = (const uint16_t *)(p + o[2]), *vscale16 = (const uint16_t *)(p + o[3]);
            for (int64_t t = 0; t < T; t += AL) {
                int64_t nt = min64(AL, T - t); /* rows past nt are zeros, and so are their weights */
                if (!sees(visible, vpages, vpage, h, starts[b] + t, nt)) continue; /* weights 0 */
                memset(vm, 0, sizeof(float) * (size_t)(AL * ngv));
                for (int64_t j = 0; j < AL; j++) { /* row j of cf: token t + j's codes times their scales */
                    float *row = cf + j * Dp;
                    if (j >= nt) {
                        memset(row, 0, sizeof(float) * (size_t)Dp);
                        continue;
                    }
                    const uint8_t *codes = vc + (t + j) * D;
                    int64_t at = (h * T + t + j) * ngv;
                    for (int64_t c = 0; c < ngv; c++)
                        vs[c] = f16_scalar(vscale16[at + c]), vm[c * AL + j] = f16_scalar(vmin16[at + c]);
                    if (whole) { /* one scale per vector; the last group's also for the padding */
                        for (int64_t c = 0; c < ngv; c++) {
                            vd scale = splatd(vs[c]);
                            for (int64_t i = c * G, end = c == ngv - 1 ? Dp : i + G; i < end; i += DW)
                                stored(row + i, codes_vec(codes, i, D) * scale);
                        }
                    } else {
                        for (int64_t d = 0; d < Dp; d++) lane_scale[d] = d < D ? vs[d / G] : 0.0f;
                        for (int64_t i = 0; i < Dp; i += DW) stored(row + i, codes_vec(codes, i, D) * loadd(lane_scale + i));
                    }
                }
                for (int64_t r = 0; r < R; r++) {
                    const float *pr = s + r * tmax + t;
                    float *ar = acc + r * Dp;
                    int64_t i = 0;
                    for (; i + 2 * DW <= Dp; i += 2 * DW) { /* two vectors of the row: two chains of sums */
                        vd a0 = loadd(ar + i), a1 = loadd(ar + i + DW);
                        for (int j = 0; j < AL; j++) {
                            vd w = splatd(pr[j]);
                            a0 = fmad(w, loadd(cf + j * Dp + i), a0), a1 = fmad(w, loadd(cf + j * Dp + i + DW), a1);
                        }
                        stored(ar + i, a0), stored(ar + i + DW, a1);
                    }
                    if (i < Dp) {
                        vd a0 = loadd(ar + i);
                        for (int j = 0; j < AL; j++) a0 = fmad(splatd(pr[j]), loadd(cf + j * Dp + i), a0);
                        stored(ar + i, a0);
                    }
                    v8 w = load8(pr);
                    for (int64_t c = 0; c < ngv; c++) zsum[r * ngv + c] += hsum8(w * load8(vm + c * AL));
                }
            }
        }
        for (int64_t r = 0; r < R; r++) {
            float *dst = out + (h * R + r) * D;
            if (l[r] == 0.0f) {
                memset(dst, 0, sizeof(float) * (size_t)D);
                lse[h * R + r] = -__builtin_inff();
                continue;
            }
            for (int64_t d = 0; d < D; d++) dst[d] = (acc[r * Dp + d] + zsum[r * ngv + d / G]) / l[r];
            lse[h * R + r] = m[r] + logf(l[r]);
        }
    }
    free(mem), free(scratch);
    return 0;
}

/* c[u] = row t + u of a span of `count` rows from `span` (D floats each); `zero` past its end. */
INLINE void span_rows(const float **c, const float *span, int64_t t, int64_t count, int64_t D, const float *zero) {
    for (int64_t u = 0; u < AL; u++) c[u] = t + u < count ? span + (t + u) * D : zero;
}

/* A sparse step's spans are pages of 16 rows (4 KiB at head_dim 64) scattered over the pool. The
 * hardware prefetcher starts over at each one, so each would wait out a memory latency: the span
 * PREFETCH_AHEAD ahead is asked for (its first PREFETCH_BYTES, into L2) while this one is read.
 * Measured on a 2-core EPYC VM, 64 pages of 16 rows per KV head from memory: 291 µs a call
 * without, 175 µs with (the same rows in one run: 120 µs). */
#define PREFETCH_AHEAD 3
#define PREFETCH_BYTES 4096
INLINE void prefetch_span(const float *span, int64_t count, int64_t D) {
    int64_t bytes = count * D * (int64_t)sizeof(float);
    bytes = bytes < PREFETCH_BYTES ? bytes : PREFETCH_BYTES;
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)span + b, 0, 2);
}

/* Spans j + PREFETCH_AHEAD of `base` asked for as span j is read (at j = 0, the ones before it too). */
INLINE void prefetch_ahead(const float *base, const int64_t *first, const int64_t *count, int64_t j, int64_t nspans,
                           int64_t D) {
    for (int64_t a = j ? j + PREFETCH_AHEAD : 1; a <= j + PREFETCH_AHEAD && a < nspans; a++)
        prefetch_span(base + first[a] * D, count[a], D);
}

/* Attention of R query rows per KV head over full-precision rows of one pool, every key visible
 * (a decode step): q: [H, R, D] fp32, scaled; row i of keys and values is kbase + i·D, vbase + i·D.
 * KV head h reads nspans spans, span j being rows [first[h·nspans + j], + count[h·nspans + j]).
 * out: [H, R, D] and lse: [H, R], as tiered_attend writes them. D: a multiple of DW. Scores of a
 * head are kept whole ([R, its tokens]), so each key and value row is read once. Returns 0, -1 (no
 * memory) or -2 (a span outside rows 0..rows-1). */
int64_t tiered_attend_rows(int64_t h_begin, int64_t h_end, const float *q, int64_t R, int64_t D, const float *kbase,
                           const float *vbase, int64_t rows, int64_t nspans, const int64_t *first, const int64_t *count,
                           float *out, float *lse) {
    int64_t most = 0;
    for (int64_t h = h_begin; h < h_end; h++) {
        int64_t total = 0;
        for (int64_t j = 0; j < nspans; j++) {
            int64_t f = first[h * nspans + j], c = count[h * nspans + j];
            if (f < 0 || c < 0 || f > rows - c) return -2;
            total += c;
        }
        most = total > most ? total : most;
    }
    int64_t padded = (most + AL - 1) / AL * AL + AL;
    float *s = malloc(sizeof(float) * (size_t)(R * padded + R * D + D + R));
    float *acc = s + R * padded, *zero = acc + R * D, *inv = zero + D; /* inv: 1 / the sum of a row's weights */
    if (s == NULL) return -1;
    memset(zero, 0, sizeof(float) * (size_t)D);
    for (int64_t h = h_begin; h < h_end; h++) {
        const int64_t *hf = first + h * nspans, *hc = count + h * nspans;
        const float *qh = q + h * R * D;
        /* scores: AL keys at a time, a named sum per key, one horizontal reduction for all AL */
        int64_t at = 0;
        for (int64_t j = 0; j < nspans; j++) {
            prefetch_ahead(kbase, hf, hc, j, nspans, D);
            for (int64_t t = 0; t < hc[j]; t += AL) {
                const float *c[AL];
                span_rows(c, kbase + hf[j] * D, t, hc[j], D, zero);
                for (int64_t r = 0; r < R; r++) {
                    vd d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, d4 = {0}, d5 = {0}, d6 = {0}, d7 = {0};
                    for (int64_t i = 0; i < D; i += DW) {
                        vd x = loadd(qh + r * D + i);
                        d0 = fmad(x, loadd(c[0] + i), d0), d1 = fmad(x, loadd(c[1] + i), d1);
                        d2 = fmad(x, loadd(c[2] + i), d2), d3 = fmad(x, loadd(c[3] + i), d3);
                        d4 = fmad(x, loadd(c[4] + i), d4), d5 = fmad(x, loadd(c[5] + i), d5);
                        d6 = fmad(x, loadd(c[6] + i), d6), d7 = fmad(x, loadd(c[7] + i), d7);
                    }
                    store8(s + r * padded + at + t,
                           hsum8x8(fold8(d0), fold8(d1), fold8(d2), fold8(d3), fold8(d4), fold8(d5), fold8(d6), fold8(d7)));
                }
            }
            at += hc[j]; /* the next span's scores overwrite this one's padding */
        }
        /* softmax weights, unnormalized: e^(s - max) */
        for (int64_t r = 0; r < R; r++) {
            float *sr = s + r * padded;
            v8 top8 = splat8(-__builtin_inff());
            for (int64_t t = 0; t < at; t += AL)
                top8 = select8(AL_INDEX < (int)(at - t) & load8(sr + t) > top8, load8(sr + t), top8);
            float top = -__builtin_inff();
            for (int u = 0; u < AL; u++) top = top8[u] > top ? top8[u] : top;
            v8 total = splat8(0.0f);
            for (int64_t t = 0; t < at; t += AL) {
                v8 e = select8(AL_INDEX < (int)(at - t), vexp8(load8(sr + t) - top), splat8(0.0f));
                store8(sr + t, e);
                total += e;
            }
            float sum = hsum8(total);
            lse[h * R + r] = at ? top + logf(sum) : -__builtin_inff();
            inv[r] = at ? 1.0f / sum : 0.0f;
        }
        /* values: acc[r] = sum_t p[t] v[t], AL rows of values per pass */
        for (int64_t r = 0; r < R; r++) memset(acc + r * D, 0, sizeof(float) * (size_t)D);
        at = 0;
        for (int64_t j = 0; j < nspans; j++) {
            prefetch_ahead(vbase, hf, hc, j, nspans, D);
            for (int64_t t = 0; t < hc[j]; t += AL) {
                int64_t nt = min64(AL, hc[j] - t);
                const float *c[AL];
                span_rows(c, vbase + hf[j] * D, t, hc[j], D, zero);
                for (int64_t r = 0; r < R; r++) {
                    const float *pr = s + r * padded + at + t;
                    float w[AL];
                    for (int64_t u = 0; u < AL; u++) w[u] = u < nt ? pr[u] : 0.0f;
                    float *ar = acc + r * D;
                    for (int64_t i = 0; i < D; i += DW) {
                        vd a = loadd(ar + i);
                        for (int u = 0; u < AL; u++) a = fmad(splatd(w[u]), loadd(c[u] + i), a);
                        stored(ar + i, a);
                    }
                }
            }
            at += hc[j];
        }
        for (int64_t r = 0; r < R; r++) {
            for (int64_t i = 0; i < D; i += DW) stored(out + (h * R + r) * D + i, loadd(acc + r * D + i) * splatd(inv[r]));
        }
    }
    free(s);
    return 0;
}

INLINE int any8(v8i mask) {
    for (int u = 0; u < AL; u++)
        if (mask[u]) return 1;
    return 0;
}

/* The value that `k` of x[0..n) are at least (the k-th largest, 1 <= k <= n), found by quickselect
 * in x, which it reorders. */
static float kth_largest(float *x, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1; /* x[want] once [lo, hi] is sorted in descending order */
    while (lo < hi) {
        float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) i++;
            while (x[j] < pivot) j--;
            if (i <= j) {
                float t = x[i];
                x[i] = x[j], x[j] = t, i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return x[want];
    }
    return x[want];
}

/* Quest's bound of AL pages p0.. (the last one again past P, not stored) for KV head h: into sh. */
INLINE int quest_pages(const float *q, int64_t G, int64_t D, const float *kmin, const float *kmax, int64_t H,
                       int64_t P, int64_t h, int64_t p0, float *sh) {
    const float *mn[AL], *mx[AL];
    for (int u = 0; u < AL; u++) {
        int64_t p = p0 + u < P ? p0 + u : P - 1;
        mn[u] = kmin + (p * H + h) * D, mx[u] = kmax + (p * H + h) * D;
    }
    v8 best = splat8(-__builtin_inff());
    for (int64_t g = 0; g < G; g++) {
        const float *qg = q + (h * G + g) * D;
        vd d[AL] = {{0}};
        for (int64_t i = 0; i < D; i += DW) {
            vd x = loadd(qg + i), zero = {0};
            vd pos = (vd)((x > zero) & (__typeof__(x > zero))x), neg = x - pos; /* q+ and q- */
            for (int u = 0; u < AL; u++) d[u] = fmad(pos, loadd(mx[u] + i), fmad(neg, loadd(mn[u] + i), d[u]));
        }
        v8 sums = hsum8x8(fold8(d[0]), fold8(d[1]), fold8(d[2]), fold8(d[3]), fold8(d[4]), fold8(d[5]), fold8(d[6]),
                          fold8(d[7]));
        if (any8(sums != sums)) return -3;
        best = select8(sums > best, sums, best);
    }
    for (int u = 0; u < AL && p0 + u < P; u++) sh[p0 + u] = best[u];
    return 0;
}

/* Quest's page scores and each KV head's pages in one call: policies.importance.quest's bound
 * (max over a head's G query rows of sum_c max(q_c min_c, q_c max_c), as q+ . max + q- . min) and
 * select_per_head's choice (the protected pages, sinks then the window newest first, cut at
 * `kept`; then the highest scores; ties go to the older page). q: [H, G, D]; kmin, kmax: [P, H, D];
 * protect: the protected pages in that order, nprotect of them. scores: [H, P] out; keep: [H, kept]
 * out, ascending. `work` is scratch of 2P floats. Returns 0, or -3 when a score is NaN. The bounds
 * are read once, in memory order (pages outer, heads inner): from memory they cost more than the
 * arithmetic. */
int64_t tiered_quest_select(const float *q, int64_t G, int64_t D, const float *kmin, const float *kmax, int64_t H,
                            int64_t P, const int64_t *protect, int64_t nprotect, int64_t kept, float *scores,
                            int64_t *keep, float *work) {
    for (int64_t p0 = 0; p0 < P; p0 += AL)
        for (int64_t h = 0; h < H; h++)
            if (quest_pages(q, G, D, kmin, kmax, H, P, h, p0, scores + h * P)) return -3;
    float *ranked = work, *pick = work + P;
    for (int64_t h = 0; h < H; h++) {
        const float *sh = scores + h * P;
        for (int64_t p = 0; p < P; p++) ranked[p] = sh[p];
        for (int64_t i = 0; i < nprotect && i < kept; i++) ranked[protect[i]] = __builtin_inff();
        for (int64_t p = 0; p < P; p++) pick[p] = ranked[p];
        float cut = kth_largest(pick, P, kept);
        int64_t above = 0;
        for (int64_t p = 0; p < P; p++) above += ranked[p] > cut;
        int64_t ties = kept - above, n = 0;
        int64_t *kh = keep + h * kept;
        for (int64_t p = 0; p < P && n < kept; p++) {
            if (ranked[p] > cut || (ranked[p] == cut && ties-- > 0)) kh[n++] = p;
        }
    }
    return 0;
}

/* The blocks a sparse step's pages lie in, the pages checked (TieredStore.read_pages' rules).
 * pages: [H, kept]; each must lie in 0..held-1, and with `partial` (the newest page is not full)
 * every head's last must be held - 1. blocks: out, ascending, each once; mark: scratch of
 * ceil(held / per_block) bytes. Returns how many blocks, -2 (a page outside) or -4 (a head's
 * last page is not the partial newest). */
int64_t tiered_page_blocks(const int64_t *pages, int64_t H, int64_t kept, int64_t held, int64_t per_block,
                           int64_t partial, int64_t *blocks, uint8_t *mark) {
    int64_t nblocks = (held + per_block - 1) / per_block, n = 0;
    memset(mark, 0, (size_t)nblocks);
    for (int64_t i = 0; i < H * kept; i++) {
        if (pages[i] < 0 || pages[i] >= held) return -2;
        mark[pages[i] / per_block] = 1;
    }
    for (int64_t h = 0; partial && h < H; h++)
        if (pages[h * kept + kept - 1] != held - 1) return -4;
    for (int64_t b = 0; b < nblocks; b++)
        if (mark[b]) blocks[n++] = b;
    return n;
}

/* Where checked pages lie in a device pool seen as rows: page p of KV head h is rows first[h, j]
 * .. + count[h, j], first = h * head_rows + slots[p / per_block] * block_tokens + p % per_block *
 * page_tokens, and count page_tokens, short_by less for each head's last (a partial newest page). */
void tiered_page_rows(const int64_t *pages, int64_t H, int64_t kept, const int64_t *slots, int64_t per_block,
                      int64_t page_tokens, int64_t block_tokens, int64_t head_rows, int64_t short_by, int64_t *first,
                      int64_t *count) {
    for (int64_t h = 0; h < H; h++) {
        for (int64_t j = 0; j < kept; j++) {
            int64_t p = pages[h * kept + j];
            first[h * kept + j] = h * head_rows + slots[p / per_block] * block_tokens + p % per_block * page_tokens;
            count[h * kept + j] = page_tokens;
        }
        count[h * kept + kept - 1] -= short_by;
    }
}
