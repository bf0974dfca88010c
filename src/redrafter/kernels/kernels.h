// What our kernels share: loads and bfloat16 rounding, a vectorized exp, and the pieces of the w4a8
// products and of the attention that layer.c runs inside its own parallel region.
#ifndef REDRAFTER_KERNELS_H
#define REDRAFTER_KERNELS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,fma")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma")))
#define MASKED (-1e30f)  // an additive mask at or below this leaves its key out

// 16 values at base + at (float32, or bfloat16 when bf16 != 0) as floats.
AVX512 static inline __m512 load16(const void *base, int64_t at, int bf16) {
  if (bf16) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  return _mm512_loadu_ps((const float *)base + at);
}

static inline float load1(const void *base, int64_t at, int bf16) {
  if (bf16) {
    uint32_t bits = (uint32_t)((const uint16_t *)base)[at] << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
  }
  return ((const float *)base)[at];
}

static inline uint16_t to_bf16_bits(float value) {  // round to nearest even, NaN kept a NaN (as PyTorch)
  uint32_t bits;
  memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 64);
  bits += 0x7fff + ((bits >> 16) & 1);
  return (uint16_t)(bits >> 16);
}

// value rounded to bfloat16 when bf16 != 0 (what storing it in a bfloat16 tensor does), else itself.
static inline float round_to(float value, int bf16) {
  if (!bf16) return value;
  uint32_t bits = (uint32_t)to_bf16_bits(value) << 16;
  float rounded;
  memcpy(&rounded, &bits, 4);
  return rounded;
}

// 16 floats rounded to bfloat16 (to nearest even, NaN kept a NaN), as PyTorch rounds them: the bits.
AVX512 static inline __m256i bf16_bits16(__m512 values) {
  __m512i bits = _mm512_castps_si512(values);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(64)));
  return _mm512_cvtepi32_epi16(rounded);
}

// 16 floats rounded to bfloat16 values when bf16 != 0, else themselves.
AVX512 static inline __m512 round16(__m512 values, int bf16) {
  if (!bf16) return values;
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(values)), 16));
}

// 16 floats stored at base + at (float32, or bfloat16 when bf16 != 0; rounded to nearest even).
AVX512 static inline void store16(void *base, int64_t at, __m512 values, int bf16) {
  if (bf16) {
    _mm256_storeu_si256((__m256i *)((uint16_t *)base + at), bf16_bits16(values));
  } else {
    _mm512_storeu_ps((float *)base + at, values);
  }
}

// exp(x) for x <= 0 (0 below -87.3): Cody-Waite reduction and a degree-6 polynomial (Cephes' expf).
AVX512 static inline __m512 exp_nonpositive(__m512 x) {
  __mmask16 alive = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(alive, _mm512_scalef_ps(p, n));
}

// silu(g) = g / (1 + exp(-g)) of 16 floats, written without overflow (layer.c's gate, drafter.c's cell
// and blocks).
AVX512 static inline __m512 silu16(__m512 g) {
  __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  // exp(-|g|)
  __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 numerator = _mm512_mask_mul_ps(g, negative, g, e);
  return _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// The sum of x's 16 lanes, added in pairs (i, i + 8), then (i, i + 4), (i, i + 2), then (0, 1): the order
// of GCC's _mm512_reduce_add_ps, and the order sums16 keeps for each of its sixteen (attention.c's
// scores, head.c's logits).
AVX512 static inline float sum16(__m512 x) {
  __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  __m128 two = _mm_add_ps(four, _mm_permute_ps(four, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

// The first two of sum16's steps for four vectors at once: 128-bit block r holds d[r]'s four partial sums.
AVX512 static inline __m512 sums4(__m512 d0, __m512 d1, __m512 d2, __m512 d3) {
  __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x44), _mm512_shuffle_f32x4(d0, d1, 0xEE));
  __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(d2, d3, 0x44), _mm512_shuffle_f32x4(d2, d3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// sum16 of sixteen vectors, from sums4 of each four (u[m] of d[4m .. 4m + 3]): lane r = sum16(d[r]), bit
// for bit. A horizontal sum per vector costs about as many shuffles as a dot product has FMAs; here
// sixteen share them.
AVX512 static inline __m512 sums16(__m512 u0, __m512 u1, __m512 u2, __m512 u3) {
  __m512 w01 = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 w23 = _mm512_add_ps(_mm512_shuffle_ps(u2, u3, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(u2, u3, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 z = _mm512_add_ps(_mm512_shuffle_ps(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4k + m holds d[4m + k]
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

// sum_k E[at + k] x[k] for exact weights E of kind 0 (bfloat16), 1 (float16) or 2 (float32), a float32
// sum in one fixed order: 16 lanes over k, then sum16's tree (w4a8.c's exact logits; head.c's
// outputs that are not in a group of sixteen).
AVX512 static inline float exact_dot(const void *exact, int kind, int64_t at, const float *x, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 w = kind == 1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)exact + at + k)))
                         : load16(exact, at + k, kind == 0);
    acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + k), acc);
  }
  return sum16(acc);
}

// w4a8.c: y [M, N] = x [M, K] times the weights inside a parallel region: the rows quantized into the
// scratch q [M, K], s and sums [M, K / 32], then the tiles (y float32 when bf16_out is 0,
// bfloat16 when 1, float32 holding bfloat16 values when 2).
void w4a8_rows(const void *x, int bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dm, int bits,
               int64_t N, int8_t *q, float *s, float *sums, int bf16_out, void *y);

// A w4a8 layer's weights (w4a8.c's tile-major codes and float16 scales) and its bias.
typedef struct {
  const uint8_t *codes;
  const uint16_t *scales;
  const void *bias;  // [N] in the activations' dtype, or NULL
  int64_t bits, out_features, in_features;
} Product;

// w4a8.c: y [M, N] = x [M, K] (float) times p's weights, rounded as the unfused product's output (in the
// activations' dtype, bfloat16 when bf16 != 0, then the bias added and rounded again), with w4a8_rows'
// scratch. Inside a parallel region: the loops are shared.
void w4a8_product(const Product *p, const float *x, int64_t M, int bf16, int8_t *q, float *s, float *sums, float *y);

// attention.c: G queries sharing their keys, values and mask row (q_sg elements apart; the mask's keys
// contiguous), each computed as the top of attention.c says, into out [G, D]; scores: scratch of
// min(G, 8) K floats, kept of K ints.
void attention_group(const void *q, int64_t q_sg, int64_t G, const void *k, const void *v, const void *mask, int bf16,
                     int64_t K, int64_t D, int64_t k_sk, int64_t v_sk, float scale, float *scores, int32_t *kept,
                     float *out);

#endif
