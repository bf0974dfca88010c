// The target's output head with bfloat16 weights, for sampling: y [M, N] = x [M, K] W^T, W [N, K].
//
// PyTorch's bfloat16 product on a CPU without bfloat16 instructions took 4.3 ms for one row of the
// default model's 49,152 x 576 head, about twice the time to read its 56 MB. Here each output is a
// float32 sum in one fixed order (16 lanes over k, then _mm512_reduce_add_ps's fixed tree), rounded
// to bfloat16 as PyTorch rounds (or kept in float32): a row's logits do not depend on the other rows,
// so a tree's nodes and a single token get the same distribution. K must be a multiple of 16.
#include <stdlib.h>

#include "kernels.h"

#define HEAD_ROWS 4  // rows of x per pass over an output's weights
// Outputs ahead whose weights are asked into the cache (w4a8.c says why; measured in docs/prefetch/).
#ifndef HEAD_AHEAD
#define HEAD_AHEAD 4
#endif

// Output n of rows [0, M) of xf [M, K] (float32) into y [M, N].
AVX512 static void head_output(const uint16_t *W, const float *xf, int64_t M, int64_t K, int64_t N, int64_t n,
                               int bf16_out, void *y) {
  const uint16_t *w = W + n * K;
  for (int64_t line = 0; line < 2 * K; line += 64) _mm_prefetch((const char *)(w + HEAD_AHEAD * K) + line, _MM_HINT_T0);
  for (int64_t r0 = 0; r0 < M; r0 += HEAD_ROWS) {
    int rows = M - r0 < HEAD_ROWS ? (int)(M - r0) : HEAD_ROWS;
    __m512 acc[HEAD_ROWS];
    for (int r = 0; r < HEAD_ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __m512 weights = load16(w, k, 1);
      for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(weights, _mm512_loadu_ps(xf + (r0 + r) * K + k), acc[r]);
    }
    for (int r = 0; r < rows; r++) {
      float value = _mm512_reduce_add_ps(acc[r]);
      if (bf16_out) {
        ((uint16_t *)y)[(r0 + r) * N + n] = to_bf16_bits(value);
      } else {
        ((float *)y)[(r0 + r) * N + n] = value;
      }
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
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) head_output(W, xf, M, K, N, n, bf16_out, y);
  free(xf);
  return 0;
}
