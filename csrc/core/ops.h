// THE op table. Every op is declared three times with one meaning:
//   gptcore::ops::NAME   (dispatch.cpp)  checks every argument, allocates outputs, then calls
//   gptcore::cpu::NAME   (csrc/cpu/*.cpp) or
//   gptcore::cuda::NAME  (csrc/cuda/*.cu, only when built with CUDA).
// python/gptcore/reference.py holds the NumPy oracle with the same semantics, and
// python/gptcore/ops.py the documented Python wrappers.
//
// Conventions shared by all backends:
//   * Backend kernels receive every output already allocated (shapes checked by dispatch).
//   * Gradients of *parameters* (dwte, dweight, dbias, ...) are ACCUMULATED (+=), so micro-batch
//     gradient accumulation costs nothing. Gradients of *activations* (dx, dqkv, ...) are
//     OVERWRITTEN.
//   * Float tensors are float32 on the CPU; float32 or bfloat16 on CUDA. Statistics kept for
//     backward (LayerNorm mean/rstd, attention log-sum-exp, losses) are always float32.
//   * Index tensors (token ids, targets) are int32 or int64.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include "tensor.h"

namespace gptcore {

// Declares one op family's backend entry points in the current namespace.
#define GPTCORE_BACKEND_OPS                                                                    \
  /* out[b,t,:] = wte[idx[b,t],:] + wpe[t,:] */                                                \
  void embedding_forward(Tensor& out, const Tensor& idx, const Tensor& wte, const Tensor& wpe); \
  /* dwte[idx[b,t],:] += dout[b,t,:];  dwpe[t,:] += sum_b dout[b,t,:]  (deterministic) */      \
  void embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout, const Tensor& idx);  \
                                                                                               \
  /* x (N,C): out = (x-mean)*rstd*weight + bias; mean, rstd (N,) float32 */                    \
  void layernorm_forward(Tensor& out, Tensor& mean, Tensor& rstd, const Tensor& x,             \
                         const Tensor& weight, const Tensor& bias, float eps);                 \
  /* dx = dresidual + LN'(dout)  (dresidual may be undefined = 0); dweight, dbias += */        \
  void layernorm_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dout,      \
                          const Tensor& dresidual, const Tensor& x, const Tensor& weight,      \
                          const Tensor& mean, const Tensor& rstd);                             \
  /* sum = x + residual; out = LN(sum) */                                                      \
  void residual_layernorm_forward(Tensor& sum, Tensor& out, Tensor& mean, Tensor& rstd,        \
                                  const Tensor& x, const Tensor& residual,                     \
                                  const Tensor& weight, const Tensor& bias, float eps);        \
                                                                                               \
  /* x (N,K), weight (M,K), bias (M,) or undefined.                                            \
     gelu=false: out = x @ weight^T + bias.                                                    \
     gelu=true : pre = x @ weight^T + bias, out = gelu_tanh(pre).  (pre undefined otherwise) */ \
  void linear_forward(Tensor& out, Tensor& pre, const Tensor& x, const Tensor& weight,         \
                      const Tensor& bias, bool gelu);                                          \
  /* g = dout (or dout * gelu'(pre) when pre is defined);                                      \
     dx = g @ weight (skipped when dx undefined); dweight += g^T @ x; dbias += sum_rows g */  \
  void linear_backward(Tensor& dx, Tensor& dweight, Tensor& dbias, const Tensor& dout,         \
                       const Tensor& x, const Tensor& weight, const Tensor& pre);              \
                                                                                               \
  /* qkv (B,T,3C) packed [q | k | v], heads of D = C/n_head inside each. Causal, and with       \
     window w > 0 query t sees keys s with t-w < s <= t. out (B,T,C); lse (B,H,T) float32 is   \
     the natural-log log-sum-exp of each row of scaled scores (scale 1/sqrt(D)). */            \
  void attention_forward(Tensor& out, Tensor& lse, const Tensor& qkv, int n_head,              \
                         int window);                                                          \
  void attention_backward(Tensor& dqkv, const Tensor& dout, const Tensor& qkv,                 \
                          const Tensor& out, const Tensor& lse, int n_head, int window);       \
  /* Decoding attention over a KV cache. qkv (B,Tn,3C) holds Tn new tokens at absolute        \
     positions pos..pos+Tn-1; k_cache, v_cache (B,H,Tmax,D), qkv's dtype. Writes the new k, v  \
     into the caches at those positions (in place), then new token i attends causally to       \
     cache positions 0..pos+i (with window w > 0 only the last w of them). out (B,Tn,C). */    \
  void attention_kvcache(Tensor& out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv,     \
                         int64_t pos, int n_head, int window);                                 \
                                                                                               \
  /* logits (N,Vp), targets (N,), only the first V columns are real (V <= Vp).                 \
     losses[i] = logsumexp(logits[i,:V]) - logits[i,targets[i]], 0 where targets[i] ==         \
     ignore_index. When dlogits is defined: dlogits[i,j] = grad_scale * (softmax_j - [j==t])   \
     for j < V, 0 for j >= V and for ignored rows. dlogits may alias logits (in place). */     \
  void cross_entropy(Tensor& losses, Tensor& dlogits, const Tensor& logits,                    \
                     const Tensor& targets, int64_t vocab_size, int64_t ignore_index,          \
                     float grad_scale);                                                        \
                                                                                               \
  /* One AdamW step over a list of tensors (one launch per family where the backend can).    \
     g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;                        \
     p -= lr * (mhat / (sqrt(vhat) + eps) + wd_i * p), wd_i = weight_decay if decay[i] else 0,  \
     mhat = m / (1-b1^step), vhat = v / (1-b2^step). With master weights (bf16 params) the     \
     update runs on the fp32 master and the param receives its stochastically rounded copy. */ \
  void adamw_step(std::vector<Tensor>& params, const std::vector<Tensor>& grads,               \
                  std::vector<Tensor>& m, std::vector<Tensor>& v,                              \
                  std::vector<Tensor>& master, const std::vector<bool>& decay, float lr,       \
                  float beta1, float beta2, float eps, float weight_decay, int64_t step,       \
                  float grad_scale, uint64_t seed);                                            \
  /* sqrt(sum of squares of every element of every tensor), accumulated in double/fp32 */      \
  double global_norm(const std::vector<Tensor>& tensors);

namespace cpu {
GPTCORE_BACKEND_OPS
void set_blas_threads(int n);  // OpenBLAS's own thread pool (linear.cpp)
}  // namespace cpu

#ifdef GPTCORE_WITH_CUDA
namespace cuda {
GPTCORE_BACKEND_OPS

// ---- runtime (csrc/cuda/runtime.cu) -----------------------------------------------------
int device_count();  // 0 when there is no driver or no GPU
void* malloc_cached(size_t nbytes, int device);  // caching allocator
void free_cached(void* ptr);
void empty_cache();
size_t cached_bytes();
// Copies between host and device or device and device, ordered on the current stream.
void memcpy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t nbytes);
void memset_zero(void* dst, size_t nbytes, int device);
// The stream every gptcore kernel launches on (0 = the legacy default stream).
void set_stream(uintptr_t stream);
uintptr_t current_stream();
void synchronize();
// dtype conversion on the device (float32 <-> bfloat16, ints <-> floats).
void cast(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n, int device);
}  // namespace cuda
#endif

// ---- the checked, dispatching API (dispatch.cpp) ------------------------------------------
namespace ops {

// Every op that returns tensors takes trailing optional out buffers (out= in Python): when given
// they must match the output exactly and not overlap any input; the op writes into them.
Tensor embedding_forward(const Tensor& idx, const Tensor& wte, const Tensor& wpe,
                         const std::optional<Tensor>& out = std::nullopt);
void embedding_backward(Tensor& dwte, Tensor& dwpe, const Tensor& dout, const Tensor& idx);

// returns (out, mean, rstd)
std::tuple<Tensor, Tensor, Tensor> layernorm_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
    const std::optional<Tensor>& out = std::nullopt, const std::optional<Tensor>& mean = std::nullopt,
    const std::optional<Tensor>& rstd = std::nullopt);
// returns dx (= dresidual + LN backward when dresidual is given)
Tensor layernorm_backward(Tensor& dweight, Tensor& dbias, const Tensor& dout,
                          const std::optional<Tensor>& dresidual, const Tensor& x,
                          const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                          const std::optional<Tensor>& dx_out = std::nullopt);
// returns the total gradient of sum (= dsum + LN backward of dout)
Tensor residual_layernorm_backward(Tensor& dweight, Tensor& dbias, const Tensor& dout,
                                   const std::optional<Tensor>& dsum, const Tensor& sum, const Tensor& weight,
                                   const Tensor& mean, const Tensor& rstd,
                                   const std::optional<Tensor>& dx_out = std::nullopt);
// returns (sum, out, mean, rstd)
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward(
    const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& bias, float eps,
    const std::optional<Tensor>& sum = std::nullopt, const std::optional<Tensor>& out = std::nullopt,
    const std::optional<Tensor>& mean = std::nullopt, const std::optional<Tensor>& rstd = std::nullopt);

// returns (out, pre) -- pre is undefined unless gelu
std::tuple<Tensor, Tensor> linear_forward(const Tensor& x, const Tensor& weight,
                                          const std::optional<Tensor>& bias, bool gelu,
                                          const std::optional<Tensor>& out = std::nullopt,
                                          const std::optional<Tensor>& pre = std::nullopt);
// returns dx (undefined when need_dx is false)
Tensor linear_backward(Tensor& dweight, std::optional<Tensor> dbias, const Tensor& dout,
                       const Tensor& x, const Tensor& weight, const std::optional<Tensor>& pre,
                       bool need_dx, const std::optional<Tensor>& dx_out = std::nullopt);

// returns (out, lse)
std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, int64_t n_head,
                                             std::optional<int64_t> window,
                                             const std::optional<Tensor>& out = std::nullopt,
                                             const std::optional<Tensor>& lse = std::nullopt);
Tensor attention_backward(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                          const Tensor& lse, int64_t n_head, std::optional<int64_t> window,
                          const std::optional<Tensor>& dqkv_out = std::nullopt);
// KV-cache attention for decoding: writes qkv's k, v into k_cache, v_cache (B, H, Tmax, D) at
// positions pos..pos+Tn-1 (in place), returns out (B, Tn, C).
Tensor attention_kvcache(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, int64_t pos,
                         int64_t n_head, std::optional<int64_t> window,
                         const std::optional<Tensor>& out = std::nullopt);

// returns (losses, dlogits) -- dlogits undefined unless with_grad
std::tuple<Tensor, Tensor> cross_entropy(const Tensor& logits, const Tensor& targets,
                                         std::optional<int64_t> vocab_size,
                                         int64_t ignore_index, bool with_grad,
                                         float grad_scale, bool inplace,
                                         const std::optional<Tensor>& losses_out = std::nullopt,
                                         const std::optional<Tensor>& dlogits_out = std::nullopt);

void adamw_step(std::vector<Tensor> params, const std::vector<Tensor>& grads,
                std::vector<Tensor> m, std::vector<Tensor> v, std::vector<Tensor> master,
                const std::vector<bool>& decay, float lr, float beta1, float beta2, float eps,
                float weight_decay, int64_t step, float grad_scale, uint64_t seed);
double global_norm(const std::vector<Tensor>& tensors);

}  // namespace ops
}  // namespace gptcore
