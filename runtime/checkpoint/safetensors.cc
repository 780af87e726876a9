#include "runtime/checkpoint/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr char kMetadataKey[] = "__metadata__";
constexpr char kIndexName[] = "model.safetensors.index.json";
constexpr char kSingleName[] = "model.safetensors";

// "path: tensor 'name': " — the prefix of every per-tensor error.
std::string TensorWhere(const std::string& path, const std::string& name) {
  return absl::StrCat(path, ": tensor '", name, "': ");
}

// A short rendering of an unexpected JSON value for "found ..." parts of messages.
std::string Describe(const json& v) {
  std::string text = v.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return absl::StrCat(std::string(v.type_name()), " ", text);
}

// Parses JSON text, reporting syntax errors (with their position) and duplicate top-level
// keys as InvalidArgument naming `what`. nlohmann silently keeps the last of duplicate keys,
// which would hide a tensor listed twice, so the parser callback watches for them.
absl::StatusOr<json> ParseJsonObject(const char* begin, const char* end, const std::string& what) {
  std::set<std::string> seen;
  std::string duplicate;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && duplicate.empty()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second) duplicate = key;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(begin, end, callback, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": malformed JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected a JSON object, found ", std::string(j.type_name())));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": key '", duplicate, "' appears more than once"));
  }
  return j;
}

// Reads a non-negative JSON integer that fits in int64_t (so it fits size_t and Shape too).
bool GetNonNegative(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return *out <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

// Parses and checks one header entry except for overlap, which needs all entries.
absl::StatusOr<TensorInfo> ParseEntry(const std::string& path, const std::string& name,
                                      const json& entry, size_t data_size) {
  const std::string where = TensorWhere(path, name);
  if (!entry.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "expected an object with dtype, shape and data_offsets, found ", Describe(entry)));
  }
  TensorInfo info;
  info.name = name;
  info.file = path;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "expected a string 'dtype', found ",
                     dtype_it == entry.end() ? std::string("nothing") : Describe(*dtype_it)));
  }
  auto dtype = ParseSafetensorsDType(dtype_it->get<std::string>());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(where, dtype.status().message()));
  }
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "expected 'shape' to be an array of integers, found ",
                     shape_it == entry.end() ? std::string("nothing") : Describe(*shape_it)));
  }
  for (const json& d : *shape_it) {
    uint64_t dim = 0;
    if (!GetNonNegative(d, &dim)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "shape ", shape_it->dump(),
                                                     " has a dimension that is not a non-negative "
                                                     "64-bit integer: ",
                                                     Describe(d)));
    }
    info.shape.push_back(static_cast<int64_t>(dim));
  }

  auto offsets_it = entry.find("data_offsets");
  uint64_t begin = 0;
  uint64_t end = 0;
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !GetNonNegative((*offsets_it)[0], &begin) || !GetNonNegative((*offsets_it)[1], &end)) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "expected 'data_offsets' to be [begin, end] of non-negative integers, found ",
        offsets_it == entry.end() ? std::string("nothing") : Describe(*offsets_it)));
  }
  if (begin > end) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "data_offsets [", begin, ", ", end, "] have begin > end"));
  }
  if (end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "data_offsets [", begin, ", ", end, "] reach past the end of the data area (",
        data_size, " bytes); the file is truncated or the header is wrong"));
  }

  // numel x dtype size computed with overflow checks: a hostile header could otherwise make
  // a huge shape wrap around to match a small byte range.
  const std::string dtype_name(SafetensorsDTypeName(info.dtype));
  uint64_t needed = DTypeSize(info.dtype);
  bool zero = false;
  bool overflow = false;
  for (int64_t dim : info.shape) {
    if (dim == 0) zero = true;
    if (!overflow && __builtin_mul_overflow(needed, static_cast<uint64_t>(dim), &needed)) {
      overflow = true;
    }
  }
  if (zero) {
    needed = 0;
  } else if (overflow || needed > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(where, "shape ", ShapeToString(info.shape),
                                                   " x ", dtype_name,
                                                   " overflows a 64-bit byte count"));
  }
  if (end - begin != needed) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "data_offsets [", begin, ", ", end, "] hold ", end - begin, " bytes but shape ",
        ShapeToString(info.shape), " x ", dtype_name, " needs ", needed));
  }
  info.begin = static_cast<size_t>(begin);
  info.end = static_cast<size_t>(end);
  return info;
}

// Rejects index entries that would reach outside the checkpoint directory.
bool IsPlainRelativePath(const std::string& name) {
  if (name.empty()) return false;
  fs::path p(name);
  if (p.is_absolute()) return false;
  for (const auto& part : p) {
    if (part == "..") return false;
  }
  return true;
}

bool IsRegularFile(const std::string& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

}  // namespace

// ---------------------------------------------------------------------------
// SafetensorsFile
// ---------------------------------------------------------------------------

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  QSHARD_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> mapped, MappedFile::Open(path));
  const size_t size = mapped->size();
  if (size < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": file is ", size, " bytes, too short for the 8-byte safetensors header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | mapped->data()[i];
  if (header_len > size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " reaches past the end of the file (", size - 8,
                                                   " bytes follow the length field)"));
  }
  const char* header = reinterpret_cast<const char*>(mapped->data() + 8);
  QSHARD_ASSIGN_OR_RETURN(json j, ParseJsonObject(header, header + header_len, path + ": header"));

  SafetensorsFile file;
  file.file_ = mapped;
  file.data_start_ = 8 + static_cast<size_t>(header_len);
  const size_t data_size = size - file.data_start_;

  for (const auto& [key, value] : j.items()) {
    if (key == kMetadataKey) {
      if (!value.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": __metadata__ must be an object of strings, found ", Describe(value)));
      }
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(
              path, ": __metadata__ entry '", mk, "' must be a string, found ", Describe(mv)));
        }
        file.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    QSHARD_ASSIGN_OR_RETURN(TensorInfo info, ParseEntry(path, key, value, data_size));
    file.tensors_.emplace(key, std::move(info));
  }

  // Overlap check: sort non-empty ranges by begin; each must start at or after the furthest
  // end seen so far. Empty tensors occupy no bytes, so they can sit anywhere.
  std::vector<const TensorInfo*> ranges;
  for (const auto& [name, info] : file.tensors_) {
    if (info.end > info.begin) ranges.push_back(&info);
  }
  std::sort(ranges.begin(), ranges.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
  });
  const TensorInfo* furthest = nullptr;
  for (const TensorInfo* r : ranges) {
    if (furthest != nullptr && r->begin < furthest->end) {
      return absl::InvalidArgumentError(absl::StrCat(TensorWhere(path, r->name), "data_offsets [",
                                                     r->begin, ", ", r->end, "] overlap tensor '",
                                                     furthest->name, "' at [", furthest->begin,
                                                     ", ", furthest->end, "]"));
    }
    if (furthest == nullptr || r->end > furthest->end) furthest = r;
  }
  return file;
}

absl::StatusOr<Tensor> SafetensorsFile::Get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path(), ": no tensor named '", name, "'"));
  }
  const TensorInfo& info = it->second;
  // The mapping is read-only (PROT_READ); the const_cast only satisfies Tensor's void*.
  // The aliasing shared_ptr keeps the whole mapping alive as long as any view exists.
  auto* ptr = const_cast<uint8_t*>(file_->data() + data_start_ + info.begin);
  std::shared_ptr<const void> owner(file_, ptr);
  return Tensor(info.dtype, info.shape, ptr, std::move(owner), Device::kCpu);
}

// ---------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------

absl::StatusOr<Checkpoint> Checkpoint::Open(const std::string& dir) {
  std::error_code ec;
  Checkpoint ckpt;
  ckpt.dir_ = dir;

  // A path straight to one .safetensors file is accepted too (handy for inspect tools).
  if (fs::is_regular_file(dir, ec)) {
    QSHARD_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(dir));
    auto file = std::make_shared<SafetensorsFile>(std::move(f));
    for (const auto& [name, info] : file->tensors()) ckpt.index_.emplace(name, std::pair{0, info});
    ckpt.files_.push_back(std::move(file));
    return ckpt;
  }
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory '", dir, "' does not exist"));
  }

  const std::string index_path = (fs::path(dir) / kIndexName).string();
  if (IsRegularFile(index_path)) {
    QSHARD_ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path));
    QSHARD_ASSIGN_OR_RETURN(json j,
                            ParseJsonObject(text.data(), text.data() + text.size(), index_path));
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path,
                       ": expected \"weight_map\" to be an object of tensor name -> shard file, "
                       "found ",
                       wm == j.end() ? std::string("nothing") : Describe(*wm)));
    }
    if (wm->empty()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map is empty"));
    }
    // shard file name -> first tensor naming it (for error messages), in sorted order.
    std::map<std::string, std::string> shards;
    std::map<std::string, std::string> weight_map;
    for (const auto& [name, shard] : wm->items()) {
      if (!shard.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry '", name,
                                                       "' must be a shard file name, found ",
                                                       Describe(shard)));
      }
      std::string shard_name = shard.get<std::string>();
      if (!IsPlainRelativePath(shard_name)) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry '", name, "' names '", shard_name,
                         "'; expected a file name inside the checkpoint directory"));
      }
      shards.emplace(shard_name, name);
      weight_map.emplace(name, std::move(shard_name));
    }
    // Check every shard exists before parsing any, so a missing file is reported as such.
    for (const auto& [shard_name, first_tensor] : shards) {
      const std::string shard_path = (fs::path(dir) / shard_name).string();
      if (!IsRegularFile(shard_path)) {
        return absl::NotFoundError(absl::StrCat(index_path, ": shard file '", shard_path,
                                                "' (holding tensor '", first_tensor,
                                                "') does not exist"));
      }
    }
    std::map<std::string, int> shard_index;
    for (const auto& [shard_name, first_tensor] : shards) {
      const std::string shard_path = (fs::path(dir) / shard_name).string();
      QSHARD_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(shard_path));
      shard_index[shard_name] = static_cast<int>(ckpt.files_.size());
      ckpt.files_.push_back(std::make_shared<SafetensorsFile>(std::move(f)));
    }
    // Every index entry must be in its shard...
    for (const auto& [name, shard_name] : weight_map) {
      int idx = shard_index.at(shard_name);
      const auto& tensors = ckpt.files_[idx]->tensors();
      auto it = tensors.find(name);
      if (it == tensors.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": tensor '", name, "' is mapped to shard '",
                         ckpt.files_[idx]->path(), "' but that shard does not contain it"));
      }
      ckpt.index_.emplace(name, std::pair{idx, it->second});
    }
    // ...and every shard tensor must be in the index, pointing at that very shard.
    for (const auto& [shard_name, idx] : shard_index) {
      for (const auto& [name, info] : ckpt.files_[idx]->tensors()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end()) {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", name,
                                                         "' is stored in shard '", info.file,
                                                         "' but is missing from weight_map"));
        }
        if (it->second != shard_name) {
          return absl::InvalidArgumentError(
              absl::StrCat(index_path, ": tensor '", name, "' is stored in two shards: '",
                           ckpt.files_[shard_index.at(it->second)]->path(),
                           "' (per weight_map) and '", info.file, "'"));
        }
      }
    }
    return ckpt;
  }

  std::string single = (fs::path(dir) / kSingleName).string();
  if (!IsRegularFile(single)) {
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".safetensors" && e.is_regular_file(ec)) {
        found.push_back(e.path().filename().string());
      }
    }
    std::sort(found.begin(), found.end());
    if (found.empty()) {
      return absl::NotFoundError(absl::StrCat("no checkpoint in '", dir, "': looked for ",
                                              kIndexName, ", ", kSingleName,
                                              " and any other *.safetensors file"));
    }
    if (found.size() > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", dir, "' holds several .safetensors files (", absl::StrJoin(found, ", "),
                       ") but no ", kIndexName, " saying which tensor lives where"));
    }
    single = (fs::path(dir) / found[0]).string();
  }
  QSHARD_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(single));
  auto file = std::make_shared<SafetensorsFile>(std::move(f));
  for (const auto& [name, info] : file->tensors()) ckpt.index_.emplace(name, std::pair{0, info});
  ckpt.files_.push_back(std::move(file));
  return ckpt;
}

bool Checkpoint::Has(const std::string& name) const { return index_.count(name) > 0; }

const TensorInfo* Checkpoint::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &it->second.second;
}

absl::StatusOr<Tensor> Checkpoint::Get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", name, "' not found in checkpoint '", dir_, "'"));
  }
  return files_[it->second.first]->Get(name);
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, entry] : index_) names.push_back(name);
  return names;
}

std::map<DType, size_t> Checkpoint::BytesPerDType() const {
  std::map<DType, size_t> bytes;
  for (const auto& [name, entry] : index_) {
    bytes[entry.second.dtype] += entry.second.end - entry.second.begin;
  }
  return bytes;
}

int64_t Checkpoint::NumElementsTotal() const {
  int64_t n = 0;
  for (const auto& [name, entry] : index_) n += NumElements(entry.second.shape);
  return n;
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<const std::pair<std::string, Tensor>*> sorted;
  sorted.reserve(tensors.size());
  for (const auto& t : tensors) {
    const std::string where = TensorWhere(path, t.first);
    if (t.first.empty() || t.first == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "name is empty or reserved for metadata"));
    }
    if (t.second.device() != Device::kCpu) {
      return absl::InvalidArgumentError(absl::StrCat(where, "tensor is not in host memory"));
    }
    for (int64_t d : t.second.shape()) {
      if (d < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, "shape ", ShapeToString(t.second.shape()), " has a negative dimension"));
      }
    }
    if (t.second.numel() > 0 && t.second.raw() == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(where, "tensor has no data"));
    }
    sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const auto* a, const auto* b) { return a->first < b->first; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i]->first == sorted[i - 1]->first) {
      return absl::InvalidArgumentError(
          absl::StrCat(TensorWhere(path, sorted[i]->first), "name given more than once"));
    }
  }

  json header = json::object();
  if (!metadata.empty()) {
    json meta = json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto* t : sorted) {
    const Tensor& tensor = t->second;
    json shape = json::array();
    for (int64_t d : tensor.shape()) shape.push_back(d);
    const uint64_t nbytes = tensor.nbytes();
    header[t->first] = {{"dtype", std::string(SafetensorsDTypeName(tensor.dtype()))},
                        {"shape", std::move(shape)},
                        {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  // Pad with spaces (valid JSON whitespace) so the data area starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));

  // Write to a temporary file next to the target and rename: readers (possibly mmap'ing the
  // old file) never see a half-written checkpoint.
  const std::string tmp = absl::StrCat(path, ".tmp.", static_cast<int64_t>(::getpid()));
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create '", tmp, "': ", std::strerror(errno)));
  }
  bool ok = std::fwrite(len_bytes, 1, 8, f) == 8 &&
            std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (size_t i = 0; ok && i < sorted.size(); ++i) {
    const Tensor& tensor = sorted[i]->second;
    const size_t n = tensor.nbytes();
    if (n > 0) ok = std::fwrite(tensor.raw(), 1, n, f) == n;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int write_errno = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("writing '", tmp, "' failed: ", std::strerror(write_errno)));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("renaming '", tmp, "' to '", path, "' failed: ", std::strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace qshard
