// Backward passes of dnd's fused head on the CPU (rtsed.backends.cpu_head drives them).
//
// The head's f_dil is a GEMM over patch rows ordered (b, t, w) (B n W rows per time chunk of n
// frames, C = C_out channels); its hand-written backward per chunk was, in torch: a GEMM of the
// chunk's dL/dlogits against the BN-folded classifier with a broadcast bias copy, an addcmul and
// a ReLU mask (four passes over the chunk), and a col2im of K^2 strided adds (12,544 tiny torch
// calls per batch 16 x 1024 step); and, before that, G^T r in MKL at 6 GB/s. Here:
//
// - head_relu_grad: dL/dz = r > 0 ? g @ folded + alpha + beta r : 0 in one pass, with the
//   per-channel sum of dL/dz (the conv's bias gradient) on the side. The contraction over the
//   n_classes (16) logits is small enough to do in registers: each (bt, w) row of C outputs is
//   n_classes vector FMAs per vector of channels.
// - class_products: G^T r (n_classes, W C) += g^T (n_classes, B n) @ r (B n, W C), threads owning
//   columns.
// - patch_scatter: the transpose of cpu_head.dilated_patches (col2im): adds a chunk's patch
//   gradients into dx. Work is split over (b, dx time row) pairs, so no two threads ever write the
//   same dx element and each element's additions happen in one fixed order whatever the thread
//   count.
//
// Threads split statically; per-channel sums are float64 per thread, merged in thread order
// (deterministic for a given thread count). Every function is instantiated for float and double
// (the tests check the double ones to ~1e-10 against the reference composition).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

constexpr int kRows = 4;  // frames whose rows share each load of the folded classifier
constexpr int64_t kTileW = 4;  // positions w per walk over a thread's frames
constexpr int kProductClasses = 8;  // class_products: classes per register tile
constexpr int kProductVectors = 2;  // class_products: vectors of columns per register tile
constexpr int64_t kBlockRows = 64;  // rows summed in T before a float64 flush

template <typename T>
inline void flush(T* __restrict part, double* __restrict total, int64_t C, int64_t* in_block) {
  for (int64_t c = 0; c < C; ++c) {
    total[c] += double(part[c]);
    part[c] = T(0);
  }
  *in_block = 0;
}

// R rows (bt, w) .. (bt + R - 1, w) of C channels each (R frames at one position w), a tile of
// kVectors vectors of channels at a time: the R x kVectors sums over the n_classes live in
// registers, and each load of the folded classifier (from L1 / L2) feeds R FMAs. Rows of r lie
// row_stride apart, of dz dz_stride apart; dz may be r.
template <typename T, bool Batch, int R>
inline void relu_grad_rows(const T* r, T* dz, int64_t row_stride, int64_t dz_stride, const T* __restrict g, int64_t NC,
                           const T* __restrict f, const T* __restrict al, const T* __restrict be,
                           int64_t C, T* __restrict part) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>, kVectors = 4, kTile = kVectors * L;
  int64_t c0 = 0;
  for (; c0 + kTile <= C; c0 += kTile) {
    V acc[R][kVectors];
    for (int v = 0; v < kVectors; ++v) {
      const V a = Batch ? load(al + c0 + v * L) : V{};
      for (int i = 0; i < R; ++i) acc[i][v] = a;
    }
    for (int64_t k = 0; k < NC; ++k) {
      const T* fk = f + k * C + c0;
      V fv[kVectors];
      for (int v = 0; v < kVectors; ++v) fv[v] = load(fk + v * L);
      for (int i = 0; i < R; ++i) {
        const T gv = g[i * NC + k];
        for (int v = 0; v < kVectors; ++v) acc[i][v] += gv * fv[v];
      }
    }
    for (int v = 0; v < kVectors; ++v) {
      V sum = load(part + c0 + v * L);
      for (int i = 0; i < R; ++i) {
        const V x = load(r + i * row_stride + c0 + v * L);
        V d = Batch ? acc[i][v] + load(be + c0 + v * L) * x : acc[i][v];
        d = x > V{} ? d : V{};
        store(dz + i * dz_stride + c0 + v * L, d);
        sum += d;
      }
      store(part + c0 + v * L, sum);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t c = c0; c < C; ++c) {  // channels past the last whole tile
      T acc = Batch ? al[c] : T(0);
      for (int64_t k = 0; k < NC; ++k) acc += g[i * NC + k] * f[k * C + c];
      const T x = r[i * row_stride + c];
      const T d = x > T(0) ? (Batch ? acc + be[c] * x : acc) : T(0);
      dz[i * dz_stride + c] = d;
      part[c] += d;
    }
  }
}

// r (BT W, C): ReLU outputs of a chunk, rows ordered (bt, w); dz (BT W, C): dL/dz out (dz may be
// r: in place; a separate dz buffer reused across chunks stays in cache for the GEMMs that read
// it). g (BT, NC): dL/dlogits of the chunk's BT = B n frames; folded (W, NC, C): the BN-folded
// classifier, one contiguous NC x C block per position w (as (NC, W C) its rows lie W C apart,
// a multiple of 4 KB at C = 256, and all NC of them fall in the same L1 sets).
// With batch terms: d = r > 0 ? sum_k g[bt, k] folded[w, k, c] + alpha[c] + beta[c] r : 0;
// without (eval BN) alpha = beta = 0 and are not read.
// dz_sum (C,) float64 += per-channel sum of d. Each thread takes a range of frames bt and walks
// it once per kTileW positions w, whose folded blocks (kTileW NC C) stay in L2; r is read in runs
// of kTileW rows (one position at a time was slower, and so was software prefetch of the next run).
template <typename T, bool Batch>
void head_relu_grad(const T* r, T* dz, const T* g, const T* folded, const T* alpha, const T* beta, int64_t BT,
                    int64_t W, int64_t C, int64_t NC, double* dz_sum, int threads) {
  std::vector<double> sums(size_t(threads) * C, 0.0);
  const int64_t WC = W * C;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b0, b1;
    split(BT, tid, nt, &b0, &b1);
    std::vector<T> block(C, T(0));
    T* part = block.data();
    double* total = &sums[size_t(tid) * C];
    int64_t in_block = 0;
    for (int64_t w0 = 0; w0 < W; w0 += kTileW) {
      const int64_t w1 = std::min(W, w0 + kTileW);
      int64_t bt = b0;
      for (; bt + kRows <= b1; bt += kRows) {
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t row = (bt * W + w) * C;
          relu_grad_rows<T, Batch, kRows>(r + row, dz + row, WC, WC, g + bt * NC, NC, folded + w * NC * C, alpha, beta,
                                          C, part);
          in_block += kRows;
          if (in_block >= kBlockRows) flush(part, total, C, &in_block);
        }
      }
      for (; bt < b1; ++bt) {
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t row = (bt * W + w) * C;
          relu_grad_rows<T, Batch, 1>(r + row, dz + row, WC, WC, g + bt * NC, NC, folded + w * NC * C, alpha, beta, C,
                                      part);
          if (++in_block >= kBlockRows) flush(part, total, C, &in_block);
        }
      }
    }
    flush(part, total, C, &in_block);
  }
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) dz_sum[c] += sums[size_t(t) * C + c];
}

// out (KB, ld_out) += g^T r over the BT rows for one tile of kProductVectors vectors of columns:
// the KB x kProductVectors sums live in registers; each r vector feeds KB FMAs. r, g and out
// point at the tile's first column / class; rows of r lie ld_r apart, of g NC apart.
template <typename T, int KB>
inline void class_products_tile(const T* __restrict r, int64_t ld_r, const T* __restrict g, int64_t NC, int64_t BT,
                                T* __restrict out, int64_t ld_out) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>, kV = kProductVectors;
  V acc[KB][kV];
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < kV; ++v) acc[k][v] = load(out + k * ld_out + v * L);
  for (int64_t bt = 0; bt < BT; ++bt) {
    const T* row = r + bt * ld_r;
    V x[kV];
    for (int v = 0; v < kV; ++v) x[v] = load(row + v * L);
    for (int k = 0; k < KB; ++k) {
      const T gk = g[bt * NC + k];
      for (int v = 0; v < kV; ++v) acc[k][v] += gk * x[v];
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < kV; ++v) store(out + k * ld_out + v * L, acc[k][v]);
}

template <typename T>
inline void class_products_block(int kb, const T* r, int64_t ld_r, const T* g, int64_t NC, int64_t BT, T* out,
                                 int64_t ld_out) {
  switch (kb) {
    case 1: class_products_tile<T, 1>(r, ld_r, g, NC, BT, out, ld_out); break;
    case 2: class_products_tile<T, 2>(r, ld_r, g, NC, BT, out, ld_out); break;
    case 3: class_products_tile<T, 3>(r, ld_r, g, NC, BT, out, ld_out); break;
    case 4: class_products_tile<T, 4>(r, ld_r, g, NC, BT, out, ld_out); break;
    case 5: class_products_tile<T, 5>(r, ld_r, g, NC, BT, out, ld_out); break;
    case 6: class_products_tile<T, 6>(r, ld_r, g, NC, BT, out, ld_out); break;
    case 7: class_products_tile<T, 7>(r, ld_r, g, NC, BT, out, ld_out); break;
    default: class_products_tile<T, kProductClasses>(r, ld_r, g, NC, BT, out, ld_out); break;
  }
}

// out (NC, N) += g^T r: g (BT, NC), r (BT, N); the classifier-side products of a chunk
// (N = W C: r's rows are frames, read as (BT, W C)). Threads split the columns (each owns its
// out columns: no reduction, deterministic whatever the thread count) and walk them in tiles,
// all BT rows of a tile at once, the tile's r reused from L1 for every block of classes.
// (Sweeping the columns a few rows at a time streams r better but moves out through L2 once per
// sweep: slower at dnd's chunk shapes, as was software prefetch.) Faster than MKL's GEMM for
// these short, wide products read from memory.
template <typename T>
void class_products(const T* r, const T* g, int64_t BT, int64_t N, int64_t NC, T* out, int threads) {
  constexpr int64_t kCols = kProductVectors * kLanes<T>;
  const int64_t tiles = N / kCols;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t j0, j1;
    split(tiles, tid, nt, &j0, &j1);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t col = j * kCols;
      for (int64_t k0 = 0; k0 < NC; k0 += kProductClasses) {
        const int kb = int(std::min<int64_t>(kProductClasses, NC - k0));
        class_products_block<T>(kb, r + col, N, g + k0, NC, BT, out + k0 * N + col, N);
      }
    }
    if (tid == nt - 1) {  // columns past the last whole tile
      for (int64_t k = 0; k < NC; ++k)
        for (int64_t c = tiles * kCols; c < N; ++c) {
          T acc = out[k * N + c];
          for (int64_t bt = 0; bt < BT; ++bt) acc += g[bt * NC + k] * r[bt * N + c];
          out[k * N + c] = acc;
        }
    }
  }
}

// dx (B, Tp, C) += the transpose of the patch gather of output frames [t0, t0 + n):
// dp (B n W, K K) rows ordered (b, t, w), columns (i, j) for tap dx[b, t + i d, w S + j].
// Units are (b, tau) pairs, tau a dx time row the chunk reaches: tau - t0 in [0, n + (K - 1) d).
template <typename T>
void patch_scatter(T* dx, const T* dp, int64_t B, int64_t Tp, int64_t C, int64_t t0, int64_t n, int64_t K,
                   int64_t d, int64_t S, int64_t W, int threads) {
  const int64_t span = std::min(n + (K - 1) * d, Tp - t0);
  const int64_t KK = K * K;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t u0, u1;
    split(B * span, tid, nt, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / span, tau = u % span;  // dx row t0 + tau
      T* __restrict out = dx + (b * Tp + t0 + tau) * C;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t t = tau - i * d;  // output frame t0 + t, tap row i
        if (t < 0) break;
        if (t >= n) continue;
        const T* __restrict src = dp + ((b * n + t) * W) * KK + i * K;
        for (int64_t w = 0; w < W; ++w) {
          T* __restrict o = out + w * S;
          const T* __restrict s = src + w * KK;
          for (int64_t j = 0; j < K; ++j) o[j] += s[j];
        }
      }
    }
  }
}

// ---- training backward of the conv: dL/dz, dL/dW_conv and the patch gradients in one pass --------

constexpr int64_t kGroupRows = 32;  // dz rows gathered (in L1) before each weight-gradient update

// out rows (R of them, out_stride apart, KK values each) = dz (R, C; rows C apart) @ wc (C, NV L),
// the conv weight (C, K K) zero-padded to NV vectors per channel: the R x NV sums in registers,
// each weight row load feeding R FMAs.
template <typename T, int R, int NV>
inline void patch_grad_rows(const T* __restrict dz, int64_t C, const T* __restrict wc, int64_t KK, T* out,
                            int64_t out_stride) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>;
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t c = 0; c < C; ++c) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(wc + c * NV * L + v * L);
    for (int i = 0; i < R; ++i) {
      const T a = dz[i * C + c];
      for (int v = 0; v < NV; ++v) acc[i][v] += a * wv[v];
    }
  }
  for (int i = 0; i < R; ++i) {
    T row[NV * L];
    for (int v = 0; v < NV; ++v) store(row + v * L, acc[i][v]);
    std::memcpy(out + i * out_stride, row, sizeof(T) * KK);
  }
}

// dw (C, NV L) += dz^T (C, G) @ p (G, NV L) over a group of G rows: CB channels x NV vectors of
// taps in registers per sweep of the group, each patch row load feeding CB FMAs.
template <typename T, int NV>
inline void weight_grad_group(const T* __restrict dz, const T* __restrict p, int64_t G, int64_t C, T* __restrict dw) {
  using V = Vec<T>;
  constexpr int64_t L = kLanes<T>, KKp = NV * L;
  constexpr int CB = 4;
  int64_t c0 = 0;
  for (; c0 + CB <= C; c0 += CB) {
    V acc[CB][NV];
    for (int cb = 0; cb < CB; ++cb)
      for (int v = 0; v < NV; ++v) acc[cb][v] = load(dw + (c0 + cb) * KKp + v * L);
    for (int64_t i = 0; i < G; ++i) {
      V pv[NV];
      for (int v = 0; v < NV; ++v) pv[v] = load(p + i * KKp + v * L);
      for (int cb = 0; cb < CB; ++cb) {
        const T a = dz[i * C + c0 + cb];
        for (int v = 0; v < NV; ++v) acc[cb][v] += a * pv[v];
      }
    }
    for (int cb = 0; cb < CB; ++cb)
      for (int v = 0; v < NV; ++v) store(dw + (c0 + cb) * KKp + v * L, acc[cb][v]);
  }
  for (; c0 < C; ++c0) {  // channels past the last whole block
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = load(dw + c0 * KKp + v * L);
    for (int64_t i = 0; i < G; ++i)
      for (int v = 0; v < NV; ++v) acc[v] += dz[i * C + c0] * load(p + i * KKp + v * L);
    for (int v = 0; v < NV; ++v) store(dw + c0 * KKp + v * L, acc[v]);
  }
}

// The conv part of the head's backward for one time chunk, output frames [t0, t0 + n) of all B
// items (BT = B n frames, rows (bt, w) as in head_relu_grad), replacing head_relu_grad's dz
// written to memory, two GEMMs reading it back (dz^T patches, dz W: K = 49 shapes oneDNN and MKL
// ran at ~55 % of this CPU's fp32 peak) and the copy of the patches each of them read:
//   dz = r > 0 ? g @ folded[w] + alpha + beta r : 0              (head_relu_grad's formula)
//   dp[(bt, w), i K + j] = sum_c dz[(bt, w), c] wc[c, i K + j]     (the patch gradients)
//   dw[c, i K + j] += sum over rows of dz[(bt, w), c] x[b, t0 + t + i d, w S + j]
//   dz_sum[c] += sum over rows of dz[(bt, w), c]                    (float64)
// x (B, Tp, Cx) the time-padded input; wc (C, NV L) the conv weight zero-padded per channel;
// dp (BT W, K K) written (patch_scatter adds it into dx). Each thread takes a range of frames and
// walks them once per position w: a tile of kRows frames' dz stays in L1 for its patch gradients,
// and kGroupRows rows of dz and their patches (gathered from x) for the weight gradient, summed
// per thread and merged in thread order (so dw depends on the thread count only by rounding, as
// a threaded GEMM's does).
template <typename T, bool Batch, int K>
void head_conv_backward(const T* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t dil, int64_t S,
                        const T* r, const T* g, const T* folded, const T* alpha, const T* beta, const T* wc,
                        int64_t B, int64_t W, int64_t C, int64_t NC, T* dp, T* dw, double* dz_sum, int threads) {
  constexpr int64_t L = kLanes<T>;
  constexpr int KK = K * K, NV = int((KK + L - 1) / L);
  constexpr int64_t KKp = NV * L;
  constexpr int R = kRows;
  static_assert(kGroupRows % R == 0, "a group holds whole tiles");
  const int64_t BT = B * n, WC = W * C;
  std::vector<double> sums(size_t(threads) * C, 0.0);
  std::vector<T> dw_parts(size_t(threads) * C * KKp, T(0));
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b0, b1;
    split(BT, tid, nt, &b0, &b1);
    std::vector<T> dz_data(size_t(kGroupRows) * C), p_data(size_t(kGroupRows) * KKp, T(0)), part_data(C, T(0));
    T* dz = dz_data.data();
    T* p = p_data.data();
    T* part = part_data.data();
    T* dwp = &dw_parts[size_t(tid) * C * KKp];
    double* total = &sums[size_t(tid) * C];
    int64_t in_block = 0;
    for (int64_t w = 0; w < W; ++w) {
      const T* fw = folded + w * NC * C;
      int64_t group = 0;
      for (int64_t bt = b0; bt < b1;) {
        const int64_t rows = std::min<int64_t>(R, b1 - bt);
        const int64_t row = (bt * W + w) * C;
        T* dzg = dz + group * C;
        T* dpr = dp + (bt * W + w) * KK;
        if (rows == R) {
          relu_grad_rows<T, Batch, R>(r + row, dzg, WC, C, g + bt * NC, NC, fw, alpha, beta, C, part);
          patch_grad_rows<T, R, NV>(dzg, C, wc, KK, dpr, W * KK);
        } else {
          for (int64_t i = 0; i < rows; ++i) {
            relu_grad_rows<T, Batch, 1>(r + row + i * WC, dzg + i * C, WC, C, g + (bt + i) * NC, NC, fw, alpha,
                                        beta, C, part);
            patch_grad_rows<T, 1, NV>(dzg + i * C, C, wc, KK, dpr + i * W * KK, W * KK);
          }
        }
        for (int64_t i = 0; i < rows; ++i) {  // the rows' patches, taps zero-padded to KKp
          const int64_t b = (bt + i) / n, t = (bt + i) % n;
          const T* xr = x + (b * Tp + t0 + t) * Cx + w * S;
          T* pr = p + (group + i) * KKp;
          for (int ti = 0; ti < K; ++ti)
            for (int tj = 0; tj < K; ++tj) pr[ti * K + tj] = xr[ti * dil * Cx + tj];
        }
        group += rows;
        bt += rows;
        in_block += rows;
        if (in_block >= kBlockRows) flush(part, total, C, &in_block);
        if (group + R > kGroupRows || bt >= b1) {
          weight_grad_group<T, NV>(dz, p, group, C, dwp);
          group = 0;
        }
      }
    }
    flush(part, total, C, &in_block);
  }
  for (int t = 0; t < threads; ++t) {
    const T* part = &dw_parts[size_t(t) * C * KKp];
    for (int64_t c = 0; c < C; ++c)
      for (int k = 0; k < KK; ++k) dw[c * KK + k] += part[c * KKp + k];
    for (int64_t c = 0; c < C; ++c) dz_sum[c] += sums[size_t(t) * C + c];
  }
}

template <typename T>
int head_conv_backward_any(const T* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t K, int64_t dil,
                           int64_t S, const T* r, const T* g, const T* folded, const T* alpha, const T* beta,
                           const T* wc, int batch, int64_t B, int64_t W, int64_t C, int64_t NC, T* dp, T* dw,
                           double* dz_sum, int threads) {
#define RTSED_HEAD_BACKWARD(KV)                                                                                   \
  case KV:                                                                                                        \
    if (batch)                                                                                                    \
      head_conv_backward<T, true, KV>(x, Tp, Cx, t0, n, dil, S, r, g, folded, alpha, beta, wc, B, W, C, NC, dp,   \
                                      dw, dz_sum, threads);                                                       \
    else                                                                                                          \
      head_conv_backward<T, false, KV>(x, Tp, Cx, t0, n, dil, S, r, g, folded, alpha, beta, wc, B, W, C, NC, dp,  \
                                       dw, dz_sum, threads);                                                      \
    return 0;
  switch (K) {
    RTSED_HEAD_BACKWARD(3)
    RTSED_HEAD_BACKWARD(5)
    RTSED_HEAD_BACKWARD(7)
    default: return 1;
  }
#undef RTSED_HEAD_BACKWARD
}

// ---- eval-mode forward: f_dil -> ReLU -> BN-folded classifier, logits only ----------------------

constexpr int kHeadRows = 6;      // frames per register tile of the conv (6 x 4 vectors of accumulators)
constexpr int kHeadVectors = 4;   // vectors of output channels per register tile
constexpr int64_t kHeadFrames = 48;  // frames per work unit: each unit walks all W positions once

// R rows of f_dil's output through its ReLU: z[r, c] = relu(cb[c] + sum over taps of wt[tap, c]
// xr[r][taps[tap]]), xr the rows' pointers at tap (0, 0), z (R, Cp) contiguous. The R x 4 vectors
// of sums live in registers; each weight load feeds R FMAs.
template <typename T, int R>
inline void conv_relu_rows(const T* const (&xr)[R], const int64_t* __restrict taps, int64_t KK,
                           const T* __restrict wt, const T* __restrict cb, int64_t Cp, T* __restrict z) {
  using V = Vec<T>;
  constexpr int64_t Lanes = kLanes<T>, kTile = kHeadVectors * Lanes;
  for (int64_t c0 = 0; c0 < Cp; c0 += kTile) {
    V acc[R][kHeadVectors];
    for (int v = 0; v < kHeadVectors; ++v) {
      const V bias = load(cb + c0 + v * Lanes);
      for (int r = 0; r < R; ++r) acc[r][v] = bias;
    }
    for (int64_t tap = 0; tap < KK; ++tap) {
      const T* wp = wt + tap * Cp + c0;
      V wv[kHeadVectors];
      for (int v = 0; v < kHeadVectors; ++v) wv[v] = load(wp + v * Lanes);
      const int64_t off = taps[tap];
      for (int r = 0; r < R; ++r) {
        const T a = xr[r][off];
        for (int v = 0; v < kHeadVectors; ++v) acc[r][v] += a * wv[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kHeadVectors; ++v) {
        const V a = acc[r][v];
        store(z + r * Cp + c0 + v * Lanes, a > V{} ? a : V{});
      }
  }
}

// One tile of head_logits: R frames (row pointers xr at tap (0, 0) of position w) through the conv
// and ReLU into z (R, Cp), then o[r] (NCp) += z[r] @ Lw (Cp, NCp) for each frame r < R (o's rows
// NCp apart). R is a template argument so that a short last tile (a 1-frame streaming step) does
// only its own rows' work.
template <typename T, int R>
inline void head_tile(const T* const (&xr)[R], const int64_t* __restrict taps, int64_t KK, const T* __restrict wt,
                      const T* __restrict cb, const T* __restrict Lw, int64_t Cp, int64_t NCp, T* __restrict z,
                      T* __restrict o) {
  using V = Vec<T>;
  constexpr int64_t Lanes = kLanes<T>;
  conv_relu_rows<T, R>(xr, taps, KK, wt, cb, Cp, z);
  // The classifier's share of position w: one load of Lw per R FMAs.
  for (int64_t cv = 0; cv < NCp; cv += Lanes) {
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V{};
    const T* lp = Lw + cv;
    for (int64_t c = 0; c < Cp; ++c) {
      const V lv = load(lp + c * NCp);
      for (int r = 0; r < R; ++r) acc[r] += z[r * Cp + c] * lv;
    }
    for (int r = 0; r < R; ++r) {
      T* dst = o + r * NCp + cv;
      store(dst, load(dst) + acc[r]);
    }
  }
}

// The row pointers of R frames from t0 at position w, then head_tile<R>.
template <typename T, int R>
inline void head_rows(const T* x, int64_t b, int64_t sb, int64_t st, int64_t t0, int64_t w, int64_t S,
                      const int64_t* taps, int64_t KK, const T* wt, const T* cb, const T* Lw, int64_t Cp, int64_t NCp,
                      T* z, T* o) {
  const T* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x + b * sb + (t0 + r) * st + w * S;
  head_tile<T, R>(xr, taps, KK, wt, cb, Lw, Cp, NCp, z, o + t0 * NCp);
}

// logits[b, t, :] = bias + sum over (w, c) of L[w, c, :] relu(z[b, t, w, c]) for output frames
// t in [0, n), where z[b, t, w, c] = cb[c] + sum over taps (i, j) of wt[i K + j, c] x[b, t + i d, w S + j]:
// f_dil (a K x K conv of one input channel over (time, CNN channel), dilated by d in time and
// strided by S across channels) -> ReLU -> the eval-mode BN folded into the classifier. z never
// leaves the cache: per position w, R frames x 4 vectors of channels are summed in registers,
// ReLU'd into a small buffer and contracted at once with L[w] (Cp x NCp, 16 KB at 256 x 16,
// kept in L1/L2 while a unit's frames pass through it). In torch this was a patches copy, a
// oneDNN GEMM writing z (1.4 MB per 16 frames), and a second GEMM reading it back.
//
// x: element (b, t, ch) at x[b sb + t st + ch] (channels contiguous: a ring-buffer window view
// works as is); wt (K K, Cp) the conv weight taps-major; cb (Cp,); L (W, Cp, NCp); lb (NCp,);
// out (B, n, NCp) contiguous. Cp must be a multiple of 4 vectors and NCp of one vector (the
// caller pads with zeros, which contribute exactly nothing). Units of (b, kHeadFrames frames) are
// split over threads; each output row is written by one thread, in one fixed order.
template <typename T>
void head_logits(const T* x, int64_t sb, int64_t st, const T* __restrict wt, const T* __restrict cb,
                 const T* __restrict L, const T* __restrict lb, int64_t B, int64_t n, int64_t K, int64_t d,
                 int64_t S, int64_t W, int64_t Cp, int64_t NCp, T* __restrict out, int threads) {
  constexpr int R = kHeadRows;
  static_assert(R == 6, "the remainder switch below covers 1 to 5 frames");
  const int64_t KK = K * K;
  const int64_t per_batch = (n + kHeadFrames - 1) / kHeadFrames, units = B * per_batch;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<T> z_buffer(static_cast<size_t>(R) * Cp);
    T* z = z_buffer.data();
    std::vector<int64_t> tap_offsets(static_cast<size_t>(KK));
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) tap_offsets[i * K + j] = i * d * st + j;
    const int64_t* taps = tap_offsets.data();
    int64_t u0, u1;
    split(units, tid, nt, &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / per_batch, f0 = (u % per_batch) * kHeadFrames, f1 = std::min(n, f0 + kHeadFrames);
      T* o = out + (b * n) * NCp;
      for (int64_t t = f0; t < f1; ++t)
        for (int64_t k = 0; k < NCp; ++k) o[t * NCp + k] = lb[k];
      for (int64_t w = 0; w < W; ++w) {
        const T* Lw = L + w * Cp * NCp;
        int64_t t0 = f0;
        for (; t0 + R <= f1; t0 += R) head_rows<T, R>(x, b, sb, st, t0, w, S, taps, KK, wt, cb, Lw, Cp, NCp, z, o);
        switch (f1 - t0) {  // the last frames: a shorter tile, exactly their size
          case 5: head_rows<T, 5>(x, b, sb, st, t0, w, S, taps, KK, wt, cb, Lw, Cp, NCp, z, o); break;
          case 4: head_rows<T, 4>(x, b, sb, st, t0, w, S, taps, KK, wt, cb, Lw, Cp, NCp, z, o); break;
          case 3: head_rows<T, 3>(x, b, sb, st, t0, w, S, taps, KK, wt, cb, Lw, Cp, NCp, z, o); break;
          case 2: head_rows<T, 2>(x, b, sb, st, t0, w, S, taps, KK, wt, cb, Lw, Cp, NCp, z, o); break;
          case 1: head_rows<T, 1>(x, b, sb, st, t0, w, S, taps, KK, wt, cb, Lw, Cp, NCp, z, o); break;
          default: break;
        }
      }
    }
  }
}

// ---- training forward of the conv: r = ReLU(f_dil) and BN's statistics in one pass --------------

// r[(bt, w), c] = relu(cb[c] + sum over taps (i, j) of wt[i K + j, c] x[b, t0 + t + i d, w S + j]) for
// the chunk's frames bt = (b, t), t < n, rows ordered (bt, w), C of the Cp computed channels kept;
// sum[c] / sumsq[c] (float64) += the per-channel sums of r and r^2 (BN's batch statistics). In
// torch: a patches copy, the GEMM, a ReLU pass and aten's statistics pass over r. Threads split
// frames; a tile is kHeadRows consecutive positions w of one frame, so r is written in memory
// order (tiles of frames at one position wrote short rows far apart into fresh memory: slower).
// Sums are kept in T per thread for kBlockRows rows, then float64, threads merged in thread order.
template <typename T>
void head_conv_relu_stats(const T* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t K, int64_t d,
                          int64_t S, const T* wt, const T* cb, int64_t B, int64_t W, int64_t C, int64_t Cp, T* r,
                          double* sum, double* sumsq, int threads) {
  using V = Vec<T>;
  constexpr int64_t Lanes = kLanes<T>;
  constexpr int R = kHeadRows;
  const int64_t KK = K * K, BT = B * n, WC = W * C;
  std::vector<double> totals(size_t(threads) * 2 * C, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b0, b1;
    split(BT, tid, nt, &b0, &b1);
    std::vector<T> z_data(size_t(R) * Cp), sums_data(size_t(2) * Cp, T(0));
    T* z = z_data.data();
    T* part_sum = sums_data.data();
    T* part_sq = part_sum + Cp;
    double* total_sum = &totals[size_t(tid) * 2 * C];
    double* total_sq = total_sum + C;
    std::vector<int64_t> tap_offsets(static_cast<size_t>(KK));
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) tap_offsets[i * K + j] = i * d * Cx + j;
    const int64_t* taps = tap_offsets.data();
    int64_t in_block = 0;
    auto flush_sums = [&]() {
      for (int64_t c = 0; c < C; ++c) {
        total_sum[c] += double(part_sum[c]);
        total_sq[c] += double(part_sq[c]);
      }
      std::fill(part_sum, part_sum + 2 * Cp, T(0));
      in_block = 0;
    };
    for (int64_t bt = b0; bt < b1; ++bt) {
      const int64_t b = bt / n, t = bt % n;
      const T* xt = x + (b * Tp + t0 + t) * Cx;
      T* rt = r + bt * WC;
      for (int64_t w = 0; w < W;) {
        const int rows = int(std::min<int64_t>(R, W - w));
        // Row pointers; a short tile repeats its last position (computed, neither stored nor summed).
        const T* xr[R];
        for (int i = 0; i < R; ++i) xr[i] = xt + (w + std::min(i, rows - 1)) * S;
        conv_relu_rows<T, R>(xr, taps, KK, wt, cb, Cp, z);
        for (int i = 0; i < rows; ++i) {
          const T* zi = z + i * Cp;
          std::memcpy(rt + (w + i) * C, zi, sizeof(T) * C);
          for (int64_t c = 0; c < Cp; c += Lanes) {
            const V v = load(zi + c);
            store(part_sum + c, load(part_sum + c) + v);
            store(part_sq + c, load(part_sq + c) + v * v);
          }
        }
        w += rows;
        in_block += rows;
        if (in_block >= kBlockRows) flush_sums();
      }
    }
    flush_sums();
  }
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += totals[size_t(t) * 2 * C + c];
      sumsq[c] += totals[size_t(t) * 2 * C + C + c];
    }
}

}  // namespace

// C entry points (ctypes): <name>_f32 / <name>_f64.

extern "C" {

void head_relu_grad_f32(const float* r, float* dz, const float* g, const float* folded, const float* alpha,
                        const float* beta, int batch, int64_t BT, int64_t W, int64_t C, int64_t NC, double* dz_sum,
                        int threads) {
  if (batch) head_relu_grad<float, true>(r, dz, g, folded, alpha, beta, BT, W, C, NC, dz_sum, threads);
  else head_relu_grad<float, false>(r, dz, g, folded, alpha, beta, BT, W, C, NC, dz_sum, threads);
}
void head_relu_grad_f64(const double* r, double* dz, const double* g, const double* folded, const double* alpha,
                        const double* beta, int batch, int64_t BT, int64_t W, int64_t C, int64_t NC,
                        double* dz_sum, int threads) {
  if (batch) head_relu_grad<double, true>(r, dz, g, folded, alpha, beta, BT, W, C, NC, dz_sum, threads);
  else head_relu_grad<double, false>(r, dz, g, folded, alpha, beta, BT, W, C, NC, dz_sum, threads);
}

void class_products_f32(const float* r, const float* g, int64_t BT, int64_t N, int64_t NC, float* out,
                        int threads) {
  class_products<float>(r, g, BT, N, NC, out, threads);
}
void class_products_f64(const double* r, const double* g, int64_t BT, int64_t N, int64_t NC, double* out,
                        int threads) {
  class_products<double>(r, g, BT, N, NC, out, threads);
}

void patch_scatter_f32(float* dx, const float* dp, int64_t B, int64_t Tp, int64_t C, int64_t t0, int64_t n,
                       int64_t K, int64_t d, int64_t S, int64_t W, int threads) {
  patch_scatter<float>(dx, dp, B, Tp, C, t0, n, K, d, S, W, threads);
}
void patch_scatter_f64(double* dx, const double* dp, int64_t B, int64_t Tp, int64_t C, int64_t t0, int64_t n,
                       int64_t K, int64_t d, int64_t S, int64_t W, int threads) {
  patch_scatter<double>(dx, dp, B, Tp, C, t0, n, K, d, S, W, threads);
}

void head_logits_f32(const float* x, int64_t sb, int64_t st, const float* wt, const float* cb, const float* L,
                     const float* lb, int64_t B, int64_t n, int64_t K, int64_t d, int64_t S, int64_t W, int64_t Cp,
                     int64_t NCp, float* out, int threads) {
  head_logits<float>(x, sb, st, wt, cb, L, lb, B, n, K, d, S, W, Cp, NCp, out, threads);
}
void head_logits_f64(const double* x, int64_t sb, int64_t st, const double* wt, const double* cb, const double* L,
                     const double* lb, int64_t B, int64_t n, int64_t K, int64_t d, int64_t S, int64_t W, int64_t Cp,
                     int64_t NCp, double* out, int threads) {
  head_logits<double>(x, sb, st, wt, cb, L, lb, B, n, K, d, S, W, Cp, NCp, out, threads);
}

void head_conv_backward_f32(const float* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t K, int64_t d,
                           int64_t S, const float* r, const float* g, const float* folded, const float* alpha,
                           const float* beta, const float* wc, int batch, int64_t B, int64_t W, int64_t C, int64_t NC,
                            float* dp, float* dw, double* dz_sum, int threads, int* status) {
  *status = head_conv_backward_any<float>(x, Tp, Cx, t0, n, K, d, S, r, g, folded, alpha, beta, wc, batch, B, W, C,
                                          NC, dp, dw, dz_sum, threads);
}
void head_conv_backward_f64(const double* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t K, int64_t d,
                           int64_t S, const double* r, const double* g, const double* folded, const double* alpha,
                           const double* beta, const double* wc, int batch, int64_t B, int64_t W, int64_t C,
                            int64_t NC, double* dp, double* dw, double* dz_sum, int threads, int* status) {
  *status = head_conv_backward_any<double>(x, Tp, Cx, t0, n, K, d, S, r, g, folded, alpha, beta, wc, batch, B, W, C,
                                           NC, dp, dw, dz_sum, threads);
}

void head_conv_relu_stats_f32(const float* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t K, int64_t d,
                              int64_t S, const float* wt, const float* cb, int64_t B, int64_t W, int64_t C, int64_t Cp,
                              float* r, double* sum, double* sumsq, int threads) {
  head_conv_relu_stats<float>(x, Tp, Cx, t0, n, K, d, S, wt, cb, B, W, C, Cp, r, sum, sumsq, threads);
}
void head_conv_relu_stats_f64(const double* x, int64_t Tp, int64_t Cx, int64_t t0, int64_t n, int64_t K, int64_t d,
                              int64_t S, const double* wt, const double* cb, int64_t B, int64_t W, int64_t C,
                              int64_t Cp, double* r, double* sum, double* sumsq, int threads) {
  head_conv_relu_stats<double>(x, Tp, Cx, t0, n, K, d, S, wt, cb, B, W, C, Cp, r, sum, sumsq, threads);
}

}  // extern "C"
