// gptcore's GEMM on the GPU (no cuBLAS) and the linear layer built on it.
//
// One problem shape covers every product a linear layer needs:
//     C (M x N) = A (M x K) * B (N x K)^T
// where each operand is either "K-major" (its K index is contiguous in memory) or "MN-major"
// (its M or N index is contiguous). That lets forward (x W^T), backward-data (g W) and
// backward-weight (g^T x) read the tensors where they lie, with no transposes:
//     forward  out = x W^T : A = x  K-major, B = W  K-major
//     dx       = g W       : A = g  K-major, B = W  MN-major
//     dW      += g^T x     : A = g  MN-major, B = x MN-major
//
// bf16: tensor cores through mma.sync m16n8k16 (fp32 accumulators), operands staged in shared
// memory by a 4-stage cp.async pipeline and fed to the tensor cores with ldmatrix (.trans for
// MN-major operands). Rows are padded by 16 bytes so ldmatrix's eight row reads hit eight
// different bank groups. Runs on sm_80 and newer.
// float32: a SIMT kernel with fp32 FMAs (tests want ~1e-6 relative error, which TF32 would not
// give); it is the accuracy path, not the fast one.
//
// Fused epilogues, applied to the accumulators before they leave registers:
//   * + bias (per column), then optionally tanh-GELU, writing the pre-activation too (backward
//     needs it) -- the forward of Linear+GELU in one pass over the output;
//   * accumulate into a float32 C (dW += ...), so gradient accumulation costs no extra pass;
//   * row sums of A added to a float32 vector: in the dW product A = g^T, so its row sums are
//     the bias gradient, computed from the operand tiles already in registers.
// GELU's derivative in backward (g = dout * gelu'(pre)) is one fused element-wise pass that
// both backward products then read.
//
// Hopper seam: gemm() first offers the problem to `hopper_gemm` (a wgmma + TMA kernel for
// sm_90a, chosen at run time on compute capability 9.x); while that pointer is null, or when it
// declines a problem, the mma.sync kernel runs.
#include <algorithm>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {

// ---- the problem ----------------------------------------------------------------------------
struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;  // a_kmajor: A(m,k) = A[m*lda + k], else A[k*lda + m]
  int64_t lda = 0;
  bool a_kmajor = true;
  const void* B = nullptr;  // b_kmajor: B(n,k) = B[n*ldb + k], else B[k*ldb + n]
  int64_t ldb = 0;
  bool b_kmajor = true;
  void* C = nullptr;        // dtype T, or float32 when accumulate
  int64_t ldc = 0;
  bool accumulate = false;  // C += A B^T (C float32)
  const void* bias = nullptr;  // (N,) dtype T
  bool gelu = false;           // C = gelu(A B^T + bias), pre = A B^T + bias
  void* pre = nullptr;
  float* rowsum = nullptr;     // rowsum[m] += sum_k A(m,k)
  DType dtype = DType::float32;
};

// The Hopper (sm_90a wgmma + TMA) variant plugs in here; it returns false for problems it
// does not take. Not written yet: null.
using GemmImpl = bool (*)(const GemmArgs&);
GemmImpl hopper_gemm = nullptr;

namespace {

// ---- device-side parameters and epilogue -----------------------------------------------------
template <typename T>
struct GemmParams {
  int64_t M, N, K;
  const T* A;
  int64_t lda;
  const T* B;
  int64_t ldb;
  void* C;
  int64_t ldc;
  const T* bias;
  T* pre;
  float* rowsum;
  bool accumulate, gelu, pair_ok;
};

// Writes C(r, c) and C(r, c+1) (c even) from fp32 accumulators, with every fused step.
template <typename T>
__device__ __forceinline__ void epilogue_pair(const GemmParams<T>& p, int64_t r, int64_t c,
                                              float v0, float v1) {
  if (r >= p.M || c >= p.N) return;
  const bool two = c + 1 < p.N;
  const int64_t off = r * p.ldc + c;
  if (p.accumulate) {
    float* dst = static_cast<float*>(p.C) + off;
    if (two && p.pair_ok) {
      float2 old = *reinterpret_cast<float2*>(dst);
      *reinterpret_cast<float2*>(dst) = make_float2(old.x + v0, old.y + v1);
    } else {
      dst[0] += v0;
      if (two) dst[1] += v1;
    }
    return;
  }
  if (p.bias) {
    v0 += to_f(p.bias[c]);
    if (two) v1 += to_f(p.bias[c + 1]);
  }
  T* out = static_cast<T*>(p.C) + off;
  if (p.gelu) {
    T* pre = p.pre + off;
    if (two && p.pair_ok) {
      if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<__nv_bfloat162*>(pre) = __floats2bfloat162_rn(v0, v1);
      } else {
        *reinterpret_cast<float2*>(pre) = make_float2(v0, v1);
      }
    } else {
      pre[0] = from_f<T>(v0);
      if (two) pre[1] = from_f<T>(v1);
    }
    v0 = gelu_f(v0);
    v1 = gelu_f(v1);
  }
  if (two && p.pair_ok) {
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(v0, v1);
    } else {
      *reinterpret_cast<float2*>(out) = make_float2(v0, v1);
    }
  } else {
    out[0] = from_f<T>(v0);
    if (two) out[1] = from_f<T>(v1);
  }
}

// Grouped rasterisation: consecutive blocks walk down a group of 8 row-tiles before moving
// right, so the B tiles they share stay in L2.
__device__ __forceinline__ void tile_coords(int64_t tiles_m, int64_t tiles_n, int64_t& tm,
                                            int64_t& tn) {
  constexpr int64_t kGroup = 8;
  const int64_t pid = blockIdx.x;
  const int64_t per_group = kGroup * tiles_n;
  const int64_t group = pid / per_group;
  const int64_t first_m = group * kGroup;
  const int64_t gsize = min(tiles_m - first_m, kGroup);
  const int64_t in_group = pid % per_group;
  tm = first_m + in_group % gsize;
  tn = in_group / gsize;
}

// ---- bf16 tensor-core kernel ------------------------------------------------------------------
template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct MmaCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 32, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr int PAD = 8;  // 16 bytes of padding per shared-memory row
  template <bool KMAJOR, int ROWS>
  static constexpr int tile_elems() { return KMAJOR ? ROWS * (BK + PAD) : BK * (ROWS + PAD); }
  template <bool AK, bool BKM>
  static constexpr int smem_bytes() {
    return STAGES * (tile_elems<AK, BM>() + tile_elems<BKM, BN>()) * 2;
  }
};
using BigTile = MmaCfg<128, 128, 64, 32, 4>;   // 8 warps, 64x32 per warp
using SmallTile = MmaCfg<64, 64, 32, 32, 4>;   // 4 warps, for problems with few big tiles

// Copies one (ROWS x BK) operand tile (in GEMM terms: ROWS along M or N, BK along K) into
// shared memory. VEC: 16-byte cp.async chunks, zero-filled outside the matrix (needs the
// contiguous extent and the leading dimension to be multiples of 8 and a 16-byte aligned base);
// otherwise element by element through registers.
template <class Cfg, int ROWS, bool KMAJOR, bool VEC>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int64_t ld, int64_t rows,
                                          int64_t depth, int64_t r0, int64_t k0) {
  constexpr int BK = Cfg::BK, PAD = Cfg::PAD, T = Cfg::THREADS;
  if constexpr (VEC) {
    if constexpr (KMAJOR) {
      constexpr int CPR = BK / 8;  // chunks per row
#pragma unroll
      for (int i = threadIdx.x; i < ROWS * CPR; i += T) {
        const int row = i / CPR, ch = i % CPR;
        const int64_t gr = r0 + row, gk = k0 + ch * 8;
        const bool ok = gr < rows && gk < depth;
        cp_async16(s + row * (BK + PAD) + ch * 8, ok ? g + gr * ld + gk : g, ok);
      }
    } else {
      constexpr int CPR = ROWS / 8;
#pragma unroll
      for (int i = threadIdx.x; i < BK * CPR; i += T) {
        const int kr = i / CPR, ch = i % CPR;
        const int64_t gk = k0 + kr, gr = r0 + ch * 8;
        const bool ok = gk < depth && gr < rows;
        cp_async16(s + kr * (ROWS + PAD) + ch * 8, ok ? g + gk * ld + gr : g, ok);
      }
    }
  } else {
    const bf16 zero = __float2bfloat16_rn(0.f);
    if constexpr (KMAJOR) {
      for (int i = threadIdx.x; i < ROWS * BK; i += T) {
        const int row = i / BK, kc = i % BK;
        const int64_t gr = r0 + row, gk = k0 + kc;
        s[row * (BK + PAD) + kc] = (gr < rows && gk < depth) ? g[gr * ld + gk] : zero;
      }
    } else {
      for (int i = threadIdx.x; i < ROWS * BK; i += T) {
        const int kr = i / ROWS, rc = i % ROWS;
        const int64_t gk = k0 + kr, gr = r0 + rc;
        s[kr * (ROWS + PAD) + rc] = (gr < rows && gk < depth) ? g[gk * ld + gr] : zero;
      }
    }
  }
}

template <class Cfg, bool AK, bool BKM, bool VEC>
__global__ void __launch_bounds__(Cfg::THREADS)
gemm_bf16_kernel(GemmParams<bf16> p) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, PAD = Cfg::PAD, STAGES = Cfg::STAGES;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  constexpr int A_ELEMS = Cfg::template tile_elems<AK, BM>();
  constexpr int B_ELEMS = Cfg::template tile_elems<BKM, BN>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);

  const int64_t tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  int64_t tm, tn;
  tile_coords(tiles_m, tiles_n, tm, tn);
  const int64_t m0 = tm * BM, n0 = tn * BN;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp / Cfg::WARPS_N) * Cfg::WM, wn = (warp % Cfg::WARPS_N) * Cfg::WN;
  // Bias gradient: the warps of the first column of tiles see every k of their rows once.
  const bool do_rowsum = p.rowsum != nullptr && tn == 0 && (warp % Cfg::WARPS_N) == 0;

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  float rs[MT][2] = {};

  const int64_t KT = (p.K + BK - 1) / BK;
  auto stage_a = [&](int s) { return smem + s * (A_ELEMS + B_ELEMS); };
  auto stage_b = [&](int s) { return smem + s * (A_ELEMS + B_ELEMS) + A_ELEMS; };
  auto load_stage = [&](int s, int64_t kt) {
    if (kt < KT) {
      load_tile<Cfg, BM, AK, VEC>(stage_a(s), p.A, p.lda, p.M, p.K, m0, kt * BK);
      load_tile<Cfg, BN, BKM, VEC>(stage_b(s), p.B, p.ldb, p.N, p.K, n0, kt * BK);
    }
    cp_async_commit();  // always, so group counting stays uniform
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) load_stage(s, s);

  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread)...
    __syncthreads();              // ...for every thread; and stage (kt-1) is free again
    load_stage(static_cast<int>((kt + STAGES - 1) % STAGES), kt + STAGES - 1);

    const bf16* sa = stage_a(static_cast<int>(kt % STAGES));
    const bf16* sb = stage_b(static_cast<int>(kt % STAGES));
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MT][4], bfr[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = wm + mt * 16;
        if constexpr (AK) {
          ldmatrix_x4(af[mt], sa + (m + (lane & 15)) * (BK + PAD) + kk + (lane >> 4) * 8);
        } else {
          ldmatrix_x4_trans(af[mt], sa + (kk + (lane & 7) + (lane >> 4) * 8) * (BM + PAD) + m +
                                        ((lane >> 3) & 1) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        const int n = wn + np * 16;
        uint32_t r[4];
        if constexpr (BKM) {
          ldmatrix_x4(r, sb + (n + (lane & 7) + (lane >> 4) * 8) * (BK + PAD) + kk +
                             ((lane >> 3) & 1) * 8);
        } else {
          ldmatrix_x4_trans(r, sb + (kk + (lane & 15)) * (BN + PAD) + n + (lane >> 4) * 8);
        }
        bfr[2 * np][0] = r[0];
        bfr[2 * np][1] = r[1];
        bfr[2 * np + 1][0] = r[2];
        bfr[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_bf16_16816(acc[mt][nt], af[mt], bfr[nt][0], bfr[nt][1]);
      if (do_rowsum) {
        // af[mt][0], [2]: row lane/4 of the 16-row tile; [1], [3]: row lane/4 + 8.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const float2 a0 = unpack_bf16x2(af[mt][0]), a2 = unpack_bf16x2(af[mt][2]);
          const float2 a1 = unpack_bf16x2(af[mt][1]), a3 = unpack_bf16x2(af[mt][3]);
          rs[mt][0] += (a0.x + a0.y) + (a2.x + a2.y);
          rs[mt][1] += (a1.x + a1.y) + (a3.x + a3.y);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int64_t r = m0 + wm + mt * 16 + (lane >> 2);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t c = n0 + wn + nt * 8 + (lane & 3) * 2;
      epilogue_pair(p, r, c, acc[mt][nt][0], acc[mt][nt][1]);
      epilogue_pair(p, r + 8, c, acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  if (do_rowsum) {  // the four lanes of a quad hold parts of the same two rows
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = rs[mt][h];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        const int64_t r = m0 + wm + mt * 16 + (lane >> 2) + h * 8;
        if ((lane & 3) == 0 && r < p.M) p.rowsum[r] += v;
      }
    }
  }
}

// ---- fp32 SIMT kernel ---------------------------------------------------------------------
// 64x64 tiles, 256 threads, 4x4 outputs per thread, K in steps of 16 through shared memory.
constexpr int F_BM = 64, F_BN = 64, F_BK = 16;

template <bool AK, bool BKM>
__global__ void __launch_bounds__(256) gemm_f32_kernel(GemmParams<float> p) {
  __shared__ __align__(16) float As[F_BK][F_BM + 4];
  __shared__ __align__(16) float Bs[F_BK][F_BN + 4];
  const int64_t tiles_m = (p.M + F_BM - 1) / F_BM, tiles_n = (p.N + F_BN - 1) / F_BN;
  int64_t tm, tn;
  tile_coords(tiles_m, tiles_n, tm, tn);
  const int64_t m0 = tm * F_BM, n0 = tn * F_BN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool do_rowsum = p.rowsum != nullptr && tn == 0 && tx == 0;
  float acc[4][4] = {};
  float rs[4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += F_BK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + i * 256;
      // Threads walk the operand's contiguous index, so loads coalesce.
      int r, kc;
      if (AK) { r = e / F_BK; kc = e % F_BK; } else { kc = e / F_BM; r = e % F_BM; }
      const int64_t gr = m0 + r, gk = k0 + kc;
      As[kc][r] = (gr < p.M && gk < p.K) ? (AK ? p.A[gr * p.lda + gk] : p.A[gk * p.lda + gr]) : 0.f;
      if (BKM) { r = e / F_BK; kc = e % F_BK; } else { kc = e / F_BN; r = e % F_BN; }
      const int64_t gn = n0 + r, gk2 = k0 + kc;
      Bs[kc][r] = (gn < p.N && gk2 < p.K) ? (BKM ? p.B[gn * p.ldb + gk2] : p.B[gk2 * p.ldb + gn]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < F_BK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      if (do_rowsum) {
#pragma unroll
        for (int i = 0; i < 4; ++i) rs[i] += av[i];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = m0 + ty * 4 + i, c = n0 + tx * 4;
    epilogue_pair(p, r, c, acc[i][0], acc[i][1]);
    epilogue_pair(p, r, c + 2, acc[i][2], acc[i][3]);
    if (do_rowsum && r < p.M) p.rowsum[r] += rs[i];
  }
}

// ---- launchers ------------------------------------------------------------------------------
template <typename T>
GemmParams<T> make_params(const GemmArgs& a) {
  GemmParams<T> p;
  p.M = a.M; p.N = a.N; p.K = a.K;
  p.A = static_cast<const T*>(a.A); p.lda = a.lda;
  p.B = static_cast<const T*>(a.B); p.ldb = a.ldb;
  p.C = a.C; p.ldc = a.ldc;
  p.bias = static_cast<const T*>(a.bias);
  p.pre = static_cast<T*>(a.pre);
  p.rowsum = a.rowsum;
  p.accumulate = a.accumulate;
  p.gelu = a.gelu;
  // Two adjacent columns are written as one 4- or 8-byte store when every row keeps the
  // alignment: even leading dimension and aligned bases.
  const size_t csize = a.accumulate ? 4 : sizeof(T);
  auto al = [&](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % (2 * csize) == 0; };
  p.pair_ok = a.ldc % 2 == 0 && al(a.C) && (!a.gelu || al(a.pre));
  return p;
}

template <class Cfg, bool AK, bool BKM, bool VEC>
void launch_bf16(const GemmParams<bf16>& p) {
  constexpr int smem = Cfg::template smem_bytes<AK, BKM>();
  auto kernel = gemm_bf16_kernel<Cfg, AK, BKM, VEC>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "gemm_bf16_kernel (shared memory limit)");
  const int64_t tiles = int64_t(ceil_div(p.M, Cfg::BM)) * ceil_div(p.N, Cfg::BN);
  kernel<<<static_cast<unsigned>(tiles), Cfg::THREADS, smem, stream()>>>(p);
  GPTCORE_CHECK_LAUNCH("gemm_bf16_kernel");
}

template <class Cfg, bool AK, bool BKM>
void launch_bf16_vec(const GemmParams<bf16>& p, bool vec) {
  if (vec) launch_bf16<Cfg, AK, BKM, true>(p); else launch_bf16<Cfg, AK, BKM, false>(p);
}

template <class Cfg>
void launch_bf16_layout(const GemmArgs& a, const GemmParams<bf16>& p, bool vec) {
  if (a.a_kmajor && a.b_kmajor) launch_bf16_vec<Cfg, true, true>(p, vec);
  else if (a.a_kmajor) launch_bf16_vec<Cfg, true, false>(p, vec);
  else if (!a.b_kmajor) launch_bf16_vec<Cfg, false, false>(p, vec);
  else launch_bf16_vec<Cfg, false, true>(p, vec);
}

// cp.async 16-byte chunks need an aligned base, a leading dimension and a contiguous extent
// that are multiples of 8 bf16.
bool operand_vec_ok(const void* ptr, int64_t ld, bool kmajor, int64_t rows, int64_t depth) {
  return aligned16(ptr) && ld % 8 == 0 && (kmajor ? depth % 8 == 0 : rows % 8 == 0);
}

void gemm_sm80(const GemmArgs& a) {
  if (a.dtype == DType::bfloat16) {
    const GemmParams<bf16> p = make_params<bf16>(a);
    const bool vec = operand_vec_ok(a.A, a.lda, a.a_kmajor, a.M, a.K) &&
                     operand_vec_ok(a.B, a.ldb, a.b_kmajor, a.N, a.K);
    const int64_t big_tiles = int64_t(ceil_div(a.M, BigTile::BM)) * ceil_div(a.N, BigTile::BN);
    if (big_tiles >= sm_count()) launch_bf16_layout<BigTile>(a, p, vec);
    else launch_bf16_layout<SmallTile>(a, p, vec);
  } else {
    const GemmParams<float> p = make_params<float>(a);
    const unsigned tiles = ceil_div(a.M, F_BM) * ceil_div(a.N, F_BN);
    if (a.a_kmajor && a.b_kmajor) gemm_f32_kernel<true, true><<<tiles, 256, 0, stream()>>>(p);
    else if (a.a_kmajor) gemm_f32_kernel<true, false><<<tiles, 256, 0, stream()>>>(p);
    else if (!a.b_kmajor) gemm_f32_kernel<false, false><<<tiles, 256, 0, stream()>>>(p);
    else gemm_f32_kernel<false, true><<<tiles, 256, 0, stream()>>>(p);
    GPTCORE_CHECK_LAUNCH("gemm_f32_kernel");
  }
}

void gemm(const GemmArgs& a) {
  if (hopper_gemm && a.dtype == DType::bfloat16 && device_props().major == 9 && hopper_gemm(a))
    return;
  gemm_sm80(a);
}

// ---- GELU backward --------------------------------------------------------------------------
// g = dout * gelu'(pre): one read of each input, one write, 16-byte vectors when aligned.
template <typename T>
__global__ void gelu_backward_kernel(T* g, const T* dout, const T* pre, int64_t n, bool vec) {
  constexpr int P = Pack<T>::N;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (vec) {
    for (; (i + 1) * P <= n; i += stride) {
      const Pack<T> d = Pack<T>::load_cs(dout + i * P), x = Pack<T>::load_cs(pre + i * P);
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < P; ++e) o.set(e, d.f(e) * gelu_grad_f(x.f(e)));
      o.store(g + i * P);
    }
    // the tail (n % P elements) is handled below by the element loop
    i = (n / P) * P + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  }
  for (; i < n; i += stride) g[i] = from_f<T>(to_f(dout[i]) * gelu_grad_f(to_f(pre[i])));
}

// ---- few-row linear (decoding) ----------------------------------------------------------------
// A decode step multiplies a handful of activation rows (one per sequence) by every weight
// matrix: the cost is reading the weights once. The tile kernels above would launch only
// (out_features / tile width) blocks for that -- too few to keep the memory system busy -- and
// waste most of each tile. Here one warp owns one output feature: its lanes stream that weight
// row in 16-byte vectors (evict-first: it is read once) and dot it with every activation row
// (a few KB, served from L1/L2), then lane 0 adds the bias and applies GELU (writing the
// pre-activation too). out_features warps keep enough loads in flight to approach bandwidth.
// Up to 32 rows (a batch of 32 sequences): each weight vector is then reused 32 times from
// registers while the activation rows stream from L1.
constexpr int kFewRowsMax = 32;

template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(256)
    linear_few_rows_kernel(const T* __restrict__ x, const T* __restrict__ w,
                           const T* __restrict__ bias, T* __restrict__ out, T* __restrict__ pre,
                           int rows, int64_t out_features, int64_t K, bool gelu) {
  const int lane = threadIdx.x & 31;
  const int64_t n = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;  // this warp's feature
  if (n >= out_features) return;  // the whole warp leaves together
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
  const T* wrow = w + n * K;
  if constexpr (VEC) {  // K % P == 0 and 16-byte aligned x, w
    constexpr int P = Pack<T>::N;
    for (int64_t k = int64_t(lane) * P; k < K; k += 32 * P) {
      const Pack<T> wv = Pack<T>::load_cs(wrow + k);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < rows) {
          const Pack<T> xv = Pack<T>::load(x + r * K + k);
#pragma unroll
          for (int e = 0; e < P; ++e) acc[r] = fmaf(wv.f(e), xv.f(e), acc[r]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wk = to_f(wrow[k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < rows) acc[r] = fmaf(wk, to_f(x[r * K + k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
    const float b = bias ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < rows) {
        float v = acc[r] + b;
        if (gelu) {
          pre[r * out_features + n] = from_f<T>(v);
          v = gelu_f(v);
        }
        out[r * out_features + n] = from_f<T>(v);
      }
    }
  }
}

template <typename T, int ROWS>
void launch_few_rows(const T* x, const T* w, const T* bias, T* out, T* pre, int rows,
                     int64_t out_features, int64_t K, bool gelu) {
  constexpr int P = Pack<T>::N;
  const bool vec = aligned16(x) && aligned16(w) && K % P == 0;
  const unsigned blocks = ceil_div(out_features * 32, 256);
  if (vec)
    linear_few_rows_kernel<T, ROWS, true><<<blocks, 256, 0, stream()>>>(x, w, bias, out, pre, rows,
                                                                        out_features, K, gelu);
  else
    linear_few_rows_kernel<T, ROWS, false><<<blocks, 256, 0, stream()>>>(x, w, bias, out, pre, rows,
                                                                         out_features, K, gelu);
  GPTCORE_CHECK_LAUNCH("linear_few_rows_kernel");
}

template <typename T>
void linear_few_rows(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& out,
                     Tensor& pre, bool gelu) {
  const int rows = static_cast<int>(x.size(0));
  const int64_t K = x.size(1), M = weight.size(0);
  const T* b = bias.defined() ? bias.data<T>() : nullptr;
  T* pr = gelu ? pre.data<T>() : nullptr;
  if (rows == 1) launch_few_rows<T, 1>(x.data<T>(), weight.data<T>(), b, out.data<T>(), pr, rows, M, K, gelu);
  else if (rows == 2) launch_few_rows<T, 2>(x.data<T>(), weight.data<T>(), b, out.data<T>(), pr, rows, M, K, gelu);
  else if (rows <= 4) launch_few_rows<T, 4>(x.data<T>(), weight.data<T>(), b, out.data<T>(), pr, rows, M, K, gelu);
  else if (rows <= 8) launch_few_rows<T, 8>(x.data<T>(), weight.data<T>(), b, out.data<T>(), pr, rows, M, K, gelu);
  else if (rows <= 16) launch_few_rows<T, 16>(x.data<T>(), weight.data<T>(), b, out.data<T>(), pr, rows, M, K, gelu);
  else launch_few_rows<T, kFewRowsMax>(x.data<T>(), weight.data<T>(), b, out.data<T>(), pr, rows, M, K, gelu);
}

}  // namespace

// ---- the linear layer -------------------------------------------------------------------------

void linear_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, bool gelu,
                    Tensor& out, Tensor& pre) {
  DeviceGuard guard(x.device().index);
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  if (N <= kFewRowsMax) {  // a decode step: bandwidth-bound, one warp per output feature
    if (x.dtype() == DType::bfloat16) linear_few_rows<bf16>(x, weight, bias, out, pre, gelu);
    else linear_few_rows<float>(x, weight, bias, out, pre, gelu);
    return;
  }
  GemmArgs a;
  a.M = N; a.N = M; a.K = K;
  a.A = x.raw(); a.lda = K; a.a_kmajor = true;
  a.B = weight.raw(); a.ldb = K; a.b_kmajor = true;
  a.C = out.raw(); a.ldc = M;
  a.bias = bias.defined() ? bias.raw() : nullptr;
  a.gelu = gelu;
  a.pre = gelu ? pre.raw() : nullptr;
  a.dtype = x.dtype();
  gemm(a);
}

void linear_backward(const Tensor& dout, const Tensor& x, const Tensor& pre, const Tensor& weight,
                     Tensor& dweight, Tensor& dbias, Tensor& dx) {
  DeviceGuard guard(x.device().index);
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  const DType dt = x.dtype();
  // g = dout, or dout * gelu'(pre) in a scratch buffer when the layer had a GELU.
  Scratch gbuf(pre.defined() ? static_cast<size_t>(N * M) * dtype_size(dt) : 0, x.device().index);
  const void* g = dout.raw();
  if (pre.defined()) {
    const int64_t n = N * M;
    GPTCORE_FLOAT_TYPES(dt, "dout", {
      constexpr int P = Pack<scalar_t>::N;
      const bool vec = aligned16(gbuf.as<void>()) && aligned16(dout.raw()) && aligned16(pre.raw());
      const unsigned blocks = static_cast<unsigned>(
          std::min<int64_t>(ceil_div(vec ? n / P + 1 : n, 256), int64_t(sm_count()) * 16));
      gelu_backward_kernel<scalar_t><<<blocks, 256, 0, stream()>>>(
          gbuf.as<scalar_t>(), dout.data<scalar_t>(), pre.data<scalar_t>(), n, vec);
      GPTCORE_CHECK_LAUNCH("gelu_backward_kernel");
    });
    g = gbuf.as<void>();
  }
  // dW (M x K) += g^T (M x N) x (N x K), and dbias += the row sums of g^T.
  GemmArgs w;
  w.M = M; w.N = K; w.K = N;
  w.A = g; w.lda = M; w.a_kmajor = false;
  w.B = x.raw(); w.ldb = K; w.b_kmajor = false;
  w.C = dweight.raw(); w.ldc = K; w.accumulate = true;
  w.rowsum = dbias.defined() ? dbias.data<float>() : nullptr;
  w.dtype = dt;
  gemm(w);
  if (dx.defined()) {  // dx (N x K) = g (N x M) W (M x K)
    GemmArgs d;
    d.M = N; d.N = K; d.K = M;
    d.A = g; d.lda = M; d.a_kmajor = true;
    d.B = weight.raw(); d.ldb = K; d.b_kmajor = false;
    d.C = dx.raw(); d.ldc = K;
    d.dtype = dt;
    gemm(d);
  }
}

}  // namespace cuda
}  // namespace gptcore
