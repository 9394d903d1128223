// The batched exact linear assignment solver, written once for both twins.
//
// Algorithm: shortest augmenting paths with dual potentials (Jonker-Volgenant; the rectangular form of
// Crouse 2016, "On implementing 2D rectangular assignment algorithms"), in float64 whatever the input dtype.
// A problem has nr <= nc "rows" (the smaller side) and nc "columns"; each row in turn is matched by a
// Dijkstra search over the columns on reduced costs cost(i, j) - u[i] - v[j] >= 0, then the potentials are
// updated and the path is augmented. The matching after each row is a minimum-cost matching of the rows
// seen so far, so the final one is optimal, and a row that reaches no free column by finite edges proves
// that no complete finite assignment exists.
//
// Parallelism: a Group of threads solves one problem. Column j belongs to thread j % Group::kSize, which
// alone reads and writes its per-column state (dist, path, done, v), so the only cross-thread traffic is
// the argmin over the columns in each Dijkstra step, rank 0's bookkeeping of visited rows, and the
// augmentation (rank 0), each followed by a Group::sync. The CPU twin uses SerialGroup (one thread per
// problem, problems spread over threads by at::parallel_for); the CUDA twin uses a warp or a thread block.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#ifdef __CUDACC__
#define DETR_FAST_HD __host__ __device__
#define DETR_FAST_UNROLL _Pragma("unroll")
#else
#define DETR_FAST_HD
#define DETR_FAST_UNROLL
#endif

namespace detr_fast {

// Per-problem status, the values of detr_fast.ops.linear_assignment.STATUS_*.
constexpr uint8_t kStatusOk = 0;
constexpr uint8_t kStatusInvalidEntry = 1;       // NaN or -inf among the real columns
constexpr uint8_t kStatusInfeasible = 2;         // no complete assignment avoids the +inf entries
constexpr uint8_t kStatusInvalidNumTargets = 3;  // num_targets outside [0, M]

// Largest N or M: candidate keys (below) count up to 2 * nc in an int32.
constexpr int64_t kMaxSide = int64_t{1} << 30;

template <class T>
DETR_FAST_HD inline double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));  // float16 / bfloat16 / float32 convert exactly via float
}
DETR_FAST_HD inline double to_double(double x) { return x; }

// NaN or -inf: entries scipy rejects. (x != x rather than isnan: one spelling for host and device.)
DETR_FAST_HD inline bool is_invalid_entry(double x) {
  return x != x || x == -std::numeric_limits<double>::infinity();
}

// A column offered by one thread in a Dijkstra step. key = j for a free column, nc + j for an assigned one,
// so among equal distances a free column (which ends the search) wins, then the lowest index: a total order,
// hence every thread of a group and both twins pick the same column.
struct Candidate {
  double value;
  int32_t key;
};

DETR_FAST_HD inline bool precedes(const Candidate& a, const Candidate& b) {
  return a.value < b.value || (a.value == b.value && a.key < b.key);
}

// One problem's working state, carved out of a byte buffer by carve_workspace.
struct Workspace {
  double* v;              // [nc] column potentials
  double* dist;           // [nc] shortest reduced distance to each column in the current search
  double* u;              // [nr] row potentials
  double* visited_dist;   // [nr] distance at which each row of visited_rows was reached
  int32_t* path;          // [nc] row preceding each column on its shortest path
  int32_t* row4col;       // [nc] row matched to each column, -1 = free
  int32_t* col4row;       // [nr] column matched to each row, -1 = none yet
  int32_t* visited_rows;  // [nr] rows reached in the current search, in order (the first is the new row)
  uint8_t* done;          // [nc] 1 once the column's distance is final in the current search
};

// Bytes of a Workspace for up to `cols` columns and `rows` rows, a multiple of 16.
DETR_FAST_HD inline int64_t workspace_bytes(int64_t cols, int64_t rows) {
  const int64_t bytes = 8 * (2 * cols + 2 * rows) + 4 * (2 * cols + 2 * rows) + cols;
  return (bytes + 15) / 16 * 16;
}

// Splits `base` (16-byte aligned, workspace_bytes(cols, rows) long) into a Workspace: doubles, then int32s,
// then bytes, so every array is aligned.
DETR_FAST_HD inline Workspace carve_workspace(unsigned char* base, int64_t cols, int64_t rows) {
  Workspace w;
  double* doubles = reinterpret_cast<double*>(base);
  w.v = doubles;
  w.dist = w.v + cols;
  w.u = w.dist + cols;
  w.visited_dist = w.u + rows;
  int32_t* ints = reinterpret_cast<int32_t*>(w.visited_dist + rows);
  w.path = ints;
  w.row4col = w.path + cols;
  w.col4row = w.row4col + cols;
  w.visited_rows = w.col4row + rows;
  w.done = reinterpret_cast<uint8_t*>(w.visited_rows + rows);
  return w;
}

// cost(i, j) of the solver's row i and column j, read from data[i * row_stride + j * col_stride].
template <class T>
struct StridedCost {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
  DETR_FAST_HD double operator()(int i, int j) const {
    return to_double(data[i * row_stride + j * col_stride]);
  }
};

// Row-major position (outer, inner) in a grid with `inner_size` columns, starting at entry `first` and
// moving `step` entries per advance().
struct BlockCursor {
  int outer;
  int inner;
  int inner_size;
  int outer_step;
  int inner_step;
  DETR_FAST_HD BlockCursor(int first, int step, int inner_size_)
      : outer(inner_size_ > 0 ? first / inner_size_ : 0),
        inner(inner_size_ > 0 ? first % inner_size_ : 0),
        inner_size(inner_size_),
        outer_step(inner_size_ > 0 ? step / inner_size_ : 0),
        inner_step(inner_size_ > 0 ? step % inner_size_ : 0) {}
  DETR_FAST_HD void advance() {
    outer += outer_step;
    inner += inner_step;
    if (inner >= inner_size) {
      inner -= inner_size;
      ++outer;
    }
  }
};

// The host's group: one thread solves the whole problem.
struct SerialGroup {
  static constexpr int kSize = 1;
  int rank() const { return 0; }
  void sync() const {}
  Candidate argmin(Candidate c) const { return c; }
  bool any(bool x) const { return x; }
};

// Minimum-cost matching of every row of an nr x nc problem (nr <= nc; cost entries finite or +inf).
// Returns kStatusOk with the matching in w.col4row[:nr] and w.row4col[:nc] (-1 = unmatched column), or
// kStatusInfeasible. Every thread of `g` calls it with the same arguments.
template <class Group, class Cost>
DETR_FAST_HD uint8_t shortest_augmenting_paths(Group& g, const Cost& cost, int nr, int nc, const Workspace& w) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr int stride = Group::kSize;
  const int rank = g.rank();
  for (int j = rank; j < nc; j += stride) {
    w.v[j] = 0;
    w.row4col[j] = -1;
  }
  for (int i = rank; i < nr; i += stride) {
    w.u[i] = 0;
    w.col4row[i] = -1;
  }
  g.sync();
  for (int new_row = 0; new_row < nr; ++new_row) {
    for (int j = rank; j < nc; j += stride) {
      w.dist[j] = inf;
      w.done[j] = 0;
    }
    if (rank == 0) {
      w.visited_rows[0] = new_row;
      w.visited_dist[0] = 0;
    }
    int visited = 1;
    int row = new_row;
    double min_dist = 0;  // distance of the last column made final
    int sink;             // the free column that ends the shortest augmenting path
    while (true) {
      // Relax the edges out of `row` and offer this thread's nearest unfinished column.
      const double u_row = w.u[row];
      Candidate best{inf, INT32_MAX};
      for (int j = rank; j < nc; j += stride) {
        if (w.done[j]) continue;
        const double reduced = min_dist + cost(row, j) - u_row - w.v[j];
        if (reduced < w.dist[j]) {
          w.dist[j] = reduced;
          w.path[j] = row;
        }
        const Candidate candidate{w.dist[j], (w.row4col[j] < 0 ? 0 : nc) + j};
        if (precedes(candidate, best)) best = candidate;
      }
      best = g.argmin(best);
      if (best.value == inf) return kStatusInfeasible;  // no free column is reachable by finite edges
      min_dist = best.value;
      if (best.key < nc) {
        sink = best.key;
        if (sink % stride == rank) w.done[sink] = 1;
        break;
      }
      const int col = best.key - nc;
      if (col % stride == rank) w.done[col] = 1;
      row = w.row4col[col];
      if (rank == 0) {
        w.visited_rows[visited] = row;
        w.visited_dist[visited] = min_dist;
      }
      ++visited;
    }
    g.sync();  // rank 0's visited rows and every owner's path[] are read below
    // Update the potentials so that reduced costs stay >= 0 and are 0 along the new matching.
    for (int t = rank; t < visited; t += stride) {
      w.u[w.visited_rows[t]] += min_dist - w.visited_dist[t];
    }
    for (int j = rank; j < nc; j += stride) {
      if (w.done[j]) w.v[j] -= min_dist - w.dist[j];
    }
    if (rank == 0) {
      // Augment: flip the matching along the path from the sink back to new_row.
      int col = sink;
      while (true) {
        const int r = w.path[col];
        w.row4col[col] = r;
        const int previous = w.col4row[r];
        w.col4row[r] = col;
        if (r == new_row) break;
        col = previous;
      }
    }
    g.sync();
  }
  return kStatusOk;
}

// Solves one problem end to end: checks its real block cost[:, :k] for NaN / -inf (reading it once, in
// memory order), optionally copies it into `stage` in the solver's layout ([nr, nc] contiguous), solves it
// with the smaller side as the solver's rows (no copy needed for the transposed case), and writes the
// problem's assignment row [n] (target per query, -1 = unmatched) and status.
//
// cost: the problem's [n, m] block with strides (stride_n, stride_m); k: its num_targets; w: a workspace for
// max(n, m) columns and min(n, m) rows; stage: n * m entries or nullptr (the solver then reads `cost`).
template <class Group, class scalar_t, class stage_t>
DETR_FAST_HD void solve_problem(Group& g, const scalar_t* cost, int64_t stride_n, int64_t stride_m, int n, int m,
                                int64_t k, const Workspace& w, stage_t* stage, int64_t* assignment,
                                uint8_t* status) {
  constexpr int stride = Group::kSize;
  const int rank = g.rank();
  if (k < 0 || k > m) {
    for (int q = rank; q < n; q += stride) assignment[q] = -1;
    if (rank == 0) *status = kStatusInvalidNumTargets;
    return;
  }
  const int targets = static_cast<int>(k);
  // More queries than targets: the targets are the solver's rows (every target gets matched).
  const bool transposed = targets < n;
  const int nr = transposed ? targets : n;
  const int nc = transposed ? n : targets;

  // Entries are read in the block's memory order (the smaller stride fastest: coalesced on the GPU), kBatch
  // loads in flight per thread before any is used, the position kept by a cursor rather than by divisions.
  constexpr int kBatch = 8;
  bool invalid = false;
  const int64_t entries = static_cast<int64_t>(n) * targets;
  const bool targets_fastest = stride_m <= stride_n;
  BlockCursor cursor(rank, stride, targets_fastest ? targets : n);
  const int64_t outer_stride = targets_fastest ? stride_n : stride_m;
  const int64_t inner_stride = targets_fastest ? stride_m : stride_n;
  for (int64_t first = rank; first < entries; first += int64_t{stride} * kBatch) {
    scalar_t values[kBatch];
    int outer[kBatch], inner[kBatch];
    DETR_FAST_UNROLL
    for (int b = 0; b < kBatch; ++b) {
      outer[b] = cursor.outer;
      inner[b] = cursor.inner;
      if (first + b * stride < entries) values[b] = cost[outer[b] * outer_stride + inner[b] * inner_stride];
      cursor.advance();
    }
    DETR_FAST_UNROLL
    for (int b = 0; b < kBatch; ++b) {
      if (first + b * stride >= entries) break;
      invalid |= is_invalid_entry(to_double(values[b]));
      if (stage != nullptr) {
        const int q = targets_fastest ? outer[b] : inner[b];
        const int t = targets_fastest ? inner[b] : outer[b];
        const int64_t at = transposed ? static_cast<int64_t>(t) * n + q : static_cast<int64_t>(q) * targets + t;
        if constexpr (std::is_same<stage_t, scalar_t>::value) {
          stage[at] = values[b];
        } else {
          stage[at] = to_double(values[b]);
        }
      }
    }
  }
  invalid = g.any(invalid);
  g.sync();  // the staged block is complete (a warp vote orders no memory)

  uint8_t result = kStatusInvalidEntry;
  if (!invalid) {
    if (stage != nullptr) {
      result = shortest_augmenting_paths(g, StridedCost<stage_t>{stage, nc, 1}, nr, nc, w);
    } else {
      const StridedCost<scalar_t> view{cost, transposed ? stride_m : stride_n, transposed ? stride_n : stride_m};
      result = shortest_augmenting_paths(g, view, nr, nc, w);
    }
  }
  for (int q = rank; q < n; q += stride) {
    assignment[q] = result != kStatusOk ? -1 : (transposed ? w.row4col[q] : w.col4row[q]);
  }
  if (rank == 0) *status = result;
}

}  // namespace detr_fast
