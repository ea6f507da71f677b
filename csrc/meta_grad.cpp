// Python bindings of perk_kernels._C: the meta-gradient accumulation of meta_grad_kernel.cu on flat
// adapter buffers. perk_kernels/meta_grad_accumulate.py validates arguments, builds the chunk table
// and calls this; the checks here only guard the kernel's assumptions (CUDA, contiguous (n_adapters, P)
// buffers of one dtype, fp32 or that dtype for coef and lr_grad; coef may be None when v is not updated).

#include <torch/extension.h>

#include <optional>

void meta_grad_accumulate_cuda(
    at::Tensor& v,
    const at::Tensor& g,
    const std::optional<at::Tensor>& g_plus,
    const std::optional<at::Tensor>& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor& lr_grad,
    const at::Tensor& chunks,
    int64_t slots);

namespace {

constexpr int64_t kMaxPrograms = 2147483647;  // a 1-D grid's x limit

void check_like_v(const char* name, const at::Tensor& t, const at::Tensor& v) {
  TORCH_CHECK(t.is_cuda() && t.device() == v.device(), name, " must be on ", v.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == v.scalar_type(), name, " must have dtype ", v.scalar_type());
  TORCH_CHECK(t.sizes() == v.sizes(), name, " must have the shape of v ", v.sizes());
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(
      (t.scalar_type() == at::kFloat || t.scalar_type() == like.scalar_type()) && t.is_contiguous() &&
          t.device() == like.device() && t.sizes() == shape,
      name, " must be a contiguous ", shape, " tensor of dtype float32 or ", like.scalar_type(), " on ",
      like.device());
}

void meta_grad_accumulate(
    at::Tensor v,
    const at::Tensor& g,
    const std::optional<at::Tensor>& g_plus,
    const std::optional<at::Tensor>& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor lr_grad,
    const at::Tensor& chunks,
    int64_t slots) {
  TORCH_CHECK(v.dim() == 2, "v must be an (n_adapters, P) tensor");
  check_like_v("v", v, v);
  check_like_v("g", g, v);
  TORCH_CHECK(g_plus.has_value() == g_minus.has_value(), "g_plus and g_minus must both be given or both be None");
  if (g_plus.has_value()) {
    check_like_v("g_plus", *g_plus, v);
    check_like_v("g_minus", *g_minus, v);
  }
  const int64_t n_adapters = v.size(0);
  TORCH_CHECK(lr_grad.dim() == 2, "lr_grad must be an (n_adapters, G) tensor");
  check_table("lr_grad", lr_grad, v, {n_adapters, lr_grad.size(1)});
  TORCH_CHECK(!g_plus.has_value() || coef.has_value(), "coef is needed with g_plus and g_minus");
  if (coef.has_value()) {
    check_table("coef", *coef, v, {n_adapters});
  }
  TORCH_CHECK(
      chunks.scalar_type() == at::kLong && chunks.is_contiguous() && chunks.dim() == 2 && chunks.size(1) == 4 &&
          chunks.device() == v.device(),
      "chunks must be a contiguous (n_chunks, 4) int64 table on ", v.device());
  TORCH_CHECK(slots >= 1, "slots must be positive, got ", slots);
  TORCH_CHECK(
      n_adapters * chunks.size(0) <= kMaxPrograms && n_adapters * lr_grad.size(1) <= kMaxPrograms,
      "too many adapters for one launch: split them over several calls");
  meta_grad_accumulate_cuda(v, g, g_plus, g_minus, coef, lr_grad, chunks, slots);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "perk_kernels._C: CUDA kernels of perk_kernels (meta-gradient accumulation on flat adapter buffers)";
  m.def(
      "meta_grad_accumulate",
      &meta_grad_accumulate,
      "In place, on flat (n_adapters, P) buffers in two launches (deterministic): lr_grad[a, k] -= "
      "<g[a, group k], v[a, group k]>, then v[a] -= coef[a] * (g_plus[a] - g_minus[a]) unless g_plus and g_minus "
      "are None. chunks: (n_chunks, 4) int64 rows [group, start, end, slot] that never cross a group border.",
      py::arg("v"),
      py::arg("g"),
      py::arg("g_plus"),
      py::arg("g_minus"),
      py::arg("coef"),
      py::arg("lr_grad"),
      py::arg("chunks"),
      py::arg("slots"));
}
