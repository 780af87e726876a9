#include "kv/block_allocator.h"

#include <algorithm>
#include <cassert>

namespace qshard {
namespace {

// splitmix64 finalizer: cheap, well mixed 64-bit steps.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t BlockHash(uint64_t parent, absl::Span<const int32_t> tokens, uint64_t salt) {
  uint64_t h = Mix(parent ^ Mix(salt));
  for (int32_t t : tokens) h = Mix(h ^ static_cast<uint32_t>(t));
  return Mix(h ^ tokens.size());
}

BlockAllocator::BlockAllocator(int32_t num_blocks)
    : refcount_(num_blocks, 0), entries_(num_blocks) {
  free_.reserve(num_blocks);
  // Push in reverse so blocks are handed out 0, 1, 2, ... (easier to read in debug output).
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

void BlockAllocator::Evict(int32_t block) {
  CacheEntry& e = entries_[block];
  if (e.in_lru) {
    evictable_.erase(e.lru);
    e.in_lru = false;
  }
  if (e.registered) {
    auto it = by_hash_.find(e.hash);
    if (it != by_hash_.end() && it->second == block) by_hash_.erase(it);
    e.registered = false;
    e.tokens.clear();
  }
}

std::optional<int32_t> BlockAllocator::Allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!evictable_.empty()) {
    b = evictable_.front();
    Evict(b);
  } else {
    return std::nullopt;
  }
  refcount_[b] = 1;
  return b;
}

void BlockAllocator::Retain(int32_t block) {
  CacheEntry& e = entries_[block];
  if (refcount_[block] == 0) {
    // Reviving a cached block: it leaves the eviction list.
    assert(e.in_lru);
    evictable_.erase(e.lru);
    e.in_lru = false;
  }
  ++refcount_[block];
}

void BlockAllocator::Release(int32_t block) {
  assert(refcount_[block] > 0);
  if (--refcount_[block] > 0) return;
  CacheEntry& e = entries_[block];
  if (e.registered) {
    e.lru = evictable_.insert(evictable_.end(), block);  // most recently used last
    e.in_lru = true;
  } else {
    free_.push_back(block);
  }
}

std::optional<int32_t> BlockAllocator::Lookup(uint64_t hash, absl::Span<const int32_t> tokens) {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return std::nullopt;
  const int32_t b = it->second;
  const CacheEntry& e = entries_[b];
  // Compare contents too: a 64-bit collision must never hand out the wrong K/V.
  if (e.tokens.size() != tokens.size() ||
      !std::equal(e.tokens.begin(), e.tokens.end(), tokens.begin())) {
    return std::nullopt;
  }
  Retain(b);
  return b;
}

void BlockAllocator::Register(int32_t block, uint64_t hash, absl::Span<const int32_t> tokens) {
  CacheEntry& e = entries_[block];
  if (e.registered || by_hash_.count(hash)) return;  // first writer wins; the twin stays private
  e.hash = hash;
  e.tokens.assign(tokens.begin(), tokens.end());
  e.registered = true;
  by_hash_[hash] = block;
}

int64_t BlockTable::BlocksNeeded(int64_t num_tokens, int64_t block_size) const {
  int64_t want = (num_tokens + block_size - 1) / block_size;
  return want > size() ? want - size() : 0;
}

bool BlockTable::EnsureCapacity(int64_t num_tokens, int64_t block_size, BlockAllocator& alloc) {
  int64_t need = BlocksNeeded(num_tokens, block_size);
  if (need > alloc.num_free()) return false;
  for (int64_t i = 0; i < need; ++i) blocks_.push_back(*alloc.Allocate());
  return true;
}

void BlockTable::Clear(BlockAllocator& alloc) {
  for (int32_t b : blocks_) alloc.Release(b);
  blocks_.clear();
}

}  // namespace qshard
