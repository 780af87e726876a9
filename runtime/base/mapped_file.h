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

// Reads a whole (small) text file; the error names the path.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BASE_MAPPED_FILE_H_
