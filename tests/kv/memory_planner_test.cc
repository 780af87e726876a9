// The memory planner against the seed's figures for Llama-3.1-70B (weights in fp16 / fp8 /
// int4, KV cache for 2048 tokens x 32 users) and its own invariants. GB = 1e9 bytes.
//
// About the seed's "KV cache for 2048 tokens x 32 users: about 8.4 GB in fp16": with the
// stated 70B shape (80 layers, 8 KV heads, head_dim 128) a token takes
// 2 x 80 x 8 x 128 x 2 B = 327,680 B (320 KiB), and 65,536 tokens take 21,474,836,480 B
// (21.5 GB, exactly 20 GiB). The 8.4 figure is what a 32-layer model with 8 KV heads of 128
// (Llama-3.1-8B: 128 KiB per token) gives when 128 KiB is read as 128,000 B:
// 128,000 x 65,536 = 8.39e9. The exact 8B figure is 131,072 x 65,536 = 8,589,934,592 B
// (8.6 GB, 8 GiB). The tests assert the exact values for both shapes.
#include "kv/memory_planner.h"

#include <string>

#include "gtest/gtest.h"
#include "kv/model_shapes.h"

namespace qshard {
namespace {

constexpr double kGB = 1e9;

ModelConfig Shape(const std::string& name) { return ModelShapeByName(name).value(); }

WeightBytes Weights(const std::string& shape, WeightPlanSpec spec) {
  auto w = EstimateWeightBytes(Shape(shape), spec);
  EXPECT_TRUE(w.ok()) << w.status();
  return *w;
}

// Llama-3.1-70B, by hand: per layer q 8192^2, k and v 8192 x 1024, o 8192^2, gate/up/down
// 8192 x 28672; 80 layers.
constexpr int64_t k70BLinearParams =
    80 * (2 * 8192LL * 8192 + 2 * 8192LL * 1024 + 3 * 8192LL * 28672);  // 68,451,041,280
// Embedding + lm_head (untied) + 2 norms per layer + the final norm.
constexpr int64_t k70BOtherParams = 2 * 128256LL * 8192 + (2 * 80 + 1) * 8192LL;
// Sum of output channels over the 7 linears of a layer, times 80 layers.
constexpr int64_t k70BOutputChannels = 80 * (8192 + 1024 + 1024 + 8192 + 2 * 28672 + 8192);

TEST(MemoryPlannerTest, Llama70BWeightsFp16Is140GB) {
  static_assert(k70BLinearParams == 68'451'041'280);
  WeightPlanSpec spec;
  spec.format = WeightPlanFormat::kF16;
  const WeightBytes w = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(w.num_parameters, k70BLinearParams + k70BOtherParams);
  EXPECT_EQ(w.quantized, 2 * k70BLinearParams);
  EXPECT_EQ(w.unquantized, 2 * k70BOtherParams);
  EXPECT_EQ(w.scales, 0);
  EXPECT_EQ(w.zero_points, 0);
  EXPECT_EQ(w.Total(), 141'107'412'992);
  EXPECT_NEAR(w.Total() / kGB, 140.0, 1.5);  // the seed's "140 GB" (70B params x 2 bytes)
}

TEST(MemoryPlannerTest, Llama70BWeightsFp8Is70GB) {
  WeightPlanSpec spec;
  spec.format = WeightPlanFormat::kFp8;
  const WeightBytes w = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(w.quantized, k70BLinearParams);       // 1 byte per weight
  EXPECT_EQ(w.scales, 4 * k70BOutputChannels);    // fp32 per output channel: 26.9 MB
  EXPECT_EQ(w.unquantized, 2 * k70BOtherParams);  // 4.2 GB embeddings + lm_head in bf16
  EXPECT_NEAR(w.quantized / kGB, 70.0, 2.0);      // the seed's "70 GB"
  EXPECT_NEAR(w.Total() / kGB, 72.68, 0.01);      // + the 16-bit embeddings / lm_head
  EXPECT_EQ(w.zero_points, 0);
}

TEST(MemoryPlannerTest, Llama70BWeightsInt4Is35GBWithScalesApart) {
  WeightPlanSpec spec;
  spec.format = WeightPlanFormat::kGptq;
  spec.bits = 4;
  spec.group_size = 128;
  spec.symmetric = true;
  const WeightBytes w = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(w.quantized, k70BLinearParams / 2);     // 34.2 GB
  EXPECT_NEAR(w.quantized / kGB, 35.0, 1.0);        // the seed's "35 GB"
  EXPECT_EQ(w.scales, k70BLinearParams / 128 * 2);  // one fp16 per 128 weights: 1.07 GB
  EXPECT_EQ(w.zero_points, 0);                      // symmetric: no zero points resident
  EXPECT_EQ(w.unquantized, 2 * k70BOtherParams);

  // Asymmetric GPTQ and AWQ add 4-bit zero points per group: 1/4 of the scales' bytes.
  spec.symmetric = false;
  const WeightBytes asym = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(asym.zero_points, k70BLinearParams / 128 / 2);
  EXPECT_EQ(asym.quantized, w.quantized);
  spec.format = WeightPlanFormat::kAwq;
  const WeightBytes awq = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(awq.quantized, w.quantized);
  EXPECT_EQ(awq.scales, w.scales);
  EXPECT_EQ(awq.zero_points, asym.zero_points);

  // 8-bit GPTQ: twice the packed bytes, same scales.
  spec.format = WeightPlanFormat::kGptq;
  spec.bits = 8;
  spec.symmetric = true;
  const WeightBytes g8 = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(g8.quantized, k70BLinearParams);
  EXPECT_EQ(g8.scales, w.scales);

  // Per-channel (group_size -1): one scale per output channel.
  spec.bits = 4;
  spec.group_size = -1;
  EXPECT_EQ(Weights("llama-3.1-70b", spec).scales, 2 * k70BOutputChannels);
}

TEST(MemoryPlannerTest, Int8HasPerChannelScales) {
  WeightPlanSpec spec;
  spec.format = WeightPlanFormat::kInt8;
  const WeightBytes w = Weights("llama-3.1-70b", spec);
  EXPECT_EQ(w.quantized, k70BLinearParams);
  EXPECT_EQ(w.scales, 4 * k70BOutputChannels);
}

TEST(MemoryPlannerTest, TiedEmbeddingsAndBiasesCounted) {
  // llama-3.2-1b ties lm_head to the embedding: counted once.
  const WeightBytes tied = Weights("llama-3.2-1b", WeightPlanSpec{});
  EXPECT_EQ(tied.unquantized, 2 * (128256LL * 2048 + 33 * 2048));
  // qwen2.5-7b: q/k/v biases (3584 + 2 x 512 per layer) stay 16-bit under fp8.
  WeightPlanSpec fp8;
  fp8.format = WeightPlanFormat::kFp8;
  const WeightBytes q = Weights("qwen2.5-7b", fp8);
  EXPECT_EQ(q.unquantized, 2 * (2 * 152064LL * 3584 + 57 * 3584LL + 28 * (3584 + 1024)));
}

MemoryPlanRequest Request(const std::string& shape, KvCacheDType kv, int64_t len, int64_t seqs) {
  MemoryPlanRequest r;
  r.model = Shape(shape);
  r.kv_cache_dtype = kv;
  r.max_model_len = len;
  r.max_num_seqs = seqs;
  r.device_memory_bytes = 80'000'000'000;
  return r;
}

TEST(MemoryPlannerTest, KvCacheFor2048TokensX32Users) {
  // 70B shape as stated: 327,680 B per token, 21.47 GB for 65,536 tokens (not 8.4 GB).
  MemoryPlan p = PlanMemory(Request("llama-3.1-70b", KvCacheDType::kF16, 2048, 32)).value();
  EXPECT_EQ(p.kv_bytes_per_token, 2 * 80 * 8 * 128 * 2);
  EXPECT_EQ(p.kv_bytes_per_token, 327'680);
  EXPECT_EQ(p.kv_bytes_total, 21'474'836'480);
  MemoryPlan p8 = PlanMemory(Request("llama-3.1-70b", KvCacheDType::kFp8E4M3, 2048, 32)).value();
  EXPECT_EQ(p8.kv_bytes_per_token, 163'840);
  EXPECT_EQ(p8.kv_bytes_total * 2, p.kv_bytes_total);  // half in fp8

  // The seed's 8.4 GB is the 8B shape (32 layers): 128 KiB per token.
  MemoryPlan s = PlanMemory(Request("llama-3.1-8b", KvCacheDType::kF16, 2048, 32)).value();
  EXPECT_EQ(s.kv_bytes_per_token, 131'072);
  EXPECT_EQ(s.kv_bytes_total, 8'589'934'592);
  EXPECT_NEAR(s.kv_bytes_total / kGB, 8.4, 0.2);
  MemoryPlan s8 = PlanMemory(Request("llama-3.1-8b", KvCacheDType::kFp8E5M2, 2048, 32)).value();
  EXPECT_EQ(s8.kv_bytes_total * 2, s.kv_bytes_total);
}

TEST(MemoryPlannerTest, Fp8KvDoublesTheBlocksForTheSameMemory) {
  const ModelConfig m = Shape("llama-3.1-8b");
  const KvCacheSpec bf16 = KvCacheSpecFor(m, DType::kBF16, 16);
  const KvCacheSpec fp8 = KvCacheSpecFor(m, DType::kF8E4M3, 16);
  EXPECT_EQ(bf16.BytesPerBlock(), 16 * 131'072);
  const int64_t budget = 10'000 * bf16.BytesPerBlock();
  EXPECT_EQ(KvBlocksForBudget(bf16, budget), 10'000);
  EXPECT_EQ(KvBlocksForBudget(fp8, budget), 20'000);
  EXPECT_EQ(KvBlocksForBudget(bf16, budget - 1), 9'999);
  EXPECT_EQ(KvBlocksForBudget(bf16, 0), 0);
  EXPECT_EQ(KvBlocksForBudget(bf16, -5), 0);

  // Through the whole plan: the leftover after weights and activations is the same, so the
  // fp8 pool has twice the blocks (up to one block of rounding) and twice the sequences.
  MemoryPlan a = PlanMemory(Request("llama-3.1-8b", KvCacheDType::kBF16, 8192, 1)).value();
  MemoryPlan b = PlanMemory(Request("llama-3.1-8b", KvCacheDType::kFp8E4M3, 8192, 1)).value();
  EXPECT_EQ(a.kv_budget_bytes, b.kv_budget_bytes);
  EXPECT_LE(b.num_kv_blocks - 2 * a.num_kv_blocks, 1);
  EXPECT_GE(b.num_kv_blocks - 2 * a.num_kv_blocks, 0);
  EXPECT_GE(b.max_concurrent_seqs, 2 * a.max_concurrent_seqs);
  EXPECT_LE(b.max_concurrent_seqs, 2 * a.max_concurrent_seqs + 1);
  EXPECT_EQ(b.kv_spec.num_blocks, b.num_kv_blocks);
  EXPECT_EQ(b.kv_spec.dtype, DType::kF8E4M3);
}

TEST(MemoryPlannerTest, TotalsFitAndConcurrency) {
  MemoryPlanRequest r = Request("llama-3.1-8b", KvCacheDType::kAuto, 8192, 16);
  MemoryPlan p = PlanMemory(r).value();
  EXPECT_EQ(p.kv_dtype, DType::kBF16);  // auto: the model's dtype
  EXPECT_EQ(p.budget_bytes, 72'000'000'000);
  EXPECT_EQ(p.weights_bytes, 2 * 8'030'261'248);
  EXPECT_EQ(p.kv_blocks_per_seq, 512);
  EXPECT_EQ(p.kv_bytes_total, 16LL * 8192 * 131'072);
  // Activation formula: T x (2h + q + 2kv + q + 3i) x 4 + 2 x S x vocab x 4 + workspace.
  const int64_t per_token = 2 * 4096 + 4096 + 2 * 1024 + 4096 + 3 * 14336;
  EXPECT_EQ(p.activation_bytes,
            2048LL * per_token * 4 + 2LL * 16 * 128256 * 4 + kGpuWorkspaceBytes);
  EXPECT_EQ(p.workspace_bytes, kGpuWorkspaceBytes);
  EXPECT_EQ(p.total_bytes, p.weights_bytes + p.kv_bytes_total + p.activation_bytes);
  EXPECT_TRUE(p.fits);
  EXPECT_EQ(p.kv_budget_bytes, p.budget_bytes - p.weights_bytes - p.activation_bytes);
  EXPECT_EQ(p.num_kv_blocks, p.kv_budget_bytes / (16 * 131'072));
  EXPECT_EQ(p.max_concurrent_seqs, p.num_kv_blocks / 512);
  EXPECT_GE(p.max_concurrent_seqs, 16);  // fits <=> at least max_num_seqs sequences fit

  // Asking for more sequences than fit flips `fits` exactly at max_concurrent_seqs.
  r.max_num_seqs = p.max_concurrent_seqs;
  EXPECT_TRUE(PlanMemory(r).value().fits);
  r.max_num_seqs = p.max_concurrent_seqs + 1;
  EXPECT_FALSE(PlanMemory(r).value().fits);

  // A model that cannot even hold its weights: no KV blocks, no sequences.
  MemoryPlanRequest big = Request("llama-3.1-70b", KvCacheDType::kAuto, 8192, 1);
  MemoryPlan q = PlanMemory(big).value();
  EXPECT_FALSE(q.fits);
  EXPECT_EQ(q.kv_budget_bytes, 0);
  EXPECT_EQ(q.num_kv_blocks, 0);
  EXPECT_EQ(q.max_concurrent_seqs, 0);
}

TEST(MemoryPlannerTest, DefaultsAndBlockRounding) {
  MemoryPlanRequest r = Request("tinyllama-1.1b", KvCacheDType::kAuto, 0, 1);
  MemoryPlan p = PlanMemory(r).value();
  EXPECT_EQ(p.max_model_len, 2048);  // the model's context
  // A length that is not a multiple of the block size takes whole blocks.
  r.max_model_len = 1000;
  r.block_size = 16;
  p = PlanMemory(r).value();
  EXPECT_EQ(p.kv_blocks_per_seq, 63);
  EXPECT_EQ(p.kv_bytes_total, 63 * 16 * p.kv_bytes_per_token);
  // The CPU has no GPU workspace.
  r.workspace_bytes = 0;
  EXPECT_EQ(PlanMemory(r).value().workspace_bytes, 0);
}

TEST(MemoryPlannerTest, Errors) {
  MemoryPlanRequest ok = Request("llama-3.1-8b", KvCacheDType::kAuto, 4096, 4);
  ASSERT_TRUE(PlanMemory(ok).ok());
  auto expect_error = [](const MemoryPlanRequest& r, const std::string& needle) {
    auto p = PlanMemory(r);
    ASSERT_FALSE(p.ok()) << needle;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(p.status().message()).find(needle), std::string::npos) << p.status();
  };
  for (double u : {0.0, -0.5, 1.01, 2.0}) {
    MemoryPlanRequest r = ok;
    r.gpu_memory_utilization = u;
    expect_error(r, "--gpu-memory-utilization");
  }
  {
    MemoryPlanRequest r = ok;
    r.gpu_memory_utilization = 1.0;  // the upper end is allowed
    EXPECT_TRUE(PlanMemory(r).ok());
  }
  for (int64_t bytes : {int64_t{0}, int64_t{-1}}) {
    MemoryPlanRequest r = ok;
    r.device_memory_bytes = bytes;
    expect_error(r, "--device-memory");
  }
  {
    MemoryPlanRequest r = ok;
    r.max_model_len = -1;
    expect_error(r, "--max-model-len");
  }
  {
    MemoryPlanRequest r = ok;
    r.max_num_seqs = 0;
    expect_error(r, "--max-num-seqs");
  }
  {
    MemoryPlanRequest r = ok;
    r.block_size = -16;
    expect_error(r, "--block-size");
  }
  {
    MemoryPlanRequest r = ok;
    r.max_num_batched_tokens = -1;
    expect_error(r, "--max-num-batched-tokens");
  }
  {
    MemoryPlanRequest r = ok;
    r.model.num_kv_heads = 0;
    expect_error(r, "num_key_value_heads");
  }
  {
    MemoryPlanRequest r = ok;
    r.model.max_position_embeddings = 0;
    r.max_model_len = 0;
    expect_error(r, "--max-model-len");
  }
  {
    MemoryPlanRequest r = ok;
    r.weights.format = WeightPlanFormat::kGptq;
    r.weights.bits = 3;
    expect_error(r, "--bits");
    r.weights.format = WeightPlanFormat::kAwq;
    r.weights.bits = 8;
    expect_error(r, "--bits");
    r.weights.bits = 4;
    r.weights.group_size = 0;
    expect_error(r, "--group-size");
  }
  EXPECT_FALSE(ParseWeightPlanFormat("int3").ok());
  EXPECT_FALSE(ModelShapeByName("nope").ok());
}

TEST(MemoryPlannerTest, FormatNames) {
  for (const char* name : {"none", "bf16", "fp16", "fp8", "int8", "gptq", "awq"}) {
    auto f = ParseWeightPlanFormat(name);
    ASSERT_TRUE(f.ok()) << name;
    EXPECT_EQ(WeightPlanFormatName(*f), name);
  }
  EXPECT_EQ(ParseWeightPlanFormat("bfloat16").value(), WeightPlanFormat::kBf16);
  EXPECT_EQ(ParseWeightPlanFormat("float16").value(), WeightPlanFormat::kF16);
}

}  // namespace
}  // namespace qshard
