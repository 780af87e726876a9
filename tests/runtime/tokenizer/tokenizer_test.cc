// File: tokenizer_test.cc
// SentencePiece tokenizer and streaming detokenizer against the kjv-llama-12m fixtures.
#include "runtime/tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/tokenizer/sentencepiece_tokenizer.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

using ::qshard::testing::LoadReference;
using ::qshard::testing::MakeTempDir;
using ::qshard::testing::SharedModel;

const char kModel[] = "kjv-llama-12m";
const char kReplacement[] = "\xEF\xBF\xBD";

std::unique_ptr<Tokenizer> LoadKjv() {
  auto tok = LoadTokenizer(SharedModel(kModel));
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

std::vector<int32_t> Ids(const nlohmann::json& array) { return array.get<std::vector<int32_t>>(); }

std::vector<int32_t> Concat(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  std::vector<int32_t> out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

// Strict UTF-8 check: no truncated sequences, overlong forms, surrogates or code points
// past U+10FFFF.
bool IsValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

TEST(Utf8ValidatorTest, AcceptsAndRejects) {
  EXPECT_TRUE(IsValidUtf8("abc \xC3\xA9 \xE2\x9C\x93 \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xE2\x9C"));
  EXPECT_FALSE(IsValidUtf8("\x9C"));
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));
}

// Streams gen through an IncrementalDetokenizer seeded with prompt; checks every delta is
// valid UTF-8 and returns the concatenation (Step outputs + Flush).
std::string Stream(const Tokenizer& tok, const std::vector<int32_t>& prompt,
                   const std::vector<int32_t>& gen) {
  IncrementalDetokenizer detok(tok, prompt);
  std::string all;
  for (int32_t id : gen) {
    std::string delta = detok.Step(id);
    EXPECT_TRUE(IsValidUtf8(delta)) << "token " << id << " gave an invalid delta";
    all += delta;
  }
  std::string rest = detok.Flush();
  EXPECT_TRUE(IsValidUtf8(rest));
  all += rest;
  EXPECT_EQ(detok.text(), all);
  return all;
}

// Built with append: GCC 12 at -O3 warns falsely (-Wrestrict) on `" " + std::string`.
std::string WithLeadingSpace(const std::string& text) { return std::string(" ").append(text); }

// What streaming must reproduce: Decode(prompt + gen) with Decode(prompt) removed.
std::string Expected(const Tokenizer& tok, const std::vector<int32_t>& prompt,
                     const std::vector<int32_t>& gen) {
  const std::string full = tok.Decode(Concat(prompt, gen));
  const std::string head = tok.Decode(prompt);
  EXPECT_EQ(full.substr(0, head.size()), head);
  return full.substr(head.size());
}

TEST(SentencePieceTokenizerTest, Basics) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 4096);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(tok->IsSpecial(1));
  EXPECT_TRUE(tok->IsSpecial(2));
  EXPECT_TRUE(tok->IsSpecial(0));  // <unk>
  EXPECT_FALSE(tok->IsSpecial(1025));
  EXPECT_FALSE(tok->IsSpecial(-1));
  EXPECT_FALSE(tok->IsSpecial(4096));
  EXPECT_EQ(tok->IdToPiece(1), "<s>");
  EXPECT_EQ(tok->IdToPiece(2), "</s>");
  EXPECT_EQ(tok->IdToPiece(1025), "\xE2\x96\x81In");
  EXPECT_EQ(tok->IdToPiece(4096), "");
}

TEST(SentencePieceTokenizerTest, EncodeMatchesReferencePromptIds) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  const nlohmann::json ref = LoadReference(SharedModel(kModel));
  ASSERT_TRUE(ref.contains("prompts"));
  ASSERT_EQ(ref["prompts"].size(), 3u);
  for (const auto& p : ref["prompts"]) {
    const std::string prompt = p["prompt"].get<std::string>();
    EXPECT_EQ(tok->Encode(prompt, /*add_special=*/true), Ids(p["prompt_ids"])) << prompt;
  }
  EXPECT_EQ(tok->Encode("In the beginning", true), (std::vector<int32_t>{1, 1025, 261, 2060}));
  EXPECT_EQ(tok->Encode("In the beginning", false), (std::vector<int32_t>{1025, 261, 2060}));
}

TEST(SentencePieceTokenizerTest, DecodeMatchesReferenceGreedyText) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  const nlohmann::json ref = LoadReference(SharedModel(kModel));
  for (const auto& p : ref["prompts"]) {
    const std::vector<int32_t> gen = Ids(p["greedy_ids"]);
    ASSERT_EQ(gen.back(), 2);
    EXPECT_EQ(tok->Decode(gen), p["greedy_text"].get<std::string>());
    // The prompt decodes back to itself (BOS skipped).
    EXPECT_EQ(tok->Decode(Ids(p["prompt_ids"])), p["prompt"].get<std::string>());
  }
}

TEST(SentencePieceTokenizerTest, DecodeWithoutSkippingRendersSpecialPieces) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({1, 1025, 261, 2060, 2}, /*skip_special=*/false),
            "<s>In the beginning</s>");
  EXPECT_EQ(tok->Decode({1, 1025, 261, 2060, 2}, /*skip_special=*/true), "In the beginning");
}

TEST(SentencePieceTokenizerTest, DecodeIgnoresOutOfRangeIds) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({-5, 1025, 999999, 261, 2060}), "In the beginning");
}

TEST(SentencePieceTokenizerTest, RoundTrip) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  // The model's normalizer is the identity with no whitespace folding, so text comes back
  // byte for byte: repeated spaces, leading/trailing spaces, newlines, tabs and
  // characters outside the vocabulary (via byte fallback).
  const std::vector<std::string> texts = {
      "In the beginning God created the heaven and the earth.",
      "And God said, Let there be light: and there was light.",
      "Jesus wept.",
      "For God so loved the world, that he gave his only begotten Son; that whosoever "
      "believeth in him should not perish, but have everlasting life.",
      "The LORD is my shepherd; I shall not want.",
      "Blessed are the meek: for they shall inherit the earth.",
      "a  b\n\nc",
      "  leading spaces",
      "trailing spaces  ",
      "first line\nsecond line\n",
      "tab\tseparated",
      "\xC4\x82\xC5\x9E \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xE2\x9C\x93 \xC3\xA9",
      "emoji \xF0\x9F\x98\x80!",
      "",
  };
  for (const std::string& text : texts) {
    EXPECT_EQ(tok->Decode(tok->Encode(text, /*add_special=*/true)), text) << text;
    EXPECT_EQ(tok->Decode(tok->Encode(text, /*add_special=*/false)), text) << text;
  }
}

TEST(SentencePieceTokenizerTest, SpecialTextIsNotInjected) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  for (int32_t id : tok->Encode("</s> and <s>", /*add_special=*/false)) {
    EXPECT_FALSE(tok->IsSpecial(id)) << id;
  }
}

TEST(IncrementalDetokenizerTest, StreamsReferenceGenerations) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  const nlohmann::json ref = LoadReference(SharedModel(kModel));
  for (const auto& p : ref["prompts"]) {
    const std::vector<int32_t> prompt = Ids(p["prompt_ids"]);
    const std::vector<int32_t> gen = Ids(p["greedy_ids"]);
    const std::string streamed = Stream(*tok, prompt, gen);
    EXPECT_EQ(streamed, Expected(*tok, prompt, gen));
    ASSERT_FALSE(streamed.empty());
    EXPECT_EQ(streamed[0], ' ');
    EXPECT_EQ(streamed, WithLeadingSpace(p["greedy_text"].get<std::string>()));
  }
}

TEST(IncrementalDetokenizerTest, EveryWordArrivesWithItsToken) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  // " of his kingdom": each whole-word token is emitted at once, not held back.
  IncrementalDetokenizer detok(*tok, std::vector<int32_t>{1, 1025, 261, 2060});
  EXPECT_EQ(detok.Step(271), " of");
  EXPECT_EQ(detok.Step(327), " his");
  EXPECT_EQ(detok.Step(980), " kingdom");
  EXPECT_EQ(detok.Step(2), "");  // EOS
  EXPECT_EQ(detok.Flush(), "");
  EXPECT_EQ(detok.text(), " of his kingdom");
}

TEST(IncrementalDetokenizerTest, EmptyPromptDropsLeadingSpaceLikeDecode) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  const nlohmann::json ref = LoadReference(SharedModel(kModel));
  for (const auto& p : ref["prompts"]) {
    const std::vector<int32_t> gen = Ids(p["greedy_ids"]);
    EXPECT_EQ(Stream(*tok, {}, gen), tok->Decode(gen));
  }
}

TEST(IncrementalDetokenizerTest, ByteFallbackNeverSplitsCharacters) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  // "ĂŞ 日本語 ✓ é": none of these characters is in the vocabulary.
  const std::string text =
      "\xC4\x82\xC5\x9E \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xE2\x9C\x93 \xC3\xA9";
  const std::vector<int32_t> gen = tok->Encode(text, /*add_special=*/false);
  int byte_tokens = 0;
  for (int32_t id : gen) byte_tokens += tok->IdToPiece(id).rfind("<0x", 0) == 0 ? 1 : 0;
  ASSERT_GE(byte_tokens, 10) << "the test needs characters split into byte tokens";

  const std::vector<int32_t> prompt = tok->Encode("In the beginning", true);
  const std::string streamed = Stream(*tok, prompt, gen);
  EXPECT_EQ(streamed, Expected(*tok, prompt, gen));
  EXPECT_EQ(streamed, WithLeadingSpace(text));
  EXPECT_EQ(streamed.find(kReplacement), std::string::npos);

  EXPECT_EQ(Stream(*tok, {}, gen), text);

  // A byte token never completes a character on its own: check deltas one by one.
  IncrementalDetokenizer detok(*tok, prompt);
  std::vector<std::string> deltas;
  for (int32_t id : gen) deltas.push_back(detok.Step(id));
  // gen[1] is <0xC4>, the first byte of "Ă": nothing can be shown yet.
  ASSERT_EQ(tok->IdToPiece(gen[1]), "<0xC4>");
  EXPECT_EQ(deltas[1], "");
  EXPECT_EQ(deltas[2], "\xC4\x82");
}

TEST(IncrementalDetokenizerTest, LongGenerationCompactsAndStaysExact) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "And the LORD said \xE2\x9C\x93 unto Moses,  \xE6\x97\xA5 go\n";
  }
  const std::vector<int32_t> gen = tok->Encode(text, false);
  ASSERT_GT(gen.size(), 600u);  // well past the compaction threshold
  const std::vector<int32_t> prompt = tok->Encode("Blessed are the", true);
  const std::string streamed = Stream(*tok, prompt, gen);
  EXPECT_EQ(streamed, Expected(*tok, prompt, gen));
  EXPECT_EQ(streamed, WithLeadingSpace(text));
}

// Forwards to a real tokenizer and records the longest id sequence Decode was given.
class DecodeSpy : public Tokenizer {
 public:
  explicit DecodeSpy(const Tokenizer& inner) : inner_(inner) {}
  std::vector<int32_t> Encode(std::string_view text, bool add_special) const override {
    return inner_.Encode(text, add_special);
  }
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special) const override {
    max_decode_len_ = std::max(max_decode_len_, ids.size());
    return inner_.Decode(ids, skip_special);
  }
  std::string IdToPiece(int32_t id) const override { return inner_.IdToPiece(id); }
  int32_t vocab_size() const override { return inner_.vocab_size(); }
  int32_t bos_id() const override { return inner_.bos_id(); }
  int32_t eos_id() const override { return inner_.eos_id(); }
  bool IsSpecial(int32_t id) const override { return inner_.IsSpecial(id); }
  size_t max_decode_len() const { return max_decode_len_; }

 private:
  const Tokenizer& inner_;
  mutable size_t max_decode_len_ = 0;
};

TEST(IncrementalDetokenizerTest, DecodesOnlyASmallWindow) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  std::string text;
  for (int i = 0; i < 30; ++i) text += "And the LORD said unto Moses, \xE6\x97\xA5\xE6\x9C\xAC ";
  const std::vector<int32_t> prompt = tok->Encode(text, true);
  const std::vector<int32_t> gen = tok->Encode(text, false);
  ASSERT_GT(gen.size(), 300u);
  DecodeSpy spy(*tok);
  EXPECT_EQ(Stream(spy, prompt, gen), Expected(*tok, prompt, gen));
  // The window spans the previous chunk plus the unread tokens: a few ids, never the
  // whole prompt or generation (a CJK character here is 3 byte tokens).
  EXPECT_LE(spy.max_decode_len(), 8u);
}

TEST(IncrementalDetokenizerTest, FlushReleasesUnfinishedTail) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> prompt = tok->Encode("In the beginning", true);
  // <0xE2> <0x9C> is the start of "✓" with its last byte missing.
  const std::vector<int32_t> gen = {271, 229, 159};
  ASSERT_EQ(tok->IdToPiece(229), "<0xE2>");
  ASSERT_EQ(tok->IdToPiece(159), "<0x9C>");
  IncrementalDetokenizer detok(*tok, prompt);
  EXPECT_EQ(detok.Step(271), " of");
  EXPECT_EQ(detok.Step(229), "");
  EXPECT_EQ(detok.Step(159), "");
  const std::string rest = detok.Flush();
  EXPECT_TRUE(IsValidUtf8(rest));
  EXPECT_EQ(std::string(" of").append(rest), Expected(*tok, prompt, gen));
  EXPECT_EQ(detok.Flush(), "");
}

TEST(IncrementalDetokenizerTest, PromptEndingMidCharacter) {
  auto tok = LoadKjv();
  ASSERT_NE(tok, nullptr);
  // The prompt's last token is the lead byte of "✓"; generation supplies the rest. The
  // completed character is emitted whole.
  std::vector<int32_t> prompt = tok->Encode("In the", true);
  prompt.push_back(229);  // <0xE2>
  IncrementalDetokenizer detok(*tok, prompt);
  EXPECT_EQ(detok.Step(159), "");
  EXPECT_EQ(detok.Step(150), "\xE2\x9C\x93");
  EXPECT_EQ(detok.Step(261), " the");
  EXPECT_EQ(detok.Flush(), "");
}

// A directory holding a copy of the fixture tokenizer.model and, when given, a
// tokenizer_config.json with the given content.
std::string ModelDirWithConfig(const std::string& config) {
  const std::string dir = MakeTempDir("qshard-tok");
  std::filesystem::copy_file(SharedModel(kModel) + "/tokenizer.model", dir + "/tokenizer.model");
  if (!config.empty()) std::ofstream(dir + "/tokenizer_config.json") << config;
  return dir;
}

TEST(LoadTokenizerTest, MissingModelIsNotFound) {
  const std::string dir = MakeTempDir("qshard-tok-missing");
  auto tok = LoadTokenizer(dir);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(tok.status().message().find(dir + "/tokenizer.model"), std::string::npos)
      << tok.status();
  EXPECT_NE(tok.status().message().find("SentencePiece tokenizer.model"), std::string::npos)
      << tok.status();
}

TEST(LoadTokenizerTest, CorruptModelIsAnError) {
  const std::string dir = MakeTempDir("qshard-tok-corrupt");
  const std::string path = dir + "/tokenizer.model";
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 4; ++trial) {
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      for (int i = 0; i < 4096; ++i) out.put(static_cast<char>(rng() & 0xFF));
    }
    auto tok = LoadTokenizer(dir);
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
    EXPECT_NE(tok.status().message().find(path), std::string::npos) << tok.status();
  }
  // An empty file parses as an empty model, which is no use either.
  std::ofstream(path, std::ios::binary | std::ios::trunc).close();
  auto tok = LoadTokenizer(dir);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
}

TEST(LoadTokenizerTest, WithoutConfigUsesModelIds) {
  auto tok = LoadTokenizer(ModelDirWithConfig(""));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  EXPECT_EQ((*tok)->Encode("In the beginning", true), (std::vector<int32_t>{1, 1025, 261, 2060}));
}

TEST(LoadTokenizerTest, AddEosTokenAppendsEos) {
  auto tok = LoadTokenizer(ModelDirWithConfig(R"({"add_bos_token": true, "add_eos_token": true})"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("In the beginning", true),
            (std::vector<int32_t>{1, 1025, 261, 2060, 2}));
  EXPECT_EQ((*tok)->Encode("In the beginning", false), (std::vector<int32_t>{1025, 261, 2060}));
}

TEST(LoadTokenizerTest, AddBosTokenFalseDropsBos) {
  auto tok = LoadTokenizer(ModelDirWithConfig(R"({"add_bos_token": false})"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("In the beginning", true), (std::vector<int32_t>{1025, 261, 2060}));
}

TEST(LoadTokenizerTest, ConfigTokensAndAddedSpecialTokens) {
  auto tok = SentencePieceTokenizer::Load(ModelDirWithConfig(R"({
    "bos_token": {"content": "<s>", "lstrip": false},
    "eos_token": "</s>",
    "pad_token": {"content": "<unk>"},
    "unk_token": null,
    "added_tokens_decoder": {
      "4095": {"content": "Q", "special": true},
      "4094": {"content": "-", "special": false}
    }
  })"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  EXPECT_EQ((*tok)->pad_id(), 0);
  EXPECT_TRUE((*tok)->IsSpecial(4095));
  EXPECT_FALSE((*tok)->IsSpecial(4094));
  EXPECT_EQ((*tok)->Decode({1025, 4095, 261, 4094}), "In the-");
}

TEST(LoadTokenizerTest, ConfigCanRenameEos) {
  // A config naming another piece as EOS wins over the model's own id.
  auto tok = LoadTokenizer(ModelDirWithConfig(R"({"eos_token": ".", "add_eos_token": true})"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->eos_id(), 4057);
  EXPECT_TRUE((*tok)->IsSpecial(4057));
  EXPECT_EQ((*tok)->Encode("In", true).back(), 4057);
}

TEST(LoadTokenizerTest, MalformedConfigIsInvalidArgument) {
  for (const std::string& config :
       {std::string("{not json"), std::string("[1, 2]"), std::string(R"({"add_bos_token": "yes"})"),
        std::string(R"({"added_tokens_decoder": {"x": {"content": "a"}}})")}) {
    const std::string dir = ModelDirWithConfig(config);
    auto tok = LoadTokenizer(dir);
    ASSERT_FALSE(tok.ok()) << config;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
    EXPECT_NE(tok.status().message().find("tokenizer_config.json"), std::string::npos)
        << tok.status();
  }
}

}  // namespace
}  // namespace qshard
