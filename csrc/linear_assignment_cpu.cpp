// The CPU twin of the solver: problems spread over threads with at::parallel_for, one thread per problem. The
// solver reads each problem's cost in place (a problem's block stays in the core's caches), converting entries
// to float64 as it goes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "linear_assignment.h"
#include "ops.h"

namespace detr_fast {

std::tuple<at::Tensor, at::Tensor> linear_assignment_cpu(const at::Tensor& cost, const at::Tensor& num_targets) {
  const ProblemBatch batch = flatten_problems(cost, num_targets, c10::DeviceType::CPU);
  const int64_t problems = batch.problems, n = batch.n, m = batch.m;
  at::Tensor assignment = at::empty({problems, n}, cost.options().dtype(at::kLong));  // [P, N]
  at::Tensor status = at::empty({problems}, cost.options().dtype(at::kByte));        // [P]
  const int64_t* counts = batch.num_targets.const_data_ptr<int64_t>();
  int64_t* assignment_data = assignment.mutable_data_ptr<int64_t>();
  uint8_t* status_data = status.mutable_data_ptr<uint8_t>();
  const int64_t cols = std::max(n, m), rows = std::min(n, m);
  const int64_t stride_p = batch.cost.stride(0), stride_n = batch.cost.stride(1), stride_m = batch.cost.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "linear_assignment_cpu", [&] {
    const scalar_t* data = batch.cost.const_data_ptr<scalar_t>();
    at::parallel_for(0, problems, 1, [&](int64_t begin, int64_t end) {
      // One workspace per thread (as doubles, for alignment), reused across its problems.
      std::vector<double> scratch(workspace_bytes(cols, rows) / sizeof(double));
      const Workspace w = carve_workspace(reinterpret_cast<unsigned char*>(scratch.data()), cols, rows);
      SerialGroup group;
      for (int64_t p = begin; p < end; ++p) {
        solve_problem(group, data + p * stride_p, stride_n, stride_m, static_cast<int>(n), static_cast<int>(m),
                      counts[p % batch.targets_period], w, static_cast<scalar_t*>(nullptr),
                      assignment_data + p * n, status_data + p);
      }
    });
  });
  return unflatten_results(batch, assignment, status);
}

}  // namespace detr_fast
