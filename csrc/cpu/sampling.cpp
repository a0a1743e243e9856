// Next-token sampling on the CPU (semantics in core/ops.h): one token per row of logits, the rows
// spread over OpenMP threads, each thread with its own scratch rows (allocated once per thread).
//
// Per row, z = logits + logit_bias - penalties is formed once in double, together with the max of
// every 64-wide block. Those block maxima keep both filters cheap at a 50K vocabulary:
//   * top-k looks for its k-th largest z only inside the blocks that can hold one of the k
//     largest (the k-th largest block maximum bounds it from below);
//   * top-p first tries the tokens of the 256 blocks with the largest maxima (a nucleus is usually
//     a few hundred tokens); when they do not hold the mass it selects by probability mass over
//     every kept token: a histogram of the mass over 64 bins per binary exponent, then radix
//     passes over the mantissa bits of the one bin that holds the m-th, and a sort of the few
//     values left.
// The draw skips whole blocks by their sums, then walks one block. Everything is computed in
// double, so the tokens equal the float64 reference's except for rounding-level coincidences
// (a draw within ~1e-16 of a boundary).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "core/hash.h"
#include "core/ops.h"
#include "cpu/common.h"

namespace gptcore {
namespace cpu {
namespace {

constexpr int64_t kBlock = 64;           // width of the block maxima and block sums
constexpr size_t kNucleusBlocks = 256;   // top-p first tries the tokens of this many blocks
constexpr size_t kSortOutright = 4096;   // the mass selection sorts sets up to this size

// ---- the uniform number of a draw ----------------------------------------------------------
// Three splitmix64 steps over (seed, row, counter) from core/hash.h; the formula is in core/ops.h
// and the same bits come out of cuda/sampling.cu and reference.py.
inline double draw_uniform(uint64_t seed, uint64_t row, uint64_t counter) {
  return static_cast<double>(hash::bits(hash::key(seed, row), counter) >> 11) * 0x1.0p-53;
}

// ---- arithmetic helpers ----------------------------------------------------------------------

// True for finite v (inf - inf and NaN - NaN are NaN); a plain comparison that vectorises.
inline bool is_finite(double v) { return v - v == 0.0; }

// exp(x) in double for x <= 0, branch-free so `omp simd` loops vectorise it (std::exp is a libm
// call per element). x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so n * ln2_hi is exact),
// e^r by its Taylor series to r^13 (truncation below 1e-17 relative), times 2^n through the
// exponent bits: within about 1 ulp of the correctly rounded value. Arguments below -708.39
// (where e^x is subnormal) give 0, and so do NaN and anything above 0.
inline double exp_nonpositive(double x) {
  const bool out = !((x >= -708.39) & (x <= 0.0));  // `&`, not `&&`: no branch, so it vectorises
  const double xc = out ? 0.0 : x;
  const double n = (xc * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
  const double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return out ? 0.0 : p * scale;
}

inline uint64_t bits_of(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// ---- one row -----------------------------------------------------------------------------------

struct Controls {
  int64_t V;
  double temperature;
  int64_t top_k;  // 0 = off
  double top_p;   // 1 = off
  double frequency_penalty, presence_penalty;
  uint64_t seed;
};

// A thread's scratch rows, kept between calls (they only grow). `vals` holds up to V candidate
// values, written branch-free (store, then advance by the condition): the candidates of a fresh
// row are unpredictable, and mispredicted branches would double the cost of a row.
struct Scratch {
  std::vector<double> z, p, block_max, block_sum, vals, bins;
};

// The k-th largest finite z (1 <= k < number of finite z). The k-th largest block maximum L is a
// lower bound (k different blocks hold a value >= L), so only blocks whose maximum is >= L are
// searched, and only their values >= L are kept for nth_element.
double kth_largest(const double* z, int64_t V, int64_t k, Scratch& s) {
  const int64_t nb = static_cast<int64_t>(s.block_max.size());
  double* v = s.vals.data();
  int64_t n = 0;
  for (int64_t i = 0; i < nb; ++i) {
    v[n] = s.block_max[i];
    n += s.block_max[i] > -INFINITY;
  }
  double L = -INFINITY;
  if (n >= k) {
    std::nth_element(v, v + (k - 1), v + n, std::greater<double>());
    L = v[k - 1];
  }
  n = 0;
  for (int64_t i = 0; i < nb; ++i) {
    if (!(s.block_max[i] >= L) || s.block_max[i] == -INFINITY) continue;
    const int64_t j1 = std::min(V, (i + 1) * kBlock);
    for (int64_t j = i * kBlock; j < j1; ++j) {
      v[n] = z[j];
      n += is_finite(z[j]) & (z[j] >= L);
    }
  }
  std::nth_element(v, v + (k - 1), v + n, std::greater<double>());
  return v[k - 1];
}

// Picks, from the top, the first of `nbins` bins at which the running mass (starting at
// `above`) reaches `target`; returns it and adds the mass of the bins above it to `above`. When
// rounding keeps the target out of reach, the lowest non-empty bin.
int64_t pick_bin(const double* bins, int64_t nbins, double target, double& above) {
  int64_t sel = -1;
  double sel_above = above, run = above;
  for (int64_t b = nbins - 1; b >= 0; --b) {
    if (bins[b] == 0.0) continue;
    sel = b;
    sel_above = run;
    if (run + bins[b] >= target) break;
    run += bins[b];
  }
  above = sel_above;
  return sel;
}

// Keeps (in place, branch-free) the values whose bits >> shift, masked, equal `bin`.
int64_t keep_bin(double* v, int64_t n, int shift, uint64_t mask, uint64_t bin) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = v[i];
    v[m] = x;
    m += ((bits_of(x) >> shift) & mask) == bin;
  }
  return m;
}

// The value of the m-th largest of v[0, n) (all > 0 and of one binary exponent), m the smallest
// count whose running sum from the largest, started at `above` (the mass of every larger value),
// reaches `target`. More than kSortOutright values are first narrowed by radix passes of 12
// mantissa bits each (positive doubles order like their bit patterns), each time keeping the one
// bin where the running mass reaches the target; the few values left are sorted.
double mass_select(double* v, int64_t n, double above, double target, std::vector<double>& bins) {
  for (int shift = 40; shift >= 4 && n > static_cast<int64_t>(kSortOutright); shift -= 12) {
    bins.assign(4096, 0.0);
    for (int64_t i = 0; i < n; ++i) bins[(bits_of(v[i]) >> shift) & 4095] += v[i];
    const int64_t sel = pick_bin(bins.data(), 4096, target, above);
    n = keep_bin(v, n, shift, 4095, static_cast<uint64_t>(sel));
  }
  const auto [lo, hi] = std::minmax_element(v, v + n);
  if (*lo == *hi) return *lo;  // all equal (e.g. uniform logits): no sort needed
  std::sort(v, v + n, std::greater<double>());
  for (int64_t i = 0; i < n; ++i) {
    above += v[i];
    if (above >= target) return v[i];
  }
  return v[n - 1];
}

// The candidates v[0, n) (all > 0) narrowed to the binary exponent that holds the m-th (see
// mass_select), `above` (the mass of every larger value) raised by that of the larger exponents;
// then mass_select.
double exponent_then_mass_select(double* v, int64_t n, double above, double target, Scratch& s) {
  if (n > static_cast<int64_t>(kSortOutright)) {
    // p in (0, 1]: the exponent is the bit pattern's top 12 bits. Four interleaved histograms
    // keep runs of one exponent from serialising the adds.
    s.bins.assign(4 * 2048, 0.0);
    double* h = s.bins.data();
    for (int64_t i = 0; i < n; ++i) h[((bits_of(v[i]) >> 52) << 2) | (i & 3)] += v[i];
    double ex[2048];
    for (int e = 0; e < 2048; ++e)
      ex[e] = (h[4 * e] + h[4 * e + 1]) + (h[4 * e + 2] + h[4 * e + 3]);
    const int64_t e = pick_bin(ex, 2048, target, above);
    n = keep_bin(v, n, 52, 4095, static_cast<uint64_t>(e));
  }
  return mass_select(v, n, above, target, s.bins);
}

// The general path's histogram bin of a probability: 64 bins per binary exponent (the exponent
// and the top 6 mantissa bits) for p >= 2^-63, and bin 0 for everything smaller (0 included).
inline int64_t coarse_bin(double p) {
  const uint64_t b = bits_of(p);
  const int64_t e = static_cast<int64_t>(b >> 52) - 960;  // 960 = the exponent of 2^-63
  return e < 0 ? 0 : 1 + ((e << 6) | static_cast<int64_t>((b >> 46) & 63));
}
constexpr int64_t kCoarseBins = 1 + 64 * 64;

// top-p: the probability p_m of the m-th most likely kept token (m as in mass_select) for the
// row's kept probabilities p (0 = not kept) whose sum is `total`.
double nucleus_threshold(const double* z, const double* p, int64_t V, double kth, int64_t top_k,
                         double total, double top_p, Scratch& s) {
  const int64_t nb = static_cast<int64_t>(s.block_max.size());
  const double target = top_p * total;
  double* v = s.vals.data();
  // Fast path. The kNucleusBlocks-th largest maximum L of the blocks holding kept tokens leaves at
  // least that many candidates with z >= L: the most likely tokens (ties with the last included).
  int64_t n = 0;
  for (int64_t i = 0; i < nb; ++i) {
    v[n] = s.block_max[i];
    n += (s.block_max[i] > -INFINITY) & (s.block_max[i] >= kth);
  }
  if (n > static_cast<int64_t>(kNucleusBlocks)) {
    std::nth_element(v, v + (kNucleusBlocks - 1), v + n, std::greater<double>());
    const double L = v[kNucleusBlocks - 1];
    n = 0;
    double mass = 0.0;
    for (int64_t i = 0; i < nb; ++i) {
      if (!(s.block_max[i] >= L)) continue;
      const int64_t j1 = std::min(V, (i + 1) * kBlock);
      for (int64_t j = i * kBlock; j < j1; ++j) {
        const bool take = (p[j] > 0.0) & (z[j] >= L);
        v[n] = p[j];
        n += take;
        mass += take ? p[j] : 0.0;
      }
    }
    if (mass >= target) return exponent_then_mass_select(v, n, 0.0, target, s);  // m-th is here
  }
  // General path, every kept token. Few of them (a top-k, or few blocks): gather and select.
  int64_t live = 0;
  for (int64_t i = 0; i < nb; ++i) live += s.block_sum[i] != 0.0;
  const int64_t few = static_cast<int64_t>(2 * kSortOutright);
  if ((top_k > 0 && top_k <= few) || live * kBlock <= few) {
    n = 0;
    for (int64_t i = 0; i < nb; ++i) {
      if (s.block_sum[i] == 0.0) continue;
      const int64_t j1 = std::min(V, (i + 1) * kBlock);
      for (int64_t j = i * kBlock; j < j1; ++j) {
        v[n] = p[j];
        n += p[j] > 0.0;
      }
    }
    return exponent_then_mass_select(v, n, 0.0, target, s);
  }
  // Many: one histogram of the mass over coarse bins straight from p, then only the bin holding
  // the m-th is gathered and narrowed further.
  s.bins.assign(kCoarseBins, 0.0);
  double* h = s.bins.data();
  for (int64_t i = 0; i < nb; ++i) {
    if (s.block_sum[i] == 0.0) continue;
    const int64_t j1 = std::min(V, (i + 1) * kBlock);
    for (int64_t j = i * kBlock; j < j1; ++j) h[coarse_bin(p[j])] += p[j];
  }
  double above = 0.0;
  const int64_t sel = pick_bin(h, kCoarseBins, target, above);
  n = 0;
  for (int64_t i = 0; i < nb; ++i) {
    if (s.block_sum[i] == 0.0) continue;
    const int64_t j1 = std::min(V, (i + 1) * kBlock);
    for (int64_t j = i * kBlock; j < j1; ++j) {
      v[n] = p[j];
      n += (coarse_bin(p[j]) == sel) & (p[j] > 0.0);
    }
  }
  // one exponent (and 6 mantissa bits) unless the m-th is below 2^-63, in bin 0
  return sel == 0 ? exponent_then_mass_select(v, n, above, target, s)
                  : mass_select(v, n, above, target, s.bins);
}

// Samples one row; returns its token (-1 when no z is finite).
int64_t sample_row(const float* x, const float* bias, const int32_t* cnt, const Controls& c,
                   uint64_t row, uint64_t counter, Scratch& s) {
  const int64_t V = c.V, nb = (V + kBlock - 1) / kBlock;
  if (static_cast<int64_t>(s.z.size()) < V) {  // grow once; never shrink
    s.z.resize(V);
    s.p.resize(V);
    s.vals.resize(std::max<int64_t>(V, nb));
  }
  s.block_max.resize(nb);
  s.block_sum.resize(nb);
  double* z = s.z.data();

  // 1. Adjusted logits, the block maxima of the finite ones, the row's max.
  int64_t nfinite = 0;
  double zmax = -INFINITY;
  const double fp = c.frequency_penalty, pp = c.presence_penalty;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t j0 = i * kBlock, j1 = std::min(V, j0 + kBlock);
    if (bias) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) z[j] = static_cast<double>(x[j]) + static_cast<double>(bias[j]);
    } else {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) z[j] = static_cast<double>(x[j]);
    }
    if (cnt) {
      for (int64_t j = j0; j < j1; ++j) {
        const int32_t n = cnt[j];
        if (n != 0) z[j] -= static_cast<double>(n) * fp + (n > 0 ? pp : 0.0);
      }
    }
    double m = -INFINITY;
    int64_t nf = 0;
#pragma omp simd reduction(max : m) reduction(+ : nf)
    for (int64_t j = j0; j < j1; ++j) {
      const double v = z[j];
      const bool f = is_finite(v);
      m = (f & (v > m)) ? v : m;
      nf += f ? 1 : 0;
    }
    m = nf ? m : -INFINITY;
    s.block_max[i] = m;
    nfinite += nf;
    zmax = m > zmax ? m : zmax;
  }
  if (nfinite == 0) return -1;  // everything banned (or non-finite logits)

  // 2. Greedy: the first index holding the max.
  if (c.temperature == 0.0) {
    for (int64_t i = 0; i < nb; ++i) {
      if (s.block_max[i] != zmax) continue;
      const int64_t j1 = std::min(V, (i + 1) * kBlock);
      for (int64_t j = i * kBlock; j < j1; ++j)
        if (z[j] == zmax) return j;
    }
    return -1;  // unreachable: zmax is some z
  }

  // 3. top-k threshold (ties with the k-th kept); -inf keeps every finite z.
  const double kth = (c.top_k > 0 && c.top_k < nfinite) ? kth_largest(z, V, c.top_k, s) : -INFINITY;

  // 4. p = exp((z - zmax) / T) for the kept tokens, 0 elsewhere; block sums.
  double* p = s.p.data();
  const double T = c.temperature;
  double total = 0.0;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t j0 = i * kBlock, j1 = std::min(V, j0 + kBlock);
    if (s.block_max[i] == -INFINITY || !(s.block_max[i] >= kth)) {  // nothing kept here
      std::fill(p + j0, p + j1, 0.0);
      s.block_sum[i] = 0.0;
      continue;
    }
    double bs = 0.0;
#pragma omp simd reduction(+ : bs)
    for (int64_t j = j0; j < j1; ++j) {
      const double v = z[j];
      const double e = exp_nonpositive((v - zmax) / T);
      const double pj = (is_finite(v) & (v >= kth)) ? e : 0.0;
      p[j] = pj;
      bs += pj;
    }
    s.block_sum[i] = bs;
    total += bs;
  }

  // 5. top-p: drop the tokens less likely than the m-th; refresh the block sums.
  if (c.top_p < 1.0) {
    const double tau = nucleus_threshold(z, p, V, kth, kth > -INFINITY ? c.top_k : 0, total,
                                         c.top_p, s);
    for (int64_t i = 0; i < nb; ++i) {
      if (s.block_sum[i] == 0.0) continue;
      const int64_t j0 = i * kBlock, j1 = std::min(V, j0 + kBlock);
      double bs = 0.0;
#pragma omp simd reduction(+ : bs)
      for (int64_t j = j0; j < j1; ++j) {
        const double pj = p[j] >= tau ? p[j] : 0.0;
        p[j] = pj;
        bs += pj;
      }
      s.block_sum[i] = bs;
    }
  }

  // 6. Inverse CDF in index order: skip whole blocks below u * sum, then walk one.
  double sum = 0.0;
  for (int64_t i = 0; i < nb; ++i) sum += s.block_sum[i];
  const double target = draw_uniform(c.seed, row, counter) * sum;
  double run = 0.0;
  for (int64_t i = 0; i < nb; ++i) {
    if (s.block_sum[i] == 0.0) continue;
    if (run + s.block_sum[i] <= target) {
      run += s.block_sum[i];
      continue;
    }
    const int64_t j1 = std::min(V, (i + 1) * kBlock);
    for (int64_t j = i * kBlock; j < j1; ++j) {
      run += p[j];
      if (run > target) return j;
    }
    // rounding: the block's own running sum stayed at or below the target; go on from there
  }
  for (int64_t j = V - 1; j >= 0; --j)  // rounding left none: the last token that can be drawn
    if (p[j] > 0.0) return j;
  return -1;  // unreachable: the most likely token has p = 1
}

}  // namespace

void sample_tokens(const Tensor& logits, Tensor& counts, Tensor& counter, const Tensor& logit_bias,
                   const Tensor& forced, int64_t vocab_size, double temperature, int64_t top_k,
                   double top_p, double frequency_penalty, double presence_penalty, uint64_t seed,
                   Tensor& tokens) {
  const int64_t B = logits.size(0), Vp = logits.size(1), V = vocab_size;
  const Controls ctl{V, temperature, top_k, top_p, frequency_penalty, presence_penalty, seed};
  const float* x = logits.data<float>();
  const float* bias = logit_bias.defined() ? logit_bias.data<float>() : nullptr;
  const int32_t* f = forced.defined() ? forced.data<int32_t>() : nullptr;
  int32_t* cnt = counts.defined() ? counts.data<int32_t>() : nullptr;
  int64_t* ctr = counter.defined() ? counter.data<int64_t>() : nullptr;
  int32_t* out = tokens.data<int32_t>();
#pragma omp parallel for schedule(dynamic, 1) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    if (f && f[b] >= 0) {  // forced: nothing else of the row changes
      out[b] = f[b];
      continue;
    }
    thread_local Scratch scratch;
    int32_t* cnt_row = cnt ? cnt + b * V : nullptr;
    const uint64_t c = ctr ? static_cast<uint64_t>(ctr[b]) : 0;
    const int64_t t = sample_row(x + b * Vp, bias, cnt_row, ctl, static_cast<uint64_t>(b), c, scratch);
    out[b] = static_cast<int32_t>(t);
    if (cnt_row && t >= 0) cnt_row[t] += 1;
    if (ctr) ctr[b] += 1;
  }
}

}  // namespace cpu
}  // namespace gptcore
