// File: status_macros.h
// Early-return helpers for absl::Status / absl::StatusOr.
//
//   QSHARD_RETURN_IF_ERROR(file.Validate());
//   QSHARD_ASSIGN_OR_RETURN(auto cfg, LoadConfig(dir));
#ifndef QSHARD_RUNTIME_BASE_STATUS_MACROS_H_
#define QSHARD_RUNTIME_BASE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define QSHARD_RETURN_IF_ERROR(expr)               \
  do {                                             \
    ::absl::Status qshard_status_ = (expr);        \
    if (!qshard_status_.ok()) return qshard_status_; \
  } while (0)

#define QSHARD_CONCAT_INNER_(a, b) a##b
#define QSHARD_CONCAT_(a, b) QSHARD_CONCAT_INNER_(a, b)

#define QSHARD_ASSIGN_OR_RETURN(lhs, expr) \
  QSHARD_ASSIGN_OR_RETURN_IMPL_(QSHARD_CONCAT_(qshard_statusor_, __LINE__), lhs, expr)

#define QSHARD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return std::move(tmp).status();      \
  lhs = std::move(tmp).value()

#endif  // QSHARD_RUNTIME_BASE_STATUS_MACROS_H_
