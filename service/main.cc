// The `qshard` executable: one binary, one subcommand per task.
#include <cstdio>
#include <cstring>
#include <string>

#include "service/cli/commands.h"

#if defined(QSHARD_WITH_SERVICE)
#include "service/server/server_commands.h"
#endif

namespace {

struct Command {
  const char* name;
  int (*main)(int, char**);
  const char* help;
};

const Command kCommands[] = {
#if defined(QSHARD_WITH_SERVICE)
    {"serve", qshard::ServeMain, "serve the model over gRPC (+ Prometheus metrics)"},
    {"health", qshard::HealthMain, "check a server's grpc.health.v1 status (exit 0 = SERVING)"},
    {"loadgen", qshard::LoadgenMain, "bounded load generator against a server"},
#endif
    {"generate", qshard::GenerateMain, "generate text from a prompt (stdout: the text)"},
    {"eval-ppl", qshard::EvalPplMain, "perplexity of a text file"},
    {"inspect", qshard::InspectMain, "describe a model directory"},
    {"bench", qshard::BenchMain, "prefill / decode throughput benchmark"},
    {"quantize", qshard::QuantizeMain, "write a GPTQ / AWQ / RTN / FP8 / INT8 checkpoint"},
    {"plan", qshard::PlanMain, "memory plan: weights + KV cache + activations vs device memory"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: qshard <command> [flags]   (qshard <command> --help for flags)\n\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-10s %s\n", c.name, c.help);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return 1;
  }
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    PrintUsage(stdout);
    return 0;
  }
  for (const auto& c : kCommands) {
    if (cmd == c.name) return c.main(argc, argv);
  }
  std::fprintf(stderr, "qshard: unknown command '%s'\n\n", cmd.c_str());
  PrintUsage(stderr);
  return 1;
}
