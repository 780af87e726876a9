// File: block_allocator.h
// Owns the ids of the KV cache blocks: hands them out, reference-counts them (so several
// sequences can share a cached prefix block) and takes them back. With prefix caching,
// full blocks are registered under a hash of (parent block hash, token ids, KV dtype); an
// unreferenced registered block stays cached, and is evicted least-recently-used only
// when no free block is left.
//
//   BlockAllocator alloc(num_blocks);
//   std::optional<int32_t> b = alloc.Allocate();   // nullopt when the cache is full
//   alloc.Release(*b);                              // refcount 0: free (or cached)
#ifndef QSHARD_KV_BLOCK_ALLOCATOR_H_
#define QSHARD_KV_BLOCK_ALLOCATOR_H_

#include <cstdint>
#include <list>
#include <optional>
#include <unordered_map>
#include <vector>

#include "absl/types/span.h"

namespace qshard {

// Hash of one full block: chains the parent's hash so equal blocks at different prefixes
// differ. `salt` separates caches of different KV dtypes.
uint64_t BlockHash(uint64_t parent, absl::Span<const int32_t> tokens, uint64_t salt);

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  // A block with refcount 1: a free one, else the least recently used cached one
  // (whose cache entry is dropped). nullopt when every block is referenced.
  std::optional<int32_t> Allocate();
  // Adds a reference to a block already in use (sharing).
  void Retain(int32_t block);
  // Drops one reference; at zero a registered block stays cached, others become free.
  void Release(int32_t block);

  // Prefix cache. Lookup returns the block registered under `hash` holding exactly
  // `tokens`, with a reference added; Register records a full block's content.
  std::optional<int32_t> Lookup(uint64_t hash, absl::Span<const int32_t> tokens);
  void Register(int32_t block, uint64_t hash, absl::Span<const int32_t> tokens);

  int32_t num_blocks() const { return static_cast<int32_t>(refcount_.size()); }
  // Blocks an Allocate() can return: free + cached-and-unreferenced.
  int32_t num_free() const { return static_cast<int32_t>(free_.size() + evictable_.size()); }
  // Blocks referenced by live sequences.
  int32_t num_used() const { return num_blocks() - num_free(); }
  int32_t num_cached() const { return static_cast<int32_t>(by_hash_.size()); }
  int32_t refcount(int32_t block) const { return refcount_[block]; }

 private:
  struct CacheEntry {
    uint64_t hash = 0;
    std::vector<int32_t> tokens;
    bool registered = false;
    std::list<int32_t>::iterator lru;  // valid while unreferenced (in evictable_)
    bool in_lru = false;
  };
  void Evict(int32_t block);

  std::vector<int32_t> free_;      // LIFO stack of free block ids
  std::vector<int32_t> refcount_;  // [num_blocks]
  std::vector<CacheEntry> entries_;              // [num_blocks]
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::list<int32_t> evictable_;   // unreferenced cached blocks, least recent first
};

// The blocks backing one sequence, in position order.
class BlockTable {
 public:
  // Grows the table so it covers num_tokens positions. On failure (cache full) nothing
  // is allocated and false is returned.
  bool EnsureCapacity(int64_t num_tokens, int64_t block_size, BlockAllocator& alloc);
  // Appends a block already referenced for this sequence (a prefix-cache hit).
  void Append(int32_t block) { blocks_.push_back(block); }
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
