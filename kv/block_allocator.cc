#include "kv/block_allocator.h"

#include <cassert>

namespace qshard {

BlockAllocator::BlockAllocator(int32_t num_blocks) : refcount_(num_blocks, 0) {
  free_.reserve(num_blocks);
  // Push in reverse so blocks are handed out 0, 1, 2, ... (easier to read in debug output).
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

std::optional<int32_t> BlockAllocator::Allocate() {
  if (free_.empty()) return std::nullopt;
  int32_t b = free_.back();
  free_.pop_back();
  refcount_[b] = 1;
  return b;
}

void BlockAllocator::Retain(int32_t block) {
  assert(refcount_[block] > 0);
  ++refcount_[block];
}

void BlockAllocator::Release(int32_t block) {
  assert(refcount_[block] > 0);
  if (--refcount_[block] == 0) free_.push_back(block);
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
