// FP8 KV cache scales: read from every checkpoint naming scheme, computed from the first
// prefill with --calculate-kv-scales, or left at 1.0 (with a warning) otherwise.
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/checkpoint/safetensors.h"
#include "runtime/engine/engine.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

namespace fs = std::filesystem;

std::string Embedded() { return ::qshard::testing::SourceDir() + "/models/kjv-llama-12m"; }

// A copy of the embedded model with an extra shard of KV scales named by `k_name` /
// `v_name` (suffixes after "model.layers.N."); v_name may equal k_name (legacy kv_scale).
std::string ModelWithScales(const std::string& k_name, const std::string& v_name) {
  const std::string dir = ::qshard::testing::MakeTempDir("qshard-kvs") + "/m";
  fs::copy(Embedded(), dir, fs::copy_options::recursive);
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::ifstream in(dir + "/model.safetensors.index.json");
  nlohmann::json index = nlohmann::json::parse(in);
  in.close();
  for (int l = 0; l < 6; ++l) {
    for (const std::string& name : {k_name, v_name}) {
      const std::string full = "model.layers." + std::to_string(l) + "." + name;
      if (index["weight_map"].contains(full)) continue;
      Tensor t = Tensor::Empty(DType::kF32, {});
      *t.data<float>() = (name == k_name ? 0.01f : 0.02f) * (l + 1);
      tensors.emplace_back(full, t);
      index["weight_map"][full] = "kv-scales.safetensors";
    }
  }
  EXPECT_TRUE(WriteSafetensors(dir + "/kv-scales.safetensors", tensors).ok());
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump(1);
  return dir;
}

std::unique_ptr<Engine> MakeEngine(const std::string& dir, KvCacheDType dt, bool calculate) {
  EngineOptions o;
  o.model_dir = dir;
  o.device = "cpu";
  o.kv_cache_memory_bytes = 16 << 20;
  o.kv_cache_dtype = dt;
  o.calculate_kv_scales = calculate;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

TEST(KvScalesTest, LoadedFromEveryCheckpointNaming) {
  const std::pair<std::string, std::string> namings[] = {
      {"self_attn.k_scale", "self_attn.v_scale"},
      {"self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"},
      {"self_attn.kv_scale", "self_attn.kv_scale"}};
  for (const auto& [k, v] : namings) {
    auto e = MakeEngine(ModelWithScales(k, v), KvCacheDType::kFp8E4M3, false);
    ASSERT_NE(e, nullptr) << k;
    for (int l = 0; l < 6; ++l) {
      auto [ks, vs] = e->model().backend().GetKvScales(l);
      EXPECT_FLOAT_EQ(ks, 0.01f * (l + 1)) << k << " layer " << l;
      EXPECT_FLOAT_EQ(vs, (k == v ? 0.01f : 0.02f) * (l + 1)) << v << " layer " << l;
    }
  }
}

TEST(KvScalesTest, ScaleTensorsAreNotUnexpectedForBf16Kv) {
  // A checkpoint with scales still loads (and ignores them) with a 16-bit KV cache.
  auto e = MakeEngine(ModelWithScales("self_attn.k_scale", "self_attn.v_scale"),
                      KvCacheDType::kBF16, false);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->kv_cache_spec().dtype, DType::kBF16);
}

TEST(KvScalesTest, WithoutScalesTheyStayOneUnlessCalculated) {
  for (KvCacheDType dt : {KvCacheDType::kFp8E4M3, KvCacheDType::kFp8E5M2}) {
    auto plain = MakeEngine(Embedded(), dt, /*calculate=*/false);
    auto calc = MakeEngine(Embedded(), dt, /*calculate=*/true);
    ASSERT_NE(plain, nullptr);
    ASSERT_NE(calc, nullptr);
    for (Engine* e : {plain.get(), calc.get()}) {
      Request r;
      r.id = "x";
      r.prompt = e->tokenizer().Encode("And the LORD said unto Moses,", true);
      r.params.temperature = 0;
      r.params.max_tokens = 2;
      ASSERT_TRUE(e->AddRequest(r).ok());
      while (e->HasWork()) ASSERT_TRUE(e->Step().ok());
    }
    const float fmax = dt == KvCacheDType::kFp8E4M3 ? 448.0f : 57344.0f;
    for (int l = 0; l < 6; ++l) {
      EXPECT_EQ(plain->model().backend().GetKvScales(l), std::make_pair(1.0f, 1.0f));
      auto [ks, vs] = calc->model().backend().GetKvScales(l);
      // amax / max: positive, and far from 1 for activations of this size.
      EXPECT_GT(ks, 0.0f);
      EXPECT_GT(vs, 0.0f);
      EXPECT_LT(ks * fmax, 1e3f);
      EXPECT_NE(ks, 1.0f);
    }
  }
}

TEST(KvScalesTest, Fp8KvGreedyStaysCloseToReference) {
  // With fp8 KV the top-1 of the first prompt's continuation still matches the fp32 run
  // for the first tokens (the logits move by ~1e-2).
  auto ref = ::qshard::testing::LoadReference(::qshard::testing::SharedModel("kjv-llama-12m"));
  ASSERT_FALSE(ref.is_null());
  auto e = MakeEngine(Embedded(), KvCacheDType::kFp8E4M3, true);
  ASSERT_NE(e, nullptr);
  Request r;
  r.id = "g";
  r.prompt = ref["prompts"][0]["prompt_ids"].get<std::vector<int32_t>>();
  r.params.temperature = 0;
  r.params.max_tokens = 4;
  ASSERT_TRUE(e->AddRequest(r).ok());
  std::vector<int32_t> got;
  while (e->HasWork()) {
    auto s = e->Step();
    ASSERT_TRUE(s.ok());
    for (const auto& o : *s) got.insert(got.end(), o.token_ids.begin(), o.token_ids.end());
  }
  const auto want = ref["prompts"][0]["greedy_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(got, std::vector<int32_t>(want.begin(), want.begin() + 4));
}

}  // namespace
}  // namespace qshard
