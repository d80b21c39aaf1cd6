// A small JSON reader for engine manifests and tokenizer vocabularies (RFC 8259, UTF-8 text).
// Objects keep their members in file order; numbers are doubles (exact for the int64 token ids in use).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ldmrt::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  // Throws std::runtime_error naming the byte offset of the first error.
  static Value parse(std::string_view text);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Accessors throw std::runtime_error when the value has another type.
  bool as_bool() const;
  double as_number() const;
  std::int64_t as_int() const;  // also checks that the number is integral
  const std::string& as_string() const;
  const std::vector<Value>& items() const;       // array elements, or object member values
  const std::vector<std::string>& keys() const;  // object member names, parallel to items()
  std::size_t size() const { return items().size(); }
  const Value& operator[](std::size_t i) const { return items().at(i); }

  // Object members: `at` throws when missing, `find` returns nullptr.
  const Value& at(std::string_view key) const;
  const Value* find(std::string_view key) const;

 private:
  friend class Parser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Value> items_;
  std::vector<std::string> keys_;
};

// The whole file as a string; throws std::runtime_error naming the path when it cannot be read.
std::string read_file(const std::string& path);

// Appends code point `cp` to `out` as UTF-8 (the tokenizers use it too).
void append_utf8(std::string& out, char32_t cp);

}  // namespace ldmrt::json
