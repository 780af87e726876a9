// File: thread_pool.h
// A fixed pool of worker threads for data-parallel CPU kernels.
//
// A decode step issues a few hundred short ParallelFor calls (every linear, attention, norm
// of every layer), so the hand-off is what costs: workers spin briefly on an atomic
// generation counter before sleeping on a condition variable, and the caller spins briefly
// on the pending count before sleeping, which avoids a futex wake / wait pair per call while
// the model is running, and keeps idle workers asleep otherwise.
//
//   ThreadPool& pool = ThreadPool::Global();
//   pool.ParallelFor(n, [&](int64_t begin, int64_t end) { ... });
#ifndef QSHARD_RUNTIME_BASE_THREAD_POOL_H_
#define QSHARD_RUNTIME_BASE_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qshard {

class ThreadPool {
 public:
  // num_threads includes the calling thread (which also does work).
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // The process-wide pool, sized to the cores (QSHARD_NUM_THREADS overrides).
  static ThreadPool& Global();

  int num_threads() const { return num_threads_; }

  // Splits [0, n) into contiguous chunks of at least min_chunk items, one call per chunk,
  // and returns when all are done. Static partitioning keeps results independent of timing.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                   int64_t min_chunk = 1);

 private:
  void WorkerLoop(int index);

  int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;  // guards the sleeping side of the hand-off (cv_, done_cv_)
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  // The current task; written by the caller before generation_ is bumped (release), read by
  // workers after they see the new generation (acquire); stable until every worker has
  // acknowledged it (pending_ reaches 0).
  std::atomic<const std::function<void(int64_t, int64_t)>*> task_{nullptr};
  std::atomic<int64_t> task_n_{0};
  std::atomic<int> task_parts_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};  // workers that have not yet acknowledged the current task
  std::atomic<bool> stop_{false};
  std::mutex run_mu_;  // one ParallelFor at a time
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BASE_THREAD_POOL_H_
