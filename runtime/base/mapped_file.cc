#include "runtime/base/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace qshard {
namespace {

// Address ranges [begin, end) of the live mappings, keyed by begin, for ReleaseMappedPages.
std::mutex& MappingsMutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}
std::map<uintptr_t, uintptr_t>& Mappings() {
  static auto* m = new std::map<uintptr_t, uintptr_t>();
  return *m;
}

}  // namespace

absl::StatusOr<std::shared_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    std::string msg = absl::StrCat("cannot open '", path, "': ", std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is not a regular file"));
  }
  size_t size = static_cast<size_t>(st.st_size);
  const uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("mmap of '", path, "' failed: ", std::strerror(err)));
    }
    data = static_cast<const uint8_t*>(p);
    std::lock_guard<std::mutex> lock(MappingsMutex());
    Mappings()[reinterpret_cast<uintptr_t>(p)] = reinterpret_cast<uintptr_t>(p) + size;
  }
  ::close(fd);
  return std::shared_ptr<MappedFile>(new MappedFile(path, data, size));
}

MappedFile::~MappedFile() {
  if (data_ == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(MappingsMutex());
    Mappings().erase(reinterpret_cast<uintptr_t>(data_));
  }
  ::munmap(const_cast<uint8_t*>(data_), size_);
}

bool ReleaseMappedPages(const void* data, size_t bytes) {
  if (data == nullptr || bytes == 0) return false;
  const uintptr_t first = reinterpret_cast<uintptr_t>(data);
  const uintptr_t last = first + bytes;
  {
    std::lock_guard<std::mutex> lock(MappingsMutex());
    const auto& m = Mappings();
    auto it = m.upper_bound(first);  // the first mapping starting after `first`
    if (it == m.begin()) return false;
    --it;
    if (last > it->second) return false;  // not (entirely) inside one mapping
  }
#ifdef MADV_PAGEOUT
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (first + page - 1) / page * page;
  const uintptr_t end = last / page * page;
  // MADV_PAGEOUT keeps the contents: clean file pages are re-read when touched again.
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
#endif
  return true;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open '", path, "'"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace qshard
