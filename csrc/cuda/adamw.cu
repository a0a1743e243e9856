// AdamW on the GPU: every parameter tensor in as few launches as possible.
//
// The tensors are cut into chunks of kChunk elements and one block takes one chunk; a block
// finds its tensor through a table of chunk offsets passed by value in the kernel's parameter
// struct (up to kMaxTensorsPerLaunch tensors per launch, so GPT-2's ~150 tensors take two
// launches per dtype combination). Each element is read once (grad, m, v, and the master or
// the parameter) and written once (m, v, master, parameter): the gradient scale (clipping),
// both moment updates, the bias corrections and decoupled weight decay are one pass.
// With float32 master weights the update runs on the master and the bf16 parameter receives a
// stochastically rounded copy: random bits from a counter-based hash of (seed, step, element),
// so a run is reproducible and no rounding bias accumulates over many small updates.
#include <cmath>

#include "cuda/common.cuh"

namespace gptcore {
namespace cuda {
namespace {

struct AdamTable {
  int count;
  int64_t chunk_start[kMaxTensorsPerLaunch + 1];
  void* p[kMaxTensorsPerLaunch];
  const void* g[kMaxTensorsPerLaunch];
  float* m[kMaxTensorsPerLaunch];
  float* v[kMaxTensorsPerLaunch];
  float* master[kMaxTensorsPerLaunch];
  int64_t n[kMaxTensorsPerLaunch];
  int64_t offset[kMaxTensorsPerLaunch];  // element offset in the whole parameter list (RNG)
  float wd[kMaxTensorsPerLaunch];
};

struct AdamHyper {
  float lr, beta1, beta2, eps, bc1, bc2, grad_scale;
  uint64_t seed;  // already mixed with the step
};

template <typename PT, typename GT, bool MASTER>
__global__ void __launch_bounds__(256) adamw_kernel(const __grid_constant__ AdamTable tab,
                                                    const AdamHyper h) {
  const int64_t chunk = blockIdx.x;
  const int ti = find_tensor(tab, chunk);
  const int64_t n = tab.n[ti];
  const int64_t start = (chunk - tab.chunk_start[ti]) * kChunk;
  const int64_t end = min(n, start + kChunk);
  PT* p = static_cast<PT*>(tab.p[ti]);
  const GT* g = static_cast<const GT*>(tab.g[ti]);
  float* m = tab.m[ti];
  float* v = tab.v[ti];
  float* master = tab.master[ti];
  const float wd = tab.wd[ti];
  const int64_t offset = tab.offset[ti];
#pragma unroll 4
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = to_f(g[i]) * h.grad_scale;
    const float mi = h.beta1 * m[i] + (1.f - h.beta1) * gi;
    const float vi = h.beta2 * v[i] + (1.f - h.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float w = MASTER ? master[i] : to_f(p[i]);
    const float mhat = mi / h.bc1, vhat = vi / h.bc2;
    w -= h.lr * (mhat / (sqrtf(vhat) + h.eps) + wd * w);
    if constexpr (MASTER) {
      master[i] = w;
      if constexpr (std::is_same<PT, bf16>::value) {
        p[i] = bf16_stochastic(w, hash_u32(h.seed, static_cast<uint64_t>(offset + i)));
      } else {
        p[i] = w;
      }
    } else {
      p[i] = from_f<PT>(w);
    }
  }
}

template <typename PT, typename GT, bool MASTER>
void launch_group(const std::vector<size_t>& ids, std::vector<Tensor>& params,
                  const std::vector<Tensor>& grads, std::vector<Tensor>& m,
                  std::vector<Tensor>& v, std::vector<Tensor>& master,
                  const std::vector<bool>& decay, const std::vector<int64_t>& offsets,
                  float weight_decay, const AdamHyper& h) {
  for (size_t first = 0; first < ids.size(); first += kMaxTensorsPerLaunch) {
    AdamTable tab{};
    int64_t chunks = 0;
    tab.count = 0;
    // k stays below first + kMaxTensorsPerLaunch: with empty tensors skipped, a count-only
    // bound would run into the next launch's range and update those tensors twice.
    for (size_t k = first; k < ids.size() && k < first + kMaxTensorsPerLaunch; ++k) {
      const size_t i = ids[k];
      const int64_t n = params[i].numel();
      if (n == 0) continue;
      const int c = tab.count++;
      tab.chunk_start[c] = chunks;
      tab.p[c] = params[i].raw();
      tab.g[c] = grads[i].raw();
      tab.m[c] = m[i].data<float>();
      tab.v[c] = v[i].data<float>();
      tab.master[c] = MASTER ? master[i].data<float>() : nullptr;
      tab.n[c] = n;
      tab.offset[c] = offsets[i];
      tab.wd[c] = decay[i] ? weight_decay : 0.f;
      chunks += (n + kChunk - 1) / kChunk;
    }
    tab.chunk_start[tab.count] = chunks;
    if (chunks == 0) continue;
    adamw_kernel<PT, GT, MASTER><<<static_cast<unsigned>(chunks), 256, 0, stream()>>>(tab, h);
    GPTCORE_CHECK_LAUNCH("adamw_kernel");
  }
}

}  // namespace

void adamw_step(std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                std::vector<Tensor>& m, std::vector<Tensor>& v, std::vector<Tensor>& master,
                const std::vector<bool>& decay, float lr, float beta1, float beta2, float eps,
                float weight_decay, int64_t step, float grad_scale, uint64_t seed) {
  DeviceGuard guard(params[0].device().index);
  AdamHyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  // 1 - beta^step in double, rounded once (as the CPU): 1.0f - float(0.999) loses ~1e-5.
  h.bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step)));
  h.bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step)));
  h.grad_scale = grad_scale;
  h.seed = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step) * 0xD1B54A32D192ED03ull;

  const bool has_master = !master.empty();
  std::vector<int64_t> offsets(params.size());
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    offsets[i] = total;
    total += params[i].numel();
  }
  // One group per (param dtype, grad dtype): 4 possible kernels.
  std::vector<size_t> groups[2][2];
  for (size_t i = 0; i < params.size(); ++i)
    groups[params[i].dtype() == DType::bfloat16][grads[i].dtype() == DType::bfloat16].push_back(i);

#define GPTCORE_ADAM_GROUP(PT, GT, pi, gi)                                                      \
  if (!groups[pi][gi].empty()) {                                                               \
    if (has_master)                                                                            \
      launch_group<PT, GT, true>(groups[pi][gi], params, grads, m, v, master, decay, offsets,   \
                                 weight_decay, h);                                             \
    else                                                                                       \
      launch_group<PT, GT, false>(groups[pi][gi], params, grads, m, v, master, decay, offsets,  \
                                  weight_decay, h);                                            \
  }
  GPTCORE_ADAM_GROUP(float, float, 0, 0)
  GPTCORE_ADAM_GROUP(float, bf16, 0, 1)
  if (has_master) {  // bf16 parameters always come with master weights (dispatch checks)
    if (!groups[1][0].empty())
      launch_group<bf16, float, true>(groups[1][0], params, grads, m, v, master, decay, offsets,
                                      weight_decay, h);
    if (!groups[1][1].empty())
      launch_group<bf16, bf16, true>(groups[1][1], params, grads, m, v, master, decay, offsets,
                                     weight_decay, h);
  }
#undef GPTCORE_ADAM_GROUP
}

}  // namespace cuda
}  // namespace gptcore
