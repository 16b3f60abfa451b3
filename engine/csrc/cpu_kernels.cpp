// kubeinfer CPU kernels: paged decode attention and the elementwise ops around the matmuls.
//
// On the CPU a torch op costs microseconds of dispatch and a full pass over memory, so the decoder
// layer's small ops (residual add + RMSNorm, rotary + KV store, SiLU-and-mul) and the decode
// attention (a gather of every sequence's blocks + a masked SDPA in the torch backend) are fused
// here into one pass each. Loaded through ctypes by ``engine/layers/cpu_kernels.py``; no torch
// headers, so it compiles in about a second. Every kernel is checked against the plain-torch
// reference in tests/engine/test_cpu_kernels.py.
//
// Elementwise kernels round exactly where torch rounds (products and sums rounded to the tensor's
// dtype), so they give torch's bits; build with -ffp-contract=off so the compiler does not fuse
// them into FMAs. The attention accumulates in fp32 and uses explicit FMAs.
//
// dtype codes: 0 float32, 1 bfloat16, 2 float16. Strides are in elements.
//
// Variants (chosen when engine/csrc/build.py compiles this file for the CPU it runs on): with
// __AVX512F__ the inner loops use 16-float vectors, with __AVX2__ + __FMA__ + __F16C__ 8-float ones,
// otherwise plain loops left to the compiler. The vector layer below (``vec``) does the same IEEE
// operations in the same order as the scalar code, so every variant gives the same bits for the
// elementwise kernels; the scalar loops also finish each row's tail.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "packed_calls.h"
#include "work_pool.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define KI_VARIANT 2
#define KI_SIMD 16
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KI_VARIANT 1
#define KI_SIMD 8
#else
#define KI_VARIANT 0
#define KI_SIMD 0
#endif

namespace {

enum class bf16 : uint16_t {};  // the upper half of a float32 (an enum, not a struct: loops of it vectorise)
using f16 = _Float16;

inline float to_float(float x) { return x; }
inline float to_float(f16 x) { return static_cast<float>(x); }
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline f16 from_float<f16>(float x) { return static_cast<f16>(x); }
template <> inline bf16 from_float<bf16>(float x) {  // round to nearest even, as torch does; no branch
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Round a float to T and back: what torch's intermediate results of dtype T hold.
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

// ---------------------------------------------------------------------------------------------
// exp(x) in plain arithmetic, so that loops of it vectorise (libm's expf does not without
// -ffast-math): 2^n * p(r) with Cephes' polynomial, relative error ~2e-7 (torch's Sleef exp ~1e-7).
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float magic = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float fn = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;  // x - n ln 2, in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(fn) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}


// ---------------------------------------------------------------------------------------------
// The vector layer: W floats per register; loads convert T to fp32, stores round fp32 to T as
// from_float does (round to nearest even; NaN quieted), ``round<T>`` rounds in registers.
#if KI_SIMD > 0
namespace vec {
#if KI_SIMD == 16
constexpr int W = 16;
using V = __m512;
using VI = __m512i;
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline V load(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
inline float reduce_max(V a) { return _mm512_reduce_max_ps(a); }
inline V first_lanes(V x, int64_t n) {  // x's first n lanes, zeros after
  return n >= W ? x : _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1), x);
}
inline VI bf16_bits(V x) {  // from_float<bf16> in 32-bit lanes (the result in the low half)
  const VI u = _mm512_castps_si512(x);
  const VI rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16);
  const VI quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_blend_epi32(nan, rounded, quiet);
}
inline void store(float* p, V x) { _mm512_storeu_ps(p, x); }
inline void store(bf16* p, V x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(x))); }
inline void store(f16* p, V x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T> inline V round(V x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, bf16>) return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16));
  else return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline V float_of_int_bits(V fn) {  // 2^fn for integer-valued fn
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fn), _mm512_set1_epi32(127)), 23));
}
#else
constexpr int W = 8;
using V = __m256;
using VI = __m256i;
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline V load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float reduce_add(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(V a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V first_lanes(V x, int64_t n) {
  if (n >= W) return x;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes)));
}
inline VI bf16_bits(V x) {
  const VI u = _mm256_castps_si256(x);
  const VI rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
  const VI quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const VI nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}
inline void store(float* p, V x) { _mm256_storeu_ps(p, x); }
inline void store(bf16* p, V x) {
  const VI bits = bf16_bits(x);  // each lane < 2^16: unsigned saturation keeps it
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}
inline void store(f16* p, V x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T> inline V round(V x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, bf16>) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(x), 16));
  else return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline V float_of_int_bits(V fn) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fn), _mm256_set1_epi32(127)), 23));
}
#endif

// exp_approx, lane by lane, with the same operations in the same order (so the same bits).
inline V exp(V x) {
  x = vmax(set1(-87.f), vmin(set1(88.f), x));  // min/max return their second operand for NaN: NaN stays NaN
  const V magic = set1(12582912.f);
  const V fn = sub(add(mul(x, set1(1.44269504088896341f)), magic), magic);
  const V r = sub(sub(x, mul(fn, set1(0.693359375f))), mul(fn, set1(-2.12194440e-4f)));
  V y = set1(1.9875691500e-4f);
  y = add(mul(y, r), set1(1.3981999507e-3f));
  y = add(mul(y, r), set1(8.3334519073e-3f));
  y = add(mul(y, r), set1(4.1665795894e-2f));
  y = add(mul(y, r), set1(1.6666665459e-1f));
  y = add(mul(y, r), set1(5.0000001201e-1f));
  y = add(add(mul(mul(y, r), r), r), set1(1.f));
  return mul(y, float_of_int_bits(fn));
}
}  // namespace vec
#endif

// The row-wise kernels below split their rows across the work pool's threads from this many rows on (prefill
// chunks); fewer rows (decode steps) cost less than handing out a job. Each row's arithmetic is the same
// either way, so the result does not depend on the threads.
constexpr int64_t PARALLEL_ROWS = 64;

inline int row_threads(int64_t rows) { return rows >= PARALLEL_ROWS ? omp_get_max_threads() : 1; }

// ---------------------------------------------------------------------------------------------
// RMSNorm, optionally after a residual add: sum = T(x + residual); out = T(w * T(sum * rsqrt(mean(sum^2) + eps)))
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, T* sum_out,
              int64_t sum_stride, const T* weight, T* out, int64_t out_stride, int64_t rows, int64_t hidden,
              float eps) {
  work_pool::parallel_ranges(rows, row_threads(rows), [&](int64_t first, int64_t last) {
  std::vector<float> row(hidden);
  for (int64_t r = first; r < last; ++r) {
    const T* xr = x + r * x_stride;
    int64_t i = 0;
    float sum_sq = 0.f;
#if KI_SIMD > 0
    vec::V sq = vec::set1(0.f);
#endif
    if (residual != nullptr) {
      const T* rr = residual + r * residual_stride;
      T* sr = sum_out + r * sum_stride;
#if KI_SIMD > 0
      for (; i + vec::W <= hidden; i += vec::W) {
        const vec::V s = vec::round<T>(vec::add(vec::load(xr + i), vec::load(rr + i)));
        vec::store(sr + i, s);
        vec::store(row.data() + i, s);
        sq = vec::fmadd(s, s, sq);
      }
#endif
      for (int64_t j = i; j < hidden; ++j) {
        T s = from_float<T>(to_float(xr[j]) + to_float(rr[j]));
        sr[j] = s;
        row[j] = to_float(s);
      }
    } else {
#if KI_SIMD > 0
      for (; i + vec::W <= hidden; i += vec::W) {
        const vec::V s = vec::load(xr + i);
        vec::store(row.data() + i, s);
        sq = vec::fmadd(s, s, sq);
      }
#endif
      for (int64_t j = i; j < hidden; ++j) row[j] = to_float(xr[j]);
    }
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t j = i; j < hidden; ++j) sum_sq += row[j] * row[j];
#if KI_SIMD > 0
    sum_sq += vec::reduce_add(sq);
#endif
    const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
    T* o = out + r * out_stride;
    i = 0;
#if KI_SIMD > 0
    const vec::V inv = vec::set1(inv_rms);
    for (; i + vec::W <= hidden; i += vec::W)
      vec::store(o + i, vec::mul(vec::load(weight + i), vec::round<T>(vec::mul(vec::load(row.data() + i), inv))));
#endif
    for (; i < hidden; ++i) o[i] = from_float<T>(to_float(weight[i]) * round_to<T>(row[i] * inv_rms));
  }
  });
}

// ---------------------------------------------------------------------------------------------
// SiLU-and-mul over [gate | up] rows: out = T(T(silu(gate)) * up)
template <typename T>
void silu_and_mul(const T* x, int64_t x_stride, T* out, int64_t out_stride, int64_t rows, int64_t d) {
  work_pool::parallel_ranges(rows, row_threads(rows), [&](int64_t first, int64_t last) {
  for (int64_t r = first; r < last; ++r) {
    const T* gate = x + r * x_stride;
    const T* up = gate + d;
    T* o = out + r * out_stride;
    int64_t i = 0;
#if KI_SIMD > 0
    const vec::V one = vec::set1(1.f), zero = vec::set1(0.f);
    for (; i + vec::W <= d; i += vec::W) {
      const vec::V g = vec::load(gate + i);
      const vec::V silu = vec::round<T>(vec::div(g, vec::add(one, vec::exp(vec::sub(zero, g)))));
      vec::store(o + i, vec::mul(silu, vec::load(up + i)));
    }
#endif
    for (; i < d; ++i) {
      const float g = to_float(gate[i]);
      const float silu = round_to<T>(g / (1.f + exp_approx(-g)));
      o[i] = from_float<T>(silu * to_float(up[i]));
    }
  }
  });
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding ("rotate half" layout) of q and k, then the KV store:
//   q_out[t] = rope(q[t]);  k_cache[slot[t]] = rope(k[t]);  v_cache[slot[t]] = v[t]   (slot < 0: not stored)
// cos/sin come from a float32 [max_position, head_dim] table (cos half, sin half) and are rounded to T
// first, like ``cache[positions].to(dtype)``; each product and sum is rounded to T as in torch. The KV cache
// may hold another dtype C (``--kv-cache-dtype``): k is rotated in T, then converted, like
// ``k_cache[slots] = rope(k).to(C)``; v is converted alone.
template <typename T, typename O = T>
inline void rope_row(const T* x, O* y, const float* cos, const float* sin, int64_t half) {
  int64_t j = 0;
#if KI_SIMD > 0
  using vec::round;
  for (; j + vec::W <= half; j += vec::W) {
    const vec::V c = round<T>(vec::load(cos + j)), s = round<T>(vec::load(sin + j));
    const vec::V x1 = vec::load(x + j), x2 = vec::load(x + j + half);
    vec::store(y + j, round<T>(vec::sub(round<T>(vec::mul(x1, c)), round<T>(vec::mul(x2, s)))));
    vec::store(y + j + half, round<T>(vec::add(round<T>(vec::mul(x2, c)), round<T>(vec::mul(x1, s)))));
  }
#endif
  for (; j < half; ++j) {
    const float c = round_to<T>(cos[j]), s = round_to<T>(sin[j]);
    const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
    y[j] = from_float<O>(round_to<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s)));
    y[j + half] = from_float<O>(round_to<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s)));
  }
}

template <typename T, typename C>
inline void store_values(const T* v, C* cache, int64_t n) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(cache, v, n * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) cache[i] = from_float<C>(to_float(v[i]));
  }
}

template <typename T, typename C>
void rotary_and_store(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                      const int64_t* positions, const float* cos_sin, T* q_out, C* k_cache, C* v_cache,
                      const int64_t* slots, int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim) {
  const int64_t half = head_dim / 2, kv_width = num_kv_heads * head_dim;
  work_pool::parallel_ranges(tokens, row_threads(tokens), [&](int64_t first, int64_t last) {
  for (int64_t t = first; t < last; ++t) {
    const float* cos = cos_sin + positions[t] * head_dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < num_heads; ++h)
      rope_row(q + t * q_stride + h * head_dim, q_out + (t * num_heads + h) * head_dim, cos, sin, half);
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < num_kv_heads; ++h)
      rope_row(k + t * k_stride + h * head_dim, k_cache + slot * kv_width + h * head_dim, cos, sin, half);
    store_values(v + t * v_stride, v_cache + slot * kv_width, kv_width);
  }
  });
}

// Blocks are scattered in memory, so the hardware prefetcher stalls at every block boundary. The tiles ask for
// the next block's K and V rows a row at a time, as they read the current one's (the same offsets in the next
// block): a burst of the whole block's prefetches at its start stalls the loads behind them. Zen 4, 32
// sequences, bf16 cache, 30 layers from DRAM: 6.3-7.4 -> 4.8-5.8 ms; a bare read of the same blocks takes 2.4.
template <typename C>
inline void prefetch_row(const C* next_k, const C* next_v, int64_t offset, int64_t bytes) {
  if (next_k == nullptr) return;
  for (int64_t line = 0; line < bytes; line += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(next_k + offset) + line);
    __builtin_prefetch(reinterpret_cast<const char*>(next_v + offset) + line);
  }
}

// ---------------------------------------------------------------------------------------------
// The inner loops of decode attention, over a tile of up to TILE_ROWS positions of one block and one KV head,
// for the `group` query heads that share it. Each K or V row is converted to fp32 once for all the group's
// heads. With vectors and a compile-time head size the scores of four rows are reduced together (a shuffle
// tree instead of four horizontal sums); otherwise plain loops the compiler vectorises.
constexpr int64_t TILE_ROWS = 16;

#if KI_SIMD == 16
// The horizontal sums of a, b, c and d, in that order.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));  // 128-bit lanes: a, b, c, d
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t));
}
#elif KI_SIMD == 8
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif

// The vector paths keep a row's converted chunks and four rows' dot products per head in registers: the
// group (query heads per KV head) is a compile-time constant up to MAX_VECTOR_GROUP.
constexpr int MAX_VECTOR_GROUP = 4;

// f<GROUP>() with GROUP the group when it is at most MAX_VECTOR_GROUP, else 0 (the run-time loops).
template <typename F>
inline void with_group(int64_t group, F&& f) {
  switch (group) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// scores[g * TILE_ROWS + i] = query[g] . k[i]   for i < n <= TILE_ROWS, g < group; next_k / next_v (or null):
// where the next block's rows at these offsets are, to prefetch.
template <typename C, int HEAD_DIM, int GROUP>
inline void tile_scores(const float* query, const C* k, int64_t row_stride, int64_t n, int64_t runtime_group,
                        int64_t head_dim, float* scores, const C* next_k, const C* next_v) {
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(C));
  const int64_t group = GROUP > 0 ? GROUP : runtime_group;
#if KI_SIMD > 0
  if constexpr (HEAD_DIM > 0 && HEAD_DIM % vec::W == 0 && GROUP > 0) {
    constexpr int chunks = HEAD_DIM / vec::W;
    {
      for (int64_t i0 = 0; i0 < n; i0 += 4) {
        vec::V dots[GROUP][4];
        for (int64_t r = 0; r < 4; ++r) {
          if (i0 + r >= n) {  // (a tail's missing rows are zeros: never read past the sequence)
            for (int64_t g = 0; g < group; ++g) dots[g][r] = vec::set1(0.f);
            continue;
          }
          const C* kr = k + (i0 + r) * row_stride;
          prefetch_row(next_k, next_v, (i0 + r) * row_stride, row_bytes);
          vec::V kv[chunks];
          for (int c = 0; c < chunks; ++c) kv[c] = vec::load(kr + vec::W * c);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = query + g * HEAD_DIM;
            vec::V dot = vec::mul(vec::load(qg), kv[0]);
            for (int c = 1; c < chunks; ++c) dot = vec::fmadd(vec::load(qg + vec::W * c), kv[c], dot);
            dots[g][r] = dot;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          const __m128 four = reduce4(dots[g][0], dots[g][1], dots[g][2], dots[g][3]);
          float* out = scores + g * TILE_ROWS + i0;
          if (i0 + 4 <= n) _mm_storeu_ps(out, four);
          else {
            alignas(16) float tmp[4];
            _mm_store_ps(tmp, four);
            for (int64_t r = 0; r < n - i0; ++r) out[r] = tmp[r];
          }
        }
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) prefetch_row(next_k, next_v, i * row_stride, row_bytes);
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = query + g * head_dim;
    for (int64_t i = 0; i < n; ++i) {
      const C* kr = k + i * row_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot = std::fma(qg[d], to_float(kr[d]), dot);
      scores[g * TILE_ROWS + i] = dot;
    }
  }
}

// acc[g] += sum_i weights[g * TILE_ROWS + i] * v[i]   for i < n <= TILE_ROWS, g < group
template <typename C, int HEAD_DIM, int GROUP>
inline void tile_values(const float* weights, const C* v, int64_t row_stride, int64_t n, int64_t runtime_group,
                        int64_t head_dim, float* acc) {
  const int64_t group = GROUP > 0 ? GROUP : runtime_group;
#if KI_SIMD > 0
  if constexpr (HEAD_DIM > 0 && HEAD_DIM % vec::W == 0) {
    constexpr int chunks = HEAD_DIM / vec::W;
    if constexpr (GROUP > 0 && GROUP * chunks <= 16) {
      vec::V a[GROUP * chunks];
      for (int64_t g = 0; g < group; ++g)
        for (int c = 0; c < chunks; ++c) a[g * chunks + c] = vec::load(acc + g * HEAD_DIM + vec::W * c);
      for (int64_t i = 0; i < n; ++i) {
        const C* vr = v + i * row_stride;
        vec::V vv[chunks];
        for (int c = 0; c < chunks; ++c) vv[c] = vec::load(vr + vec::W * c);
        for (int64_t g = 0; g < group; ++g) {
          const vec::V w = vec::set1(weights[g * TILE_ROWS + i]);
          for (int c = 0; c < chunks; ++c) a[g * chunks + c] = vec::fmadd(w, vv[c], a[g * chunks + c]);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int c = 0; c < chunks; ++c) vec::store(acc + g * HEAD_DIM + vec::W * c, a[g * chunks + c]);
      return;
    }
    for (int64_t g = 0; g < group; ++g) {  // more heads than registers: one head at a time
      vec::V a[chunks];
      for (int c = 0; c < chunks; ++c) a[c] = vec::load(acc + g * HEAD_DIM + vec::W * c);
      for (int64_t i = 0; i < n; ++i) {
        const vec::V w = vec::set1(weights[g * TILE_ROWS + i]);
        const C* vr = v + i * row_stride;
        for (int c = 0; c < chunks; ++c) a[c] = vec::fmadd(w, vec::load(vr + vec::W * c), a[c]);
      }
      for (int c = 0; c < chunks; ++c) vec::store(acc + g * HEAD_DIM + vec::W * c, a[c]);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    float* ag = acc + g * head_dim;
    for (int64_t i = 0; i < n; ++i) {
      const float w = weights[g * TILE_ROWS + i];
      const C* vr = v + i * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] = std::fma(w, to_float(vr[d]), ag[d]);
    }
  }
}

// One head's softmax state over a tile's scores (`sc`, n of them): the running max and sum move to the tile's
// max when it is larger (the values so far, `acc`, rescaled with them), then the scores become their weights.
inline void online_softmax(float* sc, int64_t n, float& max, float& sum, float* acc, int64_t head_dim) {
  float tile_max = -INFINITY;
#if KI_SIMD > 0
  static_assert(TILE_ROWS % vec::W == 0);
  for (int64_t i = n; i < TILE_ROWS; ++i) sc[i] = -INFINITY;
  {
    vec::V m = vec::load(sc);
    for (int64_t i = vec::W; i < TILE_ROWS; i += vec::W) m = vec::vmax(vec::load(sc + i), m);
    tile_max = vec::reduce_max(m);
  }
#else
  for (int64_t i = 0; i < n; ++i) tile_max = sc[i] > tile_max ? sc[i] : tile_max;
#endif
  if (tile_max > max) {
    if (max != -INFINITY) {
      const float rescale = exp_approx(max - tile_max);
      sum *= rescale;
      for (int64_t d = 0; d < head_dim; ++d) acc[d] *= rescale;
    }
    max = tile_max;
  }
#if KI_SIMD > 0
  const vec::V m = vec::set1(max);
  vec::V total = vec::set1(0.f);
  for (int64_t i = 0; i < TILE_ROWS; i += vec::W) {
    const vec::V w = vec::first_lanes(vec::exp(vec::sub(vec::load(sc + i), m)), std::max<int64_t>(0, n - i));
    vec::store(sc + i, w);
    total = vec::add(total, w);
  }
  sum += vec::reduce_add(total);
#else
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    sc[i] = exp_approx(sc[i] - max);
    total += sc[i];
  }
  sum += total;
#endif
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention: one query token per sequence, read straight from the block tables.
// Work item = one chunk of ATTENTION_CHUNK positions of one sequence, all its heads (one KV head per item when
// there are fewer sequences than threads). One pass over the chunk, block by block (each block's K and V for
// every KV head of 16 positions, contiguous in the cache, streamed together): tiles of scores, an online softmax
// (flash attention's running max and sum), the weights applied to V. A context of one chunk is normalised at the
// end; longer ones keep each chunk's max, sum and weighted values and are combined after (flash-decoding), so
// one long context spreads over all threads. The chunks and tiles are fixed, not sized by the threads: a
// sequence's result depends neither on the threads nor on the batch.
// Cache layout [num_blocks, block_size, num_kv_heads, head_dim]. HEAD_DIM > 0 fixes the head size at
// compile time; 0 reads it at run time.
constexpr int64_t ATTENTION_CHUNK = 512;  // positions (rounded down to whole blocks): below, nothing to combine

template <typename T, typename C, int HEAD_DIM>
void paged_decode_attention(const T* q, int64_t q_stride, T* out, int64_t out_stride, const int64_t* rows,
                            const C* k_cache, const C* v_cache, const int32_t* block_tables,
                            int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                            int64_t num_kv_heads, int64_t runtime_head_dim, int64_t block_size, float scale,
                            int num_threads) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads, kv_width = num_kv_heads * head_dim;
  const int64_t block_elems = block_size * kv_width;
  const int64_t chunk = std::max<int64_t>(1, ATTENTION_CHUNK / block_size) * block_size;
  // Fewer sequences than threads (batch 1): one work item per (chunk, KV head), so every thread streams
  // part of the cache; otherwise one per chunk, all its heads.
  const int64_t heads_per_item = num_seqs < num_threads ? 1 : num_kv_heads;
  const int64_t items_per_chunk = num_kv_heads / heads_per_item;
  std::vector<int64_t> first_item(num_seqs + 1, 0), first_part(num_seqs + 1, 0);  // per sequence
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t chunks = std::max<int64_t>(1, (seq_lens[s] + chunk - 1) / chunk);
    first_item[s + 1] = first_item[s] + chunks * items_per_chunk;
    first_part[s + 1] = first_part[s] + (chunks > 1 ? chunks : 0);  // (one chunk: nothing to combine)
  }
  // Each chunk of a split context: per head its max, its sum of exp(score - max) and its weighted values.
  const int64_t part_floats = num_heads * (head_dim + 2);
  std::vector<float> parts(first_part[num_seqs] * part_floats);
  work_pool::parallel_for(first_item[num_seqs], num_threads, [&](int64_t item) {
      thread_local std::vector<float> query, acc, scores, denom, maxes;  // each thread's, kept between calls
      query.resize(num_heads * head_dim);
      acc.resize(num_heads * head_dim);
      scores.resize(group * TILE_ROWS);
      denom.resize(num_heads);
      maxes.resize(num_heads);
      const int64_t s = std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
      const int64_t local = item - first_item[s], c = local / items_per_chunk;
      const int64_t kv0 = local % items_per_chunk * heads_per_item, kv1 = kv0 + heads_per_item;
      const int64_t h0 = kv0 * group, h1 = kv1 * group;
      const int64_t len = seq_lens[s], r = rows[s], begin = c * chunk, end = std::min(len, begin + chunk);
      const int64_t n = end - begin;  // (this chunk's positions)
      const bool split = first_part[s + 1] > first_part[s];
      const int32_t* table = block_tables + s * table_stride + begin / block_size;
      const T* qs = q + r * q_stride;
      for (int64_t i = h0 * head_dim; i < h1 * head_dim; ++i) query[i] = to_float(qs[i]) * scale;
      std::fill(acc.begin() + h0 * head_dim, acc.begin() + h1 * head_dim, 0.f);
      std::fill(denom.begin() + h0, denom.begin() + h1, 0.f);
      std::fill(maxes.begin() + h0, maxes.begin() + h1, -INFINITY);
      for (int64_t start = 0, b = 0; start < n; start += block_size, ++b) {
        const bool last = start + block_size >= n;
        const C* next_k = last ? nullptr : k_cache + table[b + 1] * block_elems;
        const C* next_v = last ? nullptr : v_cache + table[b + 1] * block_elems;
        const C* k_block = k_cache + table[b] * block_elems;
        const C* v_block = v_cache + table[b] * block_elems;
        const int64_t block_rows = std::min(block_size, n - start);
        for (int64_t t0 = 0; t0 < block_rows; t0 += TILE_ROWS) {
          const int64_t rows_here = std::min(TILE_ROWS, block_rows - t0);
          for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
            const int64_t first_head = kvh * group, offset = t0 * kv_width + kvh * head_dim;
            with_group(group, [&](auto g_const) {
              constexpr int G = decltype(g_const)::value;
              tile_scores<C, HEAD_DIM, G>(query.data() + first_head * head_dim, k_block + offset, kv_width,
                                          rows_here, group, head_dim, scores.data(),
                                          last ? nullptr : next_k + offset, last ? nullptr : next_v + offset);
              for (int64_t g = 0; g < group; ++g)
                online_softmax(scores.data() + g * TILE_ROWS, rows_here, maxes[first_head + g],
                               denom[first_head + g], acc.data() + (first_head + g) * head_dim, head_dim);
              tile_values<C, HEAD_DIM, G>(scores.data(), v_block + offset, kv_width, rows_here, group, head_dim,
                                          acc.data() + first_head * head_dim);
            });
          }
        }
      }
      if (split) {  // kept for the combination below
        float* part = parts.data() + (first_part[s] + c) * part_floats;
        for (int64_t h = h0; h < h1; ++h) {
          part[h * (head_dim + 2)] = maxes[h];
          part[h * (head_dim + 2) + 1] = denom[h];
          std::copy(acc.begin() + h * head_dim, acc.begin() + (h + 1) * head_dim, part + h * (head_dim + 2) + 2);
        }
        return;
      }
      T* os = out + r * out_stride;
      for (int64_t h = h0; h < h1; ++h) {
        const float inv = 1.f / denom[h];
        for (int64_t d = 0; d < head_dim; ++d) os[h * head_dim + d] = from_float<T>(acc[h * head_dim + d] * inv);
      }
  });
  if (first_part[num_seqs] == 0) return;
  // (every chunk is done) Split contexts, per (sequence, head): each chunk's values and sum rescaled by
  // exp(its max - the overall max), added in chunk order.
  work_pool::parallel_for(num_seqs * num_heads, num_threads, [&](int64_t sh) {
      const int64_t s = sh / num_heads, h = sh % num_heads, chunks = first_part[s + 1] - first_part[s];
      if (chunks == 0) return;
      const float* part = parts.data() + first_part[s] * part_floats + h * (head_dim + 2);
      float m = -INFINITY, total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part[c * part_floats]);
      thread_local std::vector<float> sum_buffer;
      sum_buffer.assign(head_dim, 0.f);
      float* sum = sum_buffer.data();
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pc = part + c * part_floats;
        const float w = exp_approx(pc[0] - m);
        total += w * pc[1];
        for (int64_t d = 0; d < head_dim; ++d) sum[d] += w * pc[2 + d];
      }
      T* os = out + rows[s] * out_stride + h * head_dim;
      const float inv = 1.f / total;
      for (int64_t d = 0; d < head_dim; ++d) os[d] = from_float<T>(sum[d] * inv);
  });
}

// ---------------------------------------------------------------------------------------------
// Linear layer for small batches: out[m] = T(x[m] . w[n] + bias[n]) with fp32 accumulation, weights in
// the activations' dtype, row-major [N, K] as loaded (no packing). At batch 1 a linear only streams its
// weights, so bf16 weights are half the bytes of fp32 ones; this is the path for bf16 on CPUs where
// oneDNN cannot pack bf16, and for the smallest batches in fp32 where it beats oneDNN (bench/linear.py).
// Threads split the output rows in blocks of 4; each block's 4 weight rows are streamed once and reused
// from L1 for every pair of input rows. No allocation.
template <typename T, int MR>
inline void dot_rows(const T* x, int64_t x_stride, const T* w, int64_t nr, int64_t K, float sums[2][4]) {
  int64_t k = 0;
#if KI_SIMD > 0
  if (nr == 4) {
    vec::V acc[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = vec::set1(0.f);
    for (; k + vec::W <= K; k += vec::W) {
      const vec::V w0 = vec::load(w + k), w1 = vec::load(w + K + k), w2 = vec::load(w + 2 * K + k),
                   w3 = vec::load(w + 3 * K + k);
      for (int i = 0; i < MR; ++i) {
        const vec::V xi = vec::load(x + i * x_stride + k);
        acc[i][0] = vec::fmadd(xi, w0, acc[i][0]);
        acc[i][1] = vec::fmadd(xi, w1, acc[i][1]);
        acc[i][2] = vec::fmadd(xi, w2, acc[i][2]);
        acc[i][3] = vec::fmadd(xi, w3, acc[i][3]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) sums[i][j] = vec::reduce_add(acc[i][j]);
  } else
#endif
  {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) sums[i][j] = 0.f;
  }
  const int64_t tail = k;
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < nr; ++j) {
      const T* xi = x + i * x_stride;
      const T* wj = w + j * K;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t kk = tail; kk < K; ++kk) dot += to_float(xi[kk]) * to_float(wj[kk]);
      sums[i][j] += dot;
    }
}

template <typename T>
struct LinearJob {
  const T *x, *w, *bias;
  T* out;
  int64_t x_stride, out_stride, M, N, K, blocks_per_chunk;
};

template <typename T>
void linear_chunk(const void* ctx, int64_t chunk) {
  const LinearJob<T>& j = *static_cast<const LinearJob<T>*>(ctx);
  const int64_t first = chunk * j.blocks_per_chunk, last = std::min((chunk + 1) * j.blocks_per_chunk, (j.N + 3) / 4);
  for (int64_t b = first; b < last; ++b) {
    const int64_t n0 = 4 * b, nr = std::min<int64_t>(4, j.N - n0);
    for (int64_t m = 0; m < j.M; m += 2) {
      float sums[2][4];
      const int64_t mr = std::min<int64_t>(2, j.M - m);
      if (mr == 2) dot_rows<T, 2>(j.x + m * j.x_stride, j.x_stride, j.w + n0 * j.K, nr, j.K, sums);
      else dot_rows<T, 1>(j.x + m * j.x_stride, j.x_stride, j.w + n0 * j.K, nr, j.K, sums);
      for (int64_t i = 0; i < mr; ++i)
        for (int64_t c = 0; c < nr; ++c)
          j.out[(m + i) * j.out_stride + n0 + c] =
              from_float<T>(sums[i][c] + (j.bias != nullptr ? to_float(j.bias[n0 + c]) : 0.f));
    }
  }
}

template <typename T>
void linear_small_batch(const T* x, int64_t x_stride, const T* w, const T* bias, T* out, int64_t out_stride,
                        int64_t M, int64_t N, int64_t K, int num_threads) {
  const int64_t blocks = (N + 3) / 4;
  // chunks of ~64 KB of weights (at least one block): fine enough to balance, few enough to claim cheaply
  int64_t per_chunk = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, 4 * K * static_cast<int64_t>(sizeof(T))));
  per_chunk = std::max(per_chunk, (blocks + work_pool::MAX_CHUNKS - 1) / work_pool::MAX_CHUNKS);
  const LinearJob<T> job{x, w, bias, out, x_stride, out_stride, M, N, K, per_chunk};
  work_pool::runner().load(std::memory_order_relaxed)(linear_chunk<T>, &job, (blocks + per_chunk - 1) / per_chunk,
                                                     num_threads);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Greedy sampling's argmax over float32 logits rows, as torch.argmax: the first maximal index, and the first NaN
// when a row has one (torch ranks NaN above everything). torch reduces a [32, 49152] batch in ~0.66 ms on one
// thread; here each row is read once by vectorised per-chunk maxima, then only the winning chunk is scanned.
constexpr int64_t ARGMAX_CHUNK = 256;

inline int64_t argmax_row(const float* x, int64_t n, float* chunk_max) {
  const int64_t chunks = (n + ARGMAX_CHUNK - 1) / ARGMAX_CHUNK;
  float best = -INFINITY;
  int nan = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = x + c * ARGMAX_CHUNK;
    const int64_t len = std::min(ARGMAX_CHUNK, n - c * ARGMAX_CHUNK);
    float m = -INFINITY;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < len; ++i) {
      m = xc[i] > m ? xc[i] : m;
      nan |= xc[i] != xc[i];
    }
    chunk_max[c] = m;
    best = m > best ? m : best;
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (x[i] != x[i]) return i;
  }
  for (int64_t c = 0; c < chunks; ++c) {
    if (chunk_max[c] != best) continue;
    for (int64_t i = c * ARGMAX_CHUNK; i < std::min(n, (c + 1) * ARGMAX_CHUNK); ++i)
      if (x[i] == best) return i;
  }
  return 0;  // (every value -inf is caught above: best is -inf and x[0] equals it)
}

void argmax_rows(const float* x, int64_t stride, int64_t rows, int64_t n, int64_t* out) {
  std::vector<float> chunk_max((n + ARGMAX_CHUNK - 1) / ARGMAX_CHUNK);
  for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * stride, n, chunk_max.data());
}

// ---------------------------------------------------------------------------------------------
// C entry points: one per kernel, dispatching on the dtype code.
#define KI_DISPATCH(dtype, CALL)            \
  switch (dtype) {                          \
    case 0: { using T = float; CALL; break; } \
    case 1: { using T = bf16; CALL; break; }  \
    case 2: { using T = f16; CALL; break; }   \
    default: return -1;                     \
  }                                         \
  return 0;

// The same for a kernel of two dtypes: T (activations) and C (the KV cache).
#define KI_DISPATCH_CACHE(cache_dtype, ...)         \
  switch (cache_dtype) {                            \
    case 0: { using C = float; __VA_ARGS__; break; } \
    case 1: { using C = bf16; __VA_ARGS__; break; }  \
    case 2: { using C = f16; __VA_ARGS__; break; }   \
    default: return -1;                             \
  }

extern "C" {

int ki_variant() { return KI_VARIANT; }  // 0 scalar, 1 avx2, 2 avx512: what this build's inner loops use

int ki_rms_norm(int dtype, const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                void* sum_out, int64_t sum_stride, const void* weight, void* out, int64_t out_stride, int64_t rows,
                int64_t hidden, float eps) {
  KI_DISPATCH(dtype, rms_norm<T>(static_cast<const T*>(x), x_stride, static_cast<const T*>(residual),
                                 residual_stride, static_cast<T*>(sum_out), sum_stride, static_cast<const T*>(weight),
                                 static_cast<T*>(out), out_stride, rows, hidden, eps))
}

int ki_silu_and_mul(int dtype, const void* x, int64_t x_stride, void* out, int64_t out_stride, int64_t rows,
                    int64_t d) {
  KI_DISPATCH(dtype, silu_and_mul<T>(static_cast<const T*>(x), x_stride, static_cast<T*>(out), out_stride, rows, d))
}

int ki_rotary_and_store(int dtype, int cache_dtype, const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v,
                        int64_t v_stride, const int64_t* positions, const float* cos_sin, void* q_out, void* k_cache,
                        void* v_cache, const int64_t* slots, int64_t tokens, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim) {
  KI_DISPATCH(dtype, KI_DISPATCH_CACHE(cache_dtype, rotary_and_store<T, C>(
      static_cast<const T*>(q), q_stride, static_cast<const T*>(k), k_stride, static_cast<const T*>(v), v_stride,
      positions, cos_sin, static_cast<T*>(q_out), static_cast<C*>(k_cache), static_cast<C*>(v_cache), slots, tokens,
      num_heads, num_kv_heads, head_dim)))
}

int ki_linear(int dtype, const void* x, int64_t x_stride, const void* weight, const void* bias, void* out,
              int64_t out_stride, int64_t rows, int64_t out_features, int64_t in_features, int num_threads) {
  KI_DISPATCH(dtype, linear_small_batch<T>(static_cast<const T*>(x), x_stride, static_cast<const T*>(weight),
                                           static_cast<const T*>(bias), static_cast<T*>(out), out_stride, rows,
                                           out_features, in_features, num_threads))
}

int ki_argmax_rows(const float* x, int64_t stride, int64_t rows, int64_t n, int64_t* out) {
  if (n < 1) return -1;
  argmax_rows(x, stride, rows, n, out);
  return 0;
}

int ki_paged_decode_attention(int dtype, int cache_dtype, const void* q, int64_t q_stride, void* out, int64_t out_stride,
                              const int64_t* rows, const void* k_cache, const void* v_cache,
                              const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens,
                              int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int num_threads) {
#define KI_ATTENTION(DIM)                                                                                         \
  paged_decode_attention<T, C, DIM>(static_cast<const T*>(q), q_stride, static_cast<T*>(out), out_stride, rows,       \
                                 static_cast<const C*>(k_cache), static_cast<const C*>(v_cache), block_tables,         \
                                 table_stride, seq_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, \
                                 num_threads)
  KI_DISPATCH(dtype, KI_DISPATCH_CACHE(cache_dtype, switch (head_dim) {
    case 64: KI_ATTENTION(64); break;
    case 128: KI_ATTENTION(128); break;
    default: KI_ATTENTION(0);
  }))
#undef KI_ATTENTION
}

}  // extern "C"

KI_PACKED(ki_rms_norm)
KI_PACKED(ki_silu_and_mul)
KI_PACKED(ki_rotary_and_store)
KI_PACKED(ki_linear)
KI_PACKED(ki_paged_decode_attention)

// The work pool (work_pool.h): its run, for the quantized kernels to share (kq_use_work_pool), and the park
// that sends its helpers to sleep at the end of a step.
extern "C" void* ki_work_pool_run() { return reinterpret_cast<void*>(&work_pool::run_here); }
extern "C" int ki_work_pool_park() {
  work_pool::local_pool().park();
  return 0;
}
extern "C" int ki_work_pool_use_openmp(int on) { return work_pool::on_openmp().exchange(on != 0) ? 1 : 0; }

// A recorded decode step's kernel calls, from either library (packed_calls.h).
extern "C" int ki_run_program(const uint64_t* program, int64_t length) {
  return packed::run_program(program, length);
}
