// File: request_translation.h
// The RPC edge: checks a qshard.v1.GenerateRequest field by field and turns it into an
// engine Request, and maps engine results back to proto / gRPC terms. Every rejection is
// InvalidArgument with a message that names the proto field and the allowed range.
#ifndef QSHARD_SERVICE_SERVER_REQUEST_TRANSLATION_H_
#define QSHARD_SERVICE_SERVER_REQUEST_TRANSLATION_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "qshard/v1/qshard.pb.h"
#include "runtime/engine/engine.h"
#include "runtime/tokenizer/tokenizer.h"

namespace qshard {

// Bounds on what one request may carry (besides those ValidateSamplingParams enforces).
inline constexpr size_t kMaxRequestIdBytes = 256;
inline constexpr size_t kMaxTextBytes = 1 << 20;  // 1 MiB of prompt text
inline constexpr int32_t kDefaultMaxTokens = 256;

struct TranslationLimits {
  int32_t vocab_size = 0;
  int64_t max_model_len = 0;  // prompt + generated tokens
};

// Validates `proto` and builds the engine request (tokenizing text input). The request id
// is copied as given (the caller assigns one when it is empty).
absl::StatusOr<Request> TranslateGenerateRequest(const v1::GenerateRequest& proto,
                                                 const Tokenizer& tokenizer,
                                                 const TranslationLimits& limits);

// Proto SamplingParams -> engine SamplingParams with the documented defaults, range-checked;
// messages name the field as "sampling.<field>".
absl::StatusOr<SamplingParams> TranslateSamplingParams(const v1::SamplingParams& proto,
                                                       int32_t vocab_size);

v1::FinishReason ToProtoFinishReason(FinishReason reason);

// Same canonical code and message (absl and gRPC codes share their numbering).
grpc::Status ToGrpcStatus(const absl::Status& status);

// "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", ... (the metric label and loadgen's report).
std::string StatusCodeName(grpc::StatusCode code);

}  // namespace qshard

#endif  // QSHARD_SERVICE_SERVER_REQUEST_TRANSLATION_H_
