// THE op table. Every op is declared three times with one meaning:
//   gptcore::ops::NAME   (below, dispatch.cpp) checks every argument, allocates outputs, then calls
//   gptcore::cpu::NAME   (csrc/cpu/*.cpp) or
//   gptcore::cuda::NAME  (csrc/cuda/*.cu, only when built with CUDA),
// the backend functions being declared once, in backend_ops.inc.
// python/gptcore/reference.py holds the NumPy oracle with the same semantics, and
// python/gptcore/ops.py the documented Python wrappers (on top of the bindings in
// csrc/bindings.cpp, which name every argument).
//
// One argument order and one set of names everywhere (ops::, cpu::, cuda::, the bindings,
// ops.py, reference.py; tests/test_op_signatures.py checks it):
//   inputs (activations, ids, upstream gradients, saved statistics; optional inputs such as
//   dresidual or pre keep their place among them) -> parameters -> scalar settings ->
//   accumulated parameter gradients -> outputs (ops:: and Python: optional out= buffers, last).
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

namespace cpu {
#include "backend_ops.inc"
int blas_max_threads();  // how many threads may call OpenBLAS at once (linear.cpp)
}  // namespace cpu

#ifdef GPTCORE_WITH_CUDA
namespace cuda {
#include "backend_ops.inc"

// ---- runtime (csrc/cuda/runtime.cu) -----------------------------------------------------
int device_count();  // 0 when there is no driver or no GPU
std::string unavailable_reason();  // why device_count() is 0 ("" when it is not)
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
// True while work launched on the current stream is being recorded into a CUDA graph (by a
// Graph on this thread, or by the caller on the stream handed to set_stream). Host copies,
// synchronize, empty_cache and cudaMalloc then raise RuntimeError instead of breaking it.
bool capturing();
// A CUDA graph of the kernels gptcore launches between capture_begin and capture_end (recorded
// on a private stream), replayed on the current stream with one launch. Memory the capture
// allocates or frees stays reserved for the graph until reset/destruction; cudaMalloc is not
// allowed during the capture (buffers come from the cache or are allocated before).
class Graph {
 public:
  Graph();  // RuntimeError without a GPU
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void capture_begin();          // replaces a previous graph
  void capture_end();            // instantiates; on failure the capture is discarded and raises
  void capture_abort() noexcept; // discards an unfinished capture, restores the stream
  void replay();
  void reset();                  // frees the graph and its reserved memory
  bool captured() const;
  bool in_capture() const;
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};
}  // namespace cuda
#endif

// ---- the checked, dispatching API (dispatch.cpp) ------------------------------------------
namespace ops {

// Every op that returns tensors takes trailing optional output buffers (out= in Python), named
// like the outputs: when given they must match the output exactly and not overlap any input; the
// op writes into them.
// Positions pos..pos+T-1 (pos_dev: an int32 tensor on idx's device instead, one element holding
// every row's pos or (B,) holding row b's in element b; on the CPU it is read and checked, on CUDA
// the kernel reads it, see backend_ops.inc).
// dropout_p in [0, 1): embedding dropout fused into the same pass, keyed by (seed, stream) exactly
// as dropout_forward on the result (see backend_ops.inc).
Tensor embedding_forward(const Tensor& idx, const Tensor& wte, const Tensor& wpe, int64_t pos = 0,
                         const std::optional<Tensor>& pos_dev = std::nullopt,
                         double dropout_p = 0.0, uint64_t seed = 0, uint64_t stream = 0,
                         const std::optional<Tensor>& out = std::nullopt);
void embedding_backward(const Tensor& dout, const Tensor& idx, Tensor& dwte, Tensor& dwpe);

// returns (out, mean, rstd)
std::tuple<Tensor, Tensor, Tensor> layernorm_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
    const std::optional<Tensor>& out = std::nullopt, const std::optional<Tensor>& mean = std::nullopt,
    const std::optional<Tensor>& rstd = std::nullopt);
// returns dx (= LN backward of dout, plus dresidual when given)
Tensor layernorm_backward(const Tensor& dout, const Tensor& x, const Tensor& mean,
                          const Tensor& rstd, const std::optional<Tensor>& dresidual,
                          const Tensor& weight, Tensor& dweight, Tensor& dbias,
                          const std::optional<Tensor>& dx = std::nullopt);
// returns (sum, out, mean, rstd): sum = dropout(x) + residual, out = LN(sum). dropout_p in [0, 1):
// residual dropout on x with dropout_forward's mask for (dropout_p, seed, stream) (backward:
// dropout_backward with the same three on the gradient of sum).
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward(
    const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& bias, float eps,
    double dropout_p = 0.0, uint64_t seed = 0, uint64_t stream = 0,
    const std::optional<Tensor>& sum = std::nullopt, const std::optional<Tensor>& out = std::nullopt,
    const std::optional<Tensor>& mean = std::nullopt, const std::optional<Tensor>& rstd = std::nullopt);
// The same layout as layernorm_backward, with the forward's sum in x's place and dsum (the
// gradient reaching sum from elsewhere) in dresidual's. Returns dx, the total gradient of sum
// (and so of both x and residual of the forward).
Tensor residual_layernorm_backward(const Tensor& dout, const Tensor& sum, const Tensor& mean,
                                   const Tensor& rstd, const std::optional<Tensor>& dsum,
                                   const Tensor& weight, Tensor& dweight, Tensor& dbias,
                                   const std::optional<Tensor>& dx = std::nullopt);

// returns (out, pre) -- pre is undefined unless gelu
std::tuple<Tensor, Tensor> linear_forward(const Tensor& x, const Tensor& weight,
                                          const std::optional<Tensor>& bias, bool gelu,
                                          const std::optional<Tensor>& out = std::nullopt,
                                          const std::optional<Tensor>& pre = std::nullopt);
// returns dx (undefined when need_dx is false)
Tensor linear_backward(const Tensor& dout, const Tensor& x, const std::optional<Tensor>& pre,
                       const Tensor& weight, bool need_dx, Tensor& dweight,
                       const std::optional<Tensor>& dbias,
                       const std::optional<Tensor>& dx = std::nullopt);

// returns (out, lse). dropout_p in [0, 1): attention-probability dropout keyed by (seed, stream)
// (see backend_ops.inc); backward must get the same dropout_p, seed and stream.
std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, int64_t n_head,
                                             std::optional<int64_t> window,
                                             double dropout_p = 0.0, uint64_t seed = 0,
                                             uint64_t stream = 0,
                                             const std::optional<Tensor>& out = std::nullopt,
                                             const std::optional<Tensor>& lse = std::nullopt);
Tensor attention_backward(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                          const Tensor& lse, int64_t n_head, std::optional<int64_t> window,
                          double dropout_p = 0.0, uint64_t seed = 0, uint64_t stream = 0,
                          const std::optional<Tensor>& dqkv = std::nullopt);
// KV-cache attention for decoding: writes qkv's k, v into k_cache, v_cache (B, H, Tmax, D) at
// positions pos..pos+Tn-1 (in place), returns out (B, Tn, C).
// pos_dev (an int32 tensor on qkv's device: one element, or (B,) per-row positions) replaces
// pos when given, as in embedding_forward.
Tensor attention_kvcache(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, int64_t pos,
                         const std::optional<Tensor>& pos_dev, int64_t n_head,
                         std::optional<int64_t> window,
                         const std::optional<Tensor>& out = std::nullopt);

// ---- dropout (csrc/cpu/dropout.cpp, csrc/cuda/dropout.cu) --------------------------------------
// Counter-based dropout (core/hash.h): nothing is stored, backward regenerates the mask from
// (p, seed, stream). Element i is x's row-major linear index; x float32 (CPU) or float32/bfloat16
// (CUDA). p in [0, 1) (ValueError otherwise, NaN included). p == 0 is the identity: in place
// nothing runs, otherwise x is copied into out. inplace=true writes into x (out must then be
// absent); otherwise into out when given (x's shape, dtype and device, disjoint from x).
// returns out = x * mask * scale
Tensor dropout_forward(const Tensor& x, double p, uint64_t seed, uint64_t stream,
                       bool inplace = false, const std::optional<Tensor>& out = std::nullopt);
// returns dx = dout * mask * scale (the forward's mask for the same p, seed, stream)
Tensor dropout_backward(const Tensor& dout, double p, uint64_t seed, uint64_t stream,
                        bool inplace = false, const std::optional<Tensor>& out = std::nullopt);

// returns (losses, dlogits) -- dlogits undefined unless with_grad. grad_scale: std::nullopt =
// 1 / (number of non-ignored targets), only on the CPU (elsewhere it would need a host sync).
std::tuple<Tensor, Tensor> cross_entropy(const Tensor& logits, const Tensor& targets,
                                         std::optional<int64_t> vocab_size,
                                         int64_t ignore_index, bool with_grad,
                                         std::optional<float> grad_scale, bool inplace,
                                         const std::optional<Tensor>& losses = std::nullopt,
                                         const std::optional<Tensor>& dlogits = std::nullopt);

void adamw_step(std::vector<Tensor> params, const std::vector<Tensor>& grads,
                std::vector<Tensor> m, std::vector<Tensor> v, std::vector<Tensor> master,
                const std::vector<bool>& decay, float lr, float beta1, float beta2, float eps,
                float weight_decay, int64_t step, float grad_scale, uint64_t seed);
double global_norm(const std::vector<Tensor>& tensors);

// ---- sampling (csrc/cpu/sampling.cpp, csrc/cuda/sampling.cu) ----------------------------------
// Next-token sampling on the device that holds the logits, so a decode step never leaves it.
// logits (B, Vp): float32 (CPU) or float32/bfloat16 (CUDA); only the first V = vocab_size
// (default Vp) columns are real. Per row b that is not forced:
//   z = logits[b, :V] (+ logit_bias) - (counts[b]*frequency_penalty + (counts[b] > 0)*presence_penalty)
//       logit_bias (V,) float32 may hold -inf (bans a token). Penalties need counts (B, V) int32
//       (OpenAI's definition: counts are the tokens the row has generated). Only finite z take
//       part: -inf, +inf and NaN entries are never chosen. A row without a finite z gets -1.
//   temperature == 0: greedy, the index of the largest z (ties -> lowest index); no filter.
//   otherwise p_j = exp((z_j - max z) / temperature) and
//     top_k (>= 1): keep j with z_j >= the k-th largest finite z (ties with it are kept).
//     top_p (0, 1]: of the kept, with p sorted descending, m = the smallest count whose sum
//       reaches top_p * sum(kept p); keep those with p_j >= the m-th (ties kept; the most likely
//       token always stays). top_p == 1 keeps everything.
//   draw: u = uniform(seed, b, c_b), c_b = counter[b] (0 without counter); the token is the
//     smallest index j whose running sum of kept p in index order exceeds u * sum(kept p) (if
//     rounding leaves none, the last kept index with p > 0).
//   uniform(seed, b, c): 64-bit unsigned arithmetic modulo 2^64, G = 0x9E3779B97F4A7C15,
//     mix(x) = splitmix64's finaliser: x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27;
//              x *= 0x94D049BB133111EB; x ^= x >> 31;
//     h = mix(seed + G); h = mix(h + G * (b + 1)); h = mix(h + G * (c + 1))  (c's two's
//     complement bits); u = (h >> 11) * 2^-53. Bit-identical on CPU, CUDA and in reference.py.
//   then counts[b, token] += 1 (token >= 0) and counter[b] += 1, in place.
// forced (B,) int32: where forced[b] >= 0 the row's token is forced[b] and nothing else of the row
// changes (no draw, no counts/counter update). Values must be < V (checked on the CPU; on CUDA a
// larger value is written out as given).
// top_k / top_p: std::nullopt = off.
// Precision: the CPU computes z, p and the sums in double (token-for-token equal to the float64
// reference but for rounding-level ties); CUDA in float32 (equal but for draws within ~1e-6 of a
// boundary of the cumulative distribution or of the top-p mass).
// Returns tokens (B,) int32 (written into the tokens buffer when given).
Tensor sample_tokens(const Tensor& logits, const std::optional<Tensor>& counts,
                     const std::optional<Tensor>& counter, const std::optional<Tensor>& logit_bias,
                     const std::optional<Tensor>& forced, std::optional<int64_t> vocab_size,
                     double temperature, std::optional<int64_t> top_k, std::optional<double> top_p,
                     double frequency_penalty, double presence_penalty, uint64_t seed,
                     const std::optional<Tensor>& tokens = std::nullopt);

}  // namespace ops
}  // namespace gptcore
