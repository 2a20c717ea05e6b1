/* lmforge's CPU decode kernels: matrix-vector products for fp32, int8 and int4 weights, and one
 * whole transformer layer for a batch of single-token decode steps.
 *
 * Why C. A decode step does little arithmetic per weight, so its speed is set by how many bytes of
 * weights stream from memory per token. Quantized weights read 4-8x fewer bytes, but only if the
 * matmul reads the small integers directly (PyTorch's own int8/int4 CPU kernels are slow on AVX2-only
 * CPUs). And a small model's decode step launches a few thousand tiny PyTorch operations whose fixed
 * cost (microseconds each) rivals the weight streaming itself; doing a layer in one call removes it.
 *
 * Everything here has a PyTorch twin, which is the reference the tests compare against: the
 * projections in `lmforge/infer/quant.py`, the layer in `ModelRunner` (`lmforge/infer/runner.py`).
 * Plain C11 + OpenMP, no PyTorch headers: it builds in about a second, is called through ctypes, and
 * shares PyTorch's OpenMP thread pool (same libgomp), so `torch.set_num_threads` applies.
 *
 * Weight formats (row-major, one row per output channel n, k inputs):
 *   F32:  w[n, k]
 *   INT8: q[n, k] in [-127, 127], w = scale[n] * q                                  (per channel)
 *         or, with a group size G, w = scale[n, k / G] * q: a scale per G inputs (GGUF's Q8_0, G = 32)
 *   INT4: groups of G inputs share a step d and an offset m, w = d * q + m, q in 0..15 (like GGUF
 *         Q4_1). Codes are packed 64 inputs to 32 bytes (see row_i4 for the order); d and m are fp16,
 *         interleaved as dm[n, k / G, 2]. G is a multiple of 32 and k a multiple of 64.
 *
 * Activations: fp32 (weight-only quantization), or, for INT8 and INT4 weights, rounded to int8 once per
 * token (a scale per row or per 32 inputs) and multiplied as integers (`act`, see "int8 activations"
 * below): W8A8 (SmoothQuant) layers, and weight-only models run the way llama.cpp runs its Q8_0/Q4_1.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LMF_AVX2 1
#else
#define LMF_AVX2 0
#endif

enum { LMF_F32 = 0, LMF_INT8 = 1, LMF_INT4 = 2 };
/* how a matmul takes its input: fp32, or int8 with a scale per row (dynamic or fixed) or per 32 inputs */
enum { LMF_ACT_F32 = 0, LMF_ACT_DYNAMIC = 1, LMF_ACT_STATIC = 2, LMF_ACT_BLOCK = 3 };

/* Which code path this build holds: 1 = AVX2 + FMA + F16C, 0 = portable C. */
int lmf_isa(void) { return LMF_AVX2; }
enum { LMF_RMSNORM = 0, LMF_LAYERNORM = 1 };
enum { LMF_SWIGLU = 0, LMF_GELU_TANH = 1, LMF_GELU = 2, LMF_RELU2 = 3 };

typedef struct {
  int32_t kind;       /* LMF_F32, LMF_INT8, LMF_INT4 */
  int32_t group;      /* INT4 group size (a multiple of 32); INT8: 0 per row, else a multiple of 32 */
  int64_t n, k;       /* output and input features */
  const void* data;   /* float [n, k] | int8 [n, k] | uint8 [n, k / 2] */
  const void* scale;  /* INT8: float [n] or [n, k / group]; INT4: fp16 [n, k / group, 2] */
  const float* bias;  /* [n] or NULL */
  int32_t act;        /* LMF_ACT_*: INT8 and INT4 may round their input to int8 (F32 ignores it) */
  float act_scale;    /* LMF_ACT_STATIC: the input's one calibrated scale */
} lmf_weight;

/* A matmul's input rows as the row functions read them: the rows themselves, and what is derived from
 * them once per call (not once per output channel). */
typedef struct {
  const float* x; /* [M, k] */
  float* xsum;    /* INT4: [M, k / G] group sums of x (fp32 input), or [M, k / G, 2] of its int8 codes
                   (int8 input: pairs (0, sum), to meet the (step, offset) pairs of the weight's dm) */
  int8_t* xq;     /* int8 input: [M, k] codes (for INT4 in the nibble order, see quantize_row) */
  float* xscale;  /* int8 input: [M] (one scale per row) or [M, k / 32] (LMF_ACT_BLOCK), x ~ xscale * xq */
} lmf_input;

/* ------------------------------------------------------------------------------------ helpers */
static float half_to_float(uint16_t h) {
#if LMF_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) { /* zero or subnormal */
    if (man == 0) bits = sign;
    else {
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
  else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

#if LMF_AVX2
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline __m256 load_i8(const int8_t* p) { /* 8 int8 -> 8 float */
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif

static float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if LMF_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
  }
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/* y += a * x */
static void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if LMF_AVX2
  __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

/* --------------------------------------------------------------------------- matrix x vector(s)
 * Rows of x are processed in tiles of up to 4: each weight is loaded (and converted) once per tile.
 * out[t] = dot(x[t], w[row]) for the MT rows of the tile. */
#define MAX_TILE 4
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead of the weight stream */
#endif
#ifndef PREFETCH8
#define PREFETCH8 1024
#endif

/* f32 and int8 rows differ only in how 8 weights become floats and how far ahead to prefetch: one
 * function, always inlined with a constant `i8` (`row_any`), so each format gets its own branch-free
 * copy. The prefetches touch every 64-byte line of the weights the next 32 inputs will read. */
static inline __attribute__((always_inline)) void row_dense(const void* w, const int i8, const float* x, int64_t k,
                                                            const int mt, float* out) {
  const float* wf = (const float*)w;
  const int8_t* wq = (const int8_t*)w;
  int64_t i = 0;
  for (int t = 0; t < mt; ++t) out[t] = 0.f;
#if LMF_AVX2
#define LOAD8(j) (i8 ? load_i8(wq + (j)) : _mm256_loadu_ps(wf + (j)))
  const int64_t size = i8 ? 1 : 4, ahead = i8 ? PREFETCH8 : PREFETCH;
  if (mt == 1) { /* four independent accumulators keep both FMA units busy */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= k; i += 32) {
      for (int64_t line = 0; line < 32 * size; line += 64)
        _mm_prefetch((const char*)w + i * size + line + ahead, _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(LOAD8(i), _mm256_loadu_ps(x + i), a0);
      a1 = _mm256_fmadd_ps(LOAD8(i + 8), _mm256_loadu_ps(x + i + 8), a1);
      a2 = _mm256_fmadd_ps(LOAD8(i + 16), _mm256_loadu_ps(x + i + 16), a2);
      a3 = _mm256_fmadd_ps(LOAD8(i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    out[0] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  } else {
    __m256 acc[MAX_TILE];
    for (int t = 0; t < mt; ++t) acc[t] = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) {
      __m256 wv = LOAD8(i);
      for (int t = 0; t < mt; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * k + i), acc[t]);
    }
    for (int t = 0; t < mt; ++t) out[t] = hsum(acc[t]);
  }
#undef LOAD8
#endif
  for (; i < k; ++i) {
    const float wi = i8 ? (float)wq[i] : wf[i];
    for (int t = 0; t < mt; ++t) out[t] += wi * x[t * k + i];
  }
}

/* INT8 with a scale per group of G inputs: dot(x, w) = sum_g s_g * dot(x_g, q_g). Each group's products
 * gather in registers and are scaled once into the running sum: one FMA per 8 inputs more than per row. */
static inline __attribute__((always_inline)) void row_i8g(const int8_t* w, const float* scale, const float* x,
                                                          int64_t k, int64_t group, const int mt, float* out) {
  const int64_t groups = k / group;
#if LMF_AVX2
  __m256 acc[MAX_TILE];
  for (int t = 0; t < mt; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * group;
    const float* xg = x + g * group;
    for (int64_t line = 0; line < group; line += 64) _mm_prefetch((const char*)wg + line + PREFETCH8, _MM_HINT_T0);
    __m256 part[MAX_TILE];
    for (int t = 0; t < mt; ++t) part[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < group; i += 8) {
      const __m256 wv = load_i8(wg + i);
      for (int t = 0; t < mt; ++t) part[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xg + t * k + i), part[t]);
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int t = 0; t < mt; ++t) acc[t] = _mm256_fmadd_ps(s, part[t], acc[t]);
  }
  for (int t = 0; t < mt; ++t) out[t] = hsum(acc[t]);
#else
  for (int t = 0; t < mt; ++t) out[t] = 0.f;
  for (int64_t g = 0; g < groups; ++g)
    for (int t = 0; t < mt; ++t) {
      float part = 0.f;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) part += (float)w[i] * x[t * k + i];
      out[t] += scale[g] * part;
    }
#endif
}

/* With w = d*q + m per group: dot(x, w) = sum_g d_g * dot(x_g, q_g) + m_g * sum(x_g). The group sums
 * of x (xsum[t, g]) are computed once per call and shared by every output channel.
 * Layout: each 64 consecutive inputs are 32 bytes, read as eight 32-bit lanes; nibble j of lane i is the
 * code of input 8j + i. So (lanes >> 4j) & 15 is inputs 8j..8j+7, in order: unpacking is a shift, a mask
 * and a conversion per 8 weights, with no shuffles (the scarce resource when widening small integers). */
static inline __attribute__((always_inline)) void row_i4(const uint8_t* w, const uint16_t* dm, const float* x,
                                                         const float* xsum, int64_t k, int64_t group,
                                                         const int mt, float* out) {
  const int64_t groups = k / group;
  float offset[MAX_TILE] = {0};
  for (int64_t g = 0; g < groups; ++g) {
    const float m = half_to_float(dm[2 * g + 1]);
    for (int t = 0; t < mt; ++t) offset[t] += m * xsum[t * groups + g];
  }
#if LMF_AVX2
  __m256 acc[MAX_TILE];
  for (int t = 0; t < mt; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi32(0x0f);
  for (int64_t b = 0; b < k / 64; ++b) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * b));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, nibble));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), nibble));
    const __m256 w2 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8), nibble));
    const __m256 w3 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 12), nibble));
    const __m256 w4 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 16), nibble));
    const __m256 w5 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 20), nibble));
    const __m256 w6 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 24), nibble));
    const __m256 w7 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    const __m256 d0 = _mm256_set1_ps(half_to_float(dm[2 * ((64 * b) / group)]));
    const __m256 d1 = _mm256_set1_ps(half_to_float(dm[2 * ((64 * b + 32) / group)]));
    for (int t = 0; t < mt; ++t) { /* two short chains per half, each half scaled by its group's step */
      const float* xb = x + t * k + 64 * b;
      __m256 p0 = _mm256_mul_ps(w0, _mm256_loadu_ps(xb)), p1 = _mm256_mul_ps(w1, _mm256_loadu_ps(xb + 8));
      p0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), p0);
      p1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), p1);
      __m256 q0 = _mm256_mul_ps(w4, _mm256_loadu_ps(xb + 32)), q1 = _mm256_mul_ps(w5, _mm256_loadu_ps(xb + 40));
      q0 = _mm256_fmadd_ps(w6, _mm256_loadu_ps(xb + 48), q0);
      q1 = _mm256_fmadd_ps(w7, _mm256_loadu_ps(xb + 56), q1);
      acc[t] = _mm256_fmadd_ps(d0, _mm256_add_ps(p0, p1), acc[t]);
      acc[t] = _mm256_fmadd_ps(d1, _mm256_add_ps(q0, q1), acc[t]);
    }
  }
  for (int t = 0; t < mt; ++t) out[t] = hsum(acc[t]) + offset[t];
#else
  float acc[MAX_TILE] = {0};
  for (int64_t b = 0; b < k / 64; ++b)
    for (int i = 0; i < 8; ++i) {
      uint32_t lane;
      memcpy(&lane, w + 32 * b + 4 * i, 4);
      for (int j = 0; j < 8; ++j) {
        const int64_t c = 64 * b + 8 * j + i;
        const float wq = (float)((lane >> (4 * j)) & 15) * half_to_float(dm[2 * (c / group)]);
        for (int t = 0; t < mt; ++t) acc[t] += wq * x[t * k + c];
      }
    }
  for (int t = 0; t < mt; ++t) out[t] = acc[t] + offset[t];
#endif
}

/* ------------------------------------------------------------------------- int8 activations
 * With W->act set, a matmul first rounds each input row x to int8 with one scale per row (per token):
 * x ~ s * c, c = round(x / s) clamped to [-127, 127], where s = max|x| / 127 (LMF_ACT_DYNAMIC) or the
 * one calibrated scale of the layer (LMF_ACT_STATIC, SmoothQuant's static scales); or (LMF_ACT_BLOCK)
 * with a scale per 32 inputs, s_b = max|x_b| / 127, as llama.cpp rounds its activations (Q8_0, Q8_1),
 * which keeps one loud channel from costing the whole token its resolution. Each output is then
 * integer dot products, scaled once per weight group (and per 32-block of the input):
 *   INT8: y = s * sum_g scale_g * (c_g . q_g)                   (one group per row when per channel)
 *   INT4: y = s * sum_g [d_g * (c_g . q_g) + m_g * sum(c_g)]    (the sums of c once per token, shared)
 *   (per-block scales: s moves inside the sums, y = sum_b s_b * scale_g(b) * (c_b . q_b), ...)
 * that is, exactly the rounded input times the dequantized weight, up to the fp32 additions of the
 * per-group terms. On AVX2 the products are llama.cpp's: _mm256_maddubs_epi16 multiplies unsigned by
 * signed bytes into sums of pairs in 16 bits, so an int8 weight enters as |w| and its sign moves onto
 * the activation (_mm256_sign_epi8); 128 * 127 * 2 < 2^15, so nothing saturates. _mm256_madd_epi16
 * widens to 32 bits. INT4 codes are already unsigned (0..15), and the activations are stored in the
 * weights' nibble order, so 64 inputs are one load, two masks and two byte products. Per input this is
 * a third of the instructions of converting each weight to fp32 (row_dense, row_i4). */

/* Position of input j (0..63) of a 64-input block among the codes of an INT4 matmul's activations:
 * the low nibbles of the block's 32 bytes (byte 4i + b holds input 16b + i, see row_i4) pair with
 * codes 0..31, the high nibbles (input 16b + 8 + i) with codes 32..63. */
static inline int64_t nibble_position(int64_t j) { return (j % 16 >= 8 ? 32 : 0) + 4 * (j % 8) + j / 16; }

static float abs_max(const float* x, int64_t n) {
  float amax = 0.f;
  int64_t i = 0;
#if LMF_AVX2
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; i < n; ++i) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
  return amax;
}

/* c = round(x / s) clamped to [-127, 127], as PyTorch's `torch.round(x / s).clamp(-127, 127)` rounds
 * (fp32 division, to nearest, ties to even) */
static void round_codes(const float* x, int64_t n, float s, int8_t* c) {
  int64_t i = 0;
#if LMF_AVX2
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; i + 32 <= n; i += 32) { /* 4 x 8 floats -> 32 int8, packed in order (the packs work per 128 bits) */
    __m256i v[4];
    for (int j = 0; j < 4; ++j) {
      __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * j), sv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i*)(c + i), _mm256_permutevar8x32_epi32(b, order));
  }
#endif
  for (; i < n; ++i) {
    const float q = nearbyintf(x[i] / s);
    c[i] = (int8_t)(q < -127.f ? -127.f : q > 127.f ? 127.f : q);
  }
}

static inline float scale_of(float amax) { /* max|x| / 127, never 0 (as PyTorch's clamp(min=1e-12)) */
  const float s = amax / 127.f;
  return s > 1e-12f ? s : 1e-12f;
}

/* Rounds row x [k] to int8 codes c with scales s (x ~ s * c): one scale (s[0]) per row, or with
 * LMF_ACT_BLOCK one per 32 inputs (s[k / 32]). For an INT4 weight (`group` > 0) the codes go in the
 * nibble order and csum gets, per group g, the pair (0, sum of its codes), or with block scales
 * (0, sum over its 32-blocks of scale * sum of codes): the term that meets the weight's offset m_g. */
static void quantize_row(const float* x, int64_t k, int32_t act, float fixed, int64_t group, int8_t* c,
                         float* s, float* csum) {
  if (act == LMF_ACT_BLOCK) {
    for (int64_t b = 0; b < k / 32; ++b) {
      s[b] = scale_of(abs_max(x + 32 * b, 32));
      round_codes(x + 32 * b, 32, s[b], c + 32 * b);
    }
  } else {
    s[0] = act == LMF_ACT_DYNAMIC ? scale_of(abs_max(x, k)) : (fixed > 1e-12f ? fixed : 1e-12f);
    round_codes(x, k, s[0], c);
  }
  if (group) {
    for (int64_t g = 0; g < k / group; ++g) {
      float total = 0.f;
      for (int64_t b = g * group / 32; b < (g + 1) * group / 32; ++b) {
        int32_t codes = 0;
        for (int64_t j = 32 * b; j < 32 * b + 32; ++j) codes += c[j];
        total += act == LMF_ACT_BLOCK ? s[b] * (float)codes : (float)codes;
      }
      csum[2 * g] = 0.f;
      csum[2 * g + 1] = total;
    }
    for (int64_t b = 0; b < k; b += 64) {
      int8_t block[64];
      for (int64_t j = 0; j < 64; ++j) block[nibble_position(j)] = c[b + j];
      memcpy(c + b, block, 64);
    }
  }
}

#if LMF_AVX2
static inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}
/* 32 products w_i * c_i, summed in fours into 8 int32 lanes (|w| unsigned, w's sign moved onto c) */
static inline __m256i dot32_i8(__m256i w, __m256i abs_w, const int8_t* c) {
  const __m256i pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)c), w));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#endif

/* INT8 weights times int8 codes c: sum over groups g of G inputs (G = k: one scale per row) of
 * scale_g * (c_g . q_g), each dot product exact in 32-bit integers. */
static inline __attribute__((always_inline)) void row_i8q(const int8_t* w, const float* scale, const int8_t* c,
                                                          int64_t k, int64_t group, const int mt, float* out) {
  const int64_t groups = k / group;
  for (int t = 0; t < mt; ++t) out[t] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * group;
    const int8_t* cg = c + g * group;
    int32_t dots[MAX_TILE] = {0};
    int64_t i = 0;
#if LMF_AVX2
    __m256i acc[MAX_TILE];
    for (int t = 0; t < mt; ++t) acc[t] = _mm256_setzero_si256();
    for (; i + 32 <= group; i += 32) {
      if (!(i & 63)) _mm_prefetch((const char*)wg + i + PREFETCH8, _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wg + i)), abs_w = _mm256_sign_epi8(wv, wv);
      for (int t = 0; t < mt; ++t) acc[t] = _mm256_add_epi32(acc[t], dot32_i8(wv, abs_w, cg + t * k + i));
    }
    for (int t = 0; t < mt; ++t) dots[t] = hsum_i32(acc[t]);
#endif
    for (; i < group; ++i)
      for (int t = 0; t < mt; ++t) dots[t] += (int32_t)wg[i] * cg[t * k + i];
    for (int t = 0; t < mt; ++t) out[t] += scale[g] * (float)dots[t];
  }
}

/* INT8 weights times int8 codes with a scale per 32 inputs (xs[t, k / 32]; k a multiple of 32):
 * sum_b xs_b * scale_g(b) * (c_b . q_b), the scale per row (G = k) applied once at the end. Two chains
 * of FMAs (even and odd blocks), so one block's conversion need not wait for the previous one's. */
static inline __attribute__((always_inline)) void row_i8b(const int8_t* w, const float* scale, const int8_t* c,
                                                          const float* xs, int64_t k, int64_t group,
                                                          const int mt, float* out) {
  const int64_t blocks = k / 32, per = group / 32; /* 32-blocks per weight group */
  const int rowwise = group == k;
#define WSCALE(b) (rowwise ? 1.f : per == 1 ? scale[(b)] : scale[(b) / per])
#if LMF_AVX2
  __m256 acc[MAX_TILE], acc2[MAX_TILE];
  for (int t = 0; t < mt; ++t) acc[t] = acc2[t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    _mm_prefetch((const char*)w + 32 * b + PREFETCH8, _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + 32 * b)), a0 = _mm256_sign_epi8(w0, w0);
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(w + 32 * b + 32)), a1 = _mm256_sign_epi8(w1, w1);
    const float s0 = WSCALE(b), s1 = WSCALE(b + 1);
    for (int t = 0; t < mt; ++t) {
      const int8_t* ct = c + t * k + 32 * b;
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(w0, a0, ct)), _mm256_set1_ps(s0 * xs[t * blocks + b]),
                               acc[t]);
      acc2[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(w1, a1, ct + 32)),
                                _mm256_set1_ps(s1 * xs[t * blocks + b + 1]), acc2[t]);
    }
  }
  for (; b < blocks; ++b) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + 32 * b)), a0 = _mm256_sign_epi8(w0, w0);
    for (int t = 0; t < mt; ++t)
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(w0, a0, c + t * k + 32 * b)),
                               _mm256_set1_ps(WSCALE(b) * xs[t * blocks + b]), acc[t]);
  }
  for (int t = 0; t < mt; ++t) out[t] = hsum(_mm256_add_ps(acc[t], acc2[t])) * (rowwise ? scale[0] : 1.f);
#else
  for (int t = 0; t < mt; ++t) out[t] = 0.f;
  for (int64_t b = 0; b < blocks; ++b)
    for (int t = 0; t < mt; ++t) {
      int32_t dot = 0;
      for (int64_t i = 32 * b; i < 32 * b + 32; ++i) dot += (int32_t)w[i] * c[t * k + i];
      out[t] += WSCALE(b) * xs[t * blocks + b] * (float)dot;
    }
  for (int t = 0; t < mt; ++t) out[t] *= rowwise ? scale[0] : 1.f;
#endif
#undef WSCALE
}

/* INT4 weights times int8 codes (nibble order), csum[t, g] = (0, the codes' group sum):
 * sum_g d_g * (c_g . q_g) + m_g * sum(c_g). Each 64-input block spans one or two groups (G >= 32): the
 * 16-bit pair sums of a 32-bit lane are its first half (inputs 0..31 of the block) then its second.
 * With a scale per 32 inputs (xs[t, k / 32], else NULL), each half's d_g is multiplied by its scale. */
static inline __attribute__((always_inline)) void row_i4q(const uint8_t* w, const uint16_t* dm, const int8_t* c,
                                                          const float* csum, const float* xs, int64_t k,
                                                          int64_t group, const int mt, float* out) {
  const int64_t groups = k / group;
  float offset[MAX_TILE] = {0}; /* sum_g m_g * sum(c_g): the row's (d, m) pairs times the (0, sum) pairs */
  int64_t i = 0;
#if LMF_AVX2
  __m256 o[MAX_TILE];
  for (int t = 0; t < mt; ++t) o[t] = _mm256_setzero_ps();
  for (; i + 8 <= 2 * groups; i += 8) {
    const __m256 pairs = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dm + i)));
    for (int t = 0; t < mt; ++t) o[t] = _mm256_fmadd_ps(pairs, _mm256_loadu_ps(csum + t * 2 * groups + i), o[t]);
  }
  for (int t = 0; t < mt; ++t) offset[t] = hsum(o[t]);
#endif
  for (; i < 2 * groups; ++i)
    for (int t = 0; t < mt; ++t) offset[t] += half_to_float(dm[i]) * csum[t * 2 * groups + i];
#if LMF_AVX2
  __m256 acc[MAX_TILE], acc2[MAX_TILE]; /* two chains of FMAs (first and second halves), not one twice as long */
  for (int t = 0; t < mt; ++t) acc[t] = acc2[t] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const __m256i first = _mm256_set1_epi32(1), second = _mm256_set1_epi32(1 << 16);
  /* the 16-bit pair sums of block b's codes times t's activations: 2 * 2 * 15 * 127, no saturation */
#define PAIRS(b, t)                                                                                       \
  _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256((const __m256i*)(c + (t) * k + 64 * (b)))), \
                   _mm256_maddubs_epi16(high, _mm256_loadu_si256((const __m256i*)(c + (t) * k + 64 * (b) + 32))))
#define UNPACK(b)                                                                                         \
  if (!((b) & 1)) _mm_prefetch((const char*)w + 32 * (b) + PREFETCH8, _MM_HINT_T0);                     \
  const __m256i v = _mm256_loadu_si256((const __m256i*)(w + 32 * (b)));                                 \
  const __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble)
  if (group % 64 == 0 && !xs) { /* whole blocks per group: the group's integer sum, then one conversion */
    for (int64_t g = 0; g < groups; ++g) {
      __m256i sum[MAX_TILE];
      for (int t = 0; t < mt; ++t) sum[t] = _mm256_setzero_si256();
      for (int64_t b = g * (group / 64); b < (g + 1) * (group / 64); ++b) {
        UNPACK(b);
        for (int t = 0; t < mt; ++t) sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(PAIRS(b, t), ones));
      }
      const __m256 d = _mm256_set1_ps(half_to_float(dm[2 * g]));
      for (int t = 0; t < mt; ++t) acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[t]), d, acc[t]);
    }
  } else { /* a block's two halves in two groups (or, for G = 96, 160, ..., sometimes one) */
    for (int64_t b = 0; b < k / 64; ++b) {
      UNPACK(b);
      const int64_t g0 = group == 32 ? 2 * b : (64 * b) / group, g1 = group == 32 ? 2 * b + 1 : (64 * b + 32) / group;
      const float d0 = half_to_float(dm[2 * g0]), d1 = half_to_float(dm[2 * g1]);
      for (int t = 0; t < mt; ++t) {
        const __m256i pairs = PAIRS(b, t);
        const float e0 = xs ? d0 * xs[t * (k / 32) + 2 * b] : d0, e1 = xs ? d1 * xs[t * (k / 32) + 2 * b + 1] : d1;
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, first)), _mm256_set1_ps(e0), acc[t]);
        acc2[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, second)), _mm256_set1_ps(e1),
                                  acc2[t]);
      }
    }
  }
#undef PAIRS
#undef UNPACK
  for (int t = 0; t < mt; ++t) out[t] = hsum(_mm256_add_ps(acc[t], acc2[t])) + offset[t];
#else
  float acc[MAX_TILE] = {0};
  for (int64_t b = 0; b < k / 64; ++b) {
    int32_t half[2][MAX_TILE] = {{0}};
    for (int p = 0; p < 32; ++p) { /* byte 4i + j: j = 0, 1 in the block's first half, 2, 3 its second */
      const int lo = w[32 * b + p] & 15, hi = w[32 * b + p] >> 4, h = (p >> 1) & 1;
      for (int t = 0; t < mt; ++t) half[h][t] += lo * c[t * k + 64 * b + p] + hi * c[t * k + 64 * b + 32 + p];
    }
    const float d0 = half_to_float(dm[2 * ((64 * b) / group)]), d1 = half_to_float(dm[2 * ((64 * b + 32) / group)]);
    for (int t = 0; t < mt; ++t) {
      const float e0 = xs ? d0 * xs[t * (k / 32) + 2 * b] : d0, e1 = xs ? d1 * xs[t * (k / 32) + 2 * b + 1] : d1;
      acc[t] += e0 * (float)half[0][t] + e1 * (float)half[1][t];
    }
  }
  for (int t = 0; t < mt; ++t) out[t] = acc[t] + offset[t];
#endif
}

static void prepare_input(const lmf_weight* W, const float* x, int64_t M, lmf_input* in);
static inline __attribute__((always_inline)) void row_any(const lmf_weight* W, int64_t r, const lmf_input* in,
                                                          int64_t m0, const int mt, float* out);

static int64_t row_bytes(const lmf_weight* W) {
  return W->kind == LMF_F32 ? 4 * W->k : W->kind == LMF_INT8 ? W->k : W->k / 2;
}

/* y[m, :] (= or +=) x[m, :] @ W^T + bias, m < M, called by every thread of a parallel region (or
 * outside one, by a single thread), with the input prepared by prepare_input. */
static void linear_rows(const lmf_weight* W, const lmf_input* in, int64_t M, float* y, int accumulate) {
  const int64_t n = W->n;
  /* Threads take chunks of ~64 KB of weights as they go (not one fixed half each): on a busy machine a
   * thread that loses its core for a while then holds up the others for one chunk, not half the matrix. */
  const int64_t chunk = row_bytes(W) >= 8192 ? 1 : 8192 / row_bytes(W);
#pragma omp for schedule(guided, chunk)
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE) {
      const int mt = (int)(M - m0 < MAX_TILE ? M - m0 : MAX_TILE);
      float out[MAX_TILE];
      /* each case inlines the row function with a constant tile, so its accumulators live in registers */
#define TILE(T)                                                            \
  case T:                                                                \
    row_any(W, r, in, m0, T, out);                                      \
    break;
      switch (mt) { TILE(1) TILE(2) TILE(3) default: TILE(4) }
#undef TILE
      for (int t = 0; t < mt; ++t) {
        float* dst = y + (m0 + t) * n + r;
        *dst = accumulate ? *dst + out[t] : out[t];
      }
    }
  }
}

/* The same as a standalone call (quantized layers in the PyTorch path use it). Below ~256 KB of weights,
 * waking a second thread costs more than it saves. */
void lmf_linear(const lmf_weight* W, const float* x, int64_t M, float* y, int accumulate) {
  const int64_t groups = W->kind == LMF_INT4 ? W->k / W->group : 0;
  lmf_input in = {x, (float*)malloc(sizeof(float) * (size_t)(2 * M * groups + M * (W->k / 32 + 1))),
                  (int8_t*)malloc((size_t)(M * W->k)), NULL};
  in.xscale = in.xsum + 2 * M * groups;
  prepare_input(W, x, M, &in);
#pragma omp parallel if (W->n * row_bytes(W) * M >= (1 << 18))
  linear_rows(W, &in, M, y, accumulate);
  free(in.xsum);
  free(in.xq);
}

/* ------------------------------------------------------------------------------------- norms */
/* out[r] = norm(x[r]) for rows of width d: RMSNorm (w * x / rms) or LayerNorm (w * (x - mean) / std + b),
 * statistics in fp32 like the model's own layers. */
void lmf_norm(int32_t kind, const float* x, const float* w, const float* b, float eps, int64_t rows, int64_t d,
              float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* o = out + r * d;
    if (kind == LMF_RMSNORM) {
      const float inv = 1.0f / sqrtf(dot(xr, xr, d) / (float)d + eps);
      for (int64_t i = 0; i < d; ++i) o[i] = w[i] * (xr[i] * inv);
    } else {
      float mean = 0.f, var = 0.f;
      for (int64_t i = 0; i < d; ++i) mean += xr[i];
      mean /= (float)d;
      for (int64_t i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
      const float inv = 1.0f / sqrtf(var / (float)d + eps);
      for (int64_t i = 0; i < d; ++i) o[i] = (xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.f);
    }
  }
}

/* ----------------------------------------------------------------------------------- a layer */
typedef struct {
  int64_t d, n_heads, n_kv, head_dim, d_ff;
  float eps;
  int32_t norm, mlp, window; /* window 0: every earlier key is visible */
  const float *attn_norm_w, *attn_norm_b, *mlp_norm_w, *mlp_norm_b;
  const float *q_norm_w, *k_norm_w; /* QK-norm (RMSNorm over head_dim), or NULL */
  lmf_weight qkv, o, up, down;      /* up: for SwiGLU, gate and up rows interleaved */
  /* The layer's KV cache. Slots (StaticKVCache): key t of kv head g of row b starts at
   *   slots[b] * slot_stride + g * head_stride + t * token_stride.
   * Paged (PagedKVCache): the step's token_index gives the pool row of each (row, position):
   *   token_index[b * max_keys + t] * token_stride + g * head_stride. */
  float *k_cache, *v_cache;
  int64_t slot_stride, head_stride, token_stride;
} lmf_layer;

typedef struct {
  int64_t n_layers, d, vocab;
  lmf_layer* layers;
  const float* embed;     /* [vocab, d]: the token embedding */
  const float* pos_embed; /* [positions, d] learned positions (GPT-2), or NULL */
  int32_t final_norm;
  const float *final_w, *final_b;
  float final_eps;
  lmf_weight head;        /* the LM head (the embedding itself when tied) */
  const float* inv_freq;  /* RoPE: [head_dim / 2] angular speeds (scaling included), or NULL */
} lmf_model;

typedef struct {
  int64_t batch;
  const int64_t* tokens;      /* the new token of each row */
  const int64_t* slots;       /* the cache slot of each row */
  const int64_t* lengths;     /* keys cached before this step: also the new token's position */
  float* scratch;             /* lmf_scratch_floats(...) floats */
  int64_t max_keys;           /* the longest row's keys after this step */
  const int64_t* token_index; /* paged caches: [batch, max_keys] pool rows; NULL for slots */
  int64_t* argmax;            /* out: each row's most likely next token (greedy decoding), or NULL */
  int32_t chunk;              /* rows are consecutive tokens of one sequence (same slot, positions
                                 L, L+1, ...): every new key is stored before any attention reads */
  const float *cos, *sin;     /* filled by lmf_decode: [batch, head_dim / 2], when the model has RoPE */
} lmf_step;

static inline int64_t key_at(const lmf_layer* L, const lmf_step* S, int64_t b, int64_t g, int64_t t) {
  if (S->token_index) return S->token_index[b * S->max_keys + t] * L->token_stride + g * L->head_stride;
  return S->slots[b] * L->slot_stride + g * L->head_stride + t * L->token_stride;
}

int64_t lmf_scratch_floats(const lmf_model* M, int64_t batch, int64_t max_keys) {
  const lmf_layer* L = &M->layers[0];
  return batch * (L->d + L->qkv.n + L->n_heads * L->head_dim + L->d_ff + L->n_heads * max_keys + L->head_dim);
}

static void rms_inplace(float* v, const float* w, int64_t n, float eps) {
  const float inv = 1.0f / sqrtf(dot(v, v, n) / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) v[i] = w[i] * (v[i] * inv);
}

static void rope(float* v, const float* c, const float* s, int64_t half) { /* rotate-half layout */
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i] + a * s[i];
  }
}

static float activation(int32_t kind, float x) {
  if (kind == LMF_GELU_TANH) return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  if (kind == LMF_GELU) return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
  const float r = x > 0.f ? x : 0.f; /* relu2 */
  return r * r;
}

typedef struct { float *x, *qkv, *attn, *act, *scores; } buffers;

/* Per-thread scratch: the normalised input of the next matmul (each thread needs all of it, so each
 * computes it: cheaper than one thread computing it while the others wait at a barrier), what the
 * matmul derives from its input (`in`: int4 group sums, int8 codes), and one query/key/value head. */
typedef struct {
  float *h, *q, *k;
  lmf_input in;
} private_buffers;

/* What W's rows need of input x [M, k] besides x: its int8 codes and scales (int8 activations; for INT4
 * also the codes' group sums) or its group sums (INT4 with fp32 activations), or nothing. */
static void prepare_input(const lmf_weight* W, const float* x, int64_t M, lmf_input* in) {
  const int64_t k = W->k, group = W->kind == LMF_INT4 ? W->group : 0, groups = group ? k / group : 0;
  in->x = x;
  if (W->act != LMF_ACT_F32 && W->kind != LMF_F32) {
    const int64_t scales = W->act == LMF_ACT_BLOCK ? k / 32 : 1;
    for (int64_t m = 0; m < M; ++m)
      quantize_row(x + m * k, k, W->act, W->act_scale, group, in->xq + m * k, in->xscale + m * scales,
                   in->xsum + 2 * m * groups);
    return;
  }
  for (int64_t i = 0; i < M * groups; ++i) {
    float s = 0.f;
    for (int64_t j = 0; j < group; ++j) s += x[i * group + j];
    in->xsum[i] = s;
  }
}

/* one output row r of W for MT input rows m0.. (any format) */
static inline __attribute__((always_inline)) void row_any(const lmf_weight* W, int64_t r, const lmf_input* in,
                                                          int64_t m0, const int mt, float* out) {
  const int64_t k = W->k, groups = W->kind == LMF_INT4 ? k / W->group : 0;
  const float* x = in->x + m0 * k;
  const float* xsum = in->xsum + m0 * groups;
  if (W->act != LMF_ACT_F32 && W->kind != LMF_F32) { /* int8 activations */
    const int8_t* c = in->xq + m0 * k;
    const int blockwise = W->act == LMF_ACT_BLOCK;
    const float* xs = blockwise ? in->xscale + m0 * (k / 32) : NULL;
    if (W->kind == LMF_INT8) {
      const int64_t group = W->group && W->group < k ? W->group : k;
      const int8_t* w = (const int8_t*)W->data + r * k;
      const float* scale = (const float*)W->scale + r * (k / group);
      if (blockwise) row_i8b(w, scale, c, xs, k, group, mt, out);
      else row_i8q(w, scale, c, k, group, mt, out);
    } else {
      row_i4q((const uint8_t*)W->data + r * (k / 2), (const uint16_t*)W->scale + r * groups * 2, c,
              in->xsum + 2 * m0 * groups, xs, k, W->group, mt, out);
    }
    if (!blockwise)
      for (int t = 0; t < mt; ++t) out[t] *= in->xscale[m0 + t];
  } else if (W->kind == LMF_F32) {
    row_dense((const float*)W->data + r * k, 0, x, k, mt, out);
  } else if (W->kind == LMF_INT8 && W->group && W->group < k) {
    row_i8g((const int8_t*)W->data + r * k, (const float*)W->scale + r * (k / W->group), x, k, W->group, mt, out);
  } else if (W->kind == LMF_INT8) {
    row_dense((const int8_t*)W->data + r * k, 1, x, k, mt, out);
    const float s = ((const float*)W->scale)[r];
    for (int t = 0; t < mt; ++t) out[t] *= s;
  } else {
    row_i4((const uint8_t*)W->data + r * (k / 2), (const uint16_t*)W->scale + r * groups * 2, x, xsum, k,
           W->group, mt, out);
  }
  const float b = W->bias ? W->bias[r] : 0.f;
  for (int t = 0; t < mt; ++t) out[t] += b;
}

/* The MLP's first projection with the activation applied as each output is produced: a thread that
 * computes gate row r (and up row r for SwiGLU) writes act[r] at once, so no separate activation pass.
 * For SwiGLU the weight's rows alternate gate and up (g0, u0, g1, u1, ...): one sequential stream. */
static void up_and_activate(const lmf_layer* L, const lmf_input* in, int64_t M, float* act) {
  const lmf_weight* W = &L->up;
  const int64_t F = L->d_ff;
  const int64_t chunk = row_bytes(W) >= 8192 ? 1 : 8192 / row_bytes(W);
#pragma omp for schedule(guided, chunk)
  for (int64_t r = 0; r < F; ++r) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE) {
      const int mt = (int)(M - m0 < MAX_TILE ? M - m0 : MAX_TILE);
      float g[MAX_TILE], u[MAX_TILE];
#define TILE(T)                                                          \
  case T:                                                              \
    if (L->mlp == LMF_SWIGLU) {                                        \
      row_any(W, 2 * r, in, m0, T, g);                                 \
      row_any(W, 2 * r + 1, in, m0, T, u);                             \
    } else {                                                           \
      row_any(W, r, in, m0, T, g);                                     \
    }                                                                  \
    break;
      switch (mt) { TILE(1) TILE(2) TILE(3) default: TILE(4) }
#undef TILE
      for (int t = 0; t < mt; ++t)
        act[(m0 + t) * F + r] = L->mlp == LMF_SWIGLU ? g[t] / (1.f + expf(-g[t])) * u[t] : activation(L->mlp, g[t]);
    }
  }
}

/* x[b] += attention(norm(x[b])) then x[b] += mlp(norm(x[b])), one new token per row b. Run by every
 * thread of the step's parallel region: the `omp for` loops share out the work and end in the only
 * barriers (five per layer: after q/k/v, attention, the output projection, up+activation, down). */
static void layer(const lmf_layer* L, const lmf_step* S, const buffers* buf, private_buffers* mine) {
  const int64_t B = S->batch, d = L->d, H = L->n_heads, KV = L->n_kv, hd = L->head_dim, half = hd / 2;
  const int64_t width = L->qkv.n, group = H / KV;
  float *x = buf->x, *qkv = buf->qkv, *attn = buf->attn;

  lmf_input* in = &mine->in; /* each thread's own */
  lmf_norm(L->norm, x, L->attn_norm_w, L->attn_norm_b, L->eps, B, d, mine->h);
  prepare_input(&L->qkv, mine->h, B, in);
  linear_rows(&L->qkv, in, B, qkv, 0);

  if (S->chunk) { /* later rows attend to earlier rows' keys: store them all first (one more barrier) */
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < B * KV; ++bg) {
      const int64_t b = bg / KV, g = bg % KV, at = key_at(L, S, b, g, S->lengths[b]);
      const float* row = qkv + b * width;
      float* k = L->k_cache + at;
      memcpy(k, row + (H + g) * hd, sizeof(float) * hd);
      memcpy(L->v_cache + at, row + (H + KV + g) * hd, sizeof(float) * hd);
      if (L->k_norm_w) rms_inplace(k, L->k_norm_w, hd, L->eps);
      if (S->cos) rope(k, S->cos + b * half, S->sin + b * half, half);
    }
  }

  /* Attention, one task per (row, query head). Each task applies QK-norm and RoPE to its own copy of
   * its query and of the new key (the new key is used directly, not read back from the cache), and the
   * first query head of each KV group stores the new key and value in the cache: no separate pass.
   * (In a chunk the keys are already stored, and all are read from the cache.) */
  const float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(dynamic, 1)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, head = bh % H, g = head / group, pos = S->lengths[b];
    const int64_t first = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
    const float* row = qkv + b * width;
    const float* v_new = row + (H + KV + g) * hd;
    float *q = mine->q, *k = mine->k;
    memcpy(q, row + head * hd, sizeof(float) * hd);
    memcpy(k, row + (H + g) * hd, sizeof(float) * hd);
    if (L->q_norm_w) {
      rms_inplace(q, L->q_norm_w, hd, L->eps);
      rms_inplace(k, L->k_norm_w, hd, L->eps);
    }
    if (S->cos) {
      rope(q, S->cos + b * half, S->sin + b * half, half);
      rope(k, S->cos + b * half, S->sin + b * half, half);
    }
    if (head % group == 0 && !S->chunk) {
      const int64_t at = key_at(L, S, b, g, pos);
      memcpy(L->k_cache + at, k, sizeof(float) * hd);
      memcpy(L->v_cache + at, v_new, sizeof(float) * hd);
    }
    float* p = buf->scores + bh * S->max_keys;
    float best = -INFINITY, total = 0.f;
    for (int64_t t = first; t <= pos; ++t) {
      p[t] = dot(q, t == pos && !S->chunk ? k : L->k_cache + key_at(L, S, b, g, t), hd) * scale;
      best = p[t] > best ? p[t] : best;
    }
    float* out = attn + b * H * hd + head * hd;
    memset(out, 0, sizeof(float) * hd);
    for (int64_t t = first; t <= pos; ++t) {
      const float e = expf(p[t] - best);
      total += e;
      axpy(e, t == pos && !S->chunk ? v_new : L->v_cache + key_at(L, S, b, g, t), out, hd);
    }
    for (int64_t i = 0; i < hd; ++i) out[i] /= total;
  }
  prepare_input(&L->o, attn, B, in);
  linear_rows(&L->o, in, B, x, 1);

  lmf_norm(L->norm, x, L->mlp_norm_w, L->mlp_norm_b, L->eps, B, d, mine->h);
  prepare_input(&L->up, mine->h, B, in);
  up_and_activate(L, in, B, buf->act);
  prepare_input(&L->down, buf->act, B, in);
  linear_rows(&L->down, in, B, x, 1);
}

/* One decode step for a batch of rows, one new token each: embedding, every layer, final norm and
 * LM head -> logits [batch, vocab]. One call and one parallel region per token. */
void lmf_decode(const lmf_model* M, lmf_step* S, float* logits) {
  const int64_t B = S->batch, d = M->d;
  const lmf_layer* L0 = &M->layers[0];
  buffers buf;
  buf.x = S->scratch;
  buf.qkv = buf.x + B * d;
  buf.attn = buf.qkv + B * L0->qkv.n;
  buf.act = buf.attn + B * L0->n_heads * L0->head_dim;
  buf.scores = buf.act + B * L0->d_ff;
  float* angles = buf.scores + B * L0->n_heads * S->max_keys;
  S->cos = S->sin = NULL;
  if (M->inv_freq) { /* as RotaryEmbedding: angle = position * speed, in fp32 */
    const int64_t half = L0->head_dim / 2;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < half; ++i) {
        const float a = (float)S->lengths[b] * M->inv_freq[i];
        angles[b * half + i] = cosf(a);
        angles[B * half + b * half + i] = sinf(a);
      }
    S->cos = angles;
    S->sin = angles + B * half;
  }
  for (int64_t b = 0; b < B; ++b) {
    memcpy(buf.x + b * d, M->embed + S->tokens[b] * d, sizeof(float) * d);
    if (M->pos_embed)
      for (int64_t i = 0; i < d; ++i) buf.x[b * d + i] += M->pos_embed[S->lengths[b] * d + i];
  }
  const int64_t attn_width = L0->n_heads * L0->head_dim;
  int64_t widest = L0->d_ff > d ? L0->d_ff : d; /* the widest input of any matmul */
  widest = attn_width > widest ? attn_width : widest;
  const int parallel = M->head.n * row_bytes(&M->head) >= (1 << 22); /* tiny test models: one thread */
#pragma omp parallel if (parallel)
  {
    private_buffers mine;
    float* own = (float*)malloc(sizeof(float) *
                                (size_t)(B * d + B * (widest / 16 + 1) + 2 * L0->head_dim + B * (widest / 32 + 1)));
    mine.h = own;
    mine.in.xsum = own + B * d;
    mine.q = mine.in.xsum + B * (widest / 16 + 1);
    mine.k = mine.q + L0->head_dim;
    mine.in.xscale = mine.k + L0->head_dim;
    mine.in.xq = (int8_t*)malloc((size_t)(B * widest));
    for (int64_t i = 0; i < M->n_layers; ++i) layer(&M->layers[i], S, &buf, &mine);
    lmf_norm(M->final_norm, buf.x, M->final_w, M->final_b, M->final_eps, B, d, mine.h);
    prepare_input(&M->head, mine.h, B, &mine.in);
    linear_rows(&M->head, &mine.in, B, logits, 0);
    if (S->argmax) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        const float* row = logits + b * M->vocab;
        int64_t best = 0;
        for (int64_t i = 1; i < M->vocab; ++i) best = row[i] > row[best] ? i : best;
        S->argmax[b] = best;
      }
    }
    free(own);
    free(mine.in.xq);
  }
}

/* ------------------------------------------------------------------------- the bandwidth bound */
/* The rate at which this machine can read memory: what a batch-1 decode step, which must read
 * every weight once, is bound by. Every thread streams its share of `n` floats (n a multiple of
 * 64; far larger than the caches) `repeats` times, summing them so the loads cannot be optimised
 * away, with several independent accumulators so that additions never wait for each other. */
double lmf_read_stream(const float* data, int64_t n, int32_t repeats) {
  double total = 0.0;
  for (int32_t r = 0; r < repeats; r++) {
    double sum = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sum)
    for (int64_t i = 0; i < n; i += 64) {
#if LMF_AVX2
      __m256 a = _mm256_loadu_ps(data + i), b = _mm256_loadu_ps(data + i + 8);
      __m256 c = _mm256_loadu_ps(data + i + 16), d = _mm256_loadu_ps(data + i + 24);
      a = _mm256_add_ps(a, _mm256_loadu_ps(data + i + 32));
      b = _mm256_add_ps(b, _mm256_loadu_ps(data + i + 40));
      c = _mm256_add_ps(c, _mm256_loadu_ps(data + i + 48));
      d = _mm256_add_ps(d, _mm256_loadu_ps(data + i + 56));
      sum += hsum(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
#else
      float acc[8] = {0};
      for (int j = 0; j < 64; j++) acc[j & 7] += data[i + j];
      sum += acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
#endif
    }
    total += sum;
  }
  return total;
}
