// Byte-level BPE: GPT-2's encoder, in C++.
//
// Encoding a text: the pre-tokenizer (pretokenize.h) cuts it into pieces; each piece's bytes
// start as single-byte tokens, and merges are applied exactly as GPT-2's encoder.py does: find
// the adjacent pair with the lowest merge rank, merge every occurrence of that pair in one
// left-to-right pass, repeat until no adjacent pair has a merge. Pieces never merge with each
// other. Two shortcuts keep that fast without changing any result:
//   * a piece whose bytes are a token that BPE maps to itself (checked for every token when the
//     vocabulary is built) is that token;
//   * the result for each piece is remembered in a per-thread cache.
// Long pieces (a megabyte of digits, say) use a heap so they cost O(n log n) instead of O(n^2);
// that path is taken only for vocabularies where it provably gives the same merges (every merge
// makes a new token from tokens made by earlier merges, as any trained BPE does).
//
// Special tokens (such as <|endoftext|>) are matched in the text only where the caller allows
// them; elsewhere the text is ordinary bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/hash_tables.h"

namespace gptcore::tokenizer {

using TokenId = uint32_t;

class BPE {
 public:
  // vocab:    (token bytes, id) for the ordinary tokens; all 256 single bytes must be present.
  // merges:   (left bytes, right bytes) in rank order; left, right and left+right must be tokens.
  // specials: (text, id) for special tokens; ids must differ from every ordinary token's.
  // Ids need not be contiguous. Throws ValueError naming the first problem found.
  BPE(const std::vector<std::pair<std::string, int64_t>>& vocab,
      const std::vector<std::pair<std::string, std::string>>& merges,
      const std::vector<std::pair<std::string, int64_t>>& specials);

  // A tiktoken-style vocabulary (token bytes -> rank, merges implied: BPE joins the adjacent pair
  // whose concatenation has the lowest rank). The merge list is recovered by running that
  // procedure on each token with only lower-ranked tokens available.
  static std::unique_ptr<BPE> from_ranks(const std::vector<std::pair<std::string, int64_t>>& ranks,
                                         const std::vector<std::pair<std::string, int64_t>>& specials);

  BPE(const BPE&) = delete;
  BPE& operator=(const BPE&) = delete;
  ~BPE();

  // Largest id + 1 (ordinary and special).
  uint32_t vocab_size() const { return vocab_size_; }
  size_t num_tokens() const { return num_ordinary_ + specials_.size(); }
  size_t num_merges() const { return merges_.size(); }
  bool heap_path_exact() const { return consistent_; }

  // Text without special-token handling: every byte is ordinary text.
  std::vector<TokenId> encode_ordinary(std::string_view text) const;
  // Occurrences of the special tokens listed in `allowed` become their ids; the text between
  // them is encoded as ordinary text.
  std::vector<TokenId> encode(std::string_view text, const std::vector<std::string>& allowed) const;
  // encode() for each text on `num_threads` threads (0: all hardware threads).
  std::vector<std::vector<TokenId>> encode_batch(const std::vector<std::string_view>& texts,
                                                 const std::vector<std::string>& allowed,
                                                 int num_threads) const;
  // The BPE of one piece (no pre-tokenization, no cache): for tests and tools.
  std::vector<TokenId> encode_piece(std::string_view piece) const;

  // Concatenated bytes of the tokens. An id that is no token throws ValueError naming it.
  std::string decode(const int64_t* ids, size_t n) const;

  // --- the vocabulary, for saving ---
  bool has_token(uint32_t id) const { return id < vocab_size_ && present_[id]; }
  std::string_view token_bytes(uint32_t id) const;  // requires has_token(id)
  bool is_special(uint32_t id) const { return id < vocab_size_ && special_[id]; }
  // Merges in rank order as (left id, right id, merged id).
  struct MergeRule {
    TokenId left, right, result;
  };
  const std::vector<MergeRule>& merges() const { return merges_; }
  const std::vector<std::pair<std::string, TokenId>>& specials() const { return specials_; }

 private:
  struct Cache;
  BPE() = default;
  // Construction steps shared by both factories.
  void set_vocab(const std::vector<std::pair<std::string, int64_t>>& vocab,
                 const std::vector<std::pair<std::string, int64_t>>& specials);
  void add_merge(TokenId left, TokenId right, size_t rank);  // left+right must be a token
  void finish();  // consistency check and the whole-token shortcut flags

  void encode_ordinary_into(std::string_view text, Cache* cache, std::vector<TokenId>* out) const;
  void encode_into(std::string_view text, const std::vector<std::string>& allowed, Cache* cache,
                   std::vector<TokenId>* out) const;
  void bpe_piece(std::string_view piece, std::vector<TokenId>* out) const;
  void bpe_piece_heap(std::string_view piece, std::vector<TokenId>* out) const;
  Cache* take_cache() const;
  void give_cache(Cache* c) const;

  // Token storage: bytes of id i are arena_[offset_[i], offset_[i + 1]).
  std::string arena_;
  std::vector<uint64_t> offset_;
  std::vector<uint8_t> present_, special_;
  uint32_t vocab_size_ = 0;
  size_t num_ordinary_ = 0;

  // Ordinary token bytes -> id | kWholeOk when BPE of those bytes is that one token.
  BytesMap token_index_;
  static constexpr uint64_t kWholeOk = 1ull << 32;
  TokenId byte_token_[256] = {};
  PairMap pair_merges_;  // (left, right) -> (rank, result)
  std::vector<MergeRule> merges_;
  bool consistent_ = false;
  std::vector<std::pair<std::string, TokenId>> specials_;
  BytesMap special_index_;  // special text -> id

  mutable std::mutex pool_mutex_;
  mutable std::vector<Cache*> pool_;
};

}  // namespace gptcore::tokenizer
