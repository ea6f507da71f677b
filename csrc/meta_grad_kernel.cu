// Meta-gradient accumulation (docs/design.md §3) on flat adapter buffers, two launches whatever the number of groups.
//
// v, g, g_plus, g_minus are contiguous (n_adapters, P) buffers split into G tensor groups (columns
// [o_k, o_{k+1})). For every adapter a and group k, with v read before its update:
//   lr_grad[a, k] = lr_grad[a, k] - <g[a, group k], v[a, group k]>   (in opmath, fp32 or fp64, rounded once)
//   v[a, :]      -= coef[a] * (g_plus[a, :] - g_minus[a, :])         (when update_v)
//
// Work split, deterministic (no atomics), driven by the caller's chunk table (rows [group, start, end,
// slot], chunks never crossing a group border; built and cached on the device by
// perk_kernels._utils.group_chunks, so no host-to-device copy per call):
//   1. block b = adapter * n_chunks + chunk walks one chunk of one adapter's row, updates v there and
//      writes its partial dot product to partials[adapter, slot] (slot = group * slots + c);
//   2. block b = adapter * G + group sums that group's `slots` partials (padding slots are zero) in a
//      fixed order and updates lr_grad[adapter, group].
// Every thread visits a fixed set of elements and block_sum's tree is fixed, so the same inputs
// give bitwise-equal results run after run.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;

struct ChunkEntry {
  int64_t group;
  int64_t start;  // first column of the chunk in each adapter's row
  int64_t end;    // one past its last column
  int64_t slot;   // where its partial goes in the adapter's row of G * slots partials
};

template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = threadIdx.x < kThreads / kWarpSize ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;  // the block's sum, valid in thread 0
}

template <typename scalar_t, typename coef_t>
__global__ void __launch_bounds__(kThreads) accumulate_chunks_kernel(
    const ChunkEntry* __restrict__ chunks,
    scalar_t* __restrict__ v,
    const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ g_plus,   // g when v is not updated (never read then)
    const scalar_t* __restrict__ g_minus,  // g when v is not updated (never read then)
    const coef_t* __restrict__ coef,
    at::opmath_type<scalar_t>* __restrict__ partials,
    int64_t n_chunks,
    int64_t n_params,
    int64_t n_partials,  // G * slots per adapter
    bool update_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t adapter = static_cast<int64_t>(blockIdx.x) / n_chunks;
  const ChunkEntry chunk = chunks[static_cast<int64_t>(blockIdx.x) - adapter * n_chunks];
  const int64_t row = adapter * n_params;
  const acc_t scale = update_v ? static_cast<acc_t>(coef[adapter]) : acc_t(0);  // coef may be null

  acc_t dot = 0;
  for (int64_t k = row + chunk.start + threadIdx.x; k < row + chunk.end; k += kThreads) {
    const acc_t v_old = static_cast<acc_t>(v[k]);
    dot += static_cast<acc_t>(g[k]) * v_old;
    if (update_v) {
      // Difference and update in opmath: g_plus and g_minus are close, their low-precision
      // difference would lose most of its digits.
      const acc_t diff = static_cast<acc_t>(g_plus[k]) - static_cast<acc_t>(g_minus[k]);
      v[k] = static_cast<scalar_t>(v_old - scale * diff);
    }
  }
  dot = block_sum(dot);
  if (threadIdx.x == 0) {
    partials[adapter * n_partials + chunk.slot] = dot;
  }
}

template <typename acc_t, typename lr_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(
    const acc_t* __restrict__ partials, lr_t* __restrict__ lr_grad, int64_t slots) {
  const int64_t index = blockIdx.x;  // = adapter * G + group; that group's slots are contiguous
  const acc_t* own = partials + index * slots;
  acc_t total = 0;
  for (int64_t k = threadIdx.x; k < slots; k += kThreads) {
    total += own[k];
  }
  total = block_sum(total);
  if (threadIdx.x == 0) {
    lr_grad[index] = static_cast<lr_t>(static_cast<acc_t>(lr_grad[index]) - total);
  }
}

// coef and lr_grad are fp32 or the buffers' dtype: pick the kernel instance for each.
template <typename scalar_t>
void launch(
    at::Tensor& v,
    const at::Tensor& g,
    const at::Tensor& g_plus,
    const at::Tensor& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor& lr_grad,
    const ChunkEntry* chunk_table,
    int64_t n_chunks,
    int64_t slots,
    bool update_v,
    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_adapters = v.size(0);
  const int64_t n_groups = lr_grad.size(1);
  // Zeros: the padding slots of groups with fewer than `slots` chunks are summed too.
  const at::Tensor partials =
      at::zeros({n_adapters, n_groups * slots}, lr_grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto* partials_ptr = partials.data_ptr<acc_t>();
  const dim3 chunk_grid(static_cast<unsigned int>(n_adapters * n_chunks));
  const dim3 group_grid(static_cast<unsigned int>(n_adapters * n_groups));
  scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const scalar_t* g_ptr = g.data_ptr<scalar_t>();
  const scalar_t* g_plus_ptr = g_plus.data_ptr<scalar_t>();
  const scalar_t* g_minus_ptr = g_minus.data_ptr<scalar_t>();
  if (!coef.has_value() || coef->scalar_type() == at::kFloat) {
    const float* coef_ptr = coef.has_value() ? coef->data_ptr<float>() : nullptr;
    accumulate_chunks_kernel<scalar_t, float><<<chunk_grid, kThreads, 0, stream>>>(
        chunk_table, v_ptr, g_ptr, g_plus_ptr, g_minus_ptr, coef_ptr, partials_ptr, n_chunks, v.size(1),
        n_groups * slots, update_v);
  } else {
    accumulate_chunks_kernel<scalar_t, scalar_t><<<chunk_grid, kThreads, 0, stream>>>(
        chunk_table, v_ptr, g_ptr, g_plus_ptr, g_minus_ptr, coef->data_ptr<scalar_t>(), partials_ptr, n_chunks,
        v.size(1), n_groups * slots, update_v);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (lr_grad.scalar_type() == at::kFloat) {
    sum_partials_kernel<acc_t, float><<<group_grid, kThreads, 0, stream>>>(
        partials_ptr, lr_grad.data_ptr<float>(), slots);
  } else {
    sum_partials_kernel<acc_t, scalar_t><<<group_grid, kThreads, 0, stream>>>(
        partials_ptr, lr_grad.data_ptr<scalar_t>(), slots);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void meta_grad_accumulate_cuda(
    at::Tensor& v,
    const at::Tensor& g,
    const std::optional<at::Tensor>& g_plus,
    const std::optional<at::Tensor>& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor& lr_grad,
    const at::Tensor& chunks,
    int64_t slots) {
  const int64_t n_chunks = chunks.size(0);
  if (n_chunks == 0 || v.size(0) == 0 || lr_grad.size(1) == 0) {
    return;  // no element: lr_grad keeps its values
  }
  const bool update_v = g_plus.has_value();
  const at::Tensor& g_plus_or_g = update_v ? *g_plus : g;
  const at::Tensor& g_minus_or_g = update_v ? *g_minus : g;
  const auto* chunk_table = reinterpret_cast<const ChunkEntry*>(chunks.data_ptr<int64_t>());

  const c10::cuda::CUDAGuard device_guard(v.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "meta_grad_accumulate", [&] {
    launch<scalar_t>(
        v, g, g_plus_or_g, g_minus_or_g, coef, lr_grad, chunk_table, n_chunks, slots, update_v, stream);
  });
}
