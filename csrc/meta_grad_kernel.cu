// Multi-tensor meta-gradient accumulation (DESIGN §4), two launches over every adapter tensor.
//
// For every tensor i and adapter a (slice t[a] contiguous, adapter stride t.stride(0) free, so the
// tensors may be views of one flat (n_adapters, P) buffer), with v read before its update:
//   lr_grad[a, i] = lr_grad[a, i] - <g_i[a], v_i[a]>           (in opmath, fp32 or fp64, rounded once)
//   v_i[a]       -= coef[a] * (g_plus_i[a] - g_minus_i[a])     (when update_v)
//
// Work split, deterministic (no atomics):
//   1. block (x = chunk, y = adapter) walks one chunk of kChunk elements of one tensor's slice,
//      updates v there and writes its partial dot product to partials[adapter, chunk];
//   2. block (x = tensor, y = adapter) sums that tensor's partials in a fixed order and updates
//      lr_grad[adapter, tensor].
// Every thread visits a fixed set of elements and block_sum's tree is fixed, so the same inputs
// give bitwise-equal results run after run. The pointer and chunk tables reach the device in one
// host-to-device copy: one copy and two launches per call whatever the number of tensors.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kChunk = 8192;

struct TensorEntry {
  void* v;
  const void* g;
  const void* g_plus;   // g when v is not updated (never read then)
  const void* g_minus;  // g when v is not updated (never read then)
  int64_t v_stride;     // adapter strides, in elements
  int64_t g_stride;
  int64_t g_plus_stride;
  int64_t g_minus_stride;
  int64_t per_adapter;  // elements of one adapter's slice
  int64_t first_chunk;  // the tensor's chunks are [first_chunk, first_chunk + n_chunks)
  int64_t n_chunks;
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

template <typename scalar_t, typename coef_t>
__global__ void __launch_bounds__(kThreads) accumulate_chunks_kernel(
    const TensorEntry* __restrict__ tensors,
    const ChunkEntry* __restrict__ chunks,
    const coef_t* __restrict__ coef,
    at::opmath_type<scalar_t>* __restrict__ partials,
    int64_t n_chunks,
    bool update_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const ChunkEntry chunk = chunks[blockIdx.x];
  const TensorEntry entry = tensors[chunk.tensor];
  const int64_t adapter = blockIdx.y;
  const int64_t stop = min(chunk.start + kChunk, entry.per_adapter);

  scalar_t* v = static_cast<scalar_t*>(entry.v) + adapter * entry.v_stride;
  const scalar_t* g = static_cast<const scalar_t*>(entry.g) + adapter * entry.g_stride;
  const scalar_t* g_plus = static_cast<const scalar_t*>(entry.g_plus) + adapter * entry.g_plus_stride;
  const scalar_t* g_minus = static_cast<const scalar_t*>(entry.g_minus) + adapter * entry.g_minus_stride;
  const acc_t scale = update_v ? static_cast<acc_t>(coef[adapter]) : acc_t(0);  // coef may be null

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
    partials[adapter * n_chunks + blockIdx.x] = dot;
  }
}

template <typename acc_t, typename lr_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(
    const TensorEntry* __restrict__ tensors,
    const acc_t* __restrict__ partials,
    lr_t* __restrict__ lr_grad,
    int64_t n_chunks,
    int64_t n_tensors) {
  const TensorEntry entry = tensors[blockIdx.x];
  const int64_t adapter = blockIdx.y;
  const acc_t* row = partials + adapter * n_chunks + entry.first_chunk;
  acc_t total = 0;
  for (int64_t k = threadIdx.x; k < entry.n_chunks; k += kThreads) {
    total += row[k];
  }
  total = block_sum(total);
  if (threadIdx.x == 0) {
    lr_t* lr = lr_grad + adapter * n_tensors + blockIdx.x;
    *lr = static_cast<lr_t>(static_cast<acc_t>(*lr) - total);
  }
}

// coef and lr_grad are fp32 or the tensors' dtype: pick the kernel instance for each.
template <typename scalar_t>
void launch(
    const dim3& chunk_grid,
    const dim3& tensor_grid,
    const TensorEntry* tensor_table,
    const ChunkEntry* chunk_table,
    const std::optional<at::Tensor>& coef,
    at::Tensor& lr_grad,
    int64_t n_chunks,
    bool update_v,
    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_adapters = chunk_grid.y;
  const at::Tensor partials = at::empty(
      {n_adapters, n_chunks}, lr_grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto* partials_ptr = partials.data_ptr<acc_t>();
  if (!coef.has_value() || coef->scalar_type() == at::kFloat) {
    const float* coef_ptr = coef.has_value() ? coef->data_ptr<float>() : nullptr;
    accumulate_chunks_kernel<scalar_t, float><<<chunk_grid, kThreads, 0, stream>>>(
        tensor_table, chunk_table, coef_ptr, partials_ptr, n_chunks, update_v);
  } else {
    accumulate_chunks_kernel<scalar_t, scalar_t><<<chunk_grid, kThreads, 0, stream>>>(
        tensor_table, chunk_table, coef->data_ptr<scalar_t>(), partials_ptr, n_chunks, update_v);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n_tensors = tensor_grid.x;
  if (lr_grad.scalar_type() == at::kFloat) {
    sum_partials_kernel<acc_t, float><<<tensor_grid, kThreads, 0, stream>>>(
        tensor_table, partials_ptr, lr_grad.data_ptr<float>(), n_chunks, n_tensors);
  } else {
    sum_partials_kernel<acc_t, scalar_t><<<tensor_grid, kThreads, 0, stream>>>(
        tensor_table, partials_ptr, lr_grad.data_ptr<scalar_t>(), n_chunks, n_tensors);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void meta_grad_accumulate_cuda(
    const std::vector<at::Tensor>& v,
    const std::vector<at::Tensor>& g,
    const std::vector<at::Tensor>& g_plus,
    const std::vector<at::Tensor>& g_minus,
    const std::optional<at::Tensor>& coef,
    at::Tensor& lr_grad) {
  const int64_t n_tensors = static_cast<int64_t>(v.size());
  const int64_t n_adapters = lr_grad.size(0);
  const bool update_v = !g_plus.empty();
  const std::vector<at::Tensor>& g_plus_or_g = update_v ? g_plus : g;
  const std::vector<at::Tensor>& g_minus_or_g = update_v ? g_minus : g;

  std::vector<TensorEntry> tensors;
  std::vector<ChunkEntry> chunks;
  tensors.reserve(n_tensors);
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t per_adapter = v[i].numel() / std::max<int64_t>(n_adapters, 1);
    const int64_t first_chunk = static_cast<int64_t>(chunks.size());
    for (int64_t start = 0; start < per_adapter; start += kChunk) {
      chunks.push_back(ChunkEntry{i, start});
    }
    tensors.push_back(TensorEntry{
        v[i].data_ptr(),
        g[i].data_ptr(),
        g_plus_or_g[i].data_ptr(),
        g_minus_or_g[i].data_ptr(),
        v[i].stride(0),
        g[i].stride(0),
        g_plus_or_g[i].stride(0),
        g_minus_or_g[i].stride(0),
        per_adapter,
        first_chunk,
        static_cast<int64_t>(chunks.size()) - first_chunk});
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  if (n_chunks == 0 || n_adapters == 0) {
    return;  // no element: lr_grad keeps its values
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

  const dim3 chunk_grid(static_cast<unsigned int>(n_chunks), static_cast<unsigned int>(n_adapters));
  const dim3 tensor_grid(static_cast<unsigned int>(n_tensors), static_cast<unsigned int>(n_adapters));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v[0].scalar_type(), "meta_grad_accumulate", [&] {
    launch<scalar_t>(
        chunk_grid, tensor_grid, tensor_table, chunk_table, coef, lr_grad, n_chunks, update_v, stream);
  });
}
