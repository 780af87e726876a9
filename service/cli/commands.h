// File: commands.h
// Entry points of the `qshard` subcommands that need no gRPC (the engine CLI), and the
// flags they share.
#ifndef QSHARD_SERVICE_CLI_COMMANDS_H_
#define QSHARD_SERVICE_CLI_COMMANDS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/engine/engine.h"
#include "service/cli/flags.h"

namespace qshard {

// Flags every model-running subcommand takes (--model, --device, KV cache sizing).
struct EngineFlags {
  std::string model;
  std::string device = "auto";
  std::string kv_cache_dtype = "auto";
  int64_t kv_cache_memory_bytes = 0;
  int64_t max_model_len = 0;
  int64_t block_size = 16;
  int64_t max_num_seqs = 64;
  int64_t max_num_batched_tokens = 2048;
  bool enable_prefix_caching = true;
  bool calculate_kv_scales = false;
  std::string quantization = "auto";
  bool weight_only_activations = false;
  bool fuse_projections = true;
  double gpu_memory_utilization = 0.9;
  std::string log_level = "info";
  // Whether Register marks --model required (bench: not with --load-format dummy).
  bool model_required = true;

  // with_batching: also the scheduler flags (serve).
  void Register(FlagSet& flags, bool with_batching);
  absl::StatusOr<EngineOptions> ToOptions() const;
};

// Applies --log-level (debug|info|warning|error); the error names the flag.
absl::Status ApplyLogLevel(const std::string& level);
// Prints "qshard <cmd>: <message>" to stderr; returns the exit code 1, or 0 for --help.
int ReportFlagError(const std::string& command, const absl::Status& status);

int GenerateMain(int argc, char** argv);
int EvalPplMain(int argc, char** argv);
int InspectMain(int argc, char** argv);
int BenchMain(int argc, char** argv);
int PlanMain(int argc, char** argv);
int QuantizeMain(int argc, char** argv);

}  // namespace qshard

#endif  // QSHARD_SERVICE_CLI_COMMANDS_H_
