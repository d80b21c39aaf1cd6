// The format: https://github.com/huggingface/safetensors (README "Format"): header length (u64 LE), JSON header,
// data; offsets are relative to the start of the data and must tile it.
#include "ldmrt/safetensors.h"

#include <fstream>
#include <stdexcept>

#include "ldmrt/json.h"

namespace ldmrt {

std::size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes{
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},
      {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

std::map<std::string, SafeTensor> read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + " cannot be opened");
  const std::uint64_t file_size = static_cast<std::uint64_t>(in.tellg());
  const auto bad = [&](const std::string& why) { return std::runtime_error(path + " is not a readable .safetensors file (" + why + ")"); };
  if (file_size < 8) throw bad("shorter than its 8-byte header length");
  in.seekg(0);
  unsigned char length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | length_bytes[i];
  if (header_length > file_size - 8) throw bad("its header length " + std::to_string(header_length) + " exceeds the file");
  std::string header(header_length, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_length));
  const std::uint64_t data_size = file_size - 8 - header_length;
  json::Value h;
  try {
    h = json::Value::parse(header);
  } catch (const std::exception& e) {
    throw bad(std::string("header: ") + e.what());
  }
  if (!h.is_object()) throw bad("the header is not a JSON object");
  std::map<std::string, SafeTensor> tensors;
  for (std::size_t i = 0; i < h.size(); ++i) {
    const std::string& name = h.keys()[i];
    if (name == "__metadata__") {
      if (!metadata) continue;
      if (!h[i].is_object()) throw bad("__metadata__ is not an object");
      for (std::size_t j = 0; j < h[i].size(); ++j)
        if (h[i][j].is_string()) (*metadata)[h[i].keys()[j]] = h[i][j].as_string();
      continue;
    }
    const json::Value& entry = h[i];
    SafeTensor t;
    std::uint64_t begin = 0, end = 0;
    try {
      t.dtype = entry.at("dtype").as_string();
      for (const json::Value& d : entry.at("shape").items()) t.shape.push_back(d.as_int());
      begin = static_cast<std::uint64_t>(entry.at("data_offsets")[0].as_int());
      end = static_cast<std::uint64_t>(entry.at("data_offsets")[1].as_int());
    } catch (const std::exception& e) {
      throw bad(name + ": " + e.what());
    }
    const std::size_t element = safetensors_dtype_size(t.dtype);
    if (!element) throw bad(name + " has dtype " + t.dtype + ", which this reader does not know");
    std::uint64_t count = 1;
    for (std::int64_t d : t.shape) {
      if (d < 0) throw bad(name + " has a negative dimension");
      count *= static_cast<std::uint64_t>(d);
    }
    if (begin > end || end > data_size || end - begin != count * element)
      throw bad(name + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + ") do not hold its " +
                std::to_string(count) + " " + t.dtype + " values within the " + std::to_string(data_size) + " data bytes");
    t.data.resize(end - begin);
    in.seekg(static_cast<std::streamoff>(8 + header_length + begin));
    in.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
    if (!in) throw bad(name + ": the data cannot be read");
    tensors.emplace(name, std::move(t));
  }
  return tensors;
}

}  // namespace ldmrt
