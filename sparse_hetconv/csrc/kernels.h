// The CPU kernels of sparse_hetconv's `het_conv2d` operator: a HetConv layer computed over only the
// kernels that exist, as implicit GEMMs that read the activations where they lie.
//
// HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. See docs/design.md §11.
//
// Layer (block pattern): Cin input channels in P blocks of m, Cout filters in P groups of n.
// Filter j (group g = j / n) has k x k kernels K[j][c'][t] on channels g*m + c' and 1 x 1 kernels
// on every other channel. Folding (design §4) puts the centre taps of K into the dense
// Cin x Cout matrix of the 1 x 1 part:
//
//     Wf[c][j] = K[j][c - g*m][centre]       for c in block g
//              = w1[j][c < g*m ? c : c - m]  otherwise (the compact 1 x 1 values)
//
// so every entry of Wf is a weight that exists, and
//
//     y[p][j] = bias[j] + sum_c x[p][c] Wf[c][j]                                  ("centre")
//                       + sum_{t != centre} sum_c' x[p + t][g*m + c'] K[j][c'][t]   ("side taps")
//
// multiplies exactly the N (k^2 m + M - m) useful weights per output pixel: no zero, no mask.
// Taps that fall outside the image read zeros, as the definition's zero padding does (so an inf
// weight there gives NaN, in every tiling).
//
// Two ways to tile it, both over NHWC float32 activations:
//
// * Lanes = filters ("OV"). The weights are packed per call into panels of NR = NV * VL output
//   lanes ("chunks"): for chunk q, the Cin centre rows of Wf, then, for each group the chunk
//   touches, (T - 1) * m rows of its side taps. The microkernel keeps an MR pixels x NR lanes tile
//   of accumulators in registers and runs down the panel rows; each row broadcasts one input
//   value per pixel (read straight from the activation, or from a zero row outside the image) and
//   multiplies it with the row's NR weights. A chunk spanning several groups (n < NR) applies each
//   group's side taps under a lane mask, so a lane never sees another group's kernel (not even
//   0 * inf): efficient when a group fills the chunk.
// * Lanes = groups ("GV", for the side taps of narrow groups, n < VL): one vector holds VL groups'
//   values of one (channel, filter) position. The input is first transposed within each pixel to
//   [c'][g] order (one pass), so a vector load reads VL groups' channel c'; a tile of MR pixels x n
//   filters accumulates over the (T - 1) m side-tap rows, then is transposed back into the
//   filters' order and added to the output. The centre part then runs as OV panels without side
//   rows (a dense GEMM, chunks spanning groups freely).
//
// The weight gradient of the side taps is the same sum read the other way (a reduction over
// pixels, in either tiling); the centre rows' gradient is one dense product X^T dY (BLAS, by the
// caller), split here into the compact 1 x 1 gradient and the centre taps' (unpack_centre). The
// input gradient at stride 1 is the forward of the transposed layer, again a HetConv (Cout inputs,
// Cin filters, the same P, taps flipped): `transposed` packing.
//
// This header is compiled once per instruction set (kernels_avx512.cpp: 16-lane vectors,
// kernels_avx2.cpp: 8 lanes), each with its own compiler flags; ops.cpp picks one at run time
// from the CPU's own feature test. Everything here lives in an anonymous namespace and every
// container has an allocator type of this translation unit, so no function compiled with one
// ISA's instructions can be merged with a same-named one of another translation unit (which the
// linker would otherwise be free to pick for a CPU without those instructions); the only external
// symbol is the table getter at the end. Threads: the caller's pool (PyTorch's parallel_for),
// reached through the function pointer it hands over.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "kernels_api.h"

#if defined(SHC_AVX512)
#define SHC_TABLE shc_kernels_avx512
#elif defined(SHC_AVX2)
#define SHC_TABLE shc_kernels_avx2
#else
#error "define SHC_AVX512 or SHC_AVX2"
#endif

namespace {

#if defined(SHC_AVX512)
struct V {
  typedef __m512 t;
  typedef __mmask16 m;
  typedef __m512i idx;
  static constexpr int L = 16;
  static inline t zero() { return _mm512_setzero_ps(); }
  static inline t load(const float* p) { return _mm512_loadu_ps(p); }
  static inline t loadm(const float* p, m k) { return _mm512_maskz_loadu_ps(k, p); }
  static inline void store(float* p, t v) { _mm512_storeu_ps(p, v); }
  static inline void storem(float* p, t v, m k) { _mm512_mask_storeu_ps(p, k, v); }
  static inline t set1(float x) { return _mm512_set1_ps(x); }
  static inline t fma(t a, t b, t c) { return _mm512_fmadd_ps(a, b, c); }
  static inline t fmam(t a, t b, t c, m k) { return _mm512_mask3_fmadd_ps(a, b, c, k); }
  static inline t add(t a, t b) { return _mm512_add_ps(a, b); }
  static inline float sum(t a) { return _mm512_reduce_add_ps(a); }
  static inline idx index(const int32_t* v) { return _mm512_loadu_si512(v); }
  static inline t gather(const float* base, idx i) { return _mm512_i32gather_ps(i, base, 4); }
  // a[o] (lanes = groups) -> out[c] (lanes = (group, o) pairs, o fastest), for 2 or 4 vectors.
  static inline void interleave(const t* a, int no, t* out) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    if (no == 2) {
      out[0] = _mm512_permutex2var_ps(a[0], lo, a[1]);
      out[1] = _mm512_permutex2var_ps(a[0], hi, a[1]);
      return;
    }
    const __m512i lo64 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), hi64 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    const __m512d l01 = _mm512_castps_pd(_mm512_permutex2var_ps(a[0], lo, a[1]));
    const __m512d h01 = _mm512_castps_pd(_mm512_permutex2var_ps(a[0], hi, a[1]));
    const __m512d l23 = _mm512_castps_pd(_mm512_permutex2var_ps(a[2], lo, a[3]));
    const __m512d h23 = _mm512_castps_pd(_mm512_permutex2var_ps(a[2], hi, a[3]));
    out[0] = _mm512_castpd_ps(_mm512_permutex2var_pd(l01, lo64, l23));
    out[1] = _mm512_castpd_ps(_mm512_permutex2var_pd(l01, hi64, l23));
    out[2] = _mm512_castpd_ps(_mm512_permutex2var_pd(h01, lo64, h23));
    out[3] = _mm512_castpd_ps(_mm512_permutex2var_pd(h01, hi64, h23));
  }
  static constexpr bool has_interleave = true;
  // r[i] = row i of a 16 x 16 tile -> r[i] = column i.
  static inline void transpose(t* r) {
    t a[16];
    for (int i = 0; i < 16; i += 2) {
      a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
      for (int k = 0; k < 2; ++k) {
        const __m512d x = _mm512_castps_pd(a[i + k]), y = _mm512_castps_pd(a[i + k + 2]);
        r[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
        r[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
      }
    for (int i = 0; i < 16; i += 8)
      for (int k = 0; k < 4; ++k) {
        a[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
        a[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
      }
    for (int k = 0; k < 8; ++k) {
      r[k] = _mm512_shuffle_f32x4(a[k], a[k + 8], 0x88);
      r[k + 8] = _mm512_shuffle_f32x4(a[k], a[k + 8], 0xdd);
    }
  }
  static inline m lanes(int lo, int hi) {  // lanes [lo, hi) of [0, L)
    lo = std::max(lo, 0);
    hi = std::min(hi, L);
    if (hi <= lo) return (m)0;
    const unsigned below_hi = hi >= 16 ? 0xFFFFu : ((1u << hi) - 1u);
    const unsigned below_lo = (1u << lo) - 1u;
    return (m)(below_hi & ~below_lo);
  }
};
#else
struct V {
  typedef __m256 t;
  typedef __m256i m;
  typedef __m256i idx;
  static constexpr int L = 8;
  static inline t zero() { return _mm256_setzero_ps(); }
  static inline t load(const float* p) { return _mm256_loadu_ps(p); }
  static inline t loadm(const float* p, m k) { return _mm256_maskload_ps(p, k); }
  static inline void store(float* p, t v) { _mm256_storeu_ps(p, v); }
  static inline void storem(float* p, t v, m k) { _mm256_maskstore_ps(p, k, v); }
  static inline t set1(float x) { return _mm256_set1_ps(x); }
  static inline t fma(t a, t b, t c) { return _mm256_fmadd_ps(a, b, c); }
  static inline t fmam(t a, t b, t c, m k) {
    return _mm256_blendv_ps(c, _mm256_fmadd_ps(a, b, c), _mm256_castsi256_ps(k));
  }
  static inline t add(t a, t b) { return _mm256_add_ps(a, b); }
  static inline float sum(t a) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  }
  static inline idx index(const int32_t* v) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)); }
  static inline t gather(const float* base, idx i) { return _mm256_i32gather_ps(base, i, 4); }
  static inline void interleave(const t*, int, t*) {}
  static constexpr bool has_interleave = false;
  // r[i] = row i of an 8 x 8 tile -> r[i] = column i.
  static inline void transpose(t* r) {
    t a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
      a[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      a[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      b[i] = _mm256_shuffle_ps(a[i], a[i + 2], 0x44);
      b[i + 1] = _mm256_shuffle_ps(a[i], a[i + 2], 0xEE);
      b[i + 2] = _mm256_shuffle_ps(a[i + 1], a[i + 3], 0x44);
      b[i + 3] = _mm256_shuffle_ps(a[i + 1], a[i + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm256_permute2f128_ps(b[k], b[k + 4], 0x20);
      r[k + 4] = _mm256_permute2f128_ps(b[k], b[k + 4], 0x31);
    }
  }
  static inline m lanes(int lo, int hi) {
    alignas(32) int32_t v[8];
    for (int i = 0; i < 8; ++i) v[i] = (i >= lo && i < hi) ? -1 : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
  }
};
#endif

typedef V::t vec;
typedef V::m vmask;

// std::vector with an allocator of this translation unit (see the header comment).
template <class T>
struct LocalAllocator {
  using value_type = T;
  LocalAllocator() = default;
  template <class U>
  LocalAllocator(const LocalAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(alignof(T)))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(alignof(T))); }
  bool operator==(const LocalAllocator&) const { return true; }
  bool operator!=(const LocalAllocator&) const { return false; }
};
template <class T>
using Array = std::vector<T, LocalAllocator<T>>;

// ---- threads and errors: the caller's ----------------------------------------------------------

shc::ParallelFn g_parallel = nullptr;
shc::FailFn g_fail = nullptr;

int threads_for(int64_t items, int nthreads) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, items));
}

// f(t) for t in [0, tasks), each task on one thread of the caller's pool (fewer threads run
// several tasks in turn).
template <class F>
void tasks(int64_t ntasks, const F& f) {
  if (ntasks <= 1) {
    if (ntasks == 1) f((int64_t)0);
    return;
  }
  g_parallel(
      ntasks,
      [](int64_t begin, int64_t end, void* ctx) {
        const F& fn = *static_cast<const F*>(ctx);
        for (int64_t t = begin; t < end; ++t) fn(t);
      },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// The items [lo, hi) of task t when n items are split statically among nt tasks.
inline void slice(int64_t t, int nt, int64_t n, int64_t& lo, int64_t& hi) {
  lo = n * t / nt;
  hi = n * (t + 1) / nt;
}

// f(i) for i in [0, n): a static split over at most `nthreads` threads.
template <class F>
void pfor(int64_t n, int nthreads, const F& f) {
  const int nt = threads_for(n, nthreads);
  tasks(nt, [&](int64_t t) {
    int64_t lo, hi;
    slice(t, nt, n, lo, hi);
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
}

// f(i) for i in [0, n), handed out one at a time (for items of uneven cost).
template <class F>
void pfor_dynamic(int64_t n, int nthreads, const F& f) {
  std::atomic<int64_t> next(0);
  tasks(threads_for(n, nthreads), [&](int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
  });
}

// A tile configuration with no code (the planner in ops.cpp never asks for one): an error, not a crash.
template <class Fn>
Fn checked(Fn f, const char* what) {
  if (f == nullptr) g_fail(what);
  return f;
}

// ---- geometry ------------------------------------------------------------------------------

// The layer as the kernels see it. For the input gradient, the transposed layer (Cin = N,
// Cout = M, stride 1) is described the same way. `centre` and `side`: whether OV panels hold
// the centre rows and the side-tap rows.
struct Geo {
  int64_t B, H, W, Cin, Cout, P, kh, kw, sh, sw, Ho, Wo;
  bool centre, side;
  int64_t m() const { return Cin / P; }
  int64_t n() const { return Cout / P; }
  int64_t T() const { return kh * kw; }
  int64_t centre_tap() const { return (kh / 2) * kw + kw / 2; }
  int64_t pixels() const { return B * Ho * Wo; }
};

Geo read_geo(const int64_t* g) {
  Geo o;
  o.B = g[0]; o.H = g[1]; o.W = g[2]; o.Cin = g[3]; o.Cout = g[4]; o.P = g[5];
  o.kh = g[6]; o.kw = g[7]; o.sh = g[8]; o.sw = g[9];
  o.centre = g[10] != 0;
  o.side = g[11] != 0;
  o.Ho = o.H > 0 ? (o.H - 1) / o.sh + 1 : 0;  // (an empty input has no output pixel)
  o.Wo = o.W > 0 ? (o.W - 1) / o.sw + 1 : 0;
  return o;
}

// The side taps (all but the centre) in row-major order.
Array<int64_t> side_taps(const Geo& geo) {
  Array<int64_t> taps;
  for (int64_t t = 0; t < geo.T(); ++t)
    if (t != geo.centre_tap()) taps.push_back(t);
  return taps;
}

// One OV chunk: output lanes [j0, j1) of width <= NR, touching groups g0 .. g0 + G - 1.
struct Chunk {
  int64_t j0, j1, g0, G, offset, rows;  // offset: float index of its panel; rows: panel rows
};

Array<Chunk> plan(const Geo& geo, int NR) {
  Array<Chunk> chunks;
  const int64_t n = geo.n(), m = geo.m(), ntaps = geo.T() - 1;
  int64_t offset = 0;
  for (int64_t j0 = 0; j0 < geo.Cout; j0 += NR) {
    Chunk c;
    c.j0 = j0;
    c.j1 = std::min<int64_t>(j0 + NR, geo.Cout);
    c.g0 = j0 / n;
    c.G = (c.j1 - 1) / n - c.g0 + 1;
    c.rows = (geo.centre ? geo.Cin : 0) + (geo.side ? c.G * ntaps * m : 0);
    c.offset = offset;
    offset += c.rows * NR;
    chunks.push_back(c);
  }
  return chunks;
}

int64_t panel_floats(const Geo& geo, int NR) {
  const auto chunks = plan(geo, NR);
  return chunks.empty() ? 0 : chunks.back().offset + chunks.back().rows * NR;
}

// ---- weight packing --------------------------------------------------------------------------

// Strided views of the FORWARD layer's parameters: wk[j][c'][dy][dx] (N x m x kh x kw) and
// w1[j][i] (N x (M - m)).
struct Weights {
  const float* wk;
  int64_t sk[4];
  const float* w1;
  int64_t s1[2];
  int64_t M, N, P, kw, centre;
  int64_t toff(int64_t t) const { return (t / kw) * sk[2] + (t % kw) * sk[3]; }
};

Weights read_weights(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1, const Geo& geo,
                     bool transposed) {
  Weights w;
  w.wk = wk;
  w.w1 = w1;
  for (int i = 0; i < 4; ++i) w.sk[i] = sk[i];
  for (int i = 0; i < 2; ++i) w.s1[i] = s1[i];
  w.M = transposed ? geo.Cout : geo.Cin;
  w.N = transposed ? geo.Cin : geo.Cout;
  w.P = geo.P;
  w.kw = geo.kw;
  w.centre = geo.centre_tap();
  return w;
}

// The centre rows Wf[r][.] of a panel whose lane l holds the packed layer's filter filter[l] (-1:
// none, left as it is): rows = forward input channels (forward) or forward filters (transposed),
// `ld` floats apart. Forward lanes are filled in blocks of 16 rows, so each lane's reads stay on
// one line of its row while the block's rows stay in cache; transposed rows are contiguous reads.
void fill_centre(const Weights& w, bool transposed, const int64_t* filter, int64_t width, float* dst, int64_t ld) {
  const int64_t M = w.M, N = w.N, m = M / w.P, n = N / w.P, centre = w.toff(w.centre);
  const int64_t s1 = w.s1[1], sk1 = w.sk[1];
  if (!transposed && s1 == 1 && (sk1 == 1 || m == 1)) {
    // Channel runs are contiguous in the weights: VL lanes x VL channels at a time, each lane's run
    // loaded as a vector (or gathered where it straddles its block's edge), transposed in registers.
    alignas(64) float tmp[V::L];
    for (int64_t l0 = 0; l0 < width; l0 += V::L)
      for (int64_t c0 = 0; c0 < M; c0 += V::L) {
        const int nc = (int)std::min<int64_t>(V::L, M - c0);
        vec rows[V::L];
        for (int l = 0; l < V::L; ++l) {
          const int64_t j = l0 + l < width ? filter[l0 + l] : -1;
          if (j < 0) {
            rows[l] = V::zero();
            continue;
          }
          const int64_t lo = (j / n) * m;
          const float* r1 = w.w1 + j * w.s1[0];
          const float* k1 = w.wk + j * w.sk[0] + centre;
          const vmask k = V::lanes(0, nc);
          if (c0 + nc <= lo) {
            rows[l] = V::loadm(r1 + c0, k);
          } else if (c0 >= lo && c0 + nc <= lo + m) {
            rows[l] = V::loadm(k1 + (c0 - lo), k);
          } else if (c0 >= lo + m) {
            rows[l] = V::loadm(r1 + (c0 - m), k);
          } else {
            for (int i = 0; i < V::L; ++i) {
              const int64_t c = c0 + i;
              tmp[i] = i >= nc ? 0.f : c < lo ? r1[c] : c < lo + m ? k1[c - lo] : r1[c - m];
            }
            rows[l] = V::load(tmp);
          }
        }
        V::transpose(rows);
        const vmask lanes = V::lanes(0, (int)std::min<int64_t>(V::L, width - l0));
        for (int i = 0; i < nc; ++i) V::storem(dst + (c0 + i) * ld + l0, rows[i], lanes);
      }
    return;
  }
  if (!transposed) {
    for (int64_t c0 = 0; c0 < M; c0 += 16) {
      const int64_t c1 = std::min<int64_t>(M, c0 + 16);
      for (int64_t l = 0; l < width; ++l) {
        const int64_t j = filter[l];
        if (j < 0) continue;
        const int64_t lo = (j / n) * m;
        const float* r1 = w.w1 + j * w.s1[0];
        const float* k1 = w.wk + j * w.sk[0] + centre;
        for (int64_t c = c0; c < c1; ++c)
          dst[c * ld + l] = c < lo ? r1[c * s1] : c < lo + m ? k1[(c - lo) * sk1] : r1[(c - m) * s1];
      }
    }
    return;
  }
  bool consecutive = width > 0 && filter[0] >= 0;
  for (int64_t l = 1; l < width && consecutive; ++l) consecutive = filter[l] == filter[0] + l;
  for (int64_t jf = 0; jf < N; ++jf) {
    float* row = dst + jf * ld;
    const int64_t lo = (jf / n) * m;
    const float* k1 = w.wk + jf * w.sk[0] + centre;
    const float* r1 = w.w1 + jf * w.s1[0];
    const int64_t c0 = filter[0];
    if (s1 == 1 && (sk1 == 1 || m == 1) && consecutive) {
      // consecutive channels: at most three contiguous runs (before, inside, after the block)
      const int64_t c1 = c0 + width, a = std::min(c1, std::max(c0, lo)), b = std::min(c1, std::max(c0, lo + m));
      if (a > c0) std::memcpy(row, r1 + c0, sizeof(float) * (a - c0));
      if (b > a) std::memcpy(row + (a - c0), k1 + (a - lo), sizeof(float) * (b - a));
      if (c1 > b) std::memcpy(row + (b - c0), r1 + (b - m), sizeof(float) * (c1 - b));
      continue;
    }
    for (int64_t l = 0; l < width; ++l) {
      const int64_t c = filter[l];
      if (c < 0) continue;
      row[l] = c < lo ? r1[c * s1] : c < lo + m ? k1[(c - lo) * sk1] : r1[(c - m) * s1];
    }
  }
}

// OV panels of `geo` (the forward layer, or with `transposed` the layer of the input gradient,
// whose filter c reads the forward layer's outputs j with flipped taps). Written row by row
// (each row is NR contiguous lanes); the rows of consecutive lanes are read side by side.
void pack(const Weights& w, const Geo& geo, int NR, bool transposed, float* out, int nthreads) {
  const auto chunks = plan(geo, NR);
  const auto taps = side_taps(geo);
  const int64_t T = geo.T(), ntaps = (int64_t)taps.size();
  const int64_t M = w.M, N = w.N, m = M / w.P, n = N / w.P;  // the forward layer's sizes
  pfor_dynamic((int64_t)chunks.size(), nthreads, [&](int64_t q) {
    const Chunk& ch = chunks[q];
    float* dst = out + ch.offset;
    const int64_t width = ch.j1 - ch.j0, gm = geo.m(), gn = geo.n();
    // Lanes no filter of the chunk fills (a partial chunk, or another group's side taps) hold zeros.
    if (width < NR || (geo.side && ch.G > 1)) std::memset(dst, 0, sizeof(float) * ch.rows * NR);
    float* side = dst + (geo.centre ? geo.Cin * NR : 0);
    if (geo.centre) {
      Array<int64_t> filter(width);
      for (int64_t l = 0; l < width; ++l) filter[l] = ch.j0 + l;
      fill_centre(w, transposed, filter.data(), width, dst, NR);
    }
    if (!geo.side) return;
    for (int64_t gi = 0; gi < ch.G; ++gi) {
      const int64_t g = ch.g0 + gi, l0 = std::max<int64_t>(0, g * gn - ch.j0), l1 = std::min(width, (g + 1) * gn - ch.j0);
      for (int64_t s = 0; s < ntaps; ++s) {
        if (!transposed && (w.sk[1] == 1 || m == 1)) {
          // Each lane's channels are contiguous at a tap: VL x VL tiles transposed in registers.
          const int64_t tk = w.toff(taps[s]);
          float* rows0 = side + (gi * ntaps + s) * m * NR;
          for (int64_t b0 = l0 - l0 % V::L; b0 < l1; b0 += V::L)
            for (int64_t c0 = 0; c0 < m; c0 += V::L) {
              const int nc = (int)std::min<int64_t>(V::L, m - c0);
              vec rows[V::L];
              for (int l = 0; l < V::L; ++l) {
                const int64_t lane = b0 + l;
                rows[l] = lane < l0 || lane >= l1 ? V::zero()
                                                  : V::loadm(w.wk + (ch.j0 + lane) * w.sk[0] + c0 + tk, V::lanes(0, nc));
              }
              V::transpose(rows);
              const vmask lanes = V::lanes((int)(l0 - b0), (int)(l1 - b0));
              for (int i = 0; i < nc; ++i) V::storem(rows0 + (c0 + i) * NR + b0, rows[i], lanes);
            }
        } else if (!transposed) {
          const int64_t tk = w.toff(taps[s]);
          for (int64_t c = 0; c < m; ++c) {
            float* row = side + ((gi * ntaps + s) * m + c) * NR;
            for (int64_t l = l0; l < l1; ++l) row[l] = w.wk[(ch.j0 + l) * w.sk[0] + c * w.sk[1] + tk];
          }
        } else {
          // Rows: forward filters g*n + jj of block g's readers; lanes: channels of block g; taps flipped.
          const int64_t tk = w.toff(T - 1 - taps[s]);
          for (int64_t jj = 0; jj < gm; ++jj) {
            float* row = side + ((gi * ntaps + s) * gm + jj) * NR;
            const float* k = w.wk + (g * n + jj) * w.sk[0] + tk;
            if (w.sk[1] == 1) {
              std::memcpy(row + l0, k + (ch.j0 + l0 - g * m), sizeof(float) * (l1 - l0));
              continue;
            }
            for (int64_t l = l0; l < l1; ++l) row[l] = k[(ch.j0 + l - g * m) * w.sk[1]];
          }
        }
      }
    }
  });
}

// ---- pixel tables ----------------------------------------------------------------------------

// For a run of output pixels [p0, p0 + np): per tap row r (row 0 the centre, then the side taps
// in order) the address of the pixel's input channel 0, or of a zero row outside the image.
void fill_table(const Geo& geo, const float* x, const float* zeros, int64_t p0, int64_t np,
                const Array<int64_t>& taps, const float** tab, int64_t ld) {
  const int64_t HoWo = geo.Ho * geo.Wo, ph = geo.kh / 2, pw = geo.kw / 2;
  const int64_t nrows = (int64_t)taps.size() + 1;
  int64_t dy[64], dx[64];  // kernels of up to 64 taps (the package checks)
  for (int64_t row = 0; row < nrows; ++row) {
    const int64_t t = row == 0 ? geo.centre_tap() : taps[row - 1];
    dy[row] = t / geo.kw - ph;
    dx[row] = t % geo.kw - pw;
  }
  int64_t b = p0 / HoWo, ho = (p0 % HoWo) / geo.Wo, wo = p0 % geo.Wo;
  for (int64_t i = 0; i < np; ++i) {
    const int64_t h0 = ho * geo.sh, w0 = wo * geo.sw;
    const float* image = x + b * geo.H * geo.W * geo.Cin;
    for (int64_t row = 0; row < nrows; ++row) {
      const int64_t hi = h0 + dy[row], wi = w0 + dx[row];
      const bool inside = hi >= 0 && hi < geo.H && wi >= 0 && wi < geo.W;
      tab[row * ld + i] = inside ? image + (hi * geo.W + wi) * geo.Cin : zeros;
    }
    if (++wo == geo.Wo) {
      wo = 0;
      if (++ho == geo.Ho) {
        ho = 0;
        ++b;
      }
    }
  }
}

// One run of panel rows: table row, channel offset added to the pixel's address, length, and the
// group (local to the chunk) whose lanes it may touch, or -1 for all lanes.
struct Seg {
  int32_t row, off, len, group;
};

Array<Seg> segments(const Geo& geo, const Chunk& ch) {
  Array<Seg> segs;
  if (geo.centre) segs.push_back({0, 0, (int32_t)geo.Cin, -1});
  if (!geo.side) return segs;
  const int64_t m = geo.m(), ntaps = geo.T() - 1;
  for (int64_t gi = 0; gi < ch.G; ++gi)
    for (int64_t s = 0; s < ntaps; ++s)
      segs.push_back({(int32_t)(s + 1), (int32_t)((ch.g0 + gi) * m), (int32_t)m, (int32_t)(ch.G > 1 ? gi : -1)});
  return segs;
}

// Lane masks of a chunk: the tail (lanes < j1 - j0) and, per local group, its lanes.
void chunk_masks(const Geo& geo, const Chunk& ch, int NV, vmask* tail, vmask* gmask) {
  const int64_t n = geo.n();
  for (int v = 0; v < NV; ++v) tail[v] = V::lanes(0, (int)(ch.j1 - ch.j0 - v * V::L));
  for (int64_t gi = 0; gi < ch.G; ++gi) {
    const int64_t lo = (ch.g0 + gi) * n - ch.j0, hi = lo + n;
    for (int v = 0; v < NV; ++v) gmask[gi * NV + v] = V::lanes((int)(lo - v * V::L), (int)(hi - v * V::L));
  }
}

constexpr int MAX_MR = 12;

// ---- OV forward microkernel ------------------------------------------------------------------

// acc[MR][NV] over the rows of one chunk's panel, then stored (or added) to out[i * ldo + lane].
template <int MR, int NV>
void forward_tile(const Seg* segs, int nseg, const float* const* tab, int64_t ld, const float* panel,
                  float* out, int64_t ldo, const float* bias, bool accumulate, const vmask* tail,
                  const vmask* gmask) {
  vec acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const vec b = bias ? V::loadm(bias + v * V::L, tail[v]) : V::zero();
    for (int i = 0; i < MR; ++i) acc[i][v] = b;
  }
  for (int s = 0; s < nseg; ++s) {
    const Seg sg = segs[s];
    const float* p[MR];
    for (int i = 0; i < MR; ++i) p[i] = tab[sg.row * ld + i] + sg.off;
    if (sg.group < 0) {
      for (int c = 0; c < sg.len; ++c) {
        vec w[NV];
        for (int v = 0; v < NV; ++v) w[v] = V::load(panel + v * V::L);
        panel += NV * V::L;
        for (int i = 0; i < MR; ++i) {
          const vec xb = V::set1(p[i][c]);
          for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(xb, w[v], acc[i][v]);
        }
      }
    } else {
      const vmask* gm = gmask + sg.group * NV;
      for (int c = 0; c < sg.len; ++c) {
        vec w[NV];
        for (int v = 0; v < NV; ++v) w[v] = V::load(panel + v * V::L);
        panel += NV * V::L;
        for (int i = 0; i < MR; ++i) {
          const vec xb = V::set1(p[i][c]);
          for (int v = 0; v < NV; ++v) acc[i][v] = V::fmam(xb, w[v], acc[i][v], gm[v]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* o = out + i * ldo;
    for (int v = 0; v < NV; ++v) {
      vec r = acc[i][v];
      if (accumulate) r = V::add(r, V::loadm(o + v * V::L, tail[v]));
      V::storem(o + v * V::L, r, tail[v]);
    }
  }
}

typedef void (*forward_fn)(const Seg*, int, const float* const*, int64_t, const float*, float*, int64_t,
                           const float*, bool, const vmask*, const vmask*);

template <int NV, int MR = 1>
forward_fn forward_pick(int mr) {
  if constexpr (MR > MAX_MR) {
    return nullptr;
  } else {
    return mr == MR ? forward_tile<MR, NV> : forward_pick<NV, MR + 1>(mr);
  }
}

forward_fn forward_kernel(int nv, int mr) {
  switch (nv) {
    case 1: return forward_pick<1>(mr);
    case 2: return forward_pick<2>(mr);
#if defined(SHC_AVX512)
    case 4: return forward_pick<4>(mr);
#endif
  }
  return nullptr;
}

// ---- OV weight-gradient microkernel ----------------------------------------------------------

// acc[R][NV] = sum over pixels i of x[tab[row][i] + off + r] * dy[i][lanes]; added to g[r][lanes].
template <int R, int NV>
void wgrad_tile(const float* const* tabrow, int off, int64_t np, const float* dy, int64_t ldd,
                const vmask* tail, float* g, int NR) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  vmask tl[NV];
  for (int v = 0; v < NV; ++v) tl[v] = tail[v];
  int64_t i = 0;
  do {  // np >= 1 (a do-while keeps GCC from shadowing the accumulators in memory)
    const float* xp = tabrow[i] + off;
    const float* d = dy + i * ldd;
    vec dv[NV];
    for (int v = 0; v < NV; ++v) dv[v] = V::loadm(d + v * V::L, tl[v]);
    for (int r = 0; r < R; ++r) {
      const vec xb = V::set1(xp[r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(xb, dv[v], acc[r][v]);
    }
  } while (++i < np);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      float* o = g + r * NR + v * V::L;
      V::store(o, V::add(V::load(o), acc[r][v]));
    }
}

typedef void (*wgrad_fn)(const float* const*, int, int64_t, const float*, int64_t, const vmask*, float*, int);

template <int NV, int R = 1>
wgrad_fn wgrad_pick(int r) {
  if constexpr (R > MAX_MR) {
    return nullptr;
  } else {
    return r == R ? wgrad_tile<R, NV> : wgrad_pick<NV, R + 1>(r);
  }
}

wgrad_fn wgrad_kernel(int nv, int r) {
  switch (nv) {
    case 1: return wgrad_pick<1>(r);
    case 2: return wgrad_pick<2>(r);
#if defined(SHC_AVX512)
    case 4: return wgrad_pick<4>(r);
#endif
  }
  return nullptr;
}

// ---- direct: OV lanes, side taps by input column (stride 1) -------------------------------------

// A tile of MR consecutive output pixels of one row. The centre rows run as in forward_tile (one
// broadcast input per pixel and row); the side taps run by input column: for each kernel row dy and
// channel c', each input pixel of the tile's span is broadcast once and multiplied into every
// output of the tile it reaches (up to KW taps), so a broadcast feeds up to KW * NV multiplies
// instead of NV. GROUPS = 1: the NV vectors are one group's filters; GROUPS = NV: each vector is
// one group (n = VL), and a group's side taps touch only its vector.
template <int MR, int NV, int GROUPS, int KW, bool MID>
__attribute__((always_inline)) inline void direct_side_row(vec (&acc)[MR][NV], const float* xr, int64_t Cin,
                                                            int64_t W, int64_t wo0, int64_t m, const float*& panel) {
  constexpr int VPG = NV / GROUPS, PW = KW / 2;
  (void)PW;
  for (int64_t c = 0; c < m; ++c) {
    vec w[GROUPS][KW][VPG];
    #pragma GCC unroll 64
    for (int gi = 0; gi < GROUPS; ++gi)
#pragma GCC unroll 64
      for (int dx = 0; dx < KW; ++dx) {
        if (MID && dx == KW / 2) continue;
        #pragma GCC unroll 64
        for (int vv = 0; vv < VPG; ++vv) w[gi][dx][vv] = V::load(panel + vv * V::L);
        panel += VPG * V::L;
      }
    #pragma GCC unroll 64
    for (int gi = 0; gi < GROUPS; ++gi) {
      const float* xg = xr + gi * m + c;
      #pragma GCC unroll 64
      for (int q = 0; q < MR + KW - 1; ++q) {
        const int64_t wi = wo0 + q - KW / 2;
        if (wi < 0 || wi >= W) continue;
        const vec xb = V::set1(xg[wi * Cin]);
        #pragma GCC unroll 64
        for (int dx = 0; dx < KW; ++dx) {
          if (MID && dx == KW / 2) continue;
          const int i = q - dx;
          if (i < 0 || i >= MR) continue;
          #pragma GCC unroll 64
          for (int vv = 0; vv < VPG; ++vv) acc[i][gi * VPG + vv] = V::fma(xb, w[gi][dx][vv], acc[i][gi * VPG + vv]);
        }
      }
    }
  }
}

template <int MR, int NV, int GROUPS, int KW>
void direct_tile(const float* x, int64_t H, int64_t W, int64_t Cin, int64_t b, int64_t ho, int64_t wo0, int kh,
                 int64_t m, int64_t coff, const float* panel, float* out, int64_t ldo, const float* bias,
                 const vmask* tail) {
  vec acc[MR][NV];
  #pragma GCC unroll 64
  for (int v = 0; v < NV; ++v) {
    const vec bv = bias ? V::loadm(bias + v * V::L, tail[v]) : V::zero();
    #pragma GCC unroll 64
    for (int i = 0; i < MR; ++i) acc[i][v] = bv;
  }
  const float* xc = x + ((b * H + ho) * W + wo0) * Cin;
  for (int64_t c = 0; c < Cin; ++c) {
    vec w[NV];
    #pragma GCC unroll 64
    for (int v = 0; v < NV; ++v) w[v] = V::load(panel + v * V::L);
    panel += NV * V::L;
    #pragma GCC unroll 64
    for (int i = 0; i < MR; ++i) {
      const vec xb = V::set1(xc[i * Cin + c]);
      #pragma GCC unroll 64
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(xb, w[v], acc[i][v]);
    }
  }
  const int ph = kh / 2;
  for (int dy = 0; dy < kh; ++dy) {
    const int64_t hi = ho + dy - ph;
    const bool mid = dy == ph;
    if (hi < 0 || hi >= H) {
      panel += m * (mid ? KW - 1 : KW) * NV * V::L;
      continue;
    }
    const float* xr = x + (b * H + hi) * W * Cin + coff;
    if (mid) direct_side_row<MR, NV, GROUPS, KW, true>(acc, xr, Cin, W, wo0, m, panel);
    else direct_side_row<MR, NV, GROUPS, KW, false>(acc, xr, Cin, W, wo0, m, panel);
  }
  #pragma GCC unroll 64
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 64
    for (int v = 0; v < NV; ++v) V::storem(out + i * ldo + v * V::L, acc[i][v], tail[v]);
}

typedef void (*direct_fn)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int64_t, int64_t,
                          const float*, float*, int64_t, const float*, const vmask*);

// The direct variants: (NV, GROUPS) = (2, 1) groups of >= 2 vectors, (2, 2) groups of exactly one
// vector (pairs of groups), (1, 1) any other group of whole vectors. MR within the register budget
// (accumulators + the row's weights + one broadcast).
constexpr int direct_mr(int nv, int groups, int kw) {
  // Registers: MR * NV accumulators + the row's weights (kw * NV vectors) + one broadcast.
  return V::L == 16 ? (nv == 2 ? (kw == 5 ? (groups == 1 ? 8 : 10) : 12) : 24)
                    : (nv == 2 ? (kw == 5 ? 2 : 4) : (kw == 5 ? 8 : 12));
}

template <int NV, int GROUPS, int KW, int MR = 1>
direct_fn direct_pick(int mr) {
  if constexpr (MR > direct_mr(NV, GROUPS, KW)) {
    return nullptr;
  } else {
    return mr == MR ? direct_tile<MR, NV, GROUPS, KW> : direct_pick<NV, GROUPS, KW, MR + 1>(mr);
  }
}

direct_fn direct_kernel(int nv, int groups, int kw, int mr) {
  switch (nv * 100 + groups * 10 + kw) {
    case 213: return direct_pick<2, 1, 3>(mr);
    case 215: return direct_pick<2, 1, 5>(mr);
    case 223: return direct_pick<2, 2, 3>(mr);
    case 225: return direct_pick<2, 2, 5>(mr);
    case 113: return direct_pick<1, 1, 3>(mr);
    case 115: return direct_pick<1, 1, 5>(mr);
  }
  return nullptr;
}

// ---- dot: a few output pixels, the weights read where they lie -----------------------------------

// For calls with few output pixels (batch 1, deep layers) laying out the weights costs more than
// the multiplies. Here each output is a dot product over channels of the input and the weights in
// their own memory: the compact row w1[j] (contiguous), and the k x k kernels with contiguous input
// channels (channels-last kxk weights: K[j][t][c']). acc[i][f] holds VL partial sums of pixel i and
// filter j0 + f (filters of one group); horizontal sums at the end.
struct DotSeg {
  int32_t row, off, len;  // table row (tap), channel offset in the input, length
  int64_t woff;           // offset of the weights within the filter's rows
  bool kxk;               // weights from the k x k kernels (else from w1)
};

template <int MR, int NJ>
void dot_tile(const DotSeg* segs, int nseg, const float* const* tab, int64_t ld, const float* const* w1rows,
              const float* const* kxkrows, int64_t sk0, int64_t s10, float* out, int64_t ldo, const float* bias) {
  vec acc[MR][NJ];
  for (int i = 0; i < MR; ++i)
    for (int f = 0; f < NJ; ++f) acc[i][f] = V::zero();
  (void)sk0;
  (void)s10;
  for (int s = 0; s < nseg; ++s) {
    const DotSeg sg = segs[s];
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = tab[sg.row * ld + i] + sg.off;
    const float* w[NJ];
    for (int f = 0; f < NJ; ++f) w[f] = (sg.kxk ? kxkrows[f] : w1rows[f]) + sg.woff;
    int c = 0;
    for (; c + V::L <= sg.len; c += V::L) {
      vec wv[NJ];
      for (int f = 0; f < NJ; ++f) wv[f] = V::load(w[f] + c);
      for (int i = 0; i < MR; ++i) {
        const vec xv = V::load(x[i] + c);
        for (int f = 0; f < NJ; ++f) acc[i][f] = V::fma(xv, wv[f], acc[i][f]);
      }
    }
    if (c < sg.len) {
      const vmask k = V::lanes(0, sg.len - c);
      vec wv[NJ];
      for (int f = 0; f < NJ; ++f) wv[f] = V::loadm(w[f] + c, k);
      for (int i = 0; i < MR; ++i) {
        const vec xv = V::loadm(x[i] + c, k);
        for (int f = 0; f < NJ; ++f) acc[i][f] = V::fma(xv, wv[f], acc[i][f]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int f = 0; f < NJ; ++f) out[i * ldo + f] = V::sum(acc[i][f]) + (bias ? bias[f] : 0.f);
}

typedef void (*dot_fn)(const DotSeg*, int, const float* const*, int64_t, const float* const*, const float* const*,
                       int64_t, int64_t, float*, int64_t, const float*);

constexpr int DOT_MR = 4;

template <int NJ, int MR = 1>
dot_fn dot_pick(int mr) {
  if constexpr (MR > DOT_MR) {
    return nullptr;
  } else {
    return mr == MR ? dot_tile<MR, NJ> : dot_pick<NJ, MR + 1>(mr);
  }
}

dot_fn dot_kernel(int nj, int mr) {
  switch (nj) {
    case 1: return dot_pick<1>(mr);
    case 2: return dot_pick<2>(mr);
    case 4: return dot_pick<4>(mr);
  }
  return nullptr;
}

// ---- GV (lanes = groups) ---------------------------------------------------------------------

// GV layout of a tensor of C channels in P blocks of b: element [c'][g] (c' < b) of each pixel is
// channel g*b + c'. Its side-tap weights: kt[s][ci][co][g] for input ci < mi and output co < no
// of the (forward or transposed) layer.
constexpr int GV_MAX_N = 8;

// GVO tiles: lanes = groups. A chunk holds GVN vectors of VL consecutive groups, each with its
// n filters: vector v = gvec * n + co holds filter co of groups G0 + gvec*VL + [0, VL). The centre
// rows (a dense GEMM: one broadcast input value per pixel) come from the chunk's panel in that lane
// order; the side taps from kt, one vector load of VL groups' channel per pixel. The tile is
// transposed back into the filters' order (and the bias added) when it is stored.
template <int MR, int NV, int NO>
void gvo_tile(const float* const* tab, const float* const* ttab, int64_t ld, int cin, int ntaps, int mi, int64_t P,
              const float* panel, const float* kt, int64_t G0, const vmask* gm, const int* valid,
              const V::idx* gidx, const float* bias, float* out, int64_t ldo, int co0, int n) {
  constexpr int GVN = NV / NO;
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  {
    const float* p[MR];
    for (int i = 0; i < MR; ++i) p[i] = tab[i];
    for (int c = 0; c < cin; ++c) {
      vec xb[MR];
      for (int i = 0; i < MR; ++i) xb[i] = V::set1(p[i][c]);
      for (int v = 0; v < NV; ++v) {
        const vec w = V::load(panel + v * V::L);
        for (int i = 0; i < MR; ++i) acc[i][v] = V::fma(xb[i], w, acc[i][v]);
      }
      panel += NV * V::L;
    }
  }
  for (int gv = 0; gv < GVN; ++gv) {
    const int64_t g0 = G0 + gv * V::L;
    for (int s = 0; s < ntaps; ++s) {
      const float* p[MR];
      for (int i = 0; i < MR; ++i) p[i] = ttab[(s + 1) * ld + i] + g0;
      const float* k = kt + ((int64_t)s * mi * n + co0) * P + g0;
      for (int ci = 0; ci < mi; ++ci) {
        vec xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = V::loadm(p[i] + (int64_t)ci * P, gm[gv]);
        for (int o = 0; o < NO; ++o) {
          const vec w = V::loadm(k + ((int64_t)ci * n + o) * P, gm[gv]);
          for (int i = 0; i < MR; ++i) acc[i][gv * NO + o] = V::fma(xv[i], w, acc[i][gv * NO + o]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int gv = 0; gv < GVN; ++gv) {
      // valid[gv]: filters of this vector's groups that exist (NO * groups present).
      float* o = out + i * ldo + gv * V::L * n;
      const float* b = bias ? bias + gv * V::L * n : nullptr;
      if (NO < n) {
        // The chunk holds filters [co0, co0 + NO) of each group: written group by group.
        alignas(64) float buf[NO * V::L];
        for (int c = 0; c < NO; ++c) V::store(buf + c * V::L, acc[i][gv * NO + c]);
        for (int grp = 0; grp < valid[gv] / NO; ++grp)
          for (int c = 0; c < NO; ++c) {
            const int64_t at = (int64_t)grp * n + c;
            o[at] = buf[c * V::L + grp] + (b ? b[at] : 0.f);
          }
        continue;
      }
      if (NO == 1) {
        vec r = acc[i][gv];
        if (b) r = V::add(r, V::loadm(b, gm[gv]));
        V::storem(o, r, gm[gv]);
        continue;
      }
      vec t[NO];
      if (V::has_interleave && (NO == 2 || NO == 4)) {
        V::interleave(acc[i] + gv * NO, NO, t);
      } else {
        alignas(64) float buf[NO * V::L];
        for (int c = 0; c < NO; ++c) V::store(buf + c * V::L, acc[i][gv * NO + c]);
        for (int c = 0; c < NO; ++c) t[c] = V::gather(buf, gidx[c]);
      }
      for (int c = 0; c < NO; ++c) {
        const vmask k = V::lanes(0, valid[gv] - c * V::L);
        vec r = t[c];
        if (b) r = V::add(r, V::loadm(b + c * V::L, k));
        V::storem(o + c * V::L, r, k);
      }
    }
  }
}

typedef void (*gvo_fn)(const float* const*, const float* const*, int64_t, int, int, int, int64_t, const float*,
                       const float*, int64_t, const vmask*, const int*, const V::idx*, const float*, float*, int64_t,
                       int, int);

// Tiles: NV = GVN * NO accumulator vectors per pixel, MR pixels, within the register budget: MR * NV
// accumulators, MR input vectors (or broadcasts) and one weight vector in 32 (AVX-512) or 16 (AVX2).
constexpr int gvo_mr(int nv) { return std::min(MAX_MR, std::max(1, ((V::L == 16 ? 32 : 16) - 1) / (nv + 1))); }

template <int NV, int NO, int MR = 1>
gvo_fn gvo_pick(int mr) {
  if constexpr (MR > gvo_mr(NV)) {
    return nullptr;
  } else {
    return mr == MR ? gvo_tile<MR, NV, NO> : gvo_pick<NV, NO, MR + 1>(mr);
  }
}

// The filters per chunk of a group vector (no <= 4: at most four vectors of accumulators, so
// that a tile has at least six pixels to reuse each loaded weight vector; n is 1, 2, 3, 6 or a
// multiple of 4, checked by the package), and group vectors per chunk: one for no >= 4, two for 2 and 3,
// four for 1; never more groups than exist.
int gvo_filters(int n) { return n <= 4 ? n : n % 4 == 0 ? 4 : 3; }

int gvo_groups_per_chunk(int no, int64_t P) {
  int gvn = no >= 4 ? 1 : no >= 2 ? 2 : 4;
  const int64_t vectors = (P + V::L - 1) / V::L;
  while (gvn > 1 && gvn > vectors) gvn /= 2;
  return gvn;
}

gvo_fn gvo_kernel(int no, int gvn, int mr) {
  switch (no * 8 + gvn) {
    case 1 * 8 + 1: return gvo_pick<1, 1>(mr);
    case 1 * 8 + 2: return gvo_pick<2, 1>(mr);
    case 1 * 8 + 4: return gvo_pick<4, 1>(mr);
    case 2 * 8 + 1: return gvo_pick<2, 2>(mr);
    case 2 * 8 + 2: return gvo_pick<4, 2>(mr);
    case 3 * 8 + 1: return gvo_pick<3, 3>(mr);
    case 3 * 8 + 2: return gvo_pick<6, 3>(mr);
    case 4 * 8 + 1: return gvo_pick<4, 4>(mr);
  }
  return nullptr;
}

// Gather indices of the transposition [o][g] -> [g][o] for `no` filters per group: output vector
// c, lane l is filter (c*L + l) % no of group (c*L + l) / no.
void gv_indices(int no, V::idx* gidx) {
  for (int c = 0; c < no; ++c) {
    int32_t v[V::L];
    for (int l = 0; l < V::L; ++l) {
      const int o = c * V::L + l;
      v[l] = (o % no) * V::L + o / no;
    }
    gidx[c] = V::index(v);
  }
}

// sum over pixels of x-rows (R of them, each a table row and channel) times dy (NO vectors):
// acc[R][NO] += x[row r] * dy[o], added to g[r][o][lanes].
template <int R, int NO>
void gv_wgrad_tile(const float* const* tab, int64_t ld, const int32_t* rows, const int32_t* chans, int64_t P,
                   int64_t np, const float* dyt, int64_t ldd, int64_t gv0, vmask gm, float* g) {
  vec acc[R][NO];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < NO; ++o) acc[r][o] = V::zero();
  const float* const* tr[R];
  int64_t off[R];
  for (int r = 0; r < R; ++r) {
    tr[r] = tab + rows[r] * ld;
    off[r] = (int64_t)chans[r] * P + gv0;
  }
  int64_t i = 0;
  do {
    const float* d = dyt + i * ldd + gv0;
    vec dv[NO];
    for (int o = 0; o < NO; ++o) dv[o] = V::loadm(d + o * P, gm);
    for (int r = 0; r < R; ++r) {
      const vec xv = V::loadm(tr[r][i] + off[r], gm);
      for (int o = 0; o < NO; ++o) acc[r][o] = V::fma(xv, dv[o], acc[r][o]);
    }
  } while (++i < np);
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < NO; ++o) {
      float* dst = g + ((int64_t)r * NO + o) * P + gv0;
      V::storem(dst, V::add(V::loadm(dst, gm), acc[r][o]), gm);
    }
}

typedef void (*gv_wgrad_fn)(const float* const*, int64_t, const int32_t*, const int32_t*, int64_t, int64_t,
                            const float*, int64_t, int64_t, vmask, float*);

template <int NO, int R = 1>
gv_wgrad_fn gv_wgrad_pick(int r) {
  if constexpr (R > MAX_MR) {
    return nullptr;
  } else {
    return r == R ? gv_wgrad_tile<R, NO> : gv_wgrad_pick<NO, R + 1>(r);
  }
}

gv_wgrad_fn gv_wgrad_kernel(int no, int r) {
  switch (no) {
    case 1: return gv_wgrad_pick<1>(r);
    case 2: return gv_wgrad_pick<2>(r);
    case 3: return gv_wgrad_pick<3>(r);
    case 4: return gv_wgrad_pick<4>(r);
    case 5: return gv_wgrad_pick<5>(r);
    case 6: return gv_wgrad_pick<6>(r);
    case 7: return gv_wgrad_pick<7>(r);
    case 8: return gv_wgrad_pick<8>(r);
  }
  return nullptr;
}

// out[i] = the sum over the nt copies of work (total floats each), in a fixed order.
void reduce_work(const float* work, int64_t total, int nt, float* out, int nthreads) {
  pfor((total + 4095) / 4096, nthreads, [&](int64_t block) {
    for (int64_t i = block * 4096; i < std::min(total, block * 4096 + 4096); ++i) {
      float s = 0.f;
      for (int t = 0; t < nt; ++t) s += work[total * t + i];
      out[i] = s;
    }
  });
}

// Whether every one of n floats is finite (v * 0 is 0 for finite v, NaN for inf and NaN).
bool all_finite(const float* p, int64_t n) {
  vec a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  const vec z = V::zero();
  int64_t i = 0;
  for (; i + 4 * V::L <= n; i += 4 * V::L) {
    a0 = V::fma(V::load(p + i), z, a0);
    a1 = V::fma(V::load(p + i + V::L), z, a1);
    a2 = V::fma(V::load(p + i + 2 * V::L), z, a2);
    a3 = V::fma(V::load(p + i + 3 * V::L), z, a3);
  }
  float rest = 0.f;
  for (; i < n; ++i) rest += p[i] * 0.f;
  return V::sum(V::add(V::add(a0, a1), V::add(a2, a3))) + rest == 0.f;
}

// ---- CT: the side taps' weight gradient with lanes over input channels ---------------------------

// For groups of at least half a vector of input channels the side taps' weight gradient is
// computed with lanes over a group's channels c' (read as one vector from a tap's input row),
// filters and taps along the registers: a tile of F filters x T taps accumulates, per output pixel,
// F broadcasts of dy times T vector loads of x (one per tap), F*T FMAs -- against NV loads and R
// broadcasts for R*NV FMAs with lanes over filters, which leaves narrow groups (one vector of
// filters) broadcast-bound.
constexpr int CT_F = V::L == 16 ? 3 : 2;  // filters per tile: F*T + F + 1 registers
constexpr int CT_T = V::L == 16 ? 8 : 6;  // taps per tile

template <int F, int T>
void ct_tile(const float* const* tab, int64_t ld, const int* rows, int64_t off, int64_t np, const float* dy,
             int64_t ldd, vmask k, float* out, int64_t ldf) {
  vec acc[F][T];
  for (int f = 0; f < F; ++f)
    for (int t = 0; t < T; ++t) acc[f][t] = V::zero();
  const float* const* tr[T];
  for (int t = 0; t < T; ++t) tr[t] = tab + rows[t] * ld;
  int64_t i = 0;
  do {
    const float* d = dy + i * ldd;
    vec b[F];
    for (int f = 0; f < F; ++f) b[f] = V::set1(d[f]);
    for (int t = 0; t < T; ++t) {
      const vec xv = V::loadm(tr[t][i] + off, k);
      for (int f = 0; f < F; ++f) acc[f][t] = V::fma(b[f], xv, acc[f][t]);
    }
  } while (++i < np);
  // out[f * ldf + t * VL + lane]: filter f, side tap t, added to what is there
  for (int f = 0; f < F; ++f)
    for (int t = 0; t < T; ++t) {
      float* o = out + f * ldf + (int64_t)t * V::L;
      V::store(o, V::add(V::load(o), acc[f][t]));
    }
}

typedef void (*ct_fn)(const float* const*, int64_t, const int*, int64_t, int64_t, const float*, int64_t, vmask,
                      float*, int64_t);

template <int F, int T = 1>
ct_fn ct_pick_t(int t) {
  if constexpr (T > CT_T) {
    return nullptr;
  } else {
    return t == T ? ct_tile<F, T> : ct_pick_t<F, T + 1>(t);
  }
}

ct_fn ct_kernel(int f, int t) {
  switch (f) {
    case 1: return ct_pick_t<1>(t);
    case 2: return ct_pick_t<2>(t);
#if defined(SHC_AVX512)
    case 3: return ct_pick_t<3>(t);
#endif
  }
  return nullptr;
}

// Whether the side taps' weight gradient of layer `g` runs with lanes over channels: groups of at
// least half a vector of input channels (the lanes of a partial last vector are masked).
int ct_applies(const int64_t* g) {
  const Geo geo = read_geo(g);
  return geo.T() > 1 && 2 * geo.m() >= V::L;
}

// gk[j][c'][t] (N x m x T, contiguous) for the side taps t of layer `g` (the forward layer); the
// centre taps are left alone. `work`: nthreads * N * ((T - 1 + CT_T - 1) / CT_T * CT_T) * m' floats,
// m' = m rounded up to whole vectors (ct_work_floats).
int64_t ct_work_floats(const int64_t* g, int nthreads) {
  const Geo geo = read_geo(g);
  const int64_t ntaps = geo.T() - 1, blocks = (ntaps + CT_T - 1) / CT_T, cv = (geo.m() + V::L - 1) / V::L;
  return (int64_t)nthreads * geo.Cout * blocks * CT_T * cv * V::L;
}

void ct_wgrad(const float* x, const float* dy, float* gk, const int64_t* g, int64_t pp, float* work, int nthreads) {
  const Geo geo = read_geo(g);
  const auto taps = side_taps(geo);
  const int64_t L = geo.pixels(), T = geo.T(), N = geo.Cout, m = geo.m(), n = geo.n(), ntaps = (int64_t)taps.size();
  const int64_t blocks = (ntaps + CT_T - 1) / CT_T, cv = (m + V::L - 1) / V::L;
  // Per thread: out[j][block][cv][CT_T][VL] (a tile's CT_T taps side by side, per vector of channels).
  const int64_t per_filter = blocks * cv * CT_T * V::L, total = N * per_filter;
  if (L == 0) {
    for (int64_t j = 0; j < N; ++j)
      for (int64_t c = 0; c < m; ++c)
        for (int64_t t : taps) gk[(j * m + c) * T + t] = 0.f;
    return;
  }
  pp = std::max<int64_t>(1, std::min<int64_t>(pp, L));
  const int64_t npanel = (L + pp - 1) / pp;
  const int nt = threads_for(npanel, nthreads);
  Array<int> rows(blocks * CT_T, 0);
  for (int64_t t = 0; t < ntaps; ++t) rows[t] = (int)(t + 1);  // table rows: 0 the centre, then the side taps
  const int fmax = CT_F;
  tasks(nt, [&](int64_t tid) {
    float* mine = work + total * tid;
    std::memset(mine, 0, sizeof(float) * total);
    Array<float> zeros(geo.Cin + V::L, 0.f);
    Array<const float*> tab(T * pp);
    int64_t lo, hi;
    slice(tid, nt, npanel, lo, hi);
    for (int64_t panel = lo; panel < hi; ++panel) {
      const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
      fill_table(geo, x, zeros.data(), p0, np, taps, tab.data(), pp);
      for (int64_t grp = 0; grp < geo.P; ++grp)
        for (int64_t j0 = grp * n; j0 < (grp + 1) * n; j0 += fmax) {
          const int f = (int)std::min<int64_t>(fmax, (grp + 1) * n - j0);
          for (int64_t b = 0; b < blocks; ++b) {
            const int t = (int)std::min<int64_t>(CT_T, ntaps - b * CT_T);
            const ct_fn fn = checked(ct_kernel(f, t), "channel-lane weight-gradient tile");
            for (int64_t v = 0; v < cv; ++v) {
              const vmask k = V::lanes(0, (int)(m - v * V::L));
              fn(tab.data(), pp, rows.data() + b * CT_T, grp * m + v * V::L, np, dy + p0 * N + j0, N, k,
                 mine + j0 * per_filter + (b * cv + v) * CT_T * V::L, per_filter);
            }
          }
        }
    }
  });
  // Sum the threads' partials and lay them out as gk[j][c'][t].
  pfor(N, nthreads, [&](int64_t j) {
    for (int64_t t = 0; t < ntaps; ++t) {
      const int64_t b = t / CT_T, tt = t % CT_T;
      for (int64_t c = 0; c < m; ++c) {
        const int64_t at = j * per_filter + ((b * cv + c / V::L) * CT_T + tt) * V::L + c % V::L;
        float s = 0.f;
        for (int w = 0; w < nt; ++w) s += work[total * w + at];
        gk[(j * m + c) * T + taps[t]] = s;
      }
    }
  });
}

// ---- the entry points (reached through the table at the end) -----------------------------------

// ---- OV ----------------------------------------------------------------------------------------

// float32 elements of the OV panels of `g` at this vector width.
int64_t panel_floats_of(const int64_t* g, int nv) { return panel_floats(read_geo(g), nv * V::L); }

// Pack the OV panels of layer `g` (transposed = 1: of its input gradient; then g describes the
// transposed layer). wk, w1: the forward layer's parameters with element strides sk, s1.
void pack_panels(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1, const int64_t* g,
                          int nv, int transposed, float* out, int nthreads) {
  const Geo geo = read_geo(g);
  pack(read_weights(wk, sk, w1, s1, geo, transposed != 0), geo, nv * V::L, transposed != 0, out, nthreads);
}

// y[p][j] (NHWC, Cout channels) = the panel rows applied to x (NHWC, Cin channels), plus bias
// (or nullptr); accumulate = 1 adds to y instead of overwriting it.
void forward(const float* x, const float* panels, const float* bias, float* y, const int64_t* g,
                             int nv, int mr, int64_t pp, int accumulate, int nthreads) {
  const Geo geo = read_geo(g);
  const int NR = nv * V::L;
  const auto chunks = plan(geo, NR);
  const auto taps = side_taps(geo);
  const int64_t L = geo.pixels();
  if (L == 0) return;
  pp = std::max<int64_t>(mr, std::min<int64_t>(pp, L));
  const int64_t npanel = (L + pp - 1) / pp, nchunk = (int64_t)chunks.size();
  const int64_t T = geo.T();
  Array<float> zeros(geo.Cin, 0.f);
  // Work items: (panel, chunk), panel-major; with few panels the chunks are shared out too.
  const int64_t per_panel = npanel >= 2 * nthreads ? nchunk : 1;
  const int64_t items = npanel * (nchunk / per_panel);
  const int nt = threads_for(items, nthreads);
  const forward_fn full = checked(forward_kernel(nv, mr), "forward tile");
  Array<Array<Seg>> segs(nchunk);
  Array<Array<vmask>> tails(nchunk), gmasks(nchunk);
  for (int64_t q = 0; q < nchunk; ++q) {
    segs[q] = segments(geo, chunks[q]);
    tails[q].resize(nv);
    gmasks[q].resize(nv * chunks[q].G);
    chunk_masks(geo, chunks[q], nv, tails[q].data(), gmasks[q].data());
  }
  tasks(nt, [&](int64_t t) {
    Array<const float*> tab(T * pp);
    int64_t current = -1, lo, hi;
    slice(t, nt, items, lo, hi);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t panel = per_panel == nchunk ? item : item / nchunk;
      const int64_t q0 = per_panel == nchunk ? 0 : item % nchunk, q1 = q0 + per_panel;
      const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
      if (panel != current) {
        fill_table(geo, x, zeros.data(), p0, np, taps, tab.data(), pp);
        current = panel;
      }
      for (int64_t q = q0; q < q1; ++q) {
        const Chunk& ch = chunks[q];
        const float* pan = panels + ch.offset;
        const float* b = bias ? bias + ch.j0 : nullptr;
        for (int64_t i0 = 0; i0 < np; i0 += mr) {
          const int r = (int)std::min<int64_t>(mr, np - i0);
          const forward_fn f = r == mr ? full : checked(forward_kernel(nv, r), "forward tile");
          f(segs[q].data(), (int)segs[q].size(), tab.data() + i0, pp, pan, y + (p0 + i0) * geo.Cout + ch.j0, geo.Cout,
            b, accumulate != 0, tails[q].data(), gmasks[q].data());
        }
      }
    }
  });
}

// Whether shc_wgrad wants `work` (nthreads panels of scratch: it splits the pixels among the
// threads, each summing into its own copy) or shares out the chunks instead (nullptr).
int wgrad_needs_work(const int64_t* g, int nv, int nthreads) {
  const Geo geo = read_geo(g);
  return (int64_t)plan(geo, nv * V::L).size() < 2 * nthreads && nthreads > 1;
}

// The weight gradient of the panel rows of `g`, in the panel layout: grad[q][row][lane] = sum over
// output pixels of (the row's input value) * dy[p][j0 + lane]. Lanes of a side-tap row outside its
// group hold sums nobody reads.
void wgrad(const float* x, const float* dy, float* grad, const int64_t* g, int nv, int rw, int64_t pp,
                           float* work, int nthreads) {
  const Geo geo = read_geo(g);
  const int NR = nv * V::L;
  const auto chunks = plan(geo, NR);
  const auto taps = side_taps(geo);
  const int64_t L = geo.pixels(), total = panel_floats(geo, NR), T = geo.T();
  std::memset(grad, 0, sizeof(float) * total);
  if (L == 0) return;
  pp = std::max<int64_t>(1, std::min<int64_t>(pp, L));
  const int64_t npanel = (L + pp - 1) / pp, nchunk = (int64_t)chunks.size();
  Array<float> zeros(geo.Cin + rw, 0.f);
  const bool split_pixels = work != nullptr;
  const int nt = split_pixels ? threads_for(npanel, nthreads) : threads_for(nchunk, nthreads);
  if (split_pixels) std::memset(work, 0, sizeof(float) * total * nt);
  const wgrad_fn full = checked(wgrad_kernel(nv, rw), "weight-gradient tile");
  Array<Array<Seg>> segs(nchunk);
  for (int64_t q = 0; q < nchunk; ++q) segs[q] = segments(geo, chunks[q]);
  std::atomic<int64_t> next(0);
  tasks(nt, [&](int64_t tid) {
    float* mine = split_pixels ? work + total * tid : grad;
    Array<const float*> tab(T * pp);
    Array<vmask> tail(nv);
    auto run = [&](int64_t panel, int64_t q) {
      const Chunk& ch = chunks[q];
      const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
      for (int v = 0; v < nv; ++v) tail[v] = V::lanes(0, (int)(ch.j1 - ch.j0 - v * V::L));
      const float* d = dy + p0 * geo.Cout + ch.j0;
      float* gp = mine + ch.offset;
      for (const Seg& sg : segs[q]) {
        for (int c0 = 0; c0 < sg.len; c0 += rw) {
          const int r = std::min(rw, sg.len - c0);
          const wgrad_fn f = r == rw ? full : checked(wgrad_kernel(nv, r), "weight-gradient tile");
          f(tab.data() + sg.row * pp, sg.off + c0, np, d, geo.Cout, tail.data(), gp, NR);
          gp += (int64_t)r * NR;
        }
      }
    };
    if (split_pixels) {
      int64_t lo, hi;
      slice(tid, nt, npanel, lo, hi);
      for (int64_t panel = lo; panel < hi; ++panel) {
        const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
        fill_table(geo, x, zeros.data(), p0, np, taps, tab.data(), pp);
        for (int64_t q = 0; q < nchunk; ++q) run(panel, q);
      }
    } else {
      for (int64_t q = next.fetch_add(1); q < nchunk; q = next.fetch_add(1)) {
        for (int64_t panel = 0; panel < npanel; ++panel) {
          const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
          fill_table(geo, x, zeros.data(), p0, np, taps, tab.data(), pp);
          run(panel, q);
        }
      }
    }
  });
  if (split_pixels) reduce_work(work, total, nt, grad, nthreads);
}

// The side-tap rows of an OV gradient (geo with side rows only) into gk[j][c'][t] (N x m x T,
// contiguous; the centre taps are left alone). Lanes in blocks of VL, so that each pass reads one
// line per row and writes each lane's taps side by side.
void unpack_side(const float* grad, const int64_t* g, int nv, float* gk, int nthreads) {
  const Geo geo = read_geo(g);
  const int NR = nv * V::L;
  const auto chunks = plan(geo, NR);
  const auto taps = side_taps(geo);
  const int64_t n = geo.n(), m = geo.m(), T = geo.T(), ntaps = (int64_t)taps.size();
  pfor((int64_t)chunks.size(), nthreads, [&](int64_t q) {
    const Chunk& ch = chunks[q];
    const float* src = grad + ch.offset;
    for (int64_t gi = 0; gi < ch.G; ++gi) {
      const int64_t g0 = ch.g0 + gi;
      const int64_t l0 = std::max<int64_t>(0, g0 * n - ch.j0), l1 = std::min(ch.j1 - ch.j0, (g0 + 1) * n - ch.j0);
      const float* rows = src + gi * ntaps * m * NR;
      for (int64_t s = 0; s < ntaps; ++s)
        for (int64_t c = 0; c < m; ++c) {
          const float* row = rows + (s * m + c) * NR;
          for (int64_t l = l0; l < l1; ++l) gk[((ch.j0 + l) * m + c) * T + taps[s]] = row[l];
        }
    }
  });
}

// The centre rows' gradient, dense[j][c] = sum_p dy[p][j] x[p][c] (N x M, row-major), into the
// compact g1[j][i] (N x (M - m)) and the centre taps of gk[j][c'][t] (N x m x T).
void unpack_centre(const float* dense, const int64_t* g, float* gk, float* g1, int nthreads) {
  const Geo geo = read_geo(g);
  const int64_t M = geo.Cin, N = geo.Cout, m = geo.m(), n = geo.n(), T = geo.T(), c = geo.centre_tap();
  pfor(N, nthreads, [&](int64_t j) {
    const int64_t lo = (j / n) * m;
    const float* row = dense + j * M;
    float* out = g1 + j * (M - m);
    std::memcpy(out, row, sizeof(float) * lo);
    std::memcpy(out + lo, row + lo + m, sizeof(float) * (M - lo - m));
    for (int64_t cc = 0; cc < m; ++cc) gk[(j * m + cc) * T + c] = row[lo + cc];
  });
}

// ---- direct ------------------------------------------------------------------------------------

// The direct tiling of layer `g` (stride 1, kernel width 3 or 5): NV vectors per chunk, GROUPS
// groups per chunk; 0 where it does not apply. Chunk panels: the Cin centre rows, then per group
// the side rows in (dy, c', dx) order (the centre tap left out of the middle row), each NV/GROUPS
// vectors wide.
// It applies to groups of one or two vectors of filters (wider groups tile better across pixels,
// NV = 4) in rows of at least 8 output pixels (a tile holds one row).
bool direct_shape(const Geo& geo, int& nv, int& groups) {
  const int64_t n = geo.n();
  if (geo.sh != 1 || geo.sw != 1 || (geo.kw != 3 && geo.kw != 5) || geo.Wo < 8) return false;
  if (n == 2 * V::L) nv = 2, groups = 1;
  else if (n == V::L && geo.P % 2 == 0) nv = 2, groups = 2;
  else if (n == V::L) nv = 1, groups = 1;
  else return false;
  return true;
}

int direct_applies(const int64_t* g) {
  int nv, groups;
  return direct_shape(read_geo(g), nv, groups);
}

int64_t direct_chunk_floats(const Geo& geo, int nv) { return (geo.Cin + (geo.T() - 1) * geo.m()) * nv * V::L; }

int64_t direct_panel_floats(const int64_t* g) {
  const Geo geo = read_geo(g);
  int nv, groups;
  if (!direct_shape(geo, nv, groups)) return 0;
  return geo.Cout / (nv * V::L) * direct_chunk_floats(geo, nv);
}

void direct_pack(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1,
                                 const int64_t* g, int transposed, float* out, int nthreads) {
  const Geo geo = read_geo(g);
  int nv, groups;
  if (!direct_shape(geo, nv, groups)) return;
  const Weights w = read_weights(wk, sk, w1, s1, geo, transposed != 0);
  const int64_t NR = nv * V::L, chunks = geo.Cout / NR, vpg = NR / groups, T = geo.T(), kw = geo.kw;
  const int64_t n = w.N / w.P, m = w.M / w.P;  // the forward layer's
  const int64_t gm = geo.m(), gn = geo.n(), ph = geo.kh / 2, pw = geo.kw / 2;
  pfor(chunks, nthreads, [&](int64_t q) {
    float* dst = out + q * direct_chunk_floats(geo, nv);
    Array<int64_t> filter(NR);
    for (int64_t l = 0; l < NR; ++l) filter[l] = q * NR + l;
    fill_centre(w, transposed != 0, filter.data(), NR, dst, NR);
    float* side = dst + geo.Cin * NR;
    // The order the kernel reads them in: (dy, c', group, dx, lane).
    for (int64_t dy = 0; dy < geo.kh; ++dy)
      for (int64_t c = 0; c < gm; ++c)
        for (int64_t gi = 0; gi < groups; ++gi) {
          const int64_t j0 = q * NR + gi * vpg, grp = j0 / gn;  // the packed layer's group
          for (int64_t dx = 0; dx < kw; ++dx) {
            if (dy == ph && dx == pw) continue;
            const int64_t t = dy * kw + dx;
            // forward: K[j][c][t]; transposed: filter j is forward input channel j (block grp),
            // input c is forward filter grp*n + c, tap flipped.
            if (transposed) {
              const float* k = w.wk + (grp * n + c) * w.sk[0] + w.toff(T - 1 - t) + (j0 - grp * m) * w.sk[1];
              for (int64_t l = 0; l < vpg; ++l) side[l] = k[l * w.sk[1]];
            } else {
              const float* k = w.wk + j0 * w.sk[0] + c * w.sk[1] + w.toff(t);
              for (int64_t l = 0; l < vpg; ++l) side[l] = k[l * w.sk[0]];
            }
            side += vpg;
          }
        }
  });
}

void direct_forward(const float* x, const float* panels, const float* bias, float* y, const int64_t* g,
                                    int nthreads) {
  const Geo geo = read_geo(g);
  int nv, groups;
  if (!direct_shape(geo, nv, groups) || geo.pixels() == 0) return;
  const int64_t NR = nv * V::L, nchunk = geo.Cout / NR, rows = geo.B * geo.Ho, m = geo.m();
  const int mr = (int)std::min<int64_t>(direct_mr(nv, groups, (int)geo.kw), geo.Wo);
  const int64_t tiles = (geo.Wo + mr - 1) / mr, cf = direct_chunk_floats(geo, nv);
  const int64_t items = rows * tiles;
  Array<vmask> tail(nv);
  for (int v = 0; v < nv; ++v) tail[v] = V::lanes(0, V::L);
  pfor(items * nchunk, nthreads, [&](int64_t it) {
      const int64_t item = it / nchunk, q = it % nchunk;
      const int64_t row = item / tiles, wo0 = (item % tiles) * mr, b = row / geo.Ho, ho = row % geo.Ho;
      const int r = (int)std::min<int64_t>(mr, geo.Wo - wo0);
      const int64_t coff = (q * NR / geo.n()) * m;
      checked(direct_kernel(nv, groups, (int)geo.kw, r), "direct tile")(
          x, geo.H, geo.W, geo.Cin, b, ho, wo0, (int)geo.kh, m, coff, panels + q * cf,
          y + ((b * geo.Ho + ho) * geo.Wo + wo0) * geo.Cout + q * NR, geo.Cout, bias ? bias + q * NR : nullptr,
          tail.data());
  });
}

// ---- dot -----------------------------------------------------------------------------------------

// y (NHWC) = layer `g` (the forward layer) on x (NHWC) with the weights read in place: wk with
// contiguous input channels (sk[1] == 1, e.g. channels-last), w1 with contiguous rows (s1[1] == 1).
void dot_forward(const float* x, const float* wk, const int64_t* sk, const float* w1, const int64_t* s1,
                                 const float* bias, float* y, const int64_t* g, int nthreads) {
  const Geo geo = read_geo(g);
  const int64_t L = geo.pixels(), M = geo.Cin, N = geo.Cout, m = geo.m(), n = geo.n(), T = geo.T();
  if (L == 0) return;
  const auto taps = side_taps(geo);
  const int nj = n % 4 == 0 ? 4 : n % 2 == 0 ? 2 : 1;
  const int64_t tiles = N / nj;
  Array<float> zeros(M, 0.f);
  Array<const float*> tab(T * L);
  fill_table(geo, x, zeros.data(), 0, L, taps, tab.data(), L);
  auto toff = [&](int64_t t) { return (t / geo.kw) * sk[2] + (t % geo.kw) * sk[3]; };
  pfor(tiles, nthreads, [&](int64_t q) {
    const int64_t j0 = q * nj, grp = j0 / n, lo = grp * m;
    // The filter's channels in order: before its block (w1), its block at the centre (kxk), after
    // it (w1), then the side taps of its block (kxk).
    DotSeg segs[70];
    int nseg = 0;
    if (lo > 0) segs[nseg++] = {0, 0, (int32_t)lo, 0, false};
    segs[nseg++] = {0, (int32_t)lo, (int32_t)m, toff(geo.centre_tap()), true};
    if (lo + m < M) segs[nseg++] = {0, (int32_t)(lo + m), (int32_t)(M - lo - m), lo * s1[1], false};
    for (size_t s = 0; s < taps.size(); ++s) segs[nseg++] = {(int32_t)(s + 1), (int32_t)lo, (int32_t)m, toff(taps[s]), true};
    const float* w1rows[4];
    const float* kxkrows[4];
    for (int f = 0; f < nj; ++f) {
      w1rows[f] = w1 + (j0 + f) * s1[0];
      kxkrows[f] = wk + (j0 + f) * sk[0];
    }
    for (int64_t i0 = 0; i0 < L; i0 += DOT_MR) {
      const int r = (int)std::min<int64_t>(DOT_MR, L - i0);
      checked(dot_kernel(nj, r), "dot tile")(segs, nseg, tab.data() + i0, L, w1rows, kxkrows, sk[0], s1[0],
                                             y + i0 * N + j0, N, bias ? bias + j0 : nullptr);
    }
  });
}

// ---- GV ----------------------------------------------------------------------------------------

// out[p][c'][g] = x[p][g*b + c'] for `pixels` pixels of C = P * b channels (b = 1: a copy).
void gv_transpose(const float* x, int64_t pixels, int64_t C, int64_t P, float* out, int nthreads) {
  const int64_t b = C / P;
  pfor((pixels + 63) / 64, nthreads, [&](int64_t block) {
    for (int64_t p = block * 64; p < std::min(pixels, block * 64 + 64); ++p) {
      const float* src = x + p * C;
      float* dst = out + p * C;
      for (int64_t c = 0; c < b; ++c) {
        const float* s = src + c;
        float* d = dst + c * P;
        for (int64_t g = 0; g < P; ++g) d[g] = s[g * b];
      }
    }
  });
}

// The GV side-tap weights of layer `g`: kt[s][ci][co][g] (ci < m inputs, co < n outputs of g's
// blocks). Forward: K[g*n + co][ci][t_s]; transposed (g is the input gradient's layer, whose
// inputs are forward filters): K[g*mi + ci][co][flip t_s] with the forward layer's indices.
void gv_pack(const float* wk, const int64_t* sk, const int64_t* g, int transposed, float* kt) {
  const Geo geo = read_geo(g);
  const auto taps = side_taps(geo);
  const int64_t P = geo.P, mi = geo.m(), no = geo.n(), T = geo.T(), ntaps = (int64_t)taps.size();
  Weights w = read_weights(wk, sk, nullptr, sk, geo, transposed != 0);
  for (int64_t s = 0; s < ntaps; ++s) {
    const int64_t tk = w.toff(transposed ? T - 1 - taps[s] : taps[s]);
    for (int64_t ci = 0; ci < mi; ++ci)
      for (int64_t co = 0; co < no; ++co) {
        float* dst = kt + ((s * mi + ci) * no + co) * P;
        for (int64_t gg = 0; gg < P; ++gg) {
          const int64_t j = transposed ? gg * mi + ci : gg * no + co, c = transposed ? co : ci;
          dst[gg] = w.wk[j * sk[0] + c * sk[1] + tk];
        }
      }
  }
}

// GVO chunks of layer `g`: a block of gvn * VL groups times a range of `no` of their n filters.
struct GvoPlan {
  int n, no, gvn, halves;
  int64_t per, blocks, width;  // groups per block, blocks, lanes per chunk
  GvoPlan(const Geo& geo) {
    n = (int)geo.n();
    no = gvo_filters(n);
    halves = (n + no - 1) / no;
    gvn = gvo_groups_per_chunk(no, geo.P);
    per = (int64_t)gvn * V::L;
    blocks = (geo.P + per - 1) / per;
    width = per * no;
  }
  int64_t chunks() const { return blocks * halves; }
};

int64_t gvo_panel_floats(const int64_t* g) {
  const Geo geo = read_geo(g);
  const GvoPlan pl(geo);
  return pl.chunks() * geo.Cin * pl.width;
}

// The centre rows of layer `g` in GVO lane order (transposed = 1: of its input gradient).
void gvo_pack(const float* wk, const int64_t* sk, const float* w1, const int64_t* s1, const int64_t* g,
                              int transposed, float* out, int nthreads) {
  const Geo geo = read_geo(g);
  const Weights w = read_weights(wk, sk, w1, s1, geo, transposed != 0);
  const GvoPlan pl(geo);
  const int64_t P = geo.P;
  pfor(pl.chunks(), nthreads, [&](int64_t q) {
    const int64_t block = q / pl.halves, h = q % pl.halves;
    float* dst = out + q * geo.Cin * pl.width;
    std::memset(dst, 0, sizeof(float) * geo.Cin * pl.width);
    Array<int64_t> filter(pl.width);
    for (int64_t lane = 0; lane < pl.width; ++lane) {
      const int64_t v = lane / V::L, l = lane % V::L, gv = v / pl.no, co = v % pl.no;
      const int64_t grp = block * pl.per + gv * V::L + l;
      filter[lane] = grp < P ? grp * pl.n + h * pl.no + co : -1;  // the layer's filter
    }
    fill_centre(w, transposed != 0, filter.data(), pl.width, dst, pl.width);
  });
}

// y (NHWC, Cout channels) = layer `g` on x (NHWC) with xt = x in GV layout (the same tensor when
// m = 1), centre panels from shc_gvo_pack, side weights kt from shc_gv_pack, plus bias.
void gvo_forward(const float* x, const float* xt, const float* panels, const float* kt,
                                 const float* bias, float* y, const int64_t* g, int64_t pp, int nthreads) {
  const Geo geo = read_geo(g);
  const auto taps = side_taps(geo);
  const GvoPlan pl(geo);
  const int64_t L = geo.pixels(), T = geo.T(), P = geo.P;
  const int mi = (int)geo.m(), ntaps = (int)taps.size(), cin = (int)geo.Cin;
  if (L == 0) return;
  const int nv = pl.gvn * pl.no, mr = gvo_mr(nv);
  const int64_t nchunk = pl.chunks();
  pp = std::max<int64_t>(mr, std::min<int64_t>(pp, L));
  const int64_t npanel = (L + pp - 1) / pp;
  Array<float> zeros(geo.Cin + V::L, 0.f);
  Array<V::idx> gidx(pl.no);
  gv_indices(pl.no, gidx.data());
  const int64_t per_panel = npanel >= 2 * nthreads ? nchunk : 1;
  const int64_t items = npanel * (nchunk / per_panel);
  const gvo_fn full = checked(gvo_kernel(pl.no, pl.gvn, mr), "GVO tile");
  const int nt = threads_for(items, nthreads);
  tasks(nt, [&](int64_t t) {
    Array<const float*> tab(T * pp), ttab(xt == x ? 0 : T * pp);
    const float* const* side = xt == x ? tab.data() : ttab.data();
    int64_t current = -1, lo, hi;
    slice(t, nt, items, lo, hi);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t panel = per_panel == nchunk ? item : item / nchunk;
      const int64_t q0 = per_panel == nchunk ? 0 : item % nchunk, q1 = q0 + per_panel;
      const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
      if (panel != current) {
        fill_table(geo, x, zeros.data(), p0, np, taps, tab.data(), pp);
        if (xt != x) fill_table(geo, xt, zeros.data(), p0, np, taps, ttab.data(), pp);
        current = panel;
      }
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t G0 = (q / pl.halves) * pl.per;
        const int co0 = (int)(q % pl.halves) * pl.no;
        vmask gm[4];
        int valid[4];
        for (int gv = 0; gv < pl.gvn; ++gv) {
          const int groups = (int)std::max<int64_t>(0, std::min<int64_t>(V::L, P - G0 - gv * V::L));
          gm[gv] = V::lanes(0, groups);
          valid[gv] = groups * pl.no;
        }
        const float* pan = panels + q * geo.Cin * pl.width;
        const float* b = bias ? bias + G0 * pl.n + co0 : nullptr;
        for (int64_t i0 = 0; i0 < np; i0 += mr) {
          const int r = (int)std::min<int64_t>(mr, np - i0);
          const gvo_fn f = r == mr ? full : checked(gvo_kernel(pl.no, pl.gvn, r), "GVO tile");
          f(tab.data() + i0, side + i0, pp, cin, ntaps, mi, P, pan, kt, G0, gm, valid, gidx.data(), b,
            y + (p0 + i0) * geo.Cout + G0 * pl.n + co0, geo.Cout, co0, pl.n);
        }
      }
    }
  });
}

// The GV side-tap weight gradient of layer `g` (forward layer): gkt[s][ci][co][g] = sum over
// pixels of xt[p + t_s][ci][g] * dyt[p][co][g]. `work`: nthreads * (T - 1) * m * n * P floats.
void gv_wgrad(const float* xt, const float* dyt, float* gkt, const int64_t* g, int64_t pp,
                              float* work, int nthreads) {
  const Geo geo = read_geo(g);
  const auto taps = side_taps(geo);
  const int64_t L = geo.pixels(), T = geo.T(), P = geo.P;
  const int mi = (int)geo.m(), no = (int)geo.n(), ntaps = (int)taps.size();
  const int64_t total = (int64_t)ntaps * mi * no * P;
  std::memset(gkt, 0, sizeof(float) * total);
  if (L == 0 || ntaps == 0) return;
  const int rw = gvo_mr(no);
  pp = std::max<int64_t>(1, std::min<int64_t>(pp, L));
  const int64_t npanel = (L + pp - 1) / pp, nvec = (P + V::L - 1) / V::L;
  const int nt = threads_for(npanel, nthreads);
  std::memset(work, 0, sizeof(float) * total * nt);
  Array<float> zeros(geo.Cin + V::L, 0.f);
  // The side-tap rows (s, ci) as (table row, channel), in the kt order.
  const int64_t nrows = (int64_t)ntaps * mi;
  Array<int32_t> rows(nrows), chans(nrows);
  for (int64_t r = 0; r < nrows; ++r) {
    rows[r] = (int32_t)(r / mi + 1);
    chans[r] = (int32_t)(r % mi);
  }
  tasks(nt, [&](int64_t tid) {
    float* mine = work + total * tid;
    Array<const float*> tab(T * pp);
    int64_t lo, hi;
    slice(tid, nt, npanel, lo, hi);
    for (int64_t panel = lo; panel < hi; ++panel) {
      const int64_t p0 = panel * pp, np = std::min(pp, L - p0);
      fill_table(geo, xt, zeros.data(), p0, np, taps, tab.data(), pp);
      for (int64_t v = 0; v < nvec; ++v) {
        const int64_t gv0 = v * V::L;
        const vmask gm = V::lanes(0, (int)std::min<int64_t>(V::L, P - gv0));
        for (int64_t r0 = 0; r0 < nrows; r0 += rw) {
          const int r = (int)std::min<int64_t>(rw, nrows - r0);
          checked(gv_wgrad_kernel(no, r), "GV weight-gradient tile")(
              tab.data(), pp, rows.data() + r0, chans.data() + r0, P, np, dyt + p0 * geo.Cout, geo.Cout, gv0, gm,
              mine + r0 * no * P);
        }
      }
    }
  });
  reduce_work(work, total, nt, gkt, nthreads);
}

// gkt[s][ci][co][g] of shc_gv_wgrad into gk[g*n + co][ci][t_s] (N x m x T, contiguous).
void gv_unpack(const float* gkt, const int64_t* g, float* gk) {
  const Geo geo = read_geo(g);
  const auto taps = side_taps(geo);
  const int64_t P = geo.P, mi = geo.m(), no = geo.n(), T = geo.T(), ntaps = (int64_t)taps.size();
  for (int64_t s = 0; s < ntaps; ++s)
    for (int64_t ci = 0; ci < mi; ++ci)
      for (int64_t co = 0; co < no; ++co) {
        const float* src = gkt + ((s * mi + ci) * no + co) * P;
        for (int64_t gg = 0; gg < P; ++gg) gk[((gg * no + co) * mi + ci) * T + taps[s]] = src[gg];
      }
}

}  // namespace

const shc::KernelTable* SHC_TABLE(shc::ParallelFn parallel, shc::FailFn fail) {
  g_parallel = parallel;
  g_fail = fail;
  static const shc::KernelTable table = {
      V::L,          all_finite,      panel_floats_of,  pack_panels,     forward,        wgrad_needs_work,
      wgrad,         unpack_side,     unpack_centre,    direct_applies,  direct_panel_floats,
      direct_pack,   direct_forward,  dot_forward,      gv_transpose,    gv_pack,        gvo_panel_floats,
      gvo_pack,      gvo_forward,     gv_wgrad,         gv_unpack,      ct_applies,     ct_work_floats,
      ct_wgrad,
  };
  return &table;
}
