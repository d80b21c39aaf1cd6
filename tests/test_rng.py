"""Philox4x32-10 + Box-Muller noise: known-answer vectors, a numpy transcription of the documented layout, and
bit-identical output from the Python binding and from a C++ host linked against the core alone."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ldmrt import _C, sampling

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# Random123's kat_vectors for philox4x32_10: (counter, key, expected)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(_C.philox4x32_10(list(counter), list(key))) == expected


def numpy_randn(seed, stream, count):
    """The layout documented in csrc/include/ldmrt/rng.h, in numpy (uint64 arithmetic, float64 Box-Muller)."""
    pairs = (count + 1) // 2
    idx = np.arange(pairs, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    c = [idx & mask, idx >> np.uint64(32), np.full(pairs, stream & 0xFFFFFFFF, np.uint64),
         np.full(pairs, stream >> 32, np.uint64)]
    k = [np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)]
    for r in range(10):
        if r:
            k = [(k[0] + np.uint64(0x9E3779B9)) & mask, (k[1] + np.uint64(0xBB67AE85)) & mask]
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & mask]
    u1 = (((c[1] << np.uint64(32)) | c[0]) >> np.uint64(11)).astype(np.float64) + 0.5
    u2 = (((c[3] << np.uint64(32)) | c[2]) >> np.uint64(11)).astype(np.float64)
    u1, u2 = u1 / 2.0 ** 53, u2 / 2.0 ** 53
    r = np.sqrt(-2 * np.log(u1))
    out = np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=1).ravel()
    return out[:count], np.stack(c, axis=1).astype(np.uint32).ravel()


@pytest.mark.parametrize("seed,stream", [(0, 0), (42, 3), (2 ** 63 + 12345, 2 ** 40 + 7)])
def test_layout_matches_numpy_transcription(seed, stream):
    normals, words = numpy_randn(seed, stream, 1001)
    assert np.array_equal(_C.philox_words(seed, stream, 4 * 501), words)
    ours = sampling.randn(seed, (1001,), stream=stream, dtype="float64")
    # libm and numpy may round log/cos/sin differently by an ulp
    np.testing.assert_allclose(ours, normals, rtol=1e-14, atol=1e-14)


def test_counter_based_properties():
    a = sampling.randn(5, (4, 64, 64))
    assert a.dtype == np.float32 and a.shape == (4, 64, 64)
    assert np.array_equal(sampling.randn(5, (101,)), a.ravel()[:101])  # any prefix is the same numbers
    assert np.array_equal(sampling.randn(5, (4, 64, 64), dtype="float64").astype(np.float32), a)
    assert not np.array_equal(sampling.randn(6, (101,)), a.ravel()[:101])
    assert not np.array_equal(sampling.randn(5, (101,), stream=1), a.ravel()[:101])
    big = sampling.randn(1, (1_000_000,), dtype="float64")
    assert abs(big.mean()) < 5e-3 and abs(big.std() - 1) < 5e-3
    assert abs(np.mean(big[::2] * big[1::2])) < 5e-3  # the cos/sin halves of a pair are uncorrelated


HOST = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "ldmrt/rng.h"
int main(int argc, char** argv) {
  const unsigned long long seed = std::strtoull(argv[1], nullptr, 10), stream = std::strtoull(argv[2], nullptr, 10);
  const std::size_t count = std::strtoull(argv[3], nullptr, 10);
  std::vector<float> f(count);
  std::vector<double> d(count);
  ldmrt::randn<float>(seed, stream, f.data(), count);
  ldmrt::randn<double>(seed, stream, d.data(), count);
  std::fwrite(f.data(), sizeof(float), count, stdout);
  std::fwrite(d.data(), sizeof(double), count, stdout);
}
"""


def test_cpp_host_gets_the_same_bits(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build a host program")
    (tmp_path / "host.cpp").write_text(HOST)
    exe = tmp_path / "host"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{CSRC / 'include'}", str(tmp_path / "host.cpp"),
                    str(CSRC / "rng.cpp"), "-o", str(exe)], check=True)
    for seed, stream, count in [(0, 0, 7), (1234, 5, 4 * 64 * 64), (2 ** 64 - 1, 2 ** 63, 33)]:
        raw = subprocess.run([str(exe), str(seed), str(stream), str(count)], check=True, capture_output=True).stdout
        host_f = np.frombuffer(raw[: 4 * count], dtype=np.float32)
        host_d = np.frombuffer(raw[4 * count:], dtype=np.float64)
        assert np.array_equal(host_f.view(np.uint32), sampling.randn(seed, (count,), stream=stream).view(np.uint32))
        assert np.array_equal(host_d.view(np.uint64),
                              sampling.randn(seed, (count,), stream=stream, dtype="float64").view(np.uint64))


def test_every_length_gives_a_prefix_of_the_stream():
    """Lengths across the generator's internal lane blocks (partial blocks, an odd last pair) change no value."""
    for dtype in ("float32", "float64"):
        full = sampling.randn(9, (1200,), stream=2, dtype=dtype)
        for n in [*range(1, 300), 511, 512, 513, 1023, 1024, 1025, 1199]:
            assert np.array_equal(sampling.randn(9, (n,), stream=2, dtype=dtype), full[:n]), (dtype, n)
