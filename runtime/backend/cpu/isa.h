// File: isa.h
// Which instruction set the CPU kernels use. Detected once with cpuid; every kernel family
// has a portable scalar path, an AVX2+FMA+F16C path and (where it helps) an AVX-512 path,
// compiled with __attribute__((target(...))) so the binary itself needs no -march flags.
//
// The environment variable QSHARD_CPU_ISA=scalar|avx2|avx512 (read once, at the first
// query) caps the ISA below what the CPU supports, e.g. to measure the AVX2 path on an
// AVX-512 machine. Tests switch paths with SetIsa.
#ifndef QSHARD_RUNTIME_BACKEND_CPU_ISA_H_
#define QSHARD_RUNTIME_BACKEND_CPU_ISA_H_

namespace qshard::cpu {

// Ordered: a higher value implies every lower one is also usable.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether the CPU (and OS) support the ISA: kAvx2 needs avx2+fma+f16c, kAvx512 needs
// avx512f+bw+vl+dq on top of that.
bool CpuSupportsIsa(Isa isa);
// AVX-512 VNNI (vpdpbusd / vpdpwssd): used by the integer kernels when kAvx512 is active.
bool CpuHasAvx512Vnni();

// The ISA the kernels use now: the default (best supported, capped by QSHARD_CPU_ISA) or
// what SetIsa last chose.
Isa ActiveIsa();
// Forces an ISA (tests, benchmarks). Returns false (and changes nothing) when the CPU lacks
// it. SetIsa(DefaultIsa()) restores the default.
bool SetIsa(Isa isa);
Isa DefaultIsa();

// "scalar", "avx2", "avx512"; ParseIsa returns false for anything else.
const char* IsaName(Isa isa);
bool ParseIsa(const char* name, Isa* isa);

}  // namespace qshard::cpu

#endif  // QSHARD_RUNTIME_BACKEND_CPU_ISA_H_
