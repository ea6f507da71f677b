// Multi-tensor meta-gradient accumulation (DESIGN §4), one launch over every adapter tensor.
//
// For every tensor i (flat [n_adapters, per_adapter_i] storage) and adapter a, with v read before
// its update:
//   lr_grad[a, i] += -<g_i[a], v_i[a]>                        (accumulated in opmath, fp32 or fp64)
//   v_i[a]        -= coef[a] * (g_plus_i[a] - g_minus_i[a])   (when update_v)
//
// Work split: each tensor's per-adapter slice is cut into chunks of kChunk elements; block
// (x = chunk-table entry, y = adapter) walks one chunk, updates v there, reduces its partial dot
// product across the block and adds it into lr_grad with one atomicAdd. The pointer and chunk
// tables reach the device in one host-to-device copy, so there is one copy and one launch per call
// whatever the number of tensors. The order of the atomics varies, so lr_grad is reproducible to
// fp32 rounding only.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kChunk = 8192;

struct TensorEntry {
  void* v;
  const void* g;
  const void* g_plus;   // nullptr when v is not updated
  const void* g_minus;  // nullptr when v is not updated
  int64_t per_adapter;  // elements of one adapter's slice
};

struct ChunkEntry {
  int64_t tensor;
  int64_t start;  // first element of the chunk inside each adapter's slice
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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) meta_grad_accumulate_kernel(
    const TensorEntry* __restrict__ tensors,
    const ChunkEntry* __restrict__ chunks,
    const float* __restrict__ coef,
    float* __restrict__ lr_grad,
    int64_t n_tensors,
    bool update_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const ChunkEntry chunk = chunks[blockIdx.x];
  const TensorEntry entry = tensors[chunk.tensor];
  const int64_t adapter = blockIdx.y;
  const int64_t offset = adapter * entry.per_adapter;
  const int64_t stop = min(chunk.start + kChunk, entry.per_adapter);

  scalar_t* v = static_cast<scalar_t*>(entry.v) + offset;
  const scalar_t* g = static_cast<const scalar_t*>(entry.g) + offset;
  const scalar_t* g_plus = static_cast<const scalar_t*>(entry.g_plus) + offset;
  const scalar_t* g_minus = static_cast<const scalar_t*>(entry.g_minus) + offset;
  const acc_t scale = static_cast<acc_t>(coef[adapter]);

  acc_t dot = 0;
  for (int64_t k = chunk.start + threadIdx.x; k < stop; k += kThreads) {
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
    atomicAdd(lr_grad + adapter * n_tensors + chunk.tensor, static_cast<float>(-dot));
  }
}

}  // namespace

void meta_grad_accumulate_cuda(
    const std::vector<at::Tensor>& v,
    const std::vector<at::Tensor>& g,
    const std::vector<at::Tensor>& g_plus,
    const std::vector<at::Tensor>& g_minus,
    const at::Tensor& coef,
    at::Tensor& lr_grad) {
  const int64_t n_tensors = static_cast<int64_t>(v.size());
  const int64_t n_adapters = coef.size(0);
  const bool update_v = !g_plus.empty();

  std::vector<TensorEntry> tensors;
  std::vector<ChunkEntry> chunks;
  tensors.reserve(n_tensors);
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t per_adapter = v[i].numel() / n_adapters;
    tensors.push_back(TensorEntry{
        v[i].data_ptr(),
        g[i].data_ptr(),
        update_v ? g_plus[i].data_ptr() : nullptr,
        update_v ? g_minus[i].data_ptr() : nullptr,
        per_adapter});
    for (int64_t start = 0; start < per_adapter; start += kChunk) {
      chunks.push_back(ChunkEntry{i, start});
    }
  }
  if (chunks.empty() || n_adapters == 0) {
    return;
  }

  // Both tables in one pinned buffer, copied asynchronously; the caching host allocator keeps the
  // buffer alive until the copy has run.
  const size_t tensor_bytes = tensors.size() * sizeof(TensorEntry);
  const size_t chunk_bytes = chunks.size() * sizeof(ChunkEntry);
  at::Tensor host_table = at::empty(
      {static_cast<int64_t>(tensor_bytes + chunk_bytes)},
      at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_table.data_ptr(), tensors.data(), tensor_bytes);
  std::memcpy(static_cast<char*>(host_table.data_ptr()) + tensor_bytes, chunks.data(), chunk_bytes);

  const c10::cuda::CUDAGuard device_guard(v[0].device());
  const at::Tensor device_table = host_table.to(v[0].device(), /*non_blocking=*/true);
  const auto* tensor_table = reinterpret_cast<const TensorEntry*>(device_table.data_ptr());
  const auto* chunk_table =
      reinterpret_cast<const ChunkEntry*>(static_cast<const char*>(device_table.data_ptr()) + tensor_bytes);

  const dim3 grid(static_cast<unsigned int>(chunks.size()), static_cast<unsigned int>(n_adapters));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v[0].scalar_type(), "meta_grad_accumulate", [&] {
    meta_grad_accumulate_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        tensor_table, chunk_table, coef.data_ptr<float>(), lr_grad.data_ptr<float>(), n_tensors, update_v);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
