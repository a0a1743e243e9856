// The checked entry point of every op: validate every argument (shape, dtype, device), allocate
// the outputs (or check the caller's out= buffers), then hand over to cpu:: or cuda::. Backend kernels trust what arrives here.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "ops.h"

namespace gptcore {
namespace ops {
namespace {

std::string shape_of(const std::vector<int64_t>& s) { return shape_string(s); }

void need(bool ok, const std::string& msg) {
  if (!ok) throw ValueError(msg);
}

void need_defined(const Tensor& t, const char* name) {
  if (!t.defined()) throw ValueError(std::string(name) + ": expected a tensor, got None");
}

// A floating-point tensor that a kernel on `dev` can take.
void check_float(const Tensor& t, const char* name) {
  need_defined(t, name);
  const DType dt = t.dtype();
  if (t.device().is_cpu()) {
    if (dt != DType::float32)
      throw TypeError(std::string(name) + ": expected float32 on the CPU, got " + dtype_name(dt));
  } else if (dt != DType::float32 && dt != DType::bfloat16) {
    throw TypeError(std::string(name) + ": expected float32 or bfloat16, got " + dtype_name(dt));
  }
}

void check_f32(const Tensor& t, const char* name) {
  need_defined(t, name);
  if (t.dtype() != DType::float32)
    throw TypeError(std::string(name) + ": expected float32, got " + dtype_name(t.dtype()));
}

void check_index(const Tensor& t, const char* name) {
  need_defined(t, name);
  if (t.dtype() != DType::int32 && t.dtype() != DType::int64)
    throw TypeError(std::string(name) + ": expected int32 or int64 indices, got " +
                    dtype_name(t.dtype()));
}

void check_dim(const Tensor& t, const char* name, int64_t ndim, const char* what) {
  if (t.dim() != ndim)
    throw ValueError(std::string(name) + ": expected " + std::to_string(ndim) + "-D " + what +
                     ", got shape " + t.shape_str());
}

void check_shape(const Tensor& t, const char* name, const std::vector<int64_t>& shape) {
  if (t.shape() != shape)
    throw ValueError(std::string(name) + ": expected shape " + shape_of(shape) + ", got " +
                     t.shape_str());
}

void check_nonempty(const Tensor& t, const char* name) {
  if (t.numel() == 0) throw ValueError(std::string(name) + ": empty tensor " + t.shape_str());
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* ref_name,
                       const char* name) {
  if (t.device() != ref.device())
    throw ValueError(std::string(name) + ": on " + t.device().str() + " but " + ref_name +
                     " is on " + ref.device().str() + "; move both to one device");
}

void check_same_dtype(const Tensor& ref, const Tensor& t, const char* ref_name,
                      const char* name) {
  if (t.dtype() != ref.dtype())
    throw TypeError(std::string(name) + ": dtype " + dtype_name(t.dtype()) + " differs from " +
                    ref_name + "'s " + dtype_name(ref.dtype()));
}

// Everything but the last dimension, flattened: the row count of a (..., C) tensor.
int64_t rows_of(const Tensor& t) { return t.numel() / std::max<int64_t>(t.size(-1), 1); }

std::vector<int64_t> with_last(std::vector<int64_t> s, int64_t last) {
  s.back() = last;
  return s;
}

std::vector<int64_t> drop_last(std::vector<int64_t> s) {
  s.pop_back();
  return s;
}

// ---- output buffers (out=) --------------------------------------------------------------
// Every op either allocates its outputs or writes into buffers the caller passes (out=), so a
// training step or a decode step can run from buffers allocated once. A given buffer must match
// the output exactly (shape, dtype, device) and must not overlap any input or other output:
// kernels read inputs after they have started writing outputs.

using Named = std::pair<const Tensor*, const char*>;

Tensor take_out(const std::optional<Tensor>& given, const std::vector<int64_t>& shape,
                DType dtype, Device device, const char* name) {
  if (!given) return empty(shape, dtype, device);
  const Tensor& t = *given;
  need_defined(t, name);
  check_writable(t, name);
  if (t.dtype() != dtype)
    throw TypeError(std::string(name) + ": expected a " + dtype_name(dtype) + " buffer, got " +
                    dtype_name(t.dtype()));
  if (t.device() != device)
    throw ValueError(std::string(name) + ": buffer is on " + t.device().str() +
                     " but the op runs on " + device.str());
  check_shape(t, name, shape);
  return t;
}

bool overlaps(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.device() != b.device() || !a.nbytes() || !b.nbytes())
    return false;
  const char* a0 = static_cast<const char*>(a.raw());
  const char* b0 = static_cast<const char*>(b.raw());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// Refuses an output that shares memory with an input or with another output.
void check_disjoint(std::initializer_list<Named> outs, std::initializer_list<Named> ins) {
  for (auto o = outs.begin(); o != outs.end(); ++o) {
    for (const Named& i : ins)
      if (overlaps(*o->first, *i.first))
        throw ValueError(std::string(o->second) + ": output buffer overlaps the input " +
                         i.second + "; pass a separate buffer");
    for (auto p = outs.begin(); p != o; ++p)
      if (overlaps(*o->first, *p->first))
        throw ValueError(std::string(o->second) + ": output buffer overlaps the output " +
                         p->second + "; pass a separate buffer");
  }
}

#ifdef GPTCORE_WITH_CUDA
// A CUDA tensor can reach an op without a usable GPU (a foreign DLPack pointer): refuse it
// before any kernel launch. device_count() is computed once.
#define GPTCORE_DISPATCH(dev, call)                                                        \
  do {                                                                                     \
    if ((dev).is_cuda()) {                                                                 \
      if (cuda::device_count() == 0)                                                       \
        throw RuntimeError("tensors on " + (dev).str() + ": no CUDA GPU is available");   \
      cuda::call;                                                                          \
    } else {                                                                               \
      cpu::call;                                                                           \
    }                                                                                      \
  } while (0)
#else
#define GPTCORE_DISPATCH(dev, call)                                                      \
  do {                                                                                   \
    if ((dev).is_cuda())                                                                 \
      throw RuntimeError("tensors on " + (dev).str() +                                   \
                         ": this gptcore build has no CUDA support (rebuild with nvcc)"); \
    cpu::call;                                                                           \
  } while (0)
#endif

}  // namespace

// ---- embedding ----------------------------------------------------------------------------

static void check_embedding_args(const Tensor& idx, const Tensor& wte, const Tensor& wpe,
                                 const char* wte_name = "wte", const char* wpe_name = "wpe") {
  check_index(idx, "idx");
  check_dim(idx, "idx", 2, "(B, T) token ids");
  check_nonempty(idx, "idx");
  check_float(wte, wte_name);
  check_dim(wte, wte_name, 2, "(V, C) token embedding");
  check_float(wpe, wpe_name);
  check_dim(wpe, wpe_name, 2, "(max_positions, C) position embedding");
  check_same_device(idx, wte, "idx", wte_name);
  check_same_device(idx, wpe, "idx", wpe_name);
  check_same_dtype(wte, wpe, wte_name, wpe_name);
  need(wte.size(1) == wpe.size(1), std::string(wpe_name) + ": embedding width " + std::to_string(wpe.size(1)) +
                                       " differs from " + std::string(wte_name) + "'s " + std::to_string(wte.size(1)));
  need(idx.size(1) <= wpe.size(0), "idx: sequence length " + std::to_string(idx.size(1)) +
                                       " exceeds the " + std::to_string(wpe.size(0)) +
                                       " positions of " + std::string(wpe_name));
  if (idx.device().is_cpu()) {  // out-of-range ids would read outside wte
    const int64_t V = wte.size(0);
    for (int64_t i = 0; i < idx.numel(); ++i) {
      const int64_t id = idx.dtype() == DType::int32 ? idx.data<int32_t>()[i] : idx.data<int64_t>()[i];
      if (id < 0 || id >= V)
        throw ValueError("idx: token id " + std::to_string(id) + " at flat position " +
                         std::to_string(i) + " is outside the vocabulary [0, " +
                         std::to_string(V) + ")");
    }
  }
}

// A dropout probability: 0 <= p < 1 (NaN fails both comparisons).
static void check_dropout_p(double p, const char* name) {
  if (!(p >= 0.0 && p < 1.0)) {
    std::ostringstream os;
    os << name << ": expected a dropout probability with 0 <= " << name << " < 1, got " << p;
    throw ValueError(os.str());
  }
}

// Decode positions passed as a tensor (so that a captured CUDA graph reads their current values):
// int32 on the op's device, one element (shape (1,) or (): every row's first position) or one
// per row (shape (B,): row b's first position). Returns the first positions the host can see:
// {pos} without a tensor, the tensor's values on the CPU, none on CUDA (reading them would wait
// for the device; the kernels guard the range there).
static std::vector<int64_t> host_positions(int64_t pos, const std::optional<Tensor>& pos_dev,
                                           const Tensor& ref, const char* ref_name, int64_t B) {
  if (!pos_dev) return {pos};
  const Tensor& p = *pos_dev;
  need_defined(p, "pos");
  if (p.dtype() != DType::int32)
    throw TypeError(std::string("pos: a position tensor must be int32, got ") +
                    dtype_name(p.dtype()));
  need((p.numel() == 1 && p.dim() <= 1) || (p.dim() == 1 && p.size(0) == B),
       "pos: a position tensor must hold one element (shape (1,) or ()) or one per row (shape (" +
           std::to_string(B) + ",)), got shape " + p.shape_str());
  check_same_device(ref, p, ref_name, "pos");
  if (!p.device().is_cpu()) return {};
  const int32_t* v = p.data<int32_t>();
  return std::vector<int64_t>(v, v + p.numel());
}

// Checks host-visible first positions: 0 <= p and p + n_new <= limit ("pos", or "pos[b]" for a
// per-row tensor); too_far(p) says what p + n_new exceeds.
template <typename F>
static void check_positions(const std::vector<int64_t>& ps, int64_t n_new, int64_t limit,
                            F too_far) {
  for (size_t b = 0; b < ps.size(); ++b) {
    const std::string name = ps.size() == 1 ? "pos" : "pos[" + std::to_string(b) + "]";
    need(ps[b] >= 0, name + ": expected >= 0, got " + std::to_string(ps[b]));
    need(ps[b] + n_new <= limit, name + ": " + too_far(ps[b]));
  }
}

Tensor embedding_forward(const Tensor& idx, const Tensor& wte, const Tensor& wpe, int64_t pos,
                         const std::optional<Tensor>& pos_dev, double dropout_p, uint64_t seed,
                         uint64_t stream, const std::optional<Tensor>& out_buf) {
  check_embedding_args(idx, wte, wpe);
  check_dropout_p(dropout_p, "dropout_p");
  const int64_t T = idx.size(1), P = wpe.size(0);
  check_positions(host_positions(pos, pos_dev, idx, "idx", idx.size(0)), T, P, [&](int64_t p) {
    return std::to_string(p) + " + " + std::to_string(T) + " positions exceed the " +
           std::to_string(P) + " positions of wpe";
  });
  Tensor out = take_out(out_buf, {idx.size(0), T, wte.size(1)}, wte.dtype(), wte.device(), "out");
  const Tensor pt = pos_dev ? *pos_dev : Tensor();
  check_disjoint({{&out, "out"}}, {{&idx, "idx"}, {&wte, "wte"}, {&wpe, "wpe"}, {&pt, "pos"}});
  GPTCORE_DISPATCH(idx.device(),
                   embedding_forward(idx, wte, wpe, pos, pt, dropout_p, seed, stream, out));
  return out;
}

void embedding_backward(const Tensor& dout, const Tensor& idx, Tensor& dwte, Tensor& dwpe) {
  check_embedding_args(idx, dwte, dwpe, "dwte", "dwpe");
  check_float(dout, "dout");
  check_same_device(idx, dout, "idx", "dout");
  check_same_dtype(dwte, dout, "dwte", "dout");
  check_shape(dout, "dout", {idx.size(0), idx.size(1), dwte.size(1)});
  check_writable(dwte, "dwte");
  check_writable(dwpe, "dwpe");
  check_disjoint({{&dwte, "dwte"}, {&dwpe, "dwpe"}}, {{&dout, "dout"}, {&idx, "idx"}});
  GPTCORE_DISPATCH(idx.device(), embedding_backward(dout, idx, dwte, dwpe));
}

// ---- layernorm ----------------------------------------------------------------------------

static void check_ln_params(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  check_float(x, "x");
  need(x.dim() >= 1, "x: expected (..., C), got a 0-D tensor");
  check_nonempty(x, "x");
  check_float(weight, "weight");
  check_shape(weight, "weight", {x.size(-1)});
  check_same_device(x, weight, "x", "weight");
  check_same_dtype(x, weight, "x", "weight");
  check_float(bias, "bias");
  check_shape(bias, "bias", {x.size(-1)});
  check_same_device(x, bias, "x", "bias");
  check_same_dtype(x, bias, "x", "bias");
}

static void check_eps(float eps) {
  need(std::isfinite(eps) && eps >= 0.0f, "eps: expected a finite value >= 0");
}

std::tuple<Tensor, Tensor, Tensor> layernorm_forward(const Tensor& x, const Tensor& weight,
                                                     const Tensor& bias, float eps,
                                                     const std::optional<Tensor>& out_buf,
                                                     const std::optional<Tensor>& mean_buf,
                                                     const std::optional<Tensor>& rstd_buf) {
  check_ln_params(x, weight, bias);
  check_eps(eps);
  Tensor out = take_out(out_buf, x.shape(), x.dtype(), x.device(), "out");
  Tensor mean = take_out(mean_buf, drop_last(x.shape()), DType::float32, x.device(), "mean");
  Tensor rstd = take_out(rstd_buf, drop_last(x.shape()), DType::float32, x.device(), "rstd");
  check_disjoint({{&out, "out"}, {&mean, "mean"}, {&rstd, "rstd"}},
                 {{&x, "x"}, {&weight, "weight"}, {&bias, "bias"}});
  GPTCORE_DISPATCH(x.device(), layernorm_forward(x, weight, bias, eps, out, mean, rstd));
  return {out, mean, rstd};
}

// Shared by layernorm_backward (names x, dresidual) and residual_layernorm_backward (sum, dsum):
// the same arguments in the same order, only the names in error messages differ.
static Tensor layernorm_backward_named(const Tensor& dout, const Tensor& x, const Tensor& mean,
                                       const Tensor& rstd, const std::optional<Tensor>& dresidual,
                                       const Tensor& weight, Tensor& dweight, Tensor& dbias,
                                       const std::optional<Tensor>& dx_buf, const char* x_name,
                                       const char* dres_name);

Tensor layernorm_backward(const Tensor& dout, const Tensor& x, const Tensor& mean,
                          const Tensor& rstd, const std::optional<Tensor>& dresidual,
                          const Tensor& weight, Tensor& dweight, Tensor& dbias,
                          const std::optional<Tensor>& dx_buf) {
  return layernorm_backward_named(dout, x, mean, rstd, dresidual, weight, dweight, dbias, dx_buf,
                                  "x", "dresidual");
}

Tensor residual_layernorm_backward(const Tensor& dout, const Tensor& sum, const Tensor& mean,
                                   const Tensor& rstd, const std::optional<Tensor>& dsum,
                                   const Tensor& weight, Tensor& dweight, Tensor& dbias,
                                   const std::optional<Tensor>& dx_buf) {
  return layernorm_backward_named(dout, sum, mean, rstd, dsum, weight, dweight, dbias, dx_buf,
                                  "sum", "dsum");
}

static Tensor layernorm_backward_named(const Tensor& dout, const Tensor& x, const Tensor& mean,
                                       const Tensor& rstd, const std::optional<Tensor>& dresidual,
                                       const Tensor& weight, Tensor& dweight, Tensor& dbias,
                                       const std::optional<Tensor>& dx_buf, const char* x_name,
                                       const char* dres_name) {
  check_float(x, x_name);
  need(x.dim() >= 1, std::string(x_name) + ": expected (..., C), got a 0-D tensor");
  check_nonempty(x, x_name);
  check_float(weight, "weight");
  check_shape(weight, "weight", {x.size(-1)});
  check_same_device(x, weight, x_name, "weight");
  check_same_dtype(x, weight, x_name, "weight");
  check_float(dout, "dout");
  check_shape(dout, "dout", x.shape());
  check_same_device(x, dout, x_name, "dout");
  check_same_dtype(x, dout, x_name, "dout");
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&dweight, "dweight"},
                                {&dbias, "dbias"}}) {
    check_float(*t, name);
    check_shape(*t, name, {x.size(-1)});
    check_same_device(x, *t, x_name, name);
    check_writable(*t, name);
  }
  if (x.device().is_cuda()) {
    check_f32(dweight, "dweight");
    check_f32(dbias, "dbias");
  }
  for (const auto& [t, name] :
       {std::pair<const Tensor*, const char*>{&mean, "mean"}, {&rstd, "rstd"}}) {
    check_f32(*t, name);
    check_shape(*t, name, drop_last(x.shape()));
    check_same_device(x, *t, x_name, name);
  }
  Tensor dres;
  if (dresidual) {
    dres = *dresidual;
    check_float(dres, dres_name);
    check_shape(dres, dres_name, x.shape());
    check_same_device(x, dres, x_name, dres_name);
    check_same_dtype(x, dres, x_name, dres_name);
  }
  Tensor dx = take_out(dx_buf, x.shape(), x.dtype(), x.device(), "out");
  check_disjoint({{&dx, "out"}, {&dweight, "dweight"}, {&dbias, "dbias"}},
                 {{&dout, "dout"}, {&dres, dres_name}, {&x, x_name}, {&weight, "weight"},
                  {&mean, "mean"}, {&rstd, "rstd"}});
  GPTCORE_DISPATCH(x.device(),
                   layernorm_backward(dout, x, mean, rstd, dres, weight, dweight, dbias, dx));
  return dx;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward(
    const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& bias, float eps,
    double dropout_p, uint64_t seed, uint64_t stream, const std::optional<Tensor>& sum_buf,
    const std::optional<Tensor>& out_buf, const std::optional<Tensor>& mean_buf,
    const std::optional<Tensor>& rstd_buf) {
  check_ln_params(x, weight, bias);
  check_eps(eps);
  check_dropout_p(dropout_p, "dropout_p");
  check_float(residual, "residual");
  check_shape(residual, "residual", x.shape());
  check_same_device(x, residual, "x", "residual");
  check_same_dtype(x, residual, "x", "residual");
  Tensor sum = take_out(sum_buf, x.shape(), x.dtype(), x.device(), "sum");
  Tensor out = take_out(out_buf, x.shape(), x.dtype(), x.device(), "out");
  Tensor mean = take_out(mean_buf, drop_last(x.shape()), DType::float32, x.device(), "mean");
  Tensor rstd = take_out(rstd_buf, drop_last(x.shape()), DType::float32, x.device(), "rstd");
  check_disjoint({{&sum, "sum"}, {&out, "out"}, {&mean, "mean"}, {&rstd, "rstd"}},
                 {{&x, "x"}, {&residual, "residual"}, {&weight, "weight"}, {&bias, "bias"}});
  GPTCORE_DISPATCH(x.device(),
                   residual_layernorm_forward(x, residual, weight, bias, eps, dropout_p, seed,
                                              stream, sum, out, mean, rstd));
  return {sum, out, mean, rstd};
}

// ---- linear -------------------------------------------------------------------------------

static void check_linear_params(const Tensor& x, const Tensor& weight,
                                const std::optional<Tensor>& bias) {
  check_float(x, "x");
  need(x.dim() >= 1, "x: expected (..., in_features), got a 0-D tensor");
  check_nonempty(x, "x");
  check_float(weight, "weight");
  check_dim(weight, "weight", 2, "(out_features, in_features) weight");
  check_nonempty(weight, "weight");
  check_same_device(x, weight, "x", "weight");
  check_same_dtype(x, weight, "x", "weight");
  need(weight.size(1) == x.size(-1),
       "weight: expected in_features " + std::to_string(x.size(-1)) + " (x's last dim), got " +
           weight.shape_str() + " (weights are in (out, in) layout)");
  if (bias) {
    check_float(*bias, "bias");
    check_shape(*bias, "bias", {weight.size(0)});
    check_same_device(x, *bias, "x", "bias");
    check_same_dtype(x, *bias, "x", "bias");
  }
}

std::tuple<Tensor, Tensor> linear_forward(const Tensor& x, const Tensor& weight,
                                          const std::optional<Tensor>& bias, bool gelu,
                                          const std::optional<Tensor>& out_buf,
                                          const std::optional<Tensor>& pre_buf) {
  check_linear_params(x, weight, bias);
  const auto out_shape = with_last(x.shape(), weight.size(0));
  Tensor out = take_out(out_buf, out_shape, x.dtype(), x.device(), "out");
  Tensor pre;
  if (gelu) pre = take_out(pre_buf, out_shape, x.dtype(), x.device(), "pre");
  need(gelu || !pre_buf, "pre: only a linear layer with gelu=True has a pre-activation output");
  const Tensor b = bias ? *bias : Tensor();
  check_disjoint({{&out, "out"}, {&pre, "pre"}}, {{&x, "x"}, {&weight, "weight"}, {&b, "bias"}});
  const int64_t N = rows_of(x);
  Tensor x2 = x.view({N, x.size(-1)}), out2 = out.view({N, weight.size(0)});
  Tensor pre2 = gelu ? pre.view({N, weight.size(0)}) : Tensor();
  GPTCORE_DISPATCH(x.device(), linear_forward(x2, weight, b, gelu, out2, pre2));
  return {out, pre};
}

Tensor linear_backward(const Tensor& dout, const Tensor& x, const std::optional<Tensor>& pre,
                       const Tensor& weight, bool need_dx, Tensor& dweight,
                       const std::optional<Tensor>& dbias, const std::optional<Tensor>& dx_buf) {
  check_linear_params(x, weight, std::nullopt);
  const auto out_shape = with_last(x.shape(), weight.size(0));
  check_float(dout, "dout");
  check_shape(dout, "dout", out_shape);
  check_same_device(x, dout, "x", "dout");
  check_same_dtype(x, dout, "x", "dout");
  check_float(dweight, "dweight");
  check_shape(dweight, "dweight", weight.shape());
  check_same_device(x, dweight, "x", "dweight");
  check_writable(dweight, "dweight");
  if (dbias) {
    check_float(*dbias, "dbias");
    check_shape(*dbias, "dbias", {weight.size(0)});
    check_same_device(x, *dbias, "x", "dbias");
    check_writable(*dbias, "dbias");
  }
  if (x.device().is_cuda()) {
    check_f32(dweight, "dweight");
    if (dbias) check_f32(*dbias, "dbias");
  }
  const int64_t N = rows_of(x), M = weight.size(0), K = weight.size(1);
  Tensor pre2;
  if (pre) {
    check_float(*pre, "pre");
    check_shape(*pre, "pre", out_shape);
    check_same_device(x, *pre, "x", "pre");
    check_same_dtype(x, *pre, "x", "pre");
    pre2 = pre->view({N, M});
  }
  need(need_dx || !dx_buf, "out: given, but need_dx is False (no dx is computed)");
  Tensor dx, dx2;
  Tensor db = dbias ? *dbias : Tensor();
  if (need_dx) {
    dx = take_out(dx_buf, x.shape(), x.dtype(), x.device(), "out");
    dx2 = dx.view({N, K});
  }
  const Tensor pre_t = pre ? *pre : Tensor();
  check_disjoint({{&dx, "out"}, {&dweight, "dweight"}, {&db, "dbias"}},
                 {{&dout, "dout"}, {&x, "x"}, {&weight, "weight"}, {&pre_t, "pre"}});
  Tensor dout2 = dout.view({N, M}), x2 = x.view({N, K});
  GPTCORE_DISPATCH(x.device(), linear_backward(dout2, x2, pre2, weight, dweight, db, dx2));
  return dx;
}

// ---- attention ----------------------------------------------------------------------------

static int check_attention_args(const Tensor& qkv, int64_t n_head,
                                const std::optional<int64_t>& window) {
  check_float(qkv, "qkv");
  check_dim(qkv, "qkv", 3, "(B, T, 3C) packed q|k|v");
  check_nonempty(qkv, "qkv");
  need(n_head >= 1, "n_head: expected >= 1, got " + std::to_string(n_head));
  need(qkv.size(2) % 3 == 0,
       "qkv: last dimension " + std::to_string(qkv.size(2)) + " is not 3C (divisible by 3)");
  const int64_t C = qkv.size(2) / 3;
  need(C % n_head == 0, "n_head: " + std::to_string(n_head) + " does not divide C = " +
                            std::to_string(C));
  if (window) {
    need(*window >= 1, "window: expected >= 1 (or None for full causal attention), got " +
                           std::to_string(*window));
    return static_cast<int>(std::min<int64_t>(*window, qkv.size(1)));
  }
  return 0;
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& qkv, int64_t n_head,
                                             std::optional<int64_t> window, double dropout_p,
                                             uint64_t seed, uint64_t stream,
                                             const std::optional<Tensor>& out_buf,
                                             const std::optional<Tensor>& lse_buf) {
  const int w = check_attention_args(qkv, n_head, window);
  check_dropout_p(dropout_p, "dropout_p");
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  Tensor out = take_out(out_buf, {B, T, C}, qkv.dtype(), qkv.device(), "out");
  Tensor lse = take_out(lse_buf, {B, n_head, T}, DType::float32, qkv.device(), "lse");
  check_disjoint({{&out, "out"}, {&lse, "lse"}}, {{&qkv, "qkv"}});
  GPTCORE_DISPATCH(qkv.device(), attention_forward(qkv, static_cast<int>(n_head), w, dropout_p,
                                                   seed, stream, out, lse));
  return {out, lse};
}

Tensor attention_backward(const Tensor& dout, const Tensor& qkv, const Tensor& out,
                          const Tensor& lse, int64_t n_head, std::optional<int64_t> window,
                          double dropout_p, uint64_t seed, uint64_t stream,
                          const std::optional<Tensor>& dqkv_buf) {
  const int w = check_attention_args(qkv, n_head, window);
  check_dropout_p(dropout_p, "dropout_p");
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  for (const auto& [t, name] :
       {std::pair<const Tensor*, const char*>{&dout, "dout"}, {&out, "out"}}) {
    check_float(*t, name);
    check_shape(*t, name, {B, T, C});
    check_same_device(qkv, *t, "qkv", name);
    check_same_dtype(qkv, *t, "qkv", name);
  }
  check_f32(lse, "lse");
  check_shape(lse, "lse", {B, n_head, T});
  check_same_device(qkv, lse, "qkv", "lse");
  Tensor dqkv = take_out(dqkv_buf, qkv.shape(), qkv.dtype(), qkv.device(), "out");
  check_disjoint({{&dqkv, "out"}},
                 {{&dout, "dout"}, {&qkv, "qkv"}, {&out, "out (forward)"}, {&lse, "lse"}});
  GPTCORE_DISPATCH(qkv.device(),
                   attention_backward(dout, qkv, out, lse, static_cast<int>(n_head), w, dropout_p,
                                      seed, stream, dqkv));
  return dqkv;
}

// ---- dropout ------------------------------------------------------------------------------

// Shared by dropout_forward (x, names "x") and dropout_backward (dout): the same kernel.
static Tensor dropout_named(const Tensor& x, double p, uint64_t seed, uint64_t stream,
                            bool inplace, const std::optional<Tensor>& out_buf,
                            const char* x_name) {
  check_float(x, x_name);
  check_dropout_p(p, "p");
  need(!(inplace && out_buf), std::string("out: given together with inplace=True (the result "
                                          "then overwrites ") + x_name + "); pass one or the other");
  if (inplace) check_writable(x, x_name);
  Tensor out = inplace ? x : take_out(out_buf, x.shape(), x.dtype(), x.device(), "out");
  if (!inplace) check_disjoint({{&out, "out"}}, {{&x, x_name}});
  if (x.numel() == 0) return out;
  if (p == 0.0) {  // the identity: no mask, no kernel
    if (!inplace) copy_(out, x);
    return out;
  }
  GPTCORE_DISPATCH(x.device(), dropout_apply(x, p, seed, stream, out));
  return out;
}

Tensor dropout_forward(const Tensor& x, double p, uint64_t seed, uint64_t stream, bool inplace,
                       const std::optional<Tensor>& out_buf) {
  return dropout_named(x, p, seed, stream, inplace, out_buf, "x");
}

Tensor dropout_backward(const Tensor& dout, double p, uint64_t seed, uint64_t stream,
                        bool inplace, const std::optional<Tensor>& out_buf) {
  return dropout_named(dout, p, seed, stream, inplace, out_buf, "dout");
}

// ---- KV-cache attention (decoding) --------------------------------------------------------

Tensor attention_kvcache(const Tensor& qkv, Tensor& k_cache, Tensor& v_cache, int64_t pos,
                         const std::optional<Tensor>& pos_dev, int64_t n_head,
                         std::optional<int64_t> window, const std::optional<Tensor>& out_buf) {
  check_attention_args(qkv, n_head, std::nullopt);
  const int64_t B = qkv.size(0), Tn = qkv.size(1), C = qkv.size(2) / 3, D = C / n_head;
  for (const auto& [t, name] :
       {std::pair<const Tensor*, const char*>{&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_float(*t, name);
    check_dim(*t, name, 4, "(B, n_head, max_T, head_dim) cache");
    check_same_device(qkv, *t, "qkv", name);
    check_same_dtype(qkv, *t, "qkv", name);
    check_writable(*t, name);
    need(t->size(0) == B && t->size(1) == n_head && t->size(3) == D && t->size(2) >= 1,
         std::string(name) + ": expected shape (" + std::to_string(B) + ", " +
             std::to_string(n_head) + ", max_T, " + std::to_string(D) +
             ") for qkv " + qkv.shape_str() + " and n_head " + std::to_string(n_head) + ", got " +
             t->shape_str());
  }
  check_shape(v_cache, "v_cache", k_cache.shape());
  need(!overlaps(k_cache, v_cache), "v_cache: shares memory with k_cache; pass two buffers");
  const int64_t Tmax = k_cache.size(2);
  check_positions(host_positions(pos, pos_dev, qkv, "qkv", B), Tn, Tmax, [&](int64_t p) {
    return std::to_string(p) + " + " + std::to_string(Tn) + " new tokens exceeds the cache's " +
           std::to_string(Tmax) + " positions";
  });
  need(Tn <= Tmax, "qkv: " + std::to_string(Tn) + " new tokens exceed the cache's " +
                       std::to_string(Tmax) + " positions");
  int w = 0;
  if (window) {
    need(*window >= 1, "window: expected >= 1 (or None for full causal attention), got " +
                           std::to_string(*window));
    w = static_cast<int>(std::min<int64_t>(*window, Tmax));  // a window >= Tmax is dense
  }
  Tensor out = take_out(out_buf, {B, Tn, C}, qkv.dtype(), qkv.device(), "out");
  const Tensor pt = pos_dev ? *pos_dev : Tensor();
  check_disjoint({{&out, "out"}},
                 {{&qkv, "qkv"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&pt, "pos"}});
  check_disjoint({{&k_cache, "k_cache"}}, {{&qkv, "qkv"}, {&pt, "pos"}});
  check_disjoint({{&v_cache, "v_cache"}}, {{&qkv, "qkv"}, {&pt, "pos"}});
  GPTCORE_DISPATCH(qkv.device(), attention_kvcache(qkv, k_cache, v_cache, pos, pt,
                                                   static_cast<int>(n_head), w, out));
  return out;
}

// ---- cross-entropy ------------------------------------------------------------------------

std::tuple<Tensor, Tensor> cross_entropy(const Tensor& logits, const Tensor& targets,
                                         std::optional<int64_t> vocab_size,
                                         int64_t ignore_index, bool with_grad,
                                         std::optional<float> grad_scale_arg, bool inplace,
                                         const std::optional<Tensor>& losses_buf,
                                         const std::optional<Tensor>& dlogits_buf) {
  check_float(logits, "logits");
  need(logits.dim() >= 2, "logits: expected (..., V) with at least 2 dimensions, got " +
                              logits.shape_str());
  check_nonempty(logits, "logits");
  check_index(targets, "targets");
  check_shape(targets, "targets", drop_last(logits.shape()));
  check_same_device(logits, targets, "logits", "targets");
  const int64_t Vp = logits.size(-1);
  const int64_t V = vocab_size ? *vocab_size : Vp;
  need(V >= 1 && V <= Vp, "vocab_size: expected 1 <= vocab_size <= " + std::to_string(Vp) +
                              " (logits' last dim), got " + std::to_string(V));
  need(ignore_index < 0 || ignore_index >= V,
       "ignore_index: " + std::to_string(ignore_index) + " is a real class in [0, " +
           std::to_string(V) + "); use a negative value");
  const int64_t N = targets.numel();
  int64_t valid = N;
  if (targets.device().is_cpu()) {
    valid = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t t = targets.dtype() == DType::int32 ? targets.data<int32_t>()[i]
                                                        : targets.data<int64_t>()[i];
      if (t == ignore_index) continue;
      if (t < 0 || t >= V)
        throw ValueError("targets: " + std::to_string(t) + " at flat position " +
                         std::to_string(i) + " is outside [0, " + std::to_string(V) +
                         ") and is not ignore_index (" + std::to_string(ignore_index) + ")");
      ++valid;
    }
  } else if (with_grad && !grad_scale_arg) {
    throw ValueError("grad_scale: pass it explicitly for CUDA tensors (the default, 1/valid "
                     "targets, would need a device-to-host synchronisation)");
  }
  float grad_scale = 0.0f;  // unused without a gradient
  if (with_grad) grad_scale = grad_scale_arg ? *grad_scale_arg : (valid ? 1.0f / valid : 0.0f);
  need(with_grad || !dlogits_buf, "dlogits: given, but no gradient is computed");
  need(!(inplace && dlogits_buf), "dlogits: given together with inplace=True (the gradient "
                                  "then overwrites logits); pass one or the other");
  if (with_grad && inplace) check_writable(logits, "logits");
  Tensor losses = take_out(losses_buf, targets.shape(), DType::float32, logits.device(), "losses");
  Tensor dlogits;
  if (with_grad)
    dlogits = inplace ? logits
                      : take_out(dlogits_buf, logits.shape(), logits.dtype(), logits.device(),
                                 "dlogits");
  const Tensor dlogits_sep = inplace ? Tensor() : dlogits;  // in place is the one allowed overlap
  check_disjoint({{&losses, "losses"}, {&dlogits_sep, "dlogits"}},
                 {{&logits, "logits"}, {&targets, "targets"}});
  Tensor logits2 = logits.view({N, Vp}), losses2 = losses.view({N}), targets2 = targets.view({N});
  Tensor dlogits2 = with_grad ? dlogits.view({N, Vp}) : Tensor();
  GPTCORE_DISPATCH(logits.device(), cross_entropy(logits2, targets2, V, ignore_index,
                                                  grad_scale, losses2, dlogits2));
  return {losses, dlogits};
}

// ---- optimiser ----------------------------------------------------------------------------

// Every tensor AdamW writes (params, m, v, master) must share memory with no other tensor of the
// call: `m is v` would mix the two moments, `params[i] is grads[i]` would read a gradient the
// update has already overwritten, a tensor listed twice would be stepped twice. Gradients may
// share memory with each other (they are only read). Sorted by address, so O(n log n) for the
// hundreds of tensors of a model.
static void check_adamw_disjoint(const std::vector<Tensor>& params,
                                 const std::vector<Tensor>& grads, const std::vector<Tensor>& m,
                                 const std::vector<Tensor>& v, const std::vector<Tensor>& master) {
  struct Span {
    Device device;
    const char* begin;
    const char* end;
    bool written;
    const char* list;
    size_t index;
  };
  std::vector<Span> spans;
  auto add = [&](const std::vector<Tensor>& ts, bool written, const char* list) {
    for (size_t i = 0; i < ts.size(); ++i) {
      if (!ts[i].nbytes()) continue;
      const char* p = static_cast<const char*>(ts[i].raw());
      spans.push_back({ts[i].device(), p, p + ts[i].nbytes(), written, list, i});
    }
  };
  add(params, true, "params");
  add(grads, false, "grads");
  add(m, true, "m");
  add(v, true, "v");
  add(master, true, "master");
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    if (a.device.type != b.device.type) return a.device.type < b.device.type;
    if (a.device.index != b.device.index) return a.device.index < b.device.index;
    return a.begin < b.begin;
  });
  auto name = [](const Span* s) { return std::string(s->list) + "[" + std::to_string(s->index) + "]"; };
  // Sweep: an earlier span overlaps the current one iff it ends after the current begins, so it
  // is enough to remember, per device, the earlier span reaching furthest (any, and written).
  const Span* far_any = nullptr;
  const Span* far_written = nullptr;
  for (size_t k = 0; k < spans.size(); ++k) {
    const Span& s = spans[k];
    if (k && spans[k - 1].device != s.device) far_any = far_written = nullptr;
    const Span* hit = s.written ? far_any : far_written;
    if (hit && hit->end > s.begin) {
      const Span* w = s.written ? &s : hit;  // name the written one first
      const Span* o = w == &s ? hit : &s;
      throw ValueError(name(w) + ": shares memory with " + name(o) +
                       "; adamw_step writes it, so every param, grad, m, v and master needs its "
                       "own buffer");
    }
    if (!far_any || s.end > far_any->end) far_any = &s;
    if (s.written && (!far_written || s.end > far_written->end)) far_written = &s;
  }
}

void adamw_step(std::vector<Tensor> params, const std::vector<Tensor>& grads,
                std::vector<Tensor> m, std::vector<Tensor> v, std::vector<Tensor> master,
                const std::vector<bool>& decay, float lr, float beta1, float beta2, float eps,
                float weight_decay, int64_t step, float grad_scale, uint64_t seed) {
  const size_t n = params.size();
  need(n > 0, "params: expected at least one tensor");
  need(grads.size() == n, "grads: expected " + std::to_string(n) + " tensors (one per param), got " +
                              std::to_string(grads.size()));
  need(m.size() == n, "m: expected " + std::to_string(n) + " tensors, got " + std::to_string(m.size()));
  need(v.size() == n, "v: expected " + std::to_string(n) + " tensors, got " + std::to_string(v.size()));
  need(decay.size() == n, "decay: expected " + std::to_string(n) + " flags, got " +
                              std::to_string(decay.size()));
  need(master.empty() || master.size() == n,
       "master: expected none or " + std::to_string(n) + " tensors, got " + std::to_string(master.size()));
  need(step >= 1, "step: expected >= 1 (AdamW counts steps from 1), got " + std::to_string(step));
  need(std::isfinite(lr) && lr >= 0, "lr: expected a finite value >= 0");
  need(beta1 >= 0 && beta1 < 1, "beta1: expected 0 <= beta1 < 1");
  need(beta2 >= 0 && beta2 < 1, "beta2: expected 0 <= beta2 < 1");
  need(eps > 0, "eps: expected > 0");
  need(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay: expected >= 0");
  need(std::isfinite(grad_scale), "grad_scale: expected a finite value");
  const Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string pn = "params" + idx, gn = "grads" + idx, mn = "m" + idx, vn = "v" + idx;
    check_float(params[i], pn.c_str());
    check_same_device(params[0], params[i], "params[0]", pn.c_str());
    check_writable(params[i], pn);
    check_writable(m[i], mn);
    check_writable(v[i], vn);
    if (!master.empty()) check_writable(master[i], "master" + idx);
    check_float(grads[i], gn.c_str());
    check_shape(grads[i], gn.c_str(), params[i].shape());
    check_same_device(params[0], grads[i], "params[0]", gn.c_str());
    check_f32(m[i], mn.c_str());
    check_shape(m[i], mn.c_str(), params[i].shape());
    check_same_device(params[0], m[i], "params[0]", mn.c_str());
    check_f32(v[i], vn.c_str());
    check_shape(v[i], vn.c_str(), params[i].shape());
    check_same_device(params[0], v[i], "params[0]", vn.c_str());
    if (!master.empty()) {
      const std::string an = "master" + idx;
      check_f32(master[i], an.c_str());
      check_shape(master[i], an.c_str(), params[i].shape());
      check_same_device(params[0], master[i], "params[0]", an.c_str());
    } else if (params[i].dtype() != DType::float32) {
      throw TypeError(pn + ": bfloat16 parameters need float32 master weights (pass master=)");
    }
  }
  check_adamw_disjoint(params, grads, m, v, master);
  GPTCORE_DISPATCH(dev, adamw_step(params, grads, m, v, master, decay, lr, beta1, beta2, eps,
                                   weight_decay, step, grad_scale, seed));
}

double global_norm(const std::vector<Tensor>& tensors) {
  need(!tensors.empty(), "tensors: expected at least one tensor");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_float(tensors[i], name.c_str());
    check_same_device(tensors[0], tensors[i], "tensors[0]", name.c_str());
  }
#ifdef GPTCORE_WITH_CUDA
  if (tensors[0].is_cuda()) {
    if (cuda::device_count() == 0)
      throw RuntimeError("tensors on " + tensors[0].device().str() + ": no CUDA GPU is available");
    return cuda::global_norm(tensors);
  }
#else
  if (tensors[0].is_cuda())
    throw RuntimeError("tensors on " + tensors[0].device().str() +
                       ": this gptcore build has no CUDA support (rebuild with nvcc)");
#endif
  return cpu::global_norm(tensors);
}

// ---- sampling ----------------------------------------------------------------------------

static std::string sampling_num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// A sampling state or control tensor: exactly `dtype` and `shape`, on the logits' device.
static void check_sampling_tensor(const Tensor& t, const char* name, DType dtype,
                                  const std::vector<int64_t>& shape, const Tensor& logits) {
  need_defined(t, name);
  if (t.dtype() != dtype)
    throw TypeError(std::string(name) + ": expected " + dtype_name(dtype) + ", got " +
                    dtype_name(t.dtype()));
  check_shape(t, name, shape);
  check_same_device(logits, t, "logits", name);
}

Tensor sample_tokens(const Tensor& logits, const std::optional<Tensor>& counts_in,
                     const std::optional<Tensor>& counter_in,
                     const std::optional<Tensor>& logit_bias_in,
                     const std::optional<Tensor>& forced_in, std::optional<int64_t> vocab_size,
                     double temperature, std::optional<int64_t> top_k, std::optional<double> top_p,
                     double frequency_penalty, double presence_penalty, uint64_t seed,
                     const std::optional<Tensor>& out_buf) {
  check_float(logits, "logits");
  check_dim(logits, "logits", 2, "(B, Vp) next-token logits");
  check_nonempty(logits, "logits");
  const int64_t B = logits.size(0), Vp = logits.size(1);
  const int64_t V = vocab_size ? *vocab_size : Vp;
  need(V >= 1 && V <= Vp, "vocab_size: expected 1 <= vocab_size <= " + std::to_string(Vp) +
                              " (logits' last dim), got " + std::to_string(V));
  need(V <= 2147483647LL, "vocab_size: " + std::to_string(V) + " does not fit the int32 tokens");
  need(std::isfinite(temperature) && temperature >= 0,
       "temperature: expected a finite number >= 0 (0 = greedy), got " + sampling_num(temperature));
  need(!top_k || *top_k >= 1,
       "top_k: expected None (off) or an int >= 1, got " + std::to_string(top_k ? *top_k : 0));
  need(!top_p || (*top_p > 0 && *top_p <= 1),
       "top_p: expected None (off) or a number in (0, 1], got " + sampling_num(top_p ? *top_p : 0));
  need(std::isfinite(frequency_penalty),
       "frequency_penalty: expected a finite number, got " + sampling_num(frequency_penalty));
  need(std::isfinite(presence_penalty),
       "presence_penalty: expected a finite number, got " + sampling_num(presence_penalty));

  Tensor counts, counter, bias, forced;
  if (counts_in) {
    counts = *counts_in;
    check_sampling_tensor(counts, "counts", DType::int32, {B, V}, logits);
    check_writable(counts, "counts");
  } else {
    need(frequency_penalty == 0 && presence_penalty == 0,
         "counts: frequency_penalty and presence_penalty need counts, the (B, V) int32 number "
         "of times each row has generated each token; pass counts=");
  }
  if (counter_in) {
    counter = *counter_in;
    check_sampling_tensor(counter, "counter", DType::int64, {B}, logits);
    check_writable(counter, "counter");
  }
  if (logit_bias_in) {
    bias = *logit_bias_in;
    check_sampling_tensor(bias, "logit_bias", DType::float32, {V}, logits);
  }
  if (forced_in) {
    forced = *forced_in;
    check_sampling_tensor(forced, "forced", DType::int32, {B}, logits);
    if (forced.device().is_cpu()) {  // a CUDA kernel cannot raise: checked where it is cheap
      const int32_t* f = forced.data<int32_t>();
      for (int64_t b = 0; b < B; ++b)
        need(f[b] < V, "forced: token " + std::to_string(f[b]) + " for row " + std::to_string(b) +
                           " is outside the vocabulary [0, " + std::to_string(V) +
                           ") (negative values mean not forced)");
    }
  }
  Tensor tokens = take_out(out_buf, {B}, DType::int32, logits.device(), "out");
  check_disjoint({{&tokens, "out"}, {&counts, "counts"}, {&counter, "counter"}},
                 {{&logits, "logits"}, {&bias, "logit_bias"}, {&forced, "forced"}});
  GPTCORE_DISPATCH(logits.device(),
                   sample_tokens(logits, counts, counter, bias, forced, V, temperature,
                                 top_k ? *top_k : 0, top_p ? *top_p : 1.0, frequency_penalty,
                                 presence_penalty, seed, tokens));
  return tokens;
}

}  // namespace ops
}  // namespace gptcore
