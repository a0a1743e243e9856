// Byte-level BPE encoder/decoder (see bpe.h for the algorithm and its shortcuts).
#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <limits>
#include <queue>
#include <system_error>
#include <thread>

#include "core/tensor.h"  // ValueError
#include "tokenizer/pretokenize.h"

namespace gptcore::tokenizer {

namespace {

constexpr uint32_t kNoRank = std::numeric_limits<uint32_t>::max();
// Ids above this are refused: a corrupt file must not make us allocate gigabytes.
constexpr int64_t kMaxTokenId = (int64_t{1} << 26) - 1;
// Pieces longer than this use the heap (when that is exact) and are not cached.
constexpr size_t kHeapPiece = 128;
constexpr size_t kMaxCachedPiece = 256;
// A cache is emptied when it grows past either bound.
constexpr size_t kCacheMaxEntries = size_t{1} << 16;
constexpr size_t kCacheMaxTokens = size_t{1} << 20;
// More threads than this are never started, whatever the caller asks for.
constexpr size_t kMaxThreads = 256;

// Bytes for an error message: printable ASCII as is, everything else as \xNN.
std::string show(std::string_view b) {
  static const char* hex = "0123456789abcdef";
  std::string s = "'";
  for (unsigned char c : b.substr(0, 40)) {
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      s.push_back(static_cast<char>(c));
    } else {
      s += "\\x";
      s.push_back(hex[c >> 4]);
      s.push_back(hex[c & 15]);
    }
  }
  if (b.size() > 40) s += "...";
  return s + "'";
}

}  // namespace

// Per-thread memory of piece -> tokens. Values pack (offset into toks) << 16 | token count.
struct BPE::Cache {
  BytesMap map{4096};
  std::vector<TokenId> toks;

  bool lookup(std::string_view piece, std::vector<TokenId>* out) const {
    const uint64_t* v = map.find(piece);
    if (!v) return false;
    const TokenId* t = toks.data() + (*v >> 16);
    out->insert(out->end(), t, t + (*v & 0xffff));
    return true;
  }
  void store(std::string_view piece, const TokenId* t, size_t n) {
    if (map.size() >= kCacheMaxEntries || toks.size() + n > kCacheMaxTokens) {
      map.clear();
      toks.clear();
    }
    map.put(piece, (uint64_t(toks.size()) << 16) | n);
    toks.insert(toks.end(), t, t + n);
  }
};

BPE::~BPE() {
  for (Cache* c : pool_) delete c;
}

// ---- construction -------------------------------------------------------------------------

void BPE::set_vocab(const std::vector<std::pair<std::string, int64_t>>& vocab,
                    const std::vector<std::pair<std::string, int64_t>>& specials) {
  int64_t max_id = -1;
  auto check_id = [&](int64_t id, std::string_view what, std::string_view bytes) {
    if (id < 0 || id > kMaxTokenId)
      throw ValueError(std::string(what) + " " + show(bytes) + " has id " + std::to_string(id) +
                       "; ids must lie in [0, " + std::to_string(kMaxTokenId) + "]");
    max_id = std::max(max_id, id);
  };
  for (const auto& [bytes, id] : vocab) {
    if (bytes.empty()) throw ValueError("vocabulary: a token is empty (id " + std::to_string(id) + ")");
    check_id(id, "vocabulary: token", bytes);
  }
  for (const auto& [text, id] : specials) {
    if (text.empty()) throw ValueError("special tokens: a special token is the empty string");
    check_id(id, "special token", text);
  }
  vocab_size_ = static_cast<uint32_t>(max_id + 1);
  present_.assign(vocab_size_, 0);
  special_.assign(vocab_size_, 0);
  std::vector<std::string_view> bytes_of(vocab_size_);

  token_index_ = BytesMap(vocab.size());
  for (const auto& [bytes, id] : vocab) {
    if (present_[id])
      throw ValueError("vocabulary: id " + std::to_string(id) + " is given to both " +
                       show(bytes_of[id]) + " and " + show(bytes));
    if (const uint64_t* prev = token_index_.find(bytes))
      throw ValueError("vocabulary: token " + show(bytes) + " appears twice (ids " +
                       std::to_string(uint32_t(*prev)) + " and " + std::to_string(id) + ")");
    present_[id] = 1;
    bytes_of[id] = bytes;
    token_index_.put(bytes, static_cast<uint64_t>(id));
  }
  num_ordinary_ = vocab.size();
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    const uint64_t* v = token_index_.find(std::string_view(&c, 1));
    if (!v)
      throw ValueError("vocabulary: the single byte " + show(std::string_view(&c, 1)) +
                       " has no token; a byte-level BPE needs all 256");
    byte_token_[b] = static_cast<TokenId>(*v);
  }
  special_index_ = BytesMap(specials.size());
  for (const auto& [text, id] : specials) {
    if (special_index_.find(text))
      throw ValueError("special tokens: " + show(text) + " is listed twice");
    special_index_.put(text, static_cast<uint64_t>(id));
    if (present_[id])
      throw ValueError("special token " + show(text) + " has id " + std::to_string(id) +
                       ", which already belongs to " + show(bytes_of[id]));
    present_[id] = 1;
    special_[id] = 1;
    bytes_of[id] = text;
    specials_.emplace_back(text, static_cast<TokenId>(id));
  }
  offset_.assign(size_t(vocab_size_) + 1, 0);
  for (uint32_t i = 0; i < vocab_size_; ++i) {
    offset_[i] = arena_.size();
    arena_.append(bytes_of[i]);
  }
  offset_[vocab_size_] = arena_.size();
}

void BPE::add_merge(TokenId left, TokenId right, size_t rank) {
  std::string joined(token_bytes(left));
  joined += token_bytes(right);
  const uint64_t* v = token_index_.find(joined);
  if (!v)
    throw ValueError("merges: merge " + std::to_string(rank) + " (" + show(token_bytes(left)) +
                     " + " + show(token_bytes(right)) + ") makes " + show(joined) +
                     ", which is not in the vocabulary");
  const TokenId result = static_cast<TokenId>(*v);
  if (!pair_merges_.put(left, right, {static_cast<uint32_t>(merges_.size()), result}))
    throw ValueError("merges: the pair " + show(token_bytes(left)) + " + " +
                     show(token_bytes(right)) + " is listed twice (second time at merge " +
                     std::to_string(rank) + ")");
  merges_.push_back({left, right, result});
}

void BPE::finish() {
  // The heap path is exact when every merge makes a token no earlier merge made, from tokens that
  // are single bytes or made by earlier merges: then every pair that appears while merging has a
  // higher rank than the merge that made it appear, so taking the lowest (rank, position) one at
  // a time performs the same merges as GPT-2's whole-pass-per-rank loop.
  std::vector<uint32_t> made_at(vocab_size_, kNoRank);
  consistent_ = true;
  for (size_t r = 0; r < merges_.size(); ++r) {
    const MergeRule& m = merges_[r];
    auto ready = [&](TokenId t) { return token_bytes(t).size() == 1 || made_at[t] < r; };
    if (!ready(m.left) || !ready(m.right) || made_at[m.result] != kNoRank) consistent_ = false;
    if (made_at[m.result] == kNoRank) made_at[m.result] = static_cast<uint32_t>(r);
  }
  // Whole-token shortcut: a token whose own bytes BPE to exactly that token.
  std::vector<TokenId> out;
  std::vector<std::pair<std::string, uint64_t>> updates;
  token_index_.for_each([&](std::string_view bytes, uint64_t v) {
    bool ok = bytes.size() == 1;
    if (!ok) {
      out.clear();
      bpe_piece(bytes, &out);
      ok = out.size() == 1 && out[0] == static_cast<TokenId>(v);
    }
    if (ok) updates.emplace_back(std::string(bytes), v | kWholeOk);
  });
  for (const auto& [bytes, v] : updates) token_index_.put(bytes, v);
}

BPE::BPE(const std::vector<std::pair<std::string, int64_t>>& vocab,
         const std::vector<std::pair<std::string, std::string>>& merges,
         const std::vector<std::pair<std::string, int64_t>>& specials) {
  set_vocab(vocab, specials);
  merges_.reserve(merges.size());
  pair_merges_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& [l, rt] = merges[r];
    const uint64_t* a = token_index_.find(l);
    const uint64_t* b = token_index_.find(rt);
    if (!a || !b)
      throw ValueError("merges: merge " + std::to_string(r) + " (" + show(l) + " + " + show(rt) +
                       ") uses " + show(!a ? l : rt) + ", which is not in the vocabulary");
    add_merge(static_cast<TokenId>(*a), static_cast<TokenId>(*b), r);
  }
  finish();
}

std::unique_ptr<BPE> BPE::from_ranks(const std::vector<std::pair<std::string, int64_t>>& ranks,
                                     const std::vector<std::pair<std::string, int64_t>>& specials) {
  std::unique_ptr<BPE> bpe(new BPE());
  bpe->set_vocab(ranks, specials);
  // Tokens in rank order; each multi-byte token is split by rank-BPE over lower-ranked tokens.
  // When that leaves exactly two parts, those two merge into the token at this point in the list.
  std::vector<std::pair<int64_t, std::string_view>> order;
  order.reserve(ranks.size());
  for (const auto& [bytes, rank] : ranks)
    if (bytes.size() > 1) order.emplace_back(rank, bytes);
  std::sort(order.begin(), order.end());
  bpe->pair_merges_.reserve(order.size());
  std::vector<std::string_view> parts;
  std::string joined;
  for (const auto& [rank, bytes] : order) {
    parts.clear();
    for (size_t i = 0; i < bytes.size(); ++i) parts.push_back(bytes.substr(i, 1));
    while (parts.size() > 2) {
      int64_t best = std::numeric_limits<int64_t>::max();
      size_t at = 0;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        joined.assign(parts[i]);
        joined.append(parts[i + 1]);
        const uint64_t* v = bpe->token_index_.find(joined);
        if (v && int64_t(uint32_t(*v)) < rank && int64_t(uint32_t(*v)) < best) {
          best = int64_t(uint32_t(*v));
          at = i;
        }
      }
      if (best == std::numeric_limits<int64_t>::max()) break;
      parts[at] = std::string_view(parts[at].data(), parts[at].size() + parts[at + 1].size());
      parts.erase(parts.begin() + static_cast<ptrdiff_t>(at) + 1);
    }
    if (parts.size() != 2) continue;  // this token cannot be built from two lower-ranked ones
    const auto left = static_cast<TokenId>(*bpe->token_index_.find(parts[0]));
    const auto right = static_cast<TokenId>(*bpe->token_index_.find(parts[1]));
    bpe->add_merge(left, right, bpe->merges_.size());
  }
  bpe->finish();
  return bpe;
}

std::string_view BPE::token_bytes(uint32_t id) const {
  return std::string_view(arena_.data() + offset_[id], offset_[id + 1] - offset_[id]);
}

// ---- BPE of one piece -----------------------------------------------------------------------

// GPT-2's loop: lowest-ranked adjacent pair, then one left-to-right pass merging every
// occurrence of it (a merged token is not reconsidered within the pass), until nothing merges.
void BPE::bpe_piece(std::string_view piece, std::vector<TokenId>* out) const {
  const size_t n = piece.size();
  if (n > kHeapPiece && consistent_) {
    bpe_piece_heap(piece, out);
    return;
  }
  constexpr size_t kStack = 64;
  TokenId w_stack[kStack];
  uint32_t rk_stack[kStack];
  std::vector<TokenId> w_heap;
  std::vector<uint32_t> rk_heap;
  TokenId* w = w_stack;
  uint32_t* rk = rk_stack;
  if (n > kStack) {
    w_heap.resize(n);
    rk_heap.resize(n);
    w = w_heap.data();
    rk = rk_heap.data();
  }
  for (size_t i = 0; i < n; ++i) w[i] = byte_token_[static_cast<unsigned char>(piece[i])];
  auto rank_of = [&](size_t i) {
    const PairMap::Merge* m = pair_merges_.find(w[i], w[i + 1]);
    return m ? m->rank : kNoRank;
  };
  size_t m = n;
  for (size_t i = 0; i + 1 < m; ++i) rk[i] = rank_of(i);
  while (m > 1) {
    uint32_t best = kNoRank;
    size_t at = 0;
    for (size_t i = 0; i + 1 < m; ++i)
      if (rk[i] < best) {
        best = rk[i];
        at = i;
      }
    if (best == kNoRank) break;
    const MergeRule& rule = merges_[best];
    size_t wr = at, rd = at;
    while (rd < m) {
      if (rd + 1 < m && w[rd] == rule.left && w[rd + 1] == rule.right) {
        w[wr++] = rule.result;
        rd += 2;
      } else {
        w[wr++] = w[rd++];
      }
    }
    m = wr;
    for (size_t i = at > 0 ? at - 1 : 0; i + 1 < m; ++i) rk[i] = rank_of(i);
  }
  out->insert(out->end(), w, w + m);
}

// The same merges for long pieces in O(n log n): a doubly linked list of symbols and a heap of
// candidate pairs ordered by (rank, position); stale candidates are skipped when popped.
void BPE::bpe_piece_heap(std::string_view piece, std::vector<TokenId>* out) const {
  const int n = static_cast<int>(piece.size());
  std::vector<TokenId> id(n);
  std::vector<int> prev(n), next(n);
  std::vector<uint8_t> alive(n, 1);
  for (int i = 0; i < n; ++i) {
    id[i] = byte_token_[static_cast<unsigned char>(piece[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    uint32_t rank;
    int pos;
    TokenId left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int p) {
    const int q = next[p];
    if (q < 0) return;
    if (const PairMap::Merge* m = pair_merges_.find(id[p], id[q])) heap.push({m->rank, p, id[p], id[q]});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (!alive[c.pos] || id[c.pos] != c.left) continue;
    const int q = next[c.pos];
    if (q < 0 || id[q] != c.right) continue;
    id[c.pos] = merges_[c.rank].result;
    alive[q] = 0;
    next[c.pos] = next[q];
    if (next[q] >= 0) prev[next[q]] = c.pos;
    if (prev[c.pos] >= 0) consider(prev[c.pos]);
    consider(c.pos);
  }
  for (int p = 0; p >= 0; p = next[p]) out->push_back(id[p]);
}

std::vector<TokenId> BPE::encode_piece(std::string_view piece) const {
  std::vector<TokenId> out;
  if (!piece.empty()) bpe_piece(piece, &out);
  return out;
}

// ---- encoding -------------------------------------------------------------------------------

BPE::Cache* BPE::take_cache() const {
  {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    if (!pool_.empty()) {
      Cache* c = pool_.back();
      pool_.pop_back();
      return c;
    }
  }
  return new Cache();
}

void BPE::give_cache(Cache* c) const {
  std::lock_guard<std::mutex> lock(pool_mutex_);
  pool_.push_back(c);
}

void BPE::encode_ordinary_into(std::string_view text, Cache* cache, std::vector<TokenId>* out) const {
  pretokenize(text, [&](size_t off, size_t len) {
    const std::string_view piece = text.substr(off, len);
    if (len == 1) {
      out->push_back(byte_token_[static_cast<unsigned char>(piece[0])]);
      return;
    }
    if (const uint64_t* v = token_index_.find(piece); v && (*v & kWholeOk)) {
      out->push_back(static_cast<TokenId>(*v));
      return;
    }
    if (len > kMaxCachedPiece) {
      bpe_piece(piece, out);
      return;
    }
    if (cache->lookup(piece, out)) return;
    const size_t before = out->size();
    bpe_piece(piece, out);
    cache->store(piece, out->data() + before, out->size() - before);
  });
}

void BPE::encode_into(std::string_view text, const std::vector<std::string>& allowed, Cache* cache,
                      std::vector<TokenId>* out) const {
  // Resolve the allowed names to ids.
  std::vector<std::pair<std::string_view, TokenId>> specials;
  for (const std::string& name : allowed) {
    const uint64_t* id = special_index_.find(name);
    if (!id)
      throw ValueError("allowed_special: " + show(name) + " is not a special token of this tokenizer");
    specials.emplace_back(name, static_cast<TokenId>(*id));
  }
  if (specials.empty()) {
    encode_ordinary_into(text, cache, out);
    return;
  }
  // Next occurrence of each special at or after `pos`, refreshed once passed.
  std::vector<size_t> next(specials.size());
  for (size_t k = 0; k < specials.size(); ++k) next[k] = text.find(specials[k].first);
  size_t pos = 0;
  while (true) {
    size_t best = std::string_view::npos;
    size_t which = 0;
    for (size_t k = 0; k < specials.size(); ++k) {
      if (next[k] < pos) next[k] = text.find(specials[k].first, pos);
      // earliest match; at the same position the longer special wins
      if (next[k] < best || (next[k] == best && next[k] != std::string_view::npos &&
                             specials[k].first.size() > specials[which].first.size())) {
        best = next[k];
        which = k;
      }
    }
    if (best == std::string_view::npos) {
      encode_ordinary_into(text.substr(pos), cache, out);
      return;
    }
    encode_ordinary_into(text.substr(pos, best - pos), cache, out);
    out->push_back(specials[which].second);
    pos = best + specials[which].first.size();
  }
}

std::vector<TokenId> BPE::encode_ordinary(std::string_view text) const {
  Cache* cache = take_cache();
  std::vector<TokenId> out;
  out.reserve(text.size() / 4 + 16);
  try {
    encode_ordinary_into(text, cache, &out);
  } catch (...) {
    give_cache(cache);
    throw;
  }
  give_cache(cache);
  return out;
}

std::vector<TokenId> BPE::encode(std::string_view text, const std::vector<std::string>& allowed) const {
  Cache* cache = take_cache();
  std::vector<TokenId> out;
  out.reserve(text.size() / 4 + 16);
  try {
    encode_into(text, allowed, cache, &out);
  } catch (...) {
    give_cache(cache);
    throw;
  }
  give_cache(cache);
  return out;
}

std::vector<std::vector<TokenId>> BPE::encode_batch(const std::vector<std::string_view>& texts,
                                                    const std::vector<std::string>& allowed,
                                                    int num_threads) const {
  std::vector<std::vector<TokenId>> results(texts.size());
  if (texts.empty()) return results;
  // Check `allowed` once up front so no worker thread throws for it.
  {
    std::vector<TokenId> probe;
    Cache* cache = take_cache();
    try {
      encode_into(std::string_view(), allowed, cache, &probe);
    } catch (...) {
      give_cache(cache);
      throw;
    }
    give_cache(cache);
  }
  size_t threads = num_threads > 0 ? static_cast<size_t>(num_threads)
                                   : std::max(1u, std::thread::hardware_concurrency());
  threads = std::min({threads, texts.size(), kMaxThreads});
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    Cache* cache = take_cache();
    try {
      for (size_t i = next++; i < texts.size(); i = next++) {
        results[i].reserve(texts[i].size() / 4 + 16);
        encode_into(texts[i], allowed, cache, &results[i]);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = texts.size();
    }
    give_cache(cache);
  };
  std::vector<std::thread> pool;
  try {
    for (size_t t = 0; t + 1 < threads; ++t) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // The system would not give us more threads: the ones we have (and this one) do the work.
  }
  work();
  for (std::thread& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return results;
}

// ---- decoding -------------------------------------------------------------------------------

std::string BPE::decode(const int64_t* ids, size_t n) const {
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t t = ids[i];
    if (t < 0 || t >= int64_t(vocab_size_) || !present_[t])
      throw ValueError("tokens: position " + std::to_string(i) + " holds " + std::to_string(t) +
                       ", which is not a token id of this tokenizer (vocab_size " +
                       std::to_string(vocab_size_) + ")");
    total += offset_[t + 1] - offset_[t];
  }
  std::string out;
  out.reserve(total);
  for (size_t i = 0; i < n; ++i) out.append(arena_.data() + offset_[ids[i]], offset_[ids[i] + 1] - offset_[ids[i]]);
  return out;
}

}  // namespace gptcore::tokenizer
