// lowbit's native CPU linear for small batches: y = x W^T with W restored row by row into a
// cache-resident float32 buffer (never written to memory whole) and dotted with every token in
// float32. The weight is the eager dequantize's float32 weight bit for bit; only the order of the
// float32 sums differs from F.linear's, so an fp32 input gets fp32-accurate output (PyTorch's
// packed int4/int8 CPU kernels compute in bfloat16). Threaded over output rows.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <limits>

#include "restore.h"

namespace lowbit {
namespace {


#ifdef LOWBIT_AVX2
inline float horizontal_sum(__m256 v) {
  const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}
#endif

#ifdef LOWBIT_AVX2
// Per token and group, the eight lane sums of x over the group's full runs of eight columns:
// with them a group's dot product is s * (sum v(q) x - z * sum x), so the inner loop neither
// subtracts nor scales (float32-accurate; the weights are not rounded as a separate step).
std::vector<__m256> lane_sums(const Params& p, const float* x, int64_t tokens) {
  std::vector<__m256> sums(tokens * p.groups);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t c0 = g * p.group_len;
      const int64_t full = (std::min<int64_t>(p.cols, c0 + p.group_len) - c0) / 8 * 8;
      __m256 sum = _mm256_setzero_ps();
      for (int64_t i = 0; i < full; i += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(x + t * p.cols + c0 + i));
      sums[t * p.groups + g] = sum;
    }
  }
  return sums;
}

// Rows n0..n1 of y [tokens, out] for a few tokens, straight from the codes: per group, two
// chains of FMAs per token over the (centred) grid values, then one scale-and-shift into the
// row's sum.
template <int Tokens>
void fused_rows(const Params& p, RowRestorer& rows, const float* x, const __m256* sums,
                float* y, int64_t out, int64_t n0, int64_t n1) {
  const int64_t k = p.cols;
  // Sums run over value - c with c the int grid's centre (0 for codebooks), the zero point's
  // share over z - c: s * (sum (v - c) x - (z - c) * sum x) = s * (sum v x - z * sum x).
  const float shift = p.values == nullptr ? float(int64_t(1) << (p.bits - 1)) : 0.f;
  const __m256i center = _mm256_set1_epi32(p.values == nullptr ? int32_t(1) << (p.bits - 1) : 0);
  for (int64_t n = n0; n < n1; ++n) {
    rows.prepare(n);
    const uint8_t* codes = rows.codes();
    __m256 total[Tokens];
    float tail[Tokens];
    for (int t = 0; t < Tokens; ++t) {
      total[t] = _mm256_setzero_ps();
      tail[t] = 0.f;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t c0 = g * p.group_len;
      const int64_t len = std::min<int64_t>(k, c0 + p.group_len) - c0;
      const int64_t full = len / 8 * 8;
      __m256 even[Tokens], odd[Tokens];
      for (int t = 0; t < Tokens; ++t) even[t] = odd[t] = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= full; i += 16) {
        const __m256 v0 = centred_values8(codes + c0 + i, p.values, p.bits, rows.table(), center);
        const __m256 v1 = centred_values8(codes + c0 + i + 8, p.values, p.bits, rows.table(), center);
        for (int t = 0; t < Tokens; ++t) {
          const float* xt = x + t * k + c0 + i;
          even[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt), v0, even[t]);
          odd[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8), v1, odd[t]);
        }
      }
      if (i < full) {
        const __m256 v0 = centred_values8(codes + c0 + i, p.values, p.bits, rows.table(), center);
        for (int t = 0; t < Tokens; ++t) {
          even[t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * k + c0 + i), v0, even[t]);
        }
      }
      const float s = rows.scale(g), z = rows.zero(g);
      const __m256 scale = _mm256_set1_ps(s), zero = _mm256_set1_ps(z - shift);
      for (int t = 0; t < Tokens; ++t) {
        const __m256 dot = _mm256_fnmadd_ps(zero, sums[t * p.groups + g], _mm256_add_ps(even[t], odd[t]));
        total[t] = _mm256_fmadd_ps(scale, dot, total[t]);
      }
      for (int64_t j = full; j < len; ++j) {  // a group's last columns past a multiple of 8
        const uint8_t q = codes[c0 + j];
        const float w = ((p.values ? p.values[q] : float(q)) - z) * s;
        for (int t = 0; t < Tokens; ++t) tail[t] += x[t * k + c0 + j] * w;
      }
    }
    for (int t = 0; t < Tokens; ++t) y[t * out + n] = horizontal_sum(total[t]) + tail[t];
  }
}
#endif

// y[t * y_stride] = dot(x[t], w) for t < tokens; x is [tokens, k] row-major.
void dot_tokens(const float* x, int64_t tokens, int64_t k, const float* w, float* y,
                int64_t y_stride) {
  int64_t t = 0;
#ifdef LOWBIT_AVX2
  // Four tokens share each load of the weight; four independent sums hide the FMA latency.
  for (; t + 4 <= tokens; t += 4) {
    const float* x0 = x + t * k;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 wv = _mm256_loadu_ps(w + i);
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j * k + i), wv, acc[j]);
    }
    for (int j = 0; j < 4; ++j) {
      float sum = horizontal_sum(acc[j]);
      for (int64_t r = i; r < k; ++r) sum += x0[j * k + r] * w[r];
      y[(t + j) * y_stride] = sum;
    }
  }
  for (; t < tokens; ++t) {
    const float* xt = x + t * k;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      for (int j = 0; j < 4; ++j) {
        acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + i + 8 * j), _mm256_loadu_ps(w + i + 8 * j), acc[j]);
      }
    }
    for (; i + 8 <= k; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + i), _mm256_loadu_ps(w + i), acc[0]);
    float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; i < k; ++i) sum += xt[i] * w[i];
    y[t * y_stride] = sum;
  }
#else
  for (; t < tokens; ++t) {
    float sum = 0.f;
    for (int64_t i = 0; i < k; ++i) sum += x[t * k + i] * w[i];
    y[t * y_stride] = sum;
  }
#endif
}

// x float32 [tokens, in] (contiguous) times the dense-layout QuantizedTensor [out, in] restored
// in float32, transposed: float32 [tokens, out]. Arguments after x mirror dequantize_.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t group_len,
                  const at::Tensor& scale, int64_t zero_kind, const std::optional<at::Tensor>& zero,
                  double center, double vmin, const std::optional<at::Tensor>& values,
                  int64_t out_features) {
  const char* op = "linear";
  check(x.device().is_cpu(), op, "CPU tensors only");
  check(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
        "x must be contiguous float32 [tokens, in_features]");
  const int64_t tokens = x.size(0), in_features = x.size(1);
  const Params p = make_params(op, out_features, in_features, packed, bits, group_len, scale,
                               zero_kind, zero, center, vmin, values,
                               std::numeric_limits<float>::max());
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return y;
  if (in_features == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / in_features);
#ifdef LOWBIT_AVX2
  const std::vector<__m256> sums = tokens <= 4 ? lane_sums(p, xp, tokens) : std::vector<__m256>();
#endif
  at::parallel_for(0, out_features, grain, [&](int64_t n0, int64_t n1) {
    RowRestorer restorer(p);
#ifdef LOWBIT_AVX2
    const __m256* s = sums.data();
    switch (tokens) {  // a fixed count keeps every sum in a register
      case 1: return fused_rows<1>(p, restorer, xp, s, yp, out_features, n0, n1);
      case 2: return fused_rows<2>(p, restorer, xp, s, yp, out_features, n0, n1);
      case 3: return fused_rows<3>(p, restorer, xp, s, yp, out_features, n0, n1);
      case 4: return fused_rows<4>(p, restorer, xp, s, yp, out_features, n0, n1);
      default: break;
    }
#endif
    // More tokens: restore the row once into a cache-resident buffer, then dot every token.
    std::vector<float> row(in_features + 32);
    for (int64_t n = n0; n < n1; ++n) {
      restorer.restore(n, row.data());
      dot_tokens(xp, tokens, in_features, row.data(), yp + n, out_features);
    }
  });
  return y;
}

// x float32 [tokens, in] (contiguous) times the weight restored tile by tile: `tile_rows` rows
// at a time go into `tile` (the caller's reused scratch buffer: a fresh allocation of this size
// costs more in page faults than the restore), small enough to stay in cache, and PyTorch's GEMM
// multiplies the tile while it is there, writing its columns of y. The weight never makes the round
// trip through memory that dequantize + F.linear costs it. Returns float32 [tokens, out].
at::Tensor linear_tiled(const at::Tensor& x, const at::Tensor& packed, int64_t bits,
                        int64_t group_len, const at::Tensor& scale, int64_t zero_kind,
                        const std::optional<at::Tensor>& zero, double center, double vmin,
                        const std::optional<at::Tensor>& values, int64_t out_features,
                        int64_t tile_rows, const at::Tensor& tile) {
  const char* op = "linear_tiled";
  check(x.device().is_cpu(), op, "CPU tensors only");
  check(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
        "x must be contiguous float32 [tokens, in_features]");
  check(tile_rows >= 1, op, "tile_rows must be positive");
  const int64_t tokens = x.size(0), in_features = x.size(1);
  const Params p = make_params(op, out_features, in_features, packed, bits, group_len, scale,
                               zero_kind, zero, center, vmin, values,
                               std::numeric_limits<float>::max());
  const int64_t rows = std::min(tile_rows, out_features);
  check(tile.scalar_type() == at::kFloat && tile.is_contiguous() &&
            tile.numel() >= rows * in_features,
        op, "tile must be a contiguous float32 buffer of at least tile_rows x in_features");
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return y;
  if (in_features == 0) return y.zero_();
  float* tp = tile.data_ptr<float>();
  const at::Tensor restored = tile.view(-1).narrow(0, 0, rows * in_features).view({rows, in_features});
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / in_features);
  for (int64_t n0 = 0; n0 < out_features; n0 += rows) {
    const int64_t n = std::min(rows, out_features - n0);
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      RowRestorer restorer(p);
      for (int64_t r = r0; r < r1; ++r) restorer.restore(n0 + r, tp + r * in_features);
    });
    // y[:, n0:n0+n] = x tile^T, written in place (BLAS takes the row stride of y as is).
    at::Tensor columns = y.narrow(1, n0, n);
    at::mm_out(columns, x, restored.narrow(0, 0, n).t());
  }
  return y;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def(
      "linear(Tensor x, Tensor packed, int bits, int group_len, Tensor scale, int zero_kind, "
      "Tensor? zero, float center, float vmin, Tensor? values, int out_features) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(lowbit::linear));
  m.def(
      "linear_tiled(Tensor x, Tensor packed, int bits, int group_len, Tensor scale, "
      "int zero_kind, Tensor? zero, float center, float vmin, Tensor? values, int out_features, "
      "int tile_rows, Tensor(a!) tile) -> Tensor");
  m.impl("linear_tiled", c10::DispatchKey::CPU, TORCH_FN(lowbit::linear_tiled));
}
