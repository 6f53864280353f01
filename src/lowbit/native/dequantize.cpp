// lowbit's native CPU dequantize: unpack + grid value + (value - zero) * scale + cast, one pass
// per weight, threaded over rows with PyTorch's own thread pool (so torch.set_num_threads and
// `--threads` apply). Built on first use by lowbit/native/__init__.py; the eager PyTorch version
// in lowbit/tensor.py is the reference it is tested against bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "restore.h"

namespace lowbit {
namespace {

template <typename Out>
void dequantize_rows(const Params& p, Out* out, int64_t out_row_stride) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, p.cols));
  at::parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) {
    RowRestorer restorer(p);
    for (int64_t r = r0; r < r1; ++r) restorer.restore(r, out + r * out_row_stride);
  });
}

// Restores a dense-layout QuantizedTensor into out [rows, cols] (float32, bfloat16 or float16,
// unit column stride); the arguments mirror QuantizedTensor's fields (see lowbit/native).
void dequantize_(const at::Tensor& packed, int64_t bits, int64_t group_len,
                 const at::Tensor& scale, int64_t zero_kind, const std::optional<at::Tensor>& zero,
                 double center, double vmin, const std::optional<at::Tensor>& values,
                 double limit, const at::Tensor& out) {
  const char* op = "dequantize_";
  check(out.device().is_cpu(), op, "CPU tensors only");
  check(out.dim() == 2 && out.stride(1) == 1, op, "out must be [rows, cols] with unit column stride");
  const Params p = make_params(op, out.size(0), out.size(1), packed, bits, group_len, scale,
                               zero_kind, zero, center, vmin, values, limit);
  if (p.rows == 0 || p.cols == 0) return;
  switch (out.scalar_type()) {
    case at::kFloat:
      dequantize_rows<float>(p, out.data_ptr<float>(), out.stride(0));
      break;
    case at::kBFloat16:
      dequantize_rows<c10::BFloat16>(p, out.data_ptr<c10::BFloat16>(), out.stride(0));
      break;
    case at::kHalf:
      dequantize_rows<c10::Half>(p, out.data_ptr<c10::Half>(), out.stride(0));
      break;
    default:
      check(false, op, "out must be float32, bfloat16 or float16");
  }
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def(
      "dequantize_(Tensor packed, int bits, int group_len, Tensor scale, int zero_kind, "
      "Tensor? zero, float center, float vmin, Tensor? values, float limit, Tensor(a!) out) -> ()");
  m.impl("dequantize_", c10::DispatchKey::CPU, TORCH_FN(lowbit::dequantize_));
}
