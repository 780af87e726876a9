// File: sentencepiece_tokenizer.h
// Tokenizer over a SentencePiece tokenizer.model, configured by the Hugging Face
// tokenizer_config.json that sits next to it (add_bos_token / add_eos_token, special-token
// names, added_tokens_decoder).
//
//   QSHARD_ASSIGN_OR_RETURN(auto tok, SentencePieceTokenizer::Load("models/kjv-llama-12m"));
#ifndef QSHARD_RUNTIME_TOKENIZER_SENTENCEPIECE_TOKENIZER_H_
#define QSHARD_RUNTIME_TOKENIZER_SENTENCEPIECE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/tokenizer/sentencepiece_shim.h"
#include "runtime/tokenizer/tokenizer.h"

namespace qshard {

class SentencePieceTokenizer : public Tokenizer {
 public:
  // Reads dir/tokenizer.model (NotFound when missing, InvalidArgument when unusable) and
  // dir/tokenizer_config.json when present (InvalidArgument when malformed).
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Load(const std::string& dir);

  // Text is tokenized as plain text: special-token strings such as "</s>" inside it are
  // not turned into control ids, so user input cannot inject them.
  std::vector<int32_t> Encode(std::string_view text, bool add_special) const override;
  // With skip_special false, special tokens are rendered as their piece text ("<s>"),
  // and each run of ordinary tokens between them is decoded on its own, as the Hugging
  // Face LlamaTokenizer does.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special = true) const override;
  std::string IdToPiece(int32_t id) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  bool IsSpecial(int32_t id) const override;

  int32_t unk_id() const { return unk_id_; }
  int32_t pad_id() const { return pad_id_; }  // -1 when none
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }

 private:
  explicit SentencePieceTokenizer(std::unique_ptr<internal::SentencePieceShim> sp);

  // Decodes ordinary (in-range, non-special) ids; appends to *out.
  void DecodeRun(const std::vector<int>& run, std::string* out) const;

  std::unique_ptr<internal::SentencePieceShim> sp_;
  int32_t vocab_size_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t unk_id_ = -1;
  int32_t pad_id_ = -1;
  bool add_bos_ = true;
  bool add_eos_ = false;
  std::vector<bool> special_;  // indexed by id, vocab_size_ entries
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_TOKENIZER_SENTENCEPIECE_TOKENIZER_H_
