// File: tokenizer.h
// Text <-> token ids, behind an interface so a second implementation (HF tokenizer.json)
// can plug in later. The SentencePiece implementation honours tokenizer_config.json.
//
//   QSHARD_ASSIGN_OR_RETURN(auto tok, LoadTokenizer("models/kjv-llama-12m"));
//   std::vector<int32_t> ids = tok->Encode("In the beginning", /*add_special=*/true);
#ifndef QSHARD_RUNTIME_TOKENIZER_TOKENIZER_H_
#define QSHARD_RUNTIME_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace qshard {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // add_special: prepend BOS / append EOS as tokenizer_config.json's add_bos_token /
  // add_eos_token say (defaults: BOS yes, EOS no).
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_special) const = 0;
  // Special tokens (BOS/EOS/UNK/PAD and added special tokens) are skipped when asked.
  virtual std::string Decode(absl::Span<const int32_t> ids, bool skip_special = true) const = 0;
  virtual std::string IdToPiece(int32_t id) const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when none
  virtual int32_t eos_id() const = 0;  // -1 when none
  virtual bool IsSpecial(int32_t id) const = 0;
};

// Loads dir/tokenizer.model (SentencePiece) with dir/tokenizer_config.json when present.
// A missing tokenizer.model is a NotFound error naming the path.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir);

// Streaming detokenization: feed generated ids one at a time, get text deltas whose
// concatenation equals Decode(prompt + generated) minus Decode(prompt) (so the leading
// space of the first generated word is kept), never splitting a UTF-8 sequence.
class IncrementalDetokenizer {
 public:
  // prompt_ids gives context for the first tokens' leading-space handling (only the last
  // few are used).
  IncrementalDetokenizer(const Tokenizer& tokenizer, absl::Span<const int32_t> prompt_ids);
  // Returns the new text made complete by this token (possibly empty).
  std::string Step(int32_t id);
  // Returns whatever is still held back (e.g. an incomplete UTF-8 tail) at the end.
  std::string Flush();
  // All text emitted so far.
  const std::string& text() const { return text_; }

 private:
  const Tokenizer& tokenizer_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
  std::string text_;
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_TOKENIZER_TOKENIZER_H_
