/* Block-wise quantization kernels for the CPU, compiled on first use by native.py.
 *
 * Why C: torch.compile'd Python emulates every table lookup through a scratch buffer and
 * needs two memory passes (scales, then codes); these loops compute a block's scale while
 * its 64..4096 values are still in L1, and gcc vectorises the lookup (one AVX2 gather per
 * element) or, for codebooks of at most 16 codes, replaces it by 15 compares.
 *
 * Every step is the same IEEE float32 operation, in the same order, as the reference torch
 * code in torch_ops.py (absmax, rounding of the scale to its storage format, one division,
 * clamp, nearest-code search with ties down, code * scale [+ mean]); it is compiled with
 * -ffp-contract=off so no multiply-add is fused. Results are bit-identical to the torch path
 * (tested). Rows [r0, r1) of a row-major [rows, B] block matrix are processed, so callers
 * split the rows over threads. `mean` may be NULL (no centering).
 *
 * Scale formats: 0 fp32, 1 fp16, 2 bf16, 3 e8m0 (power of two rounded up).
 */
#include <stdint.h>

#define ONE_BITS 0x3f800000u

static inline uint32_t f2u(float v) { union { float f; uint32_t u; } c; c.f = v; return c.u; }
static inline float u2f(uint32_t u) { union { float f; uint32_t u; } c; c.u = u; return c.f; }

/* Round a non-negative absmax (or a mean) to what the scale format stores, as torch does. */
static inline float to_format(float v, int fmt) {
  uint32_t u = f2u(v);
  switch (fmt) {
  case 1:
    return (float)(_Float16)v; /* IEEE round to nearest even, overflow to inf */
  case 2:
    if ((u & 0x7fffffffu) > 0x7f800000u) return v; /* NaN stays NaN */
    return u2f((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
  case 3:
    if ((u & 0x7fffffffu) > 0x7f800000u) return v;
    return u2f(((u & 0x7fffffffu) + 0x007fffffu) & 0x7f800000u);
  default:
    return v;
  }
}

/* max |p[j] - mu| via the bit patterns: for non-NaN floats |v| orders as its bits, and a NaN
 * (bits above inf) wins the maximum, so it propagates like torch.amax. */
static inline float row_absmax(const float *restrict p, float mu, int64_t B, int centred) {
  uint32_t m = 0;
  if (centred) {
    for (int64_t j = 0; j < B; j++) { uint32_t a = f2u(p[j] - mu) & 0x7fffffffu; m = a > m ? a : m; }
  } else {
    for (int64_t j = 0; j < B; j++) { uint32_t a = f2u(p[j]) & 0x7fffffffu; m = a > m ? a : m; }
  }
  return u2f(m);
}

/* Order-preserving integer key of a float (-0.0 and +0.0 share key 0, as they compare equal). */
static inline int32_t key_of(uint32_t sign, uint32_t mag) { return sign ? -(int32_t)mag : (int32_t)mag; }

/* |y| clamped to 1 (a NaN becomes 1; its block has a NaN scale, which the caller rejects). */
static inline uint32_t clamped_mag(uint32_t u) {
  uint32_t a = u & 0x7fffffffu;
  return a < ONE_BITS ? a : ONE_BITS;
}

/* Nearest-code index of normalised y: a lookup table over the bit pattern of |y| plus one
 * compare (see torch_ops.py), or for <= 16 codes (`small`) the count of threshold keys below y.
 * packed[idx] = (c << 17) | (cut + 1) holds the bucket's candidate code c and where, in the
 * low `shift` bits u of |y| (of ~|y| on the negative side), the one threshold that can fall
 * in the bucket cuts it (torch_ops._packed): the code is c + (u > cut), a single gather. */
static inline __attribute__((always_inline)) int32_t
nearest(float y, int small, const int32_t *restrict k16, const int32_t *restrict packed,
        int shift, int32_t nbins) {
  uint32_t u = f2u(y), a = clamped_mag(u), sgn = u >> 31;
  if (small) {
    int32_t ky = key_of(sgn, a);
    int32_t c = 0;
    for (int i = 0; i < 15; i++) c += ky > k16[i];
    return c;
  }
  int32_t neg = (int32_t)(sgn & (a != 0)); /* y < 0 as a float compare: -0.0 is not negative */
  int32_t b = (int32_t)(a >> shift);
  int32_t e = packed[nbins + b - ((2 * b + 1) & -neg)];
  int32_t low = (int32_t)((a ^ (uint32_t)-neg) & ((1u << shift) - 1u));
  return (e >> 17) + (low >= (e & 0x1ffff));
}

#define CHUNK 64

/* One block row: its stored scale, then codes (or, when `fake`, dequantized values). The
 * flags are compile-time constants at every call site, so each combination is its own
 * branch-free, vectorised loop. */
static inline __attribute__((always_inline)) float
row(const float *restrict p, const float *restrict mean, int64_t r, int64_t B, int fmt,
    int small, int centred, int fake, const int32_t *restrict k16,
    const int32_t *restrict packed, int shift, int32_t nbins,
    const float *restrict code, uint8_t *restrict q, float *restrict o) {
  const float mu = centred ? mean[r] : 0.0f;
  const float scale = to_format(row_absmax(p, mu, B, centred), fmt);
  const float s = scale > 0 ? scale : 1.0f;
  if (!fake) {
    /* Codes go through an int32 buffer, then narrow to uint8 in a second loop: written
     * straight to uint8, gcc narrows each of the 15 compare results of the <= 16-code search
     * to bytes before adding them, and quantizing took ~1.4x as long. */
    for (int64_t j0 = 0; j0 < B; j0 += CHUNK) {
      const int64_t n = B - j0 < CHUNK ? B - j0 : CHUNK;
      int32_t c[CHUNK];
      for (int64_t j = 0; j < n; j++) {
        const float v = centred ? p[j0 + j] - mu : p[j0 + j];
        c[j] = nearest(v / s, small, k16, packed, shift, nbins);
      }
      for (int64_t j = 0; j < n; j++) q[j0 + j] = (uint8_t)c[j];
    }
    return scale;
  }
  for (int64_t j = 0; j < B; j++) {
    const float v = centred ? p[j] - mu : p[j];
    const float d = code[nearest(v / s, small, k16, packed, shift, nbins)] * scale;
    o[j] = centred ? d + mu : d;
  }
  return scale;
}

#define ROWS(SMALL, CENTRED, FAKE)                                                          \
  for (int64_t r = r0; r < r1; r++)                                                         \
    scale_out[r] = row(x + r * B, mean, r, B, fmt, SMALL, CENTRED, FAKE, k16, packed,       \
                       shift, nbins, code, FAKE ? 0 : codes + r * B, FAKE ? out + r * B : 0)

#define DISPATCH(FAKE)                                                                      \
  int32_t k16[15] = {0};                                                                    \
  if (tkeys16)                                                                              \
    for (int i = 0; i < 15; i++) k16[i] = tkeys16[i];                                       \
  if (tkeys16 && mean) ROWS(1, 1, FAKE);                                                    \
  else if (tkeys16) ROWS(1, 0, FAKE);                                                       \
  else if (mean) ROWS(0, 1, FAKE);                                                          \
  else ROWS(0, 0, FAKE)

/* Codes (uint8) and stored scales of rows [r0, r1). tkeys16: 15 threshold keys when the
 * codebook has at most 16 codes (padded with INT32_MAX), else NULL. */
void kbit_quantize(const float *restrict x, const float *restrict mean, int64_t r0, int64_t r1,
                   int64_t B, int fmt, const int32_t *restrict packed, int shift, int32_t nbins,
                   const int32_t *restrict tkeys16,
                   float *restrict scale_out, uint8_t *restrict codes) {
  const float *code = 0;
  float *out = 0;
  DISPATCH(0);
}

/* Quantize and dequantize rows [r0, r1) in one pass: out = code[nearest] * scale (+ mean). */
void kbit_fake(const float *restrict x, const float *restrict mean, int64_t r0, int64_t r1,
               int64_t B, int fmt, const int32_t *restrict packed, int shift, int32_t nbins,
               const int32_t *restrict tkeys16,
               const float *restrict code, float *restrict scale_out, float *restrict out) {
  uint8_t *codes = 0;
  DISPATCH(1);
}

#if defined(__AVX2__)
#include <immintrin.h>

/* Codebooks of at most 16 codes (padded to 16 floats): the lookup is two in-register
 * permutes and a blend instead of a gather, and with `stream` the output bypasses the
 * cache (non-temporal stores: no read-for-ownership of a result larger than the cache).
 * Needs B % 8 == 0, and a 32-byte aligned `out` when streaming (the caller checks). */
static void dequantize16(const uint8_t *restrict codes, const float *restrict scale,
                         const float *restrict mean, int64_t r0, int64_t r1, int64_t B,
                         const float *restrict code16, float *restrict out, int stream) {
  const __m256 lo = _mm256_loadu_ps(code16), hi = _mm256_loadu_ps(code16 + 8);
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t *restrict q = codes + r * B;
    float *restrict o = out + r * B;
    const __m256 s = _mm256_set1_ps(scale[r]), mu = _mm256_set1_ps(mean ? mean[r] : 0.0f);
    for (int64_t j = 0; j < B; j += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + j)));
      const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
      const __m256 v = _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      __m256 d = _mm256_mul_ps(v, s);
      if (mean) d = _mm256_add_ps(d, mu);
      if (stream) _mm256_stream_ps(o + j, d);
      else _mm256_storeu_ps(o + j, d);
    }
  }
  if (stream) _mm_sfence();
}
#endif

/* Whether kbit_dequantize can take the 16-code path here (compiled with AVX2). */
int kbit_has_dequantize16(void) {
#if defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

/* out = code[codes] * scale (+ mean) for rows [r0, r1). code16: the codebook padded to 16
 * values when it has at most 16 and B % 8 == 0 (else NULL); stream: see dequantize16. */
void kbit_dequantize(const uint8_t *restrict codes, const float *restrict scale,
                     const float *restrict mean, int64_t r0, int64_t r1, int64_t B,
                     const float *restrict code, float *restrict out,
                     const float *restrict code16, int stream) {
#if defined(__AVX2__)
  if (code16) {
    dequantize16(codes, scale, mean, r0, r1, B, code16, out, stream);
    return;
  }
#else
  (void)code16;
  (void)stream;
#endif
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t *restrict q = codes + r * B;
    float *restrict o = out + r * B;
    const float s = scale[r];
    if (mean) {
      const float mu = mean[r];
      for (int64_t j = 0; j < B; j++) { float v = code[q[j]] * s; o[j] = v + mu; }
    } else {
      for (int64_t j = 0; j < B; j++) o[j] = code[q[j]] * s;
    }
  }
}

/* Histogram select for exact quantiles (harness/dtypes/quantile.py): the bucket of v =
 * clamp(y / scale, -1, 1) is (int)((v + 1) * half), clamped to [0, 2 * half - 1], exactly as
 * quantile._bucket computes it in torch. */
static inline float clamp1(float v) {
  /* clamp to [-1, 1] on the bit pattern (a branch-free loop for the vectoriser); inputs are
   * never NaN here: the callers reject NaN tensors before fitting. */
  const uint32_t u = f2u(v), a = u & 0x7fffffffu;
  return u2f((u & 0x80000000u) | (a < ONE_BITS ? a : ONE_BITS));
}

static inline int32_t bucket_of(float y, float scale, float half) {
  const int32_t b = (int32_t)((clamp1(y / scale) + 1.0f) * half), top = (int32_t)(2 * half) - 1;
  return b < top ? b : top; /* b >= 0: clamp1(...) + 1 >= 0 */
}

/* hist[bucket(y[i])] += 1 for i in [i0, i1). */
void kbit_hist(const float *restrict y, int64_t i0, int64_t i1, float scale, float half,
               int64_t *restrict hist) {
  for (int64_t i = i0; i < i1; i++) hist[bucket_of(y[i], scale, half)]++;
}

/* Append clamp(y[i] / scale) for i in [i0, i1) whose bucket is wanted; *count = how many. */
void kbit_select(const float *restrict y, int64_t i0, int64_t i1, float scale, float half,
                 const uint8_t *restrict wanted, float *restrict out, int64_t *restrict count) {
  int64_t n = 0;
  for (int64_t i = i0; i < i1; i++) {
    if (wanted[bucket_of(y[i], scale, half)]) out[n++] = clamp1(y[i] / scale);
  }
  *count = n;
}

/* ---- Fitting quantile codebooks to block-normalised values without materialising them ----
 * y = clamp((x - mu) / safe_scale, -1, 1), exactly as torch_ops.normalise computes it. */
static inline float normalised(float v, float s) { return clamp1(v / s); }

/* Stored scale of rows [r0, r1) and the largest |y| of each row: by monotonicity of the
 * division that is min(absmax / s, 1). */
void kbit_scales(const float *restrict x, const float *restrict mean, int64_t r0, int64_t r1,
                 int64_t B, int fmt, float *restrict scale_out, float *restrict ymax_out) {
  for (int64_t r = r0; r < r1; r++) {
    const float mu = mean ? mean[r] : 0.0f;
    const float absmax = row_absmax(x + r * B, mu, B, mean != 0);
    const float scale = to_format(absmax, fmt);
    const float s = scale > 0 ? scale : 1.0f;
    const float y = absmax / s;
    scale_out[r] = scale;
    ymax_out[r] = y > 1.0f ? 1.0f : y;
  }
}

#define FIT_CHUNK 256

/* Buckets (and values) of a chunk of one row: a branch-free loop gcc vectorises; the
 * scattered part (histogram increments, appends) then runs over the small buffer. The
 * subtraction of mu = 0 (no centering) leaves every float, -0.0 included, unchanged. */
static inline void fit_chunk(const float *restrict p, int64_t n, float mu, float s, float half,
                             float *restrict yv, int32_t *restrict bk) {
  for (int64_t j = 0; j < n; j++) {
    const float y = normalised(p[j] - mu, s);
    yv[j] = y;
    bk[j] = bucket_of(y, 1.0f, half);
  }
}

/* hist[bucket(y)] += 1 for every element of rows [r0, r1), given their stored scales. */
void kbit_fit_hist(const float *restrict x, const float *restrict mean,
                   const float *restrict scale, int64_t r0, int64_t r1, int64_t B, float half,
                   int64_t *restrict hist) {
  float yv[FIT_CHUNK];
  int32_t bk[FIT_CHUNK];
  for (int64_t r = r0; r < r1; r++) {
    const float mu = mean ? mean[r] : 0.0f, s = scale[r] > 0 ? scale[r] : 1.0f;
    for (int64_t j0 = 0; j0 < B; j0 += FIT_CHUNK) {
      const int64_t n = B - j0 < FIT_CHUNK ? B - j0 : FIT_CHUNK;
      fit_chunk(x + r * B + j0, n, mu, s, half, yv, bk);
      for (int64_t j = 0; j < n; j++) hist[bk[j]]++;
    }
  }
}

/* Append every y of rows [r0, r1) whose bucket is wanted; *count = how many. `out` has
 * room for one value more than can be selected (the branch-free append writes ahead). */
void kbit_fit_select(const float *restrict x, const float *restrict mean,
                     const float *restrict scale, int64_t r0, int64_t r1, int64_t B, float half,
                     const uint8_t *restrict wanted, float *restrict out, int64_t *restrict count) {
  float yv[FIT_CHUNK];
  int32_t bk[FIT_CHUNK];
  int64_t n_out = 0;
  for (int64_t r = r0; r < r1; r++) {
    const float mu = mean ? mean[r] : 0.0f, s = scale[r] > 0 ? scale[r] : 1.0f;
    for (int64_t j0 = 0; j0 < B; j0 += FIT_CHUNK) {
      const int64_t n = B - j0 < FIT_CHUNK ? B - j0 : FIT_CHUNK;
      fit_chunk(x + r * B + j0, n, mu, s, half, yv, bk);
      for (int64_t j = 0; j < n; j++) {
        out[n_out] = yv[j];
        n_out += wanted[bk[j]];
      }
    }
  }
  *count = n_out;
}

/* y of the elements idx[i0..i1) of the flat tensor x (block b = idx / B): a sample's values.
 * The reads are random, so several threads and out-of-order loads hide their latency. */
void kbit_fit_take(const float *restrict x, const float *restrict mean,
                   const float *restrict scale, int64_t B, const int64_t *restrict idx,
                   int64_t i0, int64_t i1, float *restrict out) {
  for (int64_t i = i0; i < i1; i++) {
    const int64_t k = idx[i], b = k / B;
    const float mu = mean ? mean[b] : 0.0f, s = scale[b] > 0 ? scale[b] : 1.0f;
    out[i] = normalised(x[k] - mu, s);
  }
}

/* Version of this file's calling conventions; native.py refuses a library that differs. */
int kbit_abi(void) { return 6; }
