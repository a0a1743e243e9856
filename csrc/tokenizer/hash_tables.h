// Two small open-addressing hash tables for the tokenizer's hot loops (std::unordered_map
// allocates a node per entry and hashes std::string keys slowly).
//
//   BytesMap: byte-string key -> uint64 value; keys live in one arena. Used for the vocabulary
//             (token bytes -> id) and for the per-thread piece caches.
//   PairMap:  (left id, right id) -> (merge rank, merged id).
//
// Both use linear probing over a power-of-two slot array kept at most half full, and never
// erase single keys (a cache is cleared as a whole).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace gptcore::tokenizer {

inline uint64_t mix64(uint64_t h) {
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ull;
  h ^= h >> 32;
  return h;
}

// Hash of a byte string: 8 bytes at a time, multiply-xorshift mixing.
inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xff51afd7ed558ccdull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0x94d049bb133111ebull;
  }
  return mix64(h);
}

class BytesMap {
 public:
  explicit BytesMap(size_t expected = 16) { rehash(capacity_for(expected)); }

  size_t size() const { return size_; }
  size_t arena_bytes() const { return arena_.size(); }

  // Pointer to the value for `key`, or nullptr.
  const uint64_t* find(std::string_view key) const {
    const uint64_t h = hash_bytes(key.data(), key.size());
    const uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.len == kEmpty) return nullptr;
      if (s.tag == tag && s.len == key.size() &&
          std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0)
        return &s.value;
    }
  }

  // Inserts or overwrites.
  void put(std::string_view key, uint64_t value) {
    if (2 * (size_ + 1) > slots_.size()) rehash(slots_.size() * 2);
    const uint64_t h = hash_bytes(key.data(), key.size());
    const uint32_t tag = static_cast<uint32_t>(h >> 32);
    size_t i = h & mask_;
    for (;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.len == kEmpty) break;
      if (s.tag == tag && s.len == key.size() &&
          std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0) {
        s.value = value;
        return;
      }
    }
    Slot& s = slots_[i];
    s.off = arena_.size();
    s.len = static_cast<uint32_t>(key.size());
    s.tag = tag;
    s.value = value;
    arena_.append(key.data(), key.size());
    ++size_;
  }

  void clear() {
    for (Slot& s : slots_) s.len = kEmpty;
    arena_.clear();
    size_ = 0;
  }

  // Calls f(key, value) for every entry.
  template <class F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.len != kEmpty) f(std::string_view(arena_.data() + s.off, s.len), s.value);
  }

 private:
  static constexpr uint32_t kEmpty = 0xffffffffu;
  struct Slot {
    uint64_t off = 0;
    uint64_t value = 0;
    uint32_t len = kEmpty;
    uint32_t tag = 0;
  };

  static size_t capacity_for(size_t n) {
    size_t c = 16;
    while (c < 2 * n) c *= 2;
    return c;
  }

  void rehash(size_t cap) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (s.len == kEmpty) continue;
      const uint64_t h = hash_bytes(arena_.data() + s.off, s.len);
      size_t i = h & mask_;
      while (slots_[i].len != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::string arena_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

class PairMap {
 public:
  struct Merge {
    uint32_t rank;
    uint32_t id;
  };

  void reserve(size_t n) {
    size_t c = 16;
    while (c < 2 * n) c *= 2;
    slots_.assign(c, Slot{});
    mask_ = c - 1;
    size_ = 0;
  }

  // Returns false when the pair is already present.
  bool put(uint32_t left, uint32_t right, Merge m) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    const uint64_t key = pack(left, right);
    size_t i = mix64(key) & mask_;
    for (; slots_[i].key != kEmpty; i = (i + 1) & mask_)
      if (slots_[i].key == key) return false;
    slots_[i] = Slot{key, m};
    ++size_;
    return true;
  }

  const Merge* find(uint32_t left, uint32_t right) const {
    const uint64_t key = pack(left, right);
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.merge;
      if (s.key == kEmpty) return nullptr;
    }
  }

  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kEmpty = ~0ull;  // (0xffffffff, 0xffffffff) is never a valid pair
  struct Slot {
    uint64_t key = kEmpty;
    Merge merge{0, 0};
  };
  static uint64_t pack(uint32_t l, uint32_t r) { return (uint64_t(l) << 32) | r; }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    const size_t cap = old.empty() ? 16 : old.size() * 2;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    for (const Slot& s : old) {
      if (s.key == kEmpty) continue;
      size_t i = mix64(s.key) & mask_;
      while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_ = std::vector<Slot>(16);
  size_t mask_ = 15;
  size_t size_ = 0;
};

}  // namespace gptcore::tokenizer
