// detr_fast::bilinear_points_cpu: values of bilinearly upsampled maps at listed output pixels, bit for bit as
// PyTorch's CPU F.interpolate computes them (mode "bilinear"), given its taps. Segmentation post-processing
// (detr_fast/processing/upsampled_maps.py) needs the upsampled maps only along the boundaries between segments;
// this reads the four corners of each listed pixel and blends them in one pass, where PyTorch ops take a dozen
// gathers and conversions. The arithmetic is the CPU kernel's: along the width, then the height, each step a
// fused multiply-add of the first tap onto the float32 product of the second, emulated in float64 (the float32
// product of the first tap is exact there, so one rounding to float32 follows), as BilinearGrid.values does.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <atomic>

#include "ops.h"

namespace detr_fast {
namespace {

constexpr const char* kOp = "detr_fast::bilinear_points_cpu";

inline float fused_multiply_add(float a, float b, float c) {
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
}

void check_taps(const at::Tensor& index, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(index.dim() == 2 && index.size(1) == 2 && index.scalar_type() == at::kLong, kOp, ": ", name,
              "_index must be [out, 2] int64 (first and second input index), got ", index.scalar_type(), " ",
              index.sizes());
  TORCH_CHECK(weight.sizes() == index.sizes() && weight.scalar_type() == at::kFloat, kOp, ": ", name,
              "_weight must be float32 of ", name, "_index's shape ", index.sizes(), ", got ",
              weight.scalar_type(), " ", weight.sizes());
}

}  // namespace

at::Tensor bilinear_points_cpu(const at::Tensor& maps, const at::Tensor& map_index, const at::Tensor& y,
                               const at::Tensor& x, const at::Tensor& row_index, const at::Tensor& row_weight,
                               const at::Tensor& col_index, const at::Tensor& col_weight) {
  TORCH_CHECK(maps.dim() == 3 && maps.scalar_type() == at::kFloat, kOp, ": maps must be [K, h, w] float32, got ",
              maps.scalar_type(), " ", maps.sizes());
  TORCH_CHECK(map_index.dim() == 1 && map_index.scalar_type() == at::kLong, kOp,
              ": map_index must be [P] int64, got ", map_index.scalar_type(), " ", map_index.sizes());
  TORCH_CHECK(y.sizes() == map_index.sizes() && x.sizes() == map_index.sizes() && y.scalar_type() == at::kLong &&
                  x.scalar_type() == at::kLong,
              kOp, ": y and x must be int64 of map_index's shape ", map_index.sizes(), ", got ", y.sizes(), " and ",
              x.sizes());
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  const int64_t num_maps = maps.size(0), height = maps.size(1), width = maps.size(2);
  const int64_t out_height = row_index.size(0), out_width = col_index.size(0);
  const at::Tensor maps_c = maps.contiguous(), k_c = map_index.contiguous(), y_c = y.contiguous(),
                   x_c = x.contiguous();
  const at::Tensor ri = row_index.contiguous(), rw = row_weight.contiguous(), ci = col_index.contiguous(),
                   cw = col_weight.contiguous();
  const float* m = maps_c.const_data_ptr<float>();
  const int64_t *k_data = k_c.const_data_ptr<int64_t>(), *y_data = y_c.const_data_ptr<int64_t>(),
                *x_data = x_c.const_data_ptr<int64_t>();
  const int64_t *rows = ri.const_data_ptr<int64_t>(), *cols = ci.const_data_ptr<int64_t>();
  const float *row_w = rw.const_data_ptr<float>(), *col_w = cw.const_data_ptr<float>();
  const int64_t points = map_index.numel();
  at::Tensor out = at::empty({points}, maps.options());
  float* out_data = out.mutable_data_ptr<float>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, points, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = k_data[p], oy = y_data[p], ox = x_data[p];
      if (k < 0 || k >= num_maps || oy < 0 || oy >= out_height || ox < 0 || ox >= out_width) {
        out_of_range = true;
        out_data[p] = 0.0f;
        continue;
      }
      const int64_t i0 = rows[2 * oy], i1 = rows[2 * oy + 1], j0 = cols[2 * ox], j1 = cols[2 * ox + 1];
      if (i0 < 0 || i1 >= height || j0 < 0 || j1 >= width || i1 < i0 || j1 < j0) {
        out_of_range = true;
        out_data[p] = 0.0f;
        continue;
      }
      const float* map = m + k * height * width;
      const float w0 = row_w[2 * oy], w1 = row_w[2 * oy + 1], v0 = col_w[2 * ox], v1 = col_w[2 * ox + 1];
      const float upper = fused_multiply_add(map[i0 * width + j0], v0, map[i0 * width + j1] * v1);
      const float lower = fused_multiply_add(map[i1 * width + j0], v0, map[i1 * width + j1] * v1);
      out_data[p] = fused_multiply_add(upper, w0, lower * w1);
    }
  });
  TORCH_CHECK(!out_of_range, kOp, ": a point or a tap lies outside the maps ([K=", num_maps, ", h=", height,
              ", w=", width, "], output ", out_height, " x ", out_width, ")");
  return out;
}

}  // namespace detr_fast
