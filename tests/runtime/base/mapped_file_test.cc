// ReleaseMappedPages: drops the resident pages of a mapped file's range (the process's
// RssFile shrinks) without changing what the mapping reads, and leaves any other memory
// alone.
#include "runtime/base/mapped_file.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

// A /proc/self/status field in KiB (RssFile, RssAnon); -1 when absent.
int64_t StatusKib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(field) + ":";
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0) return std::stoll(line.substr(prefix.size()));
  }
  return -1;
}

TEST(MappedFileTest, ReleaseMappedPagesDropsResidentFilePagesButKeepsContents) {
  constexpr size_t kBytes = size_t{16} << 20;
  const std::string path = ::qshard::testing::MakeTempDir("qshard-mapped") + "/data.bin";
  std::vector<uint8_t> want(kBytes);
  for (size_t i = 0; i < kBytes; ++i) want[i] = static_cast<uint8_t>(i * 131 + (i >> 12));
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(want.data()), static_cast<std::streamsize>(kBytes));
  }
  auto file = MappedFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const uint8_t* p = (*file)->data();
  uint64_t sum = 0;
  for (size_t i = 0; i < kBytes; i += 4096) sum += p[i];  // fault every page in
  const int64_t before = StatusKib("RssFile");
  ReleaseMappedPages(p, kBytes);
  const int64_t after = StatusKib("RssFile");
#ifdef MADV_PAGEOUT
  if (before >= 0 && after >= 0) {
    // Most of the 16 MiB leaves the resident set (the kernel may keep a few pages).
    EXPECT_LT(after, before - 8 * 1024) << "RssFile " << before << " KiB -> " << after << " KiB";
  }
#endif
  EXPECT_EQ(std::memcmp(p, want.data(), kBytes), 0) << "released pages must read back the same";
  EXPECT_GT(sum, 0u);

  // Heap memory is not a mapped file: untouched (MADV_DONTNEED there would zero it).
  std::vector<uint8_t> heap(want);
  ReleaseMappedPages(heap.data(), heap.size());
  EXPECT_EQ(heap, want);
  // A range running past the end of the mapping is left alone too (no crash).
  ReleaseMappedPages(p + kBytes - 4096, 8192);
  ReleaseMappedPages(nullptr, 0);
}

}  // namespace
}  // namespace qshard
