// Packed int8 panels: Q4_0, Q4_1 and Q8_0 weights repacked once, at load, in the order the int8 tiles read
// them, so that no call builds panels (q8_panel) and one activation row runs the same vertical tiles as a batch
// (no per-row horizontal sums, as the row-at-a-time GEMV needs). llama.cpp repacks its CPU weights the same way.
//
// Layout (kq_pack_panels): the same bytes as the blocks, reordered. Per panel of PANEL_COLS = 32 weight rows
// (columns of the output), per block g, GROUP_BYTES = 32 * the block's bytes:
//   codes: DWORDS dwords per column, dword-major and column-minor (dword d of column c at (d * 32 + c) * 4):
//          Q4: the 4 dwords of the block's 16 nibble bytes (low nibbles: k-quads 0-3, high ones: quads 4-7);
//          Q8_0: its 8 dwords (quads 0-7), shifted by 128 into unsigned codes;
//   then the 32 columns' f16 scales, then (Q4_1) their 32 f16 mins.
// A packed weight keeps its [N, row_bytes] shape (N a multiple of 32), so row slices of whole panels stay
// packed weights; a packed type is the format's code | PACKED.
//
// Included three times by quant_kernels.cpp: in namespace kq (the layout and the scalar pack/unpack), and once
// per SIMD pass (the tiles and their run).

#ifndef KQ_SIMD_PASS

constexpr int PACKED = 256;
constexpr int64_t PANEL_COLS = 32;

// Whether rows of `type` can be packed, and the layout's code dwords per column and where a block's codes start.
inline bool packed_layout(int type, int64_t* dwords, int64_t* qs_offset, int64_t* block_bytes) {
  switch (type) {
    case Q4_0: *dwords = 4; *qs_offset = 2; *block_bytes = 18; return true;
    case Q4_1: *dwords = 4; *qs_offset = 4; *block_bytes = 20; return true;
    case Q8_0: *dwords = 8; *qs_offset = 2; *block_bytes = 34; return true;
    default: return false;
  }
}

// Whether rows of `type`, row_bytes each, of k weights are what packed panels hold: a packable format and rows
// of exactly k / 32 blocks.
inline bool packed_rows_fit(int type, int64_t row_bytes, int64_t k) {
  int64_t dwords, qs, block_bytes;
  return packed_layout(type, &dwords, &qs, &block_bytes) && k % 32 == 0 && row_bytes == k / 32 * block_bytes;
}

// Block g of column c of a packed panel <-> the block's own bytes (one function for both directions keeps the
// two in step): to_packed copies block -> panel, else panel -> block.
inline void move_block(int type, uint8_t* panel_group, int64_t c, uint8_t* block, bool to_packed) {
  int64_t dwords, qs, bytes;
  packed_layout(type, &dwords, &qs, &bytes);
  const uint8_t flip = type == Q8_0 ? 0x80 : 0x00;
  const int64_t code_bytes = dwords * 4 * PANEL_COLS;
  for (int64_t d = 0; d < dwords; ++d)
    for (int64_t j = 0; j < 4; ++j) {
      uint8_t& packed = panel_group[(d * PANEL_COLS + c) * 4 + j];
      uint8_t& own = block[qs + 4 * d + j];
      if (to_packed) packed = own ^ flip;
      else own = packed ^ flip;
    }
  for (int64_t h = 0; h < (type == Q4_1 ? 2 : 1); ++h) {  // the f16 scale, Q4_1's f16 min
    uint8_t* packed = panel_group + code_bytes + h * 2 * PANEL_COLS + 2 * c;
    if (to_packed) std::memcpy(packed, block + 2 * h, 2);
    else std::memcpy(block + 2 * h, packed, 2);
  }
}

// Row r of a packed weight as the format's own blocks (row_bytes of them): embedding lookups and dequantising.
inline void unpack_row(int type, const uint8_t* w, int64_t row_bytes, int64_t r, uint8_t* blocks) {
  int64_t dwords, qs, bytes;
  packed_layout(type, &dwords, &qs, &bytes);
  const uint8_t* panel = w + r / PANEL_COLS * PANEL_COLS * row_bytes;
  for (int64_t g = 0; g < row_bytes / bytes; ++g)
    move_block(type, const_cast<uint8_t*>(panel + g * PANEL_COLS * bytes), r % PANEL_COLS, blocks + g * bytes, false);
}

#else  // ---- the SIMD pass: tiles reading packed panels ----------------------------------------------------------

template <class F> struct Packed {
  static constexpr bool Q8 = std::is_same_v<F, FmtQ8_0>;
  static constexpr int64_t DWORDS = Q8 ? 8 : 4, CODE_BYTES = DWORDS * 4 * Q8_COLS, GROUP_BYTES = Q8_COLS * F::BYTES;
  static_assert(Q8_COLS == kq::PANEL_COLS);
};

#if KQ_SIMD_PASS == 2
// MR activation rows x the panel's 32 columns, y written in full: q8_tile's arithmetic (the same integer dot
// products, then scale * d_x * dot + offset * s_x per block in the same order: bit for bit its results).
template <int MR, class F>
void q8_tile_packed(const QBlock* x, int64_t groups, const uint8_t* panel, float* y, int64_t ldy) {
  using P = Packed<F>;
  constexpr int VECS = Q8_COLS / 16;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][VECS];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < VECS; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = panel + g * P::GROUP_BYTES;
    __m512i dots[MR][VECS];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < VECS; ++v) dots[m][v] = _mm512_setzero_si512();
    for (int d = 0; d < P::DWORDS; ++d) {
      __m512i codes[VECS];
      for (int v = 0; v < VECS; ++v) codes[v] = _mm512_loadu_si512(group + (d * Q8_COLS + 16 * v) * 4);
      if constexpr (P::Q8) {
        for (int m = 0; m < MR; ++m) {
          int32_t quad;
          std::memcpy(&quad, x[m * groups + g].q + 4 * d, 4);
          const __m512i xb = _mm512_set1_epi32(quad);
          for (int v = 0; v < VECS; ++v) dots[m][v] = _mm512_dpbusd_epi32(dots[m][v], codes[v], xb);
        }
      } else {
        __m512i lo[VECS], hi[VECS];
        for (int v = 0; v < VECS; ++v) {
          lo[v] = _mm512_and_si512(codes[v], low4);
          hi[v] = _mm512_and_si512(_mm512_srli_epi32(codes[v], 4), low4);
        }
        for (int m = 0; m < MR; ++m) {
          int32_t quad_lo, quad_hi;
          std::memcpy(&quad_lo, x[m * groups + g].q + 4 * d, 4);
          std::memcpy(&quad_hi, x[m * groups + g].q + 16 + 4 * d, 4);
          const __m512i xl = _mm512_set1_epi32(quad_lo), xh = _mm512_set1_epi32(quad_hi);
          for (int v = 0; v < VECS; ++v)
            dots[m][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dots[m][v], lo[v], xl), hi[v], xh);
        }
      }
    }
    __m512 scale[VECS], offset[VECS];
    for (int v = 0; v < VECS; ++v) {
      scale[v] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + P::CODE_BYTES + 32 * v)));
      if constexpr (P::Q8) offset[v] = _mm512_mul_ps(scale[v], _mm512_set1_ps(-128.f));
      else if constexpr (F::QS == 4)  // Q4_1's mins
        offset[v] = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + P::CODE_BYTES + 2 * Q8_COLS + 32 * v)));
      else offset[v] = _mm512_mul_ps(scale[v], _mm512_set1_ps(-8.f));
    }
    for (int m = 0; m < MR; ++m) {
      const QBlock& a = x[m * groups + g];
      const __m512 d = _mm512_set1_ps(a.d), s = _mm512_set1_ps(a.s[0] + a.s[1]);
      for (int v = 0; v < VECS; ++v) {
        const __m512 sd = _mm512_mul_ps(scale[v], d);
        acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[m][v]), sd, acc[m][v]);
        acc[m][v] = _mm512_fmadd_ps(offset[v], s, acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < VECS; ++v) _mm512_storeu_ps(y + m * ldy + 16 * v, acc[m][v]);
}

#else
// AVX2: as q8_tile's AVX2 pass (vpmaddubsw pair sums, added as int16, widened by vpmaddwd; 8-bit codes split
// into nibbles), 16 columns per pass; the sums stay exact, so the results are q8_tile's bit for bit.
template <int MR, class F>
void q8_tile_packed(const QBlock* x, int64_t groups, const uint8_t* panel, float* y, int64_t ldy) {
  using P = Packed<F>;
  constexpr int NV = 2;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  for (int64_t c0 = 0; c0 < Q8_COLS; c0 += 8 * NV) {
    __m256 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* group = panel + g * P::GROUP_BYTES;
      // int16 sums of all 8 quads: 8 * 2 * 127 * 15 <= 32767 (Q4's codes, and each nibble of Q8_0's)
      __m256i lo[MR][NV], hi[MR][NV];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) lo[m][v] = hi[m][v] = _mm256_setzero_si256();
      for (int d = 0; d < P::DWORDS; ++d) {
        __m256i wl[NV], wh[NV];
        for (int v = 0; v < NV; ++v) {
          const __m256i codes =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + (d * Q8_COLS + c0 + 8 * v) * 4));
          wl[v] = _mm256_and_si256(codes, low4);
          wh[v] = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
        }
        for (int m = 0; m < MR; ++m) {
          int32_t quad_lo, quad_hi;
          std::memcpy(&quad_lo, x[m * groups + g].q + 4 * d, 4);
          std::memcpy(&quad_hi, x[m * groups + g].q + (P::Q8 ? 4 * d : 16 + 4 * d), 4);
          const __m256i xl = _mm256_set1_epi32(quad_lo), xh = _mm256_set1_epi32(quad_hi);
          for (int v = 0; v < NV; ++v) {
            lo[m][v] = _mm256_add_epi16(lo[m][v], _mm256_maddubs_epi16(wl[v], xl));
            hi[m][v] = _mm256_add_epi16(hi[m][v], _mm256_maddubs_epi16(wh[v], xh));
          }
        }
      }
      __m256 scale[NV], offset[NV];
      for (int v = 0; v < NV; ++v) {
        const uint8_t* heads = group + P::CODE_BYTES + 2 * (c0 + 8 * v);
        scale[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(heads)));
        if constexpr (P::Q8) offset[v] = _mm256_mul_ps(scale[v], _mm256_set1_ps(-128.f));
        else if constexpr (F::QS == 4)
          offset[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(heads + 2 * Q8_COLS)));
        else offset[v] = _mm256_mul_ps(scale[v], _mm256_set1_ps(-8.f));
      }
      for (int m = 0; m < MR; ++m) {
        const QBlock& a = x[m * groups + g];
        const __m256 d = _mm256_set1_ps(a.d), s = _mm256_set1_ps(a.s[0] + a.s[1]);
        for (int v = 0; v < NV; ++v) {
          __m256i dots = _mm256_madd_epi16(lo[m][v], ones);  // Q4: the low and high quads' sums
          const __m256i high = _mm256_madd_epi16(hi[m][v], ones);
          dots = P::Q8 ? _mm256_add_epi32(dots, _mm256_slli_epi32(high, 4)) : _mm256_add_epi32(dots, high);
          const __m256 sd = _mm256_mul_ps(scale[v], d);
          acc[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), sd, acc[m][v]);
          acc[m][v] = _mm256_fmadd_ps(offset[v], s, acc[m][v]);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + m * ldy + c0 + 8 * v, acc[m][v]);
  }
}
#endif

using PackedFn = void (*)(const QBlock*, int64_t, const uint8_t*, float*, int64_t);

template <class F, int... MRs>
constexpr std::array<PackedFn, sizeof...(MRs)> packed_tiles(std::integer_sequence<int, MRs...>) {
  return {&q8_tile_packed<MRs + 1, F>...};  // [mr - 1]
}

// Threads split the panels; each panel (32 * row_bytes contiguous bytes) meets every activation row.
template <class F>
void q8_packed_run(const uint8_t* w, int64_t row_bytes, const QBlock* x, int64_t nblocks, int64_t M, int64_t N,
                   float* y, int64_t ldy, int nthreads) {
  const int64_t npanels = N / Q8_COLS;
  static constexpr auto tiles = packed_tiles<F>(std::make_integer_sequence<int, Q8_M>{});
#pragma omp parallel for schedule(static) num_threads(nthreads) if (npanels > 1)
  for (int64_t p = 0; p < npanels; ++p) {
    const uint8_t* panel = w + p * Q8_COLS * row_bytes;
    for (int64_t m0 = 0; m0 < M; m0 += Q8_M) {
      const int64_t mr = std::min<int64_t>(Q8_M, M - m0);
      tiles[mr - 1](x + m0 * nblocks, nblocks, panel, y + m0 * ldy + p * Q8_COLS, ldy);
    }
  }
}

#endif  // KQ_SIMD_PASS
