// Tests of runtime/base/thread_pool: ParallelFor covers [0, n) exactly once, in contiguous
// chunks of at least min_chunk items, partitioned the same way on every call.
#include "runtime/base/thread_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace qshard {
namespace {

using Chunks = std::vector<std::pair<int64_t, int64_t>>;

// Runs ParallelFor once, checking every index is visited exactly once; returns the chunks
// sorted by begin.
Chunks RunAndCheck(ThreadPool& pool, int64_t n, int64_t min_chunk) {
  std::vector<std::atomic<int>> hits(std::max<int64_t>(n, 0));
  for (auto& h : hits) h.store(0);
  std::mutex mu;
  Chunks chunks;
  pool.ParallelFor(
      n,
      [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if (i >= 0 && i < n) hits[i].fetch_add(1);
        }
        std::lock_guard<std::mutex> lock(mu);
        chunks.emplace_back(begin, end);
      },
      min_chunk);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(hits[i].load(), 1) << "index " << i << " of n=" << n << " min_chunk=" << min_chunk;
  }
  std::sort(chunks.begin(), chunks.end());
  return chunks;
}

TEST(ThreadPoolTest, CoversRangeExactlyOnceInContiguousChunks) {
  for (int threads = 1; threads <= 4; ++threads) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 100, 1000, 4097}) {
      for (int64_t min_chunk : {1, 2, 3, 16, 64, 1000, 5000}) {
        SCOPED_TRACE(::testing::Message()
                     << "threads=" << threads << " n=" << n << " min_chunk=" << min_chunk);
        Chunks chunks = RunAndCheck(pool, n, min_chunk);
        ASSERT_FALSE(chunks.empty());
        EXPECT_LE(static_cast<int>(chunks.size()), threads);
        // Contiguous, non-empty, in order, covering [0, n).
        EXPECT_EQ(chunks.front().first, 0);
        EXPECT_EQ(chunks.back().second, n);
        for (size_t c = 0; c < chunks.size(); ++c) {
          EXPECT_LT(chunks[c].first, chunks[c].second);
          if (c > 0) {
            EXPECT_EQ(chunks[c].first, chunks[c - 1].second);
          }
          // At least min_chunk items each (a single chunk may be smaller when n is).
          if (chunks.size() > 1) {
            EXPECT_GE(chunks[c].second - chunks[c].first, min_chunk);
          }
        }
        // Work is actually split when there is enough of it.
        if (threads > 1 && n >= 2 * min_chunk) {
          EXPECT_GT(chunks.size(), 1u);
        }
        if (n >= threads * min_chunk) {
          EXPECT_EQ(static_cast<int>(chunks.size()), threads);
        }
      }
    }
  }
}

TEST(ThreadPoolTest, PartitioningIsDeterministic) {
  for (int threads = 1; threads <= 4; ++threads) {
    ThreadPool pool(threads);
    for (int64_t n : {5, 17, 1000}) {
      for (int64_t min_chunk : {1, 4}) {
        const Chunks first = RunAndCheck(pool, n, min_chunk);
        for (int rep = 0; rep < 20; ++rep) {
          EXPECT_EQ(RunAndCheck(pool, n, min_chunk), first)
              << "threads=" << threads << " n=" << n << " min_chunk=" << min_chunk;
        }
        // A second pool of the same size partitions the same way.
        ThreadPool other(threads);
        EXPECT_EQ(RunAndCheck(other, n, min_chunk), first);
      }
    }
  }
}

TEST(ThreadPoolTest, ChunksRunOnDistinctThreads) {
  ThreadPool pool(4);
  std::mutex mu;
  std::set<std::thread::id> ids;
  std::atomic<int> arrived{0};
  pool.ParallelFor(4, [&](int64_t, int64_t) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    }
    // Every chunk waits for all four: only possible if they run concurrently (bounded, so
    // a serial pool fails instead of hanging).
    arrived.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (arrived.load() < 4 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
  });
  EXPECT_EQ(arrived.load(), 4);
  EXPECT_EQ(ids.size(), 4u);
  EXPECT_EQ(ids.count(std::this_thread::get_id()), 1u) << "the caller takes a chunk";
}

TEST(ThreadPoolTest, ZeroAndNegativeCountsDoNothing) {
  for (int threads = 1; threads <= 4; ++threads) {
    ThreadPool pool(threads);
    for (int64_t n : {0, -1, -100}) {
      int calls = 0;
      pool.ParallelFor(n, [&](int64_t, int64_t) { ++calls; });
      EXPECT_EQ(calls, 0) << "n=" << n;
    }
  }
}

TEST(ThreadPoolTest, NonPositiveMinChunkActsAsOne) {
  ThreadPool pool(3);
  for (int64_t min_chunk : {0, -5}) {
    Chunks chunks = RunAndCheck(pool, 9, min_chunk);
    EXPECT_EQ(chunks, (Chunks{{0, 3}, {3, 6}, {6, 9}})) << "min_chunk=" << min_chunk;
  }
}

TEST(ThreadPoolTest, NonPositiveThreadCountMeansOne) {
  ThreadPool pool(0);
  EXPECT_EQ(pool.num_threads(), 1);
  Chunks chunks = RunAndCheck(pool, 10, 1);
  EXPECT_EQ(chunks, (Chunks{{0, 10}}));
}

TEST(ThreadPoolTest, RepeatedUse) {
  for (int threads = 1; threads <= 4; ++threads) {
    ThreadPool pool(threads);
    std::atomic<int64_t> total{0};
    for (int call = 0; call < 1000; ++call) {
      const int64_t n = 1 + call % 37;
      pool.ParallelFor(n, [&](int64_t begin, int64_t end) {
        int64_t s = 0;
        for (int64_t i = begin; i < end; ++i) s += i + 1;
        total.fetch_add(s);
      });
    }
    int64_t want = 0;
    for (int call = 0; call < 1000; ++call) {
      const int64_t n = 1 + call % 37;
      want += n * (n + 1) / 2;
    }
    EXPECT_EQ(total.load(), want) << "threads=" << threads;
  }
}

TEST(ThreadPoolTest, ConcurrentCallersAreSerialized) {
  ThreadPool pool(3);
  std::atomic<int64_t> total{0};
  auto caller = [&] {
    for (int call = 0; call < 300; ++call) {
      pool.ParallelFor(64, [&](int64_t begin, int64_t end) { total.fetch_add(end - begin); });
    }
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_EQ(total.load(), 2 * 300 * 64);
}

TEST(ThreadPoolTest, GlobalPoolWorks) {
  ThreadPool& pool = ThreadPool::Global();
  EXPECT_GE(pool.num_threads(), 1);
  EXPECT_EQ(&pool, &ThreadPool::Global());
  RunAndCheck(pool, 12345, 7);
}

}  // namespace
}  // namespace qshard
