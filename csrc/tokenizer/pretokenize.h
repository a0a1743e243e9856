// GPT-2's pre-tokenizer, written out by hand. GPT-2 splits text into pieces with the regex
//
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// (leftmost alternative that matches wins, each quantifier greedy) and BPE never merges across
// two pieces. At each position the alternatives come down to:
//
//   1. an apostrophe followed by s, t, m, d, re, ve or ll (lower case only): that contraction;
//   2. an optional single U+0020 space, then a maximal run of letters, of numbers, or of "other"
//      code points (neither white space, letter nor number). The space joins the run only when a
//      non-space code point follows it. An "other" run is greedy and swallows apostrophes, so
//      "!'s" splits as "!'" + "s";
//   3. white space: a maximal run of white-space code points. At the end of the text the whole run
//      is one piece. Otherwise `\s+(?!\S)` backtracks by one code point, so a run of two or more
//      leaves its last code point for the next piece (which, if it is a space, then prefixes the
//      following word: "a   b" -> "a", "  ", " b"); a run of exactly one cannot backtrack and
//      falls through to `\s+`, becoming a piece by itself ("\n" in "a\nb").
//
// The classes come from unicode.h; invalid UTF-8 bytes count as one-byte "other" code points.
#pragma once

#include <cstddef>
#include <string_view>

#include "tokenizer/unicode.h"

namespace gptcore::tokenizer {

// Calls emit(offset, length) for each piece of `text`, left to right; the pieces tile the text.
template <class Emit>
void pretokenize(std::string_view text, Emit&& emit) {
  const auto* base = reinterpret_cast<const unsigned char*>(text.data());
  const auto* end = base + text.size();
  const auto* p = base;
  while (p < end) {
    // 1. contractions
    if (*p == '\'' && p + 1 < end) {
      const unsigned char c1 = p[1];
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(static_cast<size_t>(p - base), size_t{2});
        p += 2;
        continue;
      }
      if (p + 2 < end && ((c1 == 'r' && p[2] == 'e') || (c1 == 'v' && p[2] == 'e') ||
                          (c1 == 'l' && p[2] == 'l'))) {
        emit(static_cast<size_t>(p - base), size_t{3});
        p += 3;
        continue;
      }
    }
    const unsigned char* start = p;
    int len;
    CharClass cls = next_char(p, end, &len);
    // 2. " ?" before a run: the space belongs to the run when a non-space follows it
    if (*p == ' ' && p + 1 < end) {
      int len2;
      const CharClass cls2 = next_char(p + 1, end, &len2);
      if (cls2 != CharClass::Space) {
        p += 1;
        cls = cls2;
        len = len2;
      }
    }
    if (cls != CharClass::Space) {
      p += len;
      while (p < end) {
        // ASCII fast path for the class test; next_char handles the rest
        if (*p < 0x80) {
          if (detail::kAsciiClass[*p] != cls) break;
          p += 1;
        } else {
          if (next_char(p, end, &len) != cls) break;
          p += len;
        }
      }
      emit(static_cast<size_t>(start - base), static_cast<size_t>(p - start));
      continue;
    }
    // 3. white space
    const unsigned char* last = p;  // start of the run's last code point
    p += len;
    int count = 1;
    while (p < end) {
      if (next_char(p, end, &len) != CharClass::Space) break;
      last = p;
      p += len;
      ++count;
    }
    if (p < end && count >= 2) p = last;  // \s+(?!\S): give the last one back
    emit(static_cast<size_t>(start - base), static_cast<size_t>(p - start));
  }
}

}  // namespace gptcore::tokenizer
