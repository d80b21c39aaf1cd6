#include "ldmrt/rng.h"

#include <cmath>

namespace ldmrt {
namespace {

constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
constexpr double kTwoPi = 6.283185307179586476925;
constexpr double kTwoPow53 = 9007199254740992.0;

std::array<std::uint32_t, 4> block(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  return philox4x32_10({static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
                        static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)},
                       {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)});
}

}  // namespace

std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> c, std::array<std::uint32_t, 2> k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kWeyl0;
      k[1] += kWeyl1;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c[2];
    c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<std::uint32_t>(p1),
         static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<std::uint32_t>(p0)};
  }
  return c;
}

void philox_words(std::uint64_t seed, std::uint64_t stream, std::uint32_t* out, std::size_t count) {
  for (std::size_t b = 0; b * 4 < count; ++b) {
    const auto w = block(seed, stream, b);
    for (int i = 0; i < 4; ++i) out[b * 4 + i] = w[i];
  }
}

template <typename Real>
void randn(std::uint64_t seed, std::uint64_t stream, Real* out, std::size_t count) {
  for (std::size_t j = 0; 2 * j < count; ++j) {
    const auto w = block(seed, stream, j);
    const std::uint64_t bits1 = ((static_cast<std::uint64_t>(w[1]) << 32) | w[0]) >> 11;
    const std::uint64_t bits2 = ((static_cast<std::uint64_t>(w[3]) << 32) | w[2]) >> 11;
    const double u1 = (static_cast<double>(bits1) + 0.5) / kTwoPow53;
    const double u2 = static_cast<double>(bits2) / kTwoPow53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    out[2 * j] = static_cast<Real>(r * std::cos(kTwoPi * u2));
    if (2 * j + 1 < count) out[2 * j + 1] = static_cast<Real>(r * std::sin(kTwoPi * u2));
  }
}

template void randn<float>(std::uint64_t, std::uint64_t, float*, std::size_t);
template void randn<double>(std::uint64_t, std::uint64_t, double*, std::size_t);

}  // namespace ldmrt
