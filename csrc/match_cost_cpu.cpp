// detr_fast::match_cost_cpu: the DETR matching cost on the CPU in one fused pass over the pairs, the CPU twin of
// the Triton kernel in kernels/match_cost.py. Same function as detr_fast/reference/match_cost.py: for every query
// and every target of its own image, bbox_w * L1 + class_w * class cost + giou_w * -GIoU, +inf on padded columns.
// The class cost reads `scores`: the softmax probabilities (computed by the caller with torch's vectorized
// softmax, once per query) or, with focal, the logits, whose focal cost is taken at the label's entry. Rows
// (layer, image, query) are spread over threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace detr_fast {
namespace {

constexpr const char* kOp = "detr_fast::match_cost_cpu";
constexpr double kFocalEps = 1e-8;  // Deformable-DETR's epsilon inside the focal cost's logarithms

template <typename acc_t>
acc_t clamp_min_zero(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;  // NaN stays NaN, as torch.where(x < 0, 0, x)
}

template <typename acc_t>
acc_t divide_or_zero(acc_t numerator, acc_t denominator) {
  return denominator == acc_t(0) ? acc_t(0) : numerator / denominator;
}

// GIoU of two xyxy boxes with reference/box_ops.py's definition for degenerate pairs.
template <typename acc_t>
acc_t generalized_iou(const acc_t* a, const acc_t* b) {
  const acc_t area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const acc_t area_b = (b[2] - b[0]) * (b[3] - b[1]);
  const acc_t inter_w = clamp_min_zero(std::min(a[2], b[2]) - std::max(a[0], b[0]));
  const acc_t inter_h = clamp_min_zero(std::min(a[3], b[3]) - std::max(a[1], b[1]));
  const acc_t inter = inter_w * inter_h;
  const acc_t uni = area_a + area_b - inter;
  const acc_t hull_w = clamp_min_zero(std::max(a[2], b[2]) - std::min(a[0], b[0]));
  const acc_t hull_h = clamp_min_zero(std::max(a[3], b[3]) - std::min(a[1], b[1]));
  const acc_t hull = hull_w * hull_h;
  return divide_or_zero(inter, uni) - divide_or_zero(hull - uni, hull);
}

template <typename acc_t>
void to_corners(const acc_t* cxcywh, acc_t* xyxy) {
  xyxy[0] = cxcywh[0] - acc_t(0.5) * cxcywh[2];
  xyxy[1] = cxcywh[1] - acc_t(0.5) * cxcywh[3];
  xyxy[2] = cxcywh[0] + acc_t(0.5) * cxcywh[2];
  xyxy[3] = cxcywh[1] + acc_t(0.5) * cxcywh[3];
}

template <typename scalar_t, typename acc_t>
void fill_costs(const at::Tensor& scores, const at::Tensor& pred_boxes, const at::Tensor& labels,
                const at::Tensor& tgt_boxes, const at::Tensor& mask, at::Tensor& cost, int64_t rows,
                int64_t queries, int64_t images, int64_t classes, int64_t targets, acc_t class_w, acc_t bbox_w,
                acc_t giou_w, bool focal, acc_t alpha, acc_t gamma) {
  const scalar_t* score_data = scores.const_data_ptr<scalar_t>();    // [rows, K]
  const scalar_t* pred_data = pred_boxes.const_data_ptr<scalar_t>();  // [rows, 4]
  const int64_t* label_data = labels.const_data_ptr<int64_t>();       // [B, M]
  const scalar_t* tgt_data = tgt_boxes.const_data_ptr<scalar_t>();    // [B, M, 4]
  const bool* mask_data = mask.const_data_ptr<bool>();                // [B, M]
  acc_t* out = cost.mutable_data_ptr<acc_t>();                        // [rows, M]
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t image = (row / queries) % images;  // rows are [..., B, N] flattened
      const scalar_t* x = score_data + row * classes;
      acc_t pred[4], pred_xyxy[4];
      for (int i = 0; i < 4; ++i) pred[i] = static_cast<acc_t>(pred_data[row * 4 + i]);
      to_corners(pred, pred_xyxy);
      acc_t* out_row = out + row * targets;
      for (int64_t t = 0; t < targets; ++t) {
        const int64_t slot = image * targets + t;
        if (!mask_data[slot]) {
          out_row[t] = inf;
          continue;
        }
        const int64_t label = label_data[slot];
        acc_t class_cost = nan;
        if (label >= 0 && label < classes) {
          if (focal) {
            const acc_t p = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(x[label])));
            const acc_t neg = (acc_t(1) - alpha) * std::pow(p, gamma) * -std::log(acc_t(1) - p + acc_t(kFocalEps));
            const acc_t pos = alpha * std::pow(acc_t(1) - p, gamma) * -std::log(p + acc_t(kFocalEps));
            class_cost = pos - neg;
          } else {
            class_cost = -static_cast<acc_t>(x[label]);
          }
        }
        acc_t tgt[4], tgt_xyxy[4], l1 = 0;
        for (int i = 0; i < 4; ++i) {
          tgt[i] = static_cast<acc_t>(tgt_data[slot * 4 + i]);
          l1 += std::abs(pred[i] - tgt[i]);
        }
        to_corners(tgt, tgt_xyxy);
        out_row[t] = bbox_w * l1 + class_w * class_cost + giou_w * -generalized_iou(pred_xyxy, tgt_xyxy);
      }
    }
  });
}

at::Tensor match_cost_cpu(const at::Tensor& scores, const at::Tensor& pred_boxes, const at::Tensor& tgt_labels,
                          const at::Tensor& tgt_boxes, const at::Tensor& tgt_mask, double class_w, double bbox_w,
                          double giou_w, bool focal, double focal_alpha, double focal_gamma) {
  TORCH_CHECK(scores.dim() >= 3, kOp, ": scores must be [..., B, N, K], got shape ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, kOp,
              ": scores must be float32 or float64 (the caller converts), got ", scores.scalar_type());
  TORCH_CHECK(pred_boxes.scalar_type() == scores.scalar_type(), kOp, ": pred_boxes is ", pred_boxes.scalar_type(),
              " but scores are ", scores.scalar_type());
  TORCH_CHECK(tgt_boxes.scalar_type() == scores.scalar_type(), kOp, ": tgt_boxes is ", tgt_boxes.scalar_type(),
              " but scores are ", scores.scalar_type());
  TORCH_CHECK(tgt_labels.scalar_type() == at::kLong && tgt_mask.scalar_type() == at::kBool, kOp,
              ": tgt_labels must be int64 and tgt_mask bool");
  const int64_t classes = scores.size(-1), queries = scores.size(-2), images = scores.size(-3);
  const int64_t targets = tgt_labels.size(1);
  TORCH_CHECK(tgt_labels.dim() == 2 && tgt_labels.size(0) == images, kOp, ": tgt_labels must be [B=", images,
              ", M], got ", tgt_labels.sizes());
  const int64_t rows = scores.numel() / std::max<int64_t>(classes, 1);
  const at::Tensor scores_c = scores.contiguous(), pred_c = pred_boxes.contiguous();
  const at::Tensor labels_c = tgt_labels.contiguous(), tgt_c = tgt_boxes.contiguous(), mask_c = tgt_mask.contiguous();
  const bool wide = scores.scalar_type() == at::kDouble;
  std::vector<int64_t> shape = scores.sizes().vec();
  shape.back() = targets;
  at::Tensor cost = at::empty(shape, scores.options());  // [..., B, N, M]
  if (cost.numel() == 0) return cost;
  if (wide) {
    fill_costs<double, double>(scores_c, pred_c, labels_c, tgt_c, mask_c, cost, rows, queries, images, classes,
                               targets, class_w, bbox_w, giou_w, focal, focal_alpha, focal_gamma);
  } else {  // float32 math, as the reference
    fill_costs<float, float>(scores_c, pred_c, labels_c, tgt_c, mask_c, cost, rows, queries, images, classes, targets,
                             static_cast<float>(class_w), static_cast<float>(bbox_w), static_cast<float>(giou_w), focal,
                             static_cast<float>(focal_alpha), static_cast<float>(focal_gamma));
  }
  return cost;
}

}  // namespace
}  // namespace detr_fast

// A fragment of its own, so that its fake implementation lives beside its Python dispatch.
TORCH_LIBRARY_FRAGMENT(detr_fast, m) {
  m.set_python_module("detr_fast.ops.match_cost");
  m.def(
      "match_cost_cpu(Tensor scores, Tensor pred_boxes, Tensor tgt_labels, Tensor tgt_boxes, Tensor tgt_mask, "
      "float class_w, float bbox_w, float giou_w, bool focal, float focal_alpha, float focal_gamma) -> Tensor");
}

TORCH_LIBRARY_IMPL(detr_fast, CPU, m) { m.impl("match_cost_cpu", &detr_fast::match_cost_cpu); }
