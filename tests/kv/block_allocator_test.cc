// Tests of kv/block_allocator (block ids, refcounts, block tables) and kv/kv_cache_spec
// (sizes, --kv-cache-dtype parsing).
#include "kv/block_allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "kv/kv_cache_spec.h"

namespace qshard {
namespace {

TEST(BlockAllocatorTest, AllocatesEveryBlockOnceThenReportsFull) {
  BlockAllocator alloc(8);
  EXPECT_EQ(alloc.num_blocks(), 8);
  EXPECT_EQ(alloc.num_free(), 8);
  EXPECT_EQ(alloc.num_used(), 0);
  std::set<int32_t> seen;
  for (int i = 0; i < 8; ++i) {
    std::optional<int32_t> b = alloc.Allocate();
    ASSERT_TRUE(b.has_value()) << i;
    EXPECT_EQ(*b, i) << "blocks are handed out in order on a fresh allocator";
    EXPECT_TRUE(seen.insert(*b).second) << "block " << *b << " handed out twice";
    EXPECT_EQ(alloc.refcount(*b), 1);
    EXPECT_EQ(alloc.num_free(), 8 - i - 1);
    EXPECT_EQ(alloc.num_used(), i + 1);
  }
  EXPECT_EQ(alloc.Allocate(), std::nullopt);
  EXPECT_EQ(alloc.Allocate(), std::nullopt);  // stays full, no state change
  EXPECT_EQ(alloc.num_free(), 0);
  EXPECT_EQ(alloc.num_used(), 8);
}

TEST(BlockAllocatorTest, EmptyAllocator) {
  BlockAllocator alloc(0);
  EXPECT_EQ(alloc.num_blocks(), 0);
  EXPECT_EQ(alloc.num_free(), 0);
  EXPECT_EQ(alloc.Allocate(), std::nullopt);
  BlockTable table;
  EXPECT_TRUE(table.EnsureCapacity(0, 16, alloc));
  EXPECT_FALSE(table.EnsureCapacity(1, 16, alloc));
  EXPECT_EQ(table.size(), 0);
}

TEST(BlockAllocatorTest, ReleasedBlocksAreReusedLastInFirstOut) {
  BlockAllocator alloc(6);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(alloc.Allocate(), i);
  alloc.Release(1);
  alloc.Release(3);
  EXPECT_EQ(alloc.refcount(1), 0);
  EXPECT_EQ(alloc.refcount(3), 0);
  EXPECT_EQ(alloc.num_free(), 3);
  EXPECT_EQ(alloc.Allocate(), 3);  // most recently released first
  EXPECT_EQ(alloc.Allocate(), 1);
  EXPECT_EQ(alloc.Allocate(), 5);  // then the never-used block
  EXPECT_EQ(alloc.Allocate(), std::nullopt);
  EXPECT_EQ(alloc.refcount(3), 1);
  EXPECT_EQ(alloc.refcount(1), 1);
}

TEST(BlockAllocatorTest, RetainAndReleaseCountReferences) {
  BlockAllocator alloc(3);
  const int32_t b = *alloc.Allocate();
  alloc.Retain(b);
  alloc.Retain(b);
  EXPECT_EQ(alloc.refcount(b), 3);
  alloc.Release(b);
  EXPECT_EQ(alloc.refcount(b), 2);
  EXPECT_EQ(alloc.num_free(), 2) << "a shared block is not free while referenced";
  alloc.Release(b);
  EXPECT_EQ(alloc.num_free(), 2);
  alloc.Release(b);
  EXPECT_EQ(alloc.refcount(b), 0);
  EXPECT_EQ(alloc.num_free(), 3);
  // Freed exactly once: the free list holds three distinct blocks.
  std::set<int32_t> ids;
  for (int i = 0; i < 3; ++i) ids.insert(*alloc.Allocate());
  EXPECT_EQ(ids, (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(alloc.Allocate(), std::nullopt);
}

TEST(BlockTableTest, BlocksNeededArithmetic) {
  BlockTable table;
  EXPECT_EQ(table.BlocksNeeded(0, 4), 0);
  EXPECT_EQ(table.BlocksNeeded(1, 4), 1);
  EXPECT_EQ(table.BlocksNeeded(3, 4), 1);
  EXPECT_EQ(table.BlocksNeeded(4, 4), 1);
  EXPECT_EQ(table.BlocksNeeded(5, 4), 2);
  EXPECT_EQ(table.BlocksNeeded(8, 4), 2);
  EXPECT_EQ(table.BlocksNeeded(9, 4), 3);
  EXPECT_EQ(table.BlocksNeeded(1, 1), 1);
  EXPECT_EQ(table.BlocksNeeded(17, 1), 17);
  EXPECT_EQ(table.BlocksNeeded(4096, 16), 256);
  EXPECT_EQ(table.BlocksNeeded(4097, 16), 257);
  BlockAllocator alloc(10);
  ASSERT_TRUE(table.EnsureCapacity(6, 4, alloc));  // 2 blocks
  EXPECT_EQ(table.size(), 2);
  EXPECT_EQ(table.BlocksNeeded(0, 4), 0);
  EXPECT_EQ(table.BlocksNeeded(8, 4), 0);  // already covered
  EXPECT_EQ(table.BlocksNeeded(9, 4), 1);
  EXPECT_EQ(table.BlocksNeeded(13, 4), 2);
}

TEST(BlockTableTest, EnsureCapacityGrowsInOrder) {
  BlockAllocator alloc(10);
  BlockTable table;
  ASSERT_TRUE(table.EnsureCapacity(1, 4, alloc));
  EXPECT_EQ(table.blocks(), (std::vector<int32_t>{0}));
  ASSERT_TRUE(table.EnsureCapacity(4, 4, alloc));  // still one block
  EXPECT_EQ(table.size(), 1);
  ASSERT_TRUE(table.EnsureCapacity(5, 4, alloc));
  EXPECT_EQ(table.blocks(), (std::vector<int32_t>{0, 1}));
  ASSERT_TRUE(table.EnsureCapacity(3, 4, alloc));  // shrinking asks for nothing
  EXPECT_EQ(table.size(), 2);
  ASSERT_TRUE(table.EnsureCapacity(16, 4, alloc));
  EXPECT_EQ(table.blocks(), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(alloc.num_used(), 4);
}

TEST(BlockTableTest, EnsureCapacityIsAllOrNothing) {
  BlockAllocator alloc(5);
  BlockTable a, b;
  ASSERT_TRUE(a.EnsureCapacity(12, 4, alloc));  // 3 blocks, 2 left
  EXPECT_EQ(alloc.num_free(), 2);
  // b needs 3: fails without taking the 2 that are free.
  EXPECT_FALSE(b.EnsureCapacity(9, 4, alloc));
  EXPECT_EQ(b.size(), 0);
  EXPECT_EQ(alloc.num_free(), 2);
  // Growing a partially: a needs 3 more, only 2 free: a is unchanged.
  EXPECT_FALSE(a.EnsureCapacity(24, 4, alloc));
  EXPECT_EQ(a.size(), 3);
  EXPECT_EQ(alloc.num_free(), 2);
  // Exactly what is free succeeds.
  EXPECT_TRUE(b.EnsureCapacity(8, 4, alloc));
  EXPECT_EQ(b.size(), 2);
  EXPECT_EQ(alloc.num_free(), 0);
  EXPECT_FALSE(b.EnsureCapacity(9, 4, alloc));
  EXPECT_EQ(b.size(), 2);
  // No block is in two tables.
  std::vector<int32_t> all = a.blocks();
  all.insert(all.end(), b.blocks().begin(), b.blocks().end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int32_t>{0, 1, 2, 3, 4}));
}

TEST(BlockTableTest, ClearReleasesEveryBlock) {
  BlockAllocator alloc(6);
  BlockTable a, b;
  ASSERT_TRUE(a.EnsureCapacity(10, 4, alloc));  // blocks 0, 1, 2
  ASSERT_TRUE(b.EnsureCapacity(3, 4, alloc));   // block 3
  a.Clear(alloc);
  EXPECT_EQ(a.size(), 0);
  EXPECT_TRUE(a.blocks().empty());
  EXPECT_EQ(alloc.num_free(), 5);
  for (int32_t blk : {0, 1, 2}) EXPECT_EQ(alloc.refcount(blk), 0);
  EXPECT_EQ(alloc.refcount(3), 1);
  a.Clear(alloc);  // clearing an empty table is a no-op
  EXPECT_EQ(alloc.num_free(), 5);
  // The whole cache is usable again by one table.
  b.Clear(alloc);
  EXPECT_EQ(alloc.num_free(), 6);
  ASSERT_TRUE(a.EnsureCapacity(24, 4, alloc));
  EXPECT_EQ(alloc.num_free(), 0);
}

TEST(BlockTableTest, ClearOfSharedBlockKeepsItForTheOtherOwner) {
  BlockAllocator alloc(4);
  BlockTable a;
  ASSERT_TRUE(a.EnsureCapacity(8, 4, alloc));  // blocks 0, 1
  alloc.Retain(a.blocks()[0]);                 // another sequence shares the prefix block
  a.Clear(alloc);
  EXPECT_EQ(alloc.refcount(0), 1);
  EXPECT_EQ(alloc.refcount(1), 0);
  EXPECT_EQ(alloc.num_free(), 3);
  alloc.Release(0);
  EXPECT_EQ(alloc.num_free(), 4);
}

TEST(BlockTableTest, ChurnNeverLeaksOrDuplicates) {
  BlockAllocator alloc(16);
  std::vector<BlockTable> tables(5);
  std::vector<int64_t> lens(5, 0);
  uint32_t state = 12345;
  auto next = [&] {
    state = state * 1103515245u + 12345u;
    return (state >> 16) & 0x7fff;
  };
  for (int iter = 0; iter < 2000; ++iter) {
    const int s = next() % 5;
    if (next() % 7 == 0) {
      tables[s].Clear(alloc);
      lens[s] = 0;
    } else {
      const int64_t want = lens[s] + 1 + next() % 6;
      const int32_t free_before = alloc.num_free();
      const int64_t need = tables[s].BlocksNeeded(want, 4);
      if (tables[s].EnsureCapacity(want, 4, alloc)) {
        lens[s] = want;
        EXPECT_EQ(alloc.num_free(), free_before - need);
      } else {
        EXPECT_GT(need, free_before);
        EXPECT_EQ(alloc.num_free(), free_before);
      }
    }
    int64_t in_tables = 0;
    std::set<int32_t> ids;
    for (const BlockTable& t : tables) {
      in_tables += t.size();
      for (int32_t b : t.blocks()) {
        ASSERT_TRUE(ids.insert(b).second) << "block " << b << " in two tables";
        ASSERT_EQ(alloc.refcount(b), 1);
      }
    }
    ASSERT_EQ(in_tables, alloc.num_used()) << "iteration " << iter;
  }
}

// ---------------------------------------------------------------------------
// KvCacheSpec.
// ---------------------------------------------------------------------------
TEST(KvCacheSpecTest, Sizes) {
  KvCacheSpec spec{.num_layers = 22,
                   .num_kv_heads = 4,
                   .head_dim = 64,
                   .block_size = 16,
                   .num_blocks = 100,
                   .dtype = DType::kBF16};
  EXPECT_EQ(spec.BytesPerToken(), 2 * 22 * 4 * 64 * 2);
  EXPECT_EQ(spec.BytesPerBlock(), 2 * 22 * 4 * 64 * 2 * 16);
  EXPECT_EQ(spec.TotalBytes(), int64_t{2} * 22 * 4 * 64 * 2 * 16 * 100);
  EXPECT_EQ(spec.ElementsPerLayer(), 100 * 4 * 16 * 64);
  spec.dtype = DType::kF32;
  EXPECT_EQ(spec.BytesPerToken(), 2 * 22 * 4 * 64 * 4);
  spec.dtype = DType::kF8E4M3;
  EXPECT_EQ(spec.BytesPerToken(), 2 * 22 * 4 * 64 * 1);
  // Large caches do not overflow 32 bits.
  KvCacheSpec big{.num_layers = 80,
                  .num_kv_heads = 8,
                  .head_dim = 128,
                  .block_size = 16,
                  .num_blocks = 100000,
                  .dtype = DType::kF16};
  EXPECT_EQ(big.TotalBytes(), int64_t{2} * 80 * 8 * 128 * 2 * 16 * 100000);
  const std::string debug = spec.DebugString();
  for (const char* piece : {"layers=22", "kv_heads=4", "head_dim=64", "block_size=16",
                            "num_blocks=100", "float8_e4m3fn"}) {
    EXPECT_NE(debug.find(piece), std::string::npos) << debug;
  }
}

TEST(KvCacheSpecTest, ParseAcceptedValues) {
  const std::vector<std::pair<std::string, KvCacheDType>> cases = {
      {"auto", KvCacheDType::kAuto},        {"float32", KvCacheDType::kF32},
      {"fp32", KvCacheDType::kF32},         {"bfloat16", KvCacheDType::kBF16},
      {"bf16", KvCacheDType::kBF16},        {"float16", KvCacheDType::kF16},
      {"fp16", KvCacheDType::kF16},         {"half", KvCacheDType::kF16},
      {"fp8", KvCacheDType::kFp8E4M3},      {"fp8_e4m3", KvCacheDType::kFp8E4M3},
      {"fp8_e5m2", KvCacheDType::kFp8E5M2},
  };
  for (const auto& [text, want] : cases) {
    absl::StatusOr<KvCacheDType> got = ParseKvCacheDType(text);
    ASSERT_TRUE(got.ok()) << text << ": " << got.status();
    EXPECT_EQ(*got, want) << text;
    // The canonical name parses back to the same value.
    absl::StatusOr<KvCacheDType> again = ParseKvCacheDType(KvCacheDTypeName(*got));
    ASSERT_TRUE(again.ok()) << KvCacheDTypeName(*got);
    EXPECT_EQ(*again, want);
  }
}

TEST(KvCacheSpecTest, ParseRejectsWithMessage) {
  for (const char* bad : {"", "FP16", "Auto", "int8", "fp8_e4m3fn", "float8", "f32", " auto"}) {
    absl::StatusOr<KvCacheDType> got = ParseKvCacheDType(bad);
    ASSERT_FALSE(got.ok()) << "'" << bad << "' was accepted";
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(got.status().message());
    EXPECT_NE(message.find("--kv-cache-dtype"), std::string::npos) << message;
    EXPECT_NE(message.find(std::string("'") + bad + "'"), std::string::npos) << message;
    for (const char* option : {"auto", "float32", "bfloat16", "float16", "fp8_e4m3", "fp8_e5m2"}) {
      EXPECT_NE(message.find(option), std::string::npos) << option << " missing: " << message;
    }
  }
}

TEST(KvCacheSpecTest, ResolveDType) {
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kAuto, DType::kBF16), DType::kBF16);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kAuto, DType::kF16), DType::kF16);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kAuto, DType::kF32), DType::kF32);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kF32, DType::kBF16), DType::kF32);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kBF16, DType::kF32), DType::kBF16);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kF16, DType::kBF16), DType::kF16);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kFp8E4M3, DType::kBF16), DType::kF8E4M3);
  EXPECT_EQ(ResolveKvCacheDType(KvCacheDType::kFp8E5M2, DType::kBF16), DType::kF8E5M2);
}

}  // namespace
}  // namespace qshard
