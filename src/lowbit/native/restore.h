// What every lowbit native kernel shares: unpacking a row of codes and restoring it,
// (value(q) - zero) * scale rounded once to the output dtype, bit for bit as the eager
// QuantizedTensor.dequantize (lowbit/tensor.py) computes it.
//
// Codes are stored row by row, LSB first: code i of a row sits at bit i*bits of the row's
// little-endian bit stream (for 1, 2, 4 and 8 bits that is byte i*bits/8 at shift
// (i*bits)%8; for 3, 5, 6 and 7 bits eight codes fill exactly `bits` bytes).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// The vector paths need AVX2, FMA and F16C (x86-64 since 2013); elsewhere the scalar code runs.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LOWBIT_AVX2 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace lowbit {

// Codes of one row into `codes[0..cols)` (`codes` has room for cols rounded up to 8). The
// 1, 2 and 4-bit cases widen each byte into a word of its codes, a form compilers vectorise.
inline void unpack_row(const uint8_t* row, int64_t bits, int64_t cols, uint8_t* codes) {
  const int64_t row_bytes = (cols * bits + 7) / 8;
  if (bits == 8) {
    std::memcpy(codes, row, cols);
  } else if (bits == 4) {
    int64_t j = 0;
#ifdef LOWBIT_AVX2
    const __m128i low = _mm_set1_epi8(0x0F);
    for (; j + 16 <= row_bytes && 2 * j + 32 <= cols + 16; j += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
      const __m128i lo = _mm_and_si128(b, low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 2 * j), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 2 * j + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; j < row_bytes; ++j) {
      codes[2 * j] = row[j] & 0x0Fu;
      if (2 * j + 1 < cols) codes[2 * j + 1] = row[j] >> 4;
    }
  } else if (bits == 2) {
    std::vector<uint32_t> wide(row_bytes);
    for (int64_t j = 0; j < row_bytes; ++j) {
      const uint32_t b = row[j];
      wide[j] = (b & 3u) | ((b & 0x0Cu) << 6) | ((b & 0x30u) << 12) | ((b & 0xC0u) << 18);
    }
    std::memcpy(codes, wide.data(), std::min<int64_t>(4 * row_bytes, cols + 7));
  } else if (bits == 1) {
    for (int64_t i = 0; i < cols; ++i) codes[i] = (row[i >> 3] >> (i & 7)) & 1u;
  } else {
    // 3, 5, 6, 7 bits: eight codes in `bits` bytes; the row's last chunk may be short.
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t i0 = 0; i0 < cols; i0 += 8) {
      const int64_t byte0 = i0 / 8 * bits;
      const int64_t avail = std::min<int64_t>(bits, row_bytes - byte0);
      uint64_t word = 0;  // little-endian, as the packer wrote it
      if (byte0 + 8 <= row_bytes) {
        std::memcpy(&word, row + byte0, 8);  // one load; bits past the chunk are masked off
      } else {
        for (int64_t k = 0; k < avail; ++k) word |= uint64_t(row[byte0 + k]) << (8 * k);
      }
      for (int64_t k = 0; k < 8; ++k) codes[i0 + k] = (word >> (k * bits)) & mask;
    }
  }
}

// float -> bfloat16 bits, round to nearest even: the same rounding as c10::BFloat16 for every
// finite input (the only inputs here: values are clamped), written branch-free so it vectorises.
inline uint16_t to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <typename Out>
inline void store(Out* dst, float w) {
  if constexpr (std::is_same_v<Out, float>) {
    *dst = w;
  } else if constexpr (std::is_same_v<Out, c10::BFloat16>) {
    *reinterpret_cast<uint16_t*>(dst) = to_bf16_bits(w);
  } else {
    *reinterpret_cast<_Float16*>(dst) = _Float16(w);
  }
}

template <typename Out>
inline Out restore_one(float value, float z, float s, float limit) {
  const float w = (value - z) * s;
  Out out;
  store(&out, std::min(std::max(w, -limit), limit));
  return out;
}

// One group: dst[i] = Out(clamp((value(q[i]) - z) * s)), in float32, in that order, as the
// eager reference computes it. `values == nullptr` means the code is its own value (int grid).
template <typename Out>
inline void restore_group(const uint8_t* q, int64_t n, const float* values, float z, float s,
                          float limit, Out* dst) {
  if (values == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float w = (float(q[i]) - z) * s;
      store(dst + i, std::min(std::max(w, -limit), limit));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float w = (values[q[i]] - z) * s;
      store(dst + i, std::min(std::max(w, -limit), limit));
    }
  }
}


#ifdef LOWBIT_AVX2
// Eight weights at a time: codes -> grid values -> (value - z) * s -> clamp, the reference's
// float32 operations in its order, so each lane is bit-identical to restore_one's float.
struct ValueTable {  // a codebook's first 16 values, for in-register lookups
  __m256 low, high;
};

inline ValueTable value_table(const float* values, int64_t bits) {
  alignas(32) float padded[16] = {};
  if (values != nullptr) std::memcpy(padded, values, sizeof(float) * std::min<int64_t>(16, int64_t(1) << bits));
  return {_mm256_load_ps(padded), _mm256_load_ps(padded + 8)};
}

inline __m256 values8(const uint8_t* q, const float* values, int64_t bits, const ValueTable& table) {
  const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  if (values == nullptr) return _mm256_cvtepi32_ps(codes);
  if (bits <= 3) return _mm256_permutevar8x32_ps(table.low, codes);
  if (bits == 4) {
    const __m256 low = _mm256_permutevar8x32_ps(table.low, codes);
    const __m256 high = _mm256_permutevar8x32_ps(table.high, codes);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
  }
  return _mm256_i32gather_ps(values, codes, 4);
}

// values8 minus the grid centre `center` (an exact integer subtraction for the int grid; codebooks
// are centred at 0 already): the fused dot products work with small numbers, so subtracting the
// zero point's share afterwards does not cancel digits away.
inline __m256 centred_values8(const uint8_t* q, const float* values, int64_t bits,
                              const ValueTable& table, __m256i center) {
  if (values != nullptr) return values8(q, values, bits, table);
  const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(codes, center));
}

inline __m256 weights8(__m256 value, __m256 zero, __m256 scale, __m256 limit) {
  const __m256 w = _mm256_mul_ps(_mm256_sub_ps(value, zero), scale);
  return _mm256_min_ps(_mm256_max_ps(w, _mm256_sub_ps(_mm256_setzero_ps(), limit)), limit);
}

template <typename Out>
inline void store8(Out* dst, __m256 w) {
  if constexpr (std::is_same_v<Out, float>) {
    _mm256_storeu_ps(dst, w);
  } else if constexpr (std::is_same_v<Out, c10::BFloat16>) {
    __m256i u = _mm256_castps_si256(w);  // round to nearest even, as to_bf16_bits
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
  }
}
#endif

// How a group's zero point is stored (see QuantizedTensor.zero_points in lowbit/tensor.py).
enum ZeroKind : int64_t { kCenter = 0, kPackedInt = 1, kFloatStorage = 2 };

struct Params {
  const uint8_t* packed;
  int64_t row_bytes, bits, rows, cols, group_len, groups;
  bool per_row;             // scales per row (else one row of scales for the whole tensor)
  const void* scale;        // [scale_rows, groups] of scale_type
  at::ScalarType scale_type;
  int64_t zero_kind;
  const void* zero;         // kPackedInt: uint8 [scale_rows, zero_row_bytes]; kFloatStorage:
  int64_t zero_row_bytes;   //   [scale_rows, groups] of scale_type; kCenter: unused
  float center, vmin;       // the grid's centre (symmetric zero) and lowest value
  const float* values;      // [2**bits] or nullptr for the int grid
  float limit;
};

// Widening to float32 is exact for every stored dtype (hardware conversion where there is one).
inline float load_float(const void* base, at::ScalarType type, int64_t i) {
  switch (type) {
    case at::kHalf: {
#ifdef LOWBIT_AVX2
      return _cvtsh_ss(static_cast<const uint16_t*>(base)[i]);
#else
      return float(static_cast<const c10::Half*>(base)[i]);
#endif
    }
    case at::kBFloat16: {
      const uint32_t bits = uint32_t(static_cast<const uint16_t*>(base)[i]) << 16;
      float value;
      std::memcpy(&value, &bits, 4);
      return value;
    }
    default: return static_cast<const float*>(base)[i];
  }
}

inline void check(bool ok, const char* op, const char* what) {
  TORCH_CHECK(ok, "lowbit::", op, ": ", what);
}

inline bool is_float(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// Checks a QuantizedTensor's fields for a [rows, cols] weight (messages name `op`) and returns
// the raw view the kernels read; the tensors must outlive it.
inline Params make_params(const char* op, int64_t rows, int64_t cols, const at::Tensor& packed,
                          int64_t bits, int64_t group_len, const at::Tensor& scale,
                          int64_t zero_kind, const std::optional<at::Tensor>& zero,
                          double center, double vmin, const std::optional<at::Tensor>& values,
                          double limit) {
  check(packed.device().is_cpu() && scale.device().is_cpu(), op, "CPU tensors only");
  check(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), op,
        "packed must be contiguous uint8 [rows, row_bytes]");
  check(bits >= 1 && bits <= 8, op, "bits must be in 1..8");
  check(packed.size(0) == rows && packed.size(1) == (cols * bits + 7) / 8, op, "packed shape");
  check(group_len >= 1, op, "group_len must be positive");
  const int64_t groups = (cols + group_len - 1) / group_len;
  check(is_float(scale) && scale.is_contiguous() && scale.dim() == 2 && scale.size(1) == groups &&
            (scale.size(0) == rows || scale.size(0) == 1),
        op, "scale must be a contiguous float tensor [1 or rows, groups]");
  Params p{};
  p.zero_kind = zero_kind;
  if (zero_kind == kPackedInt) {
    check(zero && zero->scalar_type() == at::kByte && zero->is_contiguous() && zero->dim() == 2 &&
              zero->size(0) == scale.size(0) && zero->size(1) == (groups * bits + 7) / 8,
          op, "packed integer zero points must be contiguous uint8 [scale rows, zero bytes]");
    p.zero = zero->data_ptr();
    p.zero_row_bytes = zero->size(1);
  } else if (zero_kind == kFloatStorage) {
    check(zero && zero->scalar_type() == scale.scalar_type() && zero->is_contiguous() &&
              zero->sizes() == scale.sizes(),
          op, "float zero points must be contiguous, shaped and typed like scale");
    p.zero = zero->data_ptr();
  } else {
    check(zero_kind == kCenter && !zero, op, "zero_kind must be 0 (centre), 1 (int) or 2 (float)");
  }
  if (values) {
    check(values->scalar_type() == at::kFloat && values->is_contiguous() &&
              values->numel() == (int64_t(1) << bits),
          op, "values must be contiguous float32 [2**bits]");
  }
  p.packed = packed.data_ptr<uint8_t>();
  p.row_bytes = packed.size(1);
  p.bits = bits;
  p.rows = rows;
  p.cols = cols;
  p.group_len = group_len;
  p.groups = groups;
  p.per_row = scale.size(0) == rows && rows > 1;
  p.scale = scale.data_ptr();
  p.scale_type = scale.scalar_type();
  p.center = float(center);
  p.vmin = float(vmin);
  p.values = values ? values->data_ptr<float>() : nullptr;
  p.limit = float(limit);
  return p;
}

// Restores rows one at a time; one per thread (it owns the row's scratch buffers).
class RowRestorer {
 public:
  explicit RowRestorer(const Params& p)
      : p_(p), codes_(p.cols + 32), zero_codes_(p.groups + 32), scales_(p.groups),
        zeros_(p.groups) {
#ifdef LOWBIT_AVX2
    table_ = value_table(p.values, p.bits);
#endif
  }

  // Row r of the weight into dst[0..cols).
  template <typename Out>
  void restore(int64_t r, Out* dst) {
    prepare(r);
    for (int64_t g = 0; g < p_.groups; ++g) {
      const int64_t c0 = g * p_.group_len;
      const int64_t n = std::min<int64_t>(p_.cols, c0 + p_.group_len) - c0;
      int64_t i = 0;
#ifdef LOWBIT_AVX2
      const __m256 zero = _mm256_set1_ps(zeros_[g]), scale = _mm256_set1_ps(scales_[g]);
      const __m256 limit = _mm256_set1_ps(p_.limit);
      for (; i + 8 <= n; i += 8) {
        const __m256 value = values8(codes_.data() + c0 + i, p_.values, p_.bits, table_);
        store8(dst + c0 + i, weights8(value, zero, scale, limit));
      }
#endif
      restore_group(codes_.data() + c0 + i, n - i, p_.values, zeros_[g], scales_[g], p_.limit,
                    dst + c0 + i);
    }
  }


  // Unpacks row r's codes and loads its groups' scales and zero points (the accessors below).
  void prepare(int64_t r) {
    unpack_row(p_.packed + r * p_.row_bytes, p_.bits, p_.cols, codes_.data());
    load_params(p_.per_row ? r : 0);
  }
  const uint8_t* codes() const { return codes_.data(); }
  float scale(int64_t g) const { return scales_[g]; }
  float zero(int64_t g) const { return zeros_[g]; }
#ifdef LOWBIT_AVX2
  const ValueTable& table() const { return table_; }
#endif

 private:
  // The same float32 arithmetic as QuantizedTensor.zero_points.
  void load_params(int64_t srow) {
    if (srow == loaded_row_) return;
    for (int64_t g = 0; g < p_.groups; ++g) {
      scales_[g] = load_float(p_.scale, p_.scale_type, srow * p_.groups + g);
    }
    if (p_.zero_kind == kPackedInt) {
      unpack_row(static_cast<const uint8_t*>(p_.zero) + srow * p_.zero_row_bytes, p_.bits,
                 p_.groups, zero_codes_.data());
      for (int64_t g = 0; g < p_.groups; ++g) zeros_[g] = float(zero_codes_[g]);
    } else if (p_.zero_kind == kFloatStorage) {
      for (int64_t g = 0; g < p_.groups; ++g) {
        const float stored = load_float(p_.zero, p_.scale_type, srow * p_.groups + g);
        zeros_[g] = scales_[g] > 0 ? p_.vmin - stored / scales_[g] : p_.vmin;
      }
    } else {
      std::fill(zeros_.begin(), zeros_.end(), p_.center);
    }
    loaded_row_ = srow;
  }

  const Params& p_;
  std::vector<uint8_t> codes_, zero_codes_;
  std::vector<float> scales_, zeros_;
  int64_t loaded_row_ = -1;
#ifdef LOWBIT_AVX2
  ValueTable table_;
#endif
};

}  // namespace lowbit
