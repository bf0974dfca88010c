// Attention whose result for a query does not depend on the other queries, for AVX-512 CPUs.
//
//   out[b, h, i] = sum_k p_k v[b, h, k],  p = softmax_k(scale q[b, h, i] . k[b, h, k] + mask[b, i, k])
//
// over the keys whose mask is above -1e30; the others get weight exactly 0 and are never touched. For
// each query the kept keys are gathered in index order, and everything after (the scores, their
// exponentials and sum, the weighted sum of values) runs over that list in one fixed order. So a
// query's output depends only on its own kept keys in their order, not on how many queries share the
// call, how many keys are cached behind a mask, or where masked keys sit between kept ones: a token in
// a tree and the same token alone after its accepted ancestors get the same bits. (PyTorch's SDPA
// blocks its sums by the shapes of the call, so there the two differ by rounding.)
//
// attention_group runs the query heads that share a key/value head (and a mask row) together, with the
// same arithmetic per query: each key and value is loaded once for all of them (layer.c's steps and
// prefills; a tree step's context is read from memory once per key/value head and token instead of once
// per head). invariant_attention runs it one head at a time.
//
// q, k, v, mask: float32, or bfloat16 when bf16 != 0; the head dimension D (a multiple of 16, at most
// 256) contiguous, the others strided (strides in elements; a stride of 0 broadcasts). out: contiguous
// [B, H, Q, D] in the same dtype.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

// G queries (the query heads of one key/value head, at one token: one mask row) at q, q + q_sg, ...,
// each over its kept keys as the top of the file says, with each key and value loaded once for all of
// them. A query's score for a key is sum16 of its dot product's lanes, times scale plus the key's bias
// (one rounding); runs of sixteen kept keys get theirs sixteen at a time (sums16), the same bits. G and
// lanes (D / 16) are constants where inlined, so the loops over them unroll.
AVX512 static inline __attribute__((always_inline)) void group_queries(
    const void *q, int64_t q_sg, const int64_t G, const void *k, const void *v, const void *mask, int bf16, int64_t K,
    const int64_t lanes, int64_t k_sk, int64_t v_sk, float scale, float *scores, int32_t *kept, float *out) {
  __m512 query[8][16], acc[8][16], tops[8];
  float top[8];
  for (int64_t g = 0; g < G; g++) {
    top[g] = MASKED;
    tops[g] = _mm512_set1_ps(MASKED);
    for (int64_t j = 0; j < lanes; j++) query[g][j] = load16(q, g * q_sg + 16 * j, bf16);
  }
  const __m512 scales = _mm512_set1_ps(scale);
  const __m512i order = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  for (int64_t block = 0; block < K; block += 16) {
    if (block + 16 <= K) {
      __m512 biases = load16(mask, block, bf16);
      __mmask16 live = _mm512_cmp_ps_mask(biases, _mm512_set1_ps(MASKED), _CMP_GT_OQ);
      if (live == 0) continue;
      if (live == 0xFFFF) {  // sixteen kept keys in a row
        __m512 quads[8][4];
        for (int64_t m = 0; m < 4; m++) {
          __m512 dot[8][4];
          for (int64_t r = 0; r < 4; r++) {
            __m512 row[16];
            for (int64_t j = 0; j < lanes; j++) row[j] = load16(k, (block + 4 * m + r) * k_sk + 16 * j, bf16);
            for (int64_t g = 0; g < G; g++) {
              dot[g][r] = _mm512_setzero_ps();
              for (int64_t j = 0; j < lanes; j++) dot[g][r] = _mm512_fmadd_ps(query[g][j], row[j], dot[g][r]);
            }
          }
          for (int64_t g = 0; g < G; g++) quads[g][m] = sums4(dot[g][0], dot[g][1], dot[g][2], dot[g][3]);
        }
        for (int64_t g = 0; g < G; g++) {
          __m512 block_scores = _mm512_fmadd_ps(sums16(quads[g][0], quads[g][1], quads[g][2], quads[g][3]), scales, biases);
          _mm512_storeu_ps(scores + g * K + count, block_scores);
          tops[g] = _mm512_mask_mov_ps(tops[g], _mm512_cmp_ps_mask(block_scores, tops[g], _CMP_GT_OQ), block_scores);
        }
        _mm512_storeu_si512(kept + count, _mm512_add_epi32(order, _mm512_set1_epi32((int32_t)block)));
        count += 16;
        continue;
      }
    }
    const int64_t end = block + 16 < K ? block + 16 : K;
    for (int64_t key = block; key < end; key++) {  // one key at a time
      float bias = load1(mask, key, bf16);
      if (!(bias > MASKED)) continue;
      __m512 row[16];
      for (int64_t j = 0; j < lanes; j++) row[j] = load16(k, key * k_sk + 16 * j, bf16);
      for (int64_t g = 0; g < G; g++) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = 0; j < lanes; j++) dot = _mm512_fmadd_ps(query[g][j], row[j], dot);
        float score = fmaf(sum16(dot), scale, bias);
        scores[g * K + count] = score;
        top[g] = score > top[g] ? score : top[g];
      }
      kept[count++] = (int32_t)key;
    }
  }
  if (count == 0) {  // no key to attend to (a padding row): zeros
    memset(out, 0, (size_t)(G * 16 * lanes) * sizeof(float));
    return;
  }
  __m512 inverse[8];
  for (int64_t g = 0; g < G; g++) {
    float *weights = scores + g * K;
    const float block_top = _mm512_reduce_max_ps(tops[g]);  // the scores' maximum does not depend on their order
    const __m512 most = _mm512_set1_ps(block_top > top[g] ? block_top : top[g]);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < count; t += 16) {
      __mmask16 live = count - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - t)) - 1);
      __m512 shifted = _mm512_sub_ps(_mm512_maskz_loadu_ps(live, weights + t), most);
      __m512 exps = _mm512_maskz_mov_ps(live, exp_nonpositive(shifted));
      _mm512_mask_storeu_ps(weights + t, live, exps);
      total = _mm512_add_ps(total, exps);
    }
    inverse[g] = _mm512_set1_ps(1.0f / sum16(total));
    for (int64_t j = 0; j < lanes; j++) acc[g][j] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < count; t++) {
    __m512 row[16];
    for (int64_t j = 0; j < lanes; j++) row[j] = load16(v, kept[t] * v_sk + 16 * j, bf16);
    for (int64_t g = 0; g < G; g++) {
      __m512 weight = _mm512_set1_ps(scores[g * K + t]);
      for (int64_t j = 0; j < lanes; j++) acc[g][j] = _mm512_fmadd_ps(weight, row[j], acc[g][j]);
    }
  }
  for (int64_t g = 0; g < G; g++)
    for (int64_t j = 0; j < lanes; j++) _mm512_storeu_ps(out + (g * lanes + j) * 16, _mm512_mul_ps(acc[g][j], inverse[g]));
}

AVX512 void attention_group(const void *q, int64_t q_sg, int64_t G, const void *k, const void *v, const void *mask,
                            int bf16, int64_t K, int64_t D, int64_t k_sk, int64_t v_sk, float scale, float *scores,
                            int32_t *kept, float *out) {
  const int64_t size = bf16 ? 2 : 4;
  for (int64_t first = 0; first < G; first += 8) {  // at most 8 heads at a time
    const int64_t n = G - first < 8 ? G - first : 8;
    const void *heads = (const char *)q + first * q_sg * size;
    float *rows = out + first * D;
    if (n == 1 && D == 64) {
      group_queries(heads, q_sg, 1, k, v, mask, bf16, K, 4, k_sk, v_sk, scale, scores, kept, rows);
    } else if (n == 3 && D == 64) {
      group_queries(heads, q_sg, 3, k, v, mask, bf16, K, 4, k_sk, v_sk, scale, scores, kept, rows);
    } else if (n == 4 && D == 64) {
      group_queries(heads, q_sg, 4, k, v, mask, bf16, K, 4, k_sk, v_sk, scale, scores, kept, rows);
    } else if (D == 128) {
      group_queries(heads, q_sg, n, k, v, mask, bf16, K, 8, k_sk, v_sk, scale, scores, kept, rows);
    } else {
      group_queries(heads, q_sg, n, k, v, mask, bf16, K, D / 16, k_sk, v_sk, scale, scores, kept, rows);
    }
  }
}

int invariant_attention(const void *q, const void *k, const void *v, const void *mask, int bf16, int64_t B,
                        int64_t H, int64_t Q, int64_t K, int64_t D, int64_t q_sb, int64_t q_sh, int64_t q_si,
                        int64_t k_sb, int64_t k_sh, int64_t k_sk, int64_t v_sb, int64_t v_sh, int64_t v_sk,
                        int64_t m_sb, int64_t m_si, float scale, void *out) {
  if (D % 16 || D > 256) return -2;
  const int64_t tasks = B * H * Q, size = bf16 ? 2 : 4;
  char *scratch = malloc((size_t)tasks * (size_t)(K * 8 + D * 4));
  if (scratch == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; task++) {
    int64_t b = task / (H * Q), h = (task / Q) % H, i = task % Q;
    float *scores = (float *)(scratch + task * (K * 8 + D * 4));
    int32_t *kept = (int32_t *)(scores + K);
    float *row = (float *)(kept + K);
    attention_group((const char *)q + (b * q_sb + h * q_sh + i * q_si) * size, 0, 1,
                    (const char *)k + (b * k_sb + h * k_sh) * size, (const char *)v + (b * v_sb + h * v_sh) * size,
                    (const char *)mask + (b * m_sb + i * m_si) * size, bf16, K, D, k_sk, v_sk, scale, scores, kept, row);
    if (bf16) {
      uint16_t *target = (uint16_t *)out + task * D;
      for (int64_t j = 0; j < D; j++) target[j] = to_bf16_bits(row[j]);
    } else {
      memcpy((float *)out + task * D, row, (size_t)D * sizeof(float));
    }
  }
  free(scratch);
  return 0;
}
