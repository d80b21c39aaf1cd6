#include "ldmrt/rng.h"

#include <algorithm>
#include <cmath>

namespace ldmrt {
namespace {

constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
constexpr double kTwoPi = 6.283185307179586476925;
constexpr double kTwoPow53 = 9007199254740992.0;

// One Philox round on one counter; the key schedule is the caller's.
inline void philox_round(std::uint32_t& c0, std::uint32_t& c1, std::uint32_t& c2, std::uint32_t& c3, std::uint32_t k0,
                         std::uint32_t k1) {
  const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c0;
  const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c2;
  c0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1 ^ k0;
  c1 = static_cast<std::uint32_t>(p1);
  c2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c3 = static_cast<std::uint32_t>(p0);
}

// Blocks are generated kLanes at a time with word w of block i in words[w][i]: every round is then the same
// operation over kLanes independent counters, which the compiler turns into SIMD 32x32->64 bit multiplies
// (pmuludq on x86-64 SSE2) instead of a serial chain of ten dependent rounds per block.
constexpr std::size_t kLanes = 64;
using LaneWords = std::uint32_t[4][kLanes];

// Blocks first .. first + kLanes - 1 of (seed, stream).
void philox_lanes(std::uint64_t seed, std::uint64_t stream, std::uint64_t first, LaneWords& words) {
  std::uint32_t(&c0)[kLanes] = words[0];
  std::uint32_t(&c1)[kLanes] = words[1];
  std::uint32_t(&c2)[kLanes] = words[2];
  std::uint32_t(&c3)[kLanes] = words[3];
  for (std::size_t i = 0; i < kLanes; ++i) {
    const std::uint64_t index = first + i;
    c0[i] = static_cast<std::uint32_t>(index);
    c1[i] = static_cast<std::uint32_t>(index >> 32);
    c2[i] = static_cast<std::uint32_t>(stream);
    c3[i] = static_cast<std::uint32_t>(stream >> 32);
  }
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    for (std::size_t i = 0; i < kLanes; ++i) philox_round(c0[i], c1[i], c2[i], c3[i], k0, k1);
  }
}

}  // namespace

std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> c, std::array<std::uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kWeyl0;
      k[1] += kWeyl1;
    }
    philox_round(c[0], c[1], c[2], c[3], k[0], k[1]);
  }
  return c;
}

void philox_words(std::uint64_t seed, std::uint64_t stream, std::uint32_t* out, std::size_t count) {
  LaneWords words;
  const std::size_t blocks = count / 4;
  for (std::size_t first = 0; first < blocks; first += kLanes) {
    philox_lanes(seed, stream, first, words);
    const std::size_t n = std::min(kLanes, blocks - first);
    for (std::size_t i = 0; i < n; ++i)
      for (int w = 0; w < 4; ++w) out[(first + i) * 4 + w] = words[w][i];
  }
}

// Most of the time goes into log, sqrt and sincos in double, which must stay these libm calls to keep the
// documented bits. Per lane block, the integer and conversion work is done first in vector form; the libm calls
// then run back to back (overlapping in an out-of-order core) in an order that keeps their branches predictable.
template <typename Real>
void randn(std::uint64_t seed, std::uint64_t stream, Real* out, std::size_t count) {
  LaneWords words;
  double u1[kLanes], angle[kLanes];
  const std::size_t pairs = (count + 1) / 2;
  for (std::size_t first = 0; first < pairs; first += kLanes) {
    philox_lanes(seed, stream, first, words);
    for (std::size_t i = 0; i < kLanes; ++i) {
      // (w1:w0) >> 11 as hi * 2^32 + lo from 32-bit halves, which SSE2 converts to double several at a time;
      // both halves and their sum (< 2^53) are exact, so this is the double of the 64-bit value.
      const double bits1 = static_cast<double>(words[1][i] >> 11) * 4294967296.0 +
                           static_cast<double>((words[1][i] << 21) | (words[0][i] >> 11));
      const double bits2 = static_cast<double>(words[3][i] >> 11) * 4294967296.0 +
                           static_cast<double>((words[3][i] << 21) | (words[2][i] >> 11));
      u1[i] = (bits1 + 0.5) / kTwoPow53;
      angle[i] = kTwoPi * (bits2 / kTwoPow53);
    }
    const std::size_t n = std::min(kLanes, pairs - first);
    // Visit the pairs octant by octant of their angle (the top three bits of u2): consecutive calls then take the
    // same branches inside sincos (argument range, quadrant), which random angles mispredict (glibc: ~1.5x the
    // time). Each value is still the same call on the same double, so the order changes no bit.
    std::uint32_t octant_start[9] = {};
    for (std::size_t i = 0; i < n; ++i) ++octant_start[(words[3][i] >> 29) + 1];
    for (int o = 0; o < 8; ++o) octant_start[o + 1] += octant_start[o];
    static_assert(kLanes <= 256, "order holds lane numbers in bytes");
    std::uint8_t order[kLanes];
    for (std::size_t i = 0; i < n; ++i) order[octant_start[words[3][i] >> 29]++] = static_cast<std::uint8_t>(i);
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t i = order[k], j = first + i;
      const double r = std::sqrt(-2.0 * std::log(u1[i]));
      const double cos_half = r * std::cos(angle[i]), sin_half = r * std::sin(angle[i]);
      out[2 * j] = static_cast<Real>(cos_half);
      if (2 * j + 1 < count) out[2 * j + 1] = static_cast<Real>(sin_half);
    }
  }
}

template void randn<float>(std::uint64_t, std::uint64_t, float*, std::size_t);
template void randn<double>(std::uint64_t, std::uint64_t, double*, std::size_t);

}  // namespace ldmrt
