#include "runtime/base/thread_pool.h"

#include <algorithm>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace qshard {
namespace {

// Spin iterations (with a pause each, ~30-100 ns) before sleeping: long enough to cover the
// gap between two ParallelFor calls of one forward step, short enough that an idle pool
// stops using CPU within a fraction of a millisecond.
constexpr int kSpinIterations = 4000;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

void RunPart(const std::function<void(int64_t, int64_t)>& fn, int64_t n, int parts, int index) {
  int64_t begin = n * index / parts;
  int64_t end = n * (index + 1) / parts;
  if (begin < end) fn(begin, end);
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  for (int i = 1; i < num_threads_; ++i) {
    workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::Global() {
  static ThreadPool* pool = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("QSHARD_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) n = v;
    }
    return new ThreadPool(n <= 0 ? 1 : n);
  }();
  return *pool;
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                             int64_t min_chunk) {
  if (n <= 0) return;
  int64_t max_parts = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
  int parts = static_cast<int>(std::min<int64_t>(num_threads_, max_parts));
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  task_.store(&fn, std::memory_order_relaxed);
  task_n_.store(n, std::memory_order_relaxed);
  task_parts_.store(parts, std::memory_order_relaxed);
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    // Under mu_ so that a worker between its predicate check and its wait cannot miss it.
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  RunPart(fn, n, parts, 0);
  for (int i = 0; i < kSpinIterations; ++i) {
    if (pending_.load(std::memory_order_acquire) == 0) return;
    CpuRelax();
  }
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  while (true) {
    bool fresh = false;
    for (int i = 0; i < kSpinIterations && !fresh; ++i) {
      fresh = generation_.load(std::memory_order_acquire) != seen ||
              stop_.load(std::memory_order_acquire);
      if (!fresh) CpuRelax();
    }
    if (!fresh) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_.load(std::memory_order_acquire) ||
               generation_.load(std::memory_order_acquire) != seen;
      });
    }
    if (stop_.load(std::memory_order_acquire)) return;
    // Every worker acknowledges every task (pending_ counts all of them), so the caller
    // cannot publish the next task while any worker still reads this one.
    seen = generation_.load(std::memory_order_acquire);
    const std::function<void(int64_t, int64_t)>* task = task_.load(std::memory_order_relaxed);
    const int64_t n = task_n_.load(std::memory_order_relaxed);
    const int parts = task_parts_.load(std::memory_order_relaxed);
    if (index < parts) RunPart(*task, n, parts, index);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // The caller may be asleep on done_cv_ (after its spin): wake it under mu_.
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_all();
    }
  }
}

}  // namespace qshard
