// File: sentencepiece_tokenizer.cc
#include "runtime/tokenizer/sentencepiece_tokenizer.h"

#include <charconv>
#include <filesystem>
#include <optional>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/base/log.h"
#include "runtime/base/mapped_file.h"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

using nlohmann::json;

// A token entry in tokenizer_config.json is either the token text or an AddedToken
// object {"content": ..., ...}. nullopt when the entry is absent, null or of another shape.
std::optional<std::string> TokenContent(const json& config, const std::string& key) {
  auto it = config.find(key);
  if (it == config.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) return content->get<std::string>();
  }
  return std::nullopt;
}

// Reads an optional boolean; null counts as absent. The checks keep nlohmann from
// throwing on a value of the wrong type.
absl::StatusOr<bool> BoolField(const json& config, const std::string& key, bool default_value,
                               const std::string& path) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return default_value;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "': \"", key, "\" must be true or false"));
  }
  return it->get<bool>();
}

struct TokenizerConfig {
  bool add_bos = true;
  bool add_eos = false;
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<std::string> unk_token;
  std::optional<std::string> pad_token;
  std::vector<std::string> extra_special_tokens;  // additional_special_tokens
  std::vector<int32_t> added_special_ids;         // added_tokens_decoder, special: true
};

absl::StatusOr<TokenizerConfig> ParseConfig(const std::string& path) {
  QSHARD_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  json config = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "' is not a JSON object (expected a tokenizer_config.json)"));
  }
  TokenizerConfig out;
  QSHARD_ASSIGN_OR_RETURN(out.add_bos, BoolField(config, "add_bos_token", true, path));
  QSHARD_ASSIGN_OR_RETURN(out.add_eos, BoolField(config, "add_eos_token", false, path));
  out.bos_token = TokenContent(config, "bos_token");
  out.eos_token = TokenContent(config, "eos_token");
  out.unk_token = TokenContent(config, "unk_token");
  out.pad_token = TokenContent(config, "pad_token");

  auto extra = config.find("additional_special_tokens");
  if (extra != config.end() && extra->is_array()) {
    for (const json& entry : *extra) {
      if (entry.is_string()) {
        out.extra_special_tokens.push_back(entry.get<std::string>());
      } else if (entry.is_object()) {
        auto content = entry.find("content");
        if (content != entry.end() && content->is_string()) {
          out.extra_special_tokens.push_back(content->get<std::string>());
        }
      }
    }
  }

  auto added = config.find("added_tokens_decoder");
  if (added != config.end() && added->is_object()) {
    for (auto it = added->begin(); it != added->end(); ++it) {
      const std::string& key = it.key();
      int32_t id = -1;
      auto [end, ec] = std::from_chars(key.data(), key.data() + key.size(), id);
      if (ec != std::errc() || end != key.data() + key.size() || id < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("'", path, "': added_tokens_decoder key \"", key, "\" is not a token id"));
      }
      const json& entry = it.value();
      if (!entry.is_object()) continue;
      auto special = entry.find("special");
      if (special != entry.end() && special->is_boolean() && special->get<bool>()) {
        out.added_special_ids.push_back(id);
      }
    }
  }
  return out;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(std::unique_ptr<internal::SentencePieceShim> sp)
    : sp_(std::move(sp)),
      vocab_size_(sp_->size()),
      bos_id_(sp_->bos_id()),
      eos_id_(sp_->eos_id()),
      unk_id_(sp_->unk_id()),
      pad_id_(sp_->pad_id()),
      special_(static_cast<size_t>(vocab_size_), false) {}

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(
    const std::string& dir) {
  const std::string model_path = (std::filesystem::path(dir) / "tokenizer.model").string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_path, ec)) {
    return absl::NotFoundError(absl::StrCat("no tokenizer at '", model_path,
                                            "': a SentencePiece tokenizer.model is expected"));
  }
  std::string error;
  std::unique_ptr<internal::SentencePieceShim> sp =
      internal::SentencePieceShim::Load(model_path, &error);
  if (sp == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", model_path, "' is not a valid SentencePiece tokenizer.model: ", error));
  }
  std::unique_ptr<SentencePieceTokenizer> tok(new SentencePieceTokenizer(std::move(sp)));

  const std::string config_path = (std::filesystem::path(dir) / "tokenizer_config.json").string();
  if (std::filesystem::exists(config_path, ec)) {
    QSHARD_ASSIGN_OR_RETURN(TokenizerConfig config, ParseConfig(config_path));
    tok->add_bos_ = config.add_bos;
    tok->add_eos_ = config.add_eos;
    // Names the config gives win over the model's own ids; a name missing from the
    // vocabulary keeps the model's id, since the ids the model was trained on are what
    // generation will produce.
    auto resolve = [&](const std::optional<std::string>& name, const char* what, int32_t* id) {
      if (!name.has_value()) return;
      int found = tok->sp_->PieceToId(*name);
      if (found >= 0) {
        *id = found;
      } else {
        QSHARD_LOG(WARNING) << config_path << ": " << what << " \"" << *name
                            << "\" is not in the SentencePiece vocabulary; using id " << *id;
      }
    };
    resolve(config.bos_token, "bos_token", &tok->bos_id_);
    resolve(config.eos_token, "eos_token", &tok->eos_id_);
    resolve(config.unk_token, "unk_token", &tok->unk_id_);
    resolve(config.pad_token, "pad_token", &tok->pad_id_);
    for (const std::string& name : config.extra_special_tokens) {
      int found = tok->sp_->PieceToId(name);
      if (found >= 0) tok->special_[static_cast<size_t>(found)] = true;
    }
    for (int32_t id : config.added_special_ids) {
      // Tokens added beyond the SentencePiece vocabulary cannot be decoded here anyway.
      if (id < tok->vocab_size_) tok->special_[static_cast<size_t>(id)] = true;
    }
  }

  for (int32_t id : {tok->bos_id_, tok->eos_id_, tok->unk_id_, tok->pad_id_}) {
    if (id >= 0 && id < tok->vocab_size_) tok->special_[static_cast<size_t>(id)] = true;
  }
  for (int32_t id = 0; id < tok->vocab_size_; ++id) {
    if (tok->sp_->IsControl(id)) tok->special_[static_cast<size_t>(id)] = true;
  }
  return tok;
}

std::vector<int32_t> SentencePieceTokenizer::Encode(std::string_view text, bool add_special) const {
  std::vector<int> pieces;
  std::string error;
  if (!sp_->Encode(text, &pieces, &error)) {
    QSHARD_LOG(ERROR) << "SentencePiece encode failed: " << error;
    pieces.clear();
  }
  std::vector<int32_t> ids;
  ids.reserve(pieces.size() + 2);
  if (add_special && add_bos_ && bos_id_ >= 0) ids.push_back(bos_id_);
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (add_special && add_eos_ && eos_id_ >= 0) ids.push_back(eos_id_);
  return ids;
}

void SentencePieceTokenizer::DecodeRun(const std::vector<int>& run, std::string* out) const {
  if (run.empty()) return;
  std::string text;
  std::string error;
  if (!sp_->Decode(run, &text, &error)) {
    QSHARD_LOG(ERROR) << "SentencePiece decode failed: " << error;
    return;
  }
  out->append(text);
}

std::string SentencePieceTokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special) const {
  std::string out;
  std::vector<int> run;
  run.reserve(ids.size());
  for (int32_t id : ids) {
    // An id outside the vocabulary has no text; dropping it beats failing the whole
    // decode (SentencePiece would reject the entire sequence).
    if (id < 0 || id >= vocab_size_) continue;
    if (special_[static_cast<size_t>(id)]) {
      if (skip_special) continue;
      DecodeRun(run, &out);
      run.clear();
      out.append(sp_->IdToPiece(id));
      continue;
    }
    run.push_back(id);
  }
  DecodeRun(run, &out);
  return out;
}

std::string SentencePieceTokenizer::IdToPiece(int32_t id) const { return sp_->IdToPiece(id); }

bool SentencePieceTokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size_ && special_[static_cast<size_t>(id)];
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir) {
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<SentencePieceTokenizer> tok,
                          SentencePieceTokenizer::Load(dir));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace qshard
