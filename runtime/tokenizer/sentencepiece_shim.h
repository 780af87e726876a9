// File: sentencepiece_shim.h
// A std-only facade over sentencepiece::SentencePieceProcessor.
//
// It exists because <sentencepiece_processor.h> declares
// `namespace absl { using std::string_view; }`, which clashes with Debian's abseil (there
// absl::string_view is its own class). Only sentencepiece_shim.cc includes the
// SentencePiece header, and this header names no abseil type, so every other file can use
// abseil freely.
#ifndef QSHARD_RUNTIME_TOKENIZER_SENTENCEPIECE_SHIM_H_
#define QSHARD_RUNTIME_TOKENIZER_SENTENCEPIECE_SHIM_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace qshard::internal {

class SentencePieceShim {
 public:
  // Parses a serialized SentencePiece model file. Returns nullptr and sets *error (the
  // library's message) when the file cannot be read or is not a usable model.
  static std::unique_ptr<SentencePieceShim> Load(const std::string& path, std::string* error);

  ~SentencePieceShim();
  SentencePieceShim(const SentencePieceShim&) = delete;
  SentencePieceShim& operator=(const SentencePieceShim&) = delete;

  // Returns false (with *error set) only on an internal SentencePiece failure.
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const;
  // Every id must be in [0, size()).
  bool Decode(const std::vector<int>& ids, std::string* text, std::string* error) const;

  int size() const;
  // -1 when the piece is not in the vocabulary (SentencePiece itself answers unk_id).
  int PieceToId(std::string_view piece) const;
  // Empty for an id outside [0, size()).
  std::string IdToPiece(int id) const;
  bool IsControl(int id) const;
  int bos_id() const;  // -1 when the model has none
  int eos_id() const;
  int unk_id() const;
  int pad_id() const;

 private:
  explicit SentencePieceShim(std::unique_ptr<sentencepiece::SentencePieceProcessor> sp);

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace qshard::internal

#endif  // QSHARD_RUNTIME_TOKENIZER_SENTENCEPIECE_SHIM_H_
