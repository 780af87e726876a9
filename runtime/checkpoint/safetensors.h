// File: safetensors.h
// Zero-copy, fully validated reading of safetensors checkpoints (single file or sharded
// with model.safetensors.index.json), and a writer used by the quantizer and by tests.
//
//   QSHARD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open("models/kjv-llama-12m"));
//   QSHARD_ASSIGN_OR_RETURN(Tensor w, ckpt.Get("model.embed_tokens.weight"));  // mmap view
//
// Every format violation is an error naming the file and, where there is one, the tensor.
#ifndef QSHARD_RUNTIME_CHECKPOINT_SAFETENSORS_H_
#define QSHARD_RUNTIME_CHECKPOINT_SAFETENSORS_H_

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/base/mapped_file.h"
#include "runtime/base/tensor.h"

namespace qshard {

struct TensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
  std::string file;   // path of the shard holding it
  size_t begin = 0;   // byte offsets relative to the start of the data area
  size_t end = 0;
};

// One parsed and validated .safetensors file.
class SafetensorsFile {
 public:
  // Validates: file at least 8 bytes, header length within the file, header is a JSON
  // object, each entry has dtype/shape/data_offsets of the right types, supported dtype,
  // non-negative dims, begin <= end, offsets inside the data area, no two tensors
  // overlapping, byte length == numel x dtype size. "__metadata__" is kept as strings.
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A view into the mapping; the returned tensor keeps the mapping alive.
  absl::StatusOr<Tensor> Get(const std::string& name) const;

 private:
  std::shared_ptr<MappedFile> file_;
  size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory.
class Checkpoint {
 public:
  // dir holds model.safetensors, or model.safetensors.index.json naming shards (every
  // index entry must name an existing file that holds that tensor; a tensor in a shard
  // but not in the index is an error too), or a single other *.safetensors file.
  static absl::StatusOr<Checkpoint> Open(const std::string& dir);

  bool Has(const std::string& name) const;
  const TensorInfo* Find(const std::string& name) const;
  // Error names the tensor and the directory when missing.
  absl::StatusOr<Tensor> Get(const std::string& name) const;
  // Sorted names of all tensors.
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }
  // Sum of byte sizes per dtype, and number of elements, over all tensors.
  std::map<DType, size_t> BytesPerDType() const;
  int64_t NumElementsTotal() const;

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<int, TensorInfo>> index_;  // name -> (file idx, info)
};

// Writes tensors (host memory) into one .safetensors file, sorted by name, 8-byte aligned
// data area. Used by `qshard quantize` and by tests to build (and corrupt) checkpoints.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace qshard

#endif  // QSHARD_RUNTIME_CHECKPOINT_SAFETENSORS_H_
