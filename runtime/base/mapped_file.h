// File: mapped_file.h
// Read-only memory mapping of a whole file (checkpoint shards are never copied).
#ifndef QSHARD_RUNTIME_BASE_MAPPED_FILE_H_
#define QSHARD_RUNTIME_BASE_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace qshard {

class MappedFile {
 public:
  static absl::StatusOr<std::shared_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Asks the kernel to drop this process's resident pages of [data, data + bytes) when the
// range lies inside a live MappedFile: checkpoint tensors that were copied elsewhere
// (repacked, concatenated, uploaded) and are not read again. Any other memory (heap,
// anonymous) is left alone: paging it out would only cost swap writes. Only whole pages
// inside the range are dropped; the contents stay valid (clean file pages are read back
// from the file if touched again), so this is safe whoever still references the tensor.
// Returns whether the range lies inside a live mapping.
bool ReleaseMappedPages(const void* data, size_t bytes);

// Reads a whole (small) text file; the error names the path.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BASE_MAPPED_FILE_H_
