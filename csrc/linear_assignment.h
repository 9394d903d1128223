// The batched exact linear assignment solver, written once for both twins.
//
// Algorithm: shortest augmenting paths with dual potentials (Jonker-Volgenant; the rectangular form of
// Crouse 2016, "On implementing 2D rectangular assignment algorithms"), in float64 whatever the input dtype.
// A problem has nr <= nc "rows" (the smaller side) and nc "columns". A row reduction gives every row a dual
// potential and matches the rows whose cheapest columns do not collide; each remaining row in turn is matched
// by a Dijkstra search over the columns on reduced costs cost(i, j) - u[i] - v[j] >= 0, then the potentials
// are updated and the path is augmented. The duals stay feasible with zero reduced cost on the matching and
// v = 0 on free columns, so the final matching is optimal, and a row that reaches no free column by finite
// edges proves that no complete finite assignment exists.
//
// Parallelism: a Group of threads solves one problem. In the row reduction each thread scans whole rows;
// afterwards column j belongs to thread j % Group::kSize, which alone reads and writes its per-column state
// (dist, path, done, v), so the only cross-thread traffic is the argmin over the columns in each Dijkstra
// step, rank 0's bookkeeping (collisions of the row reduction, visited rows, augmentation), each followed by
// a Group::sync. The CPU twin uses SerialGroup (one thread per
// problem, problems spread over threads by at::parallel_for); the CUDA twin uses a warp or a thread block.
#pragma once

#include <cstdint>
#include <limits>

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

// NaN or -inf: the entries scipy rejects, the only values for which x >= lowest() fails (one comparison).
DETR_FAST_HD inline bool is_invalid_entry(double x) { return !(x >= std::numeric_limits<double>::lowest()); }

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

// The smallest cost(i, j) of row i and its column (the lowest among ties), or {inf, -1} when every entry is +inf.
// Four running minima over interleaved columns keep four independent dependency chains in flight; merging
// them by (value, column) keeps the lowest column among ties.
template <class Cost>
DETR_FAST_HD inline Candidate row_minimum(const Cost& cost, int i, int nc) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr int kChains = 4;
  Candidate chain[kChains];
  for (int c = 0; c < kChains; ++c) chain[c] = Candidate{inf, INT32_MAX};
  for (int j = 0; j < nc; j += kChains) {
    DETR_FAST_UNROLL
    for (int c = 0; c < kChains; ++c) {
      if (j + c < nc) {
        const double value = cost(i, j + c);
        if (value < chain[c].value) chain[c] = Candidate{value, j + c};
      }
    }
  }
  Candidate best = chain[0];
  for (int c = 1; c < kChains; ++c) {
    if (precedes(chain[c], best)) best = chain[c];
  }
  if (best.value == inf) best.key = -1;
  return best;
}

// Minimum-cost matching of every row of an nr x nc problem (nr <= nc; cost entries finite or +inf).
// Returns kStatusOk with the matching in w.col4row[:nr] and w.row4col[:nc] (-1 = unmatched column), or
// kStatusInfeasible. Every thread of `g` calls it with the same arguments.
template <class Group, class Cost>
DETR_FAST_HD uint8_t shortest_augmenting_paths(Group& g, const Cost& cost, int nr, int nc, const Workspace& w) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr int stride = Group::kSize;
  const int rank = g.rank();
  // Row reduction (Jonker-Volgenant's initialization): u[i] = min_j cost(i, j), v = 0, and each row in order
  // takes its cheapest column (the lowest index among ties) while that column is free. Reduced costs are then
  // >= 0 everywhere and 0 on this partial matching, so searches are needed only from the rows left unmatched.
  // Each thread scans whole rows here, rows striped over the group: no reduction per row.
  bool unmatchable = false;
  for (int i = rank; i < nr; i += stride) {
    const Candidate row_min = row_minimum(cost, i, nc);
    w.u[i] = row_min.value;
    w.col4row[i] = row_min.key;
    unmatchable |= row_min.key < 0;  // every pair of the row is forbidden
  }
  for (int j = rank; j < nc; j += stride) {
    w.v[j] = 0;
    w.row4col[j] = -1;
    w.dist[j] = inf;
    w.done[j] = 0;
  }
  if (g.any(unmatchable)) return kStatusInfeasible;
  g.sync();  // every row's minimum is written
  if (rank == 0) {
    for (int i = 0; i < nr; ++i) {
      const int32_t j = w.col4row[i];
      if (w.row4col[j] < 0) {
        w.row4col[j] = i;
      } else {
        w.col4row[i] = -1;
      }
    }
  }
  g.sync();
  for (int new_row = 0; new_row < nr; ++new_row) {
    if (w.col4row[new_row] >= 0) continue;  // matched by the row reduction
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
      w.dist[j] = inf;  // ready for the next search
      w.done[j] = 0;
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

// Whether the problem's real block cost[:n, :targets] holds a NaN or -inf (the group's common answer), read
// once in memory order (the smaller stride fastest). With `stage`, the block is also copied there in the
// solver's layout [nr, nc], contiguous rows: transposed when the targets are the solver's rows.
template <class Group, class scalar_t>
DETR_FAST_HD bool check_and_stage(Group& g, const scalar_t* cost, int64_t stride_n, int64_t stride_m, int n,
                                  int targets, bool transposed, scalar_t* stage) {
  const bool targets_fastest = stride_m <= stride_n;
  const int inner_size = targets_fastest ? targets : n;
  const int64_t outer_stride = targets_fastest ? stride_n : stride_m;
  const int64_t inner_stride = targets_fastest ? stride_m : stride_n;
  // Where entry (outer, inner) goes in the stage.
  const auto stage_index = [&](int outer, int inner) {
    const int q = targets_fastest ? outer : inner;
    const int t = targets_fastest ? inner : outer;
    return transposed ? static_cast<int64_t>(t) * n + q : static_cast<int64_t>(q) * targets + t;
  };
  bool invalid = false;
  if constexpr (Group::kSize == 1) {
    const int outer_size = targets_fastest ? n : targets;
    for (int outer = 0; outer < outer_size; ++outer) {
      const scalar_t* line = cost + outer * outer_stride;
      for (int inner = 0; inner < inner_size; ++inner) {
        const scalar_t x = line[inner * inner_stride];
        invalid |= is_invalid_entry(to_double(x));
        if (stage != nullptr) stage[stage_index(outer, inner)] = x;
      }
    }
    return invalid;
  } else {
    // Threads take consecutive entries (coalesced), kBatch loads in flight per thread before any is used, the
    // position kept by a cursor rather than by divisions.
    constexpr int kBatch = 8;
    constexpr int stride = Group::kSize;
    const int64_t entries = static_cast<int64_t>(n) * targets;
    BlockCursor cursor(g.rank(), stride, inner_size);
    for (int64_t first = g.rank(); first < entries; first += int64_t{stride} * kBatch) {
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
        if (stage != nullptr) stage[stage_index(outer[b], inner[b])] = values[b];
      }
    }
    invalid = g.any(invalid);
    g.sync();  // the stage is complete (a warp vote orders no memory)
    return invalid;
  }
}

// Solves one problem end to end: checks its real block cost[:, :k] for NaN / -inf, solves it with the smaller
// side as the solver's rows (the transposed case needs no copy: the cost view swaps its strides), and writes
// the problem's assignment row [n] (target per query, -1 = unmatched) and status.
//
// cost: the problem's [n, m] block with strides (stride_n, stride_m); k: its num_targets; w: a workspace for
// max(n, m) columns and min(n, m) rows; stage: room for n * m entries, where the solver then reads the block,
// or nullptr (it reads `cost`).
template <class Group, class scalar_t>
DETR_FAST_HD void solve_problem(Group& g, const scalar_t* cost, int64_t stride_n, int64_t stride_m, int n, int m,
                                int64_t k, const Workspace& w, scalar_t* stage, int64_t* assignment,
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
  uint8_t result = kStatusInvalidEntry;
  if (!check_and_stage(g, cost, stride_n, stride_m, n, targets, transposed, stage)) {
    if (stage != nullptr) {
      result = shortest_augmenting_paths(g, StridedCost<scalar_t>{stage, nc, 1}, nr, nc, w);
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
