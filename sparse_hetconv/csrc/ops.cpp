// The CPU kernels of the `sparse_hetconv::het_conv2d` operator, registered with PyTorch's
// dispatcher through its stable ABI (one binary serves every torch release from 2.10 on).
//
// HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. See docs/design.md §11.
//
// The public operator and its autograd, fake, vmap and autocast rules are defined in Python
// (sparse_hetconv/ops.py); its CPU implementation calls the private operators registered here
// where they compute the call, and the stock formulation elsewhere:
//
//   _cpu_kernel_isa() -> str                 the build this process runs ("avx512", "avx2") or
//                                            "none: <why>"
//   _cpu_forward(input, weight_kxk, weight_1x1, bias, stride, part) -> Tensor
//   _cpu_grad_input(grad, weight_kxk, weight_1x1, input_size, part) -> Tensor    (stride 1)
//   _cpu_grad_weight(grad, input, dense, kernel_size, stride, part) -> (Tensor, Tensor)
//
// Each entry point checks its arguments and raises (RuntimeError in Python) instead of computing
// what it was not built for; the tiling decisions are made here, next to the kernels
// (kernels.h). The kernels of the widest instruction set the CPU reports (its own feature test,
// __builtin_cpu_supports) run, capped by the environment variable SPARSE_HETCONV_MAX_ISA
// ("avx512", "avx2" or "none"; read on every call, any other value is an error).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels_api.h"

namespace {

using torch::stable::Tensor;
using torch::headeronly::MemoryFormat;
using torch::headeronly::ScalarType;

// ---- threads, errors and the instruction set ---------------------------------------------------

void parallel(int64_t n, shc::RangeFn fn, void* ctx) {
  torch::stable::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { fn(begin, end, ctx); });
}

[[noreturn]] void fail(const char* what) {
  throw std::runtime_error(std::string("sparse_hetconv: the CPU kernels have no code for this ") + what +
                           " (a bug: please report the layer's shape)");
}

template <class... A>
void check(bool ok, const A&... parts) {
  if (ok) return;
  std::string message = "sparse_hetconv CPU kernel: ";
  ((message += parts), ...);
  throw std::runtime_error(message);
}

std::string str(int64_t v) { return std::to_string(v); }

std::string shape(const Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + str(t.size(d));
  return s + (t.dim() == 1 ? ",)" : ")");
}

struct Build {
  const shc::KernelTable* table;  // nullptr: none
  std::string name;               // "avx512", "avx2", or "none: <why>"
};

Build select_build() {
  const char* env = std::getenv("SPARSE_HETCONV_MAX_ISA");
  std::string cap = env ? env : "";
  std::transform(cap.begin(), cap.end(), cap.begin(), [](unsigned char c) { return (char)std::tolower(c); });
  cap.erase(0, cap.find_first_not_of(" \t"));
  cap.erase(cap.find_last_not_of(" \t") + 1);
  check(cap.empty() || cap == "avx512" || cap == "avx2" || cap == "none", "SPARSE_HETCONV_MAX_ISA ('",
        env ? env : "", "') must be one of avx512, avx2, none (or unset)");
  if (cap == "none") return {nullptr, "none: SPARSE_HETCONV_MAX_ISA=none"};
#if defined(SHC_X86)
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && cap != "avx2") {
    static const shc::KernelTable* table = shc_kernels_avx512(parallel, fail);
    return {table, "avx512"};
  }
  if (avx2) {
    static const shc::KernelTable* table = shc_kernels_avx2(parallel, fail);
    return {table, "avx2"};
  }
  return {nullptr, "none: the CPU has neither AVX-512 nor AVX2 with FMA"};
#else
  return {nullptr, "none: built without kernels for this processor (they need x86-64 with AVX2 and FMA)"};
#endif
}

const shc::KernelTable& kernels() {
  const Build build = select_build();
  check(build.table != nullptr, "no kernels run here (", build.name, ")");
  return *build.table;
}

std::string kernel_isa() { return select_build().name; }

// ---- tensors -------------------------------------------------------------------------------------

Tensor empty(std::vector<int64_t> size, MemoryFormat format = MemoryFormat::Contiguous) {
  return torch::stable::empty(size, ScalarType::Float, std::nullopt, torch::stable::Device(torch::headeronly::DeviceType::CPU),
                              std::nullopt, format);
}

const float* cptr(const Tensor& t) { return static_cast<const float*>(t.data_ptr()); }
float* ptr(const Tensor& t) { return static_cast<float*>(t.data_ptr()); }

void check_float_cpu(const Tensor& t, const char* name, int64_t dims) {
  check(t.is_cpu(), name, " must be a CPU tensor");
  check(t.scalar_type() == ScalarType::Float, name, " must be float32");
  check(t.dim() == dims, name, " has shape ", shape(t), ", expected ", str(dims), " dimensions");
}

// Whether t's elements fill its memory span exactly once (a permutation of a contiguous layout).
bool dense_span(const Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.push_back({t.stride(d), t.size(d)});
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [step, size] : dims) {
    if (step != expected) return false;
    expected *= size;
  }
  return true;
}

bool all_finite(const shc::KernelTable& k, const Tensor& t) {
  if (t.numel() == 0) return true;
  const Tensor d = dense_span(t) ? t : torch::stable::contiguous(t);
  return k.all_finite(cptr(d), d.numel());
}

std::vector<int64_t> strides(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < t.dim(); ++d) s.push_back(t.stride(d));
  return s;
}

// The layer's shapes, checked: input (B, Cin, H, W) or, for the input gradient, the sizes given.
struct Layer {
  int64_t B, Cin, H, W, Cout, P, kh, kw, sh, sw;
  int64_t Ho() const { return H > 0 ? (H - 1) / sh + 1 : 0; }
  int64_t Wo() const { return W > 0 ? (W - 1) / sw + 1 : 0; }
  int64_t m() const { return Cin / P; }
  int64_t n() const { return Cout / P; }
};

Layer check_layer(int64_t B, int64_t Cin, int64_t H, int64_t W, const Tensor& wk, const Tensor& w1,
                  const std::vector<int64_t>& stride, int64_t part) {
  check_float_cpu(wk, "weight_kxk", 4);
  check_float_cpu(w1, "weight_1x1", 2);
  check(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride must be two ints >= 1");
  check(part >= 2, "part (", str(part), ") must be at least 2 (part 1 is a standard convolution)");
  const Layer L{B, Cin, H, W, wk.size(0), part, wk.size(2), wk.size(3), stride[0], stride[1]};
  check(B >= 0 && H >= 0 && W >= 0, "negative input size");
  check(Cin % part == 0 && L.Cout % part == 0, "channels (", str(Cin), " in, ", str(L.Cout),
        " out) must be divisible by part (", str(part), ")");
  check(wk.size(1) == Cin / part, "weight_kxk has shape ", shape(wk), ", expected (", str(L.Cout), ", ",
        str(Cin / part), ", kh, kw) for ", str(Cin), " input channels and part ", str(part));
  check(L.kh % 2 == 1 && L.kw % 2 == 1 && L.kh * L.kw <= 49, "kernel ", str(L.kh), "x", str(L.kw),
        " is not an odd size up to 7x7");
  check(w1.size(0) == L.Cout && w1.size(1) == Cin - Cin / part, "weight_1x1 has shape ", shape(w1), ", expected (",
        str(L.Cout), ", ", str(Cin - Cin / part), ")");
  return L;
}

std::vector<int64_t> geo(const Layer& L, bool centre, bool side) {
  return {L.B, L.H, L.W, L.Cin, L.Cout, L.P, L.kh, L.kw, L.sh, L.sw, (int64_t)centre, (int64_t)side};
}

// ---- tiling ------------------------------------------------------------------------------------

// How the OV kernel tiles a pass: nv vectors of output lanes per tile, mr output pixels per tile
// (rw input channels per weight-gradient tile), pp pixels per panel (the run of pixels whose
// input addresses are tabulated). As many vectors per tile as divide the lanes that belong
// together (a group's filters, or all filters for the centre rows alone), up to four on AVX-512
// and two on AVX2; register budget: AVX-512's 32 vector registers hold 24 accumulators, AVX2's 16
// hold 12.
struct Config {
  int nv, mr, rw;
  int64_t pp;
};

Config config(int64_t width, int lanes) {
  const bool wide = lanes == 16;
  if (wide && width % (4 * lanes) == 0) return {4, 6, 6, 256};
  if (width % (2 * lanes) == 0) return {2, wide ? 12 : 6, wide ? 12 : 6, 256};
  return {1, 12, 12, 256};
}

// Whether a layer runs with lanes over groups (GVO) rather than over filters (OV). GVO needs
// groups enough to fill a vector (P >= lanes) and a filter count per group its tiles take (1, 2,
// 3, 6 or a multiple of 4). It wins where a group's filters would leave most OV lanes idle under
// the group masks: measured on VGG-16's layer shapes at batch 32, 0.30-0.79x OV's time at n <= 4,
// 0.87-1.12x at n = 8 (better from P = 64), 1.07-1.32x at n = 16.
bool gv_applies(int64_t n, int64_t part, int lanes) {
  if (part < lanes || !(n == 1 || n == 2 || n == 3 || n == 6 || n % 4 == 0)) return false;
  return n <= 4 || (n <= 8 && part >= 64);
}

// One application of the kernels: the layer (the forward one, or the transposed one of the input
// gradient) at one input size, and how it is tiled.
struct Pass {
  const shc::KernelTable& k;
  Layer L;
  bool gv, direct;
  Config cfg;
  std::vector<int64_t> g;
  int threads;

  // `finite`: whether the weights are all finite (the direct tiling skips the taps outside the
  // image, which the definition multiplies by the zero padding: only equal for finite weights).
  Pass(const shc::KernelTable& k_, const Layer& layer, bool finite)
      : k(k_), L(layer), threads((int)torch::stable::get_num_threads()) {
    gv = gv_applies(L.n(), L.P, k.lanes);
    cfg = config(gv ? L.Cout : L.n(), k.lanes);
    g = geo(L, true, !gv);
    direct = !gv && finite && k.direct_applies(g.data()) != 0;
  }

  // The weights laid out for this pass: OV panels, or GVO centre panels and side taps.
  std::pair<Tensor, Tensor> pack(const Tensor& wk, const Tensor& w1, bool transposed) const {
    const auto sk = strides(wk), s1 = strides(w1);
    if (direct) {
      Tensor panels = empty({k.direct_panel_floats(g.data())});
      k.direct_pack(cptr(wk), sk.data(), cptr(w1), s1.data(), g.data(), transposed, ptr(panels), threads);
      return {panels, Tensor()};
    }
    if (!gv) {
      Tensor panels = empty({k.panel_floats(g.data(), cfg.nv)});
      k.pack(cptr(wk), sk.data(), cptr(w1), s1.data(), g.data(), cfg.nv, transposed, ptr(panels), threads);
      return {panels, Tensor()};
    }
    Tensor panels = empty({k.gvo_panel_floats(g.data())});
    k.gvo_pack(cptr(wk), sk.data(), cptr(w1), s1.data(), g.data(), transposed, ptr(panels), threads);
    Tensor kt = empty({(L.kh * L.kw - 1) * L.Cin * L.n()});
    k.gv_pack(cptr(wk), sk.data(), g.data(), transposed, ptr(kt));
    return {panels, kt};
  }

  // x (NHWC) in the GV layout: per pixel, channel g*b + c' at c'*P + g (x itself when b = 1).
  Tensor gv_layout(const Tensor& x, int64_t channels) const {
    if (channels == L.P) return x;
    Tensor out = empty({x.size(0), x.size(1), x.size(2), x.size(3)}, MemoryFormat::ChannelsLast);
    const int64_t pixels = channels ? x.numel() / channels : 0;
    k.gv_transpose(cptr(x), pixels, channels, L.P, ptr(out), threads);
    return out;
  }

  void run(const Tensor& x, const std::pair<Tensor, Tensor>& weights, const float* bias, const Tensor& y) const {
    const float* panels = cptr(weights.first);
    if (direct) return k.direct_forward(cptr(x), panels, bias, ptr(y), g.data(), threads);
    if (!gv) return k.forward(cptr(x), panels, bias, ptr(y), g.data(), cfg.nv, cfg.mr, cfg.pp, 0, threads);
    const Tensor xt = gv_layout(x, L.Cin);
    k.gvo_forward(cptr(x), cptr(xt), panels, cptr(weights.second), bias, ptr(y), g.data(), cfg.pp, threads);
  }
};

// Whether the side taps' weight gradient runs with lanes over input channels (CT) rather than over
// filters (OV). OV's tile is NV vectors of one group's filters: with one vector (n <= VL) each input
// value it broadcasts feeds one FMA, and a group narrower than a vector leaves lanes idle; CT's
// tile broadcasts filters and loads taps' channel vectors, F*T FMAs per 2T + F loads, its lanes as
// full as the group's input channels fill a vector. Measured on VGG-16's layer shapes (batch 32,
// both interleaved, P = 4 and 16): CT 0.66x OV's time at n = 16, m = 16; 0.74x at n = m = 8; about
// even at n = 32 (0.89-1.07x); 1.1-1.3x at n >= 64 (four vectors per OV tile) and where m < n/2.
bool ct_wins(const shc::KernelTable& k, const Layer& L) {
  const int64_t n = L.n(), m = L.m(), vl = k.lanes;
  const auto g = geo(L, true, false);
  if (!k.ct_applies(g.data())) return false;
  const double m_util = (double)m / (double)(((m + vl - 1) / vl) * vl);
  const double n_util = n >= vl ? (double)n / (double)(((n + vl - 1) / vl) * vl) : (double)n / (double)vl;
  if (n <= vl) return m_util >= n_util;
  return n <= 2 * vl && m >= vl && m_util >= n_util;
}

// Output pixels up to which the forward reads the weights in place (dot products over channels):
// for a few pixels (batch 1, deep layers) laying the weights out costs more than the multiplies.
constexpr int64_t DOT_PIXELS = 64;

// ---- the operators -------------------------------------------------------------------------------

Tensor cpu_forward(Tensor input, Tensor weight_kxk, Tensor weight_1x1, Tensor bias, std::vector<int64_t> stride,
                   int64_t part) {
  check_float_cpu(input, "input", 4);
  const Layer L = check_layer(input.size(0), input.size(1), input.size(2), input.size(3), weight_kxk, weight_1x1,
                              stride, part);
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    check_float_cpu(bias, "bias", 1);
    check(bias.size(0) == L.Cout, "bias has shape ", shape(bias), ", expected (", str(L.Cout), ",)");
  }
  Tensor y = empty({L.B, L.Cout, L.Ho(), L.Wo()}, MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const shc::KernelTable& k = kernels();
  const Tensor x = torch::stable::contiguous(input, MemoryFormat::ChannelsLast);
  const Tensor b = has_bias ? torch::stable::contiguous(bias) : Tensor();
  const float* bp = has_bias ? cptr(b) : nullptr;
  const int64_t pixels = L.B * L.Ho() * L.Wo();
  if (pixels <= DOT_PIXELS && (L.m() == 1 || weight_kxk.stride(1) == 1) &&
      (weight_1x1.size(1) <= 1 || weight_1x1.stride(1) == 1)) {
    // The weights read where they lie: k x k kernels with contiguous input channels (channels-last,
    // as the models keep them), compact rows contiguous.
    const auto g = geo(L, true, true), sk = strides(weight_kxk), s1 = strides(weight_1x1);
    k.dot_forward(cptr(x), cptr(weight_kxk), sk.data(), cptr(weight_1x1), s1.data(), bp, ptr(y), g.data(),
                  (int)torch::stable::get_num_threads());
    return y;
  }
  const Pass pass(k, L, all_finite(k, weight_kxk));
  pass.run(x, pass.pack(weight_kxk, weight_1x1, false), bp, y);
  return y;
}

// The input gradient at stride 1: the forward kernels on the transposed layer (Cout inputs, Cin
// filters, the same part, taps flipped). Returns an empty tensor of shape (0,) where it does not
// compute the call: a weight that is not finite (the transposed pass multiplies the zero padding
// of `grad` by every tap, where the definition has no term; the caller then runs the stock
// formulation).
Tensor cpu_grad_input(Tensor grad, Tensor weight_kxk, Tensor weight_1x1, std::vector<int64_t> input_size,
                      int64_t part) {
  check_float_cpu(grad, "grad", 4);
  check(input_size.size() == 4, "input_size must have 4 entries");
  const Layer F = check_layer(input_size[0], input_size[1], input_size[2], input_size[3], weight_kxk, weight_1x1,
                              {1, 1}, part);
  check(grad.size(0) == F.B && grad.size(1) == F.Cout && grad.size(2) == F.Ho() && grad.size(3) == F.Wo(),
        "grad has shape ", shape(grad), ", expected the output's (", str(F.B), ", ", str(F.Cout), ", ", str(F.Ho()),
        ", ", str(F.Wo()), ")");
  Tensor out = empty(input_size, MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;
  const shc::KernelTable& k = kernels();
  if (!all_finite(k, weight_kxk) || !all_finite(k, weight_1x1)) return empty({0});
  const Tensor dy = torch::stable::contiguous(grad, MemoryFormat::ChannelsLast);
  const Layer T{F.B, F.Cout, F.H, F.W, F.Cin, F.P, F.kh, F.kw, 1, 1};
  const Pass pass(k, T, true);
  pass.run(dy, pass.pack(weight_kxk, weight_1x1, true), nullptr, out);
  return out;
}

// The weight gradients (grad_kxk contiguous, grad_1x1): `dense` is the centre rows' gradient,
// dY^T X over the output pixels at the strided positions (N x M, computed by the caller's BLAS),
// every entry of which is the gradient of an existing weight; the side taps are reduced here.
std::tuple<Tensor, Tensor> cpu_grad_weight(Tensor grad, Tensor input, Tensor dense, std::vector<int64_t> kernel_size,
                                           std::vector<int64_t> stride, int64_t part) {
  check_float_cpu(grad, "grad", 4);
  check_float_cpu(input, "input", 4);
  check_float_cpu(dense, "dense", 2);
  check(kernel_size.size() == 2, "kernel_size must have 2 entries");
  const int64_t Cin = input.size(1), Cout = grad.size(1);
  check(part >= 2 && Cin % part == 0 && Cout % part == 0, "channels (", str(Cin), " in, ", str(Cout),
        " out) must be divisible by part (", str(part), ") >= 2");
  const Tensor wk_shape = empty({Cout, Cin / part, kernel_size[0], kernel_size[1]});
  const Tensor w1_shape = empty({Cout, Cin - Cin / part});
  const Layer L = check_layer(input.size(0), Cin, input.size(2), input.size(3), wk_shape, w1_shape, stride, part);
  check(grad.size(0) == L.B && grad.size(2) == L.Ho() && grad.size(3) == L.Wo(), "grad has shape ", shape(grad),
        ", expected (", str(L.B), ", ", str(Cout), ", ", str(L.Ho()), ", ", str(L.Wo()), ")");
  check(dense.size(0) == Cout && dense.size(1) == Cin, "dense has shape ", shape(dense), ", expected (", str(Cout),
        ", ", str(Cin), ")");
  Tensor gk = empty({Cout, Cin / part, L.kh, L.kw}), g1 = empty({Cout, Cin - Cin / part});
  const shc::KernelTable& k = kernels();
  const int threads = (int)torch::stable::get_num_threads();
  const Tensor d = torch::stable::contiguous(dense);
  const auto centre = geo(L, true, false);
  k.unpack_centre(cptr(d), centre.data(), ptr(gk), ptr(g1), threads);
  if (L.kh * L.kw == 1) return {gk, g1};
  if (L.B * L.Ho() * L.Wo() == 0) {
    torch::stable::zero_(gk);  // no pixel: every gradient is zero (the centre taps came from `dense`)
    torch::stable::zero_(g1);
    return {gk, g1};
  }
  const Tensor x = torch::stable::contiguous(input, MemoryFormat::ChannelsLast);
  const Tensor dy = torch::stable::contiguous(grad, MemoryFormat::ChannelsLast);
  const Pass pass(k, L, true);
  if (pass.gv) {
    const Tensor xt = pass.gv_layout(x, Cin), dyt = pass.gv_layout(dy, Cout);
    const int64_t total = (L.kh * L.kw - 1) * Cin * L.n();
    Tensor gkt = empty({total}), work = empty({total * threads});
    k.gv_wgrad(cptr(xt), cptr(dyt), ptr(gkt), pass.g.data(), pass.cfg.pp, ptr(work), threads);
    k.gv_unpack(cptr(gkt), pass.g.data(), ptr(gk));
    return {gk, g1};
  }
  if (ct_wins(k, L)) {
    Tensor work = empty({k.ct_work_floats(pass.g.data(), threads)});
    k.ct_wgrad(cptr(x), cptr(dy), ptr(gk), pass.g.data(), pass.cfg.pp, ptr(work), threads);
    return {gk, g1};
  }
  const auto side = geo(L, false, true);
  const Config& cfg = pass.cfg;
  Tensor panel = empty({k.panel_floats(side.data(), cfg.nv)});
  Tensor work;
  if (k.wgrad_needs_work(side.data(), cfg.nv, threads)) work = empty({panel.numel() * threads});
  k.wgrad(cptr(x), cptr(dy), ptr(panel), side.data(), cfg.nv, cfg.rw, cfg.pp, work.defined() ? ptr(work) : nullptr,
          threads);
  k.unpack_side(cptr(panel), side.data(), cfg.nv, ptr(gk), threads);
  return {gk, g1};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(sparse_hetconv, m) {
  m.def("_cpu_kernel_isa() -> str");
  m.def("_cpu_forward(Tensor input, Tensor weight_kxk, Tensor weight_1x1, Tensor bias, int[] stride, int part) -> Tensor");
  m.def("_cpu_grad_input(Tensor grad, Tensor weight_kxk, Tensor weight_1x1, int[] input_size, int part) -> Tensor");
  m.def("_cpu_grad_weight(Tensor grad, Tensor input, Tensor dense, int[] kernel_size, int[] stride, int part) "
        "-> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(sparse_hetconv, CompositeExplicitAutograd, m) {
  m.impl("_cpu_kernel_isa", TORCH_BOX(&kernel_isa));
}

STABLE_TORCH_LIBRARY_IMPL(sparse_hetconv, CPU, m) {
  m.impl("_cpu_forward", TORCH_BOX(&cpu_forward));
  m.impl("_cpu_grad_input", TORCH_BOX(&cpu_grad_input));
  m.impl("_cpu_grad_weight", TORCH_BOX(&cpu_grad_weight));
}
