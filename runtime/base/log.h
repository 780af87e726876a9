// File: log.h
// Minimal leveled logger to stderr, text or JSON lines (for log collectors in Kubernetes).
//
//   QSHARD_LOG(INFO) << "loaded " << n << " tensors";
#ifndef QSHARD_RUNTIME_BASE_LOG_H_
#define QSHARD_RUNTIME_BASE_LOG_H_

#include <sstream>
#include <string>

namespace qshard {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class LogFormat { kText, kJson };

void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
void SetLogFormat(LogFormat format);
// Writes one log line (thread-safe).
void LogLine(LogLevel level, const char* file, int line, const std::string& message);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line) : level_(level), file_(file), line_(line) {}
  ~LogMessage() { LogLine(level_, file_, line_, stream_.str()); }
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

}  // namespace qshard

#define QSHARD_LOG_LEVEL_DEBUG ::qshard::LogLevel::kDebug
#define QSHARD_LOG_LEVEL_INFO ::qshard::LogLevel::kInfo
#define QSHARD_LOG_LEVEL_WARNING ::qshard::LogLevel::kWarning
#define QSHARD_LOG_LEVEL_ERROR ::qshard::LogLevel::kError
#define QSHARD_LOG(level)                                             \
  if (QSHARD_LOG_LEVEL_##level < ::qshard::GetLogLevel()) {          \
  } else                                                              \
    ::qshard::LogMessage(QSHARD_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#endif  // QSHARD_RUNTIME_BASE_LOG_H_
