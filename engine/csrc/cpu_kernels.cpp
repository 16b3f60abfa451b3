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

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
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
// RMSNorm, optionally after a residual add: sum = T(x + residual); out = T(w * T(sum * rsqrt(mean(sum^2) + eps)))
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, T* sum_out,
              int64_t sum_stride, const T* weight, T* out, int64_t out_stride, int64_t rows, int64_t hidden,
              float eps) {
  std::vector<float> row(hidden);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    if (residual != nullptr) {
      const T* rr = residual + r * residual_stride;
      T* sr = sum_out + r * sum_stride;
      for (int64_t i = 0; i < hidden; ++i) {
        T s = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
        sr[i] = s;
        row[i] = to_float(s);
      }
    } else {
      for (int64_t i = 0; i < hidden; ++i) row[i] = to_float(xr[i]);
    }
    float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < hidden; ++i) sum_sq += row[i] * row[i];
    const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
    T* o = out + r * out_stride;
    for (int64_t i = 0; i < hidden; ++i)
      o[i] = from_float<T>(to_float(weight[i]) * round_to<T>(row[i] * inv_rms));
  }
}

// ---------------------------------------------------------------------------------------------
// SiLU-and-mul over [gate | up] rows: out = T(T(silu(gate)) * up)
template <typename T>
void silu_and_mul(const T* x, int64_t x_stride, T* out, int64_t out_stride, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * x_stride;
    const T* up = gate + d;
    T* o = out + r * out_stride;
    for (int64_t i = 0; i < d; ++i) {
      const float g = to_float(gate[i]);
      const float silu = round_to<T>(g / (1.f + exp_approx(-g)));
      o[i] = from_float<T>(silu * to_float(up[i]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding ("rotate half" layout) of q and k, then the KV store:
//   q_out[t] = rope(q[t]);  k_cache[slot[t]] = rope(k[t]);  v_cache[slot[t]] = v[t]   (slot < 0: not stored)
// cos/sin come from a float32 [max_position, head_dim] table (cos half, sin half) and are rounded to T
// first, like ``cache[positions].to(dtype)``; each product and sum is rounded to T as in torch.
template <typename T>
inline void rope_row(const T* x, T* y, const float* cos, const float* sin, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float c = round_to<T>(cos[j]), s = round_to<T>(sin[j]);
    const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
    y[j] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    y[j + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

template <typename T>
void rotary_and_store(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                      const int64_t* positions, const float* cos_sin, T* q_out, T* k_cache, T* v_cache,
                      const int64_t* slots, int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim) {
  const int64_t half = head_dim / 2, kv_width = num_kv_heads * head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cos = cos_sin + positions[t] * head_dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < num_heads; ++h)
      rope_row(q + t * q_stride + h * head_dim, q_out + (t * num_heads + h) * head_dim, cos, sin, half);
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < num_kv_heads; ++h)
      rope_row(k + t * k_stride + h * head_dim, k_cache + slot * kv_width + h * head_dim, cos, sin, half);
    std::memcpy(v_cache + slot * kv_width, v + t * v_stride, kv_width * sizeof(T));
  }
}

// Blocks are scattered in memory, so the hardware prefetcher stalls at every block boundary: ask
// for the next block while the current one is processed.
inline void prefetch_block(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

// ---------------------------------------------------------------------------------------------
// The two inner loops of decode attention, over one block's rows of one KV head, for the `group`
// query heads that share it. With AVX-512 and a compile-time head size the rows are converted to
// fp32 in registers and the accumulators stay there; otherwise plain loops the compiler vectorises.
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

// scores[g * len + i] = query[g] . k[i]   for i < n
template <typename T, int HEAD_DIM>
inline void block_scores(const float* query, const T* k, int64_t row_stride, int64_t n, int64_t group,
                         int64_t head_dim, float* scores, int64_t len) {
#if defined(__AVX512F__)
  if constexpr (HEAD_DIM > 0 && HEAD_DIM % 16 == 0) {
    constexpr int chunks = HEAD_DIM / 16;
    for (int64_t g = 0; g < group; ++g) {
      __m512 qv[chunks];
      for (int c = 0; c < chunks; ++c) qv[c] = _mm512_loadu_ps(query + g * HEAD_DIM + 16 * c);
      for (int64_t i = 0; i < n; ++i) {
        const T* kr = k + i * row_stride;
        __m512 dot = _mm512_mul_ps(qv[0], load16(kr));
        for (int c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(qv[c], load16(kr + 16 * c), dot);
        scores[g * len + i] = _mm512_reduce_add_ps(dot);
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = query + g * head_dim;
    for (int64_t i = 0; i < n; ++i) {
      const T* kr = k + i * row_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot = std::fma(qg[d], to_float(kr[d]), dot);
      scores[g * len + i] = dot;
    }
  }
}

// acc[g] += sum_i weights[g * len + i] * v[i]   for i < n
template <typename T, int HEAD_DIM>
inline void block_values(const float* weights, int64_t len, const T* v, int64_t row_stride, int64_t n,
                         int64_t group, int64_t head_dim, float* acc) {
#if defined(__AVX512F__)
  if constexpr (HEAD_DIM > 0 && HEAD_DIM % 16 == 0) {
    constexpr int chunks = HEAD_DIM / 16;
    for (int64_t g = 0; g < group; ++g) {
      __m512 a[chunks];
      for (int c = 0; c < chunks; ++c) a[c] = _mm512_loadu_ps(acc + g * HEAD_DIM + 16 * c);
      for (int64_t i = 0; i < n; ++i) {
        const __m512 w = _mm512_set1_ps(weights[g * len + i]);
        const T* vr = v + i * row_stride;
        for (int c = 0; c < chunks; ++c) a[c] = _mm512_fmadd_ps(w, load16(vr + 16 * c), a[c]);
      }
      for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(acc + g * HEAD_DIM + 16 * c, a[c]);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    float* ag = acc + g * head_dim;
    for (int64_t i = 0; i < n; ++i) {
      const float w = weights[g * len + i];
      const T* vr = v + i * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] = std::fma(w, to_float(vr[d]), ag[d]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention: one query token per sequence, read straight from the block tables.
// Work item = one sequence, all its heads, so each block (every KV head of 16 positions, contiguous
// in the cache) is streamed once per pass. Two passes over the context: the scores, then the
// softmax weights applied to V. Cache layout [num_blocks, block_size, num_kv_heads, head_dim].
// HEAD_DIM > 0 fixes the head size at compile time; 0 reads it at run time.
template <typename T, int HEAD_DIM>
void paged_decode_attention(const T* q, int64_t q_stride, T* out, int64_t out_stride, const int64_t* rows,
                            const T* k_cache, const T* v_cache, const int32_t* block_tables,
                            int64_t table_stride, const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                            int64_t num_kv_heads, int64_t runtime_head_dim, int64_t block_size, float scale,
                            int num_threads) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads, kv_width = num_kv_heads * head_dim;
  const int64_t block_elems = block_size * kv_width, block_bytes = block_elems * static_cast<int64_t>(sizeof(T));
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> query(num_heads * head_dim), acc(num_heads * head_dim), scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t len = seq_lens[s], r = rows[s];
      const int32_t* table = block_tables + s * table_stride;
      const T* qs = q + r * q_stride;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) query[i] = to_float(qs[i]) * scale;
      scores.resize(num_heads * len);
      for (int64_t start = 0, b = 0; start < len; start += block_size, ++b) {
        if (start + block_size < len) prefetch_block(k_cache + table[b + 1] * block_elems, block_bytes);
        const T* block = k_cache + table[b] * block_elems;
        for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
          block_scores<T, HEAD_DIM>(query.data() + kvh * group * head_dim, block + kvh * head_dim, kv_width,
                                    std::min(block_size, len - start), group, head_dim,
                                    scores.data() + kvh * group * len + start, len);
      }
      std::vector<float> denom(num_heads);
      for (int64_t h = 0; h < num_heads; ++h) {
        float* sh = scores.data() + h * len;
        float m = -INFINITY, total = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t p = 0; p < len; ++p) m = sh[p] > m ? sh[p] : m;
#pragma omp simd reduction(+ : total)
        for (int64_t p = 0; p < len; ++p) {
          sh[p] = exp_approx(sh[p] - m);
          total += sh[p];
        }
        denom[h] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0, b = 0; start < len; start += block_size, ++b) {
        if (start + block_size < len) prefetch_block(v_cache + table[b + 1] * block_elems, block_bytes);
        const T* block = v_cache + table[b] * block_elems;
        for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
          block_values<T, HEAD_DIM>(scores.data() + kvh * group * len + start, len, block + kvh * head_dim,
                                    kv_width, std::min(block_size, len - start), group, head_dim,
                                    acc.data() + kvh * group * head_dim);
      }
      T* os = out + r * out_stride;
      for (int64_t h = 0; h < num_heads; ++h) {
        const float inv = 1.f / denom[h];
        for (int64_t d = 0; d < head_dim; ++d) os[h * head_dim + d] = from_float<T>(acc[h * head_dim + d] * inv);
      }
    }
  }
}

}  // namespace

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

extern "C" {

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

int ki_rotary_and_store(int dtype, const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v,
                        int64_t v_stride, const int64_t* positions, const float* cos_sin, void* q_out, void* k_cache,
                        void* v_cache, const int64_t* slots, int64_t tokens, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim) {
  KI_DISPATCH(dtype, rotary_and_store<T>(static_cast<const T*>(q), q_stride, static_cast<const T*>(k), k_stride,
                                         static_cast<const T*>(v), v_stride, positions, cos_sin, static_cast<T*>(q_out),
                                         static_cast<T*>(k_cache), static_cast<T*>(v_cache), slots, tokens, num_heads,
                                         num_kv_heads, head_dim))
}

int ki_paged_decode_attention(int dtype, const void* q, int64_t q_stride, void* out, int64_t out_stride,
                              const int64_t* rows, const void* k_cache, const void* v_cache,
                              const int32_t* block_tables, int64_t table_stride, const int32_t* seq_lens,
                              int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int num_threads) {
#define KI_ATTENTION(DIM)                                                                                         \
  paged_decode_attention<T, DIM>(static_cast<const T*>(q), q_stride, static_cast<T*>(out), out_stride, rows,          \
                                 static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), block_tables,         \
                                 table_stride, seq_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, \
                                 num_threads)
  KI_DISPATCH(dtype, switch (head_dim) {
    case 64: KI_ATTENTION(64); break;
    case 128: KI_ATTENTION(128); break;
    default: KI_ATTENTION(0);
  })
#undef KI_ATTENTION
}

}  // extern "C"
