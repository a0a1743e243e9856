// Code-point classes and GPT-2's byte <-> character map (see unicode.h).
#include "tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <vector>

#include "tokenizer/unicode_tables.h"

namespace gptcore::tokenizer {

namespace {

template <size_t N>
bool in_ranges(const CodePointRange (&ranges)[N], uint32_t cp) {
  // First range whose upper end is >= cp; cp is inside when that range starts at or before it.
  const CodePointRange* it = std::lower_bound(
      ranges, ranges + N, cp, [](const CodePointRange& r, uint32_t v) { return r.hi < v; });
  return it != ranges + N && it->lo <= cp;
}

CharClass lookup(uint32_t cp) {
  if (in_ranges(kLetterRanges, cp)) return CharClass::Letter;
  if (in_ranges(kNumberRanges, cp)) return CharClass::Number;
  if (in_ranges(kWhiteSpaceRanges, cp)) return CharClass::Space;
  return CharClass::Other;
}

// One byte per Basic Multilingual Plane code point, filled once when the module loads; the rare
// code points above U+FFFF use the binary search.
struct BmpTable {
  std::vector<CharClass> cls;
  BmpTable() : cls(0x10000) {
    for (uint32_t cp = 0; cp < 0x10000; ++cp) cls[cp] = lookup(cp);
  }
};
const BmpTable kBmp;

// The 188 bytes GPT-2 leaves as themselves.
bool printable_byte(unsigned b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct ByteMap {
  std::array<uint32_t, 256> to_char{};
  std::array<int16_t, 512> from_char{};  // every mapped character is below U+0200
  ByteMap() {
    from_char.fill(-1);
    uint32_t next = 256;
    for (unsigned b = 0; b < 256; ++b) {
      to_char[b] = printable_byte(b) ? b : next++;
      from_char[to_char[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteMap kByteMap;

void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else {  // the map only produces code points below U+0800
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

namespace detail {
const CharClass kAsciiClass[128] = {
#define O CharClass::Other
#define L CharClass::Letter
#define N CharClass::Number
#define S CharClass::Space
    // 0x00 - 0x1F: controls; \t \n \v \f \r are white space
    O, O, O, O, O, O, O, O, O, S, S, S, S, S, O, O,
    O, O, O, O, O, O, O, O, O, O, O, O, O, O, O, O,
    // 0x20 - 0x3F: space, punctuation, digits
    S, O, O, O, O, O, O, O, O, O, O, O, O, O, O, O,
    N, N, N, N, N, N, N, N, N, N, O, O, O, O, O, O,
    // 0x40 - 0x5F: @, A-Z, [ \ ] ^ _
    O, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L,
    L, L, L, L, L, L, L, L, L, L, L, O, O, O, O, O,
    // 0x60 - 0x7F: `, a-z, { | } ~ DEL
    O, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L,
    L, L, L, L, L, L, L, L, L, L, L, O, O, O, O, O,
#undef O
#undef L
#undef N
#undef S
};
}  // namespace detail

CharClass char_class_slow(uint32_t cp) {
  if (cp < 0x10000) return kBmp.cls[cp];
  return lookup(cp);
}

CharClass char_class(uint32_t cp) {
  if (cp < 0x80) return detail::kAsciiClass[cp];
  if (cp > 0x10FFFF) return CharClass::Other;
  return char_class_slow(cp);
}

const char* unicode_version() { return kUnicodeVersion; }

uint32_t byte_to_char(uint8_t b) { return kByteMap.to_char[b]; }

std::string bytes_to_vocab_string(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) append_utf8(&out, kByteMap.to_char[b]);
  return out;
}

bool vocab_string_to_bytes(std::string_view s, std::string* out) {
  out->clear();
  out->reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    uint32_t cp;
    if (p[0] < 0x80) {
      cp = p[0];
      p += 1;
    } else if ((p[0] & 0xE0) == 0xC0 && p + 1 < end && (p[1] & 0xC0) == 0x80) {
      cp = ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
      if (cp < 0x80) return false;  // overlong form
      p += 2;
    } else {
      return false;  // three- and four-byte characters are never in the map
    }
    if (cp >= kByteMap.from_char.size() || kByteMap.from_char[cp] < 0) return false;
    out->push_back(static_cast<char>(kByteMap.from_char[cp]));
  }
  return true;
}

}  // namespace gptcore::tokenizer
