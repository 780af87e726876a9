// File: flags.h
// A small per-subcommand flag parser: `--name value` or `--name=value`, typed values,
// --help, and an error for every unknown flag or malformed value.
//
//   FlagSet flags("qshard generate", "Generate text from a prompt.");
//   std::string model;
//   flags.AddString("model", &model, "model directory", /*required=*/true);
//   if (auto st = flags.Parse(argc, argv); !st.ok()) ...
#ifndef QSHARD_SERVICE_CLI_FLAGS_H_
#define QSHARD_SERVICE_CLI_FLAGS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace qshard {

class FlagSet {
 public:
  FlagSet(std::string command, std::string description)
      : command_(std::move(command)), description_(std::move(description)) {}

  void AddString(const std::string& name, std::string* value, const std::string& help,
                 bool required = false);
  void AddInt(const std::string& name, int64_t* value, const std::string& help,
              bool required = false);
  void AddDouble(const std::string& name, double* value, const std::string& help);
  void AddBool(const std::string& name, bool* value, const std::string& help);
  // A flag whose presence matters even with the default value (e.g. --seed).
  void AddOptionalInt(const std::string& name, std::optional<int64_t>* value,
                      const std::string& help);
  // Byte sizes accept suffixes: 512M, 2G, 1.5GiB.
  void AddBytes(const std::string& name, int64_t* value, const std::string& help);

  // Parses argv[first..argc). Returns kCancelled after printing usage for --help
  // (callers exit 0); InvalidArgument naming the flag for any other problem.
  absl::Status Parse(int argc, char** argv, int first = 2);
  std::string Usage() const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  struct Flag {
    std::string name;
    std::string help;
    std::string default_text;
    bool required = false;
    bool is_bool = false;
    bool seen = false;
    std::function<absl::Status(const std::string&)> set;
  };
  Flag* Find(const std::string& name);

  std::string command_;
  std::string description_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
};

// Parses "512M", "2GiB", "1073741824" into bytes.
absl::Status ParseByteSize(const std::string& text, int64_t* out);

}  // namespace qshard

#endif  // QSHARD_SERVICE_CLI_FLAGS_H_
