// detr_fast::match_cost_cpu: the DETR matching cost on the CPU in one fused pass over the pairs, the CPU twin of
// the Triton kernel in kernels/match_cost.py. Same function as detr_fast/reference/match_cost.py: for every query
// and every target of its own image, bbox_w * L1 + class_w * class cost + giou_w * -GIoU, +inf on padded columns.
// The class cost is read from `class_costs`, a table of every query's cost per class that the caller computes
// with torch's vectorized math (-softmax; the focal cost is passed per target, with the labels 0..M-1), at the
// label's entry. Rows (layer, image, query) are spread over threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace detr_fast {
namespace {

constexpr const char* kOp = "detr_fast::match_cost_cpu";

// Per image, the targets' coordinates as separate arrays (cxcywh and xyxy), so that the inner loop over targets
// is straight-line arithmetic the compiler vectorizes.
template <typename acc_t>
struct TargetColumns {
  std::vector<acc_t> cx, cy, w, h, x0, y0, x1, y1, area;
  explicit TargetColumns(int64_t n) : cx(n), cy(n), w(n), h(n), x0(n), y0(n), x1(n), y1(n), area(n) {}
};

// Box terms of one query against `count` targets: bbox_w * L1(cxcywh) into l1_term and giou_w * -GIoU(xyxy) into
// giou_term. GIoU follows reference/box_ops.py: clamps pass NaN, a zero union gives IoU 0, a zero hull no hull
// term. (A NaN coordinate makes the L1 term NaN, so the cost is NaN whatever min/max do with it.)
// The loop vectorizes because setup.py compiles with -fno-trapping-math (the divisions of the lanes a select
// discards may then run); results are IEEE as without it.
template <typename acc_t>
void box_terms(const acc_t* pred, const TargetColumns<acc_t>& t, int64_t first, int64_t count, acc_t bbox_w,
               acc_t giou_w, acc_t* __restrict l1_term, acc_t* __restrict giou_term) {
  const acc_t cx = pred[0], cy = pred[1], w = pred[2], h = pred[3];
  const acc_t px0 = cx - acc_t(0.5) * w, py0 = cy - acc_t(0.5) * h;
  const acc_t px1 = cx + acc_t(0.5) * w, py1 = cy + acc_t(0.5) * h;
  const acc_t parea = (px1 - px0) * (py1 - py0);
  const acc_t *tcx = t.cx.data() + first, *tcy = t.cy.data() + first, *tw = t.w.data() + first;
  const acc_t *th = t.h.data() + first, *tx0 = t.x0.data() + first, *ty0 = t.y0.data() + first;
  const acc_t *tx1 = t.x1.data() + first, *ty1 = t.y1.data() + first, *tarea = t.area.data() + first;
  for (int64_t j = 0; j < count; ++j) {
    const acc_t l1 = std::abs(cx - tcx[j]) + std::abs(cy - tcy[j]) + std::abs(w - tw[j]) + std::abs(h - th[j]);
    const acc_t iw = std::min(px1, tx1[j]) - std::max(px0, tx0[j]);
    const acc_t ih = std::min(py1, ty1[j]) - std::max(py0, ty0[j]);
    const acc_t inter = (iw < acc_t(0) ? acc_t(0) : iw) * (ih < acc_t(0) ? acc_t(0) : ih);
    const acc_t uni = parea + tarea[j] - inter;
    const acc_t hw = std::max(px1, tx1[j]) - std::min(px0, tx0[j]);
    const acc_t hh = std::max(py1, ty1[j]) - std::min(py0, ty0[j]);
    const acc_t hull = (hw < acc_t(0) ? acc_t(0) : hw) * (hh < acc_t(0) ? acc_t(0) : hh);
    const acc_t iou = uni == acc_t(0) ? acc_t(0) : inter / uni;
    const acc_t hull_term = hull == acc_t(0) ? acc_t(0) : (hull - uni) / hull;
    l1_term[j] = bbox_w * l1;
    giou_term[j] = giou_w * -(iou - hull_term);
  }
}

template <typename acc_t>
void fill_costs(const at::Tensor& class_costs, const at::Tensor& pred_boxes, const at::Tensor& labels,
                const at::Tensor& tgt_boxes, const at::Tensor& mask, at::Tensor& cost, int64_t rows,
                int64_t queries, int64_t images, int64_t classes, int64_t targets, acc_t class_w, acc_t bbox_w,
                acc_t giou_w) {
  const acc_t* table = class_costs.const_data_ptr<acc_t>();    // [rows, K]
  const acc_t* pred_data = pred_boxes.const_data_ptr<acc_t>();  // [rows, 4]
  const int64_t* label_data = labels.const_data_ptr<int64_t>();  // [B, M]
  const acc_t* tgt_data = tgt_boxes.const_data_ptr<acc_t>();    // [B, M, 4]
  const bool* mask_data = mask.const_data_ptr<bool>();           // [B, M]
  acc_t* out = cost.mutable_data_ptr<acc_t>();                   // [rows, M]
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  TargetColumns<acc_t> columns(images * targets);
  for (int64_t i = 0; i < images * targets; ++i) {
    const acc_t* box = tgt_data + 4 * i;
    columns.cx[i] = box[0], columns.cy[i] = box[1], columns.w[i] = box[2], columns.h[i] = box[3];
    columns.x0[i] = box[0] - acc_t(0.5) * box[2], columns.y0[i] = box[1] - acc_t(0.5) * box[3];
    columns.x1[i] = box[0] + acc_t(0.5) * box[2], columns.y1[i] = box[1] + acc_t(0.5) * box[3];
    columns.area[i] = (columns.x1[i] - columns.x0[i]) * (columns.y1[i] - columns.y0[i]);
  }

  // Per image, the slots up to its last real target: the padding after it (most of a batch's slots when its images
  // hold from one to many targets) is +inf without computing its box terms.
  std::vector<int64_t> extent(images, 0);
  for (int64_t i = 0; i < images * targets; ++i) {
    if (mask_data[i]) extent[i / targets] = i % targets + 1;
  }

  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> giou_term(targets);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t image = (row / queries) % images;  // rows are [..., B, N] flattened
      const int64_t count = extent[image];
      const acc_t* x = table + row * classes;
      acc_t* out_row = out + row * targets;
      box_terms(pred_data + 4 * row, columns, image * targets, count, bbox_w, giou_w, out_row, giou_term.data());
      for (int64_t t = 0; t < count; ++t) {  // class term and padding; summed in the reference's order
        const int64_t slot = image * targets + t;
        if (!mask_data[slot]) {  // a padded slot's table entry is never read (the focal table leaves it unset)
          out_row[t] = inf;
          continue;
        }
        const int64_t label = label_data[slot];
        const acc_t class_cost = label >= 0 && label < classes ? x[label] : nan;
        out_row[t] = out_row[t] + class_w * class_cost + giou_term[t];
      }
      std::fill(out_row + count, out_row + targets, inf);
    }
  });
}

}  // namespace

at::Tensor match_cost_cpu(const at::Tensor& class_costs, const at::Tensor& pred_boxes, const at::Tensor& tgt_labels,
                          const at::Tensor& tgt_boxes, const at::Tensor& tgt_mask, double class_w, double bbox_w,
                          double giou_w) {
  const at::Tensor& scores = class_costs;
  TORCH_CHECK(scores.dim() >= 3, kOp, ": class_costs must be [..., B, N, K], got shape ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, kOp,
              ": class_costs must be float32 or float64 (the caller converts), got ", scores.scalar_type());
  TORCH_CHECK(pred_boxes.scalar_type() == scores.scalar_type(), kOp, ": pred_boxes is ", pred_boxes.scalar_type(),
              " but class_costs are ", scores.scalar_type());
  TORCH_CHECK(tgt_boxes.scalar_type() == scores.scalar_type(), kOp, ": tgt_boxes is ", tgt_boxes.scalar_type(),
              " but class_costs are ", scores.scalar_type());
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
    fill_costs<double>(scores_c, pred_c, labels_c, tgt_c, mask_c, cost, rows, queries, images, classes,
                               targets, class_w, bbox_w, giou_w);
  } else {  // float32 math, as the reference
    fill_costs<float>(scores_c, pred_c, labels_c, tgt_c, mask_c, cost, rows, queries, images, classes, targets,
                             static_cast<float>(class_w), static_cast<float>(bbox_w), static_cast<float>(giou_w));
  }
  return cost;
}

}  // namespace detr_fast
