// Test driver, not part of the extension (setup.py builds csrc/*.cpp and *.cu only): built and run by
// tests/ops/test_linear_assignment.py, under ThreadSanitizer where the compiler has it.
//
// The CUDA twin runs linear_assignment.h with a group of 32 or more threads (columns striped over threads,
// rank 0's bookkeeping, Group::sync between phases), which no test can run on a machine without a GPU. This
// driver runs the same code with a group of K std::threads whose sync is a barrier, on random problems
// (ties, +inf, NaN, strided and transposed layouts, staged or read in place, num_targets out of range), and
// requires the serial twin's exact result. A missing sync shows as a data race (TSan) or a mismatch.
//
//   simulated_group_check SEED TRIALS   -> prints "<count> mismatches", exits 1 on any
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "linear_assignment.h"

namespace {

using detr_fast::Candidate;

// A group of kThreads host threads: the interface of SerialGroup and of the CUDA twin's WarpGroup/BlockGroup.
// argmin exchanges offers the way BlockGroup does (each thread standing for a warp): halves of a double
// buffer alternating between calls, one barrier per call, so ThreadSanitizer also checks that scheme.
template <int kThreads>
struct ThreadGroup {
  static constexpr int kSize = kThreads;
  int thread_rank;
  std::barrier<>* barrier;
  Candidate* offers;  // [2][kThreads]
  bool* votes;        // [kThreads]
  int parity = 0;
  int rank() const { return thread_rank; }
  void sync() const { barrier->arrive_and_wait(); }
  Candidate argmin(Candidate c) {
    Candidate* half = offers + parity * kThreads;
    parity ^= 1;
    half[thread_rank] = c;
    sync();
    Candidate best = half[0];
    for (int t = 1; t < kThreads; ++t) {
      if (detr_fast::precedes(half[t], best)) best = half[t];
    }
    return best;
  }
  bool any(bool x) const {
    votes[thread_rank] = x;
    sync();
    bool result = false;
    for (int t = 0; t < kThreads; ++t) result = result || votes[t];
    sync();
    return result;
  }
};

struct Problem {
  std::vector<float> buffer;
  int64_t stride_n;
  int64_t stride_m;
  int n;
  int m;
  int64_t num_targets;
};

struct Result {
  std::vector<int64_t> assignment;
  uint8_t status;
  bool operator==(const Result& other) const { return status == other.status && assignment == other.assignment; }
};

Result solve_serial(const Problem& p) {
  std::vector<double> scratch(detr_fast::workspace_bytes(std::max(p.n, p.m), std::min(p.n, p.m)) / 8 + 1);
  const detr_fast::Workspace w = detr_fast::carve_workspace(reinterpret_cast<unsigned char*>(scratch.data()),
                                                            std::max(p.n, p.m), std::min(p.n, p.m));
  Result result{std::vector<int64_t>(p.n, -7), 99};
  detr_fast::SerialGroup group;
  detr_fast::solve_problem(group, p.buffer.data(), p.stride_n, p.stride_m, p.n, p.m, p.num_targets, w,
                           static_cast<float*>(nullptr), result.assignment.data(), &result.status);
  return result;
}

template <int kThreads>
Result solve_threads(const Problem& p, bool staged) {
  std::vector<double> scratch(detr_fast::workspace_bytes(std::max(p.n, p.m), std::min(p.n, p.m)) / 8 + 1);
  const detr_fast::Workspace w = detr_fast::carve_workspace(reinterpret_cast<unsigned char*>(scratch.data()),
                                                            std::max(p.n, p.m), std::min(p.n, p.m));
  std::vector<float> stage(staged ? static_cast<size_t>(p.n) * p.m + 1 : 0);
  Result result{std::vector<int64_t>(p.n, -7), 99};
  std::barrier<> barrier(kThreads);
  std::vector<Candidate> offers(2 * kThreads);
  bool votes[kThreads];
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kThreads; ++rank) {
    threads.emplace_back([&, rank] {
      ThreadGroup<kThreads> group{rank, &barrier, offers.data(), votes};
      detr_fast::solve_problem(group, p.buffer.data(), p.stride_n, p.stride_m, p.n, p.m, p.num_targets, w,
                               staged ? stage.data() : nullptr, result.assignment.data(), &result.status);
    });
  }
  for (std::thread& thread : threads) thread.join();
  return result;
}

Problem random_problem(std::mt19937& rng) {
  Problem p;
  p.n = static_cast<int>(rng() % 41);
  p.m = static_cast<int>(rng() % 41);
  const int kind = static_cast<int>(rng() % 4);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  p.buffer.resize(static_cast<size_t>(p.n) * p.m * 2 + 1);
  for (float& c : p.buffer) {
    if (kind == 0) c = uniform(rng);                                             // unique optimum
    if (kind == 1) c = static_cast<float>(rng() % 3);                            // ties
    if (kind == 2) c = rng() % 4 == 0 ? INFINITY : uniform(rng);                 // forbidden pairs
    if (kind == 3) c = rng() % 200 == 0 ? NAN : static_cast<float>(rng() % 5);  // invalid entries
  }
  switch (rng() % 3) {
    case 0:  // [n, m] contiguous
      p.stride_n = p.m;
      p.stride_m = 1;
      break;
    case 1:  // stored [m, n]: queries fastest
      p.stride_n = 1;
      p.stride_m = p.n;
      break;
    default:  // every other column of an [n, 2m] buffer
      p.stride_n = 2 * p.m;
      p.stride_m = 2;
      break;
  }
  p.num_targets = p.m == 0 ? 0 : static_cast<int64_t>(rng() % (p.m + 1));
  if (rng() % 20 == 0) p.num_targets = rng() % 2 ? p.m + 1 : -1;
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SEED TRIALS\n", argv[0]);
    return 2;
  }
  std::mt19937 rng(static_cast<unsigned>(std::atoi(argv[1])));
  const int trials = std::atoi(argv[2]);
  int mismatches = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const Problem p = random_problem(rng);
    const Result expected = solve_serial(p);
    const Result results[] = {solve_threads<4>(p, false), solve_threads<4>(p, true), solve_threads<32>(p, false),
                              solve_threads<32>(p, true)};
    for (const Result& result : results) {
      if (!(result == expected)) {
        ++mismatches;
        std::printf("mismatch: trial %d, n=%d m=%d num_targets=%ld strides (%ld, %ld)\n", trial, p.n, p.m,
                    static_cast<long>(p.num_targets), static_cast<long>(p.stride_n), static_cast<long>(p.stride_m));
      }
    }
  }
  std::printf("%d mismatches\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
