#include "quant/concat_weights.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "quant/dense_linalg.h"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

// The tensor fields of LinearWeights, with their names for errors.
struct TensorField {
  Tensor LinearWeights::*member;
  const char* name;
};
constexpr TensorField kTensorFields[] = {
    {&LinearWeights::weight, "weight"},
    {&LinearWeights::bias, "bias"},
    {&LinearWeights::qweight, "qweight"},
    {&LinearWeights::qzeros, "qzeros"},
    {&LinearWeights::scales, "scales"},
    {&LinearWeights::g_idx, "g_idx"},
    {&LinearWeights::weight_scale, "weight_scale"},
    {&LinearWeights::input_scale, "input_scale"},
};

std::string PartLabel(const LinearWeights& w, size_t i) {
  return absl::StrCat("part ", i, " (", w.name, ")");
}

absl::Status Mismatch(const LinearWeights& w0, const LinearWeights& wi, size_t i,
                      const std::string& what, const std::string& v0, const std::string& vi) {
  return absl::InvalidArgumentError(absl::StrCat("cannot concatenate ", PartLabel(wi, i), " with ",
                                                 PartLabel(w0, 0), ": ", what, " ", vi, " vs ",
                                                 v0));
}

// The part's tensor `field` must have exactly `shape`.
absl::Status ExpectShape(const LinearWeights& w, size_t i, const char* field, const Tensor& t,
                         const Shape& shape) {
  if (t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(PartLabel(w, i), ".", field, ": shape ",
                                                   ShapeToString(t.shape()), ", expected ",
                                                   ShapeToString(shape)));
  }
  return absl::OkStatus();
}

// Whether two tensors hold the same shape, dtype and bytes.
bool SameContents(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

// A new host tensor with t's dtype, shape and contents (empty stays empty).
Tensor Copy(const Tensor& t) {
  if (t.empty()) return Tensor();
  Tensor out = Tensor::Empty(t.dtype(), t.shape(), /*zero=*/false);
  if (t.nbytes() > 0) std::memcpy(out.raw(), t.raw(), t.nbytes());
  return out;
}

// dst[0, bytes) = src[0, bytes), threaded in 1 MiB chunks: a model's fused Linears are
// gigabytes, and first-touching the new pages costs as much as the copy.
void ParallelCopy(uint8_t* dst, const uint8_t* src, size_t bytes) {
  constexpr size_t kChunk = size_t{1} << 20;
  const int64_t chunks = static_cast<int64_t>((bytes + kChunk - 1) / kChunk);
  quant_internal::ParallelRange(chunks, 1, [&](int64_t c0, int64_t c1) {
    const size_t b = static_cast<size_t>(c0) * kChunk;
    const size_t e = std::min(bytes, static_cast<size_t>(c1) * kChunk);
    std::memcpy(dst + b, src + b, e - b);
  });
}

// Tensors of equal trailing dimensions stacked along the first: [sum(rows_i), rest...].
Tensor StackRows(const std::vector<const Tensor*>& ts) {
  Shape shape = ts[0]->shape();
  shape[0] = 0;
  for (const Tensor* t : ts) shape[0] += t->dim(0);
  Tensor out = Tensor::Empty(ts[0]->dtype(), shape, /*zero=*/false);
  uint8_t* dst = static_cast<uint8_t*>(out.raw());
  for (const Tensor* t : ts) {
    if (t->nbytes() > 0) ParallelCopy(dst, static_cast<const uint8_t*>(t->raw()), t->nbytes());
    dst += t->nbytes();
  }
  return out;
}

// [R, C_i] tensors side by side: [R, sum(C_i)].
Tensor StackColumns(const std::vector<const Tensor*>& ts) {
  const int64_t rows = ts[0]->dim(0);
  int64_t cols = 0;
  for (const Tensor* t : ts) cols += t->dim(1);
  Tensor out = Tensor::Empty(ts[0]->dtype(), {rows, cols}, /*zero=*/false);
  const size_t esz = DTypeSize(out.dtype());
  uint8_t* base = static_cast<uint8_t*>(out.raw());
  // Row by row (every part's slice of a row, in order), threaded over rows.
  quant_internal::ParallelRange(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t col0 = 0;
      for (const Tensor* t : ts) {
        const size_t row_bytes = static_cast<size_t>(t->dim(1)) * esz;
        std::memcpy(base + (r * cols + col0) * esz,
                    static_cast<const uint8_t*>(t->raw()) + r * row_bytes, row_bytes);
        col0 += t->dim(1);
      }
    }
  });
  return out;
}

std::vector<const Tensor*> Field(absl::Span<const LinearWeights* const> parts,
                                 Tensor LinearWeights::*member) {
  std::vector<const Tensor*> out;
  for (const LinearWeights* p : parts) out.push_back(&(p->*member));
  return out;
}

// Codes per 32-bit word of a packed integer format; 0 when bits does not divide 32.
int PerWord(int bits) { return bits > 0 && bits <= 32 && 32 % bits == 0 ? 32 / bits : 0; }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks that every part of an integer format has the shapes its N and K imply, and that N
// keeps whole words where the packing runs along N.
absl::Status CheckIntShapes(absl::Span<const LinearWeights* const> parts) {
  const LinearWeights& w0 = *parts[0];
  const int per_word = PerWord(w0.bits);
  if (per_word == 0) {
    return absl::InvalidArgumentError(absl::StrCat(PartLabel(w0, 0), ": ",
                                                   WeightFormatName(w0.format), " bits ", w0.bits,
                                                   " do not divide a 32-bit word"));
  }
  const int64_t K = w0.in_features;
  const int64_t gs = w0.group_size > 0 ? w0.group_size : K;
  const int64_t G = CeilDiv(K, gs);
  for (size_t i = 0; i < parts.size(); ++i) {
    const LinearWeights& w = *parts[i];
    const int64_t N = w.out_features;
    const bool last = i + 1 == parts.size();
    switch (w.format) {
      case WeightFormat::kGptq:
        if (N % per_word != 0 || K % per_word != 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(PartLabel(w, i), ": gptq ", w.bits, "-bit packs ", per_word,
                           " outputs per qzeros word and inputs per qweight word; out_features ", N,
                           " and in_features ", K, " must both be multiples of ", per_word));
        }
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "qweight", w.qweight, {K / per_word, N}));
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "qzeros", w.qzeros, {G, N / per_word}));
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "scales", w.scales, {G, N}));
        break;
      case WeightFormat::kAwq:
        if (N % per_word != 0) {
          return absl::InvalidArgumentError(absl::StrCat(PartLabel(w, i), ": awq packs ", per_word,
                                                         " outputs per word; out_features ", N,
                                                         " must be a multiple of ", per_word));
        }
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "qweight", w.qweight, {K, N / per_word}));
        if (!w.qzeros.empty()) {
          QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "qzeros", w.qzeros, {G, N / per_word}));
        }
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "scales", w.scales, {G, N}));
        break;
      case WeightFormat::kPacked:
        if (K % per_word != 0) {
          return absl::InvalidArgumentError(absl::StrCat(PartLabel(w, i),
                                                         ": pack-quantized in_features ", K,
                                                         " is not a multiple of ", per_word));
        }
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "weight_packed", w.qweight, {N, K / per_word}));
        QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "weight_scale", w.scales, {N, G}));
        if (!w.qzeros.empty()) {
          // Zero points are packed along N: a part ending inside a word would share it.
          if (!last && N % per_word != 0) {
            return absl::InvalidArgumentError(
                absl::StrCat(PartLabel(w, i), ": pack-quantized weight_zero_point packs ", per_word,
                             " outputs per word; out_features ", N, " must be a multiple of ",
                             per_word, " for a part that is not the last"));
          }
          QSHARD_RETURN_IF_ERROR(
              ExpectShape(w, i, "weight_zero_point", w.qzeros, {CeilDiv(N, per_word), G}));
        }
        break;
      default:
        break;
    }
  }
  return absl::OkStatus();
}

// weight_scale of fp8 / int8 parts (not block-wise): one per-tensor value or N per-channel
// values each. Returns the concatenated scale.
absl::StatusOr<Tensor> ConcatChannelScales(absl::Span<const LinearWeights* const> parts,
                                           int64_t total_n) {
  bool all_tensor = true, all_rank1 = true;
  for (size_t i = 0; i < parts.size(); ++i) {
    const LinearWeights& w = *parts[i];
    const Tensor& s = w.weight_scale;
    const int64_t N = w.out_features;
    const bool per_tensor = s.numel() == 1;  // with N == 1 both readings agree
    if (!per_tensor && s.shape() != Shape{N} && s.shape() != Shape{N, 1}) {
      return absl::InvalidArgumentError(absl::StrCat(
          PartLabel(w, i), ".weight_scale: shape ", ShapeToString(s.shape()),
          ", expected a per-tensor [1] or per-channel [", N, ", 1] / [", N, "] scale"));
    }
    all_tensor &= per_tensor;
    all_rank1 &= !per_tensor && s.rank() == 1;
  }
  const Tensor& s0 = parts[0]->weight_scale;
  if (all_tensor) {
    bool equal = true;
    for (const LinearWeights* p : parts) {
      equal &= std::memcmp(p->weight_scale.raw(), s0.raw(), DTypeSize(s0.dtype())) == 0;
    }
    if (equal) return Copy(s0);  // one scale still serves every row
  }
  // Per-channel: each part's rows keep their own scale, a per-tensor one repeated N_i times.
  const size_t esz = DTypeSize(s0.dtype());
  Tensor out = Tensor::Empty(s0.dtype(), all_rank1 ? Shape{total_n} : Shape{total_n, 1},
                             /*zero=*/false);
  uint8_t* dst = static_cast<uint8_t*>(out.raw());
  for (const LinearWeights* p : parts) {
    const Tensor& s = p->weight_scale;
    const int64_t N = p->out_features;
    if (s.numel() == N) {
      std::memcpy(dst, s.raw(), static_cast<size_t>(N) * esz);
    } else {
      for (int64_t n = 0; n < N; ++n) std::memcpy(dst + n * esz, s.raw(), esz);
    }
    dst += static_cast<size_t>(N) * esz;
  }
  return out;
}

}  // namespace

absl::StatusOr<LinearWeights> ConcatLinearWeights(absl::Span<const LinearWeights* const> parts,
                                                  std::string name) {
  if (parts.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ConcatLinearWeights(", name, "): no parts (expected at least one)"));
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("ConcatLinearWeights(", name, "): part ", i, " is null"));
    }
  }
  const LinearWeights& w0 = *parts[0];

  // ---- Everything but N must agree. ----
  for (size_t i = 1; i < parts.size(); ++i) {
    const LinearWeights& w = *parts[i];
    if (w.format != w0.format) {
      return Mismatch(w0, w, i, "format", WeightFormatName(w0.format), WeightFormatName(w.format));
    }
    if (w.in_features != w0.in_features) {
      return Mismatch(w0, w, i, "in_features", absl::StrCat(w0.in_features),
                      absl::StrCat(w.in_features));
    }
    if (w.bits != w0.bits) {
      return Mismatch(w0, w, i, "bits", absl::StrCat(w0.bits), absl::StrCat(w.bits));
    }
    if (w.group_size != w0.group_size) {
      return Mismatch(w0, w, i, "group_size", absl::StrCat(w0.group_size),
                      absl::StrCat(w.group_size));
    }
    if (w.format == WeightFormat::kGptq && w.gptq_zeros_minus_one != w0.gptq_zeros_minus_one) {
      return Mismatch(w0, w, i, "gptq zeros convention (v1 stores zero - 1)",
                      w0.gptq_zeros_minus_one ? "v1" : "v2", w.gptq_zeros_minus_one ? "v1" : "v2");
    }
    if (w.has_zero_point != w0.has_zero_point) {
      return Mismatch(w0, w, i, "has_zero_point", w0.has_zero_point ? "true" : "false",
                      w.has_zero_point ? "true" : "false");
    }
    if (w.act_quant != w0.act_quant) {
      return Mismatch(w0, w, i, "activation quantization", ActQuantName(w0.act_quant),
                      ActQuantName(w.act_quant));
    }
    if (w.act_group_size != w0.act_group_size) {
      return Mismatch(w0, w, i, "act_group_size", absl::StrCat(w0.act_group_size),
                      absl::StrCat(w.act_group_size));
    }
    if (w.block_size != w0.block_size) {
      return Mismatch(w0, w, i, "block_size",
                      absl::StrCat("[", absl::StrJoin(w0.block_size, ", "), "]"),
                      absl::StrCat("[", absl::StrJoin(w.block_size, ", "), "]"));
    }
    for (const TensorField& f : kTensorFields) {
      const Tensor& t0 = w0.*f.member;
      const Tensor& t = w.*f.member;
      if (t.empty() != t0.empty()) {
        return Mismatch(w0, w, i, absl::StrCat("presence of ", f.name),
                        t0.empty() ? "absent" : "present", t.empty() ? "absent" : "present");
      }
      if (!t.empty() && t.dtype() != t0.dtype()) {
        return Mismatch(w0, w, i, absl::StrCat(f.name, " dtype"),
                        std::string(DTypeName(t0.dtype())), std::string(DTypeName(t.dtype())));
      }
    }
    // Inputs are shared, so whatever describes them must be identical.
    if (!w0.g_idx.empty() && !SameContents(w.g_idx, w0.g_idx)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot concatenate ", PartLabel(w, i), " with ", PartLabel(w0, 0),
          ": their g_idx (input-row groups, act-order) differ; concatenated outputs must "
          "share one g_idx"));
    }
    if (!w0.input_scale.empty() && !SameContents(w.input_scale, w0.input_scale)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot concatenate ", PartLabel(w, i), " with ", PartLabel(w0, 0),
          ": their static input_scale values differ; one fused input needs one scale"));
    }
  }
  int64_t total_n = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const LinearWeights& w = *parts[i];
    if (w.out_features <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(PartLabel(w, i), ": out_features ", w.out_features, " (expected > 0)"));
    }
    total_n += w.out_features;
    for (const TensorField& f : kTensorFields) {
      const Tensor& t = w.*f.member;
      if (!t.empty() && t.device() != Device::kCpu) {
        return absl::InvalidArgumentError(
            absl::StrCat(PartLabel(w, i), ".", f.name, ": not in host memory"));
      }
    }
    if (!w.bias.empty()) {
      QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "bias", w.bias, {w.out_features}));
    }
  }

  LinearWeights out;
  out.name = std::move(name);
  out.in_features = w0.in_features;
  out.out_features = total_n;
  out.format = w0.format;
  out.bits = w0.bits;
  out.group_size = w0.group_size;
  out.gptq_zeros_minus_one = w0.gptq_zeros_minus_one;
  out.has_zero_point = w0.has_zero_point;
  out.block_size = w0.block_size;
  out.act_quant = w0.act_quant;
  out.act_group_size = w0.act_group_size;
  const int64_t K = w0.in_features;

  // ---- Shapes per format (so every copy below stays in bounds), then the copies. ----
  switch (w0.format) {
    case WeightFormat::kDense:
    case WeightFormat::kFp8:
    case WeightFormat::kInt8: {
      for (size_t i = 0; i < parts.size(); ++i) {
        QSHARD_RETURN_IF_ERROR(
            ExpectShape(*parts[i], i, "weight", parts[i]->weight, {parts[i]->out_features, K}));
      }
      out.weight = StackRows(Field(parts, &LinearWeights::weight));
      if (w0.format == WeightFormat::kDense) break;
      if (w0.weight_scale.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(PartLabel(w0, 0), ".weight_scale: missing"));
      }
      if (!w0.block_size.empty()) {
        if (w0.block_size.size() != 2 || w0.block_size[0] <= 0 || w0.block_size[1] <= 0) {
          return absl::InvalidArgumentError(absl::StrCat(PartLabel(w0, 0), ": block_size [",
                                                         absl::StrJoin(w0.block_size, ", "),
                                                         "], expected [bn, bk] > 0"));
        }
        const int64_t bn = w0.block_size[0], bk = w0.block_size[1];
        for (size_t i = 0; i < parts.size(); ++i) {
          const LinearWeights& w = *parts[i];
          if (i + 1 < parts.size() && w.out_features % bn != 0) {
            return absl::InvalidArgumentError(
                absl::StrCat(PartLabel(w, i), ": out_features ", w.out_features,
                             " is not a multiple of the scale block height ", bn,
                             " (a block row would hold rows of two parts under one scale)"));
          }
          QSHARD_RETURN_IF_ERROR(ExpectShape(w, i, "weight_scale", w.weight_scale,
                                             {CeilDiv(w.out_features, bn), CeilDiv(K, bk)}));
        }
        out.weight_scale = StackRows(Field(parts, &LinearWeights::weight_scale));
      } else {
        QSHARD_ASSIGN_OR_RETURN(out.weight_scale, ConcatChannelScales(parts, total_n));
      }
      if (!w0.input_scale.empty()) {
        if (w0.input_scale.numel() != 1) {
          return absl::InvalidArgumentError(absl::StrCat(PartLabel(w0, 0), ".input_scale: shape ",
                                                         ShapeToString(w0.input_scale.shape()),
                                                         ", expected one value"));
        }
        out.input_scale = Copy(w0.input_scale);
      }
      break;
    }
    case WeightFormat::kGptq:
    case WeightFormat::kAwq:
    case WeightFormat::kPacked:
      QSHARD_RETURN_IF_ERROR(CheckIntShapes(parts));
      if (!w0.g_idx.empty()) {
        QSHARD_RETURN_IF_ERROR(ExpectShape(w0, 0, "g_idx", w0.g_idx, {K}));
        out.g_idx = Copy(w0.g_idx);
      }
      if (w0.format == WeightFormat::kPacked) {
        out.qweight = StackRows(Field(parts, &LinearWeights::qweight));
        out.scales = StackRows(Field(parts, &LinearWeights::scales));
        if (!w0.qzeros.empty()) out.qzeros = StackRows(Field(parts, &LinearWeights::qzeros));
      } else {
        out.qweight = StackColumns(Field(parts, &LinearWeights::qweight));
        out.scales = StackColumns(Field(parts, &LinearWeights::scales));
        if (!w0.qzeros.empty()) out.qzeros = StackColumns(Field(parts, &LinearWeights::qzeros));
      }
      break;
  }
  if (!w0.bias.empty()) out.bias = StackRows(Field(parts, &LinearWeights::bias));
  return out;
}

}  // namespace qshard
