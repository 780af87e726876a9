#include "tests/test_support.h"

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <vector>

namespace qshard::testing {
namespace {

std::mutex g_mu;
std::vector<std::string>* g_temp_dirs = nullptr;

void RemoveTempDirs() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_temp_dirs == nullptr) return;
  for (const auto& d : *g_temp_dirs) {
    std::error_code ec;
    std::filesystem::remove_all(d, ec);
  }
}

}  // namespace

std::string SourceDir() { return QSHARD_SOURCE_DIR; }

std::string SharedDir() {
  if (const char* env = std::getenv("QSHARD_SHARED_DIR")) return env;
  return QSHARD_SHARED_DIR;
}

std::string SharedModel(const std::string& name) { return SharedDir() + "/models/" + name; }

std::string BinaryDir() { return QSHARD_BINARY_DIR; }

nlohmann::json LoadReference(const std::string& model_dir) {
  std::ifstream in(model_dir + "/reference.json");
  if (!in) return nlohmann::json();
  return nlohmann::json::parse(in);
}

std::string MakeTempDir(const std::string& prefix) {
  std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* d = mkdtemp(buf.data());
  std::string dir = d ? d : "";
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_temp_dirs == nullptr) {
    g_temp_dirs = new std::vector<std::string>();
    std::atexit(RemoveTempDirs);
  }
  g_temp_dirs->push_back(dir);
  return dir;
}

std::string TestName(std::string text) {
  for (char& ch : text) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return text;
}

}  // namespace qshard::testing
