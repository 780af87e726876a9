// Prefix-cache side of the block allocator: registration, lookup by hash + content,
// LRU eviction of unreferenced cached blocks, revival.
#include "gtest/gtest.h"
#include "kv/block_allocator.h"

namespace qshard {
namespace {

TEST(BlockAllocatorPrefixTest, ReleasedRegisteredBlockStaysCachedUntilEvicted) {
  BlockAllocator alloc(2);
  const std::vector<int32_t> toks = {1, 2, 3, 4};
  const uint64_t h = BlockHash(0, toks, 1);
  int32_t a = *alloc.Allocate();
  alloc.Register(a, h, toks);
  alloc.Release(a);
  EXPECT_EQ(alloc.num_free(), 2) << "a cached, unreferenced block can still be handed out";
  EXPECT_EQ(alloc.num_used(), 0);
  EXPECT_EQ(alloc.num_cached(), 1);
  // Lookup revives it with a reference.
  auto hit = alloc.Lookup(h, toks);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(*hit, a);
  EXPECT_EQ(alloc.refcount(a), 1);
  EXPECT_EQ(alloc.num_used(), 1);
  alloc.Release(a);
  // Free blocks are used before cached ones; then the cached one is evicted.
  int32_t b = *alloc.Allocate();
  EXPECT_NE(b, a);
  EXPECT_EQ(alloc.num_cached(), 1);
  int32_t c = *alloc.Allocate();
  EXPECT_EQ(c, a);
  EXPECT_EQ(alloc.num_cached(), 0);
  EXPECT_FALSE(alloc.Lookup(h, toks).has_value());
  EXPECT_FALSE(alloc.Allocate().has_value());
}

TEST(BlockAllocatorPrefixTest, EvictsLeastRecentlyUsedFirst) {
  BlockAllocator alloc(3);
  std::vector<std::vector<int32_t>> toks = {{1}, {2}, {3}};
  std::vector<int32_t> blocks;
  for (int i = 0; i < 3; ++i) {
    blocks.push_back(*alloc.Allocate());
    alloc.Register(blocks[i], BlockHash(0, toks[i], 0), toks[i]);
  }
  // Release order 1, 0, 2: block 1 is the least recently used.
  alloc.Release(blocks[1]);
  alloc.Release(blocks[0]);
  alloc.Release(blocks[2]);
  EXPECT_EQ(*alloc.Allocate(), blocks[1]);
  EXPECT_EQ(*alloc.Allocate(), blocks[0]);
  EXPECT_TRUE(alloc.Lookup(BlockHash(0, toks[2], 0), toks[2]).has_value());
}

TEST(BlockAllocatorPrefixTest, LookupChecksContentNotJustHash) {
  BlockAllocator alloc(1);
  const std::vector<int32_t> toks = {7, 8};
  int32_t a = *alloc.Allocate();
  alloc.Register(a, 42, toks);
  const std::vector<int32_t> other = {7, 9};
  EXPECT_FALSE(alloc.Lookup(42, other).has_value());
  EXPECT_TRUE(alloc.Lookup(42, toks).has_value());
}

TEST(BlockAllocatorPrefixTest, HashDependsOnParentTokensAndSalt) {
  const std::vector<int32_t> t = {1, 2, 3};
  EXPECT_NE(BlockHash(0, t, 0), BlockHash(1, t, 0));
  EXPECT_NE(BlockHash(0, t, 0), BlockHash(0, t, 1));
  EXPECT_NE(BlockHash(0, t, 0), BlockHash(0, std::vector<int32_t>{1, 2, 4}, 0));
  EXPECT_EQ(BlockHash(5, t, 2), BlockHash(5, t, 2));
}

}  // namespace
}  // namespace qshard
