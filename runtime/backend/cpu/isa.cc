#include "runtime/backend/cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "runtime/base/log.h"

namespace qshard::cpu {
namespace {

struct Features {
  bool avx2 = false;
  bool avx512 = false;
  bool avx512_vnni = false;
};

const Features& Detect() {
  static const Features f = [] {
    __builtin_cpu_init();
    Features r;
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    // __builtin_cpu_supports also checks that the OS saves the zmm state (XCR0).
    r.avx512 = r.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    r.avx512_vnni = r.avx512 && __builtin_cpu_supports("avx512vnni");
    return r;
  }();
  return f;
}

Isa BestIsa() {
  const Features& f = Detect();
  return f.avx512 ? Isa::kAvx512 : f.avx2 ? Isa::kAvx2 : Isa::kScalar;
}

Isa ComputeDefault() {
  Isa isa = BestIsa();
  if (const char* env = std::getenv("QSHARD_CPU_ISA"); env != nullptr && *env != '\0') {
    Isa cap;
    if (!ParseIsa(env, &cap)) {
      QSHARD_LOG(WARNING) << "QSHARD_CPU_ISA=" << env << " is not scalar, avx2 or avx512: ignored";
    } else if (static_cast<int>(cap) < static_cast<int>(isa)) {
      isa = cap;
    }
  }
  return isa;
}

// -1 until first use; then the active Isa as an int.
std::atomic<int> g_active{-1};

}  // namespace

bool CpuSupportsIsa(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return Detect().avx2;
    case Isa::kAvx512:
      return Detect().avx512;
  }
  return false;
}

bool CpuHasAvx512Vnni() { return Detect().avx512_vnni; }

Isa DefaultIsa() {
  static const Isa isa = ComputeDefault();
  return isa;
}

Isa ActiveIsa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(DefaultIsa());
    g_active.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

bool SetIsa(Isa isa) {
  if (!CpuSupportsIsa(isa)) return false;
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

bool ParseIsa(const char* name, Isa* isa) {
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(name, IsaName(i)) == 0) {
      *isa = i;
      return true;
    }
  }
  return false;
}

}  // namespace qshard::cpu
