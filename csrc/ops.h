// The C++ entry points of detr_fast._C and the argument checks they share.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace detr_fast {

// cost [..., N, M] viewed as [P, N, M] (a view whenever the leading dims allow it); problem p's num_targets is
// num_targets[p % targets_period].
struct ProblemBatch {
  at::Tensor cost;         // [P, N, M], any strides
  at::Tensor num_targets;  // int64, contiguous: [P], or [B] when one count per image is broadcast over layers
  int64_t targets_period;  // P, or B
  std::vector<int64_t> batch_shape;  // the leading dims [...]
  int64_t problems;
  int64_t n;
  int64_t m;
};

// Checks the op's arguments (ranks, shapes, dtypes, devices) and flattens the batch dims. `device` is the
// device type of the implementation being called.
ProblemBatch flatten_problems(const at::Tensor& cost, const at::Tensor& num_targets, c10::DeviceType device);

// assignment [P, N] and status [P] reshaped back to [..., N] and [...].
std::tuple<at::Tensor, at::Tensor> unflatten_results(const ProblemBatch& batch, const at::Tensor& assignment,
                                                     const at::Tensor& status);

// detr_fast::linear_assignment(cost [..., N, M], num_targets [...] int64) -> (assignment [..., N] int64,
// status [...] uint8), the CPU and CUDA twins.
std::tuple<at::Tensor, at::Tensor> linear_assignment_cpu(const at::Tensor& cost, const at::Tensor& num_targets);
std::tuple<at::Tensor, at::Tensor> linear_assignment_cuda(const at::Tensor& cost, const at::Tensor& num_targets);

// detr_fast::match_cost_cpu(class_costs [..., B, N, K], pred_boxes [..., B, N, 4], tgt_labels [B, M],
// tgt_boxes [B, M, 4], tgt_mask [B, M], weights) -> cost [..., B, N, M]: the fused CPU twin of the Triton matching
// cost, the class term read from the caller's table of class costs.
at::Tensor match_cost_cpu(const at::Tensor& class_costs, const at::Tensor& pred_boxes, const at::Tensor& tgt_labels,
                          const at::Tensor& tgt_boxes, const at::Tensor& tgt_mask, double class_w, double bbox_w,
                          double giou_w);

// detr_fast::leaders_cpu(maps [K, P]) -> (best [P], runner_up [P], winner [P] int64): per column the largest value,
// the largest of the other rows (-inf for K = 1) and the first row holding the largest.
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaders_cpu(const at::Tensor& maps);

// detr_fast::bilinear_points_cpu(maps [K, h, w] float32, map_index [P], y [P], x [P], row_index [H, 2] int64,
// row_weight [H, 2] float32, col_index [W, 2], col_weight [W, 2]) -> [P] float32: map map_index[p] upsampled to
// H x W at (y[p], x[p]) with the given taps, as PyTorch's CPU bilinear kernel computes it.
at::Tensor bilinear_points_cpu(const at::Tensor& maps, const at::Tensor& map_index, const at::Tensor& y,
                               const at::Tensor& x, const at::Tensor& row_index, const at::Tensor& row_weight,
                               const at::Tensor& col_index, const at::Tensor& col_weight);

}  // namespace detr_fast
