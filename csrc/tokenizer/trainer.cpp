// Byte-level BPE training (see trainer.h).
#include "tokenizer/trainer.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <fstream>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "core/tensor.h"  // ValueError
#include "tokenizer/hash_tables.h"
#include "tokenizer/pretokenize.h"

namespace gptcore::tokenizer {

namespace {

// ---- cutting text into independently countable chunks ---------------------------------------

// A cut between byte k-1 and byte k leaves the pieces unchanged when byte k-1 is an ASCII
// non-space and byte k an ASCII space: no piece of the pattern holds a non-space followed by a
// space, and no match looks behind its start. It must also not split a special token.
bool safe_cut(std::string_view buf, size_t k, const std::vector<std::string>& specials) {
  const auto before = static_cast<unsigned char>(buf[k - 1]);
  const auto at = static_cast<unsigned char>(buf[k]);
  if (before >= 0x80 || at >= 0x80) return false;
  if (detail::kAsciiClass[before] == CharClass::Space || detail::kAsciiClass[at] != CharClass::Space)
    return false;
  for (const std::string& s : specials)
    for (size_t j = k >= s.size() - 1 ? k - (s.size() - 1) : 0; j < k; ++j)
      if (buf.compare(j, s.size(), s) == 0) return false;
  return true;
}

size_t longest(const std::vector<std::string>& specials) {
  size_t n = 1;
  for (const std::string& s : specials) n = std::max(n, s.size());
  return n;
}

// First safe cut at or after x in an in-memory text (its size when there is none).
size_t cut_in_text(std::string_view text, size_t x, const std::vector<std::string>& specials) {
  if (x == 0 || x >= text.size()) return std::min(x, text.size());
  for (size_t k = x; k < text.size(); ++k)
    if (safe_cut(text, k, specials)) return k;
  return text.size();
}

std::string read_range(std::ifstream& f, const std::string& path, uint64_t begin, uint64_t n) {
  std::string buf(n, '\0');
  f.clear();
  f.seekg(static_cast<std::streamoff>(begin));
  f.read(buf.data(), static_cast<std::streamsize>(n));
  if (static_cast<uint64_t>(f.gcount()) != n) throw std::runtime_error("train: cannot read " + path);
  return buf;
}

// First safe cut at or after x in a file of `size` bytes.
uint64_t cut_in_file(std::ifstream& f, const std::string& path, uint64_t size, uint64_t x,
                     const std::vector<std::string>& specials) {
  if (x == 0 || x >= size) return std::min(x, size);
  const uint64_t margin = longest(specials);
  const uint64_t start = x >= margin ? x - margin : 0;
  uint64_t window = uint64_t{1} << 16;
  while (true) {
    const uint64_t end = std::min(size, x + window + margin);
    const std::string buf = read_range(f, path, start, end - start);
    const uint64_t last = end == size ? size : end - margin;  // candidates need context after
    for (uint64_t k = x; k < last; ++k)
      if (safe_cut(buf, static_cast<size_t>(k - start), specials)) return k;
    if (end == size) return size;
    window *= 4;
  }
}

// ---- counting pieces ------------------------------------------------------------------------

// Adds the pieces of `text` (cut at special tokens) to `counts`.
void count_text(std::string_view text, const std::vector<std::string>& specials, BytesMap* counts) {
  auto count_plain = [&](std::string_view part) {
    pretokenize(part, [&](size_t off, size_t len) {
      const std::string_view piece = part.substr(off, len);
      const uint64_t* v = counts->find(piece);
      counts->put(piece, (v ? *v : 0) + 1);
    });
  };
  size_t pos = 0;
  while (pos < text.size()) {
    size_t best = std::string_view::npos, len = 0;
    for (const std::string& s : specials) {
      const size_t at = text.find(s, pos);
      if (at < best || (at == best && at != std::string_view::npos && s.size() > len)) {
        best = at;
        len = s.size();
      }
    }
    if (best == std::string_view::npos) {
      count_plain(text.substr(pos));
      return;
    }
    count_plain(text.substr(pos, best - pos));
    pos = best + len;
  }
}

struct Unit {
  size_t source;         // index into texts, or into files when is_file
  bool is_file;
  uint64_t begin, end;   // nominal byte range, moved to safe cuts before counting
};

BytesMap count_all(const std::vector<std::string_view>& texts, const std::vector<std::string>& files,
                   const TrainConfig& config) {
  const std::vector<std::string>& specials = config.special_tokens;
  const uint64_t chunk = std::max<uint64_t>(config.chunk_bytes, 1);
  std::vector<Unit> units;
  std::vector<uint64_t> file_size(files.size());
  for (size_t i = 0; i < texts.size(); ++i)
    for (uint64_t b = 0; b < texts[i].size(); b += chunk)
      units.push_back({i, false, b, std::min<uint64_t>(texts[i].size(), b + chunk)});
  for (size_t i = 0; i < files.size(); ++i) {
    std::ifstream f(files[i], std::ios::binary | std::ios::ate);
    if (!f) throw std::runtime_error("train: cannot open " + files[i]);
    file_size[i] = static_cast<uint64_t>(f.tellg());
    for (uint64_t b = 0; b < file_size[i]; b += chunk)
      units.push_back({i, true, b, std::min<uint64_t>(file_size[i], b + chunk)});
  }
  size_t threads = config.num_threads > 0 ? size_t(config.num_threads) : std::max(1u, std::thread::hardware_concurrency());
  threads = std::max<size_t>(1, std::min<size_t>({threads, units.size(), 256}));

  std::vector<BytesMap> partial(threads, BytesMap(1 << 12));
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&](size_t t) {
    try {
      for (size_t u = next++; u < units.size(); u = next++) {
        const Unit& unit = units[u];
        if (!unit.is_file) {
          const std::string_view text = texts[unit.source];
          const size_t b = cut_in_text(text, unit.begin, specials);
          const size_t e = cut_in_text(text, unit.end, specials);
          if (e > b) count_text(text.substr(b, e - b), specials, &partial[t]);
        } else {
          const std::string& path = files[unit.source];
          std::ifstream f(path, std::ios::binary);
          if (!f) throw std::runtime_error("train: cannot open " + path);
          const uint64_t size = file_size[unit.source];
          const uint64_t b = cut_in_file(f, path, size, unit.begin, specials);
          const uint64_t e = cut_in_file(f, path, size, unit.end, specials);
          if (e > b) count_text(read_range(f, path, b, e - b), specials, &partial[t]);
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = units.size();
    }
  };
  std::vector<std::thread> pool;
  try {
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  } catch (const std::system_error&) {
    // fewer threads than asked for: the ones started (and this one) share the units
  }
  work(0);
  for (std::thread& th : pool) th.join();
  if (error) std::rethrow_exception(error);

  BytesMap total = std::move(partial[0]);
  for (size_t t = 1; t < threads; ++t) {
    partial[t].for_each([&](std::string_view piece, uint64_t n) {
      const uint64_t* v = total.find(piece);
      total.put(piece, (v ? *v : 0) + n);
    });
    partial[t] = BytesMap();
  }
  return total;
}

// ---- learning the merges --------------------------------------------------------------------

uint64_t pair_key(TokenId a, TokenId b) { return (uint64_t(a) << 32) | b; }

class Learner {
 public:
  explicit Learner(const BytesMap& counts) {
    for (int b = 0; b < 256; ++b) {
      tokens_.emplace_back(1, static_cast<char>(b));
      token_set_.put(tokens_.back(), 1);
    }
    counts.for_each([&](std::string_view piece, uint64_t n) {
      if (piece.size() < 2) return;  // nothing to merge
      std::vector<TokenId> syms(piece.size());
      for (size_t i = 0; i < piece.size(); ++i) syms[i] = static_cast<unsigned char>(piece[i]);
      words_.push_back(std::move(syms));
      weight_.push_back(static_cast<int64_t>(n));
    });
    stamp_.assign(words_.size(), kNever);
    for (uint32_t w = 0; w < words_.size(); ++w) {
      const auto& s = words_[w];
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = pair_key(s[i], s[i + 1]);
        pair_count_[k] += weight_[w];
        auto& list = where_[k];
        if (list.empty() || list.back() != w) list.push_back(w);
      }
    }
    for (const auto& [k, c] : pair_count_) heap_.push({c, TokenId(k >> 32), TokenId(k)});
  }

  // Learns merges until `ordinary_tokens` tokens exist or no pair is frequent enough.
  void run(size_t ordinary_tokens, uint64_t min_frequency) {
    while (tokens_.size() < ordinary_tokens && !heap_.empty()) {
      const Cand c = heap_.top();
      heap_.pop();
      const uint64_t k = pair_key(c.left, c.right);
      auto it = pair_count_.find(k);
      const int64_t now = it == pair_count_.end() ? 0 : it->second;
      if (now != c.count) {  // stale: counts of old pairs only fall, so re-queue the current one
        if (now > 0) heap_.push({now, c.left, c.right});
        continue;
      }
      if (now < static_cast<int64_t>(std::max<uint64_t>(min_frequency, 1))) break;
      std::string joined = tokens_[c.left] + tokens_[c.right];
      if (token_set_.find(joined)) continue;  // already a token by another split: never merged
      merge(c.left, c.right, std::move(joined));
    }
  }

  std::vector<std::string> tokens_;  // id -> bytes
  std::vector<std::pair<TokenId, TokenId>> merges_;

 private:
  struct Cand {
    int64_t count;
    TokenId left, right;
  };
  // Priority: higher count first; equal counts by (left bytes, right bytes) ascending.
  struct Lower {
    const std::vector<std::string>* tokens;
    bool operator()(const Cand& x, const Cand& y) const {
      if (x.count != y.count) return x.count < y.count;
      const int c = (*tokens)[x.left].compare((*tokens)[y.left]);
      if (c != 0) return c > 0;
      return (*tokens)[x.right] > (*tokens)[y.right];
    }
  };
  static constexpr uint32_t kNever = ~0u;

  void merge(TokenId a, TokenId b, std::string joined) {
    const auto made = static_cast<TokenId>(tokens_.size());
    const uint32_t step = static_cast<uint32_t>(merges_.size());
    tokens_.push_back(std::move(joined));
    token_set_.put(tokens_.back(), made);
    merges_.emplace_back(a, b);

    std::vector<uint32_t> list = std::move(where_[pair_key(a, b)]);
    where_.erase(pair_key(a, b));
    std::vector<uint64_t> fresh;  // pairs with the new token, queued after the pass
    std::vector<TokenId> out;
    for (uint32_t w : list) {
      if (stamp_[w] == step) continue;
      stamp_[w] = step;
      std::vector<TokenId>& s = words_[w];
      const int64_t n = weight_[w];
      out.clear();
      bool hit = false;
      for (size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          out.push_back(made);
          i += 2;
          hit = true;
        } else {
          out.push_back(s[i++]);
        }
      }
      if (!hit) continue;  // a stale entry: the word no longer holds the pair
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        auto it = pair_count_.find(pair_key(s[i], s[i + 1]));
        if (it != pair_count_.end() && (it->second -= n) == 0) pair_count_.erase(it);
      }
      for (size_t i = 0; i + 1 < out.size(); ++i) {
        const uint64_t k = pair_key(out[i], out[i + 1]);
        pair_count_[k] += n;
        if (out[i] == made || out[i + 1] == made) {
          auto& wl = where_[k];
          if (wl.empty() || wl.back() != w) wl.push_back(w);
          fresh.push_back(k);
        }
      }
      s.swap(out);
    }
    std::sort(fresh.begin(), fresh.end());
    fresh.erase(std::unique(fresh.begin(), fresh.end()), fresh.end());
    for (uint64_t k : fresh) {
      auto it = pair_count_.find(k);
      if (it != pair_count_.end() && it->second > 0)
        heap_.push({it->second, TokenId(k >> 32), TokenId(k)});
    }
  }

  std::vector<std::vector<TokenId>> words_;
  std::vector<int64_t> weight_;
  std::vector<uint32_t> stamp_;
  std::unordered_map<uint64_t, int64_t> pair_count_;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where_;
  BytesMap token_set_{1 << 12};
  std::priority_queue<Cand, std::vector<Cand>, Lower> heap_{Lower{&tokens_}};
};

}  // namespace

std::unique_ptr<BPE> train_bpe(const std::vector<std::string_view>& texts,
                               const std::vector<std::string>& files, const TrainConfig& config) {
  const size_t n_special = config.special_tokens.size();
  if (config.vocab_size < 256 + n_special)
    throw ValueError("vocab_size: " + std::to_string(config.vocab_size) +
                     " is too small; it must cover the 256 byte tokens and the " +
                     std::to_string(n_special) + " special token(s)");
  for (const std::string& s : config.special_tokens)
    if (s.empty()) throw ValueError("special_tokens: a special token is the empty string");

  Learner learner(count_all(texts, files, config));
  learner.run(config.vocab_size - n_special, config.min_frequency);

  std::vector<std::pair<std::string, int64_t>> vocab;
  vocab.reserve(learner.tokens_.size());
  for (size_t i = 0; i < learner.tokens_.size(); ++i) vocab.emplace_back(learner.tokens_[i], int64_t(i));
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(learner.merges_.size());
  for (const auto& [l, r] : learner.merges_) merges.emplace_back(learner.tokens_[l], learner.tokens_[r]);
  std::vector<std::pair<std::string, int64_t>> specials;
  for (size_t i = 0; i < n_special; ++i)
    specials.emplace_back(config.special_tokens[i], int64_t(learner.tokens_.size() + i));
  return std::make_unique<BPE>(vocab, merges, specials);
}

std::vector<std::pair<std::string, uint64_t>> count_pieces(const std::vector<std::string_view>& texts,
                                                           const std::vector<std::string>& files,
                                                           const TrainConfig& config) {
  std::vector<std::pair<std::string, uint64_t>> out;
  count_all(texts, files, config).for_each(
      [&](std::string_view piece, uint64_t n) { out.emplace_back(std::string(piece), n); });
  return out;
}

}  // namespace gptcore::tokenizer
