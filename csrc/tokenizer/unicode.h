// Unicode helpers for the tokenizer: UTF-8 decoding, the four code-point classes GPT-2's
// pre-tokenization pattern distinguishes, and GPT-2's byte <-> printable-character mapping
// (the alphabet its encoder.json / vocab.bpe files are written in).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace gptcore::tokenizer {

// \p{L}, \p{N}, \s, or none of them.
enum class CharClass : uint8_t { Other = 0, Letter = 1, Number = 2, Space = 3 };

// Class of a code point above U+007F (tables in unicode_tables.h; O(1) in the BMP).
CharClass char_class_slow(uint32_t cp);

namespace detail {
// Classes of the 128 ASCII code points, so the common case is one load.
extern const CharClass kAsciiClass[128];
}  // namespace detail

// Decodes the code point starting at p (p < end) and returns its class; *len gets its length in
// bytes. Bytes that do not start a valid UTF-8 sequence (stray continuation bytes, overlong forms,
// surrogates, values past U+10FFFF, truncated sequences) count as one-byte code points of class
// Other, so any byte string can be split and nothing reads past `end`.
inline CharClass next_char(const unsigned char* p, const unsigned char* end, int* len) {
  const unsigned c = p[0];
  if (c < 0x80) {
    *len = 1;
    return detail::kAsciiClass[c];
  }
  const std::ptrdiff_t avail = end - p;
  uint32_t cp;
  int n;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07;
  } else {
    *len = 1;
    return CharClass::Other;
  }
  if (avail < n) {
    *len = 1;
    return CharClass::Other;
  }
  for (int k = 1; k < n; ++k) {
    const unsigned cc = p[k];
    if ((cc & 0xC0) != 0x80) {
      *len = 1;
      return CharClass::Other;
    }
    cp = (cp << 6) | (cc & 0x3F);
  }
  // Reject overlong encodings, UTF-16 surrogates and code points past U+10FFFF.
  if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
      (n == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
    *len = 1;
    return CharClass::Other;
  }
  *len = n;
  return char_class_slow(cp);
}

// Class of one code point (for tests and tools).
CharClass char_class(uint32_t cp);

// The Unicode version the class tables were generated from.
const char* unicode_version();

// GPT-2's reversible byte -> character map: the 188 printable bytes ('!'..'~', U+00A1..U+00AC,
// U+00AE..U+00FF) stand for themselves; the other 68 bytes become U+0100, U+0101, ... in byte
// order. Vocabulary files store every token as the UTF-8 of those characters.
uint32_t byte_to_char(uint8_t b);

// Token bytes -> their GPT-2 vocabulary-file spelling (UTF-8).
std::string bytes_to_vocab_string(std::string_view bytes);

// Inverse of bytes_to_vocab_string. Returns false when `s` holds a character outside the 256
// of the map or is not valid UTF-8.
bool vocab_string_to_bytes(std::string_view s, std::string* out);

}  // namespace gptcore::tokenizer
