// A minimal PNG writer: 8-bit RGB, no filtering, zlib "stored" (uncompressed) blocks, so no zlib needed.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// Writes `rgb` (height rows of width * 3 bytes) to `path`; throws std::runtime_error when it cannot.
void write_png(const std::string& path, int width, int height, const std::vector<std::uint8_t>& rgb);
