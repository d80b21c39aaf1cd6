#include "ldmrt/json.h"

#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace ldmrt::json {

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}


class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Value parse_document() {
    Value v = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 256;
  std::string_view text_;
  std::size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON error at byte " + std::to_string(pos_) + ": " + what);
  }
  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }
  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end of text");
    return text_[pos_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  void literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal");
    pos_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    Value v;
    switch (peek()) {
      case '{': {
        v.type_ = Value::Type::Object;
        ++pos_;
        if (peek() == '}') { ++pos_; return v; }
        for (;;) {
          if (peek() != '"') fail("expected a member name");
          v.keys_.push_back(parse_string());
          expect(':');
          v.items_.push_back(parse_value(depth + 1));
          if (peek() == ',') { ++pos_; continue; }
          expect('}');
          return v;
        }
      }
      case '[': {
        v.type_ = Value::Type::Array;
        ++pos_;
        if (peek() == ']') { ++pos_; return v; }
        for (;;) {
          v.items_.push_back(parse_value(depth + 1));
          if (peek() == ',') { ++pos_; continue; }
          expect(']');
          return v;
        }
      }
      case '"':
        v.type_ = Value::Type::String;
        v.string_ = parse_string();
        return v;
      case 't': literal("true"); v.type_ = Value::Type::Bool; v.bool_ = true; return v;
      case 'f': literal("false"); v.type_ = Value::Type::Bool; return v;
      case 'n': literal("null"); return v;
      default:
        v.type_ = Value::Type::Number;
        v.number_ = parse_number();
        return v;
    }
  }

  double parse_number() {
    // Python's json writes NaN and Infinity for non-finite floats; accept them as it reads them.
    for (auto [word, value] : {std::pair<std::string_view, double>{"NaN", NAN}, {"Infinity", INFINITY},
                               {"-Infinity", -INFINITY}})
      if (text_.substr(pos_, word.size()) == word) { pos_ += word.size(); return value; }
    const std::size_t start = pos_;
    if (pos_ < text_.size() && text_[pos_] == '-') ++pos_;
    while (pos_ < text_.size() && std::string_view("0123456789.eE+-").find(text_[pos_]) != std::string_view::npos) ++pos_;
    double value = 0;
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    auto [end, err] = std::from_chars(first, last, value);  // locale-independent, correctly rounded
    if (err != std::errc() || end != last || start == pos_) { pos_ = start; fail("invalid number"); }
    return value;
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("invalid \\u escape");
    }
    return v;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) fail("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; continue; }
      if (pos_ >= text_.size()) fail("unterminated escape");
      switch (text_[pos_++]) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          char32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {  // a surrogate pair (Python's json.dumps writes non-BMP so)
            if (text_.substr(pos_, 2) != "\\u") fail("unpaired surrogate");
            pos_ += 2;
            const char32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("unpaired surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("invalid escape");
      }
    }
  }
};

Value Value::parse(std::string_view text) { return Parser(text).parse_document(); }

namespace {
const char* type_name(Value::Type t) {
  switch (t) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    default: return "an object";
  }
}
[[noreturn]] void wrong_type(Value::Type got, const char* wanted) {
  throw std::runtime_error(std::string("JSON value is ") + type_name(got) + ", expected " + wanted);
}
}  // namespace

bool Value::as_bool() const {
  if (type_ != Type::Bool) wrong_type(type_, "a boolean");
  return bool_;
}
double Value::as_number() const {
  if (type_ != Type::Number) wrong_type(type_, "a number");
  return number_;
}
std::int64_t Value::as_int() const {
  const double v = as_number();
  if (v != std::floor(v) || std::fabs(v) > 9007199254740992.0) throw std::runtime_error("JSON number is not an integer");
  return static_cast<std::int64_t>(v);
}
const std::string& Value::as_string() const {
  if (type_ != Type::String) wrong_type(type_, "a string");
  return string_;
}
const std::vector<Value>& Value::items() const {
  if (type_ != Type::Array && type_ != Type::Object) wrong_type(type_, "an array or object");
  return items_;
}
const std::vector<std::string>& Value::keys() const {
  if (type_ != Type::Object) wrong_type(type_, "an object");
  return keys_;
}
const Value* Value::find(std::string_view key) const {
  for (std::size_t i = 0; i < keys().size(); ++i)
    if (keys_[i] == key) return &items_[i];
  return nullptr;
}
const Value& Value::at(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw std::runtime_error("JSON object has no member \"" + std::string(key) + "\"");
  return *v;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace ldmrt::json
