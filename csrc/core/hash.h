// The counter-based generator shared by every random op (sampling draws, dropout masks,
// stochastic rounding): splitmix64's finaliser over 64-bit counters, so the same (seed, stream,
// element) gives the same bits on the CPU, on CUDA (whatever the launch shape) and in
// python/gptcore/reference.py. Host and device code include this header.
//
// All arithmetic is unsigned 64-bit, modulo 2^64; signed counters enter as their two's
// complement bits. G = 0x9E3779B97F4A7C15 (2^64 / golden ratio).
//   mix(x)           : x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27;
//                      x *= 0x94D049BB133111EB; x ^= x >> 31
//   key(seed, stream) = mix(mix(seed + G) + G * (stream + 1))      (once per call)
//   bits(key, i)      = mix(key + G * (i + 1))                       (once per element)
// Sampling's uniform for (seed, row b, counter c) is bits(key(seed, b), c) >> 11 times 2^-53.
// Dropout with probability p keeps element i iff (bits(key, i) >> 32) >= floor(p * 2^32) and
// multiplies it by float32(1 / (1 - p)).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GPTCORE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GPTCORE_HOST_DEVICE inline
#endif

namespace gptcore {
namespace hash {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

GPTCORE_HOST_DEVICE uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The per-call key of (seed, stream): two mixes, computed once per op call.
GPTCORE_HOST_DEVICE uint64_t key(uint64_t seed, uint64_t stream) {
  return mix64(mix64(seed + kGamma) + kGamma * (stream + 1));
}

// The 64 random bits of element (counter) i under a key: one mix.
GPTCORE_HOST_DEVICE uint64_t bits(uint64_t key, uint64_t i) { return mix64(key + kGamma * (i + 1)); }

// A dropout mask: keep(i) is true for the elements that survive; kept values are multiplied by
// `scale`. Built on the host once per call (dropout_mask below) and passed by value to kernels.
struct Dropout {
  uint64_t key;
  uint32_t thr;   // floor(p * 2^32): element i is dropped iff (bits >> 32) < thr
  float scale;    // float32(1 / (1 - p))
  GPTCORE_HOST_DEVICE bool keep(uint64_t i) const {
    return static_cast<uint32_t>(bits(key, i) >> 32) >= thr;
  }
  // scale for a kept element, 0 for a dropped one.
  GPTCORE_HOST_DEVICE float factor(uint64_t i) const { return keep(i) ? scale : 0.0f; }
};

// p in [0, 1) (checked by dispatch). p == 0 gives thr = 0 and scale = 1 (every element kept);
// kernels test `active` and skip the mask entirely then.
inline Dropout dropout(double p, uint64_t seed, uint64_t stream) {
  Dropout d;
  d.key = key(seed, stream);
  d.thr = static_cast<uint32_t>(std::floor(p * 4294967296.0));  // exact: a power-of-two product
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

}  // namespace hash
}  // namespace gptcore
