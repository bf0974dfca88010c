// The target's output head with bfloat16 weights, for sampling: y [M, N] = x [M, K] W^T, W [N, K].
//
// PyTorch's bfloat16 product on a CPU without bfloat16 instructions took 4.3 ms for one row of the
// default model's 49,152 x 576 head, about twice the time to read its 56 MB. Here each output is a
// float32 sum in one fixed order (16 lanes over k, then sum16's fixed tree, kernels.h), rounded to
// bfloat16 as PyTorch rounds (or kept in float32): a row's logits do not depend on the other rows, so
// a tree's nodes and a single token get the same distribution. Sixteen outputs at a time share one
// transposed reduction (sums16) and each weight is converted from bfloat16 once for up to HEAD_ROWS
// rows. K must be a multiple of 16.
#include <stdlib.h>

#include "kernels.h"

#define HEAD_ROWS 4  // rows of x per pass over a group of outputs' weights
// Outputs ahead whose weights are asked into the cache (w4a8.c says why; measured in docs/prefetch/).
#ifndef HEAD_AHEAD
#define HEAD_AHEAD 4
#endif

// Output n of rows [0, M) of xf [M, K] (float32) into y [M, N], a row at a time (exact_dot): the bits
// head_group gives, for the outputs after the last group of sixteen.
AVX512 static void head_output(const uint16_t *W, const float *xf, int64_t M, int64_t K, int64_t N, int64_t n,
                               int bf16_out, void *y) {
  for (int64_t r = 0; r < M; r++) {
    float value = exact_dot(W, 0, n * K, xf + r * K, K);
    if (bf16_out) {
      ((uint16_t *)y)[r * N + n] = to_bf16_bits(value);
    } else {
      ((float *)y)[r * N + n] = value;
    }
  }
}

// Outputs [n0, n0 + 16) of `rows` rows of xf from r0 (rows a constant where inlined): four outputs'
// sums at a time, then sums16 for all sixteen: head_output's bits.
AVX512 static inline __attribute__((always_inline)) void head_group_rows(const uint16_t *W, const float *xf, int64_t r0,
                                                                        const int rows, int64_t K, int64_t N, int64_t n0,
                                                                        int bf16_out, void *y) {
  __m512 quads[HEAD_ROWS][4];
  for (int64_t m = 0; m < 4; m++) {
    const uint16_t *w = W + (n0 + 4 * m) * K;
    if (r0 == 0)
      for (int64_t line = 0; line < 8 * K; line += 64) _mm_prefetch((const char *)(w + HEAD_AHEAD * K) + line, _MM_HINT_T0);
    __m512 acc[HEAD_ROWS][4];
    for (int r = 0; r < rows; r++)
      for (int o = 0; o < 4; o++) acc[r][o] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __m512 weights[4];
      for (int o = 0; o < 4; o++) weights[o] = load16(w, o * K + k, 1);
      for (int r = 0; r < rows; r++) {
        __m512 x = _mm512_loadu_ps(xf + (r0 + r) * K + k);
        for (int o = 0; o < 4; o++) acc[r][o] = _mm512_fmadd_ps(weights[o], x, acc[r][o]);
      }
    }
    for (int r = 0; r < rows; r++) quads[r][m] = sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
  }
  for (int r = 0; r < rows; r++) {
    __m512 sums = sums16(quads[r][0], quads[r][1], quads[r][2], quads[r][3]);
    if (bf16_out) {
      _mm256_storeu_si256((__m256i *)((uint16_t *)y + (r0 + r) * N + n0), bf16_bits16(sums));
    } else {
      _mm512_storeu_ps((float *)y + (r0 + r) * N + n0, sums);
    }
  }
}

// Outputs [n0, n0 + 16) of rows [0, M), HEAD_ROWS rows at a time.
AVX512 static void head_group(const uint16_t *W, const float *xf, int64_t M, int64_t K, int64_t N, int64_t n0,
                              int bf16_out, void *y) {
  for (int64_t r0 = 0; r0 < M; r0 += HEAD_ROWS) {
    switch (M - r0 < HEAD_ROWS ? (int)(M - r0) : HEAD_ROWS) {
#define ROWS_CASE(n)                                           \
  case n:                                                      \
    head_group_rows(W, xf, r0, n, K, N, n0, bf16_out, y); \
    break;
      ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#undef ROWS_CASE
    }
  }
}

// y [M, N] (bfloat16 when bf16_out != 0, else float32) = x [M, K] (bfloat16 when bf16_in != 0, else
// float32) times the bfloat16 weights W [N, K]. Returns 0, or -1 when scratch memory ran out.
AVX512 int bf16_head(const void *x, int bf16_in, int64_t M, int64_t K, const uint16_t *W, int64_t N, int bf16_out,
                     void *y) {
  float *xf = malloc((size_t)(M * K) * sizeof(float));
  if (xf == NULL) return -1;
  for (int64_t i = 0; i < M * K; i += 16) _mm512_storeu_ps(xf + i, load16(x, i, bf16_in));
  const int64_t groups = N / 16;
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < groups; g++) head_group(W, xf, M, K, N, 16 * g, bf16_out, y);
#pragma omp for schedule(static)
    for (int64_t n = 16 * groups; n < N; n++) head_output(W, xf, M, K, N, n, bf16_out, y);  // the last N % 16
  }
  free(xf);
  return 0;
}
