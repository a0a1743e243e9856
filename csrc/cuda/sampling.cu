// Next-token sampling on the GPU (semantics in core/ops.h): one block per row of logits.
//
// Why a kernel: a decode step can then keep its tokens, the per-row token counts and the draw
// counters on the device. The kernel synchronises nothing with the host and allocates nothing, so
// it can sit inside a captured CUDA graph with the model's forward pass.
//
// The row is never copied: every pass recomputes z = logit + bias - penalty from global memory
// (a 50K-column row is 100-200 KB and stays in L2 between passes). Passes over a row:
//   1. the max z, the lowest index holding it, the number of finite z (block reductions); greedy
//      rows stop here;
//   2. top-k: radix selection of the k-th largest z over order-preserving 32-bit keys, 8 bits per
//      pass (4 passes of shared-memory count histograms);
//   3. top-p: radix selection over the bit patterns of p (positive floats order like their bits),
//      8 bits per pass, with histograms of the probability mass in 32.32 fixed point: integer
//      atomics make the sums exact and the result deterministic, which float atomics (whose sum
//      depends on the order of arrival) would not;
//   4. the draw: every warp sums its own contiguous segment of kept p (tile by tile, in index
//      order), one warp scans the segment sums, and the warp whose segment holds u * sum walks it
//      with warp-wide prefix sums to the first token whose running sum exceeds u * sum.
// Arithmetic is float32 (p by an accurate polynomial exp, not __expf), so tokens equal the
// float64 reference's except for draws within ~1e-6 of a boundary. counts and counter are updated
// by the row's own block after its last read: no races.
#include <climits>
#include <cmath>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

constexpr int kBins = 256;  // radix digit of 8 bits

// ---- the uniform number of a draw ----------------------------------------------------------
// Three splitmix64 steps over (seed, row, counter) from core/hash.h; the formula is in core/ops.h,
// and the same bits come out of cpu/sampling.cpp and reference.py.
__device__ __forceinline__ double draw_uniform(uint64_t seed, uint64_t row, uint64_t counter) {
  return static_cast<double>(hash::bits(hash::key(seed, row), counter) >> 11) * 0x1.0p-53;
}

// ---- float helpers -----------------------------------------------------------------------------

__device__ __forceinline__ bool is_finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// Larger float -> larger key (for every non-NaN value); -0 and +0 get the same key (they tie).
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t u = __float_as_uint(v);
  if ((u << 1) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// exp(x) for x <= 0 within ~1 ulp, independent of --use_fast_math (whose __expf loses accuracy
// as |x| grows): x = n ln2 + f, |f| <= ln2/2, e^f by its Taylor series to f^7, times 2^n.
// Below -87.3 (where e^x leaves the normal floats), -inf and NaN give 0.
__device__ __forceinline__ float exp_nonpositive(float x) {
  if (!(x >= -87.3f)) return 0.f;
  const float n = rintf(x * 1.44269504088896341f);
  float f = __fmaf_rn(n, -0.693145751953125f, x);  // ln2 in two parts: n * hi is exact
  f = __fmaf_rn(n, -1.42860682030941723212e-6f, f);
  float p = 1.f / 5040.f;
  p = __fmaf_rn(p, f, 1.f / 720.f);
  p = __fmaf_rn(p, f, 1.f / 120.f);
  p = __fmaf_rn(p, f, 1.f / 24.f);
  p = __fmaf_rn(p, f, 1.f / 6.f);
  p = __fmaf_rn(p, f, 0.5f);
  p = __fmaf_rn(p, f, 1.f);
  p = __fmaf_rn(p, f, 1.f);
  return p * __int_as_float((static_cast<int>(n) + 127) << 23);
}

// p in (0, 1] as 32.32 fixed point (p < 2^-33 counts as 0 mass).
__device__ __forceinline__ unsigned long long fixed_mass(float p) {
  return __float2ull_rn(p * 4294967296.0f);
}

// ---- block-wide integer reductions (every thread gets the result) -----------------------------

__device__ __forceinline__ int block_sum_int(int x, int* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  x = lane < nwarps ? buf[lane] : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ int block_min_int(int x, int* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  __syncthreads();
  if (lane == 0) buf[warp] = x;
  __syncthreads();
  x = lane < nwarps ? buf[lane] : INT_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Called by one whole warp. Reads 256 bins from the top (bin 255 first; lane l holds bins
// 255-8l .. 248-8l) and returns the first bin at which the running total reaches `need` (>= 1),
// with *above = the total of the bins above it. Integer counts or fixed-point masses: exact.
template <typename U>
__device__ int pick_bin_from_top(const U* bins, U need, U* above) {
  const int lane = threadIdx.x & 31;
  U v[8];
  U s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[i] = bins[kBins - 1 - (lane * 8 + i)];
    s += v[i];
  }
  U incl = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const U n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  const unsigned hit = __ballot_sync(0xffffffffu, incl >= need);
  const int owner = hit ? __ffs(hit) - 1 : 31;  // not reached (never, by construction): lowest bins
  int bin = 0;
  U ab = 0;
  if (lane == owner) {
    U run = incl - s;
    bin = kBins - 1 - (lane * 8 + 7);
    ab = run;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (run + v[i] >= need) {
        bin = kBins - 1 - (lane * 8 + i);
        ab = run;
        break;
      }
      run += v[i];
    }
  }
  *above = __shfl_sync(0xffffffffu, ab, owner);
  return __shfl_sync(0xffffffffu, bin, owner);
}

// ---- one row -------------------------------------------------------------------------------------

struct Args {
  int32_t* tokens;
  int32_t* counts;    // (B, V) or null
  int64_t* counter;   // (B,) or null
  const float* bias;  // (V,) or null
  const int32_t* forced;  // (B,) or null
  int64_t Vp, V;
  float inv_temperature;  // unused when greedy
  bool greedy;
  int64_t top_k;  // 0 = off (or >= the number of finite z)
  bool use_top_p;
  double top_p;
  float frequency_penalty, presence_penalty;
  uint64_t seed;
};

// A row's adjusted logits and the sampling weights derived from them.
template <typename T>
struct Row {
  const T* x;
  const float* bias;
  const int32_t* cnt;
  float fp, pp;
  // filled in as the passes go
  float zmax = 0.f, inv_t = 0.f;
  uint32_t kth_key = 0u;   // keep z with order_key(z) >= kth_key (0 keeps every finite z)
  uint32_t tau_bits = 0u;  // keep p with bits >= tau_bits (0 keeps all)

  __device__ __forceinline__ float z(int64_t j) const {
    float v = to_f(x[j]);
    if (bias) v += __ldg(bias + j);
    if (cnt) {
      const int c = cnt[j];
      if (c != 0) v -= static_cast<float>(c) * fp + (c > 0 ? pp : 0.f);
    }
    return v;
  }
  __device__ __forceinline__ bool kept_z(float v) const {
    return is_finite(v) && order_key(v) >= kth_key;
  }
  __device__ __forceinline__ float prob(float v) const {
    return v == zmax ? 1.f : exp_nonpositive((v - zmax) * inv_t);
  }
  // The unnormalised weight token j is drawn with (0 when it cannot be drawn).
  __device__ __forceinline__ float weight(int64_t j) const {
    const float v = z(j);
    if (!kept_z(v)) return 0.f;
    const float p = prob(v);
    return __float_as_uint(p) >= tau_bits ? p : 0.f;
  }
};

struct Shared {
  uint32_t hist[kBins];
  unsigned long long mass[kBins];
  float seg_sum[32];
  int red[32];
  int bin, rank, owner, last_mode, token;
  unsigned long long need;
  float start, target;
};

// top-k: the key of the k-th largest finite z (1 <= k < number of finite z), 8 bits at a time.
template <typename T>
__device__ uint32_t kth_largest_key(const Row<T>& r, int64_t V, int64_t k, Shared& sh) {
  uint32_t prefix = 0u, mask = 0u;
  uint32_t rank = static_cast<uint32_t>(k);  // wanted rank among the keys under the prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.hist[i] = 0u;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const float v = r.z(j);
      if (!is_finite(v)) continue;
      const uint32_t key = order_key(v);
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      uint32_t above;
      const int bin = pick_bin_from_top<uint32_t>(sh.hist, rank, &above);
      if (threadIdx.x == 0) {
        sh.bin = bin;
        sh.rank = static_cast<int>(rank - above);
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh.bin) << shift;
    mask |= 0xffu << shift;
    rank = static_cast<uint32_t>(sh.rank);
  }
  return prefix;
}

// top-p: the bit pattern of p_m, the m-th largest kept p, m the smallest count whose mass reaches
// top_p of the kept mass (masses in fixed point).
template <typename T>
__device__ uint32_t nucleus_bits(const Row<T>& r, int64_t V, double top_p, Shared& sh) {
  uint32_t prefix = 0u, mask = 0u;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh.mass[i] = 0ull;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const float v = r.z(j);
      if (!r.kept_z(v)) continue;
      const float p = r.prob(v);
      const uint32_t bits = __float_as_uint(p);
      if ((bits & mask) != prefix) continue;
      const unsigned long long q = fixed_mass(p);
      if (q) atomicAdd(&sh.mass[(bits >> shift) & 0xffu], q);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      unsigned long long need;
      if (shift == 24) {  // the whole kept mass is in this first histogram
        unsigned long long total = 0ull;
        for (int i = threadIdx.x; i < kBins; i += 32) total += sh.mass[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
        need = static_cast<unsigned long long>(ceil(top_p * static_cast<double>(total)));
        need = max(1ull, min(need, total));
      } else {
        need = sh.need;
      }
      unsigned long long above;
      const int bin = pick_bin_from_top<unsigned long long>(sh.mass, need, &above);
      if (threadIdx.x == 0) {
        sh.bin = bin;
        sh.need = need - above;
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh.bin) << shift;
    mask |= 0xffu << shift;
  }
  return prefix;
}

// Sum of one 32-wide tile, the same bits in every lane (lane 0's butterfly result).
__device__ __forceinline__ float tile_total(float w) {
  return __shfl_sync(0xffffffffu, warp_sum(w), 0);
}

// The inverse-CDF draw in index order; returns the token.
template <typename T>
__device__ int64_t draw(const Row<T>& r, int64_t V, double u, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t seg = ((V + nwarps - 1) / nwarps + 31) / 32 * 32;  // whole tiles per warp
  const int64_t s0 = warp * seg, s1 = min(V, s0 + seg);

  // a) each warp's segment sum, tile by tile in index order
  float carry = 0.f;
  for (int64_t base = s0; base < s1; base += 32) {
    const int64_t j = base + lane;
    carry += tile_total(j < s1 ? r.weight(j) : 0.f);
  }
  if (lane == 0) sh.seg_sum[warp] = carry;
  __syncthreads();

  // b) one warp scans the segment sums: the owner is the first warp whose inclusive sum exceeds
  //    u * total (if rounding leaves none: the last warp with any weight, whose last token is taken)
  if (warp == 0) {
    const float s = lane < nwarps ? sh.seg_sum[lane] : 0.f;
    float incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    const float total = __shfl_sync(0xffffffffu, incl, 31);
    const float target = static_cast<float>(u * static_cast<double>(total));
    const unsigned hit = __ballot_sync(0xffffffffu, incl > target && s > 0.f);
    const unsigned any = __ballot_sync(0xffffffffu, s > 0.f);
    const int owner = hit ? __ffs(hit) - 1 : 31 - __clz(any);
    const float start = __shfl_sync(0xffffffffu, incl - s, owner);
    if (lane == 0) {
      sh.owner = owner;
      sh.last_mode = hit ? 0 : 1;
      sh.start = start;
      sh.target = target;
      sh.token = -1;
    }
  }
  __syncthreads();

  // c) the owner walks its segment: the first token whose running sum exceeds the target
  if (warp == sh.owner) {
    const bool last_mode = sh.last_mode != 0;
    const float target = sh.target;
    float run = sh.start;
    int64_t found = -1, last_pos = -1;
    for (int64_t base = s0; base < s1; base += 32) {
      const int64_t j = base + lane;
      const float w = j < s1 ? r.weight(j) : 0.f;
      float incl = w;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      const unsigned pos = __ballot_sync(0xffffffffu, w > 0.f);
      if (pos) last_pos = base + 31 - __clz(pos);
      const unsigned hit = __ballot_sync(0xffffffffu, !last_mode && w > 0.f && run + incl > target);
      if (hit) {
        found = base + __ffs(hit) - 1;
        break;
      }
      run += tile_total(w);
    }
    if (lane == 0) sh.token = static_cast<int>(found >= 0 ? found : last_pos);
  }
  __syncthreads();
  return sh.token;
}

template <typename T>
__global__ void __launch_bounds__(1024) sample_tokens_kernel(const T* __restrict__ logits,
                                                             const Args a) {
  __shared__ Shared sh;
  const int64_t row = blockIdx.x;
  if (a.forced) {  // a forced row: its token, nothing else
    const int32_t f = a.forced[row];
    if (f >= 0) {
      if (threadIdx.x == 0) a.tokens[row] = f;
      return;
    }
  }
  const int64_t V = a.V;
  const uint64_t counter = a.counter ? static_cast<uint64_t>(a.counter[row]) : 0ull;
  Row<T> r{logits + row * a.Vp, a.bias, a.counts ? a.counts + row * V : nullptr,
           a.frequency_penalty, a.presence_penalty};

  // 1. max z, the lowest index holding it, the number of finite z
  float m = -INFINITY;
  int arg = INT_MAX, nfin = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = r.z(j);
    if (!is_finite(v)) continue;
    ++nfin;
    if (v > m) {  // strictly: a thread's indices rise, so it keeps its first maximum
      m = v;
      arg = static_cast<int>(j);
    }
  }
  const float zmax = block_max(m, sh.seg_sum);
  const int first = block_min_int(m == zmax ? arg : INT_MAX, sh.red);
  nfin = block_sum_int(nfin, sh.red);

  int64_t token = -1;  // no finite z: nothing can be drawn
  if (nfin > 0) {
    if (a.greedy) {
      token = first;
    } else {
      r.zmax = zmax;
      r.inv_t = a.inv_temperature;
      if (a.top_k > 0 && a.top_k < nfin) r.kth_key = kth_largest_key(r, V, a.top_k, sh);
      if (a.use_top_p) r.tau_bits = nucleus_bits(r, V, a.top_p, sh);
      token = draw(r, V, draw_uniform(a.seed, static_cast<uint64_t>(row), counter), sh);
    }
  }
  __syncthreads();  // every read of counts is done
  if (threadIdx.x == 0) {
    a.tokens[row] = static_cast<int32_t>(token);
    if (a.counts && token >= 0) a.counts[row * V + token] += 1;
    if (a.counter) a.counter[row] += 1;
  }
}

template <typename T>
void launch(const Tensor& logits, const Args& a) {
  const int64_t B = logits.size(0);
  const int threads = a.V >= 8192 ? 1024 : a.V >= 1024 ? 256 : 64;
  sample_tokens_kernel<T><<<static_cast<unsigned>(B), threads, 0, stream()>>>(logits.data<T>(), a);
  GPTCORE_CHECK_LAUNCH("sample_tokens_kernel");
}

}  // namespace

void sample_tokens(const Tensor& logits, Tensor& counts, Tensor& counter, const Tensor& logit_bias,
                   const Tensor& forced, int64_t vocab_size, double temperature, int64_t top_k,
                   double top_p, double frequency_penalty, double presence_penalty, uint64_t seed,
                   Tensor& tokens) {
  DeviceGuard guard(logits.device().index);
  Args a{};
  a.tokens = tokens.data<int32_t>();
  a.counts = counts.defined() ? counts.data<int32_t>() : nullptr;
  a.counter = counter.defined() ? counter.data<int64_t>() : nullptr;
  a.bias = logit_bias.defined() ? logit_bias.data<float>() : nullptr;
  a.forced = forced.defined() ? forced.data<int32_t>() : nullptr;
  a.Vp = logits.size(1);
  a.V = vocab_size;
  a.greedy = temperature == 0.0;
  // 1/T overflows float for T below ~3e-39: inf still gives p = 0 below the max and 1 at it.
  a.inv_temperature = a.greedy ? 0.f : static_cast<float>(1.0 / temperature);
  a.top_k = top_k > 0 && top_k < vocab_size ? top_k : 0;
  a.use_top_p = top_p < 1.0;
  a.top_p = top_p;
  a.frequency_penalty = static_cast<float>(frequency_penalty);
  a.presence_penalty = static_cast<float>(presence_penalty);
  a.seed = seed;
  GPTCORE_FLOAT_TYPES(logits.dtype(), "logits", launch<scalar_t>(logits, a));
}

}  // namespace cuda
}  // namespace gptcore
