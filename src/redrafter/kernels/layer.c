// The decoder layers of a Llama-family model (Llama, Mistral, Qwen2) with w4a8 products, for decode
// steps and prompts' prefills, all in one call (then the final norm):
//
//   h = x + o_proj(attention(rope(qkv(norm(x)))))      (new keys and values written to the cache)
//   x = h + down_proj(silu(gate) * up),  [gate, up] = gate_up(norm(h))
//
// It computes what redrafter.lean_decoder.LeanDecoder.run computes for such a layer with the PyTorch
// operations, rounding to the activations' dtype at the same places (after every operation the
// unfused forward stores in a tensor). The only differences are in the last bit of a sum or an
// exponential: the RMSNorm's sum of squares and the SiLU's exp are ours (fixed order, vectorized).
// Every row (a token of a tree, or of a batch) runs the same instructions whatever the other rows are,
// so the layer keeps the batch invariance of the w4a8 products and of the invariant attention.
//
// Why: on a 2-core CPU, a one-token step of the default model spent about as long in PyTorch's
// per-operation overhead (14 us a w4a8 product call, 14 us a norm; 30 layers of about 20 operations)
// as in its matrix products. Here the whole step is one call and one parallel region (one call per
// layer still spent 0.58 ms a step of the decode loop outside the kernel, 9% of it).
//
// Activations float32, or bfloat16 when bf16 != 0 (x, the norms' weights, biases, rotary tables, mask
// and cache all in that dtype). Shapes: x [B Q, d] (updated in place); cache [B, KV, capacity, hd],
// the new entries written at [length, length + Q); mask additive [B or 1, 1, Q, length + Q] with
// strides mask_sb (0 broadcasts) and mask_si, keys contiguous; cos, sin [B Q, hd] (sin's first half
// negated, as LeanDecoder.make_tables keeps it).
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"


typedef struct {
  Product qkv, o_proj, gate_up, down_proj;
  const void *input_norm, *post_norm;  // [d]
  float eps, scale;
  int64_t heads, kv_heads, head_dim, intermediate;
} Layer;

// out [d] = weight * rms_norm(x row r): normalized in float32 and rounded, then scaled and rounded.
AVX512 static void rms_norm_row(const void *x, int64_t r, int64_t d, const void *weight, float eps, int bf16,
                                float *out) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    __m512 v = load16(x, r * d + j, bf16);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)d + eps));
  for (int64_t j = 0; j < d; j += 16) {
    __m512 normalized = round16(_mm512_mul_ps(load16(x, r * d + j, bf16), inverse), bf16);
    _mm512_storeu_ps(out + j, round16(_mm512_mul_ps(load16(weight, j, bf16), normalized), bf16));
  }
}

// x row r += update row r (d values), rounded.
AVX512 static void add_row(void *x, int64_t r, int64_t d, const float *update, int bf16) {
  for (int64_t j = 0; j < d; j += 16)
    store16(x, r * d + j, _mm512_add_ps(load16(x, r * d + j, bf16), _mm512_loadu_ps(update + j)), bf16);
}

// out [I] = silu(gate) * up of one row of [gate, up] (2 I values), each rounded.
AVX512 static void glu_row(const float *gate_up, int64_t I, int bf16, float *out) {
  for (int64_t j = 0; j < I; j += 16) {
    __m512 silu = round16(silu16(_mm512_loadu_ps(gate_up + j)), bf16);
    _mm512_storeu_ps(out + j, round16(_mm512_mul_ps(silu, _mm512_loadu_ps(gate_up + I + j)), bf16));
  }
}

// Row m = b Q + i of qkv [M, (H + 2 KV) hd]: queries rotated into queries [B, H, Q, hd], keys rotated
// and values into the cache at length + i.
AVX512 static void rope_row(const Layer *L, const float *qkv, int64_t m, int64_t Q, const void *cos, const void *sin,
                            int bf16, void *queries, void *k_cache, void *v_cache, int64_t capacity, int64_t length) {
  const int64_t H = L->heads, KV = L->kv_heads, hd = L->head_dim, half = hd / 2, b = m / Q, i = m % Q;
  const float *row = qkv + m * (H + 2 * KV) * hd;
  for (int64_t h = 0; h < H + 2 * KV; h++) {
    const float *head = row + h * hd;
    void *target;
    int64_t at;
    if (h < H) {
      target = queries, at = ((b * H + h) * Q + i) * hd;
    } else {
      int64_t kv = h < H + KV ? h - H : h - H - KV;
      target = h < H + KV ? k_cache : v_cache, at = ((b * KV + kv) * capacity + length + i) * hd;
    }
    for (int64_t j = 0; j < hd; j += 16) {
      __m512 x = _mm512_loadu_ps(head + j);
      if (h < H + KV) {  // x cos + roll(x, hd / 2) sin, each product rounded, then the sum
        __m512 partner = _mm512_loadu_ps(head + (j + half) % hd);
        __m512 straight = round16(_mm512_mul_ps(x, load16(cos, m * hd + j, bf16)), bf16);
        __m512 rolled = round16(_mm512_mul_ps(partner, load16(sin, m * hd + j, bf16)), bf16);
        x = _mm512_add_ps(straight, rolled);
      }
      store16(target, at + j, x, bf16);
    }
  }
}

// out [n] = values [n] rounded.
AVX512 static void round_row(const float *values, int64_t n, int bf16, float *out) {
  for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(out + j, round16(_mm512_loadu_ps(values + j), bf16));
}

// Scratch of one layer step over M = B Q rows with `keys` keys (the same for every layer of a model).
typedef struct {
  float *act, *out;   // a product's input [M, inputs] and output [M, outputs]
  float *s, *sums;    // its activations' scales and code sums [M, inputs / 32]
  float *queries;     // [B, H, Q, hd]
  char *attention;    // per thread, for the attention task it runs: scores, kept keys, the output row
  size_t task_bytes;  // the bytes of one thread's
  int8_t *q;          // the quantized activations [M, inputs]
} Scratch;

// One layer (see the top of the file) on x, inside a parallel region: its loops are shared.
VNNI static void layer_step(const Layer *L, int bf16, void *x, int64_t B, int64_t Q, void *k_cache, void *v_cache,
                            int64_t capacity, int64_t length, const void *mask, int64_t mask_sb, int64_t mask_si,
                            const void *cos, const void *sin, const Scratch *w) {
  const int64_t M = B * Q, d = L->qkv.in_features, H = L->heads, KV = L->kv_heads, hd = L->head_dim;
  const int64_t I = L->intermediate, keys = length + Q, tasks = B * KV * Q, groups = H / KV;
  const size_t size = bf16 ? 2 : 4;
  float *act = w->act, *out = w->out;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < M; r++) rms_norm_row(x, r, d, L->input_norm, L->eps, bf16, act + r * d);
  w4a8_product(&L->qkv, act, M, bf16, w->q, w->s, w->sums, out);
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; m++) rope_row(L, out, m, Q, cos, sin, bf16, w->queries, k_cache, v_cache, capacity, length);
  // A prefill deals its tasks out one at a time: a later token has more keys, and contiguous shares gave
  // one thread the dearer ones. A decode step's tasks (a few tokens after the same keys) stay in
  // contiguous shares, so that fewer threads read each key/value head (docs/confidence/: the same bits).
  const int64_t share = Q >= 32 ? 1 : (tasks + omp_get_num_threads() - 1) / omp_get_num_threads();
#pragma omp for schedule(static, share)
  for (int64_t task = 0; task < tasks; task++) {  // the query heads of one key/value head at one token
    int64_t b = task / (KV * Q), kv = (task / Q) % KV, i = task % Q, h = kv * groups;
    float *scores = (float *)(w->attention + omp_get_thread_num() * w->task_bytes), *rows = scores + 9 * keys;
    attention_group((const char *)w->queries + ((b * H + h) * Q + i) * hd * size, Q * hd, groups,
                    (const char *)k_cache + (b * KV + kv) * capacity * hd * size,
                    (const char *)v_cache + (b * KV + kv) * capacity * hd * size,
                    (const char *)mask + (b * mask_sb + i * mask_si) * size, bf16, keys, hd, hd, hd, L->scale, scores,
                    (int32_t *)(scores + 8 * keys), rows);
    round_row(rows, groups * hd, bf16, act + (b * Q + i) * H * hd + h * hd);  // attention output [M, H hd]
  }
  w4a8_product(&L->o_proj, act, M, bf16, w->q, w->s, w->sums, out);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < M; r++) {
    add_row(x, r, d, out + r * d, bf16);
    rms_norm_row(x, r, d, L->post_norm, L->eps, bf16, act + r * d);
  }
  w4a8_product(&L->gate_up, act, M, bf16, w->q, w->s, w->sums, out);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < M; r++) glu_row(out + r * 2 * I, I, bf16, act + r * I);
  w4a8_product(&L->down_proj, act, M, bf16, w->q, w->s, w->sums, out);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < M; r++) add_row(x, r, d, out + r * d, bf16);
}

// A decode step through `count` layers (see the top of the file) in one call and one parallel region:
// x [B Q, d] goes through layers[0 .. count), layer l with its cache k_caches[l], v_caches[l] (all of
// `capacity` entries, `length` of them filled) and additive mask masks[l] (one per layer type; all with
// strides mask_sb and mask_si); after layer l, x is copied to captures[l] where that is not NULL; out
// [B Q, d] = final_norm * rms_norm(x), rounded as the unfused forward rounds. Returns 0, or -1 when
// scratch memory ran out.
VNNI int fused_layers(const Layer *layers, int64_t count, int bf16, void *x, int64_t B, int64_t Q, void *const *k_caches,
                 void *const *v_caches, int64_t capacity, int64_t length, const void *const *masks, int64_t mask_sb,
                 int64_t mask_si, const void *cos, const void *sin, void *const *captures, const void *final_norm,
                 void *out) {
  const Layer *L = layers;
  const int64_t M = B * Q, d = L->qkv.in_features, H = L->heads, hd = L->head_dim, I = L->intermediate;
  const int64_t keys = length + Q, groups = H / L->kv_heads;
  int64_t inputs = d > H * hd ? d : H * hd, outputs = L->qkv.out_features;
  inputs = inputs > I ? inputs : I;
  outputs = outputs > 2 * I ? outputs : 2 * I;
  outputs = outputs > d ? outputs : d;
  Scratch w;
  w.task_bytes = (size_t)(keys * 9 * 4 + groups * hd * 4);  // 8 heads' scores, kept keys, outputs
  const int64_t threads = omp_get_max_threads();  // attention scratch per thread, not per task (a prefill has many)
  const size_t bytes = (size_t)(M * inputs) * (4 + 1) + 2 * (size_t)(M * inputs / 32) * 4 + (size_t)(M * outputs) * 4 +
                       (size_t)(M * H * hd) * 4 + (size_t)threads * w.task_bytes + (size_t)(M * d) * 4;
  char *scratch = malloc(bytes);
  if (scratch == NULL) return -1;
  w.act = (float *)scratch;
  w.out = w.act + M * inputs;
  w.s = w.out + M * outputs, w.sums = w.s + M * inputs / 32;
  w.queries = w.sums + M * inputs / 32;
  w.attention = (char *)(w.queries + M * H * hd);
  float *normalized = (float *)(w.attention + threads * w.task_bytes);  // [M, d]: the final norm's rows
  w.q = (int8_t *)(normalized + M * d);
  const size_t row_bytes = (size_t)d * (bf16 ? 2 : 4);
#pragma omp parallel
  {
    for (int64_t l = 0; l < count; l++) {
      layer_step(layers + l, bf16, x, B, Q, k_caches[l], v_caches[l], capacity, length, masks[l], mask_sb, mask_si,
                 cos, sin, &w);
      if (captures[l] != NULL) {
#pragma omp single
        memcpy(captures[l], x, (size_t)M * row_bytes);
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; r++) {
      rms_norm_row(x, r, d, final_norm, L->eps, bf16, normalized + r * d);
      for (int64_t j = 0; j < d; j += 16) store16(out, r * d + j, _mm512_loadu_ps(normalized + r * d + j), bf16);
    }
  }
  free(scratch);
  return 0;
}

// Keep, in each of the `count` cache buffers [B, H, capacity, D] (entries of `bytes` bytes), the entry at
// start + source[b, i] at start + i, for i < n: a step's accepted path moved next to the context, in
// all layers at once. A path's slots increase (ancestors are packed before their descendants), so moving
// them in order overwrites no entry still to be read; a row's padding repeats its last slot. Returns 0.
int kv_keep(void *const *buffers, int64_t count, int64_t B, int64_t H, int64_t capacity, int64_t D, int64_t bytes,
             int64_t start, const int64_t *source, int64_t n) {
  const size_t entry = (size_t)(D * bytes);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t c = 0; c < count; c++)
    for (int64_t bh = 0; bh < B * H; bh++) {
      char *base = (char *)buffers[c] + (size_t)(bh * capacity + start) * entry;
      const int64_t *path = source + (bh / H) * n;
      for (int64_t i = 0; i < n; i++)
        if (path[i] != i) memmove(base + (size_t)i * entry, base + (size_t)path[i] * entry, entry);
    }
  return 0;
}
