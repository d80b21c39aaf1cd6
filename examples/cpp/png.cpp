#include "png.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <stdexcept>

namespace {

std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t crc = 0) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t n = 0; n < 256; ++n) {
      std::uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

void put32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<std::uint8_t>(v >> shift));
}

// A chunk: length, type, data, CRC of type and data.
void chunk(std::ofstream& file, const char* type, const std::vector<std::uint8_t>& data) {
  std::vector<std::uint8_t> body(type, type + 4);
  body.insert(body.end(), data.begin(), data.end());
  std::vector<std::uint8_t> out;
  put32(out, static_cast<std::uint32_t>(data.size()));
  out.insert(out.end(), body.begin(), body.end());
  put32(out, crc32(body.data(), body.size()));
  file.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size()));
}

}  // namespace

void write_png(const std::string& path, int width, int height, const std::vector<std::uint8_t>& rgb) {
  const std::size_t row = static_cast<std::size_t>(width) * 3;
  if (width <= 0 || height <= 0 || rgb.size() != row * static_cast<std::size_t>(height))
    throw std::invalid_argument("write_png: the pixels do not match the size");
  std::vector<std::uint8_t> raw;  // each row behind filter type 0
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb.begin() + static_cast<std::ptrdiff_t>(y * row), rgb.begin() + static_cast<std::ptrdiff_t>((y + 1) * row));
  }
  std::vector<std::uint8_t> zlib{0x78, 0x01};  // deflate, 32K window, no dictionary
  for (std::size_t pos = 0; pos < raw.size();) {  // raw is never empty: height >= 1 rows of >= 1 byte
    const std::size_t n = std::min<std::size_t>(65535, raw.size() - pos);
    zlib.push_back(pos + n == raw.size() ? 1 : 0);  // BFINAL on the last block, BTYPE 00 (stored)
    for (std::uint16_t v : {static_cast<std::uint16_t>(n), static_cast<std::uint16_t>(~n)}) {
      zlib.push_back(static_cast<std::uint8_t>(v & 0xFF));
      zlib.push_back(static_cast<std::uint8_t>(v >> 8));
    }
    zlib.insert(zlib.end(), raw.begin() + static_cast<std::ptrdiff_t>(pos), raw.begin() + static_cast<std::ptrdiff_t>(pos + n));
    pos += n;
  }
  std::uint32_t a = 1, b = 0;  // Adler-32 of the uncompressed data
  for (std::uint8_t byte : raw) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  put32(zlib, (b << 16) | a);

  std::ofstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot write " + path);
  static const std::uint8_t signature[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  file.write(reinterpret_cast<const char*>(signature), sizeof signature);
  std::vector<std::uint8_t> header;
  put32(header, static_cast<std::uint32_t>(width));
  put32(header, static_cast<std::uint32_t>(height));
  header.insert(header.end(), {8, 2, 0, 0, 0});  // 8 bits, RGB, deflate, adaptive filtering, no interlace
  chunk(file, "IHDR", header);
  chunk(file, "IDAT", zlib);
  chunk(file, "IEND", {});
  if (!file) throw std::runtime_error("cannot write " + path);
}
