// Counter-based Gaussian noise: Philox4x32-10 (Salmon et al. 2011) and Box-Muller, so a (seed, stream) pair gives
// the same numbers in any process or thread order, and the Python binding returns exactly these bits. The Philox
// words are portable bit for bit; the normals are exact wherever the same libm runs (glibc picks sin/cos/log
// variants per CPU, other libms may differ in the last bit).
//
// Layout: element pair j of stream s with seed k uses one Philox block with counter (j_lo, j_hi, s_lo, s_hi) and
// key (k_lo, k_hi). Its four words give two 53-bit uniforms u1 = (w1:w0 >> 11 + 0.5) / 2^53 in (0, 1) and
// u2 = (w3:w2 >> 11) / 2^53 in [0, 1); element 2j is r cos(2 pi u2) and element 2j+1 is r sin(2 pi u2) with
// r = sqrt(-2 log u1), computed in double and rounded once to the output type.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>

namespace ldmrt {

std::array<std::uint32_t, 4> philox4x32_10(std::array<std::uint32_t, 4> counter, std::array<std::uint32_t, 2> key);

// The raw words of blocks [0, count / 4) of a stream, for tests (count a multiple of 4).
void philox_words(std::uint64_t seed, std::uint64_t stream, std::uint32_t* out, std::size_t count);

// Standard normal samples, elements [0, count) of the stream.
template <typename Real>
void randn(std::uint64_t seed, std::uint64_t stream, Real* out, std::size_t count);

}  // namespace ldmrt
