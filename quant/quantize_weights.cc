#include "quant/quantize_weights.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "quant/awq_format.h"
#include "quant/dense_linalg.h"
#include "quant/fp8.h"
#include "runtime/base/half.h"

namespace qshard {

using quant_internal::ParallelRange;

namespace {

// The common header of every packed LinearWeights.
LinearWeights NewLinear(const std::string& name, int64_t N, int64_t K, WeightFormat format,
                        int bits, int64_t group_size, bool has_zero_point) {
  LinearWeights lw;
  lw.name = name;
  lw.in_features = K;
  lw.out_features = N;
  lw.format = format;
  lw.bits = bits;
  lw.group_size = group_size;
  lw.has_zero_point = has_zero_point;
  return lw;
}

// Per-channel 8-bit layout: weight [N, K] (e4m3fn or int8) and weight_scale f32 [N, 1],
// allocated, not filled.
LinearWeights NewPerChannel8Bit(const std::string& name, int64_t N, int64_t K, bool fp8) {
  LinearWeights lw = NewLinear(name, N, K, fp8 ? WeightFormat::kFp8 : WeightFormat::kInt8, 8,
                               -1, /*has_zero_point=*/false);
  lw.weight = Tensor::Empty(fp8 ? DType::kF8E4M3 : DType::kI8, {N, K}, /*zero=*/false);
  lw.weight_scale = Tensor::Empty(DType::kF32, {N, 1}, /*zero=*/false);
  return lw;
}

constexpr float kF16Max = 65504.0f;
constexpr float kF16MinSubnormal = 5.9604645e-8f;  // 2^-24

// The f16 value a scale will be stored as, kept positive and finite so that codes chosen
// against it are the ones the reader reproduces.
float RoundScaleToF16(float s) {
  if (!(s > 0.0f)) return kF16MinSubnormal;  // also NaN
  s = std::min(s, kF16Max);
  const float r = F16ToF32(F32ToF16(s));
  return r > 0.0f ? r : kF16MinSubnormal;
}

// The group size the g_idx of m implies (size of the largest group; -1 for a single group),
// after checking the sizes of m. Errors name the layer.
absl::StatusOr<int64_t> CheckMatrix(const IntQuantMatrix& m, const std::string& name) {
  const int64_t K = m.in_features, N = m.out_features, G = m.num_groups;
  if (K <= 0 || N <= 0 || G <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": empty quantized matrix (", N, " x ", K, ", ", G, " groups)"));
  }
  if (static_cast<int64_t>(m.codes.size()) != N * K ||
      static_cast<int64_t>(m.scales.size()) != G * N ||
      static_cast<int64_t>(m.zeros.size()) != G * N || static_cast<int64_t>(m.g_idx.size()) != K) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": inconsistent quantized matrix: expected codes [", N, ", ", K, "], scales/zeros [",
        G, ", ", N, "], g_idx [", K, "]; got ", m.codes.size(), ", ", m.scales.size(), "/",
        m.zeros.size(), ", ", m.g_idx.size(), " elements"));
  }
  std::vector<int64_t> count(static_cast<size_t>(G), 0);
  for (int64_t k = 0; k < K; ++k) {
    const int32_t g = m.g_idx[k];
    if (g < 0 || g >= G) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": g_idx[", k, "] = ", g, " is outside [0, ", G, ")"));
    }
    ++count[g];
  }
  if (G == 1) return -1;
  const int64_t gs = *std::max_element(count.begin(), count.end());
  if (NumGroups(K, gs) != G) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": g_idx group sizes (largest ", gs,
                                                   ") do not give ", G,
                                                   " groups of equal size over ", K, " inputs"));
  }
  return gs;
}

absl::Status CheckCodesAndZeros(const IntQuantMatrix& m, const std::string& name, bool sym) {
  const int maxq = (1 << m.bits) - 1;
  const uint8_t max_code = m.codes.empty() ? 0 : *std::max_element(m.codes.begin(), m.codes.end());
  for (size_t i = 0; max_code > maxq && i < m.codes.size(); ++i) {
    if (m.codes[i] > maxq) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": code ", m.codes[i], " at [",
                                                     i / m.in_features, ", ", i % m.in_features,
                                                     "] exceeds ", maxq, " for ", m.bits, " bits"));
    }
  }
  const float sym_zero = static_cast<float>(1 << (m.bits - 1));
  for (size_t i = 0; i < m.zeros.size(); ++i) {
    const float z = m.zeros[i];
    if (!(z >= 0.0f && z <= maxq && z == std::nearbyint(z))) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": zero point ", z, " of group ", i / m.out_features, ", output ",
                       i % m.out_features, " is not an integer in [0, ", maxq, "]"));
    }
    if (sym && z != sym_zero) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": symmetric quantization needs every zero point = ", sym_zero, " but group ",
          i / m.out_features, ", output ", i % m.out_features, " has ", z));
    }
  }
  return absl::OkStatus();
}

// scales [G, N] as f16; every value must survive the conversion.
absl::StatusOr<Tensor> ScalesF16(const IntQuantMatrix& m, const std::string& name) {
  Tensor t = Tensor::Empty(DType::kF16, {m.num_groups, m.out_features}, /*zero=*/false);
  uint16_t* out = t.data<uint16_t>();
  for (size_t i = 0; i < m.scales.size(); ++i) {
    out[i] = F32ToF16(m.scales[i]);
    if (!std::isfinite(F16ToF32(out[i]))) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": scale ", m.scales[i], " of group ", i / m.out_features, ", output ",
                       i % m.out_features, " is not a finite f16 (|scale| must be <= 65504)"));
    }
  }
  return t;
}

}  // namespace

int64_t NumGroups(int64_t K, int64_t group_size) {
  if (group_size <= 0 || group_size >= K) return 1;
  return (K + group_size - 1) / group_size;
}

GroupScaleZero ComputeScaleZero(const float* x, int64_t n, int bits, bool sym, float clip) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  float xmin = 0.0f, xmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = ClampAbs(x[i], clip);
    xmin = v < xmin ? v : xmin;  // NaN compares false: ignored
    xmax = v > xmax ? v : xmax;
  }
  if (sym) {
    xmax = std::fmax(-xmin, xmax);
    xmin = -xmax;
  }
  if (xmin == 0.0f && xmax == 0.0f) {
    xmin = -1.0f;
    xmax = 1.0f;
  }
  GroupScaleZero r;
  r.scale = RoundScaleToF16((xmax - xmin) / maxq);
  r.zero = sym ? (maxq + 1.0f) / 2.0f
               : std::fmin(std::fmax(std::nearbyint(-xmin / r.scale), 0.0f), maxq);
  return r;
}

IntQuantMatrix QuantizeRtn(const float* w, int64_t N, int64_t K, const IntQuantParams& p,
                           const float* clip) {
  IntQuantMatrix m;
  m.in_features = K;
  m.out_features = N;
  m.bits = p.bits;
  const int64_t G = NumGroups(K, p.group_size);
  const int64_t gs = G == 1 ? K : p.group_size;
  m.num_groups = G;
  m.codes.resize(static_cast<size_t>(N * K));
  m.scales.resize(static_cast<size_t>(G * N));
  m.zeros.resize(static_cast<size_t>(G * N));
  m.g_idx.resize(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) m.g_idx[k] = static_cast<int32_t>(k / gs);
  const int maxq = (1 << p.bits) - 1;
  ParallelRange(N, 16, [&](int64_t nb, int64_t ne) {
    for (int64_t n = nb; n < ne; ++n) {
      const float* row = w + n * K;
      uint8_t* codes = m.codes.data() + n * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
        const float c = clip ? clip[n * G + g] : std::numeric_limits<float>::infinity();
        const GroupScaleZero sz = ComputeScaleZero(row + k0, k1 - k0, p.bits, p.sym, c);
        m.scales[g * N + n] = sz.scale;
        m.zeros[g * N + n] = sz.zero;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = ClampAbs(row[k], c);  // no-op without clip
          codes[k] = static_cast<uint8_t>(QuantizeCode(v, sz.scale, sz.zero, maxq));
        }
      }
    }
  });
  return m;
}

std::vector<float> Dequantize(const IntQuantMatrix& m) {
  const int64_t N = m.out_features, K = m.in_features;
  std::vector<float> out(static_cast<size_t>(N * K));
  ParallelRange(N, 16, [&](int64_t nb, int64_t ne) {
    for (int64_t n = nb; n < ne; ++n) {
      for (int64_t k = 0; k < K; ++k) out[n * K + k] = m.Dequant(n, k);
    }
  });
  return out;
}

absl::StatusOr<LinearWeights> PackGptq(const IntQuantMatrix& m, const std::string& name, bool sym,
                                       bool v1) {
  const int bits = m.bits;
  if (bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": GPTQ packing supports 4 and 8 bits, got ", bits));
  }
  const int64_t K = m.in_features, N = m.out_features, G = m.num_groups;
  const int per_word = 32 / bits;
  if (K % per_word != 0 || N % per_word != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": GPTQ ", bits, "-bit packing needs in_features and out_features divisible by ",
        per_word, " (got ", K, " x ", N, ")"));
  }
  auto gs = CheckMatrix(m, name);
  if (!gs.ok()) return gs.status();
  if (absl::Status st = CheckCodesAndZeros(m, name, sym); !st.ok()) return st;
  if (v1 && !sym) {
    for (size_t i = 0; i < m.zeros.size(); ++i) {
      if (m.zeros[i] == 0.0f) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, ": asymmetric zero point 0 (group ", i / N, ", output ", i % N,
            ") is not representable in GPTQ v1 (checkpoint_format \"gptq\" stores zero - 1); "
            "write checkpoint_format \"gptq_v2\" instead"));
      }
    }
  }
  auto scales = ScalesF16(m, name);
  if (!scales.ok()) return scales.status();

  LinearWeights w = NewLinear(name, N, K, WeightFormat::kGptq, bits, *gs, !sym);
  w.gptq_zeros_minus_one = v1;
  w.scales = *std::move(scales);
  // qweight word (r, n) holds codes[n, r*per_word + j] at bits [bits*j, bits*j + bits).
  w.qweight = Tensor::Empty(DType::kI32, {K / per_word, N}, /*zero=*/false);
  uint32_t* qw = w.qweight.data<uint32_t>();
  ParallelRange(N, 64, [&](int64_t nb, int64_t ne) {
    for (int64_t n = nb; n < ne; ++n) {
      const uint8_t* codes = m.codes.data() + n * K;
      for (int64_t r = 0; r < K / per_word; ++r) {
        uint32_t word = 0;
        for (int j = 0; j < per_word; ++j) {
          word |= static_cast<uint32_t>(codes[r * per_word + j]) << (bits * j);
        }
        qw[r * N + n] = word;
      }
    }
  });
  const uint32_t mask = (1u << bits) - 1;
  w.qzeros = Tensor::Empty(DType::kI32, {G, N / per_word}, /*zero=*/true);
  uint32_t* qz = w.qzeros.data<uint32_t>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t z = (static_cast<uint32_t>(m.zeros[g * N + n]) - (v1 ? 1u : 0u)) & mask;
      qz[g * (N / per_word) + n / per_word] |= z << (bits * (n % per_word));
    }
  }
  w.g_idx = Tensor::Empty(DType::kI32, {K}, /*zero=*/false);
  std::copy(m.g_idx.begin(), m.g_idx.end(), w.g_idx.data<int32_t>());
  return w;
}

absl::StatusOr<LinearWeights> PackAwq(const IntQuantMatrix& m, const std::string& name) {
  if (m.bits != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": AWQ packing supports 4 bits only, got ", m.bits));
  }
  const int64_t K = m.in_features, N = m.out_features, G = m.num_groups;
  if (N % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": AWQ packing needs out_features divisible by 8 (got ", N, ")"));
  }
  auto gs = CheckMatrix(m, name);
  if (!gs.ok()) return gs.status();
  const int64_t group = *gs > 0 ? *gs : K;
  for (int64_t k = 0; k < K; ++k) {
    if (m.g_idx[k] != k / group) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": AWQ checkpoints have no g_idx, so groups must be contiguous (g_idx[k] = k / ",
          group, "), but g_idx[", k, "] = ", m.g_idx[k], " (act-order is GPTQ only)"));
    }
  }
  if (absl::Status st = CheckCodesAndZeros(m, name, /*sym=*/false); !st.ok()) return st;
  auto scales = ScalesF16(m, name);
  if (!scales.ok()) return scales.status();

  LinearWeights w = NewLinear(name, N, K, WeightFormat::kAwq, 4, *gs, /*has_zero_point=*/true);
  w.gptq_zeros_minus_one = false;
  w.scales = *std::move(scales);
  int shift_of[8];  // column offset within a word -> bit offset of its nibble
  for (int i = 0; i < 8; ++i) shift_of[kAwqOrder[i]] = 4 * i;
  // qweight word (k, c) holds codes[8c + kAwqOrder[i], k] in nibble i. Blocks of kb inputs:
  // contiguous reads of each code row, writes within kb rows of qweight (cache resident).
  w.qweight = Tensor::Empty(DType::kI32, {K, N / 8}, /*zero=*/true);
  uint32_t* qw = w.qweight.data<uint32_t>();
  constexpr int64_t kb = 64;
  ParallelRange((K + kb - 1) / kb, 1, [&](int64_t bb, int64_t be) {
    for (int64_t k0 = bb * kb; k0 < std::min(K, be * kb); k0 += kb) {
      const int64_t k1 = std::min(K, k0 + kb);
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* codes = m.codes.data() + n * K;
        uint32_t* col = qw + n / 8;
        const int shift = shift_of[n % 8];
        for (int64_t k = k0; k < k1; ++k) {
          col[k * (N / 8)] |= static_cast<uint32_t>(codes[k]) << shift;
        }
      }
    }
  });
  w.qzeros = Tensor::Empty(DType::kI32, {G, N / 8}, /*zero=*/true);
  uint32_t* qz = w.qzeros.data<uint32_t>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t n = 0; n < N; ++n) {
      qz[g * (N / 8) + n / 8] |= static_cast<uint32_t>(m.zeros[g * N + n]) << shift_of[n % 8];
    }
  }
  return w;
}

namespace {

// Per-row symmetric 8-bit (fp8 e4m3fn or int8) with weight_scale [N, 1].
LinearWeights QuantizePerChannel(const float* w, int64_t N, int64_t K, const std::string& name,
                                 bool fp8) {
  LinearWeights lw = NewPerChannel8Bit(name, N, K, fp8);
  uint8_t* codes = lw.weight.data<uint8_t>();
  float* scales = lw.weight_scale.data<float>();
  ParallelRange(N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const float* row = w + n * K;
      const float amax = AbsMax(row, K);
      const float s = std::max(amax / (fp8 ? kE4M3Max : 127.0f), FLT_EPSILON);
      scales[n] = s;
      if (fp8) {
        // x / s, not x * (1 / s): bf16 weights over amax / 448 often land exactly on a tie
        // between two e4m3 values, and only the division (what llm-compressor and
        // PyTorch compute) keeps the tie, which then rounds to even like theirs.
        uint8_t* q = codes + n * K;
        for (int64_t k = 0; k < K; ++k) q[k] = FloatToE4M3(row[k] / s);
      } else {
        int8_t* q = reinterpret_cast<int8_t*>(codes + n * K);
        // Symmetric: the unsigned code with zero 127 of 8 bits (range 0..254), minus 127.
        for (int64_t k = 0; k < K; ++k) {
          q[k] = static_cast<int8_t>(QuantizeCode(row[k], s, 127.0f, 254) - 127);
        }
      }
    }
  });
  return lw;
}

}  // namespace

LinearWeights QuantizeFp8PerChannel(const float* w, int64_t N, int64_t K, const std::string& name,
                                    bool dynamic_act) {
  LinearWeights lw = QuantizePerChannel(w, N, K, name, /*fp8=*/true);
  lw.act_quant = dynamic_act ? ActQuant::kFp8PerToken : ActQuant::kNone;
  return lw;
}

absl::StatusOr<LinearWeights> PackFp8PerChannel(const IntQuantMatrix& m, const std::string& name,
                                                bool dynamic_act) {
  const int64_t N = m.out_features, K = m.in_features;
  if (m.num_groups != 1 || static_cast<int64_t>(m.scales.size()) != N ||
      static_cast<int64_t>(m.codes.size()) != N * K) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": fp8 per-channel packing needs codes [N, K] and one scale per row, got ",
        m.num_groups, " groups"));
  }
  LinearWeights lw = NewPerChannel8Bit(name, N, K, /*fp8=*/true);
  std::copy(m.codes.begin(), m.codes.end(), lw.weight.data<uint8_t>());
  std::copy(m.scales.begin(), m.scales.end(), lw.weight_scale.data<float>());
  lw.act_quant = dynamic_act ? ActQuant::kFp8PerToken : ActQuant::kNone;
  return lw;
}

LinearWeights QuantizeInt8PerChannel(const float* w, int64_t N, int64_t K, const std::string& name,
                                     bool dynamic_act) {
  LinearWeights lw = QuantizePerChannel(w, N, K, name, /*fp8=*/false);
  lw.act_quant = dynamic_act ? ActQuant::kInt8PerToken : ActQuant::kNone;
  return lw;
}

std::vector<std::pair<std::string, Tensor>> CheckpointTensors(const LinearWeights& w) {
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](const char* suffix, const Tensor& t) {
    if (!t.empty()) out.emplace_back(w.name + suffix, t);
  };
  switch (w.format) {
    case WeightFormat::kGptq:
    case WeightFormat::kAwq:  // same names; AWQ has no g_idx (empty: skipped)
      add(".qweight", w.qweight);
      add(".qzeros", w.qzeros);
      add(".scales", w.scales);
      add(".g_idx", w.g_idx);
      break;
    case WeightFormat::kPacked:
      add(".weight_packed", w.qweight);
      add(".weight_scale", w.scales);
      add(".weight_zero_point", w.qzeros);
      add(".weight_g_idx", w.g_idx);
      break;
    case WeightFormat::kFp8:
    case WeightFormat::kInt8:
      add(".weight", w.weight);
      add(".weight_scale", w.weight_scale);
      add(".input_scale", w.input_scale);
      break;
    case WeightFormat::kDense:
      add(".weight", w.weight);
      break;
  }
  add(".bias", w.bias);
  return out;
}

}  // namespace qshard
