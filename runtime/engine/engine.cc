#include "runtime/engine/engine.h"

#include <algorithm>
#include <random>

#include "absl/strings/str_cat.h"
#include "kv/memory_planner.h"
#include "quant/kernel_selection.h"
#include "runtime/base/log.h"
#include "runtime/base/status_macros.h"

namespace qshard {

std::string FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

struct Engine::Sequence {
  std::string id;
  SamplingParams params;
  int32_t prompt_len = 0;
  std::vector<int32_t> all;     // prompt + generated tokens
  int64_t num_computed = 0;     // leading tokens of `all` whose K/V are in the cache
  int64_t chunk = 0;            // tokens scheduled in the current step
  BlockTable blocks;
  std::unique_ptr<Sampler> sampler;
  uint64_t seed = 0;            // params.seed, or drawn at random (on-device sampling)
  std::unique_ptr<IncrementalDetokenizer> detok;
  std::string text;             // all generated text so far
  size_t emitted = 0;           // bytes of `text` already returned
  std::vector<uint64_t> block_hashes;  // hash chain of the registered full blocks
  int32_t cached_prompt_tokens = 0;    // prompt tokens served from the prefix cache
  bool admitted_once = false;
  FinishReason abort_reason = FinishReason::kNone;  // set by Abort() between steps
  absl::Status error;

  int32_t num_generated() const { return static_cast<int32_t>(all.size()) - prompt_len; }
  absl::Span<const int32_t> prompt() const { return {all.data(), static_cast<size_t>(prompt_len)}; }
  absl::Span<const int32_t> output() const {
    return {all.data() + prompt_len, all.size() - prompt_len};
  }
};

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(options.device));
  return Create(options, std::move(backend));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options,
                                                       std::unique_ptr<Backend> backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("Engine::Create: backend is null");
  std::unique_ptr<Engine> e(new Engine());
  e->options_ = options;
  QSHARD_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(options.model_dir));
  QSHARD_ASSIGN_OR_RETURN(e->tokenizer_, LoadTokenizer(options.model_dir));
  e->backend_ = std::move(backend);

  // The selection function decides (and explains) the linear kernel for this device from
  // the checkpoint's quantization and --quantization, before any weight is read.
  {
    const DeviceInfo device = e->backend_->device_info();
    QSHARD_ASSIGN_OR_RETURN(QuantizationConfig ckpt_quant,
                            LoadQuantizationConfig(options.model_dir,
                                                   config.quantization_config_json));
    auto choice = SelectKernel(device, ckpt_quant, options.quantization);
    if (!choice.ok()) return choice.status();
    if (!choice->warning.empty()) {
      QSHARD_LOG(WARNING) << choice->warning;
    }
    e->kernel_choice_ = *choice;
  }
  ModelLoadOptions load;
  load.weight_only_activations = options.weight_only_activations;
  load.fuse_projections = options.fuse_projections;
  if (e->kernel_choice_.quantize_at_load) {
    load.online_quantization =
        e->kernel_choice_.method == "fp8" ? QuantMethod::kFp8 : QuantMethod::kInt8;
  }
  QSHARD_ASSIGN_OR_RETURN(e->model_,
                          LlamaModel::Load(options.model_dir, config, e->backend_.get(), load));
  QSHARD_LOG(INFO) << "Using " << e->kernel_choice_.kernel << " ("
                   << e->model_->weight_summary().linear_kernel
                   << "): " << e->kernel_choice_.reason;
  e->max_model_len_ = options.max_model_len > 0 ? options.max_model_len
                                                : config.max_position_embeddings;
  if (options.max_model_len > config.max_position_embeddings) {
    QSHARD_LOG(WARNING) << "--max-model-len " << options.max_model_len
                        << " exceeds the model's max_position_embeddings "
                        << config.max_position_embeddings;
  }
  if (options.block_size <= 0 || options.block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block-size must be in [1, 1024], got ", options.block_size));
  }

  // The CPU computes in fp32 (like the reference), so its "auto" KV dtype is fp32.
  const DType auto_dtype =
      e->backend_->device() == Device::kCpu ? DType::kF32 : config.dtype;
  KvCacheSpec spec = KvCacheSpecFor(config, ResolveKvCacheDType(options.kv_cache_dtype, auto_dtype),
                                    options.block_size);
  int64_t budget =
      options.kv_cache_memory_bytes > 0 ? options.kv_cache_memory_bytes : (int64_t{512} << 20);
  if (e->backend_->device() == Device::kCuda && options.kv_cache_memory_bytes <= 0) {
    // As vLLM: the KV pool takes what --gpu-memory-utilization leaves after the weights
    // (already resident) and a reserve for the step's activations and cuBLASLt workspace.
    const int64_t total = e->backend_->device_info().memory_bytes;
    const int64_t used = total - e->backend_->free_device_memory_bytes();
    constexpr int64_t kActivationReserve = int64_t{1} << 30;
    budget = static_cast<int64_t>(options.gpu_memory_utilization * static_cast<double>(total)) -
             used - kActivationReserve;
    if (budget <= 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "--gpu-memory-utilization ", options.gpu_memory_utilization, " of ", total >> 20,
          " MiB leaves no room for the KV cache: ", used >> 20,
          " MiB are in use after loading the weights and ", kActivationReserve >> 20,
          " MiB are reserved for activations"));
    }
  }
  spec.num_blocks = KvBlocksForBudget(spec, budget);  // the planner's arithmetic
  if (spec.num_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-cache-memory-bytes ", budget, " is smaller than one KV block (",
        spec.BytesPerBlock(), " bytes = ", spec.block_size, " tokens x ", spec.BytesPerToken(),
        " bytes per token)"));
  }
  QSHARD_RETURN_IF_ERROR(e->model_->AllocateKvCache(spec));
  if (spec.dtype == DType::kF8E4M3 || spec.dtype == DType::kF8E5M2) {
    QSHARD_RETURN_IF_ERROR(e->model_->ApplyKvScales(options.calculate_kv_scales));
  }
  e->allocator_ = std::make_unique<BlockAllocator>(static_cast<int32_t>(spec.num_blocks));
  QSHARD_LOG(INFO) << "engine ready: " << config.architecture << " from " << options.model_dir
                   << " on " << e->backend_->name() << "; KV cache " << spec.num_blocks
                   << " blocks x " << spec.block_size << " tokens ("
                   << spec.num_blocks * spec.block_size << " tokens, "
                   << DTypeName(spec.dtype) << ", " << spec.TotalBytes() / (1 << 20)
                   << " MiB); max model len " << e->max_model_len_ << "; linear kernel "
                   << e->model_->weight_summary().linear_kernel;
  return e;
}

absl::Status Engine::AddRequest(Request request) {
  if (seqs_.count(request.id)) {
    return absl::AlreadyExistsError(absl::StrCat("request_id '", request.id, "' is in use"));
  }
  const int32_t vocab = static_cast<int32_t>(config().vocab_size);
  if (request.prompt.empty()) {
    return absl::InvalidArgumentError("input: the prompt is empty (expected text or token ids)");
  }
  for (int32_t id : request.prompt) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("token_ids: id ", id, " is out of range [0, ", vocab, ")"));
    }
  }
  if (static_cast<int64_t>(request.prompt.size()) >= max_model_len_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input: the prompt has ", request.prompt.size(),
        " tokens but the maximum context length is ", max_model_len_,
        " (prompt + at least one generated token must fit)"));
  }
  QSHARD_RETURN_IF_ERROR(ValidateSamplingParams(request.params, vocab));

  auto s = std::make_unique<Sequence>();
  s->id = request.id;
  s->params = std::move(request.params);
  s->prompt_len = static_cast<int32_t>(request.prompt.size());
  s->all = std::move(request.prompt);
  s->sampler = std::make_unique<Sampler>(s->params);
  if (s->params.seed.has_value()) {
    s->seed = *s->params.seed;
  } else {
    std::random_device rd;  // 32 bits per call: two make a full 64-bit seed
    s->seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }
  s->detok = std::make_unique<IncrementalDetokenizer>(*tokenizer_, s->prompt());
  waiting_.push_back(s.get());
  seqs_[s->id] = std::move(s);
  return absl::OkStatus();
}

bool Engine::Abort(const std::string& id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second->abort_reason != FinishReason::kNone) return false;
  Sequence* s = it->second.get();
  s->abort_reason = FinishReason::kAbort;
  // Free its blocks now so they are available to the very next step.
  s->blocks.Clear(*allocator_);
  running_.erase(std::remove(running_.begin(), running_.end(), s), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), s), waiting_.end());
  finished_.push_back(s);
  return true;
}

EngineStats Engine::stats() const {
  EngineStats st;
  st.num_running = static_cast<int32_t>(running_.size());
  st.num_waiting = static_cast<int32_t>(waiting_.size());
  st.kv_blocks_total = allocator_->num_blocks();
  st.kv_blocks_used = allocator_->num_used();
  st.num_preemptions = num_preemptions_;
  st.prefix_cache_queries = prefix_queries_;
  st.prefix_cache_hits = prefix_hits_;
  st.kv_blocks_cached = allocator_->num_cached();
  return st;
}

void Engine::MatchPrefix(Sequence& s) {
  if (!options_.enable_prefix_caching || s.num_computed != 0 || s.blocks.size() != 0) return;
  const int64_t bs = options_.block_size;
  const uint64_t salt = static_cast<uint64_t>(kv_cache_spec().dtype) + 1;
  // At least the last token must be computed to get logits for the next one.
  const int64_t max_blocks = (static_cast<int64_t>(s.all.size()) - 1) / bs;
  s.block_hashes.clear();
  uint64_t parent = 0;
  for (int64_t i = 0; i < max_blocks; ++i) {
    absl::Span<const int32_t> toks(s.all.data() + i * bs, bs);
    const uint64_t h = BlockHash(parent, toks, salt);
    std::optional<int32_t> b = allocator_->Lookup(h, toks);
    if (!b) break;
    s.blocks.Append(*b);
    s.block_hashes.push_back(h);
    parent = h;
  }
  s.num_computed = s.blocks.size() * bs;
  if (!s.admitted_once) {
    // Counted once per request, in prompt tokens, as vLLM does.
    prefix_queries_ += s.prompt_len;
    s.cached_prompt_tokens = static_cast<int32_t>(std::min<int64_t>(s.num_computed, s.prompt_len));
    prefix_hits_ += s.cached_prompt_tokens;
  }
}

void Engine::RegisterFullBlocks(Sequence& s) {
  if (!options_.enable_prefix_caching) return;
  const int64_t bs = options_.block_size;
  const uint64_t salt = static_cast<uint64_t>(kv_cache_spec().dtype) + 1;
  const int64_t full = s.num_computed / bs;
  for (int64_t i = static_cast<int64_t>(s.block_hashes.size()); i < full; ++i) {
    absl::Span<const int32_t> toks(s.all.data() + i * bs, bs);
    const uint64_t parent = i == 0 ? 0 : s.block_hashes[i - 1];
    const uint64_t h = BlockHash(parent, toks, salt);
    allocator_->Register(s.blocks.blocks()[i], h, toks);
    s.block_hashes.push_back(h);
  }
}

void Engine::Preempt(Sequence& s) {
  // Recompute preemption: drop the K/V, keep the tokens; it will prefill prompt + output
  // (its full blocks stay in the prefix cache until evicted, so the recompute may be cheap).
  s.blocks.Clear(*allocator_);
  s.block_hashes.clear();
  s.num_computed = 0;
  running_.erase(std::remove(running_.begin(), running_.end(), &s), running_.end());
  waiting_.push_front(&s);
  ++num_preemptions_;
  QSHARD_LOG(DEBUG) << "preempted " << s.id << " (" << s.all.size() << " tokens)";
}

void Engine::FinishSequence(Sequence& s, FinishReason reason, std::vector<RequestOutput>* out) {
  s.blocks.Clear(*allocator_);
  running_.erase(std::remove(running_.begin(), running_.end(), &s), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), &s), waiting_.end());
  // Find or create this sequence's output entry of the step.
  RequestOutput* o = nullptr;
  for (auto& r : *out) {
    if (r.id == s.id) o = &r;
  }
  if (o == nullptr) {
    out->emplace_back();
    o = &out->back();
    o->id = s.id;
  }
  if (reason == FinishReason::kLength || reason == FinishReason::kAbort) {
    // Nothing more can complete a held-back stop-string prefix: release it.
    s.text += s.detok->Flush();
    o->text += s.text.substr(s.emitted);
    s.emitted = s.text.size();
  }
  o->finished = true;
  o->finish_reason = reason;
  o->error = s.error;
  o->prompt_tokens = s.prompt_len;
  o->completion_tokens = s.num_generated();
  o->cached_prompt_tokens = s.cached_prompt_tokens;
  const std::string id = s.id;
  seqs_.erase(id);  // destroys s
}

void Engine::Advance(Sequence& s, const SampleResult& r, std::vector<RequestOutput>* out) {
  const int32_t tok = r.token_id;
  s.all.push_back(tok);
  out->emplace_back();
  RequestOutput& o = out->back();
  o.id = s.id;
  o.token_ids.push_back(tok);
  if (s.params.logprobs > 0) o.logprobs.push_back(r);
  o.prompt_tokens = s.prompt_len;
  o.completion_tokens = s.num_generated();
  o.cached_prompt_tokens = s.cached_prompt_tokens;

  const auto& eos = config().eos_token_ids;
  const bool is_eos = !s.params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end();
  const bool is_stop_id = std::find(s.params.stop_token_ids.begin(), s.params.stop_token_ids.end(),
                                    tok) != s.params.stop_token_ids.end();
  if (is_eos || is_stop_id) {
    // The stop token's own text is not returned; text held back for stop strings is.
    s.text += s.detok->Flush();
    o.text += s.text.substr(s.emitted);
    s.emitted = s.text.size();
    FinishSequence(s, FinishReason::kStop, out);
    return;
  }

  const size_t before = s.text.size();
  s.text += s.detok->Step(tok);
  // Stop strings: search only where a new match can start, then hold back any tail that
  // could still grow into a stop string.
  size_t cut = std::string::npos;
  size_t hold = 0;
  for (const std::string& stop : s.params.stop) {
    const size_t from = before >= stop.size() ? before - stop.size() + 1 : 0;
    const size_t at = s.text.find(stop, std::min(from, s.text.size()));
    if (at != std::string::npos && at >= s.emitted) cut = std::min(cut, at);
    for (size_t len = std::min(stop.size() - 1, s.text.size() - s.emitted); len > 0; --len) {
      if (s.text.compare(s.text.size() - len, len, stop, 0, len) == 0) {
        hold = std::max(hold, len);
        break;
      }
    }
  }
  if (cut != std::string::npos) {
    o.text += s.text.substr(s.emitted, cut - s.emitted);
    s.text.resize(cut);
    s.emitted = cut;
    FinishSequence(s, FinishReason::kStop, out);
    return;
  }
  const size_t ready = s.text.size() - hold;
  if (ready > s.emitted) {
    o.text += s.text.substr(s.emitted, ready - s.emitted);
    s.emitted = ready;
  }
  if (s.num_generated() >= s.params.max_tokens ||
      static_cast<int64_t>(s.all.size()) >= max_model_len_) {
    FinishSequence(s, FinishReason::kLength, out);
  }
}

absl::StatusOr<std::vector<RequestOutput>> Engine::Step() {
  std::vector<RequestOutput> out;
  // Requests aborted since the last step report now (their blocks are already free).
  for (Sequence* s : finished_) FinishSequence(*s, s->abort_reason, &out);
  finished_.clear();

  const int64_t bs = options_.block_size;
  const int64_t capacity_tokens = static_cast<int64_t>(allocator_->num_blocks()) * bs;
  int64_t budget = options_.max_num_batched_tokens;
  std::vector<Sequence*> scheduled;

  // 1) Running sequences first, oldest first; preempt the newest when blocks run out.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i];
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(s->all.size()) - s->num_computed, budget);
    const int64_t need = s->num_computed + n;
    bool self_preempted = false;
    while (!s->blocks.EnsureCapacity(need, bs, *allocator_)) {
      if (need > capacity_tokens || (running_.size() == 1 && running_[0] == s)) {
        s->error = absl::ResourceExhaustedError(absl::StrCat(
            "request '", s->id, "' needs ", need, " tokens of KV cache but the cache holds ",
            capacity_tokens, " tokens (", allocator_->num_blocks(), " blocks of ", bs,
            "); raise --kv-cache-memory-bytes or lower max_tokens"));
        FinishSequence(*s, FinishReason::kError, &out);
        self_preempted = true;
        break;
      }
      Sequence* victim = running_.back();
      Preempt(*victim);
      if (victim == s) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) continue;  // running_[i] is now the next sequence
    s->chunk = n;
    budget -= n;
    scheduled.push_back(s);
    ++i;
  }

  // 2) Admit waiting sequences (FCFS) while slots, budget and blocks allow.
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < options_.max_num_seqs) {
    Sequence* s = waiting_.front();
    const int64_t total = static_cast<int64_t>(s->all.size());
    if (total + 1 > capacity_tokens) {
      waiting_.pop_front();
      s->error = absl::ResourceExhaustedError(absl::StrCat(
          "request '", s->id, "' needs ", total + 1, " tokens of KV cache but the cache holds ",
          capacity_tokens, " tokens; raise --kv-cache-memory-bytes or shorten the prompt"));
      FinishSequence(*s, FinishReason::kError, &out);
      continue;
    }
    MatchPrefix(*s);
    const int64_t n = std::min<int64_t>(total - s->num_computed, budget);
    if (!s->blocks.EnsureCapacity(s->num_computed + n, bs, *allocator_)) {
      // Not admitted after all: give back the prefix hits, retry next step.
      s->blocks.Clear(*allocator_);
      s->block_hashes.clear();
      s->num_computed = 0;
      if (!s->admitted_once) {
        prefix_queries_ -= s->prompt_len;
        prefix_hits_ -= s->cached_prompt_tokens;
        s->cached_prompt_tokens = 0;
      }
      break;
    }
    s->admitted_once = true;
    waiting_.pop_front();
    running_.push_back(s);
    s->chunk = n;
    budget -= n;
    scheduled.push_back(s);
  }
  if (scheduled.empty()) return out;

  // 3) One forward over all scheduled chunks.
  std::vector<SequenceChunk> chunks;
  chunks.reserve(scheduled.size());
  for (Sequence* s : scheduled) {
    SequenceChunk c;
    c.tokens = absl::Span<const int32_t>(s->all.data() + s->num_computed, s->chunk);
    c.start_pos = static_cast<int32_t>(s->num_computed);
    c.block_table = s->blocks.blocks();
    const bool completes = s->num_computed + s->chunk == static_cast<int64_t>(s->all.size());
    c.logits = completes ? LogitsMode::kLast : LogitsMode::kNone;
    chunks.push_back(c);
  }
  // Sequences that get a token this step (their chunk completes the known tokens), in
  // chunk order = logit row order.
  std::vector<Sequence*> sampled;
  for (Sequence* s : scheduled) {
    if (s->num_computed + s->chunk == static_cast<int64_t>(s->all.size())) sampled.push_back(s);
  }
  auto blocked_ids = [&](const Sequence& s) {
    std::vector<int32_t> blocked;
    if (s.num_generated() < s.params.min_tokens) {
      if (!s.params.ignore_eos) {
        blocked.insert(blocked.end(), config().eos_token_ids.begin(), config().eos_token_ids.end());
      }
      blocked.insert(blocked.end(), s.params.stop_token_ids.begin(), s.params.stop_token_ids.end());
    }
    return blocked;
  };
  // On a backend that samples on the device (CUDA) the logits never leave it: only the
  // chosen ids and requested logprobs come back.
  std::vector<SampleResult> results;
  absl::Status st;
  if (model_->backend().SupportsSampling()) {
    std::vector<std::vector<int32_t>> blocked(sampled.size());
    std::vector<SamplingRow> rows(sampled.size());
    for (size_t i = 0; i < sampled.size(); ++i) {
      const Sequence& s = *sampled[i];
      const SamplingParams& p = s.params;
      blocked[i] = blocked_ids(s);
      SamplingRow& r = rows[i];
      r.temperature = p.temperature;
      r.top_k = std::max(p.top_k, 0);
      r.top_p = p.top_p;
      r.min_p = p.min_p;
      r.repetition_penalty = p.repetition_penalty;
      r.presence_penalty = p.presence_penalty;
      r.frequency_penalty = p.frequency_penalty;
      r.seed = s.seed;
      r.step = static_cast<uint64_t>(s.num_generated());
      r.prompt = s.prompt();
      r.output = s.output();
      r.blocked = blocked[i];
      r.num_logprobs = p.logprobs;
    }
    absl::StatusOr<Tensor> dev_logits = model_->ForwardLogits(chunks);
    std::vector<SampledToken> tokens;
    st = dev_logits.status();
    if (st.ok() && !sampled.empty()) st = model_->backend().Sample(*dev_logits, rows, &tokens);
    if (st.ok()) {
      results.resize(sampled.size());
      for (size_t i = 0; i < sampled.size(); ++i) {
        results[i].token_id = tokens[i].token_id;
        results[i].logprob = tokens[i].logprob;
        for (const auto& [id, lp] : tokens[i].top) results[i].top.push_back({id, lp});
      }
    }
  } else {
    st = model_->Forward(chunks, &logits_);
    if (st.ok()) {
      const int32_t vocab = static_cast<int32_t>(config().vocab_size);
      results.reserve(sampled.size());
      for (size_t i = 0; i < sampled.size(); ++i) {
        const Sequence& s = *sampled[i];
        results.push_back(s.sampler->Sample(logits_.data() + i * vocab, vocab, s.prompt(),
                                            s.output(), blocked_ids(s)));
      }
    }
  }
  if (!st.ok()) {
    QSHARD_LOG(ERROR) << "forward failed: " << st;
    for (Sequence* s : scheduled) {
      s->error = st;
      FinishSequence(*s, FinishReason::kError, &out);
    }
    return out;
  }

  // 4) Advance the sequences whose chunk completed their known tokens.
  size_t next = 0;
  for (Sequence* s : scheduled) {
    s->num_computed += s->chunk;
    RegisterFullBlocks(*s);
    if (s->num_computed != static_cast<int64_t>(s->all.size())) continue;
    Advance(*s, results[next++], &out);
  }
  return out;
}

}  // namespace qshard
