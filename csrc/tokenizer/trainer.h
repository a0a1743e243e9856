// Learning a byte-level BPE from text, the way GPT-2's vocabulary was made.
//
//   1. Count pieces: the text is cut at special tokens (which never take part in merges), the rest
//      is pre-tokenized with GPT-2's pattern, and identical pieces are counted once with a weight.
//      Texts and file ranges are counted on several threads.
//   2. Merge greedily: every piece starts as its bytes; the adjacent pair with the highest total
//      count becomes a new token, every occurrence of it is merged (left to right, as encoding
//      does), the pair counts are updated, and so on until the vocabulary is full or no pair
//      occurs at least `min_frequency` times. Ties go to the pair whose (left bytes, right bytes)
//      sorts first, so the result does not depend on thread count or hash order. A pair whose
//      concatenation is already a token (reachable by another split) is never merged, so every
//      merge makes a new token and encoding with the result repeats training's merges exactly.
//
// Ids: 0..255 are the single bytes in byte order, then the merges' tokens in order, then the
// special tokens in the order given.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/bpe.h"

namespace gptcore::tokenizer {

struct TrainConfig {
  size_t vocab_size = 0;  // total, with the 256 byte tokens and the special tokens
  std::vector<std::string> special_tokens;
  uint64_t min_frequency = 2;
  int num_threads = 0;  // 0: all hardware threads
  // Texts and files are counted in chunks of about this many bytes, cut where the pieces do not
  // change, so one large file still uses every thread.
  uint64_t chunk_bytes = uint64_t{16} << 20;
};

// Step 1 alone: every piece and its count, in no particular order (for tests and tools).
std::vector<std::pair<std::string, uint64_t>> count_pieces(const std::vector<std::string_view>& texts,
                                                           const std::vector<std::string>& files,
                                                           const TrainConfig& config);

// Throws ValueError for a bad configuration and RuntimeError naming a file that cannot be read.
std::unique_ptr<BPE> train_bpe(const std::vector<std::string_view>& texts,
                               const std::vector<std::string>& files, const TrainConfig& config);

}  // namespace gptcore::tokenizer
