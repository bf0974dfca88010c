// A standalone timing of w4a8_matmul (4-bit codes, 12,288 x 576, M rows, best of 5 x 200 calls), to
// compare two builds of kernels/w4a8.c side by side:
//   gcc -O3 -fopenmp -Isrc/redrafter/kernels docs/tried-32/w4a8_bench.c src/redrafter/kernels/w4a8.c -o w4a8_bench -lm
//   OMP_NUM_THREADS=2 ./w4a8_bench 8
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <omp.h>
int w4a8_matmul(const void *x, int bf16, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dm, int bits, int64_t N, void *y);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char **argv) {
  int64_t M = atoi(argv[1]), K = 576, N = 3072 * 4;  // 4 gate_up-sized products' worth of weights (7 MB of codes)
  int bits = 4;
  uint8_t *codes = malloc(N * K / 2);
  uint16_t *dm = malloc((N / 16) * (K / 32) * 32 * 2);
  float *x = malloc(M * K * 4), *y = malloc(M * N * 4);
  for (int64_t i = 0; i < N * K / 2; i++) codes[i] = rand();
  for (int64_t i = 0; i < (N / 16) * (K / 32) * 32; i++) dm[i] = 0x2000 + (rand() & 0xff);
  for (int64_t i = 0; i < M * K; i++) x[i] = (rand() % 2001 - 1000) / 500.0f;
  int reps = 200;
  double best = 1e9;
  for (int t = 0; t < 5; t++) {
    double s = now();
    for (int r = 0; r < reps; r++) w4a8_matmul(x, 0, M, K, codes, dm, bits, N, y);
    double dt = (now() - s) / reps;
    if (dt < best) best = dt;
  }
  printf("M=%ld: %.3f ms, %.1f GMAC/s\n", (long)M, best * 1e3, (double)M * N * K / best / 1e9);
  return 0;
}
