#include "service/server/request_translation.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace qshard {
namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

}  // namespace

absl::StatusOr<SamplingParams> TranslateSamplingParams(const v1::SamplingParams& proto,
                                                       int32_t vocab_size) {
  SamplingParams p;
  if (proto.has_temperature()) p.temperature = proto.temperature();
  // The engine also accepts -1 for "off"; the API has one spelling (0) so that clients of
  // other servers are not surprised by a negative value meaning something.
  if (proto.top_k() < 0) {
    return Invalid(absl::StrCat("sampling.top_k must be >= 0 (0 = off), got ", proto.top_k()));
  }
  p.top_k = proto.top_k();
  if (proto.has_top_p()) p.top_p = proto.top_p();
  p.min_p = proto.min_p();
  if (proto.has_repetition_penalty()) p.repetition_penalty = proto.repetition_penalty();
  p.presence_penalty = proto.presence_penalty();
  p.frequency_penalty = proto.frequency_penalty();
  if (proto.has_seed()) p.seed = proto.seed();
  p.max_tokens = proto.has_max_tokens() ? proto.max_tokens() : kDefaultMaxTokens;
  p.min_tokens = proto.min_tokens();
  p.stop.assign(proto.stop().begin(), proto.stop().end());
  p.stop_token_ids.assign(proto.stop_token_ids().begin(), proto.stop_token_ids().end());
  p.ignore_eos = proto.ignore_eos();
  p.logprobs = proto.logprobs();
  // The engine's checks name the bare field and its range; prefix the message's path so
  // it reads as the proto field the client set.
  if (absl::Status st = ValidateSamplingParams(p, vocab_size); !st.ok()) {
    return Invalid(absl::StrCat("sampling.", std::string(st.message())));
  }
  return p;
}

absl::StatusOr<Request> TranslateGenerateRequest(const v1::GenerateRequest& proto,
                                                 const Tokenizer& tokenizer,
                                                 const TranslationLimits& limits) {
  if (proto.request_id().size() > kMaxRequestIdBytes) {
    return Invalid(absl::StrCat("request_id must be at most ", kMaxRequestIdBytes, " bytes, got ",
                                proto.request_id().size()));
  }
  Request req;
  req.id = proto.request_id();
  switch (proto.input_case()) {
    case v1::GenerateRequest::kText: {
      const std::string& text = proto.text();
      if (text.empty()) return Invalid("text: the input text is empty");
      if (text.size() > kMaxTextBytes) {
        return Invalid(
            absl::StrCat("text must be at most ", kMaxTextBytes, " bytes, got ", text.size()));
      }
      const bool add_special = !proto.has_add_special_tokens() || proto.add_special_tokens();
      req.prompt = tokenizer.Encode(text, add_special);
      if (req.prompt.empty()) return Invalid("text: the input encodes to no tokens");
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = proto.token_ids().ids();
      if (ids.empty()) return Invalid("token_ids.ids: the input token list is empty");
      // Bound the work before looking at each id: anything this long is rejected below.
      if (static_cast<int64_t>(ids.size()) >= limits.max_model_len) break;
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= limits.vocab_size) {
          return Invalid(absl::StrCat("token_ids.ids[", i, "] must be in [0, ", limits.vocab_size,
                                      "), got ", ids[i]));
        }
      }
      req.prompt.assign(ids.begin(), ids.end());
      break;
    }
    case v1::GenerateRequest::INPUT_NOT_SET:
      return Invalid("input: set either text or token_ids");
  }
  const int64_t prompt_len = proto.input_case() == v1::GenerateRequest::kTokenIds
                                 ? proto.token_ids().ids_size()
                                 : static_cast<int64_t>(req.prompt.size());
  if (prompt_len >= limits.max_model_len) {
    return Invalid(absl::StrCat(
        proto.input_case() == v1::GenerateRequest::kText ? "text" : "token_ids",
        ": the prompt has ", prompt_len, " tokens but the context length is ", limits.max_model_len,
        " (the prompt must be shorter, to leave room for output)"));
  }
  auto params = TranslateSamplingParams(proto.sampling(), limits.vocab_size);
  if (!params.ok()) return params.status();
  req.params = *std::move(params);
  return req;
}

v1::FinishReason ToProtoFinishReason(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kAbort:
      return v1::FINISH_REASON_ABORT;
    case FinishReason::kNone:
    case FinishReason::kError:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

std::string StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      break;
  }
  return absl::StrCat("CODE_", static_cast<int>(code));
}

}  // namespace qshard
