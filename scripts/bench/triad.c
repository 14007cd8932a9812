/* STREAM-like triad a[i] = b[i] + s * c[i] over arrays far larger than cache, on all
 * cores (OpenMP). Prints the best of several runs in GB/s, counting 24 bytes per element
 * as STREAM does (two reads, one write; write-allocate traffic not counted). */
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoull(argv[1], 0, 10) : (size_t)1 << 26;
    int reps = 10;
    double *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b), *c = malloc(n * sizeof *c);
    if (!a || !b || !c) { fprintf(stderr, "triad: out of memory for %zu elements\n", n); return 1; }
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { a[i] = 0; b[i] = 1; c[i] = 2; }
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t = omp_get_wtime();
        #pragma omp parallel for
        for (size_t i = 0; i < n; i++) a[i] = b[i] + 3.0 * c[i];
        t = omp_get_wtime() - t;
        if (t < best) best = t;
    }
    double check = 0;
    for (size_t i = 0; i < n; i += 4096) check += a[i];
    if (check != 7.0 * ((n + 4095) / 4096)) { fprintf(stderr, "triad: wrong result\n"); return 1; }
    printf("%.3f\n", 24.0 * n / best / 1e9);
    return 0;
}
