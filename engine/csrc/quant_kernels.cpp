// kubeinfer quantized matmuls for the CPU: y[m, n] = sum_k x[m, k] * W[n, k], W kept in its quantized blocks.
//
// Weight formats (codes are ggml's type ids, so GGUF tensors pass through unchanged):
//   Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14): rows of GGUF blocks, bit
//   for bit;
//   INT8_ROW (100): int8 rows with one float scale per output row (weight-only int8, --quantization int8).
// Two ways to multiply (act_mode):
//   F32 (0): the weights are dequantised in registers and multiplied with the float32 activations: the result
//     differs from the dense float32 matmul only by rounding order.
//   Q8 (1): as llama.cpp does, the activations are quantized to int8 per block of 32 (one float scale per block
//     and the two half-block sums, for the formats with an offset), so each 32-weight group is one int8 dot
//     product: maddubs + madd on AVX2, dpbusd on AVX-512 VNNI; from g_q8_panel_min_m rows on, an int8 panel
//     GEMM on either. Faster where compute bound, less exact; the engine's default for GGUF formats on x86.
// Both accumulate in fp32; the scalar fallback has both too.
//
// Every format is decoded group by group into (32 unsigned or signed ints, weight scale and offset for each
// half of 16): value = scale * q + offset. That one shape covers all eight formats (Q6_K has a scale per 16).
//
// One source, three instruction sets: the SIMD part below is compiled twice through `#include "quant_kernels.cpp"  // this file again, as the SIMD pass`
// under `#pragma GCC target` (AVX2+FMA+F16C, then AVX-512BW/VL+VNNI), so no -march flag is needed and the
// path is picked at run time from the CPU's features (kq_set_isa caps it, to test the fallbacks).
// Threads split the output rows; the quantized activations live in a buffer that grows but is never freed,
// so a call allocates nothing once warm.

#ifndef KQ_SIMD_PASS

#include <algorithm>
#include <atomic>
#include <array>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "packed_calls.h"
#include "work_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#define KQ_X86 1
#include <immintrin.h>
#endif

namespace kq {

// Activation rows are quantized (and summed) on one thread below this many: a decode batch's rows take a few
// microseconds, less than handing out a job, and one job fewer per matmul is one fewer that a preempted
// thread can hold up.
constexpr int64_t QUANTIZE_PARALLEL_ROWS = 64;

enum Type : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, INT8_ROW = 100 };
enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512_VNNI = 2, AVX512_BF16 = 3 };  // AVX512_BF16: VNNI's and vdpbf16ps

// One block of 32 quantized activations: x ~= d * q; s[h] = d * sum of q over half h (for weight offsets).
struct QBlock {
  float d;
  float s[2];
  int8_t q[32];
};

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block g (0..7) from the 12 packed bytes.
inline void k_scale_min(const uint8_t* s, int g, int* sc, int* mn) {
  if (g < 4) {
    *sc = s[g] & 63;
    *mn = s[g + 4] & 63;
  } else {
    *sc = (s[g + 4] & 0xF) | ((s[g - 4] >> 6) << 4);
    *mn = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

// Bytes per block and elements per block of each format.
inline bool format_of(int type, int64_t* block_bytes, int64_t* block_elems) {
  switch (type) {
    case Q4_0: *block_bytes = 18; *block_elems = 32; return true;
    case Q4_1: *block_bytes = 20; *block_elems = 32; return true;
    case Q5_0: *block_bytes = 22; *block_elems = 32; return true;
    case Q5_1: *block_bytes = 24; *block_elems = 32; return true;
    case Q8_0: *block_bytes = 34; *block_elems = 32; return true;
    case Q4_K: *block_bytes = 144; *block_elems = 256; return true;
    case Q5_K: *block_bytes = 176; *block_elems = 256; return true;
    case Q6_K: *block_bytes = 210; *block_elems = 256; return true;
    case INT8_ROW: *block_bytes = 32; *block_elems = 32; return true;
    default: return false;
  }
}

// One decoded group of 32 weights: value[i] = scale[i / 16] * q[i] + offset[i / 16].
struct Group {
  int q[32];
  float scale[2];
  float offset[2];
};

// Scalar decoders: call fn(group index within the block, Group) for each group of 32.
template <class Fn> inline void decode_scalar(int type, const uint8_t* b, float row_scale, Fn&& fn) {
  Group g;
  switch (type) {
    case Q8_0: {
      g.scale[0] = g.scale[1] = half_to_float(load_u16(b));
      g.offset[0] = g.offset[1] = 0.f;
      for (int i = 0; i < 32; ++i) g.q[i] = static_cast<int8_t>(b[2 + i]);
      fn(0, g);
      return;
    }
    case INT8_ROW: {
      g.scale[0] = g.scale[1] = row_scale;
      g.offset[0] = g.offset[1] = 0.f;
      for (int i = 0; i < 32; ++i) g.q[i] = static_cast<int8_t>(b[i]);
      fn(0, g);
      return;
    }
    case Q4_0:
    case Q4_1:
    case Q5_0:
    case Q5_1: {  // nibbles (Q5: and bit i of the 32-bit qh before them above weight i's)
      const bool five = type == Q5_0 || type == Q5_1, min = type == Q4_1 || type == Q5_1;
      const float d = half_to_float(load_u16(b));
      const float m = min ? half_to_float(load_u16(b + 2)) : (five ? -16.f : -8.f) * d;
      const uint8_t* qh = b + (min ? 4 : 2);
      const uint8_t* qs = five ? qh + 4 : qh;
      const uint32_t high = five ? qh[0] | (qh[1] << 8) | (qh[2] << 16) | (static_cast<uint32_t>(qh[3]) << 24) : 0;
      g.scale[0] = g.scale[1] = d;
      g.offset[0] = g.offset[1] = m;
      for (int i = 0; i < 16; ++i) {
        g.q[i] = (qs[i] & 0xF) | (((high >> i) & 1) << 4);
        g.q[i + 16] = (qs[i] >> 4) | (((high >> (i + 16)) & 1) << 4);
      }
      fn(0, g);
      return;
    }
    case Q4_K:
    case Q5_K: {
      const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (type == Q4_K ? 16 : 48);
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        k_scale_min(scales, j, &sc, &mn);
        g.scale[0] = g.scale[1] = d * sc;
        g.offset[0] = g.offset[1] = -dmin * mn;
        const uint8_t* src = qs + 32 * (j / 2);
        for (int i = 0; i < 32; ++i) {
          int q = (j & 1) ? src[i] >> 4 : src[i] & 0xF;
          if (type == Q5_K) q |= ((qh[i] >> j) & 1) << 4;
          g.q[i] = q;
        }
        fn(j, g);
      }
      return;
    }
    case Q6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half_to_float(load_u16(b + 208));
      for (int j = 0; j < 8; ++j) {
        const int h = j / 4, part = j % 4;
        const uint8_t* l = ql + 64 * h + 32 * (part & 1);
        const uint8_t* hb = qh + 32 * h;
        for (int i = 0; i < 32; ++i) {
          const int low = (part & 2) ? l[i] >> 4 : l[i] & 0xF;
          g.q[i] = low | (((hb[i] >> (2 * part)) & 3) << 4);
        }
        for (int k = 0; k < 2; ++k) {
          g.scale[k] = d * sc[2 * j + k];
          g.offset[k] = -32.f * g.scale[k];
        }
        fn(j, g);
      }
      return;
    }
    default:
      return;
  }
}

namespace scalar {

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, QBlock* out, int nthreads) {
  const int64_t nb = K / 32;
  work_pool::parallel_ranges(M, M >= kq::QUANTIZE_PARALLEL_ROWS ? nthreads : 1, [&](int64_t first, int64_t last) {
  for (int64_t m = first; m < last; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * ldx + 32 * b;
      QBlock& o = out[m * nb + b];
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      int sums[2] = {0, 0};
      for (int i = 0; i < 32; ++i) {
        const int q = static_cast<int>(std::nearbyint(v[i] * id));
        o.q[i] = static_cast<int8_t>(q);
        sums[i / 16] += q;
      }
      o.d = d;
      o.s[0] = d * sums[0];
      o.s[1] = d * sums[1];
    }
  }
  });
}

template <int MT> void row_dot(int type, const uint8_t* w, int64_t block_bytes, int64_t groups_per_block,
                               int64_t nblocks, float row_scale, const QBlock* const* xs, float* res) {
  float acc[MT] = {};
  for (int64_t b = 0; b < nblocks; ++b) {
    decode_scalar(type, w + b * block_bytes, row_scale, [&](int j, const Group& g) {
      const int64_t gi = b * groups_per_block + j;
      for (int t = 0; t < MT; ++t) {
        const QBlock& a = xs[t][gi];
        int dot[2] = {0, 0};
        for (int i = 0; i < 32; ++i) dot[i / 16] += g.q[i] * a.q[i];
        acc[t] += a.d * (g.scale[0] * dot[0] + g.scale[1] * dot[1]) + g.offset[0] * a.s[0] + g.offset[1] * a.s[1];
      }
    });
  }
  for (int t = 0; t < MT; ++t) res[t] = acc[t];
}

// F32 mode: per row, per group of 32, the sums of x over each half (for the weight offsets).
void half_sums(const float* x, int64_t ldx, int64_t M, int64_t K, float* out, int nthreads) {
  const int64_t nb = K / 32;
  work_pool::parallel_ranges(M, M >= kq::QUANTIZE_PARALLEL_ROWS ? nthreads : 1, [&](int64_t first, int64_t last) {
  for (int64_t m = first; m < last; ++m) {
    for (int64_t h = 0; h < 2 * nb; ++h) {
      float sum = 0.f;
      for (int i = 0; i < 16; ++i) sum += x[m * ldx + 16 * h + i];
      out[m * 2 * nb + h] = sum;
    }
  }
  });
}

template <int MT> void row_dot_f32(int type, const uint8_t* w, int64_t block_bytes, int64_t groups_per_block,
                                   int64_t nblocks, float row_scale, const float* const* xs,
                                   const float* const* sums, float* res) {
  float acc[MT] = {};
  for (int64_t b = 0; b < nblocks; ++b) {
    decode_scalar(type, w + b * block_bytes, row_scale, [&](int j, const Group& g) {
      const int64_t gi = b * groups_per_block + j;
      for (int t = 0; t < MT; ++t) {
        const float* x = xs[t] + 32 * gi;
        float dot[2] = {0.f, 0.f};
        for (int i = 0; i < 32; ++i) dot[i / 16] += x[i] * static_cast<float>(g.q[i]);
        acc[t] += g.scale[0] * dot[0] + g.scale[1] * dot[1] + g.offset[0] * sums[t][2 * gi] +
                  g.offset[1] * sums[t][2 * gi + 1];
      }
    });
  }
  for (int t = 0; t < MT; ++t) res[t] = acc[t];
}

}  // namespace scalar

// A scratch buffer per thread and use: grows to the largest request seen, never shrinks (no allocation per
// call once warm). Per thread, so concurrent callers (tests, TP ranks in threads) and the work pool's threads
// in one call never share one; the tag keeps a thread's different uses apart.
enum BufferUse { ACTIVATIONS, HALF_SUMS, PANELS, BF16_PAIRS, BF16_IN, BF16_OUT, Q8_CODES, Q8_SCALES, Q8_STAGING,
                 UNPACKED_ROW };
template <class T, BufferUse USE> T* thread_buffer(int64_t count) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

constexpr int MAX_TEAM = 256;

// body(p) for every panel p in [0, n) on up to `nthreads` threads of the work pool (work_pool.h). Whoever takes
// share t works through its contiguous panels first (as schedule(static): one stream per thread for the
// prefetchers, no shared counter while every thread keeps up), then takes the panels of the other shares not
// started yet. On a busy host a thread the OS preempts mid-job leaves its share to the others, and one that
// has not started yet is not waited for at all. At most MAX_TEAM shares (they live on the stack).
template <class Body> void parallel_panels(int64_t n, int nthreads, Body&& body) {
  const int team = static_cast<int>(std::min<int64_t>({std::max(nthreads, 1), n, MAX_TEAM}));
  if (team <= 1) {
    for (int64_t p = 0; p < n; ++p) body(p);
    return;
  }
  struct alignas(64) Share {  // a cache line each: an owner claiming its own panels touches no other core's line
    std::atomic<int64_t> next;
    int64_t end;
  };
  Share shares[MAX_TEAM];
  for (int t = 0; t < team; ++t) {
    shares[t].next.store(n * t / team, std::memory_order_relaxed);
    shares[t].end = n * (t + 1) / team;
  }
  work_pool::parallel_for(team, team, [&](int64_t me) {
    for (int k = 0; k < team; ++k) {
      Share& share = shares[(me + k) % team];
      for (int64_t p; (p = share.next.fetch_add(1, std::memory_order_relaxed)) < share.end;) body(p);
    }
  });
}

#include "packed_panels.h"  // (the layout of packed weights and its scalar pack/unpack)

// From this many activation rows on, F32 mode dequantises each panel of PANEL_ROWS weight rows once and runs a
// register-tiled float32 GEMM over all of them (compute bound); below it the weights are decoded in registers
// for every four rows (bandwidth bound: decode reads each weight byte once, from DRAM).
inline int64_t g_panel_min_m = 8;  // kq_set_panel_min_rows moves it (benchmarks, tests)
inline int64_t g_wide_min_m = 96;  // from here on the panels are wide and k-major (kq_set_wide_min_rows)
// bfloat16 activations (the engine's bf16 dtype) on a CPU with AVX-512 BF16: from this many rows on, the
// wide panels are rounded to bf16 pairs and multiplied with vdpbf16ps (twice the FMA's products per
// instruction); fewer rows are widened to float32 and take the float32 paths (kq_set_bf16_min_rows).
inline int64_t g_bf16_min_m = 32;  // bench/quant_matmul.py (Zen 5): 0.75x at 16 rows, 1.1x at 32, 1.3x at 48

// Q8-mode calls with at least this many rows use the int8 panels (kq_set_q8_panel_min_rows): each panel's
// weights are unpacked once to bytes and meet every activation row in vpdpbusd (AVX2: vpmaddubsw) tiles.
inline int64_t g_q8_panel_min_m = 2;  // bench/quant_matmul.py (Intel AVX-512 VNNI): 0.82x at 2 rows, 0.65x at 3

// Packed K-quant calls with at least this many rows expand each panel once into an int8 panel of bytes and
// float scales (q8_tile's input) instead of decoding its nibbles and scales again in every tile of Q8_M rows
// (kq_set_packed_expand_min_rows). bench/packed_matmul.py (Zen 4, 4096 x 2048), expanded / packed tiles: Q4_K
// 0.9x at 16 rows, 1.03x at 32, 1.2x at 128; Q6_K (more to decode) 1.03x at 8, 1.3x at 32; Q5_K between.
inline int64_t g_packed_expand_min_m_q4_k = 32, g_packed_expand_min_m_q5_k = 16, g_packed_expand_min_m_q6_k = 8;

inline int64_t* packed_expand_min_m(int type) {
  switch (type) {
    case Q4_K: return &g_packed_expand_min_m_q4_k;
    case Q5_K: return &g_packed_expand_min_m_q5_k;
    case Q6_K: return &g_packed_expand_min_m_q6_k;
    default: return nullptr;
  }
}

// Sets one of the row thresholds above (at least 1); returns its previous value.
inline int64_t set_min_rows(int64_t& threshold, int64_t rows) {
  const int64_t previous = threshold;
  threshold = std::max<int64_t>(1, rows);
  return previous;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's float32 -> bfloat16 conversion (NaNs stay NaNs).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
constexpr int64_t PANEL_ROWS = 16;
// Activation rows per pass over the panels, sized so a pass's rows stay in L2 while every panel meets them.
constexpr int64_t PANEL_X_BYTES = 512 * 1024;

// The row loops, shared by every ISA: threads split the output rows in blocks of ROW_BLOCK; within a
// block, four activation rows at a time reuse each decoded weight group (the weights stay in L1).
constexpr int64_t ROW_BLOCK = 16;
constexpr int M_TILE = 4;
// Decode reads each weight once: without software prefetch a thread waits on DRAM for every row (3 GB/s
// from a 24 GB/s machine), so the bytes PREFETCH_BYTES ahead of the current row are requested while it is
// computed (a distance in bytes, not rows: rows are 0.3-10 KB).
constexpr int64_t PREFETCH_BYTES = 32768;

inline void prefetch_ahead(const uint8_t* row, int64_t row_bytes, const uint8_t* end) {
#if KQ_X86
  const uint8_t* ahead = row + PREFETCH_BYTES;
  for (int64_t off = 0; off < row_bytes && ahead + off < end; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
#else
  (void)row, (void)row_bytes, (void)end;
#endif
}

// The activations of one call, in the mode's form: Q8 blocks, or float32 rows and their half-group sums.
struct Acts {
  const QBlock* q8 = nullptr;  // Q8: [M, K / 32]
  const float* x = nullptr;    // F32: [M, ldx]
  int64_t ldx = 0;
  const float* sums = nullptr;  // F32: [M, 2 * K / 32]
};

struct Tile {  // the activation rows of one M_TILE
  const QBlock* q8[M_TILE];
  const float* x[M_TILE];
  const float* sums[M_TILE];
};

template <class RowDot>
void matmul_rows(const RowDot& row_dot, const uint8_t* w, int64_t row_bytes, const float* row_scales,
                 const Acts& acts, int64_t nb32, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  const int64_t nrb = (N + ROW_BLOCK - 1) / ROW_BLOCK;
  kq::parallel_panels(nrb, nthreads, [&](int64_t rb) {
    const int64_t n0 = rb * ROW_BLOCK, n1 = std::min(N, n0 + ROW_BLOCK);
    for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
      const int mt = static_cast<int>(std::min<int64_t>(M_TILE, M - m0));
      Tile tile;
      for (int t = 0; t < mt; ++t) {
        const int64_t m = m0 + t;
        tile.q8[t] = acts.q8 ? acts.q8 + m * nb32 : nullptr;
        tile.x[t] = acts.x ? acts.x + m * acts.ldx : nullptr;
        tile.sums[t] = acts.sums ? acts.sums + m * 2 * nb32 : nullptr;
      }
      for (int64_t n = n0; n < n1; ++n) {
        if (m0 == 0) prefetch_ahead(w + n * row_bytes, row_bytes, w + N * row_bytes);  // later tiles hit the cache
        float res[M_TILE];
        row_dot(mt, w + n * row_bytes, row_scales ? row_scales[n] : 1.f, tile, res);
        for (int t = 0; t < mt; ++t) y[(m0 + t) * ldy + n] = res[t];
      }
    }
  });
}

}  // namespace kq

#if KQ_X86
#define KQ_SIMD_PASS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace kq::avx2 {
#include "quant_kernels.cpp"  // this file again, as the SIMD pass
}
#pragma GCC pop_options
#undef KQ_SIMD_PASS

#define KQ_SIMD_PASS 2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace kq::avx512 {
#include "quant_kernels.cpp"  // this file again, as the SIMD pass
}
#pragma GCC pop_options
#undef KQ_SIMD_PASS
#endif

namespace kq {

int supported_isa() {
#if KQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return __builtin_cpu_supports("avx512bf16") ? AVX512_BF16 : AVX512_VNNI;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return AVX2;
#endif
  return SCALAR;
}

// The arguments every matmul entry point checks: 0, or the code it returns (with the format's block shape).
int check_matmul(int type, int64_t row_bytes, const float* row_scales, int64_t ldx, int64_t ldy, int64_t M,
                 int64_t N, int64_t K, int64_t* block_bytes, int64_t* block_elems) {
  if (!format_of(type, block_bytes, block_elems)) return 1;
  if (K % *block_elems != 0 || row_bytes < K / *block_elems * *block_bytes) return 2;
  if (M < 0 || N < 0 || ldx < K || ldy < N || (type == INT8_ROW && row_scales == nullptr)) return 3;
  return 0;
}

int g_isa = -1;  // the path in use: the best supported unless capped by kq_set_isa

int current_isa() {
  if (g_isa < 0) g_isa = supported_isa();
  return g_isa;
}

// kq_matmul on packed weights (type: the format's code, PACKED removed): int8 activations (act_mode 1) only,
// on AVX2 or better; N a multiple of PANEL_COLS and rows of whole blocks, as kq_pack_panels wrote them.
int packed_matmul(int type, const uint8_t* w, int64_t row_bytes, const float* x, int64_t ldx, float* y, int64_t ldy,
                  int64_t M, int64_t N, int64_t K, int act_mode, int nthreads) {
  int64_t block_bytes, block_elems;
  if (int status = check_matmul(type, row_bytes, nullptr, ldx, ldy, M, N, K, &block_bytes, &block_elems)) return status;
  if (!packed_rows_fit(type, row_bytes, K) || N % PANEL_COLS) return 2;
  if (act_mode != 1) return 4;  // packed panels feed the int8 tiles only
  const int isa = current_isa();
  if (isa < AVX2) return 5;
  if (M == 0 || N == 0) return 0;
  nthreads = std::max(1, nthreads);
#if KQ_X86
  QBlock* xq = thread_buffer<QBlock, ACTIVATIONS>(M * (K / 32));
  if (isa >= AVX512_VNNI) {
    avx512::quantize_rows(x, ldx, M, K, xq, nthreads);
    return avx512::q8_packed_matmul(type, w, row_bytes, xq, K / 32, M, N, y, ldy, nthreads);
  }
  avx2::quantize_rows(x, ldx, M, K, xq, nthreads);
  return avx2::q8_packed_matmul(type, w, row_bytes, xq, K / 32, M, N, y, ldy, nthreads);
#else
  return 5;
#endif
}

// bf16 rows to float32 (exact) and float32 rows to bf16 (nearest even, as torch rounds), 8 lanes at a time where
// the CPU has AVX2.
void widen_bf16_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* out) {
#if KQ_X86
  if (current_isa() >= AVX2) return avx2::widen_bf16_rows(x, ldx, M, K, out);
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = bf16_to_float(x[m * ldx + k]);
}

void round_bf16_rows(const float* y, int64_t M, int64_t N, uint16_t* out, int64_t ldo) {
#if KQ_X86
  if (current_isa() >= AVX2) return avx2::round_bf16_rows(y, M, N, out, ldo);
#endif
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) out[m * ldo + n] = float_to_bf16(y[m * N + n]);
}

}  // namespace kq

extern "C" {

// Run the parallel kernels on another library's work pool (cpu_kernels' ki_work_pool_run): one set of helper
// threads per process.
int kq_use_work_pool(void* run) {
  if (run == nullptr) return -1;
  work_pool::runner().store(reinterpret_cast<work_pool::RunFn>(run));
  return 0;
}

// The best path this CPU supports (0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512BW/VL+VNNI, 3 that and AVX-512 BF16).
int kq_supported_isa() { return kq::supported_isa(); }

// Use at most `isa` (capped at what the CPU supports); returns the path now in use.
int kq_set_isa(int isa) {
  kq::g_isa = std::max(0, std::min(isa, kq::supported_isa()));
  return kq::g_isa;
}

int kq_current_isa() { return kq::current_isa(); }

// Panel GEMM calls with at least `rows` activation rows use wide k-major panels; returns the previous threshold.
int64_t kq_set_wide_min_rows(int64_t rows) { return kq::set_min_rows(kq::g_wide_min_m, rows); }

// F32-mode calls with at least `rows` activation rows use the panel GEMM; returns the previous threshold.
int64_t kq_set_panel_min_rows(int64_t rows) { return kq::set_min_rows(kq::g_panel_min_m, rows); }

// Bytes of one row of `k` weights in `type`; 0 when the type is unknown or k is not a whole number of blocks.
int64_t kq_row_bytes(int type, int64_t k) {
  int64_t bytes, elems;
  if (!kq::format_of(type, &bytes, &elems) || k % elems != 0) return 0;
  return k / elems * bytes;
}

// y[m, n] (row stride ldy) = sum_k x[m, k] (row stride ldx) * W[n, k] for W's rows of `row_bytes` bytes.
// row_scales: N floats for INT8_ROW (ignored otherwise). act_mode: 0 float32 activations, 1 int8 (Q8) ones.
// Returns 0, or a nonzero code for bad arguments.
int kq_matmul(int type, const void* w, int64_t row_bytes, const float* row_scales, const float* x, int64_t ldx,
              float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int act_mode, int nthreads) {
  if (type & kq::PACKED)
    return kq::packed_matmul(type & ~kq::PACKED, static_cast<const uint8_t*>(w), row_bytes, x, ldx, y, ldy, M, N, K,
                             act_mode, nthreads);
  int64_t block_bytes, block_elems;
  if (int status = kq::check_matmul(type, row_bytes, row_scales, ldx, ldy, M, N, K, &block_bytes, &block_elems))
    return status;
  if (act_mode != 0 && act_mode != 1) return 4;
  if (M == 0 || N == 0) return 0;
  nthreads = std::max(1, nthreads);
  const int64_t nb32 = K / 32, nblocks = K / block_elems, gpb = block_elems / 32;
  const bool q8 = act_mode == 1;
  kq::Acts acts;
  const auto* wb = static_cast<const uint8_t*>(w);
  const int isa = kq::current_isa();
#if KQ_X86
  if (!q8 && M >= kq::g_panel_min_m && isa != kq::SCALAR) {  // dequantises whole rows: x is used as it is
    if (isa >= kq::AVX512_VNNI) return kq::avx512::panel_matmul(type, wb, row_bytes, row_scales, x, ldx, nblocks, K, M, N, y, ldy, nthreads);
    return kq::avx2::panel_matmul(type, wb, row_bytes, row_scales, x, ldx, nblocks, K, M, N, y, ldy, nthreads);
  }
#endif
  if (q8) {
    kq::QBlock* xq = kq::thread_buffer<kq::QBlock, kq::ACTIVATIONS>(M * nb32);
#if KQ_X86
    if (isa >= kq::AVX512_VNNI) kq::avx512::quantize_rows(x, ldx, M, K, xq, nthreads);
    else if (isa == kq::AVX2) kq::avx2::quantize_rows(x, ldx, M, K, xq, nthreads);
    else
#endif
      kq::scalar::quantize_rows(x, ldx, M, K, xq, nthreads);
    acts.q8 = xq;
#if KQ_X86
    if (isa >= kq::AVX512_VNNI && M >= kq::g_q8_panel_min_m)
      return kq::avx512::q8_panel_matmul(type, wb, row_bytes, row_scales, xq, nblocks, M, N, y, ldy, nthreads);
    if (isa == kq::AVX2 && M >= kq::g_q8_panel_min_m)
      return kq::avx2::q8_panel_matmul(type, wb, row_bytes, row_scales, xq, nblocks, M, N, y, ldy, nthreads);
#endif
  } else {
    acts.x = x;
    acts.ldx = ldx;
    if (isa < kq::AVX512_VNNI) {  // the AVX-512 path dequantises the offsets in registers instead
      float* sums = kq::thread_buffer<float, kq::HALF_SUMS>(M * 2 * nb32);
      kq::scalar::half_sums(x, ldx, M, K, sums, nthreads);
      acts.sums = sums;
    }
  }
#if KQ_X86
  if (isa >= kq::AVX512_VNNI) return kq::avx512::matmul(type, q8, wb, row_bytes, row_scales, acts, nb32, nblocks, M, N, y, ldy, nthreads);
  if (isa == kq::AVX2) return kq::avx2::matmul(type, q8, wb, row_bytes, row_scales, acts, nb32, nblocks, M, N, y, ldy, nthreads);
#endif
  auto dot = [&](int mt, const uint8_t* row, float scale, const kq::Tile& tile, float* res) {
    using kq::scalar::row_dot;
    using kq::scalar::row_dot_f32;
    if (q8) {
      switch (mt) {
        case 1: row_dot<1>(type, row, block_bytes, gpb, nblocks, scale, tile.q8, res); break;
        case 2: row_dot<2>(type, row, block_bytes, gpb, nblocks, scale, tile.q8, res); break;
        case 3: row_dot<3>(type, row, block_bytes, gpb, nblocks, scale, tile.q8, res); break;
        default: row_dot<4>(type, row, block_bytes, gpb, nblocks, scale, tile.q8, res); break;
      }
    } else {
      switch (mt) {
        case 1: row_dot_f32<1>(type, row, block_bytes, gpb, nblocks, scale, tile.x, tile.sums, res); break;
        case 2: row_dot_f32<2>(type, row, block_bytes, gpb, nblocks, scale, tile.x, tile.sums, res); break;
        case 3: row_dot_f32<3>(type, row, block_bytes, gpb, nblocks, scale, tile.x, tile.sums, res); break;
        default: row_dot_f32<4>(type, row, block_bytes, gpb, nblocks, scale, tile.x, tile.sums, res); break;
      }
    }
  };
  kq::matmul_rows(dot, wb, row_bytes, row_scales, acts, nb32, M, N, y, ldy, nthreads);
  return 0;
}

// kq_matmul with bfloat16 x and y (the engine's bf16 dtype; y rounded to nearest even). F32 mode on AVX-512
// BF16 from g_bf16_min_m rows on: bf16 products through vdpbf16ps (the weights rounded to bf16, as a dense bf16 model's
// are); otherwise x is widened to float32 and kq_matmul's path runs (act_mode as there).
int kq_matmul_bf16(int type, const void* w, int64_t row_bytes, const float* row_scales, const uint16_t* x,
                   int64_t ldx, uint16_t* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int act_mode, int nthreads) {
  int64_t block_bytes, block_elems;
  if (int status = kq::check_matmul(type & ~kq::PACKED, row_bytes, row_scales, ldx, ldy, M, N, K, &block_bytes,
                                    &block_elems))
    return status;
  if ((type & kq::PACKED) && act_mode != 1) return 4;  // (packed: int8 activations only, widened below)
  if (M == 0 || N == 0) return 0;
#if KQ_X86
  if (act_mode == 0 && kq::current_isa() >= kq::AVX512_BF16 && M >= kq::g_bf16_min_m)
    return kq::avx512::bf16_matmul(type, static_cast<const uint8_t*>(w), row_bytes, row_scales, x, ldx,
                                   K / block_elems, K, M, N, y, ldy, std::max(1, nthreads));
#endif
  float* xf = kq::thread_buffer<float, kq::BF16_IN>(M * K);
  float* yf = kq::thread_buffer<float, kq::BF16_OUT>(M * N);
  kq::widen_bf16_rows(x, ldx, M, K, xf);
  if (int status = kq_matmul(type, w, row_bytes, row_scales, xf, K, yf, N, M, N, K, act_mode, nthreads)) return status;
  kq::round_bf16_rows(yf, M, N, y, ldy);
  return 0;
}

// Q8-mode calls with at least `rows` rows use the int8 panels (AVX-512 VNNI); returns the previous threshold.
int64_t kq_set_q8_panel_min_rows(int64_t rows) { return kq::set_min_rows(kq::g_q8_panel_min_m, rows); }

// Packed calls of `type` (a K-quant) with at least `rows` rows expand each panel for the int8 tiles; returns the
// previous threshold (-1: a type without one).
int64_t kq_set_packed_expand_min_rows(int type, int64_t rows) {
  int64_t* threshold = kq::packed_expand_min_m(type);
  return threshold ? kq::set_min_rows(*threshold, rows) : -1;
}

// bf16 activations with at least `rows` rows use the AVX-512 BF16 panels; returns the previous threshold.
int64_t kq_set_bf16_min_rows(int64_t rows) { return kq::set_min_rows(kq::g_bf16_min_m, rows); }

// Repacks n rows of `type` blocks (row_bytes each: exactly k / (the block's weights) blocks) into dst (as many
// bytes) as packed int8 panels (packed_panels.h); n a multiple of 32. The packed weight's type is then
// type | PACKED (kq_packed_bit).
int kq_pack_panels(int type, const void* src, int64_t row_bytes, int64_t n, int64_t k, void* dst) {
  if (!kq::packable(type)) return 1;
  if (!kq::packed_rows_fit(type, row_bytes, k) || n % kq::PANEL_COLS || n < 0) return 2;
  int64_t block_bytes, block_elems;
  kq::format_of(type, &block_bytes, &block_elems);
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* panel = out + r / kq::PANEL_COLS * kq::PANEL_COLS * row_bytes;
    for (int64_t g = 0; g < k / block_elems; ++g)
      kq::move_block(type, panel + g * kq::PANEL_COLS * block_bytes, r % kq::PANEL_COLS,
                     const_cast<uint8_t*>(in + r * row_bytes + g * block_bytes), true);
  }
  return 0;
}

int kq_packed_bit() { return kq::PACKED; }

// Dequantise `n` rows of `k` weights to float32 (the reference, and the embedding lookup of a quantized table).
// A packed type's rows are unpacked to their blocks first (w: the packed weight's first row, as for any type).
int kq_dequantize_rows(int type, const void* w, int64_t row_bytes, const float* row_scales, int64_t n, int64_t k,
                       float* out) {
  if (type & kq::PACKED) {
    const int base = type & ~kq::PACKED;
    if (!kq::packed_rows_fit(base, row_bytes, k)) return 1;
    uint8_t* blocks = kq::thread_buffer<uint8_t, kq::UNPACKED_ROW>(row_bytes);
    for (int64_t r = 0; r < n; ++r) {
      kq::unpack_row(base, static_cast<const uint8_t*>(w), row_bytes, r, blocks);
      if (int status = kq_dequantize_rows(base, blocks, row_bytes, nullptr, 1, k, out + r * k)) return status;
    }
    return 0;
  }
  int64_t block_bytes, block_elems;
  if (!kq::format_of(type, &block_bytes, &block_elems) || k % block_elems != 0) return 1;
  const auto* wb = static_cast<const uint8_t*>(w);
  for (int64_t r = 0; r < n; ++r) {
    float* o = out + r * k;
    for (int64_t b = 0; b < k / block_elems; ++b) {
      kq::decode_scalar(type, wb + r * row_bytes + b * block_bytes, row_scales ? row_scales[r] : 1.f,
                        [&](int j, const kq::Group& g) {
                          float* dst = o + b * block_elems + 32 * j;
                          for (int i = 0; i < 32; ++i) dst[i] = g.scale[i / 16] * g.q[i] + g.offset[i / 16];
                        });
    }
  }
  return 0;
}

// An embedding lookup in a quantized table: out[i] = row ids[i] - first_row of the `rows` rows in w, dequantised
// to float32, for the ids inside [first_row, first_row + rows); the others are left as they are, or zeroed
// when clear_outside (the first of several row ranges: a table no range holds a row of reads as 0).
// out_bf16: out is bfloat16 (rounded to nearest even), not float32.
int kq_embedding(int type, const void* w, int64_t row_bytes, const float* row_scales, const int64_t* ids, int64_t n,
                 int64_t first_row, int64_t rows, int64_t k, void* out, int clear_outside, int out_bf16) {
  int64_t block_bytes, block_elems;
  const bool packed = type & kq::PACKED;
  if (!kq::format_of(type & ~kq::PACKED, &block_bytes, &block_elems) || k % block_elems != 0 || n < 0) return 1;
  const auto* wb = static_cast<const uint8_t*>(w);
  float* row_f32 = out_bf16 ? kq::thread_buffer<float, kq::BF16_OUT>(k) : nullptr;
  uint8_t* unpacked = packed ? kq::thread_buffer<uint8_t, kq::UNPACKED_ROW>(row_bytes) : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = ids[i] - first_row;
    float* dst = out_bf16 ? row_f32 : static_cast<float*>(out) + i * k;
    if (r >= 0 && r < rows) {
      if (packed) kq::unpack_row(type & ~kq::PACKED, wb, row_bytes, r, unpacked);
      const uint8_t* row = packed ? unpacked : wb + r * row_bytes;
      if (int status = kq_dequantize_rows(type & ~kq::PACKED, row, row_bytes, row_scales ? row_scales + r : nullptr,
                                          1, k, dst))
        return status;
    } else if (clear_outside) {
      std::fill(dst, dst + k, 0.f);
    } else {
      continue;
    }
    if (out_bf16) kq::round_bf16_rows(row_f32, 1, k, static_cast<uint16_t*>(out) + i * k, k);
  }
  return 0;
}

}  // extern "C"

KI_PACKED(kq_matmul)
KI_PACKED(kq_matmul_bf16)
KI_PACKED(kq_embedding)

#else  // ---------------------------------------------------------------------------------------------------------
// The SIMD pass, compiled once per instruction set (KQ_SIMD_PASS 1: AVX2, 2: AVX-512 VNNI), inside kq::<isa>.

using kq::QBlock;

// 8 int32 lanes: lane i sums the products of bytes 4i..4i+3 (lanes 0-3: the first half of 16, 4-7: the second).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if KQ_SIMD_PASS == 2
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline float f16(const uint8_t* p) { return _cvtsh_ss(kq::load_u16(p)); }

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, QBlock* out, int nthreads) {
  const int64_t nb = K / 32;
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  work_pool::parallel_ranges(M, M >= kq::QUANTIZE_PARALLEL_ROWS ? nthreads : 1, [&](int64_t first, int64_t last) {
  for (int64_t m = first; m < last; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + m * ldx + 32 * b;
      __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
             v3 = _mm256_loadu_ps(v + 24);
      __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_mask, v0), _mm256_andnot_ps(sign_mask, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign_mask, v2), _mm256_andnot_ps(sign_mask, v3)));
      __m128 a4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
      const float max_abs = _mm_cvtss_f32(a4);
      const float d = max_abs / 127.f, id = max_abs > 0.f ? 127.f / max_abs : 0.f;
      const __m256 mul = _mm256_set1_ps(id);
      constexpr int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), round));
      __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), round));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), round));
      __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), round));
      QBlock& o = out[m * nb + b];
      o.d = d;
      o.s[0] = d * hsum_i32(_mm256_add_epi32(i0, i1));
      o.s[1] = d * hsum_i32(_mm256_add_epi32(i2, i3));
      __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.q), _mm256_permutevar8x32_epi32(packed, order));
    }
  }
  });
}

// Decoders: fn(group within block, 32 weight bytes, scale lo/hi, offset lo/hi). SIGNED formats give int8 bytes.
struct FmtQ8_0 {
  static constexpr int64_t BYTES = 34, GROUPS = 1, CODE_BITS = 8;  // (as unsigned int8 panel codes)
  static constexpr bool SIGNED = true, SPLIT = false, OFFSET = false, NIBBLES = false;
  template <class Fn> static inline void decode(const uint8_t* b, float, Fn&& fn) {
    const float d = f16(b);
    fn(0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), d, d, 0.f, 0.f);
  }
};

struct FmtInt8Row {
  static constexpr int64_t BYTES = 32, GROUPS = 1, CODE_BITS = 8;
  static constexpr bool SIGNED = true, SPLIT = false, OFFSET = false, NIBBLES = false;
  template <class Fn> static inline void decode(const uint8_t* b, float row_scale, Fn&& fn) {
    fn(0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), row_scale, row_scale, 0.f, 0.f);
  }
};

// The 16 bytes at qs as 32 codes: low nibbles (weights 0-15), then high ones (16-31).
inline __m256i nibble_codes(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

template <bool HAS_MIN> struct FmtQ4 {  // Q4_0 (offset -8 d) and Q4_1 (offset m)
  static constexpr int64_t BYTES = HAS_MIN ? 20 : 18, GROUPS = 1, QS = HAS_MIN ? 4 : 2, CODE_BITS = 4;
  static constexpr bool SIGNED = false, SPLIT = false, OFFSET = true, NIBBLES = true;
  static inline float scale(const uint8_t* b) { return f16(b); }
  static inline float offset(const uint8_t* b) { return HAS_MIN ? f16(b + 2) : -8.f * f16(b); }
  template <class Fn> static inline void decode(const uint8_t* b, float, Fn&& fn) {
    const float d = scale(b), m = offset(b);
    fn(0, nibble_codes(b + QS), d, d, m, m);
  }
};

// Byte i: bit i of the 32 bits at p, at bit 4 (the fifth bits of Q5_0 / Q5_1 codes; llama.cpp's bytes_from_bits_32).
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                               0x0101010101010101, 0x0000000000000000));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                        _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

template <bool HAS_MIN> struct FmtQ5 {  // Q5_0 (offset -16 d) and Q5_1 (offset m): Q4's nibbles and a fifth bit
  static constexpr int64_t BYTES = HAS_MIN ? 24 : 22, GROUPS = 1, QH = HAS_MIN ? 4 : 2, QS = QH + 4, CODE_BITS = 5;
  static constexpr bool SIGNED = false, SPLIT = false, OFFSET = true, NIBBLES = false;
  template <class Fn> static inline void decode(const uint8_t* b, float, Fn&& fn) {
    const float d = f16(b), m = HAS_MIN ? f16(b + 2) : -16.f * d;
    fn(0, _mm256_or_si256(nibble_codes(b + QS), fifth_bits(b + QH)), d, d, m, m);
  }
};

template <bool FIVE_BIT> struct FmtK {  // Q4_K and Q5_K: 8 groups of 32, 6-bit scales and mins
  static constexpr int64_t BYTES = FIVE_BIT ? 176 : 144, GROUPS = 8, CODE_BITS = FIVE_BIT ? 5 : 4;
  static constexpr bool SIGNED = false, SPLIT = false, OFFSET = true, NIBBLES = false;
  template <class Fn> static inline void decode(const uint8_t* b, float, Fn&& fn) {
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qs = b + (FIVE_BIT ? 48 : 16);
    const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256i qh = FIVE_BIT ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
      __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      if (FIVE_BIT) {
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4));
        qh = _mm256_srli_epi16(qh, 2);
      }
      int sc, mn;
      kq::k_scale_min(scales, 2 * j, &sc, &mn);
      fn(2 * j, lo, d * sc, d * sc, -dmin * mn, -dmin * mn);
      kq::k_scale_min(scales, 2 * j + 1, &sc, &mn);
      fn(2 * j + 1, hi, d * sc, d * sc, -dmin * mn, -dmin * mn);
    }
  }
};

struct FmtQ6_K {  // 8 groups of 32 six-bit values (q - 32), an int8 scale per 16
  static constexpr int64_t BYTES = 210, GROUPS = 8, CODE_BITS = 6;
  static constexpr bool SIGNED = false, SPLIT = true, OFFSET = true, NIBBLES = false;
  template <class Fn> static inline void decode(const uint8_t* b, float, Fn&& fn) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      const __m256i lows[4] = {_mm256_and_si256(a, low4), _mm256_and_si256(c, low4),
                               _mm256_and_si256(_mm256_srli_epi16(a, 4), low4),
                               _mm256_and_si256(_mm256_srli_epi16(c, 4), low4)};
      for (int part = 0; part < 4; ++part) {
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * part), two);
        const __m256i q = _mm256_or_si256(lows[part], _mm256_slli_epi16(high, 4));
        const int j = 4 * h + part;
        const float s0 = d * sc[2 * j], s1 = d * sc[2 * j + 1];
        fn(j, q, s0, s1, -32.f * s0, -32.f * s1);
      }
    }
  }
};

// acc += scale * (q . x) and offset += the group's offsets for one decoded group q (scales s, offsets o per half)
// and the activations' block a: the step both int8 row dot products repeat for every group.
template <class F>
inline void q8_group(__m256i q, float s0, float s1, float o0, float o1, const QBlock& a, __m256& acc, float& offset) {
  const __m256i uq = F::SIGNED ? _mm256_sign_epi8(q, q) : q;  // |q| for the signed formats
  __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q));
  if (F::SIGNED) xq = _mm256_sign_epi8(xq, q);  // sign of q moved onto x
  const __m256 scale = F::SPLIT ? _mm256_set_m128(_mm_set1_ps(s1 * a.d), _mm_set1_ps(s0 * a.d))
                                : _mm256_set1_ps(s0 * a.d);
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(uq, xq)), scale, acc);
  if (F::OFFSET) offset += o0 * a.s[0] + o1 * a.s[1];
}

template <class F, int MT>
inline void row_dot(const uint8_t* w, int64_t nblocks, float row_scale, const QBlock* const* xs, float* res) {
  __m256 acc[MT];
  float offsets[MT];
  for (int t = 0; t < MT; ++t) {
    acc[t] = _mm256_setzero_ps();
    offsets[t] = 0.f;
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    F::decode(w + b * F::BYTES, row_scale, [&](int j, __m256i q, float s0, float s1, float o0, float o1) {
      for (int t = 0; t < MT; ++t) q8_group<F>(q, s0, s1, o0, o1, xs[t][b * F::GROUPS + j], acc[t], offsets[t]);
    });
  }
  for (int t = 0; t < MT; ++t) res[t] = hsum(acc[t]) + offsets[t];
}

// One int8 activation row (decode at batch 1) against R weight rows at once: one row's chain of groups (18
// for SmolLM2's 576 inputs) is a chain of dependent FMAs and offset sums that leaves the core waiting; R rows
// interleaved keep R independent chains in flight. Threads split the rows in blocks of ROW_BLOCK.
template <class F, int R>
inline void rows_dot_q8(const uint8_t* w, int64_t row_bytes, int64_t nblocks, const float* row_scales,
                        const QBlock* x, float* res) {
  __m256 acc[R];
  float offsets[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    offsets[r] = 0.f;
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int r = 0; r < R; ++r) {
      F::decode(w + r * row_bytes + b * F::BYTES, row_scales ? row_scales[r] : 1.f,
                [&](int j, __m256i q, float s0, float s1, float o0, float o1) {
        q8_group<F>(q, s0, s1, o0, o1, x[b * F::GROUPS + j], acc[r], offsets[r]);
      });
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r]) + offsets[r];
}

template <class F>
void gemv_q8(const uint8_t* w, int64_t row_bytes, const float* row_scales, const QBlock* x, int64_t nblocks,
             int64_t N, float* y, int nthreads) {
  constexpr int R = 4;
  const int64_t nrb = (N + kq::ROW_BLOCK - 1) / kq::ROW_BLOCK;
  const uint8_t* end = w + N * row_bytes;
  kq::parallel_panels(nrb, nthreads, [&](int64_t rb) {
    const int64_t n1 = std::min(N, (rb + 1) * kq::ROW_BLOCK);
    for (int64_t n = rb * kq::ROW_BLOCK; n < n1; n += R) {
      const int64_t rows = std::min<int64_t>(R, n1 - n);
      for (int64_t r = 0; r < rows; ++r) kq::prefetch_ahead(w + (n + r) * row_bytes, row_bytes, end);
      const float* scales = row_scales ? row_scales + n : nullptr;
      float res[R];
      if (rows == R) {
        rows_dot_q8<F, R>(w + n * row_bytes, row_bytes, nblocks, scales, x, res);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          rows_dot_q8<F, 1>(w + (n + r) * row_bytes, row_bytes, nblocks, scales ? scales + r : nullptr, x, res + r);
      }
      std::memcpy(y + n, res, static_cast<size_t>(rows) * sizeof(float));
    }
  });
}

// F32 mode: the 32 decoded weights widened to 4 x 8 floats (lanes 0-15: the first half) and multiplied with
// float32 activations; acc += scale * (x . q) per half, the offsets through the precomputed sums of x.
template <class F, int MT>
inline void row_dot_f32(const uint8_t* w, int64_t nblocks, float row_scale, const float* const* xs,
                        const float* const* sums, float* res) {
  __m256 acc[MT];
  float offsets[MT];
  for (int t = 0; t < MT; ++t) {
    acc[t] = _mm256_setzero_ps();
    offsets[t] = 0.f;
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    F::decode(w + b * F::BYTES, row_scale, [&](int j, __m256i q, float s0, float s1, float o0, float o1) {
      const int64_t gi = b * F::GROUPS + j;
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      __m256 f[4];
      if (F::SIGNED) {
        f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
      } else {
        f[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        f[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        f[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        f[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      }
      for (int t = 0; t < MT; ++t) {
        const float* x = xs[t] + 32 * gi;
        __m256 h0 = _mm256_mul_ps(f[0], _mm256_loadu_ps(x));
        h0 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(x + 8), h0);
        __m256 h1 = _mm256_mul_ps(f[2], _mm256_loadu_ps(x + 16));
        h1 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(x + 24), h1);
        if (F::SPLIT) {
          acc[t] = _mm256_fmadd_ps(h0, _mm256_set1_ps(s0), acc[t]);
          acc[t] = _mm256_fmadd_ps(h1, _mm256_set1_ps(s1), acc[t]);
        } else {
          acc[t] = _mm256_fmadd_ps(_mm256_add_ps(h0, h1), _mm256_set1_ps(s0), acc[t]);
        }
        if (F::OFFSET) offsets[t] += o0 * sums[t][2 * gi] + o1 * sums[t][2 * gi + 1];
      }
    });
  }
  for (int t = 0; t < MT; ++t) res[t] = hsum(acc[t]) + offsets[t];
}

#if KQ_SIMD_PASS == 2
// F32 mode on AVX-512: each half of 16 weights is one zmm, dequantised in registers to the weights' own values
// (scale * q + offset, once per group for all MT rows) and multiplied with x: no offset sums, half the
// instructions of the 256-bit form, and two accumulators per row so the FMA latency chain is not the limit.
template <class F, int MT>
inline void row_dot_f32_512(const uint8_t* w, int64_t nblocks, float row_scale, const float* const* xs, float* res) {
  __m512 acc0[MT], acc1[MT];
  for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  if constexpr (F::NIBBLES) {
    // Q4_0 / Q4_1: the block's 16 possible values (d * j + m) are one zmm, and vpermps looks each weight up by
    // its nibble (it reads an index's low 4 bits, so the high nibble needs only a shift): the same values as
    // below in fewer instructions, which is what bounds this bandwidth-light format.
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t b = 0; b < nblocks; ++b) {
      const uint8_t* block = w + b * F::BYTES;
      const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(F::scale(block)), _mm512_set1_ps(F::offset(block)));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + F::QS)));
      const __m512 w0 = _mm512_permutexvar_ps(bytes, table);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      for (int t = 0; t < MT; ++t) {
        const float* x = xs[t] + 32 * b;
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc1[t]);
      }
    }
    for (int t = 0; t < MT; ++t) res[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
    return;
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    F::decode(w + b * F::BYTES, row_scale, [&](int j, __m256i q, float s0, float s1, float o0, float o1) {
      const int64_t gi = b * F::GROUPS + j;
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
      const __m512 f0 = _mm512_cvtepi32_ps(F::SIGNED ? _mm512_cvtepi8_epi32(lo) : _mm512_cvtepu8_epi32(lo));
      const __m512 f1 = _mm512_cvtepi32_ps(F::SIGNED ? _mm512_cvtepi8_epi32(hi) : _mm512_cvtepu8_epi32(hi));
      const __m512 w0 = F::OFFSET ? _mm512_fmadd_ps(f0, _mm512_set1_ps(s0), _mm512_set1_ps(o0))
                                  : _mm512_mul_ps(f0, _mm512_set1_ps(s0));
      const __m512 w1 = F::OFFSET ? _mm512_fmadd_ps(f1, _mm512_set1_ps(s1), _mm512_set1_ps(o1))
                                  : _mm512_mul_ps(f1, _mm512_set1_ps(s1));
      for (int t = 0; t < MT; ++t) {
        const float* x = xs[t] + 32 * gi;
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc1[t]);
      }
    });
  }
  for (int t = 0; t < MT; ++t) res[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}
#endif

// ---- The panel GEMM (F32 mode, M >= g_panel_min_m) ----
#if KQ_SIMD_PASS == 2
using Vec = __m512;
constexpr int LANES = 16, TILE_N = 4;  // 4 x 4 accumulators + 4 weight vectors + 1 activation of 32 zmm
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
constexpr int LANES = 8, TILE_N = 3;  // 4 x 3 accumulators + 3 weight vectors + 1 activation of 16 ymm
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return hsum(v); }
#endif
constexpr int TILE_M = 4;

// One weight row to float32 (scale * q + offset, one rounding: the values kq_dequantize_rows gives).
template <class F> inline void dequantize_row(const uint8_t* w, int64_t nblocks, float row_scale, float* out) {
  for (int64_t b = 0; b < nblocks; ++b) {
    F::decode(w + b * F::BYTES, row_scale, [&](int j, __m256i q, float s0, float s1, float o0, float o1) {
      float* dst = out + 32 * (b * F::GROUPS + j);
      const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
#if KQ_SIMD_PASS == 2
      const __m512 f0 = _mm512_cvtepi32_ps(F::SIGNED ? _mm512_cvtepi8_epi32(lo) : _mm512_cvtepu8_epi32(lo));
      const __m512 f1 = _mm512_cvtepi32_ps(F::SIGNED ? _mm512_cvtepi8_epi32(hi) : _mm512_cvtepu8_epi32(hi));
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(f0, _mm512_set1_ps(s0), _mm512_set1_ps(o0)));
      _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(f1, _mm512_set1_ps(s1), _mm512_set1_ps(o1)));
#else
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int i = 0; i < 4; ++i) {
        const __m256 f = _mm256_cvtepi32_ps(F::SIGNED ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]));
        const bool second = i >= 2;
        _mm256_storeu_ps(dst + 8 * i, _mm256_fmadd_ps(f, _mm256_set1_ps(second ? s1 : s0), _mm256_set1_ps(second ? o1 : o0)));
      }
#endif
    });
  }
}

// y[m, n] for MR activation rows and NR dequantised weight rows: MR x NR vector accumulators along k, summed
// across lanes at the end.
template <int MR, int NR>
void gemm_tile(const float* x, int64_t ldx, const float* wp, int64_t K, float* y, int64_t ldy) {
  Vec acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = vzero();
  for (int64_t k = 0; k < K; k += LANES) {
    Vec wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = vload(wp + n * K + k);
    for (int m = 0; m < MR; ++m) {
      const Vec xv = vload(x + m * ldx + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = vfma(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) y[m * ldy + n] = vsum(acc[m][n]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);

template <int MR, int... NRs> constexpr std::array<TileFn, sizeof...(NRs)> tile_row(std::integer_sequence<int, NRs...>) {
  return {&gemm_tile<MR, NRs + 1>...};
}

// TILES[mr - 1][nr - 1]: the full tile and every edge tile.
const std::array<std::array<TileFn, TILE_N>, TILE_M> TILES = {
    tile_row<1>(std::make_integer_sequence<int, TILE_N>{}), tile_row<2>(std::make_integer_sequence<int, TILE_N>{}),
    tile_row<3>(std::make_integer_sequence<int, TILE_N>{}), tile_row<4>(std::make_integer_sequence<int, TILE_N>{})};

// ---- Wide panels (F32 mode, M >= g_wide_min_m): WIDE weight rows dequantised and stored k-major, so the
// micro-kernel broadcasts one activation and multiplies it with WIDE weights at once: no lane sums, and
// each weight vector serves WIDE_M rows. Storing the panel k-major (8 x 8 register transposes) is paid once
// per panel, so it only pays off from many rows on.
#if KQ_SIMD_PASS == 2
constexpr int WIDE_VECS = 2, WIDE_M = 12;  // 12 x 32 tile: 24 accumulators + 2 weight vectors of 32 zmm
inline Vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#else
constexpr int WIDE_VECS = 2, WIDE_M = 6;  // 6 x 16 tile: 12 accumulators + 2 weight vectors of 16 ymm
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#endif
constexpr int WIDE = WIDE_VECS * LANES;

template <int MR>
void wide_tile(const float* x, int64_t ldx, const float* wt, int64_t K, float* y, int64_t ldy, int64_t ncols) {
  Vec acc[MR][WIDE_VECS];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < WIDE_VECS; ++v) acc[m][v] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    Vec wv[WIDE_VECS];
    for (int v = 0; v < WIDE_VECS; ++v) wv[v] = vload(wt + k * WIDE + v * LANES);
    for (int m = 0; m < MR; ++m) {
      const Vec xb = vbroadcast(x + m * ldx + k);
      for (int v = 0; v < WIDE_VECS; ++v) acc[m][v] = vfma(xb, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if (ncols == WIDE) {
      for (int v = 0; v < WIDE_VECS; ++v) vstore(y + m * ldy + v * LANES, acc[m][v]);
    } else {  // the last panel of a matrix whose rows are not a multiple of WIDE
      alignas(64) float row[WIDE];
      for (int v = 0; v < WIDE_VECS; ++v) vstore(row + v * LANES, acc[m][v]);
      std::memcpy(y + m * ldy, row, static_cast<size_t>(ncols) * sizeof(float));
    }
  }
}

using WideFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

template <int... MRs> constexpr std::array<WideFn, sizeof...(MRs)> wide_tiles(std::integer_sequence<int, MRs...>) {
  return {&wide_tile<MRs + 1>...};
}

const std::array<WideFn, WIDE_M> WIDE_TILES = wide_tiles(std::make_integer_sequence<int, WIDE_M>{});  // [mr - 1]

// dst[i * ldd + j] = src[j * lds + i] for an 8 x 8 block of floats (the classic unpack/shuffle/permute).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// Weight rows n0 .. n0 + rows (rows <= WIDE; the rest of the panel zero) dequantised and stored k-major, WIDE
// floats per k, in this thread's panel buffer (eight dequantised rows first, then the panel).
template <class F>
const float* wide_panel(const uint8_t* w, int64_t row_bytes, const float* row_scales, int64_t nblocks, int64_t K,
                        int64_t n0, int64_t rows) {
  float* eight = kq::thread_buffer<float, kq::PANELS>((WIDE + 8) * K);
  float* panel = eight + 8 * K;
  for (int64_t r0 = 0; r0 < WIDE; r0 += 8) {
    for (int64_t r = r0; r < r0 + 8; ++r) {
      float* dst = eight + (r - r0) * K;
      if (r < rows) dequantize_row<F>(w + (n0 + r) * row_bytes, nblocks, row_scales ? row_scales[n0 + r] : 1.f, dst);
      else std::fill(dst, dst + K, 0.f);
    }
    for (int64_t k = 0; k < K; k += 8) transpose8(eight + k, K, panel + k * WIDE + r0, WIDE);
  }
  return panel;
}

template <class F>
void wide_run(const uint8_t* w, int64_t row_bytes, const float* row_scales, const float* x, int64_t ldx,
              int64_t nblocks, int64_t K, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  const int64_t npanels = (N + WIDE - 1) / WIDE;
  // Every panel meets all M rows (transposed once): 2 * WIDE flops per activation byte read, which L3 feeds.
  kq::parallel_panels(npanels, nthreads, [&](int64_t p) {
    const int64_t n0 = p * WIDE, rows = std::min<int64_t>(WIDE, N - n0);
    const float* panel = wide_panel<F>(w, row_bytes, row_scales, nblocks, K, n0, rows);
    for (int64_t m0 = 0; m0 < M; m0 += WIDE_M) {
      const int64_t mr = std::min<int64_t>(WIDE_M, M - m0);
      WIDE_TILES[mr - 1](x + m0 * ldx, ldx, panel, K, y + m0 * ldy + n0, ldy, rows);
    }
  });
}

template <class F>
void panel_run(const uint8_t* w, int64_t row_bytes, const float* row_scales, const float* x, int64_t ldx,
               int64_t nblocks, int64_t K, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  if (M >= kq::g_wide_min_m) return wide_run<F>(w, row_bytes, row_scales, x, ldx, nblocks, K, M, N, y, ldy, nthreads);
  const int64_t npanels = (N + kq::PANEL_ROWS - 1) / kq::PANEL_ROWS;
  const int64_t chunk = std::max<int64_t>(TILE_M, kq::PANEL_X_BYTES / (K * 4) / TILE_M * TILE_M);
  const int64_t team = std::min<int64_t>(std::max(nthreads, 1), npanels);
  work_pool::parallel_for(team, static_cast<int>(team), [&](int64_t t) {
    float* panel = kq::thread_buffer<float, kq::PANELS>(kq::PANEL_ROWS * K);
    for (int64_t mc = 0; mc < M; mc += chunk) {  // the same panels, share t's, in every pass
      const int64_t mc1 = std::min(M, mc + chunk);
      for (int64_t p = npanels * t / team; p < npanels * (t + 1) / team; ++p) {
        const int64_t n0 = p * kq::PANEL_ROWS, rows = std::min(kq::PANEL_ROWS, N - n0);
        for (int64_t r = 0; r < rows; ++r)
          dequantize_row<F>(w + (n0 + r) * row_bytes, nblocks, row_scales ? row_scales[n0 + r] : 1.f, panel + r * K);
        for (int64_t m0 = mc; m0 < mc1; m0 += TILE_M) {
          const int mr = static_cast<int>(std::min<int64_t>(TILE_M, mc1 - m0));
          for (int64_t r = 0; r < rows; r += TILE_N) {
            const int nr = static_cast<int>(std::min<int64_t>(TILE_N, rows - r));
            TILES[mr - 1][nr - 1](x + m0 * ldx, ldx, panel + r * K, K, y + m0 * ldy + n0 + r, ldy);
          }
        }
      }
    }
  });
}

#if KQ_SIMD_PASS == 2
// ---- bf16 activations on AVX-512 BF16 (M >= g_bf16_min_m): the wide panels again, each (k, k + 1) pair of a
// column's dequantised weights rounded to two bf16 in one dword, so vdpbf16ps adds both products into the
// column's float32 lane; each activation pair is one broadcast dword. Only these functions use AVX-512 BF16:
// the rest of the pass runs on CPUs without it.
#define KQ_BF16_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

template <int MR>
KQ_BF16_TARGET void bf16_tile(const uint16_t* x, int64_t ldx, const uint32_t* pairs, int64_t K, uint16_t* y,
                              int64_t ldy, int64_t ncols) {
  __m512 acc[MR][WIDE_VECS];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < WIDE_VECS; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __m512bh wv[WIDE_VECS];
    for (int v = 0; v < WIDE_VECS; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(pairs + kp * WIDE + v * LANES);
    for (int m = 0; m < MR; ++m) {
      uint32_t xpair;
      std::memcpy(&xpair, x + m * ldx + 2 * kp, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpair));
      for (int v = 0; v < WIDE_VECS; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xb, wv[v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(64) uint16_t row[WIDE];
    for (int v = 0; v < WIDE_VECS; ++v)
      _mm256_store_si256(reinterpret_cast<__m256i*>(row + v * LANES), (__m256i)_mm512_cvtneps_pbh(acc[m][v]));
    std::memcpy(y + m * ldy, row, static_cast<size_t>(ncols) * sizeof(uint16_t));
  }
}

using Bf16Fn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, uint16_t*, int64_t, int64_t);

template <int... MRs> constexpr std::array<Bf16Fn, sizeof...(MRs)> bf16_tiles(std::integer_sequence<int, MRs...>) {
  return {&bf16_tile<MRs + 1>...};
}

const std::array<Bf16Fn, WIDE_M> BF16_TILES = bf16_tiles(std::make_integer_sequence<int, WIDE_M>{});  // [mr - 1]

template <class F>
KQ_BF16_TARGET void bf16_run(const uint8_t* w, int64_t row_bytes, const float* row_scales, const uint16_t* x,
                             int64_t ldx, int64_t nblocks, int64_t K, int64_t M, int64_t N, uint16_t* y, int64_t ldy,
                             int nthreads) {
  const int64_t npanels = (N + WIDE - 1) / WIDE;
  kq::parallel_panels(npanels, nthreads, [&](int64_t p) {
    const int64_t n0 = p * WIDE, rows = std::min<int64_t>(WIDE, N - n0);
    const float* panel = wide_panel<F>(w, row_bytes, row_scales, nblocks, K, n0, rows);
    uint32_t* pairs = kq::thread_buffer<uint32_t, kq::BF16_PAIRS>(K / 2 * WIDE);
    for (int64_t kp = 0; kp < K / 2; ++kp) {
      for (int v = 0; v < WIDE_VECS; ++v) {
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(panel + 2 * kp * WIDE + v * LANES)));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(panel + (2 * kp + 1) * WIDE + v * LANES)));
        _mm512_storeu_si512(pairs + kp * WIDE + v * LANES, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += WIDE_M) {
      const int64_t mr = std::min<int64_t>(WIDE_M, M - m0);
      BF16_TILES[mr - 1](x + m0 * ldx, ldx, pairs, K, y + m0 * ldy + n0, ldy, rows);
    }
  });
}
#endif

// ---- int8 panels (Q8 mode, M >= g_q8_panel_min_m; both passes): Q8_COLS weight rows unpacked once to unsigned byte codes
// (the signed formats shifted by 128 into an offset), stored per group of 32 as 8 k-quads x Q8_COLS dwords, so
// one instruction multiplies a broadcast quad of a row's int8 activations with 16 columns (vpdpbusd) or 8
// (AVX2: vpmaddubsw, int16 sums widened by vpmaddwd). Per group and
// column: value = scale[h] * code + offset[h] for each half h of 16 (one scale per 32 unless F::SPLIT). So
//   y[m, n] = sum_groups d_x * sum_h scale[h] * (codes . q_x)_h + offset[h] * s_x[h]
// (s_x[h] = d_x * the half's sum of q_x, kept in QBlock): llama.cpp's arithmetic, in a GEMM.
constexpr int Q8_COLS = 32, Q8_M = 4;
constexpr int64_t Q8_PREFETCH_GROUPS = 6;  // (direct panels: 6 blocks of 18-34 bytes, 2-3 cache lines ahead)

struct Q8Panel {
  const uint32_t* codes;  // [groups][8 quads][Q8_COLS]: bytes 4 qd .. 4 qd + 3 of each column's group
  const float* scale;     // [groups][2 halves][Q8_COLS]
  const float* offset;    // [groups][2 halves][Q8_COLS]
};

// The 16 bytes at `offset` in each of N columns' blocks (column c at w + c * row_bytes); columns >= rows zero.
template <int N> inline void load_columns(const uint8_t* w, int64_t row_bytes, int64_t offset, int64_t rows,
                                          __m128i col[N]) {
  if (rows >= N) {
    for (int c = 0; c < N; ++c) col[c] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * row_bytes + offset));
  } else {
    for (int c = 0; c < N; ++c)
      col[c] = c < rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * row_bytes + offset))
                        : _mm_setzero_si128();
  }
}

// The formats whose bytes are already quads, without decoding column by column. Per ISA, for LANES columns
// (column c at w + c * row_bytes; columns >= rows read as zero): 16 bytes at `offset` in each column's block
// are 4 dwords; quads_of_columns gives z[d], dword d of every column. block_heads gives each block's first
// dword: the f16 scale in its low half, Q4_1's f16 min in its high half, as float vectors.
#if KQ_SIMD_PASS == 2
constexpr int Q8_LANES = 16;
using CodeVec = __m512i;
using ScaleVec = __m512;

// (a 4 x 4 dword transpose inside each group of 4 columns, then a 4 x 4 transpose of the 128-bit lanes)
inline void quads_of_columns(const uint8_t* w, int64_t row_bytes, int64_t offset, int64_t rows, __m512i z[4]) {
  const __m512i within = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m128i col[16];  // (independent loads joined in a tree: a chain of masked inserts serialises them)
  load_columns<16>(w, row_bytes, offset, rows, col);
  __m512i a[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i lo = _mm256_set_m128i(col[4 * j + 1], col[4 * j]), hi = _mm256_set_m128i(col[4 * j + 3], col[4 * j + 2]);
    a[j] = _mm512_permutexvar_epi32(within, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
  const __m512i t0 = _mm512_shuffle_i32x4(a[0], a[1], 0x44), t1 = _mm512_shuffle_i32x4(a[0], a[1], 0xEE);
  const __m512i t2 = _mm512_shuffle_i32x4(a[2], a[3], 0x44), t3 = _mm512_shuffle_i32x4(a[2], a[3], 0xEE);
  z[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  z[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  z[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  z[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}

inline void block_heads(const uint8_t* w, int64_t row_bytes, int64_t rows, __m512* scale, __m512* min) {
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(static_cast<int>(row_bytes)));
  const __mmask16 present = rows >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(rows, 0)) - 1);
  const __m512i heads = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, at, w, 1);
  *scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads));
  *min = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(heads, 16)));
}

inline __m512i low_nibbles(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline __m512i high_nibbles(__m512i v) { return _mm512_and_si512(_mm512_srli_epi32(v, 4), _mm512_set1_epi8(0x0F)); }
inline __m512i flip_sign(__m512i v) { return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80))); }
inline void store_codes(uint32_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
inline __m512 times(__m512 v, float f) { return _mm512_mul_ps(v, _mm512_set1_ps(f)); }
inline void store_scales(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
#else
constexpr int Q8_LANES = 8;
using CodeVec = __m256i;
using ScaleVec = __m256;

// (columns c and c + 4 share a register, one per 128-bit lane: a 4 x 4 dword transpose inside each lane)
inline void quads_of_columns(const uint8_t* w, int64_t row_bytes, int64_t offset, int64_t rows, __m256i z[4]) {
  __m128i col[8];
  load_columns<8>(w, row_bytes, offset, rows, col);
  __m256i a[4];
  for (int j = 0; j < 4; ++j) a[j] = _mm256_set_m128i(col[j + 4], col[j]);
  const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpacklo_epi32(a[2], a[3]);
  const __m256i t2 = _mm256_unpackhi_epi32(a[0], a[1]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
  z[0] = _mm256_unpacklo_epi64(t0, t1);
  z[1] = _mm256_unpackhi_epi64(t0, t1);
  z[2] = _mm256_unpacklo_epi64(t2, t3);
  z[3] = _mm256_unpackhi_epi64(t2, t3);
}

inline void block_heads(const uint8_t* w, int64_t row_bytes, int64_t rows, __m256* scale, __m256* min) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i at = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(row_bytes)));
  const __m256i present = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(rows, 0))), lane);
  const __m256i heads = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(w), at,
                                                    present, 1);
  const __m256i lo = _mm256_and_si256(heads, _mm256_set1_epi32(0xFFFF)), hi = _mm256_srli_epi32(heads, 16);
  // (the halves are <= 0xFFFF: unsigned saturation packs them exactly)
  *scale = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)));
  *min = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
}

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi32(v, 4), _mm256_set1_epi8(0x0F)); }
inline __m256i flip_sign(__m256i v) { return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80))); }
inline void store_codes(uint32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline __m256 times(__m256 v, float f) { return _mm256_mul_ps(v, _mm256_set1_ps(f)); }
inline void store_scales(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
#endif

// Q4_0 / Q4_1 and Q8_0 panels straight from their blocks, the formats that bound a Q4 model and its Q8_0 head.
// Q4: dword d of a block's 16 nibble bytes holds k = 4d..4d+3 in its low nibbles and k = 16+4d.. in its high
// ones (quads d and 4 + d); Q8_0: its 32 int8 are quads 0..7 as they are, shifted by 128 into unsigned codes.
template <class F>
void q8_panel_direct(const uint8_t* w, int64_t row_bytes, int64_t nblocks, int64_t n0, int64_t rows,
                     uint32_t* codes, float* scale, float* offset) {
  constexpr bool Q8 = std::is_same_v<F, FmtQ8_0>;
  constexpr int VECS = Q8_COLS / Q8_LANES;
  for (int64_t g = 0; g < nblocks; ++g) {
    // The panel's columns are Q8_COLS strided streams, more than the hardware prefetchers follow: ask for
    // each column's block a few groups ahead (from DRAM, or L3 when a layer is re-run)
    if (g + Q8_PREFETCH_GROUPS < nblocks)
      for (int64_t c = 0; c < std::min<int64_t>(rows, Q8_COLS); ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + c) * row_bytes + (g + Q8_PREFETCH_GROUPS) * F::BYTES),
                     _MM_HINT_T0);
    for (int v = 0; v < VECS; ++v) {
      const uint8_t* first = w + (n0 + Q8_LANES * v) * row_bytes + g * F::BYTES;
      const int64_t columns = std::min<int64_t>(Q8_LANES, rows - Q8_LANES * v);  // (absent: codes, scale, offset 0)
      uint32_t* group = codes + g * 8 * Q8_COLS + Q8_LANES * v;
      CodeVec z[4];
      if constexpr (Q8) {
        for (int half = 0; half < 2; ++half) {
          quads_of_columns(first, row_bytes, 2 + 16 * half, columns, z);
          for (int d = 0; d < 4; ++d) store_codes(group + (4 * half + d) * Q8_COLS, flip_sign(z[d]));
        }
      } else {
        quads_of_columns(first, row_bytes, F::QS, columns, z);
        for (int d = 0; d < 4; ++d) {
          store_codes(group + d * Q8_COLS, low_nibbles(z[d]));
          store_codes(group + (4 + d) * Q8_COLS, high_nibbles(z[d]));
        }
      }
      ScaleVec d, m;  // (the tiles read half 0 only: one scale per 32)
      block_heads(first, row_bytes, columns, &d, &m);
      store_scales(scale + g * 2 * Q8_COLS + Q8_LANES * v, d);
      ScaleVec o;
      if constexpr (Q8) o = times(d, -128.f);  // (zero-filled codes of absent columns: 0 * d + 0)
      else if constexpr (F::QS == 4) o = m;    // Q4_1's min
      else o = times(d, -8.f);                 // Q4_0
      store_scales(offset + g * 2 * Q8_COLS + Q8_LANES * v, o);
    }
  }
}

// Weight rows n0 .. n0 + rows (rows <= Q8_COLS; the rest of the panel zero) as a Q8Panel in this thread's buffers.
template <class F>
Q8Panel q8_panel(const uint8_t* w, int64_t row_bytes, const float* row_scales, int64_t nblocks, int64_t n0,
                 int64_t rows) {
  const int64_t groups = nblocks * F::GROUPS;
  uint32_t* codes = kq::thread_buffer<uint32_t, kq::Q8_CODES>(groups * 8 * Q8_COLS);
  float* scale = kq::thread_buffer<float, kq::Q8_SCALES>(groups * 4 * Q8_COLS);
  float* offset = scale + groups * 2 * Q8_COLS;
  if constexpr (F::NIBBLES || std::is_same_v<F, FmtQ8_0>) {
    q8_panel_direct<F>(w, row_bytes, nblocks, n0, rows, codes, scale, offset);
    return {codes, scale, offset};
  }
  uint32_t* eight = kq::thread_buffer<uint32_t, kq::Q8_STAGING>(8 * groups * 8);  // 8 columns' codes, row-major
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t r0 = 0; r0 < Q8_COLS; r0 += 8) {
    for (int64_t r = r0; r < r0 + 8; ++r) {
      uint32_t* dst = eight + (r - r0) * groups * 8;  // r: the column within the panel
      if (r >= rows) {
        std::fill(dst, dst + groups * 8, 0u);
        for (int64_t g = 0; g < groups; ++g)
          for (int h = 0; h < 2; ++h) scale[(g * 2 + h) * Q8_COLS + r] = offset[(g * 2 + h) * Q8_COLS + r] = 0.f;
        continue;
      }
      const uint8_t* row = w + (n0 + r) * row_bytes;
      const float row_scale = row_scales ? row_scales[n0 + r] : 1.f;
      for (int64_t b = 0; b < nblocks; ++b) {
        F::decode(row + b * F::BYTES, row_scale, [&](int j, __m256i q, float s0, float s1, float o0, float o1) {
          const int64_t g = b * F::GROUPS + j;
          if (F::SIGNED) {  // int8 q = (q ^ 0x80) - 128 as an unsigned code
            q = _mm256_xor_si256(q, flip);
            o0 = -128.f * s0;
            o1 = -128.f * s1;
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 8), q);
          scale[(g * 2) * Q8_COLS + r] = s0;
          scale[(g * 2 + 1) * Q8_COLS + r] = s1;
          offset[(g * 2) * Q8_COLS + r] = o0;
          offset[(g * 2 + 1) * Q8_COLS + r] = o1;
        });
      }
    }
    for (int64_t g = 0; g < groups; ++g)  // (the transpose moves dwords: floats' bits, unchanged)
      transpose8(reinterpret_cast<const float*>(eight + g * 8), groups * 8,
                 reinterpret_cast<float*>(codes + g * 8 * Q8_COLS + r0), Q8_COLS);
  }
  return {codes, scale, offset};
}

#if KQ_SIMD_PASS == 2
template <int MR, class F>
void q8_tile(const QBlock* x, int64_t groups, const Q8Panel& p, float* y, int64_t ldy, int64_t ncols) {
  constexpr bool SPLIT = F::SPLIT;
  constexpr int Q8_VECS = Q8_COLS / 16, HALVES = SPLIT ? 2 : 1, QUADS = 8 / HALVES;
  __m512 acc[MR][Q8_VECS];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < Q8_VECS; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint32_t* codes = p.codes + g * 8 * Q8_COLS;
    for (int h = 0; h < HALVES; ++h) {
      __m512i dots[MR][Q8_VECS];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < Q8_VECS; ++v) dots[m][v] = _mm512_setzero_si512();
      for (int qd = h * QUADS; qd < (h + 1) * QUADS; ++qd) {
        __m512i wv[Q8_VECS];
        for (int v = 0; v < Q8_VECS; ++v) wv[v] = _mm512_loadu_si512(codes + qd * Q8_COLS + 16 * v);
        for (int m = 0; m < MR; ++m) {
          int32_t quad;
          std::memcpy(&quad, x[m * groups + g].q + 4 * qd, 4);
          const __m512i xb = _mm512_set1_epi32(quad);
          for (int v = 0; v < Q8_VECS; ++v) dots[m][v] = _mm512_dpbusd_epi32(dots[m][v], wv[v], xb);
        }
      }
      const float* scale = p.scale + (g * 2 + h) * Q8_COLS;
      const float* offset = p.offset + (g * 2 + h) * Q8_COLS;
      for (int m = 0; m < MR; ++m) {
        const QBlock& a = x[m * groups + g];
        const __m512 d = _mm512_set1_ps(a.d), s = _mm512_set1_ps(SPLIT ? a.s[h] : a.s[0] + a.s[1]);
        for (int v = 0; v < Q8_VECS; ++v) {
          const __m512 sd = _mm512_mul_ps(_mm512_loadu_ps(scale + 16 * v), d);
          acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[m][v]), sd, acc[m][v]);
          acc[m][v] = _mm512_fmadd_ps(_mm512_loadu_ps(offset + 16 * v), s, acc[m][v]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(64) float row[Q8_COLS];
    for (int v = 0; v < Q8_VECS; ++v) _mm512_store_ps(row + 16 * v, acc[m][v]);
    std::memcpy(y + m * ldy, row, static_cast<size_t>(ncols) * sizeof(float));
  }
}

#else
// AVX2 has no vpdpbusd: vpmaddubsw multiplies the unsigned codes with the int8 activations into int16 pair
// sums, FLUSH quads of them are added as int16 (FLUSH * 2 * 127 * (2^CODE_BITS - 1) <= 32767: 8 quads of 4-bit
// codes, 4 of 5-bit, 2 of 6-bit) and widened by vpmaddwd. 8-bit codes would saturate the pair sums: they are
// split into nibbles (code = 16 hi + lo), each summed as 4-bit codes. 16 columns (8 for the split) per pass.
template <int MR, class F>
void q8_tile(const QBlock* x, int64_t groups, const Q8Panel& p, float* y, int64_t ldy, int64_t ncols) {
  constexpr bool SPLIT = F::SPLIT, NIBBLE_SPLIT = F::CODE_BITS == 8;
  constexpr int HALVES = SPLIT ? 2 : 1, QUADS = 8 / HALVES, NV = NIBBLE_SPLIT ? 1 : 2;
  constexpr int FLUSH = std::min(QUADS, F::CODE_BITS == 5 ? 4 : F::CODE_BITS == 6 ? 2 : 8);
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  for (int64_t c0 = 0; c0 < ncols; c0 += 8 * NV) {
    __m256 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* codes = p.codes + g * 8 * Q8_COLS + c0;
      for (int h = 0; h < HALVES; ++h) {
        __m256i dots[MR][NV];
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NV; ++v) dots[m][v] = _mm256_setzero_si256();
        for (int q0 = h * QUADS; q0 < (h + 1) * QUADS; q0 += FLUSH) {
          __m256i lo[MR][NV], hi[MR][NV];
          for (int m = 0; m < MR; ++m)
            for (int v = 0; v < NV; ++v) lo[m][v] = hi[m][v] = _mm256_setzero_si256();
          for (int qd = q0; qd < q0 + FLUSH; ++qd) {
            __m256i wv[NV], wh[NV];
            for (int v = 0; v < NV; ++v) {
              wv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + qd * Q8_COLS + 8 * v));
              if (NIBBLE_SPLIT) {
                wh[v] = _mm256_and_si256(_mm256_srli_epi16(wv[v], 4), low4);
                wv[v] = _mm256_and_si256(wv[v], low4);
              }
            }
            for (int m = 0; m < MR; ++m) {
              int32_t quad;
              std::memcpy(&quad, x[m * groups + g].q + 4 * qd, 4);
              const __m256i xb = _mm256_set1_epi32(quad);
              for (int v = 0; v < NV; ++v) {
                lo[m][v] = _mm256_add_epi16(lo[m][v], _mm256_maddubs_epi16(wv[v], xb));
                if (NIBBLE_SPLIT) hi[m][v] = _mm256_add_epi16(hi[m][v], _mm256_maddubs_epi16(wh[v], xb));
              }
            }
          }
          for (int m = 0; m < MR; ++m)
            for (int v = 0; v < NV; ++v) {
              dots[m][v] = _mm256_add_epi32(dots[m][v], _mm256_madd_epi16(lo[m][v], ones));
              if (NIBBLE_SPLIT)
                dots[m][v] = _mm256_add_epi32(dots[m][v], _mm256_slli_epi32(_mm256_madd_epi16(hi[m][v], ones), 4));
            }
        }
        const float* scale = p.scale + (g * 2 + h) * Q8_COLS + c0;
        const float* offset = p.offset + (g * 2 + h) * Q8_COLS + c0;
        for (int m = 0; m < MR; ++m) {
          const QBlock& a = x[m * groups + g];
          const __m256 d = _mm256_set1_ps(a.d), s = _mm256_set1_ps(SPLIT ? a.s[h] : a.s[0] + a.s[1]);
          for (int v = 0; v < NV; ++v) {
            const __m256 sd = _mm256_mul_ps(_mm256_loadu_ps(scale + 8 * v), d);
            acc[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[m][v]), sd, acc[m][v]);
            acc[m][v] = _mm256_fmadd_ps(_mm256_loadu_ps(offset + 8 * v), s, acc[m][v]);
          }
        }
      }
    }
    const int64_t width = std::min<int64_t>(8 * NV, ncols - c0);
    for (int m = 0; m < MR; ++m) {
      alignas(32) float row[8 * NV];
      for (int v = 0; v < NV; ++v) _mm256_store_ps(row + 8 * v, acc[m][v]);
      std::memcpy(y + m * ldy + c0, row, static_cast<size_t>(width) * sizeof(float));
    }
  }
}

#endif

using Q8Fn = void (*)(const QBlock*, int64_t, const Q8Panel&, float*, int64_t, int64_t);

template <class F, int... MRs> constexpr std::array<Q8Fn, sizeof...(MRs)> q8_tiles(std::integer_sequence<int, MRs...>) {
  return {&q8_tile<MRs + 1, F>...};  // [mr - 1]
}

template <class F>
void q8_run(const uint8_t* w, int64_t row_bytes, const float* row_scales, const QBlock* x, int64_t nblocks,
            int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  const int64_t npanels = (N + Q8_COLS - 1) / Q8_COLS, groups = nblocks * F::GROUPS;
  static constexpr auto tiles = q8_tiles<F>(std::make_integer_sequence<int, Q8_M>{});
  kq::parallel_panels(npanels, nthreads, [&](int64_t p) {
    const int64_t n0 = p * Q8_COLS, rows = std::min<int64_t>(Q8_COLS, N - n0);
    const Q8Panel panel = q8_panel<F>(w, row_bytes, row_scales, nblocks, n0, rows);
    for (int64_t m0 = 0; m0 < M; m0 += Q8_M) {
      const int64_t mr = std::min<int64_t>(Q8_M, M - m0);
      tiles[mr - 1](x + m0 * groups, groups, panel, y + m0 * ldy + n0, ldy, rows);
    }
  });
}

#include "packed_panels.h"  // (the tiles of packed weights)

// fn(F{}) for the decoder F of weight format `type`; 1 for an unknown format.
template <class Fn> int with_format(int type, Fn&& fn) {
  switch (type) {
    case kq::Q8_0: fn(FmtQ8_0{}); return 0;
    case kq::INT8_ROW: fn(FmtInt8Row{}); return 0;
    case kq::Q4_0: fn(FmtQ4<false>{}); return 0;
    case kq::Q4_1: fn(FmtQ4<true>{}); return 0;
    case kq::Q5_0: fn(FmtQ5<false>{}); return 0;
    case kq::Q5_1: fn(FmtQ5<true>{}); return 0;
    case kq::Q4_K: fn(FmtK<false>{}); return 0;
    case kq::Q5_K: fn(FmtK<true>{}); return 0;
    case kq::Q6_K: fn(FmtQ6_K{}); return 0;
    default: return 1;
  }
}

// bf16 <-> float32 for the bf16 calls that run a float32 path: rows of x widened (exact), rows of y rounded to
// nearest even as torch rounds (NaNs stay NaNs), 8 lanes at a time.
void widen_bf16_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* src = x + m * ldx;
    float* dst = out + m * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_slli_epi32(h, 16));
    }
    for (; k < K; ++k) dst[k] = kq::bf16_to_float(src[k]);
  }
}

void round_bf16_rows(const float* y, int64_t M, int64_t N, uint16_t* out, int64_t ldo) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = y + m * N;
    uint16_t* dst = out + m * ldo;
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + n));
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
      const __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
      const __m256i kept = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
      const __m256i h = _mm256_blendv_epi8(rounded, kept, nan);  // 32-bit lanes holding the 16-bit results
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + n), packed);
    }
    for (; n < N; ++n) dst[n] = kq::float_to_bf16(src[n]);
  }
}

int panel_matmul(int type, const uint8_t* w, int64_t row_bytes, const float* row_scales, const float* x,
                 int64_t ldx, int64_t nblocks, int64_t K, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  return with_format(type, [&](auto format) {
    panel_run<decltype(format)>(w, row_bytes, row_scales, x, ldx, nblocks, K, M, N, y, ldy, nthreads);
  });
}

#if KQ_SIMD_PASS == 2
int bf16_matmul(int type, const uint8_t* w, int64_t row_bytes, const float* row_scales, const uint16_t* x,
                int64_t ldx, int64_t nblocks, int64_t K, int64_t M, int64_t N, uint16_t* y, int64_t ldy, int nthreads) {
  return with_format(type, [&](auto format) {
    bf16_run<decltype(format)>(w, row_bytes, row_scales, x, ldx, nblocks, K, M, N, y, ldy, nthreads);
  });
}

#endif

int q8_panel_matmul(int type, const uint8_t* w, int64_t row_bytes, const float* row_scales, const QBlock* x,
                    int64_t nblocks, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  return with_format(type, [&](auto format) {
    q8_run<decltype(format)>(w, row_bytes, row_scales, x, nblocks, M, N, y, ldy, nthreads);
  });
}

int q8_packed_matmul(int type, const uint8_t* w, int64_t row_bytes, const QBlock* x, int64_t nblocks, int64_t M,
                     int64_t N, float* y, int64_t ldy, int nthreads) {
  switch (type) {  // (the packable formats: kq::packable)
    case kq::Q4_0: q8_packed_run<FmtQ4<false>>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q4_1: q8_packed_run<FmtQ4<true>>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q5_0: q8_packed_run<FmtQ5<false>>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q5_1: q8_packed_run<FmtQ5<true>>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q8_0: q8_packed_run<FmtQ8_0>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q4_K: q8_packed_run<FmtK<false>>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q5_K: q8_packed_run<FmtK<true>>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    case kq::Q6_K: q8_packed_run<FmtQ6_K>(w, row_bytes, x, nblocks, M, N, y, ldy, nthreads); return 0;
    default: return 1;
  }
}

template <class F>
void run(bool q8, const uint8_t* w, int64_t row_bytes, const float* row_scales, const kq::Acts& acts, int64_t nb32,
         int64_t nblocks, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  if (q8 && M == 1) return gemv_q8<F>(w, row_bytes, row_scales, acts.q8, nblocks, N, y, nthreads);
  auto dot = [&](int mt, const uint8_t* row, float scale, const kq::Tile& tile, float* res) {
    if (q8) {
      switch (mt) {
        case 1: row_dot<F, 1>(row, nblocks, scale, tile.q8, res); break;
        case 2: row_dot<F, 2>(row, nblocks, scale, tile.q8, res); break;
        case 3: row_dot<F, 3>(row, nblocks, scale, tile.q8, res); break;
        default: row_dot<F, 4>(row, nblocks, scale, tile.q8, res); break;
      }
    } else {
#if KQ_SIMD_PASS == 2
      switch (mt) {
        case 1: row_dot_f32_512<F, 1>(row, nblocks, scale, tile.x, res); break;
        case 2: row_dot_f32_512<F, 2>(row, nblocks, scale, tile.x, res); break;
        case 3: row_dot_f32_512<F, 3>(row, nblocks, scale, tile.x, res); break;
        default: row_dot_f32_512<F, 4>(row, nblocks, scale, tile.x, res); break;
      }
#else
      switch (mt) {
        case 1: row_dot_f32<F, 1>(row, nblocks, scale, tile.x, tile.sums, res); break;
        case 2: row_dot_f32<F, 2>(row, nblocks, scale, tile.x, tile.sums, res); break;
        case 3: row_dot_f32<F, 3>(row, nblocks, scale, tile.x, tile.sums, res); break;
        default: row_dot_f32<F, 4>(row, nblocks, scale, tile.x, tile.sums, res); break;
      }
#endif
    }
  };
  kq::matmul_rows(dot, w, row_bytes, row_scales, acts, nb32, M, N, y, ldy, nthreads);
}

int matmul(int type, bool q8, const uint8_t* w, int64_t row_bytes, const float* row_scales, const kq::Acts& acts,
           int64_t nb32, int64_t nblocks, int64_t M, int64_t N, float* y, int64_t ldy, int nthreads) {
  return with_format(type, [&](auto format) {
    run<decltype(format)>(q8, w, row_bytes, row_scales, acts, nb32, nblocks, M, N, y, ldy, nthreads);
  });
}

#endif  // KQ_SIMD_PASS
