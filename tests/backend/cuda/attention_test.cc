// GPU KV cache write and paged attention (runtime/backend/cuda/attention.h) against a
// float64 host reference.
//
// Without a CUDA device every test skips with a message.
//
// Method per case: a paged cache whose block tables are a shuffled permutation of the
// physical blocks (so a wrong block lookup reads someone else's data), caches poisoned with
// 0xFF bytes (NaN in every float format; e4m3's 0xFF is NaN too) before anything is written,
// so reading a slot that was never written turns the output into NaN. The history (cached
// tokens) is written with one LaunchKvWrite, the step's K/V with a second one (as the
// engine does), then LaunchPagedAttention runs with a poisoned output and workspace.
//   - KV write: the downloaded cache must equal, byte for byte, what cpu::StoreKvRow
//     produces for the same rows (0xFF elsewhere). Exact: both round value * (1/scale) in
//     fp32 to nearest even with saturation (fp8) or round to nearest even (bf16/f16).
//   - Attention: the reference uses the K/V values the cache really holds
//     (cpu::LoadKvRow(cpu::StoreKvRow(x))), the same act-rounded q, and computes scores,
//     softmax and P.V in double. So the cache dtype does not change the tolerance; only the
//     GPU's fp32 arithmetic and the output rounding remain:
//       fp32 out: dot products and exp/sums in fp32 give ~1e-6 relative errors (scores are
//       O(1-5), D <= 128): bound 2e-5 normwise, per element 1e-4 |want| + 1e-4 rms(row).
//       Dropping or duplicating one key of a 4100-token context moves the output by ~1/4100
//       of |v| ~ 2e-4 against an output RMS of ~1e-2: ~1e-2 relative, far outside.
//       bf16 out: one extra rounding, half an ulp = 2^-8 |value|: per element
//       5e-3 |want| + 1e-4 rms(row), normwise 4e-3.
//       Tensor-core prefill kernel (bf16 out only): the same, plus the rounding of the
//       softmax weights to bf16 before the P.V mma (f16 for an f16 cache: finer, 2^-11).
//       Each p_j gets a relative error |e_j| <= 2^-8 (round to nearest, 8 significant
//       bits) while l sums the unrounded p, so out_d moves by sum_j e_j p_j v_jd / l, at
//       most 2^-8 W_d with W_d = sum_j p_j |v_jd| / l (the reference computes W): the
//       per-element bound gets + 2^-8 W_d, rigorous for that term. That term is loose for
//       long contexts (it adds every key's worst case), but the e_j are unbiased and
//       independent, so normwise they only add in quadrature to the output rounding: a
//       host emulation of the kernel (fragment-exact, same data) gave <= 1.9e-3 normwise
//       on these cases, and the normwise bound stays 4e-3. Indexing or masking mistakes
//       move whole rows and fail both bounds (the short-context cases per element too).
//   - NaN or inf anywhere fails.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "runtime/backend/cpu/kv_rows.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "runtime/base/status_macros.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

using ::qshard::cuda::testing::Name;

float RoundAct(DType t, float x) { return t == DType::kBF16 ? Bf16ToF32(F32ToBf16(x)) : x; }

std::vector<uint8_t> EncodeAct(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> bytes(v.size() * DTypeSize(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::kF32) {
      std::memcpy(bytes.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = F32ToBf16(v[i]);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return bytes;
}

absl::StatusOr<DeviceBuffer> UploadBytes(const void* p, size_t bytes, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(bytes, 16)));
  if (bytes > 0) QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(p, bytes, stream));
  return buf;
}
absl::StatusOr<DeviceBuffer> PoisonedBytes(size_t bytes, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(bytes, 16)));
  QSHARD_RETURN_IF_ERROR(buf.Fill(0xFF, stream));
  return buf;
}

struct SeqSpec {
  int64_t cached;  // tokens already in the cache before this step
  int64_t q_len;   // tokens of this step
};

struct AttnCase {
  std::string name;
  DType act = DType::kF32;
  DType cache = DType::kBF16;
  int64_t heads = 8, kv_heads = 2, head_dim = 128, block_size = 16;
  std::vector<SeqSpec> seqs;
  float k_scale = 1.0f, v_scale = 1.0f;
  bool workspace = true;  // give the launcher a workspace (split-K allowed)
};

std::string Describe(const AttnCase& c) {
  std::string seqs;
  for (const SeqSpec& s : c.seqs) absl::StrAppend(&seqs, "(", s.cached, "+", s.q_len, ")");
  return absl::StrCat(c.name, " [act ", Name(c.act), ", cache ", Name(c.cache), ", H ", c.heads,
                      ", KVH ", c.kv_heads, ", D ", c.head_dim, ", bs ", c.block_size,
                      ", seqs ", seqs, c.workspace ? "" : ", no workspace", "]");
}

struct Tolerance {
  double rel, row_rms, normwise;
  double abs_weighted = 0;  // times W = sum_j p_j |v_j| / l of the element (tensor cores)
};

void ExpectClose(const std::vector<float>& got, const std::vector<double>& want,
                 const std::vector<double>& want_abs, int64_t rows, int64_t cols, int64_t heads,
                 const Tolerance& tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  double worst = 0, diff_sq = 0, want_sq = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double row_sq = 0;
    for (int64_t c = 0; c < cols; ++c) row_sq += want[r * cols + c] * want[r * cols + c];
    const double rms = std::sqrt(row_sq / cols);
    for (int64_t c = 0; c < cols; ++c) {
      const double g = got[r * cols + c], w = want[r * cols + c];
      const double err = std::fabs(g - w);
      const double bound =
          tol.rel * std::fabs(w) + tol.row_rms * rms + tol.abs_weighted * want_abs[r * cols + c];
      if (std::isfinite(err)) {
        diff_sq += err * err;
      } else {
        diff_sq = INFINITY;
      }
      want_sq += w * w;
      if (!(err <= bound)) {
        if (bad++ < 5) {
          ADD_FAILURE() << what << ": token " << r / heads << " head " << r % heads << " dim " << c
                        << ": got " << g << ", want " << w << ", |diff| " << err << " > bound "
                        << bound;
        }
        if (std::isfinite(err)) worst = std::max(worst, err / bound);
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": elements outside the bound or non-finite (worst finite err/bound "
                    << worst << ")";
  const double normwise = std::sqrt(diff_sq / want_sq);
  EXPECT_LE(normwise, tol.normwise) << what << ": normwise relative error";
}

class CudaAttentionTest : public ::qshard::cuda::testing::CudaStreamTest {
 protected:
  void RunCase(const AttnCase& c, uint32_t seed);
};

void CudaAttentionTest::RunCase(const AttnCase& c, uint32_t seed) {
  const std::string what = Describe(c);
  SCOPED_TRACE(what);
  const int64_t S = static_cast<int64_t>(c.seqs.size());
  const int64_t D = c.head_dim, H = c.heads, KVH = c.kv_heads, bs = c.block_size;
  const int64_t G = H / KVH;
  const size_t esz = DTypeSize(c.cache);
  std::mt19937 rng(seed);

  // Block tables over a shuffled set of physical blocks (plus spares never used).
  std::vector<int64_t> ctx(S);
  int64_t max_blocks = 0, total_blocks = 0, T = 0, max_ctx = 0, max_q = 0;
  for (int64_t s = 0; s < S; ++s) {
    ctx[s] = c.seqs[s].cached + c.seqs[s].q_len;
    const int64_t nb = (ctx[s] + bs - 1) / bs;
    max_blocks = std::max(max_blocks, nb);
    total_blocks += nb;
    T += c.seqs[s].q_len;
    max_ctx = std::max(max_ctx, ctx[s]);
    max_q = std::max(max_q, c.seqs[s].q_len);
  }
  const int64_t num_blocks = total_blocks + 3;
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables(S * max_blocks, -1);
  {
    int64_t next = 0;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < (ctx[s] + bs - 1) / bs; ++b) tables[s * max_blocks + b] = perm[next++];
  }
  auto slot_of = [&](int64_t s, int64_t pos) {
    return static_cast<int32_t>(tables[s * max_blocks + pos / bs] * bs + pos % bs);
  };

  // K/V activations for every position of every sequence [ctx, KVH * D], act-rounded.
  // K: mostly +-1, 5% of the values up to +-4 (outliers); V: +-1.
  std::uniform_real_distribution<float> kv_dist(-1.0f, 1.0f);
  std::uniform_real_distribution<float> q_dist(-4.0f, 4.0f);
  std::vector<std::vector<float>> k_act(S), v_act(S);
  for (int64_t s = 0; s < S; ++s) {
    k_act[s].resize(ctx[s] * KVH * D);
    v_act[s].resize(ctx[s] * KVH * D);
    for (float& x : k_act[s]) x = RoundAct(c.act, kv_dist(rng) * (kv_dist(rng) > 0.9f ? 4.0f : 1.0f));
    for (float& x : v_act[s]) x = RoundAct(c.act, kv_dist(rng));
  }
  // History (cached tokens) and step tokens, in the engine's token order.
  std::vector<float> hist_k, hist_v, step_k, step_v;
  std::vector<int32_t> hist_slots, step_slots, positions, query_start{0}, context_lens, token_seq;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t p = 0; p < ctx[s]; ++p) {
      const bool step = p >= c.seqs[s].cached;
      auto& kk = step ? step_k : hist_k;
      auto& vv = step ? step_v : hist_v;
      kk.insert(kk.end(), k_act[s].begin() + p * KVH * D, k_act[s].begin() + (p + 1) * KVH * D);
      vv.insert(vv.end(), v_act[s].begin() + p * KVH * D, v_act[s].begin() + (p + 1) * KVH * D);
      (step ? step_slots : hist_slots).push_back(slot_of(s, p));
      if (step) {
        positions.push_back(static_cast<int32_t>(p));
        token_seq.push_back(static_cast<int32_t>(s));
      }
    }
    query_start.push_back(static_cast<int32_t>(positions.size()));
    context_lens.push_back(static_cast<int32_t>(ctx[s]));
  }
  // A padding token (slot -1) in the history write must be skipped.
  hist_slots.push_back(-1);
  hist_k.insert(hist_k.end(), KVH * D, 7.0f);
  hist_v.insert(hist_v.end(), KVH * D, 7.0f);

  // Expected cache bytes and the values the cache holds (for the reference).
  const size_t row_bytes = D * esz;
  const size_t cache_bytes = num_blocks * KVH * bs * row_bytes;
  std::vector<uint8_t> want_k(cache_bytes, 0xFF), want_v(cache_bytes, 0xFF);
  std::vector<std::vector<double>> kq(S), vq(S);  // [ctx, KVH, D] dequantized
  std::vector<float> tmp(D);
  for (int64_t s = 0; s < S; ++s) {
    kq[s].resize(ctx[s] * KVH * D);
    vq[s].resize(ctx[s] * KVH * D);
    for (int64_t p = 0; p < ctx[s]; ++p) {
      const int64_t slot = slot_of(s, p);
      for (int64_t h = 0; h < KVH; ++h) {
        const size_t off = (((slot / bs) * KVH + h) * bs + slot % bs) * row_bytes;
        const int64_t src = (p * KVH + h) * D;
        cpu::StoreKvRow(c.cache, k_act[s].data() + src, D, c.k_scale, want_k.data() + off);
        cpu::StoreKvRow(c.cache, v_act[s].data() + src, D, c.v_scale, want_v.data() + off);
        cpu::LoadKvRow(c.cache, want_k.data() + off, D, c.k_scale, tmp.data());
        std::copy(tmp.begin(), tmp.end(), kq[s].begin() + src);
        cpu::LoadKvRow(c.cache, want_v.data() + off, D, c.v_scale, tmp.data());
        std::copy(tmp.begin(), tmp.end(), vq[s].begin() + src);
      }
    }
  }

  // q [T, H * D] and the float64 reference.
  std::vector<float> q(T * H * D);
  for (float& x : q) x = RoundAct(c.act, q_dist(rng));
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> want(T * H * D), want_abs(T * H * D);  // want_abs: sum_j p_j |v_j| / l
  {
    std::vector<double> sc;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t t = query_start[s]; t < query_start[s + 1]; ++t) {
        const int64_t len = positions[t] + 1;
        sc.resize(len);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t kvh = h / G;
          const float* qr = q.data() + (t * H + h) * D;
          double mx = -INFINITY;
          for (int64_t j = 0; j < len; ++j) {
            const double* kr = kq[s].data() + (j * KVH + kvh) * D;
            double dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
            sc[j] = dot * scale;
            mx = std::max(mx, sc[j]);
          }
          double denom = 0;
          for (int64_t j = 0; j < len; ++j) denom += (sc[j] = std::exp(sc[j] - mx));
          double* o = want.data() + (t * H + h) * D;
          double* oa = want_abs.data() + (t * H + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = oa[d] = 0;
          for (int64_t j = 0; j < len; ++j) {
            const double* vr = vq[s].data() + (j * KVH + kvh) * D;
            for (int64_t d = 0; d < D; ++d) {
              o[d] += sc[j] / denom * vr[d];
              oa[d] += sc[j] / denom * std::fabs(vr[d]);
            }
          }
        }
      }
    }
  }

  // Device side.
  const cudaStream_t st = stream();
  auto k_cache = PoisonedBytes(cache_bytes, st);
  auto v_cache = PoisonedBytes(cache_bytes, st);
  ASSERT_TRUE(k_cache.ok() && v_cache.ok());
  {
    const std::vector<uint8_t> hk = EncodeAct(hist_k, c.act), hv = EncodeAct(hist_v, c.act);
    auto dk = UploadBytes(hk.data(), hk.size(), st);
    auto dv = UploadBytes(hv.data(), hv.size(), st);
    auto ds = UploadBytes(hist_slots.data(), hist_slots.size() * 4, st);
    ASSERT_TRUE(dk.ok() && dv.ok() && ds.ok());
    QSHARD_ASSERT_OK(LaunchKvWrite(dk->get(), dv->get(), c.act,
                                   static_cast<int64_t>(hist_slots.size()), KVH, D,
                                   ds->as<int32_t>(), k_cache->get(), v_cache->get(), c.cache, bs,
                                   c.k_scale, c.v_scale, st));
    QSHARD_ASSERT_OK(stream_.Synchronize());
  }
  const std::vector<uint8_t> sk = EncodeAct(step_k, c.act), sv = EncodeAct(step_v, c.act);
  const std::vector<uint8_t> qb = EncodeAct(q, c.act);
  auto d_sk = UploadBytes(sk.data(), sk.size(), st);
  auto d_sv = UploadBytes(sv.data(), sv.size(), st);
  auto d_slots = UploadBytes(step_slots.data(), step_slots.size() * 4, st);
  auto d_q = UploadBytes(qb.data(), qb.size(), st);
  auto d_pos = UploadBytes(positions.data(), positions.size() * 4, st);
  auto d_seq = UploadBytes(token_seq.data(), token_seq.size() * 4, st);
  auto d_qs = UploadBytes(query_start.data(), query_start.size() * 4, st);
  auto d_cl = UploadBytes(context_lens.data(), context_lens.size() * 4, st);
  auto d_bt = UploadBytes(tables.data(), tables.size() * 4, st);
  auto d_out = PoisonedBytes(T * H * D * DTypeSize(c.act), st);
  const int64_t ws_bytes = c.workspace ? PagedAttentionWorkspaceBytes(T, H, D, max_ctx) : 0;
  auto d_ws = PoisonedBytes(ws_bytes, st);
  ASSERT_TRUE(d_sk.ok() && d_sv.ok() && d_slots.ok() && d_q.ok() && d_pos.ok() && d_seq.ok() &&
              d_qs.ok() && d_cl.ok() && d_bt.ok() && d_out.ok() && d_ws.ok());
  QSHARD_ASSERT_OK(LaunchKvWrite(d_sk->get(), d_sv->get(), c.act, T, KVH, D,
                                 d_slots->as<int32_t>(), k_cache->get(), v_cache->get(), c.cache,
                                 bs, c.k_scale, c.v_scale, st));

  PagedAttentionArgs a;
  a.q = d_q->get();
  a.out = d_out->get();
  a.dtype = c.act;
  a.k_cache = k_cache->get();
  a.v_cache = v_cache->get();
  a.cache_dtype = c.cache;
  a.k_scale = c.k_scale;
  a.v_scale = c.v_scale;
  a.num_tokens = T;
  a.num_seqs = S;
  a.num_heads = H;
  a.num_kv_heads = KVH;
  a.head_dim = D;
  a.block_size = bs;
  a.softmax_scale = static_cast<float>(scale);
  a.positions = d_pos->as<int32_t>();
  a.token_seq = d_seq->as<int32_t>();
  a.query_start = d_qs->as<int32_t>();
  a.context_lens = d_cl->as<int32_t>();
  a.block_tables = d_bt->as<int32_t>();
  a.max_blocks_per_seq = max_blocks;
  a.max_context_len = max_ctx;
  a.max_query_len = max_q;
  a.workspace = c.workspace ? d_ws->get() : nullptr;
  a.workspace_bytes = ws_bytes;
  // With the tensor-core switch on, every prefill / mixed case it supports must take it
  // (a silent fallback would test the CUDA-core kernel twice).
  const bool tensor_cores = max_q > 1 && TensorCorePrefillAttentionEnabled() &&
                            c.act == DType::kBF16 && c.cache != DType::kF32;
  if (tensor_cores) QSHARD_ASSERT_OK(CheckPagedPrefillAttentionTc(a));
  QSHARD_ASSERT_OK(LaunchPagedAttention(a, st));
  QSHARD_ASSERT_OK(stream_.Synchronize());

  // 1) The caches, byte for byte.
  std::vector<uint8_t> got_k(cache_bytes), got_v(cache_bytes);
  QSHARD_ASSERT_OK(k_cache->CopyToHost(got_k.data(), cache_bytes, st));
  QSHARD_ASSERT_OK(v_cache->CopyToHost(got_v.data(), cache_bytes, st));
  for (int which = 0; which < 2; ++which) {
    const auto& g = which == 0 ? got_k : got_v;
    const auto& w = which == 0 ? want_k : want_v;
    int64_t mismatches = 0;
    for (size_t i = 0; i < cache_bytes; ++i) {
      if (g[i] != w[i] && mismatches++ < 5) {
        const size_t row = i / row_bytes;
        ADD_FAILURE() << (which == 0 ? "K" : "V") << " cache byte " << i << " (block "
                      << row / (KVH * bs) << ", kv head " << (row / bs) % KVH << ", offset "
                      << row % bs << ", elem " << (i % row_bytes) / esz << "): got "
                      << int(g[i]) << ", want " << int(w[i]);
      }
    }
    EXPECT_EQ(mismatches, 0) << (which == 0 ? "K" : "V") << " cache bytes differ";
  }

  // 2) The attention output.
  std::vector<float> got(T * H * D);
  if (c.act == DType::kF32) {
    QSHARD_ASSERT_OK(d_out->CopyToHost(got.data(), got.size() * 4, st));
  } else {
    std::vector<uint16_t> bits(got.size());
    QSHARD_ASSERT_OK(d_out->CopyToHost(bits.data(), bits.size() * 2, st));
    for (size_t i = 0; i < bits.size(); ++i) got[i] = Bf16ToF32(bits[i]);
  }
  Tolerance tol = c.act == DType::kF32 ? Tolerance{1e-4, 1e-4, 2e-5}
                                       : Tolerance{5e-3, 1e-4, 4e-3};
  if (tensor_cores) tol.abs_weighted = std::ldexp(1.0, -8);  // bf16 P (file comment)
  ExpectClose(got, want, want_abs, T * H, D, H, tol,
              absl::StrCat(what, tensor_cores ? " tensor cores" : " CUDA cores"));

  // 3) Decode: the same launch with max_context_len rounded up to the CUDA-graph context
  // bucket (what a step replayed from a graph passes) must give the same bits: the split
  // boundaries may not depend on it.
  if (max_q == 1 && c.workspace) {
    const size_t out_bytes = static_cast<size_t>(T * H * D) * DTypeSize(c.act);
    auto d_out2 = PoisonedBytes(out_bytes, st);
    ASSERT_TRUE(d_out2.ok());
    PagedAttentionArgs b = a;
    b.out = d_out2->get();
    b.max_context_len = (max_ctx + 255) / 256 * 256;
    ASSERT_EQ(PagedAttentionWorkspaceBytes(T, H, D, b.max_context_len), ws_bytes);
    QSHARD_ASSERT_OK(LaunchPagedAttention(b, st));
    std::vector<uint8_t> first(out_bytes), second(out_bytes);
    QSHARD_ASSERT_OK(d_out->CopyToHost(first.data(), out_bytes, st));
    QSHARD_ASSERT_OK(d_out2->CopyToHost(second.data(), out_bytes, st));
    EXPECT_TRUE(first == second) << what << ": planned for context " << b.max_context_len
                                 << " instead of " << max_ctx << ", the output differs";

    // 4) Decode with the splits combined inside the attention kernel (tickets given,
    // switch on): the same bits as the separate combine, twice in a row (the kernel must
    // leave its tickets at zero for the next launch; a ticket left behind would make the
    // second launch's last split miss its turn and leave the poisoned output).
    const bool fused_before = FusedSplitCombineEnabled();
    SetFusedSplitCombine(true);
    const int64_t tickets = PagedAttentionSplitTickets(S, H);
    std::vector<int32_t> zeros(tickets, 0);
    auto d_tickets = UploadBytes(zeros.data(), zeros.size() * 4, st);
    ASSERT_TRUE(d_tickets.ok());
    for (int rep = 0; rep < 2; ++rep) {
      auto d_out3 = PoisonedBytes(out_bytes, st);
      ASSERT_TRUE(d_out3.ok());
      PagedAttentionArgs f = a;
      f.out = d_out3->get();
      f.split_counters = d_tickets->as<int32_t>();
      f.split_counters_len = tickets;
      const absl::Status launched = LaunchPagedAttention(f, st);
      std::vector<uint8_t> fused(out_bytes);
      std::vector<int32_t> left(tickets);
      const absl::Status copied = d_out3->CopyToHost(fused.data(), out_bytes, st);
      const absl::Status copied2 = d_tickets->CopyToHost(left.data(), left.size() * 4, st);
      SetFusedSplitCombine(fused_before);
      QSHARD_ASSERT_OK(launched);
      QSHARD_ASSERT_OK(copied);
      QSHARD_ASSERT_OK(copied2);
      SetFusedSplitCombine(true);
      EXPECT_TRUE(fused == first) << what << ": in-kernel split combine, launch " << rep
                                  << ", differs from the separate combine";
      EXPECT_TRUE(std::all_of(left.begin(), left.end(), [](int32_t x) { return x == 0; }))
          << what << ": tickets not back to zero after launch " << rep;
    }
    SetFusedSplitCombine(fused_before);
  }
}

std::vector<SeqSpec> Decode(std::initializer_list<int64_t> contexts) {
  std::vector<SeqSpec> v;
  for (int64_t c : contexts) v.push_back({c - 1, 1});
  return v;
}

TEST_F(CudaAttentionTest, DecodeBatch1) {
  uint32_t seed = 100;
  for (int64_t ctx : {1, 17, 1000, 4100}) {
    for (DType cache : {DType::kBF16, DType::kF32}) {
      AttnCase c{.name = "decode b1", .act = DType::kBF16, .cache = cache, .heads = 32,
                 .kv_heads = 8, .head_dim = 128, .block_size = 16, .seqs = Decode({ctx})};
      RunCase(c, ++seed);
      c.act = DType::kF32;
      RunCase(c, ++seed);
    }
  }
}

TEST_F(CudaAttentionTest, DecodeBatch5MixedLengths) {
  uint32_t seed = 200;
  AttnCase c{.name = "decode b5", .act = DType::kBF16, .cache = DType::kF8E4M3, .heads = 12,
             .kv_heads = 4, .head_dim = 64, .block_size = 32,
             // v_scale: |v| / scale reaches 526 > 448, so ~15% of the V codes saturate
             // (the reference holds the same saturated values).
             .seqs = Decode({1, 33, 100, 517, 2000}), .k_scale = 0.011f, .v_scale = 0.0019f};
  RunCase(c, ++seed);
  c.act = DType::kF32;
  RunCase(c, ++seed);
  c.cache = DType::kF8E5M2;
  c.k_scale = 0.5f;
  c.v_scale = 0.125f;
  RunCase(c, ++seed);
  c.cache = DType::kF16;
  c.heads = c.kv_heads = 4;  // GQA ratio 1
  RunCase(c, ++seed);
  c.cache = DType::kF32;
  c.heads = 16;  // ratio 4, batch of decodes with no workspace: one CTA per sequence/head group
  c.workspace = false;
  RunCase(c, ++seed);
  // A big decode batch: 64 sequences, enough CTAs that no split is taken.
  std::vector<SeqSpec> many;
  for (int i = 0; i < 64; ++i) many.push_back({(i * 37) % 300, 1});
  AttnCase b{.name = "decode b64", .act = DType::kBF16, .cache = DType::kBF16, .heads = 32,
             .kv_heads = 8, .head_dim = 128, .block_size = 16, .seqs = many};
  RunCase(b, ++seed);
}

// Prefill and mixed steps, once per kernel: the CUDA-core one and the tensor-core one
// (SetTensorCorePrefillAttention; cases it does not support, f32 activations or caches,
// still run the CUDA-core kernel there).
enum class PrefillKernel { kCudaCores, kTensorCores };

class CudaPrefillAttentionTest : public CudaAttentionTest,
                                 public ::testing::WithParamInterface<PrefillKernel> {
 protected:
  void SetUp() override {
    CudaAttentionTest::SetUp();
    if (IsSkipped()) return;
    saved_ = TensorCorePrefillAttentionEnabled();
    SetTensorCorePrefillAttention(GetParam() == PrefillKernel::kTensorCores);
  }
  void TearDown() override { SetTensorCorePrefillAttention(saved_); }

  bool saved_ = false;
};

INSTANTIATE_TEST_SUITE_P(Kernels, CudaPrefillAttentionTest,
                         ::testing::Values(PrefillKernel::kCudaCores, PrefillKernel::kTensorCores),
                         [](const ::testing::TestParamInfo<PrefillKernel>& info) {
                           return std::string(info.param == PrefillKernel::kTensorCores
                                                  ? "TensorCores"
                                                  : "CudaCores");
                         });

TEST_P(CudaPrefillAttentionTest, PrefillOneSequence) {
  uint32_t seed = 300;
  for (int64_t n : {1, 33, 300}) {
    AttnCase c{.name = "prefill", .act = DType::kF32, .cache = DType::kBF16, .heads = 4,
               .kv_heads = 4, .head_dim = 128, .block_size = 16, .seqs = {{0, n}}};
    RunCase(c, ++seed);
    c.heads = 12;  // ratio 3
    c.kv_heads = 4;
    c.head_dim = 64;
    c.block_size = 32;
    c.act = DType::kBF16;
    RunCase(c, ++seed);
    c.heads = 32;  // ratio 4, fp8 with scales != 1
    c.kv_heads = 8;
    c.head_dim = 128;
    c.cache = DType::kF8E4M3;
    c.k_scale = 0.013f;
    c.v_scale = 0.006f;
    RunCase(c, ++seed);
  }
}

TEST_P(CudaPrefillAttentionTest, MixedPrefillChunkAndDecodes) {
  uint32_t seed = 400;
  // One prefill chunk of 57 tokens on top of 40 cached ones, and two decode tokens.
  AttnCase c{.name = "mixed", .act = DType::kF32, .cache = DType::kF32, .heads = 8,
             .kv_heads = 2, .head_dim = 64, .block_size = 16,
             .seqs = {{40, 57}, {99, 1}, {4, 1}}};
  RunCase(c, ++seed);
  c.act = DType::kBF16;
  c.cache = DType::kF8E4M3;
  c.k_scale = 0.02f;
  c.v_scale = 0.004f;
  c.head_dim = 128;
  c.block_size = 32;
  RunCase(c, ++seed);
  c.cache = DType::kBF16;
  c.heads = 6;  // ratio 3
  c.seqs = {{1, 1}, {700, 130}, {0, 5}};
  RunCase(c, ++seed);
}

// Many K/V tiles (64 positions each), a query length that is not a multiple of the query
// tile, and the causal diagonal crossing tiles at every offset.
TEST_P(CudaPrefillAttentionTest, LongPrefill) {
  uint32_t seed = 500;
  AttnCase c{.name = "long prefill", .act = DType::kBF16, .cache = DType::kBF16, .heads = 8,
             .kv_heads = 2, .head_dim = 128, .block_size = 16, .seqs = {{0, 1037}}};
  RunCase(c, ++seed);
  c.heads = c.kv_heads = 4;  // GQA ratio 1: 64 tokens per query tile
  c.head_dim = 64;
  c.seqs = {{0, 1100}};
  RunCase(c, ++seed);
}

// Chunked prefill: the chunk starts at a cached position > 0, so its first query tile sees
// whole earlier tiles unmasked and the diagonal lands mid-tile; block sizes 16, 5 (K/V
// tiles span partial blocks) and 1.
TEST_P(CudaPrefillAttentionTest, ChunkedPrefill) {
  uint32_t seed = 600;
  for (int64_t bs : {16, 5, 1}) {
    for (int64_t d : {64, 128}) {
      AttnCase c{.name = "chunk", .act = DType::kBF16, .cache = DType::kBF16, .heads = 8,
                 .kv_heads = 2, .head_dim = d, .block_size = bs, .seqs = {{300, 77}}};
      RunCase(c, ++seed);
      c.seqs = {{130, 150}, {64, 64}};  // two chunks; one starts on a tile boundary
      RunCase(c, ++seed);
    }
  }
  // A long history under a short chunk: many fully visible tiles, then the diagonal.
  AttnCase c{.name = "chunk after 2000", .act = DType::kBF16, .cache = DType::kBF16,
             .heads = 8, .kv_heads = 2, .head_dim = 128, .block_size = 16,
             .seqs = {{2000, 130}}};
  RunCase(c, ++seed);
}

// GQA ratios 1, 4, 8 (query heads of a group share the K/V tiles), and 3 and 6 (a query
// tile of 21 / 10 tokens leaves padding rows).
TEST_P(CudaPrefillAttentionTest, GqaGroups) {
  uint32_t seed = 700;
  for (int64_t heads : {4, 16, 32, 12, 24}) {
    AttnCase c{.name = "gqa", .act = DType::kBF16, .cache = DType::kBF16, .heads = heads,
               .kv_heads = 4, .head_dim = 128, .block_size = 16, .seqs = {{64, 100}, {0, 33}}};
    RunCase(c, ++seed);
    c.head_dim = 64;
    c.block_size = 5;
    RunCase(c, ++seed);
  }
}

// Several sequences of mixed query lengths (1 included) in one step, for every cache dtype
// the tensor-core kernel takes: f16 (f16 mma), e4m3 / e5m2 (dequantized codes, scales
// outside the mma).
TEST_P(CudaPrefillAttentionTest, MixedQueryLengthsAndCaches) {
  uint32_t seed = 800;
  const std::vector<SeqSpec> seqs = {{0, 70}, {33, 1}, {129, 64}, {5, 3}, {0, 1}, {200, 17}};
  for (int64_t d : {64, 128}) {
    AttnCase c{.name = "mixed lengths", .act = DType::kBF16, .cache = DType::kF16, .heads = 16,
               .kv_heads = 2, .head_dim = d, .block_size = 16, .seqs = seqs};
    RunCase(c, ++seed);
    c.cache = DType::kBF16;
    c.block_size = 7;
    RunCase(c, ++seed);
    c.cache = DType::kF8E4M3;
    c.k_scale = 0.013f;
    c.v_scale = 0.006f;
    RunCase(c, ++seed);
    c.cache = DType::kF8E5M2;
    c.k_scale = 0.5f;
    c.v_scale = 0.125f;
    c.block_size = 16;
    RunCase(c, ++seed);
  }
}

TEST_F(CudaAttentionTest, RejectsUnsupportedShapes) {
  PagedAttentionArgs a;
  a.num_tokens = a.num_seqs = 1;
  a.num_heads = 8;
  a.num_kv_heads = 2;
  a.block_size = 16;
  a.max_context_len = a.max_query_len = 1;
  a.head_dim = 80;
  EXPECT_EQ(LaunchPagedAttention(a, stream()).code(), absl::StatusCode::kInvalidArgument);
  a.head_dim = 64;
  a.num_kv_heads = 3;
  EXPECT_EQ(LaunchPagedAttention(a, stream()).code(), absl::StatusCode::kInvalidArgument);
  a.num_kv_heads = 2;
  a.cache_dtype = DType::kI8;
  EXPECT_EQ(LaunchPagedAttention(a, stream()).code(), absl::StatusCode::kInvalidArgument);
}

// Host-side (no GPU needed): the tensor-core launcher names what it does not support and
// returns before touching the device.
TEST(CudaPrefillAttentionTcArgs, RejectsUnsupported) {
  alignas(16) static uint8_t dummy[64];
  PagedAttentionArgs a;
  a.q = a.k_cache = a.v_cache = dummy;
  a.out = dummy;
  a.dtype = DType::kBF16;
  a.cache_dtype = DType::kBF16;
  a.num_tokens = a.num_seqs = 1;
  a.num_heads = 8;
  a.num_kv_heads = 2;
  a.head_dim = 128;
  a.block_size = 16;
  a.max_context_len = a.max_query_len = 2;
  EXPECT_TRUE(CheckPagedPrefillAttentionTc(a).ok());
  auto rejects = [&](const PagedAttentionArgs& bad, const std::string& what) {
    const absl::Status st = LaunchPagedPrefillAttentionTc(bad, nullptr);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_NE(std::string(st.message()).find(what), std::string::npos) << st;
    EXPECT_EQ(CheckPagedPrefillAttentionTc(bad).code(), absl::StatusCode::kInvalidArgument);
  };
  PagedAttentionArgs b = a;
  b.dtype = DType::kF32;
  rejects(b, "activation dtype float32");
  b = a;
  b.cache_dtype = DType::kF32;
  rejects(b, "cache dtype float32");
  b = a;
  b.head_dim = 80;
  rejects(b, "head_dim 80");
  b = a;
  b.num_kv_heads = 3;
  rejects(b, "kv_heads=3");
  b = a;
  b.cache_dtype = DType::kF8E4M3;
  b.k_scale = 0.0f;
  rejects(b, "fp8 scales");
  b = a;
  b.q = dummy + 2;
  rejects(b, "16-byte aligned");
}

TEST(CudaPrefillAttentionTcArgs, Switch) {
  const bool saved = TensorCorePrefillAttentionEnabled();
  SetTensorCorePrefillAttention(true);
  EXPECT_TRUE(TensorCorePrefillAttentionEnabled());
  SetTensorCorePrefillAttention(false);
  EXPECT_FALSE(TensorCorePrefillAttentionEnabled());
  SetTensorCorePrefillAttention(saved);
}

// Host-side knobs: no GPU needed.
TEST(CudaAttentionKnobs, MinSplitLengthIsValidatedAndChangesTheWorkspace) {
  const int64_t saved = AttentionMinSplitLen();
  for (int64_t bad : {0, 31, 33, 100, 8192}) {
    const absl::Status st = SetAttentionMinSplitLen(bad);
    EXPECT_FALSE(st.ok()) << bad;
    EXPECT_NE(st.ToString().find("multiple of 32"), std::string::npos) << st;
    EXPECT_EQ(AttentionMinSplitLen(), saved) << "a rejected value must not stick";
  }
  // 1 token, 32 heads, D 128, context 1000 (planned for 1024): 1024 / 32 = 32 splits of
  // 32 positions against 1024 / 256 = 4 of 256.
  QSHARD_ASSERT_OK(SetAttentionMinSplitLen(32));
  const int64_t many = PagedAttentionWorkspaceBytes(1, 32, 128, 1000);
  QSHARD_ASSERT_OK(SetAttentionMinSplitLen(256));
  const int64_t few = PagedAttentionWorkspaceBytes(1, 32, 128, 1000);
  QSHARD_ASSERT_OK(SetAttentionMinSplitLen(saved));
  EXPECT_EQ(many, 32 * 32 * (128 + 2) * 4);
  EXPECT_EQ(few, 4 * 32 * (128 + 2) * 4);
  EXPECT_EQ(PagedAttentionSplitTickets(5, 32), 5 * 32);
}

TEST(CudaAttentionKnobs, FusedCombineSwitch) {
  const bool saved = FusedSplitCombineEnabled();
  SetFusedSplitCombine(true);
  EXPECT_TRUE(FusedSplitCombineEnabled());
  SetFusedSplitCombine(false);
  EXPECT_FALSE(FusedSplitCombineEnabled());
  SetFusedSplitCombine(saved);
}

}  // namespace
}  // namespace qshard::cuda
