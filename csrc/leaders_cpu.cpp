// detr_fast::leaders_cpu: per column of maps [K, P], the largest value, the largest of the others (the runner-up)
// and the first row that holds the largest, in one pass over the maps. Segmentation post-processing
// (detr_fast/processing/upsampled_maps.py) decides at each low-resolution pixel which of K maps leads and by how
// much; torch needs a max pass and a second pass against the max for that. Columns are spread over threads in
// blocks whose running values stay in cache while the rows stream past.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops.h"

namespace detr_fast {
namespace {

constexpr const char* kOp = "detr_fast::leaders_cpu";
constexpr int64_t kColumnsPerBlock = 1024;

template <typename scalar_t>
void fill_leaders(const scalar_t* maps, int64_t rows, int64_t columns, scalar_t* best, scalar_t* runner_up,
                  int64_t* winner) {
  at::parallel_for(0, columns, kColumnsPerBlock, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += kColumnsPerBlock) {
      const int64_t count = std::min(kColumnsPerBlock, end - first);
      // int32 rows beside the values: the loop below then vectorizes (rows < 2^31 is checked)
      std::vector<int32_t> row_of_best(count, 0);
      scalar_t* __restrict top = best + first;
      scalar_t* __restrict second = runner_up + first;
      int32_t* __restrict top_row = row_of_best.data();
      std::copy(maps + first, maps + first + count, top);
      std::fill(second, second + count, -std::numeric_limits<scalar_t>::infinity());
      for (int64_t row = 1; row < rows; ++row) {
        const scalar_t* __restrict values = maps + row * columns + first;
        const int32_t r = static_cast<int32_t>(row);
        for (int64_t j = 0; j < count; ++j) {
          const scalar_t v = values[j];
          const bool above = v > top[j];  // strictly: on a tie the first row keeps the lead, as argmax
          second[j] = above ? top[j] : std::max(second[j], v);
          top_row[j] = above ? r : top_row[j];
          top[j] = above ? v : top[j];
        }
      }
      std::copy(top_row, top_row + count, winner + first);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaders_cpu(const at::Tensor& maps) {
  TORCH_CHECK(maps.dim() == 2, kOp, ": maps must be [K, P], got shape ", maps.sizes());
  TORCH_CHECK(maps.scalar_type() == at::kFloat || maps.scalar_type() == at::kDouble, kOp,
              ": maps must be float32 or float64, got ", maps.scalar_type());
  TORCH_CHECK(maps.size(0) >= 1, kOp, ": maps must hold at least one map (K >= 1), got shape ", maps.sizes());
  TORCH_CHECK(maps.size(0) < std::numeric_limits<int32_t>::max(), kOp, ": K must be below 2^31, got ", maps.size(0));
  const at::Tensor contiguous = maps.contiguous();
  const int64_t rows = maps.size(0), columns = maps.size(1);
  at::Tensor best = at::empty({columns}, maps.options());
  at::Tensor runner_up = at::empty({columns}, maps.options());
  at::Tensor winner = at::empty({columns}, maps.options().dtype(at::kLong));
  if (maps.scalar_type() == at::kDouble) {
    fill_leaders<double>(contiguous.const_data_ptr<double>(), rows, columns, best.mutable_data_ptr<double>(),
                         runner_up.mutable_data_ptr<double>(), winner.mutable_data_ptr<int64_t>());
  } else {
    fill_leaders<float>(contiguous.const_data_ptr<float>(), rows, columns, best.mutable_data_ptr<float>(),
                        runner_up.mutable_data_ptr<float>(), winner.mutable_data_ptr<int64_t>());
  }
  return {best, runner_up, winner};
}

}  // namespace detr_fast
