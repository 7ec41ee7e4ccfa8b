// The interface between the operator layer (ops.cpp, compiled for any x86-64 CPU) and the kernels
// of one instruction set (kernels.h, compiled once per ISA). Plain pointers and a table of
// functions: nothing here is a template or an inline function, so the ISA translation units share
// no code with the rest of the library.
//
// `g` is a layer's geometry, 12 int64: batch, H, W, Cin, Cout, P, kh, kw, sh, sw, and whether OV
// panels hold the centre rows and the side-tap rows. Activations are NHWC float32, contiguous.
// `sk`/`s1` are the element strides of the forward layer's weight_kxk (N, m, kh, kw) and compact
// weight_1x1 (N, M - m). `transposed`: the pass of the input gradient (g then describes the
// transposed layer, a HetConv of Cout inputs and Cin filters with flipped taps).
#pragma once

#include <cstdint>

namespace shc {

// Runs fn(begin, end, ctx) over a split of [0, n) on the caller's thread pool.
using RangeFn = void (*)(int64_t begin, int64_t end, void* ctx);
using ParallelFn = void (*)(int64_t n, RangeFn fn, void* ctx);
// Raises an error in the caller (throws; never returns).
using FailFn = void (*)(const char* what);

struct KernelTable {
  int lanes;  // float32 lanes per vector: 16 (AVX-512) or 8 (AVX2)
  bool (*all_finite)(const float* p, int64_t n);
  // OV: lanes over filters.
  int64_t (*panel_floats)(const int64_t* g, int nv);
  void (*pack)(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1, const int64_t* g, int nv,
               int transposed, float* out, int nthreads);
  void (*forward)(const float* x, const float* panels, const float* bias, float* y, const int64_t* g, int nv, int mr,
                  int64_t pp, int accumulate, int nthreads);
  int (*wgrad_needs_work)(const int64_t* g, int nv, int nthreads);
  void (*wgrad)(const float* x, const float* dy, float* grad, const int64_t* g, int nv, int rw, int64_t pp,
                float* work, int nthreads);
  void (*unpack_side)(const float* grad, const int64_t* g, int nv, float* gk, int nthreads);
  void (*unpack_centre)(const float* dense, const int64_t* g, float* gk, float* g1, int nthreads);
  // Direct: OV with the side taps by input column (stride 1).
  int (*direct_applies)(const int64_t* g);
  int64_t (*direct_panel_floats)(const int64_t* g);
  void (*direct_pack)(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1, const int64_t* g,
                      int transposed, float* out, int nthreads);
  void (*direct_forward)(const float* x, const float* panels, const float* bias, float* y, const int64_t* g,
                         int nthreads);
  // Dot: a few output pixels, the weights read in place.
  void (*dot_forward)(const float* x, const float* wk, const int64_t* sk, const float* w1, const int64_t* s1,
                      const float* bias, float* y, const int64_t* g, int nthreads);
  // GV / GVO: lanes over groups.
  void (*gv_transpose)(const float* x, int64_t pixels, int64_t C, int64_t P, float* out, int nthreads);
  void (*gv_pack)(const float* wk, const int64_t* sk, const int64_t* g, int transposed, float* kt);
  int64_t (*gvo_panel_floats)(const int64_t* g);
  void (*gvo_pack)(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1, const int64_t* g,
                   int transposed, float* out, int nthreads);
  void (*gvo_forward)(const float* x, const float* xt, const float* panels, const float* kt, const float* bias,
                      float* y, const int64_t* g, int64_t pp, int nthreads);
  void (*gv_wgrad)(const float* xt, const float* dyt, float* gkt, const int64_t* g, int64_t pp, float* work,
                   int nthreads);
  void (*gv_unpack)(const float* gkt, const int64_t* g, float* gk);
  // CT: the side taps' weight gradient with lanes over a group's input channels.
  int (*ct_applies)(const int64_t* g);
  int64_t (*ct_work_floats)(const int64_t* g, int nthreads);
  void (*ct_wgrad)(const float* x, const float* dy, float* gk, const int64_t* g, int64_t pp, float* work,
                   int nthreads);
};

}  // namespace shc

// The kernels of each build (defined only where the build exists: x86-64).
const shc::KernelTable* shc_kernels_avx512(shc::ParallelFn parallel, shc::FailFn fail);
const shc::KernelTable* shc_kernels_avx2(shc::ParallelFn parallel, shc::FailFn fail);
