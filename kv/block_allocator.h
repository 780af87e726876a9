// File: block_allocator.h
// Owns the ids of the KV cache blocks: hands them out, reference-counts them (so prefix
// caching can share a block between sequences later) and takes them back.
//
//   BlockAllocator alloc(num_blocks);
//   std::optional<int32_t> b = alloc.Allocate();   // nullopt when the cache is full
//   alloc.Release(*b);                              // back to the free list at refcount 0
#ifndef QSHARD_KV_BLOCK_ALLOCATOR_H_
#define QSHARD_KV_BLOCK_ALLOCATOR_H_

#include <cstdint>
#include <optional>
#include <vector>

namespace qshard {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  // A free block with refcount 1, or nullopt when none is free.
  std::optional<int32_t> Allocate();
  // Adds a reference to a block already in use (sharing).
  void Retain(int32_t block);
  // Drops one reference; the block becomes free when none remain.
  void Release(int32_t block);

  int32_t num_blocks() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }
  int32_t refcount(int32_t block) const { return refcount_[block]; }

 private:
  std::vector<int32_t> free_;      // LIFO stack of free block ids
  std::vector<int32_t> refcount_;  // [num_blocks]
};

// The blocks backing one sequence, in position order.
class BlockTable {
 public:
  // Grows the table so it covers num_tokens positions. On failure (cache full) nothing
  // is allocated and false is returned.
  bool EnsureCapacity(int64_t num_tokens, int64_t block_size, BlockAllocator& alloc);
  // Releases every block.
  void Clear(BlockAllocator& alloc);
  // Blocks needed beyond the current ones to cover num_tokens.
  int64_t BlocksNeeded(int64_t num_tokens, int64_t block_size) const;

  const std::vector<int32_t>& blocks() const { return blocks_; }
  int64_t size() const { return static_cast<int64_t>(blocks_.size()); }

 private:
  std::vector<int32_t> blocks_;
};

}  // namespace qshard

#endif  // QSHARD_KV_BLOCK_ALLOCATOR_H_
