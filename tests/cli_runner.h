// File: cli_runner.h
// Runs build/bin/qshard as a subprocess and captures its exit status and output.
#ifndef QSHARD_TESTS_CLI_RUNNER_H_
#define QSHARD_TESTS_CLI_RUNNER_H_

#include <string>
#include <vector>

namespace qshard::testing {

struct CliResult {
  int exit_code = -1;   // valid when !signaled
  bool signaled = false;  // killed by a signal (a crash)
  int signal = 0;
  std::string out;
  std::string err;
};

// Path of the qshard binary of this build tree.
std::string QshardBinary();
// Runs `qshard args...` (no shell), with stdout/stderr captured.
CliResult RunQshard(const std::vector<std::string>& args);
// The value of the last "perplexity: X" line of `qshard eval-ppl` output, -1 when absent.
double LastPerplexity(const std::string& out);

}  // namespace qshard::testing

#endif  // QSHARD_TESTS_CLI_RUNNER_H_
