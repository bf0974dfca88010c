// Products of quantized weights and int8 activations for x86 CPUs with AVX-512 VNNI.
//
//   y[M, N] = x[M, K] W^T,  W[n, k] = d[n, b] * u[n, k] + m[n, b]  for the block b = k / 32,
//
// with codes u of 4 bits (0..15: a GGUF Q4_0 or Q4_1 tensor's own) or 8 bits (0..255: Q8_0's q + 128),
// and d, m float16 per output and block of 32 inputs. Each row of x is quantized per block of 32 to
// int8, a = round(x / s) with s = max |x| / 127 (round half to even), as llama.cpp quantizes
// activations for these types. A block then contributes
//
//   s * (d * sum(u * a) + m * sum(a)),
//
// the integer sum exact (VPDPBUSD: unsigned codes times signed activations), the rest in float32 in a
// fixed order. Every output element runs the same instructions whatever M is and wherever its row
// sits in x, so a row's output does not depend on the other rows (batch invariance).
//
// Layout of the codes, per tile of 16 outputs (n = 16 t + j) and block b, tile-major then block:
//   4 bits: 256 bytes, four chunks of 64; byte 4 j + i of chunk p holds u[n, 32 b + 8 p + i] in its low
//           nibble and u[n, 32 b + 8 p + 4 + i] in its high one.
//   8 bits: 512 bytes, eight chunks of 64; byte 4 j + i of chunk p holds u[n, 32 b + 4 p + i].
// d and m: per tile and block, 16 float16 d then 16 float16 m.
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define ROWS 8  // rows of x per register block (w4a8_tile has a case for each count up to 8)
// Bytes ahead of the codes (a quarter of that of the scales) asked into the cache while a block is
// multiplied. The hardware prefetchers stop at 4 kB pages, and a decode step streams the weights from
// memory: on a 2-core Xeon a one-token step of the default model took 2.8 ms without, 2.1 with
// (docs/prefetch/); 1 kB ahead gave nothing, 2 to 8 kB the same, 16 kB less.
#ifndef PREFETCH
#define PREFETCH 4096
#endif
#define PANEL 64     // rows of x per pass over the weights (their activations stay in cache)

// Quantize row r of x (float32 or bfloat16) into q[K], s[K / 32] and sums[K / 32] (float, exact).
VNNI static void w4a8_quantize_row(const void *x, int bf16, int64_t r, int64_t K, int8_t *q, float *s, float *sums) {
  for (int64_t b = 0; b < K / 32; b++) {
    __m512 v[2];
    for (int h = 0; h < 2; h++) {
      int64_t at = r * K + 32 * b + 16 * h;
      if (bf16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at));
        v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      } else {
        v[h] = _mm512_loadu_ps((const float *)x + at);
      }
    }
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    float scale = amax / 127.0f;
    __m512 inverse = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
    int32_t total = 0;
    for (int h = 0; h < 2; h++) {
      __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], inverse));  // round half to even
      total += _mm512_reduce_add_epi32(codes);
      _mm_storeu_si128((__m128i *)(q + 32 * b + 16 * h), _mm512_cvtsepi32_epi8(codes));
    }
    s[b] = scale;
    sums[b] = (float)total;
  }
}

// The 8 code vectors of one tile and block: lane j's 4 bytes of vector k are u[n, 32 b + 4 k + 0..3].
VNNI static inline void load_codes(const uint8_t *block, int bits, __m512i *u) {
  if (bits == 4) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; p++) {
      __m512i packed = _mm512_loadu_si512(block + 64 * p);
      u[2 * p] = _mm512_and_si512(packed, low);
      u[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
    }
  } else {
    for (int p = 0; p < 8; p++) u[p] = _mm512_loadu_si512(block + 64 * p);
  }
}

// Outputs 16 t .. 16 t + 15 of `rows` rows from r0 (at most ROWS): each block's codes unpacked once for
// all of them. rows is a constant where inlined, so its loops unroll and the sums stay in registers.
VNNI static inline __attribute__((always_inline)) void w4a8_rows_tile(
    const uint8_t *codes, const uint16_t *dm, int bits, const int8_t *q, const float *s, const float *sums, int64_t r0,
    const int rows, int64_t K, int64_t N, int64_t t, int bf16_out, void *y) {
  const int64_t blocks = K / 32, block_bytes = 8 * bits * 8;
  __m512 acc[ROWS];
  for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m512i u[8];
    const uint8_t *block = codes + (t * blocks + b) * block_bytes;
    const uint16_t *scales = dm + (t * blocks + b) * 32;
    for (int64_t line = 0; line < block_bytes; line += 64) _mm_prefetch((const char *)block + PREFETCH + line, _MM_HINT_T0);
    _mm_prefetch((const char *)scales + PREFETCH / 4, _MM_HINT_T0);
    load_codes(block, bits, u);
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
    __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 16)));
    for (int r = 0; r < rows; r++) {
      const int8_t *a = q + (r0 + r) * K + 32 * b;
      __m512i dot = _mm512_setzero_si512();
      for (int k = 0; k < 8; k++) dot = _mm512_dpbusd_epi32(dot, u[k], _mm512_set1_epi32(*(const int32_t *)(a + 4 * k)));
      __m512 part = _mm512_mul_ps(m, _mm512_set1_ps(sums[(r0 + r) * blocks + b]));
      part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, part);
      acc[r] = _mm512_fmadd_ps(part, _mm512_set1_ps(s[(r0 + r) * blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < rows; r++) {
    if (bf16_out == 1) {
      _mm256_storeu_si256((__m256i *)((uint16_t *)y + (r0 + r) * N + 16 * t), bf16_bits16(acc[r]));
    } else if (bf16_out == 2) {
      _mm512_storeu_ps((float *)y + (r0 + r) * N + 16 * t, round16(acc[r], 1));
    } else {
      _mm512_storeu_ps((float *)y + (r0 + r) * N + 16 * t, acc[r]);
    }
  }
}

// Outputs 16 t .. 16 t + 15 of rows [first, first + count), ROWS rows at a time.
VNNI static void w4a8_tile(const uint8_t *codes, const uint16_t *dm, int bits, const int8_t *q, const float *s,
                      const float *sums, int64_t first, int64_t count, int64_t K, int64_t N, int64_t t, int bf16_out,
                      void *y) {
  for (int64_t r0 = first; r0 < first + count; r0 += ROWS) {
    switch (first + count - r0 < ROWS ? (int)(first + count - r0) : ROWS) {
#define ROWS_CASE(n) \
  case n:            \
    w4a8_rows_tile(codes, dm, bits, q, s, sums, r0, n, K, N, t, bf16_out, y); \
    break;
      ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#undef ROWS_CASE
    }
  }
}

// y [M, N] = x [M, K] (float32, or bfloat16 when bf16 != 0) times the weights above, inside a parallel
// region (its loops are shared): each row quantized into q, s and sums (scratch for M rows), then the
// tiles a panel of rows at a time; y as w4a8_tile's bf16_out says.
void w4a8_rows(const void *x, int bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dm, int bits,
               int64_t N, int8_t *q, float *s, float *sums, int bf16_out, void *y) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < M; r++) w4a8_quantize_row(x, bf16, r, K, q + r * K, s + r * (K / 32), sums + r * (K / 32));
  for (int64_t first = 0; first < M; first += PANEL) {
    int64_t count = M - first < PANEL ? M - first : PANEL;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N / 16; t++) w4a8_tile(codes, dm, bits, q, s, sums, first, count, K, N, t, bf16_out, y);
  }
}

AVX512 void w4a8_product(const Product *p, const float *x, int64_t M, int bf16, int8_t *q, float *s, float *sums, float *y) {
  const int64_t N = p->out_features;
  w4a8_rows(x, 0, M, p->in_features, p->codes, p->scales, (int)p->bits, N, q, s, sums, bf16 ? 2 : 0, y);
  if (p->bias == NULL) return;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < M; r++)
    for (int64_t n = 0; n < N; n += 16)
      _mm512_storeu_ps(y + r * N + n, round16(_mm512_add_ps(_mm512_loadu_ps(y + r * N + n), load16(p->bias, n, bf16)), bf16));
}

// y [M, N] = x [M, K] times the weights above; x and y float32, or bfloat16 when bf16 != 0.
// K must be a multiple of 32 and N of 16. Returns 0, or -1 when scratch memory ran out.
int w4a8_matmul(const void *x, int bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dm, int bits,
                int64_t N, void *y) {
  int8_t *q = malloc((size_t)(M * K) + 2 * (size_t)(M * (K / 32)) * sizeof(float));
  if (q == NULL) return -1;
  float *s = (float *)(q + M * K), *sums = s + M * (K / 32);
  // (M * K is a multiple of 32, so s is aligned for floats.)
#pragma omp parallel
  w4a8_rows(x, bf16, M, K, codes, dm, bits, N, q, s, sums, bf16, y);
  free(q);
  return 0;
}

// The greedy argmax of one row, certified: the n maximizing L_n = sum_k E[n, k] h_k, each L_n a float32
// sum in exact_dot's order (for bfloat16 weights, bf16_head's logits in float32), of the lower n among equals; the screen's
// y_n (this row's w4a8 outputs before rounding) only decides which L_n to compute. With Q the screen's
// weights and h~ the int8 activations times their scales, Cauchy-Schwarz bounds
//
//   |L_n - y_n| <= |(E_n - Q_n) . h| + |Q_n . (h - h~)| + float rounding
//              <= gap[n] |h| + norm[n] |h - h~| + 2^-16 norm[n] |h| + 2^-10 = e_n,
//
// (gap[n] >= |E_n - Q_n| and norm[n] >= |Q_n|, Euclidean norms rounded up; the two float32 sums round
// about 60 times, each by at most 2^-24 of a part of norm[n] |h|), so with low = max_n (y_n - e_n), no
// n with y_n + e_n < low can beat the n reaching low: only the others are computed exactly. Where no n
// is left (a hidden state that is not finite) every one is, and the first NaN wins, as in torch.argmax.
// Returns how many were.
VNNI static int64_t row_argmax(const void *x, int bf16, int64_t r, int64_t K, const int8_t *q, const float *s,
                                 const float *y, int64_t N, const void *exact, int exact_kind, const float *gap,
                                 const float *norm, float *xf, int64_t *id) {
  double h2 = 0.0, d2 = 0.0;
  for (int64_t k = 0; k < K; k++) {
    double h = load1(x, r * K + k, bf16), error = h - (double)s[k / 32] * q[k];
    h2 += h * h, d2 += error * error;
  }
  for (int64_t k = 0; k < K; k += 16) _mm512_storeu_ps(xf + k, load16(x, r * K + k, bf16));
  const float h_norm = (float)(sqrt(h2) * (1 + 1e-6)), error_norm = (float)(sqrt(d2) * (1 + 1e-6));
  const __m512 by_gap = _mm512_set1_ps(h_norm), by_norm = _mm512_set1_ps(error_norm + 0x1p-16f * h_norm);
  const __m512 slack = _mm512_set1_ps(0x1p-10f);
  __m512 lows = _mm512_set1_ps(-INFINITY);
  for (int64_t n = 0; n < N; n += 16) {
    __m512 e = _mm512_fmadd_ps(_mm512_loadu_ps(gap + n), by_gap, _mm512_fmadd_ps(_mm512_loadu_ps(norm + n), by_norm, slack));
    lows = _mm512_max_ps(lows, _mm512_sub_ps(_mm512_loadu_ps(y + n), e));
  }
  const __m512 low = _mm512_set1_ps(_mm512_reduce_max_ps(lows));
  float best = -INFINITY;
  int64_t checked = 0;
  *id = -1;
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    __m512 e = _mm512_fmadd_ps(_mm512_loadu_ps(gap + n0), by_gap, _mm512_fmadd_ps(_mm512_loadu_ps(norm + n0), by_norm, slack));
    __mmask16 open = _mm512_cmp_ps_mask(_mm512_add_ps(_mm512_loadu_ps(y + n0), e), low, _CMP_GE_OQ);
    while (open) {
      int64_t n = n0 + __builtin_ctz(open);
      open &= open - 1;
      float value = exact_dot(exact, exact_kind, n * K, xf, K);
      checked++;
      if (*id < 0 || value > best) best = value, *id = n;  // increasing n: the lower one kept among equals
    }
  }
  if (*id >= 0) return checked;
  for (int64_t n = 0; n < N; n++) {
    float value = exact_dot(exact, exact_kind, n * K, xf, K);
    if (*id < 0 || value > best || (value != value && best == best)) best = value, *id = n;
  }
  return N;
}

// ids [M]: each row's certified greedy argmax (row_argmax) over the head with screen weights codes/dm
// (bits, N outputs) and exact weights exact [N, K] (bfloat16, float16 or float32: exact_kind 0, 1, 2);
// checked [M]: how many logits each row computed exactly. Returns 0, or -1 when scratch memory ran out.
int w4a8_argmax(const void *x, int bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dm, int bits,
                int64_t N, const void *exact, int exact_kind, const float *gap, const float *norm, int64_t *ids,
                int64_t *checked) {
  int8_t *q = malloc((size_t)(M * K) + 2 * (size_t)(M * (K / 32)) * sizeof(float) + (size_t)(M * (N + K)) * sizeof(float));
  if (q == NULL) return -1;
  float *s = (float *)(q + M * K), *sums = s + M * (K / 32), *y = sums + M * (K / 32), *xf = y + M * N;
#pragma omp parallel
  {
    w4a8_rows(x, bf16, M, K, codes, dm, bits, N, q, s, sums, 0, y);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; r++)
      checked[r] = row_argmax(x, bf16, r, K, q + r * K, s + r * (K / 32), y + r * N, N, exact, exact_kind, gap, norm, xf + r * K,
                              ids + r);
  }
  free(q);
  return 0;
}
