// The CUDA twin of the solver (the algorithm itself is in linear_assignment.h), one launch for the batch.
//
// A problem with at most kWarpColumns solver columns is solved by one warp (several problems per block,
// columns striped over the lanes, warp-shuffle argmin, __syncwarp); a larger one by a block of 128 or 256
// threads (warp-shuffle argmin, then the per-warp winners through shared memory, one __syncthreads per
// Dijkstra step). Per problem, the working state and a copy of the real cost block (in the solver's layout,
// so every Dijkstra step reads a contiguous row) live in shared memory when they fit the device's opt-in
// limit; otherwise the cost is read in place and, if even the state does not fit, the state lives in a
// global-memory scratch tensor.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "linear_assignment.h"
#include "ops.h"

namespace detr_fast {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxProblemsPerBlock = 4;  // warp mode: at most 4 warps (problems) per block
constexpr int64_t kWarpColumns = 128;    // up to 4 columns per lane: one warp per problem
constexpr int64_t kBlockColumns = 1024;  // up to 8 columns per thread: 128 threads per problem, else 256

__device__ inline Candidate warp_argmin(Candidate c) {
  // Butterfly: every lane ends with the minimum of all 32 (precedes is a total order, so they agree).
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Candidate other{__shfl_xor_sync(kFullMask, c.value, offset), __shfl_xor_sync(kFullMask, c.key, offset)};
    if (precedes(other, c)) c = other;
  }
  return c;
}

// One warp solves a problem. Lanes never diverge across the calls below: every branch around them depends
// only on values all lanes share (the argmin result, the problem's sizes).
struct WarpGroup {
  static constexpr int kSize = kWarpSize;
  int lane;
  __device__ int rank() const { return lane; }
  __device__ void sync() const { __syncwarp(kFullMask); }
  __device__ Candidate argmin(Candidate c) const { return warp_argmin(c); }
  __device__ bool any(bool x) const { return __any_sync(kFullMask, x); }
};

// A block of kThreads threads solves a problem.
template <int kThreads>
struct BlockGroup {
  static constexpr int kSize = kThreads;
  static constexpr int kWarps = kThreads / kWarpSize;
  // [2][kWarps] in shared memory. Alternating halves between consecutive argmins lets one barrier per argmin
  // suffice: a warp writing a half again has passed the next argmin's barrier, so every reader is done.
  Candidate* exchange;
  int parity;
  __device__ int rank() const { return threadIdx.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ Candidate argmin(Candidate c) {
    c = warp_argmin(c);
    Candidate* half = exchange + parity * kWarps;
    parity ^= 1;
    if (threadIdx.x % kWarpSize == 0) half[threadIdx.x / kWarpSize] = c;
    __syncthreads();
    Candidate best = half[0];
    for (int warp = 1; warp < kWarps; ++warp) {
      if (precedes(half[warp], best)) best = half[warp];
    }
    return best;
  }
  __device__ bool any(bool x) const { return __syncthreads_or(x) != 0; }
};

constexpr int64_t round_up_16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Dynamic shared memory of a block: [exchange (block mode)] then per problem [workspace?][staged cost?].
// A batch gives an SM only a few blocks, so the launch bounds ask for one resident block: registers enough
// that the solver's loop does not spill.
template <class scalar_t, int kThreadsPerProblem>
__global__ void __launch_bounds__(kThreadsPerProblem == kWarpSize ? kWarpSize * kMaxProblemsPerBlock
                                                                   : kThreadsPerProblem,
                                  1)
    linear_assignment_kernel(const scalar_t* __restrict__ cost, int64_t stride_p, int64_t stride_n,
                             int64_t stride_m, const int64_t* __restrict__ num_targets, int64_t targets_period,
                             int64_t problems, int n, int m, int64_t* __restrict__ assignment,
                             uint8_t* __restrict__ status, unsigned char* __restrict__ global_workspace,
                             int64_t workspace_bytes_per_problem, bool workspace_in_shared,
                             int64_t stage_bytes_per_problem, int64_t exchange_bytes) {
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr bool kWarpPerProblem = kThreadsPerProblem == kWarpSize;
  const int slot = kWarpPerProblem ? static_cast<int>(threadIdx.x / kWarpSize) : 0;
  const int64_t problem =
      kWarpPerProblem ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + slot : blockIdx.x;
  if (problem >= problems) return;  // whole warps of the last block in warp mode (no block barrier there)

  const int64_t shared_workspace_bytes = workspace_in_shared ? workspace_bytes_per_problem : 0;
  unsigned char* region = shared + exchange_bytes + slot * (shared_workspace_bytes + stage_bytes_per_problem);
  unsigned char* workspace_base =
      workspace_in_shared ? region : global_workspace + problem * workspace_bytes_per_problem;
  scalar_t* stage =
      stage_bytes_per_problem > 0 ? reinterpret_cast<scalar_t*>(region + shared_workspace_bytes) : nullptr;
  const Workspace w = carve_workspace(workspace_base, max(n, m), min(n, m));
  const scalar_t* problem_cost = cost + problem * stride_p;
  if constexpr (kWarpPerProblem) {
    WarpGroup group{static_cast<int>(threadIdx.x % kWarpSize)};
    solve_problem(group, problem_cost, stride_n, stride_m, n, m, num_targets[problem % targets_period], w, stage,
                  assignment + problem * n, status + problem);
  } else {
    BlockGroup<kThreadsPerProblem> group{reinterpret_cast<Candidate*>(shared), 0};
    solve_problem(group, problem_cost, stride_n, stride_m, n, m, num_targets[problem % targets_period], w, stage,
                  assignment + problem * n, status + problem);
  }
}

struct LaunchPlan {
  int threads_per_problem;
  int64_t problems_per_block;
  int64_t exchange_bytes;
  int64_t workspace_bytes;  // per problem
  bool workspace_in_shared;
  int64_t stage_bytes;      // per problem, 0 = the cost is read in place
  int64_t shared_bytes;     // per block
};

// What bounds a launch on one device.
struct DeviceLimits {
  int64_t shared_bytes_per_block;  // the opt-in maximum of dynamic shared memory
  int64_t multiprocessors;
};

// Read once per device (two driver calls saved on every training step).
DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> limits;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = limits.find(device);
  if (found != limits.end()) return found->second;
  int shared = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return limits[device] = {shared, multiprocessors};
}

LaunchPlan plan_launch(int64_t problems, int64_t n, int64_t m, int64_t element_size, const DeviceLimits& device) {
  LaunchPlan plan;
  const int64_t cols = std::max(n, m), rows = std::min(n, m);
  plan.threads_per_problem = cols <= kWarpColumns ? kWarpSize : cols <= kBlockColumns ? 128 : 256;
  const bool warp_mode = plan.threads_per_problem == kWarpSize;
  plan.exchange_bytes = warp_mode ? 0 : round_up_16(2 * (plan.threads_per_problem / kWarpSize) * sizeof(Candidate));
  plan.workspace_bytes = workspace_bytes(cols, rows);
  const int64_t stage_bytes = round_up_16(n * m * element_size);
  const int64_t budget = device.shared_bytes_per_block - plan.exchange_bytes;
  // Warp mode: enough blocks to give every SM work before packing several problems into a block.
  const int64_t wanted =
      warp_mode ? std::min<int64_t>(kMaxProblemsPerBlock,
                                    std::max<int64_t>(1, (problems + device.multiprocessors - 1) /
                                                             device.multiprocessors))
                : 1;
  plan.workspace_in_shared = false;
  plan.stage_bytes = 0;
  plan.problems_per_block = wanted;
  for (const bool staged : {true, false}) {
    const int64_t per_problem = plan.workspace_bytes + (staged ? stage_bytes : 0);
    const int64_t fit = per_problem == 0 ? wanted : budget / per_problem;
    if (fit >= 1) {
      plan.workspace_in_shared = true;
      plan.stage_bytes = staged ? stage_bytes : 0;
      plan.problems_per_block = std::min(wanted, fit);
      break;
    }
  }
  const int64_t per_problem = (plan.workspace_in_shared ? plan.workspace_bytes : 0) + plan.stage_bytes;
  plan.shared_bytes = plan.exchange_bytes + plan.problems_per_block * per_problem;
  return plan;
}

template <class scalar_t, int kThreadsPerProblem>
void launch(const ProblemBatch& batch, const LaunchPlan& plan, const DeviceLimits& limits, int device,
            at::Tensor& assignment, at::Tensor& status) {
  auto kernel = linear_assignment_kernel<scalar_t, kThreadsPerProblem>;
  if (plan.shared_bytes > 48 * 1024) {
    // Above 48 KB a kernel must opt in. Once per device and kernel, to the device's maximum: setting each call's
    // own size would let two host threads launching different sizes shrink the limit under each other's launch.
    static std::mutex mutex;
    static std::unordered_set<int> opted_in;
    const std::lock_guard<std::mutex> lock(mutex);
    if (!opted_in.count(device)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(limits.shared_bytes_per_block)));
      opted_in.insert(device);
    }
  }
  at::Tensor global_workspace;
  if (!plan.workspace_in_shared) {
    global_workspace = at::empty({batch.problems * plan.workspace_bytes}, assignment.options().dtype(at::kByte));
  }
  const int64_t blocks = (batch.problems + plan.problems_per_block - 1) / plan.problems_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "detr_fast::linear_assignment: ", batch.problems,
              " problems exceed the CUDA grid");
  const int threads = static_cast<int>(plan.threads_per_problem * plan.problems_per_block);
  kernel<<<static_cast<unsigned>(blocks), threads, plan.shared_bytes, c10::cuda::getCurrentCUDAStream().stream()>>>(
      batch.cost.const_data_ptr<scalar_t>(), batch.cost.stride(0), batch.cost.stride(1), batch.cost.stride(2),
      batch.num_targets.const_data_ptr<int64_t>(), batch.targets_period, batch.problems, static_cast<int>(batch.n),
      static_cast<int>(batch.m), assignment.mutable_data_ptr<int64_t>(), status.mutable_data_ptr<uint8_t>(),
      plan.workspace_in_shared ? nullptr : global_workspace.mutable_data_ptr<unsigned char>(), plan.workspace_bytes,
      plan.workspace_in_shared, plan.stage_bytes, plan.exchange_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_assignment_cuda(const at::Tensor& cost, const at::Tensor& num_targets) {
  const ProblemBatch batch = flatten_problems(cost, num_targets, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(cost.device());
  at::Tensor assignment = at::empty({batch.problems, batch.n}, cost.options().dtype(at::kLong));  // [P, N]
  at::Tensor status = at::empty({batch.problems}, cost.options().dtype(at::kByte));              // [P]
  if (batch.problems > 0) {
    const int index = cost.device().index();
    const DeviceLimits device = device_limits(index);
    const LaunchPlan plan = plan_launch(batch.problems, batch.n, batch.m, cost.element_size(), device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "linear_assignment_cuda", [&] {
      switch (plan.threads_per_problem) {
        case kWarpSize:
          launch<scalar_t, kWarpSize>(batch, plan, device, index, assignment, status);
          break;
        case 128:
          launch<scalar_t, 128>(batch, plan, device, index, assignment, status);
          break;
        default:
          launch<scalar_t, 256>(batch, plan, device, index, assignment, status);
          break;
      }
    });
  }
  return unflatten_results(batch, assignment, status);
}

}  // namespace detr_fast
