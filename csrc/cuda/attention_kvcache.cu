// Decoding attention over a KV cache on the GPU, flash-decoding style.
//
// A decode step has one query per (batch, head): far too little work for one block per query
// to fill the GPU, and the cost is reading the cached keys and values once. So each query's
// keys are split into `splits` contiguous ranges, one block per (query, range). A block's
// warps are cut into groups of G lanes; a group owns one key at a time (each lane a 16-byte
// pack of it, or single elements on the generic path), computes q.k with a G-lane shuffle
// reduction, and keeps its own online softmax (running max m, running sum l, and the output
// accumulator rescaled when m grows). The groups of a block are merged through shared memory.
// With one range the block writes the output; otherwise it writes its partial (m, l, acc) and
// a second small kernel merges the ranges (log-sum-exp weighting). Prefill (Tn > 1) runs the
// same kernel with one query per block row; each query sees its own causal (and banded) range.
//
// The append of the new keys and values is fused in: keys at positions >= pos are read straight
// from qkv (never from the cache being written), and the split-0 block of each new token writes
// that token's k and v into the caches. No block reads a cache slot that this launch writes.
//
// The position may live in device memory (pos_dev), so that a decode step captured once in a
// CUDA graph serves every position: the launch shape is then fixed by the largest possible key
// count (Tmax, or the window), and each block derives its key range from the position it reads;
// ranges past the last key stay empty and merge as zero. pos_dev holds one position for every
// row, or one per row (continuous batching: row b reads pos_dev[b], so rows at different
// positions share one launch). The host cannot check a device position: a value with pos < 0 or
// pos + Tn > Tmax makes the blocks of its row(s) skip their work (no cache slot of the row is
// read or written) and the row's output NaN.
//
// Scores are computed in the log2 domain (q pre-scaled by log2(e)/sqrt(D), exp2 afterwards);
// every accumulation is fp32, caches and output in the input dtype (fp32 or bf16).
#include <algorithm>
#include <string>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMinKeysPerSplit = 64;
constexpr float kLog2e = 1.4426950408889634f;

struct KvArgs {
  const void* qkv;
  void* k_cache;
  void* v_cache;
  void* out;
  float* part_ml;   // (rows, splits, 2): m (log2 units), l
  float* part_acc;  // (rows, splits, D)
  const int32_t* pos_dev;  // the position in device memory (nullptr: pos)
  int pos_stride;          // 0: pos_dev[0] for every row; 1: row b reads pos_dev[b]
  int64_t pos, Tmax;
  int Tn, H, D, C, window, splits, chunk;  // chunk: keys per split
};

// Sum over aligned groups of G lanes (every lane of the warp must call it).
template <int G>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One block per (query row, key range). V: elements per lane load (a 16-byte pack, or 1);
// G: lanes per key; MAXC: most chunks of V elements one lane owns (D <= G * V * MAXC).
template <typename T, int V, int G, int MAXC>
__global__ void __launch_bounds__(kThreads) kvcache_attention_kernel(KvArgs a) {
  extern __shared__ float smem[];
  constexpr int NG = kThreads / G;  // key groups per block
  const int D = a.D, C = a.C, H = a.H, Tn = a.Tn;
  float* q_s = smem;               // (D) scaled query
  float* m_s = q_s + D;            // (NG)
  float* l_s = m_s + NG;           // (NG)
  float* acc_s = l_s + NG;         // (NG, D)

  const int64_t row = blockIdx.x;  // (b, h, i) flattened, i fastest
  const int i = static_cast<int>(row % Tn);
  const int64_t bh = row / Tn;
  const int h = static_cast<int>(bh % H);
  const int64_t b = bh / H;
  const int split = blockIdx.y;
  int64_t pos = a.pos, chunk = a.chunk;
  if (a.pos_dev) {  // block-uniform: every thread reads the same value
    pos = a.pos_dev[a.pos_stride * b];
    if (pos < 0 || pos + Tn > a.Tmax) {  // out of range: touch no cache slot
      if (a.splits == 1)
        for (int d = threadIdx.x; d < D; d += kThreads)
          static_cast<T*>(a.out)[(b * Tn + i) * int64_t(C) + h * D + d] = from_f<T>(NAN);
      return;  // with several splits the combine kernel writes the NaN rows
    }
    // the host sized the launch for the most keys possible; share this step's keys out
    const int64_t n_keys = a.window > 0 ? min(int64_t(a.window), pos + Tn) : pos + Tn;
    chunk = max(int64_t(kMinKeysPerSplit), (n_keys + a.splits - 1) / a.splits);
  }
  const int64_t t = pos + i;
  const int64_t lo = a.window > 0 ? max(int64_t(0), t - a.window + 1) : int64_t(0);
  const int64_t k_begin = lo + int64_t(split) * chunk;
  const int64_t k_end = min(t + 1, k_begin + chunk);

  const T* qkv = static_cast<const T*>(a.qkv);
  const int64_t C3 = 3 * int64_t(C);
  const T* new_rows = qkv + b * Tn * C3 + h * D;  // row r (token pos + r): new_rows + r * C3
  T* K = static_cast<T*>(a.k_cache) + bh * a.Tmax * D;
  T* Vc = static_cast<T*>(a.v_cache) + bh * a.Tmax * D;

  const float qscale = kLog2e * rsqrtf(static_cast<float>(D));
  for (int d = threadIdx.x; d < D; d += kThreads) q_s[d] = to_f(new_rows[i * C3 + d]) * qscale;
  if (split == 0) {  // fused append: this token's k and v go into the caches
    for (int d = threadIdx.x; d < D; d += kThreads) {
      K[t * D + d] = new_rows[i * C3 + C + d];
      Vc[t * D + d] = new_rows[i * C3 + 2 * C + d];
    }
  }
  __syncthreads();

  const int g = threadIdx.x / G, lane = threadIdx.x % G;
  float m = -INFINITY, l = 0.f;
  float acc[MAXC][V];
#pragma unroll
  for (int c = 0; c < MAXC; ++c)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[c][e] = 0.f;

  // Rounds of NG keys: every lane runs every round (the shuffles need the whole warp).
  for (int64_t j0 = k_begin; j0 < k_end; j0 += NG) {
    const int64_t j = j0 + g;
    const bool valid = j < k_end;
    // keys and values of new tokens come from qkv (the caches are being written this launch)
    const T* krow = !valid ? nullptr : j >= pos ? new_rows + (j - pos) * C3 + C : K + j * D;
    const T* vrow = !valid ? nullptr : j >= pos ? new_rows + (j - pos) * C3 + 2 * C : Vc + j * D;
    float kv[MAXC][V];
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int d0 = (lane + c * G) * V;
      if (valid && d0 < D) {
        if constexpr (V > 1) {
          const Pack<T> p = Pack<T>::load(krow + d0);
#pragma unroll
          for (int e = 0; e < V; ++e) kv[c][e] = p.f(e);
        } else {
          kv[c][0] = to_f(krow[d0]);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) s += q_s[d0 + e] * kv[c][e];
      }
    }
    s = group_sum<G>(s);
    if (valid) {
      const float m_new = fmaxf(m, s);
      const float corr = exp2f(m - m_new);  // 0 for the group's first key
      const float p = exp2f(s - m_new);
      l = l * corr + p;
      m = m_new;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int d0 = (lane + c * G) * V;
        if (d0 < D) {
          if constexpr (V > 1) {
            const Pack<T> pv = Pack<T>::load(vrow + d0);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[c][e] = acc[c][e] * corr + p * pv.f(e);
          } else {
            acc[c][0] = acc[c][0] * corr + p * to_f(vrow[d0]);
          }
        }
      }
    }
  }

  // merge the groups of this block
  if (lane == 0) {
    m_s[g] = m;
    l_s[g] = l;
  }
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int d0 = (lane + c * G) * V;
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (d0 + e < D) acc_s[g * D + d0 + e] = acc[c][e];
  }
  __syncthreads();
  float M = -INFINITY;
  for (int k = 0; k < NG; ++k) M = fmaxf(M, m_s[k]);
  float L = 0.f;
  for (int k = 0; k < NG; ++k) L += m_s[k] == -INFINITY ? 0.f : l_s[k] * exp2f(m_s[k] - M);
  if (a.splits == 1) {  // k_begin..k_end holds every key of this query: L > 0
    T* o = static_cast<T*>(a.out) + (b * Tn + i) * int64_t(C) + h * D;
    const float inv = 1.0f / L;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float x = 0.f;
      for (int k = 0; k < NG; ++k)
        if (m_s[k] != -INFINITY) x += acc_s[k * D + d] * exp2f(m_s[k] - M);
      o[d] = from_f<T>(x * inv);
    }
  } else {  // partial result of this range; an empty range leaves m = -inf, l = 0, acc = 0
    const int64_t slot = row * a.splits + split;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float x = 0.f;
      if (M != -INFINITY)
        for (int k = 0; k < NG; ++k)
          if (m_s[k] != -INFINITY) x += acc_s[k * D + d] * exp2f(m_s[k] - M);
      a.part_acc[slot * D + d] = x;
    }
    if (threadIdx.x == 0) {
      a.part_ml[slot * 2] = M;
      a.part_ml[slot * 2 + 1] = L;
    }
  }
}

// Merges the key ranges of one query row: out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
// Range 0 always holds the query's own key, so M is finite.
template <typename T>
__global__ void kvcache_combine_kernel(KvArgs a) {
  const int64_t row = blockIdx.x;
  const int i = static_cast<int>(row % a.Tn);
  const int64_t bh = row / a.Tn;
  const int h = static_cast<int>(bh % a.H);
  const int64_t b = bh / a.H;
  T* o = static_cast<T*>(a.out) + (b * a.Tn + i) * int64_t(a.C) + h * a.D;
  const int64_t p = a.pos_dev ? int64_t(a.pos_dev[a.pos_stride * b]) : 0;
  if (a.pos_dev && (p < 0 || p + a.Tn > a.Tmax)) {
    for (int d = threadIdx.x; d < a.D; d += blockDim.x) o[d] = from_f<T>(NAN);
    return;  // the attention kernel skipped this position: no partials were written
  }
  const float* ml = a.part_ml + row * a.splits * 2;
  float M = -INFINITY;
  for (int s = 0; s < a.splits; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < a.splits; ++s)
    if (ml[2 * s] != -INFINITY) L += ml[2 * s + 1] * exp2f(ml[2 * s] - M);
  const float inv = 1.0f / L;
  const float* acc = a.part_acc + row * a.splits * a.D;
  for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
    float x = 0.f;
    for (int s = 0; s < a.splits; ++s)
      if (ml[2 * s] != -INFINITY) x += acc[int64_t(s) * a.D + d] * exp2f(ml[2 * s] - M);
    o[d] = from_f<T>(x * inv);
  }
}

template <typename T, int V, int G, int MAXC>
void launch(const KvArgs& a, int64_t rows) {
  constexpr int NG = kThreads / G;
  const size_t smem = sizeof(float) * (size_t(a.D) + 2 * NG + size_t(NG) * a.D);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(a.splits));
  kvcache_attention_kernel<T, V, G, MAXC><<<grid, kThreads, smem, stream()>>>(a);
  GPTCORE_CHECK_LAUNCH("kvcache_attention_kernel");
}

template <typename T>
void kvcache_impl(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, int64_t pos,
                  const int32_t* pos_dev, int pos_stride, int n_head, int window) {
  const int64_t B = qkv.size(0), Tn = qkv.size(1), C = qkv.size(2) / 3, D = C / n_head;
  if (D > 256)
    throw ValueError("n_head: head dimension " + std::to_string(D) +
                     " is above the 256 that the CUDA KV-cache attention supports");
  const int64_t rows = B * n_head * Tn;
  if (rows > 0x7fffffff)
    throw ValueError("qkv: batch * n_head * new tokens = " + std::to_string(rows) +
                     " is too many query rows for one launch");
  KvArgs a{};
  a.qkv = qkv.raw();
  a.k_cache = k_cache.raw();
  a.v_cache = v_cache.raw();
  a.out = out.raw();
  a.pos_dev = pos_dev;
  a.pos_stride = pos_stride;
  a.pos = pos;
  a.Tmax = k_cache.size(2);
  a.Tn = static_cast<int>(Tn);
  a.H = n_head;
  a.D = static_cast<int>(D);
  a.C = static_cast<int>(C);
  a.window = window;

  // Split the longest query's keys so that the launch has ~2 blocks per SM, but no range is
  // shorter than kMinKeysPerSplit keys. A device position is unknown here: size the launch for
  // the most keys there can be (the kernel then recomputes the ranges).
  const int64_t last = pos_dev ? a.Tmax : pos + Tn;
  const int64_t n_keys = window > 0 ? std::min<int64_t>(window, last) : last;
  const int64_t want = std::max<int64_t>(1, (2 * int64_t(sm_count()) + rows - 1) / rows);
  const int64_t most = std::max<int64_t>(1, n_keys / kMinKeysPerSplit);
  a.splits = static_cast<int>(std::min<int64_t>({want, most, 1024}));
  a.chunk = static_cast<int>((n_keys + a.splits - 1) / a.splits);
  a.splits = static_cast<int>((n_keys + a.chunk - 1) / a.chunk);  // no range starts past the end

  Scratch parts(a.splits > 1 ? size_t(rows) * a.splits * (D + 2) * sizeof(float) : 0,
                qkv.device().index);
  a.part_ml = parts.as<float>();
  a.part_acc = a.splits > 1 ? a.part_ml + size_t(rows) * a.splits * 2 : nullptr;

  constexpr int P = Pack<T>::N;
  const bool vec = D % P == 0 && D / P <= 32 && aligned16(qkv.raw()) &&
                   aligned16(k_cache.raw()) && aligned16(v_cache.raw());
  if (vec) {  // one 16-byte pack per lane, G = D / P rounded up to a power of two
    const int64_t packs = D / P;
    if (packs <= 4) launch<T, P, 4, 1>(a, rows);
    else if (packs <= 8) launch<T, P, 8, 1>(a, rows);
    else if (packs <= 16) launch<T, P, 16, 1>(a, rows);
    else launch<T, P, 32, 1>(a, rows);
  } else if (D <= 64) {  // generic: a warp per key, single elements
    launch<T, 1, 32, 2>(a, rows);
  } else {
    launch<T, 1, 32, 8>(a, rows);
  }
  if (a.splits > 1) {
    kvcache_combine_kernel<T><<<static_cast<unsigned>(rows), D <= 64 ? 64 : 128, 0, stream()>>>(a);
    GPTCORE_CHECK_LAUNCH("kvcache_combine_kernel");
  }
}

}  // namespace

void attention_kvcache(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, int64_t pos,
                       const Tensor& pos_dev, int n_head, int window, Tensor& out) {
  DeviceGuard guard(qkv.device().index);
  const int32_t* p = pos_dev.defined() ? pos_dev.data<int32_t>() : nullptr;
  const int stride = p && pos_dev.numel() > 1 ? 1 : 0;  // per-row positions
  GPTCORE_FLOAT_TYPES(qkv.dtype(), "qkv", kvcache_impl<scalar_t>(out, k_cache, v_cache, qkv, pos,
                                                                 p, stride, n_head, window));
}

}  // namespace cuda
}  // namespace gptcore
