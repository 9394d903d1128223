// detr_fast._C: the op schemas of the detr_fast namespace and their CPU / CUDA registrations, all of them here.
//
// Importing the module (detr_fast.dispatch does) loads this library, whose static initializers register the
// ops with the dispatcher; the fake (meta) implementations live in Python, in the module named by
// set_python_module (detr_fast/ops/extension.py), so that torch.compile can trace the ops.
#include <Python.h>
#include <torch/library.h>

#include <algorithm>

#include "linear_assignment.h"
#include "ops.h"

extern "C" {
// An empty Python module: `import detr_fast._C` only needs to load the library.
PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

namespace detr_fast {

ProblemBatch flatten_problems(const at::Tensor& cost, const at::Tensor& num_targets, c10::DeviceType device) {
  constexpr const char* op = "detr_fast::linear_assignment";
  TORCH_CHECK(cost.dim() >= 2, op, ": cost must be [..., N, M], got shape ", cost.sizes());
  const at::ScalarType dtype = cost.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
              ": cost must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(cost.device().type() == device, op, ": cost is on ", cost.device(), ", expected a ", device,
              " tensor");
  TORCH_CHECK(num_targets.device() == cost.device(), op, ": num_targets is on ", num_targets.device(),
              " but cost is on ", cost.device());
  TORCH_CHECK(num_targets.scalar_type() == at::kLong, op, ": num_targets must be int64, got ",
              num_targets.scalar_type());
  const auto batch_shape = cost.sizes().slice(0, cost.dim() - 2);
  TORCH_CHECK(num_targets.sizes() == batch_shape, op, ": num_targets has shape ", num_targets.sizes(),
              ", expected cost's batch shape ", batch_shape, " (cost is [..., N, M] = ", cost.sizes(), ")");
  ProblemBatch batch;
  batch.n = cost.size(-2);
  batch.m = cost.size(-1);
  TORCH_CHECK(batch.n < kMaxSide && batch.m < kMaxSide, op, ": N and M must be below 2^30, got cost shape ",
              cost.sizes());
  batch.batch_shape = batch_shape.vec();
  batch.problems = 1;
  for (const int64_t size : batch_shape) batch.problems *= size;
  batch.cost = cost.reshape({batch.problems, batch.n, batch.m});
  // A [B] vector expanded over the leading dims (one count per image for every decoder layer, as the Python
  // wrapper passes it) is read in place rather than copied to [P]: on the GPU that saves a launch.
  bool broadcast_vector = num_targets.dim() >= 1 && (num_targets.size(-1) <= 1 || num_targets.stride(-1) == 1);
  for (int64_t d = 0; d + 1 < num_targets.dim(); ++d) {
    broadcast_vector = broadcast_vector && (num_targets.stride(d) == 0 || num_targets.size(d) == 1);
  }
  if (broadcast_vector && batch.problems > 0) {
    batch.targets_period = num_targets.size(-1);
    batch.num_targets = num_targets.as_strided({batch.targets_period}, {1});
  } else {
    batch.targets_period = std::max<int64_t>(batch.problems, 1);
    batch.num_targets = num_targets.reshape({batch.problems}).contiguous();
  }
  return batch;
}

std::tuple<at::Tensor, at::Tensor> unflatten_results(const ProblemBatch& batch, const at::Tensor& assignment,
                                                     const at::Tensor& status) {
  std::vector<int64_t> assignment_shape = batch.batch_shape;
  assignment_shape.push_back(batch.n);
  return {assignment.view(assignment_shape), status.view(batch.batch_shape)};
}

}  // namespace detr_fast

TORCH_LIBRARY(detr_fast, m) {
  m.set_python_module("detr_fast.ops.extension");
  m.def("linear_assignment(Tensor cost, Tensor num_targets) -> (Tensor assignment, Tensor status)");
  m.def(
      "match_cost_cpu(Tensor class_costs, Tensor pred_boxes, Tensor tgt_labels, Tensor tgt_boxes, Tensor tgt_mask, "
      "float class_w, float bbox_w, float giou_w) -> Tensor");
  m.def("leaders_cpu(Tensor maps) -> (Tensor best, Tensor runner_up, Tensor winner)");
  m.def(
      "bilinear_points_cpu(Tensor maps, Tensor map_index, Tensor y, Tensor x, Tensor row_index, Tensor row_weight, "
      "Tensor col_index, Tensor col_weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) {
  m.impl("linear_assignment", &detr_fast::linear_assignment_cpu);
  m.impl("match_cost_cpu", &detr_fast::match_cost_cpu);
  m.impl("leaders_cpu", &detr_fast::leaders_cpu);
  m.impl("bilinear_points_cpu", &detr_fast::bilinear_points_cpu);
}

#ifdef DETR_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(detr_fast, CUDA, m) { m.impl("linear_assignment", &detr_fast::linear_assignment_cuda); }
#endif
