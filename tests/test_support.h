// File: test_support.h
// Paths to fixtures and small helpers shared by the tests.
#ifndef QSHARD_TESTS_TEST_SUPPORT_H_
#define QSHARD_TESTS_TEST_SUPPORT_H_

#include <string>

#include "nlohmann/json.hpp"

namespace qshard::testing {

// The repository root (for models/kjv-llama-12m, the embedded default model).
std::string SourceDir();
// ../shared (QSHARD_SHARED_DIR env var overrides the configured path).
std::string SharedDir();
// SharedDir() + "/models/" + name.
std::string SharedModel(const std::string& name);
// The build directory (for build/bin/qshard in CLI tests).
std::string BinaryDir();
// Parsed <model dir>/reference.json.
nlohmann::json LoadReference(const std::string& model_dir);
// A fresh empty temporary directory, removed at process exit.
std::string MakeTempDir(const std::string& prefix);
// `text` with every character that is not a letter or digit replaced by '_': a valid
// gtest parameterized-test name ("gptq-4bit" -> "gptq_4bit").
std::string TestName(std::string text);

}  // namespace qshard::testing

#endif  // QSHARD_TESTS_TEST_SUPPORT_H_
