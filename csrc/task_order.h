// Work sharing for the CPU kernels: tasks of unequal cost handed to the intra-op threads from a shared
// counter, costliest first.
//
// Why not at::parallel_for over the tasks: it gives each thread an equal count of consecutive tasks, so a
// batch sorted by length leaves one thread the long samples, and a thread whose core is taken away for a while
// (a shared or virtual machine) holds up the whole call. Here a thread takes the next task when it is done
// with its last, biggest first, so the last tasks to start are the short ones.
//
// No result may depend on which thread ran a task: each task is computed by one thread, in a fixed order,
// with scratch that carries nothing from one task to the next.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace seqfast {

// A running task's look at its thread's next one (run_tasks_ahead): claim() takes the next task from the shared
// counter now rather than when this one ends, so that this task can prefetch that one's first inputs while its
// own products run. It claims only while at least one unclaimed task per thread remains: a thread holding a
// claimed task cannot leave another thread idle for more than the end of one task.
class TaskAhead {
 public:
  TaskAhead(std::atomic<int64_t>* next, const std::vector<int64_t>* order, int64_t threads)
      : next_(next), order_(order), threads_(threads) {}

  // The task this thread runs next (claimed once, at the first call), or -1: none claimed.
  int64_t claim() {
    if (!asked_) {
      asked_ = true;
      const int64_t n = static_cast<int64_t>(order_->size());
      if (n - next_->load(std::memory_order_relaxed) >= threads_) claimed_ = next_->fetch_add(1);
    }
    return claimed_ >= 0 && claimed_ < static_cast<int64_t>(order_->size()) ? (*order_)[claimed_] : -1;
  }
  // The index into order of the claimed task, or -1 (set only by claim()).
  int64_t claimed_index() const { return claimed_; }

 private:
  std::atomic<int64_t>* next_;
  const std::vector<int64_t>* order_;
  int64_t threads_;
  bool asked_ = false;
  int64_t claimed_ = -1;
};

// Runs run(order[0], ...), run(order[1], ...), ... on the intra-op threads, each thread with its own scratch from
// make_scratch(), passed to run as run(task, scratch, ahead): a task may claim its thread's next one through ahead.
template <typename MakeScratch, typename Run>
void run_tasks_ahead(const std::vector<int64_t>& order, MakeScratch make_scratch, Run run) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < n;) {
      TaskAhead ahead(&next, &order, threads);
      run(order[t], scratch, ahead);
      t = ahead.claimed_index() >= 0 ? ahead.claimed_index() : next.fetch_add(1);
    }
  });
}

// run_tasks_ahead for tasks that never look ahead: run(task, scratch).
template <typename MakeScratch, typename Run>
void run_tasks(const std::vector<int64_t>& order, MakeScratch make_scratch, Run run) {
  run_tasks_ahead(order, make_scratch, [&](int64_t t, auto& scratch, TaskAhead&) { run(t, scratch); });
}

// Task indices 0..n-1 by decreasing cost, ties in index order.
inline std::vector<int64_t> by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

}  // namespace seqfast
