// A minimal .safetensors reader for C++ hosts (textual-inversion and LoRA files, the engine's token table): an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then
// the raw little-endian data. Plain C++17 (ldmrt::core); assumes a little-endian host (x86-64, ARM64).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ldmrt {

struct SafeTensor {
  std::string dtype;                // "F32", "F16", "BF16", "F64", "I64", ... as the file names it
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;   // the tensor's bytes, row-major
};

// Every tensor of the file by name, and its string metadata into `metadata` when given. Throws std::runtime_error
// naming the path and what is wrong (missing file, truncated data, a header that does not describe the bytes).
std::map<std::string, SafeTensor> read_safetensors(const std::string& path,
                                                   std::map<std::string, std::string>* metadata = nullptr);

// Bytes per element of a safetensors dtype; 0 for one this reader does not know.
std::size_t safetensors_dtype_size(const std::string& dtype);

}  // namespace ldmrt
