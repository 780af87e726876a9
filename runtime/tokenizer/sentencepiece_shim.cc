// File: sentencepiece_shim.cc
// Keep abseil headers out of this file (see sentencepiece_shim.h).
#include "runtime/tokenizer/sentencepiece_shim.h"

#include <sentencepiece_processor.h>

#include <utility>

namespace qshard::internal {

std::unique_ptr<SentencePieceShim> SentencePieceShim::Load(const std::string& path,
                                                           std::string* error) {
  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  sentencepiece::util::Status status = sp->Load(path);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  // An empty but well-formed proto can load; nothing downstream can work with it.
  if (sp->GetPieceSize() <= 0) {
    *error = "the model has an empty vocabulary";
    return nullptr;
  }
  return std::unique_ptr<SentencePieceShim>(new SentencePieceShim(std::move(sp)));
}

SentencePieceShim::SentencePieceShim(std::unique_ptr<sentencepiece::SentencePieceProcessor> sp)
    : sp_(std::move(sp)) {}

SentencePieceShim::~SentencePieceShim() = default;

bool SentencePieceShim::Encode(std::string_view text, std::vector<int>* ids,
                               std::string* error) const {
  sentencepiece::util::Status status = sp_->Encode(text, ids);
  if (!status.ok()) {
    *error = status.ToString();
    return false;
  }
  return true;
}

bool SentencePieceShim::Decode(const std::vector<int>& ids, std::string* text,
                               std::string* error) const {
  sentencepiece::util::Status status = sp_->Decode(ids, text);
  if (!status.ok()) {
    *error = status.ToString();
    return false;
  }
  return true;
}

int SentencePieceShim::size() const { return sp_->GetPieceSize(); }

int SentencePieceShim::PieceToId(std::string_view piece) const {
  int id = sp_->PieceToId(piece);
  // SentencePiece maps unknown pieces to unk_id; tell that apart from "<unk>" itself.
  if (id < 0 || id >= sp_->GetPieceSize() || sp_->IdToPiece(id) != piece) return -1;
  return id;
}

std::string SentencePieceShim::IdToPiece(int id) const {
  if (id < 0 || id >= sp_->GetPieceSize()) return std::string();
  return sp_->IdToPiece(id);
}

bool SentencePieceShim::IsControl(int id) const {
  return id >= 0 && id < sp_->GetPieceSize() && sp_->IsControl(id);
}

int SentencePieceShim::bos_id() const { return sp_->bos_id(); }
int SentencePieceShim::eos_id() const { return sp_->eos_id(); }
int SentencePieceShim::unk_id() const { return sp_->unk_id(); }
int SentencePieceShim::pad_id() const { return sp_->pad_id(); }

}  // namespace qshard::internal
