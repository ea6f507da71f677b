// Python bindings of perk_kernels._C: the multi-tensor meta-gradient accumulation of
// meta_grad_kernel.cu. perk_kernels/meta_grad.py validates arguments and calls this; the checks
// here only guard the kernel's assumptions (CUDA, contiguous adapter slices, one dtype, fp32 or
// that dtype for coef and lr_grad; coef may be None when v is not updated).

#include <torch/extension.h>

#include <optional>
#include <vector>

void meta_grad_accumulate_cuda(
    const std::vector<at::Tensor>& v,
    const std::vector<at::Tensor>& g,
    const std::vector<at::Tensor>& g_plus,
    const std::vector<at::Tensor>& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor& lr_grad);

namespace {

constexpr int64_t kMaxAdapters = 65535;  // the kernels' grid.y

// Whether every adapter slice t[a] is contiguous; the adapter stride t.stride(0) is free.
bool adapter_slices_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) {
      return false;
    }
    expected *= t.size(d);
  }
  return true;
}

void check_like_v(const char* name, const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& v) {
  TORCH_CHECK(tensors.size() == v.size(), name, " must hold ", v.size(), " tensors, got ", tensors.size());
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK(
        tensors[i].is_cuda() && tensors[i].device() == v[0].device(), name, "[", i, "] must be on ", v[0].device());
    TORCH_CHECK(adapter_slices_contiguous(tensors[i]), name, "[", i, "] must have contiguous adapter slices");
    TORCH_CHECK(
        tensors[i].scalar_type() == v[0].scalar_type(), name, "[", i, "] must have dtype ", v[0].scalar_type());
    TORCH_CHECK(tensors[i].sizes() == v[i].sizes(), name, "[", i, "] must have the shape of v[", i, "]");
  }
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(
      (t.scalar_type() == at::kFloat || t.scalar_type() == like.scalar_type()) && t.is_contiguous() &&
          t.device() == like.device() && t.sizes() == shape,
      name, " must be a contiguous ", shape, " tensor of dtype float32 or ", like.scalar_type(), " on ",
      like.device());
}

void meta_grad_accumulate(
    const std::vector<at::Tensor>& v,
    const std::vector<at::Tensor>& g,
    const std::vector<at::Tensor>& g_plus,
    const std::vector<at::Tensor>& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor lr_grad) {
  TORCH_CHECK(!v.empty(), "v must hold at least one tensor");
  check_like_v("v", v, v);
  check_like_v("g", g, v);
  TORCH_CHECK(g_plus.size() == g_minus.size(), "g_plus and g_minus must both be given or both be empty");
  if (!g_plus.empty()) {
    check_like_v("g_plus", g_plus, v);
    check_like_v("g_minus", g_minus, v);
  }
  TORCH_CHECK(lr_grad.dim() == 2, "lr_grad must be a [n_adapters, n_tensors] tensor");
  const int64_t n_adapters = lr_grad.size(0);
  TORCH_CHECK(n_adapters <= kMaxAdapters, "at most ", kMaxAdapters, " adapters, got ", n_adapters);
  check_table("lr_grad", lr_grad, v[0], {n_adapters, static_cast<int64_t>(v.size())});
  TORCH_CHECK(g_plus.empty() || coef.has_value(), "coef is needed with g_plus and g_minus");
  if (coef.has_value()) {
    check_table("coef", *coef, v[0], {n_adapters});
  }
  for (size_t i = 0; i < v.size(); ++i) {
    TORCH_CHECK(
        v[i].dim() >= 1 && v[i].size(0) == n_adapters, "v[", i, "] must have ", n_adapters, " adapters in dim 0");
    // Updated in place: adapter slices must not overlap.
    TORCH_CHECK(
        n_adapters <= 1 || v[i].stride(0) >= v[i].numel() / n_adapters, "v[", i, "] has overlapping adapter slices");
  }
  meta_grad_accumulate_cuda(v, g, g_plus, g_minus, coef, lr_grad);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "perk_kernels._C: CUDA kernels of perk_kernels (multi-tensor meta-gradient accumulation)";
  m.def(
      "meta_grad_accumulate",
      &meta_grad_accumulate,
      "In place, over all adapter tensors in two launches (deterministic): lr_grad[a, i] -= <g_i[a], v_i[a]>, "
      "then v_i[a] -= coef[a] * (g_plus_i[a] - g_minus_i[a]) unless g_plus and g_minus are empty.",
      py::arg("v"),
      py::arg("g"),
      py::arg("g_plus"),
      py::arg("g_minus"),
      py::arg("coef"),
      py::arg("lr_grad"));
}
