// The fused q|k|v split + RoPE + KV write (cuda::LaunchQkvRopeKvWrite, attention.h) against
// the three launches it replaces: LaunchSplitColumns(qkv -> q, k, v), LaunchRope(q, k),
// LaunchKvWrite(k, v). Those three are each checked against the CPU in elementwise_test.cc
// and attention_test.cc; the fused launch must give the same bits (it calls the same
// rotation, rope.cuh, and the same cache store), so the check here is exact equality.
//
// Method per case: random qkv rows (bf16-representable values for bf16 activations),
// random positions up to 100k (large angles), a slot mapping over a shuffled set of cache
// slots with one negative (skipped) slot when T > 1, caches poisoned with 0xFF in both runs.
// q / k / v outputs are poisoned with different bytes in the two runs (0xFF and 0x7F), so
// equal outputs also prove that both runs wrote every element; every slot the mapping names
// must have been written (its row no longer all 0xFF) and nothing else touched.
//
// Without a CUDA device the launch tests skip; the argument checks run anyway (they return
// before any CUDA call).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/backend/cuda/elementwise.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "runtime/checkpoint/rope_frequencies.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

using ::qshard::cuda::testing::Name;

struct FusedCase {
  DType act = DType::kBF16;
  DType cache = DType::kBF16;
  int64_t tokens = 1, q_heads = 32, kv_heads = 8, head_dim = 128, block_size = 16;
  float k_scale = 1.0f, v_scale = 1.0f;
};

std::string Describe(const FusedCase& c) {
  return absl::StrCat("[act ", Name(c.act), ", cache ", Name(c.cache), ", T ", c.tokens, ", H ",
                      c.q_heads, ", KVH ", c.kv_heads, ", D ", c.head_dim, ", bs ", c.block_size,
                      "]");
}

class CudaQkvRopeKvTest : public ::qshard::cuda::testing::CudaStreamTest {
 protected:
  void RunCase(const FusedCase& c, uint32_t seed);
};

absl::StatusOr<DeviceBuffer> Filled(size_t bytes, uint8_t value, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(bytes, 16)));
  QSHARD_RETURN_IF_ERROR(buf.Fill(value, stream));
  return buf;
}

absl::StatusOr<DeviceBuffer> Upload(const void* p, size_t bytes, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(bytes, 16)));
  if (bytes > 0) QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(p, bytes, stream));
  return buf;
}

void CudaQkvRopeKvTest::RunCase(const FusedCase& c, uint32_t seed) {
  const std::string what = Describe(c);
  SCOPED_TRACE(what);
  std::mt19937 rng(seed);
  const int64_t T = c.tokens, D = c.head_dim;
  const int64_t qc = c.q_heads * D, kc = c.kv_heads * D, width = qc + 2 * kc;
  const size_t es = DTypeSize(c.act);

  // qkv [T, width] in the activation dtype.
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<uint8_t> qkv(static_cast<size_t>(T * width) * es);
  for (int64_t i = 0; i < T * width; ++i) {
    const float x = normal(rng);
    if (c.act == DType::kBF16) {
      const uint16_t h = F32ToBf16(x);
      std::memcpy(qkv.data() + 2 * i, &h, 2);
    } else {
      std::memcpy(qkv.data() + 4 * i, &x, 4);
    }
  }
  std::vector<int32_t> positions(T);
  std::uniform_int_distribution<int32_t> pos(0, 100000);
  for (int32_t& p : positions) p = pos(rng);
  const int64_t num_blocks = (T + 3 + c.block_size - 1) / c.block_size + 1;
  std::vector<int32_t> slots(num_blocks * c.block_size);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(T);
  if (T > 1) slots[T / 2] = -1;  // a padding token: no cache write
  RopeConfig rope;
  rope.theta = 500000.0;
  const std::vector<float> inv_freq = RopeInvFrequencies(rope, D);

  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_qkv, Upload(qkv.data(), qkv.size(), stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_pos,
                              Upload(positions.data(), positions.size() * 4, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_slots,
                              Upload(slots.data(), slots.size() * 4, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_freq,
                              Upload(inv_freq.data(), inv_freq.size() * 4, stream()));
  const size_t cache_bytes =
      static_cast<size_t>(num_blocks * c.kv_heads * c.block_size * D) * DTypeSize(c.cache);

  struct Run {
    std::vector<uint8_t> q, k, v, kc, vc;
  };
  auto run = [&](bool fused, uint8_t poison, Run* out) {
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer dq, Filled(T * qc * es, poison, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer dk, Filled(T * kc * es, poison, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer dv, Filled(T * kc * es, poison, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer dkc, Filled(cache_bytes, 0xFF, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer dvc, Filled(cache_bytes, 0xFF, stream()));
    if (fused) {
      QkvRopeKvWriteArgs a;
      a.qkv = d_qkv.get();
      a.q = dq.get();
      a.k = dk.get();
      a.v = dv.get();
      a.act_dtype = c.act;
      a.num_tokens = T;
      a.q_heads = c.q_heads;
      a.kv_heads = c.kv_heads;
      a.head_dim = D;
      a.positions = d_pos.as<int32_t>();
      a.inv_freq = d_freq.as<float>();
      a.slot_mapping = d_slots.as<int32_t>();
      a.k_cache = dkc.get();
      a.v_cache = dvc.get();
      a.cache_dtype = c.cache;
      a.block_size = c.block_size;
      a.k_scale = c.k_scale;
      a.v_scale = c.v_scale;
      QSHARD_ASSERT_OK(LaunchQkvRopeKvWrite(a, stream()));
    } else {
      void* outs[] = {dq.get(), dk.get(), dv.get()};
      const int64_t cols[] = {qc, kc, kc};
      QSHARD_ASSERT_OK(LaunchSplitColumns(d_qkv.get(), c.act, T, outs, cols, stream()));
      QSHARD_ASSERT_OK(LaunchRope(dq.get(), dk.get(), c.act, T, c.q_heads, c.kv_heads, D,
                                  d_pos.as<int32_t>(), d_freq.as<float>(), stream()));
      QSHARD_ASSERT_OK(LaunchKvWrite(dk.get(), dv.get(), c.act, T, c.kv_heads, D,
                                     d_slots.as<int32_t>(), dkc.get(), dvc.get(), c.cache,
                                     c.block_size, c.k_scale, c.v_scale, stream()));
    }
    out->q.resize(T * qc * es);
    out->k.resize(T * kc * es);
    out->v.resize(T * kc * es);
    out->kc.resize(cache_bytes);
    out->vc.resize(cache_bytes);
    QSHARD_ASSERT_OK(dq.CopyToHost(out->q.data(), out->q.size(), stream()));
    QSHARD_ASSERT_OK(dk.CopyToHost(out->k.data(), out->k.size(), stream()));
    QSHARD_ASSERT_OK(dv.CopyToHost(out->v.data(), out->v.size(), stream()));
    QSHARD_ASSERT_OK(dkc.CopyToHost(out->kc.data(), cache_bytes, stream()));
    QSHARD_ASSERT_OK(dvc.CopyToHost(out->vc.data(), cache_bytes, stream()));
  };
  Run separate, fused;
  ASSERT_NO_FATAL_FAILURE(run(false, 0x7F, &separate));
  ASSERT_NO_FATAL_FAILURE(run(true, 0xFF, &fused));
  EXPECT_TRUE(fused.q == separate.q) << "q differs";
  EXPECT_TRUE(fused.k == separate.k) << "k differs";
  EXPECT_TRUE(fused.v == separate.v) << "v differs";
  EXPECT_TRUE(fused.kc == separate.kc) << "K cache differs";
  EXPECT_TRUE(fused.vc == separate.vc) << "V cache differs";
  // q's rotation really happened: not a copy of qkv's q columns (positions are > 0).
  EXPECT_NE(std::memcmp(fused.q.data(), qkv.data(), static_cast<size_t>(qc) * es), 0);
  // Every named slot was written, in both caches.
  const size_t row = static_cast<size_t>(D) * DTypeSize(c.cache);
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    const int64_t blk = slots[t] / c.block_size, off = slots[t] % c.block_size;
    for (int64_t h = 0; h < c.kv_heads; ++h) {
      const size_t at = static_cast<size_t>((blk * c.kv_heads + h) * c.block_size + off) * row;
      const auto untouched = [&](const std::vector<uint8_t>& cache) {
        return std::all_of(cache.begin() + at, cache.begin() + at + row,
                           [](uint8_t b) { return b == 0xFF; });
      };
      EXPECT_FALSE(untouched(fused.kc)) << "token " << t << " kv head " << h << ": K not written";
      EXPECT_FALSE(untouched(fused.vc)) << "token " << t << " kv head " << h << ": V not written";
    }
  }
}

TEST_F(CudaQkvRopeKvTest, DecodeShapes) {
  uint32_t seed = 1;
  for (DType act : {DType::kBF16, DType::kF32}) {
    for (DType cache : {DType::kBF16, DType::kF32, DType::kF16}) {
      RunCase({.act = act, .cache = cache, .tokens = 1}, ++seed);
      RunCase({.act = act,
               .cache = cache,
               .tokens = 5,
               .q_heads = 12,
               .kv_heads = 4,
               .head_dim = 64,
               .block_size = 32},
              ++seed);
    }
  }
}

TEST_F(CudaQkvRopeKvTest, Fp8CachesAndPrefill) {
  uint32_t seed = 100;
  for (DType cache : {DType::kF8E4M3, DType::kF8E5M2}) {
    // v_scale small enough that some V codes saturate.
    RunCase(
        {.act = DType::kBF16, .cache = cache, .tokens = 37, .k_scale = 0.011f, .v_scale = 0.0019f},
        ++seed);
    RunCase({.act = DType::kF32,
             .cache = cache,
             .tokens = 3,
             .q_heads = 8,
             .kv_heads = 8,
             .head_dim = 64,
             .k_scale = 0.02f,
             .v_scale = 0.5f},
            ++seed);
  }
  RunCase({.act = DType::kBF16,
           .cache = DType::kBF16,
           .tokens = 300,
           .q_heads = 32,
           .kv_heads = 8,
           .head_dim = 128,
           .block_size = 16},
          ++seed);
}

// Argument checks return before any CUDA call: these run without a GPU too.
TEST(CudaQkvRopeKvArgs, RejectsBadArguments) {
  int dummy[64] = {};
  QkvRopeKvWriteArgs a;
  a.qkv = a.q = a.k = a.v = a.k_cache = a.v_cache = dummy;
  a.positions = a.slot_mapping = dummy;
  a.inv_freq = reinterpret_cast<const float*>(dummy);
  a.num_tokens = 1;
  a.q_heads = 4;
  a.kv_heads = 2;
  a.head_dim = 64;
  a.block_size = 16;
  auto rejects = [](const QkvRopeKvWriteArgs& b, const std::string& what) {
    const absl::Status st = LaunchQkvRopeKvWrite(b, nullptr);
    EXPECT_FALSE(st.ok()) << what;
    EXPECT_NE(st.ToString().find(what), std::string::npos) << st;
  };
  QkvRopeKvWriteArgs b = a;
  b.act_dtype = DType::kF16;
  rejects(b, "activation dtype");
  b = a;
  b.cache_dtype = DType::kI32;
  rejects(b, "cache dtype");
  b = a;
  b.head_dim = 63;
  rejects(b, "head_dim=63");
  b = a;
  b.kv_heads = 0;
  rejects(b, "kv_heads=0");
  b = a;
  b.cache_dtype = DType::kF8E4M3;
  b.v_scale = 0.0f;
  rejects(b, "fp8 scales");
  b = a;
  b.slot_mapping = nullptr;
  rejects(b, "null pointer");
  // No tokens: nothing to do, accepted without touching the device.
  b = a;
  b.num_tokens = 0;
  EXPECT_TRUE(LaunchQkvRopeKvWrite(b, nullptr).ok());
}

TEST(CudaQkvRopeKvArgs, Switch) {
  const bool saved = FusedRopeKvWriteEnabled();
  SetFusedRopeKvWrite(true);
  EXPECT_TRUE(FusedRopeKvWriteEnabled());
  SetFusedRopeKvWrite(false);
  EXPECT_FALSE(FusedRopeKvWriteEnabled());
  SetFusedRopeKvWrite(saved);
}

}  // namespace
}  // namespace qshard::cuda
