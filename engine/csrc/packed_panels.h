// Packed int8 panels: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights repacked once, at load, in the order the int8
// tiles read them, so that no call builds panels (q8_panel) and one activation row runs the same vertical tiles
// as a batch (no per-row horizontal sums, as the row-at-a-time GEMV needs). llama.cpp repacks its CPU weights
// the same way.
//
// Layout (kq_pack_panels): the same bytes as the blocks, reordered. Per panel of PANEL_COLS = 32 weight rows
// (columns of the output), per block g, GROUP_BYTES = 32 * the block's bytes, as "dword rows" of 32 columns'
// dwords (dword row r, column c at (r * 32 + c) * 4):
//   Q4_0 / Q4_1: rows 0-3, the block's 16 nibble bytes (low nibbles: k-quads 0-3, high ones: quads 4-7); then
//          the 32 columns' f16 scales, then (Q4_1) their f16 mins;
//   Q5_0 / Q5_1: rows 0-3 as Q4's; row 4, the codes' fifth bits: byte b holds at bit d the one of the weight in
//          the low nibble of byte b of code row d, at bit 4 + d the one of the weight in its high nibble; then
//          the f16 scales, then (Q5_1) the f16 mins;
//   Q8_0: rows 0-7, its 32 codes (quads 0-7), shifted by 128 into unsigned codes; then the f16 scales;
//   Q4_K: row 0, the f16 d and dmin; rows 1-3, the 12 bytes of 6-bit scales and mins as they are; rows 4 + 4j ..
//          7 + 4j, sub-block j (weights 32j..32j+31) as Q4_1's nibble bytes (low nibbles: weights 0-15 of the
//          sub-block, high ones: 16-31);
//   Q5_K: as Q4_K, each sub-block's 4 code rows followed by a row of their fifth bits (rows 4 + 5j .. 8 + 5j):
//          byte b of row 8 + 5j holds at bit d the one of the weight in the low nibble of byte b of code row
//          4 + 5j + d, at bit 4 + d the one of the weight in its high nibble;
//   Q6_K: the 32 columns' f16 d (64 bytes), then from there rows 0-3, the 16 int8 scales; rows 4 + 6j .. 7 + 6j,
//          the low 4 bits of sub-block j's 6-bit codes as Q4_1's nibble bytes, rows 8 + 6j and 9 + 6j their high
//          2 bits: byte b of row 8 + 6j + d / 2 holds, at bit 4 (d % 2), those of the weight in the low nibble
//          of byte b of code row 4 + 6j + d, and 2 bits up those of the one in its high nibble.
// Heads come first in the K-quants' groups, and each sub-block's bytes are together: a row's tile reads its
// panel front to back, as the hardware prefetchers follow.
// A packed weight keeps its [N, row_bytes] shape (N a multiple of 32), so row slices of whole panels stay
// packed weights; a packed type is the format's code | PACKED.
//
// Included three times by quant_kernels.cpp: in namespace kq (the layout and the scalar pack/unpack), and once
// per SIMD pass (the tiles and their run).

#ifndef KQ_SIMD_PASS

constexpr int PACKED = 256;
constexpr int64_t PANEL_COLS = 32;

inline bool packable(int type) {
  return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0 || type == Q4_K ||
         type == Q5_K || type == Q6_K;
}

// Whether rows of `type`, row_bytes each, of k weights are what packed panels hold: a packable format and rows
// of exactly k / (the block's weights) blocks.
inline bool packed_rows_fit(int type, int64_t row_bytes, int64_t k) {
  int64_t bytes, elems;
  return packable(type) && format_of(type, &bytes, &elems) && k % elems == 0 && row_bytes == k / elems * bytes;
}

// Byte `byte` of column c's dword in dword row `row` of a panel's block.
inline uint8_t& panel_byte(uint8_t* group, int64_t row, int64_t c, int64_t byte) {
  return group[(row * PANEL_COLS + c) * 4 + byte];
}

// The fifth bits of one 32-weight block (`bits`: weight i's at bit i) <-> their packed row: byte b holds at bit d
// the one of the weight in the low nibble of byte b of code row d, at bit 4 + d the one of the weight in its high
// nibble (Q5_0 / Q5_1, and each Q5_K sub-block).
inline void move_fifth_bits(uint8_t* group, int64_t row, int64_t c, uint32_t* bits, bool to_packed) {
  if (to_packed)
    for (int64_t b = 0; b < 4; ++b) panel_byte(group, row, c, b) = 0;
  else
    *bits = 0;
  for (int i = 0; i < 32; ++i) {
    const int t = i % 16, bit = t / 4 + (i >= 16 ? 4 : 0);
    uint8_t& packed = panel_byte(group, row, c, t % 4);
    if (to_packed) packed = static_cast<uint8_t>(packed | (((*bits >> i) & 1u) << bit));
    else *bits |= ((packed >> bit) & 1u) << i;
  }
}

// Q6_K's 256 six-bit codes in weight order <-> the block's ql / qh bytes (ggml's layout).
inline void q6_codes(const uint8_t* block, uint8_t v[256]) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = block + 64 * h, *qh = block + 128 + 32 * h;
    uint8_t* o = v + 128 * h;
    for (int l = 0; l < 32; ++l) {
      o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
      o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
      o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
}

inline void q6_store_codes(const uint8_t v[256], uint8_t* block) {
  for (int h = 0; h < 2; ++h) {
    uint8_t *ql = block + 64 * h, *qh = block + 128 + 32 * h;
    const uint8_t* o = v + 128 * h;
    for (int l = 0; l < 32; ++l) {
      ql[l] = (o[l] & 0xF) | ((o[l + 64] & 0xF) << 4);
      ql[l + 32] = (o[l + 32] & 0xF) | ((o[l + 96] & 0xF) << 4);
      qh[l] = (o[l] >> 4) | ((o[l + 32] >> 4) << 2) | ((o[l + 64] >> 4) << 4) | ((o[l + 96] >> 4) << 6);
    }
  }
}

// Bytes [from, from + count) of a block <-> dword rows from `row` on (count a multiple of 4).
inline void move_bytes(uint8_t* group, int64_t row, int64_t c, uint8_t* block, int64_t from, int64_t count,
                       bool to_packed) {
  for (int64_t i = 0; i < count; ++i) {
    uint8_t& packed = panel_byte(group, row + i / 4, c, i % 4);
    if (to_packed) packed = block[from + i];
    else block[from + i] = packed;
  }
}

// Block g of column c of a packed panel <-> the block's own bytes (one function for both directions keeps the
// two in step): to_packed copies block -> panel, else panel -> block.
inline void move_block(int type, uint8_t* group, int64_t c, uint8_t* block, bool to_packed) {
  switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: {
      const bool q8 = type == Q8_0, five = type == Q5_0 || type == Q5_1, min = type == Q4_1 || type == Q5_1;
      const int64_t heads = min ? 4 : 2, qs = heads + (five ? 4 : 0), rows = q8 ? 8 : 4;  // (Q5: qh, then qs)
      for (int64_t i = 0; i < rows * 4; ++i) {  // (Q8_0's codes shifted by 128 into unsigned ones)
        uint8_t& packed = panel_byte(group, i / 4, c, i % 4);
        if (to_packed) packed = block[qs + i] ^ (q8 ? 0x80 : 0);
        else block[qs + i] = packed ^ (q8 ? 0x80 : 0);
      }
      if (five) {  // qh: weight i's fifth bit at bit i of the little-endian word
        uint32_t bits;
        std::memcpy(&bits, block + heads, 4);
        move_fifth_bits(group, rows, c, &bits, to_packed);
        if (!to_packed) std::memcpy(block + heads, &bits, 4);
      }
      for (int64_t h = 0; h < heads / 2; ++h) {  // the f16 scale, the f16 min
        uint8_t* head = group + (rows + (five ? 1 : 0)) * 4 * PANEL_COLS + h * 2 * PANEL_COLS + 2 * c;
        if (to_packed) std::memcpy(head, block + 2 * h, 2);
        else std::memcpy(block + 2 * h, head, 2);
      }
      return;
    }
    case Q4_K: case Q5_K: {  // sub-block j's weights: nibble j % 2 of qs[32 (j / 2) + i] (Q5_K: bit j of qh[i] above)
      const bool five = type == Q5_K;
      uint8_t *qs = block + (five ? 48 : 16), *qh = block + 16;
      const int64_t stride = five ? 5 : 4;
      for (int j = 0; j < 8; ++j) {
        const int shift = 4 * (j % 2);
        for (int t = 0; t < 16; ++t) {
          uint8_t& packed = panel_byte(group, 4 + stride * j + t / 4, c, t % 4);
          uint8_t &low = qs[32 * (j / 2) + t], &high = qs[32 * (j / 2) + 16 + t];
          if (to_packed) {
            packed = static_cast<uint8_t>(((low >> shift) & 0xF) | (((high >> shift) & 0xF) << 4));
          } else {
            low = static_cast<uint8_t>((low & ~(0xF << shift)) | ((packed & 0xF) << shift));
            high = static_cast<uint8_t>((high & ~(0xF << shift)) | ((packed >> 4) << shift));
          }
        }
        if (!five) continue;
        uint32_t bits = 0;  // sub-block j's fifth bits: bit j of qh[i] for its weight i
        if (to_packed)
          for (int i = 0; i < 32; ++i) bits |= ((qh[i] >> j) & 1u) << i;
        move_fifth_bits(group, 8 + stride * j, c, &bits, to_packed);
        if (!to_packed)
          for (int i = 0; i < 32; ++i) qh[i] = static_cast<uint8_t>((qh[i] & ~(1 << j)) | (((bits >> i) & 1) << j));
      }
      move_bytes(group, 0, c, block, 0, 16, to_packed);  // d, dmin; the 12 scale bytes
      return;
    }
    case Q6_K: {
      uint8_t* d = group + 2 * c;
      if (to_packed) std::memcpy(d, block + 208, 2);
      else std::memcpy(block + 208, d, 2);
      group += 2 * PANEL_COLS;  // (the rows start after the f16 d)
      uint8_t v[256];
      if (to_packed) q6_codes(block, v);
      for (int j = 0; j < 8; ++j)
        for (int t = 0; t < 16; ++t) {
          const int d = t / 4, at = 4 * (d % 2);
          uint8_t& codes = panel_byte(group, 4 + 6 * j + d, c, t % 4);
          uint8_t& high = panel_byte(group, 8 + 6 * j + d / 2, c, t % 4);
          uint8_t &low_v = v[32 * j + t], &high_v = v[32 * j + 16 + t];
          if (to_packed) {
            codes = static_cast<uint8_t>((low_v & 0xF) | ((high_v & 0xF) << 4));
            const uint8_t bits = static_cast<uint8_t>(((low_v >> 4) | ((high_v >> 4) << 2)) << at);
            high = static_cast<uint8_t>((high & ~(0xF << at)) | bits);
          } else {
            low_v = static_cast<uint8_t>((codes & 0xF) | (((high >> at) & 3) << 4));
            high_v = static_cast<uint8_t>((codes >> 4) | (((high >> (at + 2)) & 3) << 4));
          }
        }
      if (!to_packed) q6_store_codes(v, block);
      move_bytes(group, 0, c, block, 192, 16, to_packed);  // the int8 scales
      return;
    }
    default: return;
  }
}

// Row r of a packed weight as the format's own blocks (row_bytes of them): embedding lookups and dequantising.
inline void unpack_row(int type, const uint8_t* w, int64_t row_bytes, int64_t r, uint8_t* blocks) {
  int64_t bytes, elems;
  format_of(type, &bytes, &elems);
  const uint8_t* panel = w + r / PANEL_COLS * PANEL_COLS * row_bytes;
  for (int64_t g = 0; g < row_bytes / bytes; ++g)
    move_block(type, const_cast<uint8_t*>(panel + g * PANEL_COLS * bytes), r % PANEL_COLS, blocks + g * bytes, false);
}

#else  // ---- the SIMD pass: tiles reading packed panels ----------------------------------------------------------

// A packed format's layout as the tiles read it: each block of 32 weights (a sub-block of a K-quant's 256) has
// DWORDS code rows of 32 columns' dwords (ROW bytes each), the first at sub_at(sub) in its group (the fifth bits' row
// of Q5_0 / Q5_1 / Q5_K, Q6_K's two rows of high bits follow them); HEADS: where the group's scales start.
template <class F> struct Packed {
  static constexpr bool Q8 = std::is_same_v<F, FmtQ8_0>, K5 = std::is_same_v<F, FmtK<true>>,
                        KMIN = std::is_same_v<F, FmtK<false>> || K5, Q6 = std::is_same_v<F, FmtQ6_K>,  // (Q4_K, Q5_K)
                        Q5 = std::is_same_v<F, FmtQ5<false>> || std::is_same_v<F, FmtQ5<true>>,
                        FIFTH = K5 || Q5,  // a row of fifth bits after each block's 4 code rows
                        MIN = std::is_same_v<F, FmtQ4<true>> || std::is_same_v<F, FmtQ5<true>>;  // f16 mins
  // the offset per unit of scale of the formats without mins: their codes' middle (Q8_0's, shifted by 128)
  static constexpr float CENTRE = Q8 ? -128.f : Q5 ? -16.f : -8.f;
  static constexpr int TYPE = K5 ? kq::Q5_K : KMIN ? kq::Q4_K : Q6 ? kq::Q6_K : -1;  // (the K-quants' code)
  static constexpr int SUBS = KMIN || Q6 ? 8 : 1;  // blocks of 32 weights per group
  static constexpr bool SPLIT = Q6;               // a scale per 16 weights: the low nibbles' and the high ones'
  static constexpr int64_t DWORDS = Q8 ? 8 : 4, ROW = 4 * Q8_COLS, GROUP_BYTES = Q8_COLS * F::BYTES;
  static constexpr int64_t HEADS = KMIN ? 0 : Q6 ? 2 * Q8_COLS : (DWORDS + (Q5 ? 1 : 0)) * ROW;  // (Q6_K: d first)
  static constexpr int64_t FIRST_SUB = KMIN ? 4 * ROW : Q6 ? HEADS + 4 * ROW : 0,
                           SUB_STRIDE = (Q6 ? 6 : K5 ? 5 : 4) * ROW;
  static constexpr int64_t sub_at(int sub) { return FIRST_SUB + sub * SUB_STRIDE; }
  static constexpr int64_t BLOCK_BYTES = GROUP_BYTES / SUBS;  // (a panel's bytes per block of 32, on average)
  // Blocks of 32 ahead that a tile asks for: the K-quants' panels (heads first, then sub-blocks) ran at 13-14 GB/s
  // from DRAM at one row without (Zen 4, 4096 x 2048), 20-22 GB/s with 2-4; the other formats' gained nothing.
  static constexpr int64_t PREFETCH = SUBS > 1 ? 4 : 0;
  static_assert(Q8_COLS == kq::PANEL_COLS);
};

#if KQ_SIMD_PASS == 2
using PackedVec = __m512i;
using PackedScales = __m512;
constexpr int PACKED_LANES = 16;
inline __m512i load_lanes(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline __m512 f16_lanes(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 f16_low_halves(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }
inline __m512 f16_high_halves(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16))); }
inline __m512i bits(__m512i v, int shift, int mask) {  // (v >> shift) & mask, per dword
  return _mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi32(mask));
}
inline __m512i or_lanes(__m512i a, __m512i b) { return _mm512_or_si512(a, b); }
inline __m512i shl_lanes(__m512i v, int shift) { return _mm512_slli_epi32(v, shift); }
inline __m512i signed_byte(__m512i v, int byte) { return _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * byte), 24); }
inline __m512 to_float(__m512i v) { return _mm512_cvtepi32_ps(v); }
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 neg(__m512 a) {  // (the sign flipped, as -x is: exact, zeros included)
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}
inline __m512 broadcast(float f) { return _mm512_set1_ps(f); }
inline __m512i byte_mask(int m) { return _mm512_set1_epi8(static_cast<char>(m)); }
inline __m512i and_lanes(__m512i a, __m512i b) { return _mm512_and_si512(a, b); }
inline __m512i srl_lanes(__m512i v, int shift) { return _mm512_srli_epi32(v, shift); }
#else
using PackedVec = __m256i;
using PackedScales = __m256;
constexpr int PACKED_LANES = 8;
inline __m256i load_lanes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256 f16_lanes(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 f16_of_dwords(__m256i v) {  // (each dword <= 0xFFFF: unsigned saturation packs them exactly)
  return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}
inline __m256 f16_low_halves(__m256i v) { return f16_of_dwords(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF))); }
inline __m256 f16_high_halves(__m256i v) { return f16_of_dwords(_mm256_srli_epi32(v, 16)); }
inline __m256i bits(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(mask));
}
inline __m256i or_lanes(__m256i a, __m256i b) { return _mm256_or_si256(a, b); }
inline __m256i shl_lanes(__m256i v, int shift) { return _mm256_slli_epi32(v, shift); }
inline __m256i signed_byte(__m256i v, int byte) { return _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * byte), 24); }
inline __m256 to_float(__m256i v) { return _mm256_cvtepi32_ps(v); }
inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 neg(__m256 a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.f)); }
inline __m256 broadcast(float f) { return _mm256_set1_ps(f); }
inline __m256i byte_mask(int m) { return _mm256_set1_epi8(static_cast<char>(m)); }
inline __m256i and_lanes(__m256i a, __m256i b) { return _mm256_and_si256(a, b); }
inline __m256i srl_lanes(__m256i v, int shift) { return _mm256_srli_epi32(v, shift); }
#endif

// Asks for the panel's bytes of block b + PREFETCH (by their average place in the panel: groups are read in order).
template <class F> inline void prefetch_block(const uint8_t* panel, int64_t b, int64_t nb32) {
  using P = Packed<F>;
  if constexpr (P::PREFETCH > 0) {
    if (b + P::PREFETCH >= nb32) return;
    const uint8_t* ahead = panel + (b + P::PREFETCH) * P::BLOCK_BYTES;
    for (int64_t line = 0; line < P::BLOCK_BYTES; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
  }
}

// Code dword d of block `sub` (rows 4 sub .. of its group) for the PACKED_LANES columns from `col`, as the
// unsigned codes of its low-nibble weights (lo) and of its high-nibble ones (hi; Q8_0: lo is all 4 codes).
template <class F>
inline void packed_codes(const uint8_t* group, int sub, int d, int col, PackedVec* lo, PackedVec* hi) {
  using P = Packed<F>;
  const PackedVec codes = load_lanes(group + P::sub_at(sub) + d * P::ROW + 4 * col);
  if constexpr (P::Q8) {
    *lo = codes;
    return;
  }
  const PackedVec low4 = byte_mask(0x0F);
  *lo = and_lanes(codes, low4);
  *hi = and_lanes(srl_lanes(codes, 4), low4);
  if constexpr (P::FIFTH) {  // the fifth bit of each code, at bit 4 of its byte
    const PackedVec high = load_lanes(group + P::sub_at(sub) + 4 * P::ROW + 4 * col);
    const PackedVec bit4 = byte_mask(0x10);
    *lo = or_lanes(*lo, and_lanes(shl_lanes(high, 4 - d), bit4));
    *hi = or_lanes(*hi, and_lanes(d ? srl_lanes(high, d) : high, bit4));
  }
  if constexpr (P::Q6) {  // the high 2 bits of each code, at bit 4 of its byte
    const PackedVec high = load_lanes(group + P::sub_at(sub) + (4 + d / 2) * P::ROW + 4 * col);
    const PackedVec two = byte_mask(0x30);
    const int at = 4 * (d % 2);
    *lo = or_lanes(*lo, and_lanes(at ? high : shl_lanes(high, 4), two));
    *hi = or_lanes(*hi, and_lanes(at ? srl_lanes(high, 2) : shl_lanes(high, 2), two));
  }
}

// What every block of a group shares, for the PACKED_LANES columns from `col`: Q4_K / Q5_K's d and -dmin
// (decoded once per group, not once per sub-block: ~10% of a one-row tile's work); nothing for the others.
template <class F, bool = Packed<F>::KMIN> struct GroupScales {};
template <class F> struct GroupScales<F, true> { PackedScales d, negative_dmin; };

template <class F> inline GroupScales<F> group_scales(const uint8_t* group, int col) {
  if constexpr (Packed<F>::KMIN) {
    const PackedVec dd = load_lanes(group + Packed<F>::HEADS + 4 * col);
    return {f16_low_halves(dd), neg(f16_high_halves(dd))};
  } else {
    return {};
  }
}

// Block `sub`'s scales and offsets (per half for SPLIT formats) for the PACKED_LANES columns from `col` (`shared`:
// its group's group_scales): the values its unpacked panel holds (q8_panel), computed the same way.
template <class F>
inline void packed_heads(const uint8_t* group, int sub, int col, const GroupScales<F>& shared, PackedScales scale[2],
                         PackedScales offset[2]) {
  using P = Packed<F>;
  if constexpr (P::KMIN) {  // 6-bit scales and mins
    PackedVec sc, mn;  // kq::k_scale_min, lane-wise
    const auto s = [&](int r) { return load_lanes(group + P::HEADS + (1 + r) * P::ROW + 4 * col); };
    if (sub < 4) {
      sc = bits(s(0), 8 * sub, 63);
      mn = bits(s(1), 8 * sub, 63);
    } else {
      const int i = sub - 4;
      sc = or_lanes(bits(s(2), 8 * i, 0xF), shl_lanes(bits(s(0), 8 * i + 6, 3), 4));
      mn = or_lanes(bits(s(2), 8 * i + 4, 0xF), shl_lanes(bits(s(1), 8 * i + 6, 3), 4));
    }
    scale[0] = mul(shared.d, to_float(sc));
    offset[0] = mul(shared.negative_dmin, to_float(mn));
  } else if constexpr (P::Q6) {
    const PackedScales d = f16_lanes(group + 2 * col);
    const PackedVec scales = load_lanes(group + P::HEADS + sub / 2 * P::ROW + 4 * col);
    for (int h = 0; h < 2; ++h) {
      scale[h] = mul(d, to_float(signed_byte(scales, 2 * (sub % 2) + h)));
      offset[h] = mul(scale[h], broadcast(-32.f));
    }
  } else {
    scale[0] = f16_lanes(group + P::HEADS + 2 * col);
    if constexpr (P::MIN) offset[0] = f16_lanes(group + P::HEADS + 2 * Q8_COLS + 2 * col);
    else offset[0] = mul(scale[0], broadcast(P::CENTRE));
  }
}

#if KQ_SIMD_PASS == 2
// MR activation rows x the panel's 32 columns, y written in full: q8_tile's arithmetic (the same integer dot
// products, then scale * d_x * dot + offset * s_x per block, half by half, in the same order: bit for bit its
// results).
template <int MR, class F>
void q8_tile_packed(const QBlock* x, int64_t nb32, const uint8_t* panel, float* y, int64_t ldy) {
  using P = Packed<F>;
  constexpr int VECS = Q8_COLS / 16, HALVES = P::SPLIT ? 2 : 1;
  __m512 acc[MR][VECS];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < VECS; ++v) acc[m][v] = _mm512_setzero_ps();
  GroupScales<F> shared[VECS];
  for (int64_t b = 0; b < nb32; ++b) {
    const uint8_t* group = panel + b / P::SUBS * P::GROUP_BYTES;
    const int sub = static_cast<int>(b % P::SUBS);
    prefetch_block<F>(panel, b, nb32);
    if (sub == 0)
      for (int v = 0; v < VECS; ++v) shared[v] = group_scales<F>(group, 16 * v);
    __m512i dots[HALVES][MR][VECS];
    for (int h = 0; h < HALVES; ++h)
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < VECS; ++v) dots[h][m][v] = _mm512_setzero_si512();
    for (int d = 0; d < P::DWORDS; ++d) {
      __m512i lo[VECS], hi[VECS];
      for (int v = 0; v < VECS; ++v) packed_codes<F>(group, sub, d, 16 * v, &lo[v], &hi[v]);
      for (int m = 0; m < MR; ++m) {
        const int8_t* q = x[m * nb32 + b].q;
        int32_t quad_lo, quad_hi;
        std::memcpy(&quad_lo, q + 4 * d, 4);
        const __m512i xl = _mm512_set1_epi32(quad_lo);
        if constexpr (P::Q8) {
          for (int v = 0; v < VECS; ++v) dots[0][m][v] = _mm512_dpbusd_epi32(dots[0][m][v], lo[v], xl);
        } else {
          std::memcpy(&quad_hi, q + 16 + 4 * d, 4);
          const __m512i xh = _mm512_set1_epi32(quad_hi);
          for (int v = 0; v < VECS; ++v) {
            dots[0][m][v] = _mm512_dpbusd_epi32(dots[0][m][v], lo[v], xl);
            dots[HALVES - 1][m][v] = _mm512_dpbusd_epi32(dots[HALVES - 1][m][v], hi[v], xh);
          }
        }
      }
    }
    __m512 scale[VECS][2], offset[VECS][2];
    for (int v = 0; v < VECS; ++v) packed_heads<F>(group, sub, 16 * v, shared[v], scale[v], offset[v]);
    for (int m = 0; m < MR; ++m) {
      const QBlock& a = x[m * nb32 + b];
      const __m512 dx = _mm512_set1_ps(a.d);
      for (int h = 0; h < HALVES; ++h) {
        const __m512 s = _mm512_set1_ps(P::SPLIT ? a.s[h] : a.s[0] + a.s[1]);
        for (int v = 0; v < VECS; ++v) {
          const __m512 sd = _mm512_mul_ps(scale[v][h], dx);
          acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[h][m][v]), sd, acc[m][v]);
          acc[m][v] = _mm512_fmadd_ps(offset[v][h], s, acc[m][v]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < VECS; ++v) _mm512_storeu_ps(y + m * ldy + 16 * v, acc[m][v]);
}

#else
// AVX2: as q8_tile's AVX2 pass (vpmaddubsw pair sums, added as int16 and widened by vpmaddwd before they can
// overflow: 4 dwords of 4-bit codes, 2 of Q6_K's 6-bit ones; Q8_0's 8-bit codes split into nibbles), 16
// columns per pass; the sums stay exact, so the results are q8_tile's bit for bit.
template <int MR, class F>
void q8_tile_packed(const QBlock* x, int64_t nb32, const uint8_t* panel, float* y, int64_t ldy) {
  using P = Packed<F>;
  constexpr int NV = 2, HALVES = P::SPLIT ? 2 : 1, FLUSH = P::Q6 ? 2 : P::DWORDS;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  for (int64_t c0 = 0; c0 < Q8_COLS; c0 += 8 * NV) {
    __m256 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
    GroupScales<F> shared[NV];
    for (int64_t b = 0; b < nb32; ++b) {
      const uint8_t* group = panel + b / P::SUBS * P::GROUP_BYTES;
      const int sub = static_cast<int>(b % P::SUBS);
      if (c0 == 0) prefetch_block<F>(panel, b, nb32);
      if (sub == 0)
        for (int v = 0; v < NV; ++v) shared[v] = group_scales<F>(group, static_cast<int>(c0) + 8 * v);
      __m256i dots[2][MR][NV];  // [0]: the low nibbles' products (Q8_0: the low nibbles of its codes)
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NV; ++v) dots[h][m][v] = _mm256_setzero_si256();
      for (int d0 = 0; d0 < P::DWORDS; d0 += FLUSH) {
        __m256i lo[MR][NV], hi[MR][NV];  // int16 pair sums
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NV; ++v) lo[m][v] = hi[m][v] = _mm256_setzero_si256();
        for (int d = d0; d < d0 + FLUSH; ++d) {
          __m256i wl[NV], wh[NV];
          for (int v = 0; v < NV; ++v) {
            packed_codes<F>(group, sub, d, static_cast<int>(c0) + 8 * v, &wl[v], &wh[v]);
            if constexpr (P::Q8) {
              wh[v] = _mm256_and_si256(_mm256_srli_epi16(wl[v], 4), low4);
              wl[v] = _mm256_and_si256(wl[v], low4);
            }
          }
          for (int m = 0; m < MR; ++m) {
            int32_t quad_lo, quad_hi;
            std::memcpy(&quad_lo, x[m * nb32 + b].q + 4 * d, 4);
            std::memcpy(&quad_hi, x[m * nb32 + b].q + (P::Q8 ? 4 * d : 16 + 4 * d), 4);
            const __m256i xl = _mm256_set1_epi32(quad_lo), xh = _mm256_set1_epi32(quad_hi);
            for (int v = 0; v < NV; ++v) {
              lo[m][v] = _mm256_add_epi16(lo[m][v], _mm256_maddubs_epi16(wl[v], xl));
              hi[m][v] = _mm256_add_epi16(hi[m][v], _mm256_maddubs_epi16(wh[v], xh));
            }
          }
        }
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NV; ++v) {
            dots[0][m][v] = _mm256_add_epi32(dots[0][m][v], _mm256_madd_epi16(lo[m][v], ones));
            dots[1][m][v] = _mm256_add_epi32(dots[1][m][v], _mm256_madd_epi16(hi[m][v], ones));
          }
      }
      if constexpr (!P::SPLIT)  // one dot per block: Q4's low and high quads, or Q8_0's nibbles (16 hi + lo)
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NV; ++v)
            dots[0][m][v] = _mm256_add_epi32(dots[0][m][v], P::Q8 ? _mm256_slli_epi32(dots[1][m][v], 4) : dots[1][m][v]);
      __m256 scale[NV][2], offset[NV][2];
      for (int v = 0; v < NV; ++v)
        packed_heads<F>(group, sub, static_cast<int>(c0) + 8 * v, shared[v], scale[v], offset[v]);
      for (int m = 0; m < MR; ++m) {
        const QBlock& a = x[m * nb32 + b];
        const __m256 dx = _mm256_set1_ps(a.d);
        for (int h = 0; h < HALVES; ++h) {
          const __m256 s = _mm256_set1_ps(P::SPLIT ? a.s[h] : a.s[0] + a.s[1]);
          for (int v = 0; v < NV; ++v) {
            const __m256 sd = _mm256_mul_ps(scale[v][h], dx);
            acc[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[h][m][v]), sd, acc[m][v]);
            acc[m][v] = _mm256_fmadd_ps(offset[v][h], s, acc[m][v]);
          }
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

// A packed panel of 32 full columns as an unpacked one (q8_panel's Q8Panel, in this thread's buffers): codes as
// bytes, scales and offsets as floats, each decoded once for all the call's rows.
template <class F>
Q8Panel expanded_panel(const uint8_t* panel, int64_t nb32) {
  using P = Packed<F>;
  uint32_t* codes = kq::thread_buffer<uint32_t, kq::Q8_CODES>(nb32 * 8 * Q8_COLS);
  float* scale = kq::thread_buffer<float, kq::Q8_SCALES>(nb32 * 4 * Q8_COLS);
  float* offset = scale + nb32 * 2 * Q8_COLS;
  for (int64_t b = 0; b < nb32; ++b) {
    const uint8_t* group = panel + b / P::SUBS * P::GROUP_BYTES;
    const int sub = static_cast<int>(b % P::SUBS);
    prefetch_block<F>(panel, b, nb32);
    uint32_t* quads = codes + b * 8 * Q8_COLS;
    for (int col = 0; col < Q8_COLS; col += PACKED_LANES) {
      for (int d = 0; d < P::DWORDS; ++d) {
        PackedVec lo, hi;
        packed_codes<F>(group, sub, d, col, &lo, &hi);
        store_codes(quads + d * Q8_COLS + col, lo);
        if constexpr (!P::Q8) store_codes(quads + (4 + d) * Q8_COLS + col, hi);
      }
      PackedScales s[2], o[2];
      packed_heads<F>(group, sub, col, group_scales<F>(group, col), s, o);
      for (int h = 0; h < (P::SPLIT ? 2 : 1); ++h) {
        store_scales(scale + (b * 2 + h) * Q8_COLS + col, s[h]);
        store_scales(offset + (b * 2 + h) * Q8_COLS + col, o[h]);
      }
    }
  }
  return {codes, scale, offset};
}

// Threads split the panels; each panel (32 * row_bytes contiguous bytes) meets every activation row.
template <class F>
void q8_packed_run(const uint8_t* w, int64_t row_bytes, const QBlock* x, int64_t nb32, int64_t M, int64_t N,
                   float* y, int64_t ldy, int nthreads) {
  const int64_t npanels = N / Q8_COLS;
  const bool expand = Packed<F>::SUBS > 1 && M >= *kq::packed_expand_min_m(Packed<F>::TYPE);
  static constexpr auto tiles = packed_tiles<F>(std::make_integer_sequence<int, Q8_M>{});
  static constexpr auto expanded_tiles = q8_tiles<F>(std::make_integer_sequence<int, Q8_M>{});
  kq::parallel_panels(npanels, nthreads, [&](int64_t p) {
    const uint8_t* panel = w + p * Q8_COLS * row_bytes;
    if (expand) {
      const Q8Panel expanded = expanded_panel<F>(panel, nb32);
      for (int64_t m0 = 0; m0 < M; m0 += Q8_M) {
        const int64_t mr = std::min<int64_t>(Q8_M, M - m0);
        expanded_tiles[mr - 1](x + m0 * nb32, nb32, expanded, y + m0 * ldy + p * Q8_COLS, ldy, Q8_COLS);
      }
      return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += Q8_M) {
      const int64_t mr = std::min<int64_t>(Q8_M, M - m0);
      tiles[mr - 1](x + m0 * nb32, nb32, panel, y + m0 * ldy + p * Q8_COLS, ldy);
    }
  });
}

#endif  // KQ_SIMD_PASS
