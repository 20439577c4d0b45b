// Fixed-size rows of LatentIndex's matrices (internal to src/index).
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <vector>

namespace kvagent::index_internal {

// Rows live in blocks of about 64 MiB so growth never copies the matrix; slot i is row
// i % per_block of block i / per_block. Not thread-safe (LatentIndex locks around it).
class RowBlocks {
 public:
  explicit RowBlocks(size_t row_bytes)
      : row_bytes_(row_bytes), per_block_(std::clamp<size_t>((size_t{64} << 20) / row_bytes, 1, 4096)) {}

  size_t row_bytes() const { return row_bytes_; }
  // Slots per block: slots [k * per_block, (k + 1) * per_block) are contiguous in memory.
  size_t per_block() const { return per_block_; }
  std::byte* Row(size_t slot) const { return blocks_[slot / per_block_].get() + (slot % per_block_) * row_bytes_; }
  // Makes slots [0, count) addressable; false (and unchanged) if a block cannot be allocated.
  bool Reserve(size_t count) {
    while (blocks_.size() * per_block_ < count) {
      std::unique_ptr<std::byte[]> block(new (std::nothrow) std::byte[per_block_ * row_bytes_]);
      if (!block) return false;
      blocks_.push_back(std::move(block));
    }
    return true;
  }
  // Frees blocks beyond those `count` rows need, keeping one spare so add/remove at a block
  // boundary does not thrash the allocator.
  void Shrink(size_t count) {
    while (blocks_.size() > count / per_block_ + 2) blocks_.pop_back();
  }
  size_t MemoryBytes() const { return blocks_.size() * per_block_ * row_bytes_; }

 private:
  size_t row_bytes_;
  size_t per_block_;
  std::vector<std::unique_ptr<std::byte[]>> blocks_;
};

}  // namespace kvagent::index_internal
