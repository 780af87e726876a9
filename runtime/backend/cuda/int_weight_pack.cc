// Host-side repack of an IntQuantMatrix into the layout int_weight_gemm.cu reads (see the
// layout comment there and in int_weight_gemm.h). Pure C++: runs and is tested without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/int_weight_gemm.h"
#include "runtime/base/half.h"
#include "runtime/base/thread_pool.h"

namespace qshard::cuda {

PackedCodeIndex PackedCodeLocation(int64_t n, int64_t p, int64_t k, int bits) {
  // Tile (N tile, K tile) is one contiguous block; inside it 8 slabs of 16 columns, each
  // slab 32 lanes x `bits` words (the lane's 32 codes, packed low bits first).
  const int64_t k_tiles = k / kIntGemmTileK;
  const int64_t tile = (n / kIntGemmTileN) * k_tiles + p / kIntGemmTileK;
  const int64_t slab = (n % kIntGemmTileN) / kIntGemmSlabN;
  const int jj = static_cast<int>((n % 16) / 8);  // which n8 mma tile of the slab
  const int group_id = static_cast<int>(n % 8);   // B fragment column = lane / 4
  const int kk = static_cast<int>(p % kIntGemmTileK);
  const int s = kk / 16;                // k16 step inside the K tile
  const int r = kk % 16;                // row of the 16 x 8 B fragment
  const int tig = (r % 8) / 2;          // B fragment row pair = 2 * (lane % 4) (+8)
  const int e = (r / 8) * 2 + (r % 2);  // element: b0.lo, b0.hi, b1.lo, b1.hi
  const int lane = group_id * 4 + tig;
  const int64_t lane_base = ((tile * 8 + slab) * 32 + lane) * bits;
  PackedCodeIndex idx;
  if (bits == 4) {
    // Word s holds the 8 codes of k16 step s. The two codes of one bf16x2 register (b0 or
    // b1 of n8 tile jj: pair pi = jj*2 + e/2) sit 16 bits apart, at nibbles pi and pi + 4,
    // so one mask-and-or turns both into bf16 (128 + code) at once.
    idx.word = lane_base + s;
    idx.shift = 4 * ((jj * 2 + e / 2) + 4 * (e % 2));
  } else {
    // Word s*2 + jj holds the 4 codes (elements e = 0..3) of step s, n8 tile jj, byte e.
    idx.word = lane_base + s * 2 + jj;
    idx.shift = 8 * e;
  }
  return idx;
}

uint32_t PackedCodeAt(const PackedIntWeights& packed, int64_t n, int64_t p) {
  const PackedCodeIndex idx = PackedCodeLocation(n, p, packed.k, packed.bits);
  const uint32_t mask = (1u << packed.bits) - 1u;
  return (packed.codes[static_cast<size_t>(idx.word)] >> idx.shift) & mask;
}

absl::StatusOr<PackedIntWeights> PackIntWeights(const IntQuantMatrix& m) {
  const int64_t k = m.in_features;
  const int64_t n = m.out_features;
  const int64_t g = m.num_groups;
  if (m.bits != 4 && m.bits != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("IntWeightGemm: bits must be 4 or 8, got ", m.bits));
  }
  if (k <= 0 || n <= 0 || g <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("IntWeightGemm: empty matrix (in_features ", k,
                                                   ", out_features ", n, ", groups ", g, ")"));
  }
  if (k % kIntGemmTileK != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "IntWeightGemm: in_features (K) = ", k, " with out_features (N) = ", n,
        " is not supported: K must be a multiple of ", kIntGemmTileK, " (the kernel's K tile)"));
  }
  if (m.codes.size() != static_cast<size_t>(n * k) || m.g_idx.size() != static_cast<size_t>(k) ||
      m.scales.size() != static_cast<size_t>(g * n) ||
      m.zeros.size() != static_cast<size_t>(g * n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("IntWeightGemm: inconsistent IntQuantMatrix sizes for N x K = ", n, " x ", k,
                     ", G = ", g, ": codes ", m.codes.size(), ", g_idx ", m.g_idx.size(),
                     ", scales ", m.scales.size(), ", zeros ", m.zeros.size()));
  }
  for (int64_t i = 0; i < k; ++i) {
    if (m.g_idx[i] < 0 || m.g_idx[i] >= g) {
      return absl::InvalidArgumentError(
          absl::StrCat("IntWeightGemm: g_idx[", i, "] = ", m.g_idx[i], " outside [0, ", g, ")"));
    }
  }

  PackedIntWeights out;
  out.bits = m.bits;
  out.k = k;
  out.n = n;
  out.n_padded = (n + kIntGemmTileN - 1) / kIntGemmTileN * kIntGemmTileN;
  out.num_groups = g;

  // Sort inputs by group (stable, so an ordered g_idx gives the identity).
  out.perm.resize(static_cast<size_t>(k));
  std::iota(out.perm.begin(), out.perm.end(), 0);
  std::stable_sort(out.perm.begin(), out.perm.end(),
                   [&](int32_t a, int32_t b) { return m.g_idx[a] < m.g_idx[b]; });
  out.act_order = false;
  for (int64_t p = 0; p < k; ++p) out.act_order |= (out.perm[p] != p);

  // Every aligned run of 16 sorted inputs must share one group (the kernel applies one
  // scale row per mma k16 step).
  out.kblock_info.resize(static_cast<size_t>(k / 16));
  for (int64_t b = 0; b < k / 16; ++b) {
    const int32_t grp = m.g_idx[out.perm[b * 16]];
    for (int i = 1; i < 16; ++i) {
      if (m.g_idx[out.perm[b * 16 + i]] != grp) {
        return absl::InvalidArgumentError(absl::StrCat(
            "IntWeightGemm: N x K = ", n, " x ", k, ": after sorting inputs by group, inputs ",
            b * 16, "..", b * 16 + 15,
            " span more than one group; every group must hold a multiple of 16 inputs"));
      }
    }
    const int64_t tile_first = b / 4 * 4;
    int64_t slot = b;
    while (slot > tile_first && m.g_idx[out.perm[(slot - 1) * 16]] == grp) --slot;
    out.kblock_info[b] = (grp << 2) | static_cast<int32_t>(slot - tile_first);
  }
  if (g * 4 > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError("IntWeightGemm: too many groups");
  }

  // Group size for the kernel name: uniform count per group, -1 for a single group.
  {
    std::vector<int64_t> count(static_cast<size_t>(g), 0);
    for (int64_t i = 0; i < k; ++i) ++count[m.g_idx[i]];
    out.group_size = count[0];
    for (int64_t i = 1; i < g; ++i) {
      if (count[i] != count[0]) out.group_size = 0;
    }
    if (g == 1) out.group_size = -1;
  }

  // Codes.
  out.codes.assign(static_cast<size_t>(out.n_padded * k * m.bits / 32), 0u);
  // Threaded over slabs of kIntGemmSlabN columns: a packed word only ever holds codes of
  // one slab's columns, so the slabs' writes are disjoint. (An 8B model's linears are
  // ~7e9 codes: minutes on one core at load.) The first bad code found is reported.
  const uint32_t mask = (1u << m.bits) - 1u;
  std::mutex bad_mu;
  int64_t bad_col = -1, bad_k = -1;
  uint32_t bad_code = 0;
  const int64_t slabs = (n + kIntGemmSlabN - 1) / kIntGemmSlabN;
  ThreadPool::Global().ParallelFor(
      slabs,
      [&](int64_t sb, int64_t se) {
        for (int64_t col = sb * kIntGemmSlabN; col < std::min(n, se * kIntGemmSlabN); ++col) {
          const uint8_t* row = m.codes.data() + col * k;
          for (int64_t p = 0; p < k; ++p) {
            const uint32_t code = row[out.perm[p]];
            if (code > mask) {
              std::lock_guard<std::mutex> lock(bad_mu);
              if (bad_col < 0 || col < bad_col) {
                bad_col = col;
                bad_k = out.perm[p];
                bad_code = code;
              }
              break;
            }
            const PackedCodeIndex idx = PackedCodeLocation(col, p, k, m.bits);
            out.codes[static_cast<size_t>(idx.word)] |= code << idx.shift;
          }
        }
      },
      /*min_chunk=*/4);
  if (bad_col >= 0) {
    return absl::InvalidArgumentError(absl::StrCat("IntWeightGemm: code ", bad_code, " at (n ",
                                                   bad_col, ", k ", bad_k, ") does not fit in ",
                                                   m.bits, " bits"));
  }

  // Scales and zero terms (see PackedIntWeights::scale_zero); padded columns stay 0, which
  // is a zero weight in both encodings (for 4-bit: scale 0, zero term 0).
  out.scale_zero.assign(static_cast<size_t>(g * out.n_padded * 2), 0u);
  const float zmax = static_cast<float>((1 << m.bits) - 1);
  out.integer_zero_points = m.bits == 4;
  for (int64_t grp = 0; grp < g; ++grp) {
    for (int64_t col = 0; col < n; ++col) {
      const float s = m.scales[grp * n + col];
      const float z = m.zeros[grp * n + col];
      uint32_t* w = &out.scale_zero[static_cast<size_t>((grp * out.n_padded + col) * 2)];
      if (m.bits == 4) {
        const float z_int = std::clamp(std::nearbyint(z), 0.0f, zmax);
        const uint16_t s_hi = F32ToBf16(s);
        const uint16_t s_lo = F32ToBf16(s - Bf16ToF32(s_hi));
        const uint16_t cf = F32ToBf16(-s * (z - z_int));
        const uint16_t zmagic = F32ToBf16(128.0f + z_int);  // exact: 128..143
        w[0] = static_cast<uint32_t>(s_hi) | (static_cast<uint32_t>(s_lo) << 16);
        w[1] = static_cast<uint32_t>(cf) | (static_cast<uint32_t>(zmagic) << 16);
        // +0 and -0 both mean "no fractional zero term".
        if ((cf & 0x7FFFu) != 0) out.integer_zero_points = false;
      } else {
        const float sz = -s * z;
        std::memcpy(&w[0], &s, sizeof(float));
        std::memcpy(&w[1], &sz, sizeof(float));
      }
    }
  }
  return out;
}

int64_t PlanIntGemv4TilesPerSplit(const std::vector<int32_t>& step_groups, int64_t n_tiles, int sms,
                                  int blocks_per_sm) {
  const int64_t k_tiles = static_cast<int64_t>(step_groups.size()) / 4;
  if (k_tiles <= 0 || n_tiles <= 0) return 1;
  // As the GEMM: aim for blocks_per_sm blocks per SM, at most kIntGemv4MaxTiles per split.
  const int64_t target = std::max(blocks_per_sm, 1) * static_cast<int64_t>(std::max(sms, 1));
  const int64_t splits =
      std::clamp<int64_t>((target + n_tiles - 1) / n_tiles,
                          (k_tiles + kIntGemv4MaxTiles - 1) / kIntGemv4MaxTiles, k_tiles);
  int64_t per = (k_tiles + splits - 1) / splits;
  // ... and at most kIntGemv4GroupRows groups in any split's range (one K tile spans at
  // most 4 groups, so the halving ends).
  auto max_groups = [&](int64_t tiles) {
    int64_t worst = 0;
    for (int64_t first = 0; first < k_tiles; first += tiles) {
      const int64_t end = std::min(k_tiles, first + tiles) * 4;
      int64_t groups = 0;
      for (int64_t st = first * 4; st < end; ++st) {
        groups += (st == first * 4 || step_groups[st] != step_groups[st - 1]) ? 1 : 0;
      }
      worst = std::max(worst, groups);
    }
    return worst;
  };
  while (per > 1 && max_groups(per) > kIntGemv4GroupRows) per = (per + 1) / 2;
  return per;
}

}  // namespace qshard::cuda
