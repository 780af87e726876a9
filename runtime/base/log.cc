#include "runtime/base/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

#include "absl/strings/str_format.h"

namespace qshard {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<int> g_format{static_cast<int>(LogFormat::kText)};
std::mutex g_mu;

const char* LevelName(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarning:
      return "WARNING";
    case LogLevel::kError:
      return "ERROR";
  }
  return "?";
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  out.reserve(s.size() + 8);
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

const char* BaseName(const char* path) {
  const char* b = path;
  for (const char* p = path; *p; ++p) {
    if (*p == '/') b = p + 1;
  }
  return b;
}

}  // namespace

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel GetLogLevel() { return static_cast<LogLevel>(g_level.load()); }
void SetLogFormat(LogFormat format) { g_format = static_cast<int>(format); }

void LogLine(LogLevel level, const char* file, int line, const std::string& message) {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm;
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
  std::string out;
  if (static_cast<LogFormat>(g_format.load()) == LogFormat::kJson) {
    out = absl::StrFormat(R"({"ts":"%s.%03dZ","level":"%s","src":"%s:%d","msg":"%s"})", ts, ms,
                          LevelName(level), BaseName(file), line, JsonEscape(message));
  } else {
    out = absl::StrFormat("%s.%03dZ %s %s:%d] %s", ts, ms, LevelName(level), BaseName(file), line,
                          message);
  }
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "%s\n", out.c_str());
}

}  // namespace qshard
