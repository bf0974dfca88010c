// The recurrent drafter's first draft step for B rows, all in one call: its most probable next token
// and that token's probability, which a confidence tree prices its guess by (redrafter.guess).
//
//   s = silu(W e + b)                 (the reference cell; TensorRT-LLM's: s = W e; without an RNN: s = e)
//   x = [h, s],  x = P x + p          (the input projection, where the drafter has one)
//   x = x + silu(A_i x + a_i)         (each residual block)
//   z = H x;  logits = R z            (a tied head: H to the target's hidden size, R the draft
//                                      vocabulary's output embedding rows; untied: logits = H x)
//   token = argmax logits (the lower id among equals),  probability = 1 / sum exp(logits - max)
//
// e is the target's embedding of the last token and h its hidden state before it, as the drafter's
// beam search starts (redrafter.drafter.RecurrentDrafter.rnn_step, head). Every product is w4a8
// (w4a8.c), the rest float32 throughout: the PyTorch drafter in float32 with the same w4a8 layers
// computes the same up to the order of a sum or an exponential (tests/test_guess.py). A drafter step
// through PyTorch is a dozen operations of about 15 us of dispatch each on this project's 2-core CPU,
// more than its 10 million multiply-adds take here.
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

typedef struct {
  Product rnn_w;           // codes NULL without an RNN
  const float *rnn_bias;   // [d] (the first step's U s_0 + b = b), or NULL
  int64_t cell;            // 0: silu(W e + b), 1: W e (TensorRT-LLM's first step), 2: e (no RNN)
  Product input_proj;      // codes NULL without one
  const Product *blocks;   // [num_blocks]
  int64_t num_blocks;
  Product head;            // lm_head's last layer: to d (tied) or to the draft vocabulary
  Product vocab;           // a tied head's rows [K, d], or codes NULL
} Drafter;

// y row r = silu(y row r + bias) over n values (bias float32 or NULL).
AVX512 static void silu_row(float *y, const float *bias, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    __m512 v = _mm512_loadu_ps(y + j);
    if (bias != NULL) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    _mm512_storeu_ps(y + j, silu16(v));
  }
}

// The index of the largest of logits [K] (the lower among equals) and 1 / sum exp(logits - largest).
AVX512 static void top_row(const float *logits, int64_t K, int64_t *token, float *probability) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t k = 0; k < K; k += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(logits + k));
  const float largest = _mm512_reduce_max_ps(best);
  int64_t at = -1;
  __m512 total = _mm512_setzero_ps(), top = _mm512_set1_ps(largest);
  for (int64_t k = 0; k < K; k += 16) {
    __m512 v = _mm512_loadu_ps(logits + k);
    if (at < 0) {
      __mmask16 hit = _mm512_cmp_ps_mask(v, top, _CMP_EQ_OQ);
      if (hit) at = k + __builtin_ctz(hit);
    }
    total = _mm512_add_ps(total, exp_nonpositive(_mm512_sub_ps(v, top)));
  }
  if (at < 0) {  // no logit equals the largest: NaN logits (a broken drafter); no guess worth a node
    *token = 0, *probability = 0.0f;
    return;
  }
  *token = at;
  *probability = 1.0f / _mm512_reduce_add_ps(total);
}

// The first draft step (top of the file) for B rows: row r's hidden state at hidden + r * hidden_stride
// and its last token's embedding, row ids[r] of the table embeddings [*, d] (float32, or both bfloat16
// when bf16 != 0); tokens [B] out (the draft vocabulary's ids mapped through vocab [K]) and probabilities
// [B]. Every width a multiple of 32, the draft vocabulary of 16. Returns 0, or -1 when scratch memory
// ran out.
VNNI int drafter_guess(const Drafter *D, const void *hidden, int64_t hidden_stride, const void *embeddings,
                       const int64_t *ids, int bf16, int64_t B, const int64_t *vocab, int64_t *tokens,
                       float *probabilities) {
  const int64_t width = D->input_proj.codes != NULL ? D->input_proj.in_features : D->head.in_features;
  const int64_t hidden_size = width / 2, exit_dim = D->head.in_features;
  const int64_t K = D->vocab.codes != NULL ? D->vocab.out_features : D->head.out_features;
  int64_t widest = width > exit_dim ? width : exit_dim;
  widest = widest > K ? widest : K;
  const size_t bytes = (size_t)(B * widest) * 4 * 3 + 2 * (size_t)(B * (widest / 32)) * 4 + (size_t)(B * widest);
  char *scratch = malloc(bytes);
  if (scratch == NULL) return -1;
  float *x = (float *)scratch, *y = x + B * widest, *z = y + B * widest;
  float *s = z + B * widest, *sums = s + B * (widest / 32);
  int8_t *q = (int8_t *)(sums + B * (widest / 32));
#pragma omp parallel
  {
    // x = [h, e] first: the cell reads e from x's second half.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; r++)
      for (int64_t j = 0; j < hidden_size; j += 16) {
        _mm512_storeu_ps(x + r * width + j, load16(hidden, r * hidden_stride + j, bf16));
        _mm512_storeu_ps(z + r * hidden_size + j, load16(embeddings, ids[r] * hidden_size + j, bf16));
      }
    if (D->cell != 2) {  // s = W e (+ b, silu): into x's second half
      w4a8_product(&D->rnn_w, z, B, 0, q, s, sums, y);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B; r++) {
        if (D->cell == 0) silu_row(y + r * hidden_size, D->rnn_bias, hidden_size);
        memcpy(x + r * width + hidden_size, y + r * hidden_size, (size_t)hidden_size * 4);
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B; r++) memcpy(x + r * width + hidden_size, z + r * hidden_size, (size_t)hidden_size * 4);
    }
    if (D->input_proj.codes != NULL) {
      w4a8_product(&D->input_proj, x, B, 0, q, s, sums, y);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B; r++) memcpy(x + r * exit_dim, y + r * exit_dim, (size_t)exit_dim * 4);
    }
    for (int64_t i = 0; i < D->num_blocks; i++) {
      w4a8_product(&D->blocks[i], x, B, 0, q, s, sums, y);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B; r++) {
        silu_row(y + r * exit_dim, NULL, exit_dim);
        for (int64_t j = 0; j < exit_dim; j += 16)
          _mm512_storeu_ps(x + r * exit_dim + j,
                           _mm512_add_ps(_mm512_loadu_ps(x + r * exit_dim + j), _mm512_loadu_ps(y + r * exit_dim + j)));
      }
    }
    float *logits = y;
    if (D->vocab.codes != NULL) {
      w4a8_product(&D->head, x, B, 0, q, s, sums, z);
      w4a8_product(&D->vocab, z, B, 0, q, s, sums, y);
    } else {
      w4a8_product(&D->head, x, B, 0, q, s, sums, y);
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; r++) {
      top_row(logits + r * K, K, tokens + r, probabilities + r);
      tokens[r] = vocab[tokens[r]];
    }
  }
  free(scratch);
  return 0;
}
