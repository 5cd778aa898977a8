// Fused elementwise passes of a training-mode DWS block on the CPU (rtsed.backends.cpu_block drives them).
//
// Every tensor here is a row-major (rows, C) view of a channels-last activation: a row is one
// (b, t, f) position, C its channels, contiguous. The big GEMMs and convolutions stay in
// MKL / oneDNN; what these functions replace is torch's chain of separate elementwise kernels
// (LeakyReLU, BN statistics, BN apply, ReLU, max-pool, and their backwards), each a full pass
// over 671 MB tensors for block 1 at batch 16 x 1024. Here each pass does all the work that can
// be done with the data it reads.
//
// Statistics are per-channel sums and sums of squares: partial sums in T over a block of at most
// kBlockRows rows, then float64 per thread, threads merged in thread order (deterministic for a
// given thread count). Threads split rows statically; the caller passes torch's thread count so
// torch.set_num_threads governs this code too. Compiled with -fopenmp and loaded after torch,
// these functions share torch's OpenMP runtime (libgomp.so.1 is already in the process).
//
// Every function is instantiated for float and double (the tests check the double ones to
// ~1e-12 against the reference composition).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"  // Vec, load / store, split, taps_major

namespace {

constexpr int64_t kBlockRows = 64;

// Per-thread float64 accumulators for `n_arrays` arrays of C values, merged in thread order.
class ThreadSums {
 public:
  ThreadSums(int threads, int n_arrays, int64_t C)
      : C_(C), n_arrays_(n_arrays), threads_(threads), data_(size_t(threads) * n_arrays * C, 0.0) {}
  double* of(int thread, int array) { return &data_[(size_t(thread) * n_arrays_ + array) * C_]; }
  void merge_into(int array, double* out) const {
    if (out == nullptr) return;
    std::fill(out, out + C_, 0.0);
    for (int t = 0; t < threads_; ++t) {
      const double* p = &data_[(size_t(t) * n_arrays_ + array) * C_];
      for (int64_t c = 0; c < C_; ++c) out[c] += p[c];
    }
  }

 private:
  int64_t C_;
  int n_arrays_;
  int threads_;
  std::vector<double> data_;
};

template <typename T>
inline void flush(T* __restrict block, double* __restrict total, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    total[c] += double(block[c]);
    block[c] = T(0);
  }
}

// The skeleton every pass below shares: body(unit, partials) runs for each unit in [0, units)
// (a unit is rows_per_unit consecutive rows: one row, or the F rows of one (b, t) when a pass
// needs whole pool windows), units split statically over threads. partials[k] is the thread's
// (C,) accumulator in T of per-channel sum k; it is flushed to float64 once kBlockRows rows have
// gone into it, and the threads' float64 sums are merged in thread order into out[k] (null: not
// wanted). Bodies copy the scalars their channel loop uses into locals: read as a captured
// variable (through the closure, which may alias the rows as far as GCC can tell) a LeakyReLU
// slope kept the loop from vectorizing.
template <typename T, int N, typename Body>
void sweep_with_sums(int64_t units, int64_t rows_per_unit, int64_t C, int threads, double* const (&out)[N],
                     Body body) {
  ThreadSums sums(threads, N, C);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<T> storage(static_cast<size_t>(N) * C, T(0));
    T* partials[N];
    for (int k = 0; k < N; ++k) partials[k] = storage.data() + k * C;
    auto flush_all = [&]() {
      for (int k = 0; k < N; ++k) flush(partials[k], sums.of(tid, k), C);
    };
    int64_t u0, u1;
    split(units, tid, nt, &u0, &u1);
    int64_t pending = 0;
    for (int64_t u = u0; u < u1; ++u) {
      body(u, partials);
      pending += rows_per_unit;
      if (pending >= kBlockRows) {
        flush_all();
        pending = 0;
      }
    }
    flush_all();
  }
  for (int k = 0; k < N; ++k) sums.merge_into(k, out[k]);
}

// z (rows, C) -> act(z) = z > 0 ? z : slope z, written back when Write; per-channel sum and sum
// of squares of act(z). slope 0 is ReLU, 0.01 LeakyReLU.
template <typename T, bool Write>
void act_stats(T* z, int64_t rows, int64_t C, T slope, double* sum, double* sumsq, int threads) {
  double* const out[2] = {sum, sumsq};
  sweep_with_sums<T, 2>(rows, 1, C, threads, out, [=](int64_t r, T* const* partials) {
    T* __restrict row = z + r * C;
    T* __restrict ps = partials[0];
    T* __restrict pq = partials[1];
    const T negative = slope;  // a local: see sweep_with_sums
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T v = row[c];
      v = v > T(0) ? v : v * negative;
      if (Write) row[c] = v;
      ps[c] += v;
      pq[c] += v * v;
    }
  });
}

// z (outer, F, C) pre-ReLU -> per-channel sum and sum of squares of relu(z) over all F, and the
// max-pool over groups of P frequencies (the last F mod P dropped) of the BN output
// y = s relu(z) + t, computed as a selection on relu(z): the max where s > 0, the min where s < 0,
// the first position where s == 0 (y is then constant; torch's max-pool keeps the first of ties).
// direction[c] is sign(s) in {+1, -1, 0}. Writes the selected relu(z) values, selected (outer, F / P,
// C), and their positions in the window, argpos (outer, F / P, C) int8. z is not written.
template <typename T>
void relu_stats_pool(const T* z, int64_t outer, int64_t F, int64_t C, int64_t P, const T* direction,
                     T* selected, int8_t* argpos, double* sum, double* sumsq, int threads) {
  const int64_t FP = F / P;
  double* const out[2] = {sum, sumsq};
  sweep_with_sums<T, 2>(outer, F, C, threads, out, [=](int64_t o, T* const* partials) {
    // The window's running pick, per thread (a unit holds whole windows).
    thread_local std::vector<T> best_key, best_val;
    thread_local std::vector<int8_t> best_pos;
    best_key.resize(C);
    best_val.resize(C);
    best_pos.resize(C);
    T* __restrict ps = partials[0];
    T* __restrict pq = partials[1];
    T* __restrict key = best_key.data();
    T* __restrict val = best_val.data();
    int8_t* __restrict pos = best_pos.data();
    const T* __restrict dir = direction;
    for (int64_t f = 0; f < F; ++f) {
      const T* __restrict row = z + (o * F + f) * C;
      const int64_t j = f % P;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T r = row[c] > T(0) ? row[c] : T(0);
        ps[c] += r;
        pq[c] += r * r;
      }
      if (f / P >= FP) continue;  // the dropped F mod P bins count in the statistics only
      if (j == 0) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T r = row[c] > T(0) ? row[c] : T(0);
          key[c] = dir[c] * r;
          val[c] = r;
          pos[c] = 0;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T r = row[c] > T(0) ? row[c] : T(0);
          const T k = dir[c] * r;
          const bool better = k > key[c];  // strict: the first of equal values wins
          key[c] = better ? k : key[c];
          val[c] = better ? r : val[c];
          pos[c] = better ? int8_t(j) : pos[c];
        }
      }
      if (j == P - 1) {
        const int64_t at = (o * FP + f / P) * C;
        std::copy(val, val + C, selected + at);
        std::copy(pos, pos + C, argpos + at);
      }
    }
  });
}

// Backward of pool(BN2(relu(z))) with BN2's batch statistics, in place: z (outer, F, C) pre-ReLU
// in, dL/dz out. grad (outer, F / P, C) is dL/d(pooled output); it lands on the argpos position of
// its window. dL/dr = s g_scattered + alpha + beta r (BN2 backward: alpha, beta carry the batch
// mean terms; zero for running statistics), then ReLU's mask. Also the per-channel sums of dL/dz
// (the pointwise conv's bias gradient).
template <typename T>
void relu_bn_pool_backward(T* z, const T* grad, const int8_t* argpos, const T* scale, const T* alpha,
                           const T* beta, int64_t outer, int64_t F, int64_t C, int64_t P, double* dz_sum,
                           int threads) {
  const int64_t FP = F / P;
  double* const out[1] = {dz_sum};
  sweep_with_sums<T, 1>(outer * F, 1, C, threads, out, [=](int64_t r, T* const* partials) {
    T* __restrict row = z + r * C;
    T* __restrict ps = partials[0];
    const T* __restrict sc = scale;
    const T* __restrict al = alpha;
    const T* __restrict be = beta;
    const int64_t o = r / F, f = r % F;
    if (f / P < FP) {
      const T* __restrict g = grad + (o * FP + f / P) * C;
      const int8_t* __restrict at = argpos + (o * FP + f / P) * C;
      const int8_t j = int8_t(f % P);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T v = row[c];
        const T landed = at[c] == j ? sc[c] * g[c] : T(0);
        const T d = v > T(0) ? al[c] + be[c] * v + landed : T(0);
        row[c] = d;
        ps[c] += d;
      }
    } else {  // frequencies the pool drops: only BN2's batch terms reach them
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T v = row[c];
        const T d = v > T(0) ? al[c] + be[c] * v : T(0);
        row[c] = d;
        ps[c] += d;
      }
    }
  });
}

// Per-channel sums of g and of g * a over rows: (rows, C) each (BN backward's two reductions).
template <typename T>
void grad_sums(const T* g, const T* a, int64_t rows, int64_t C, double* sum_g, double* sum_ga, int threads) {
  double* const out[2] = {sum_g, sum_ga};
  sweep_with_sums<T, 2>(rows, 1, C, threads, out, [=](int64_t r, T* const* partials) {
    const T* __restrict gr = g + r * C;
    const T* __restrict ar = a + r * C;
    T* __restrict ps = partials[0];
    T* __restrict pq = partials[1];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      ps[c] += gr[c];
      pq[c] += gr[c] * ar[c];
    }
  });
}

// BN backward then LeakyReLU backward, in place: g (rows, C) is dL/d(BN output) in, dL/dz out,
// where a = leaky(z) is BN's input: dL/da = s g + alpha + beta a, times 1 where a > 0 (z > 0)
// and slope elsewhere. Also the per-channel sums of dL/dz (the conv's bias gradient).
template <typename T>
void leaky_bn_backward(T* g, const T* a, const T* scale, const T* alpha, const T* beta, T slope, int64_t rows,
                       int64_t C, double* dz_sum, int threads) {
  double* const out[1] = {dz_sum};
  sweep_with_sums<T, 1>(rows, 1, C, threads, out, [=](int64_t r, T* const* partials) {
    T* __restrict gr = g + r * C;
    const T* __restrict ar = a + r * C;
    T* __restrict ps = partials[0];
    const T* __restrict sc = scale;
    const T* __restrict al = alpha;
    const T* __restrict be = beta;
    const T negative = slope;  // a local: see sweep_with_sums
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T av = ar[c];
      const T d = (sc[c] * gr[c] + al[c] + be[c] * av) * (av > T(0) ? T(1) : negative);
      gr[c] = d;
      ps[c] += d;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Depthwise convolution backward (K x K taps, stride 1, frequency zero-padded by K / 2, no time
// padding), channels-last. oneDNN's is slow on these CPUs (its weight gradient far slower than its
// forward, docs/fast-paths.md); here each thread owns a block
// of 64 bytes of channels (16 floats / 8 doubles, one AVX-512 register) and sweeps every position
// with the K x K accumulators (weight grad) or weights (input grad) held in registers: no
// reductions across threads, deterministic.
// ---------------------------------------------------------------------------------------------

// Work is split over tiles of kTileRows (b, t) rows; within a tile each 64-byte block of channels
// (16 floats / 8 doubles) is swept with its K x K accumulators (weight grad) or weights (input
// grad) in registers, so the tile's data is read from cache once per channel block and the
// sweep touches memory in row order (sweeping all rows per channel block instead makes one
// strided pass over the whole input per channel block).
constexpr int64_t kTileRows = 4;
constexpr int64_t kFlushRows = 32;  // weight-grad partials in T are flushed to float64 this often

// dw (C, K K): dw[c, i K + j] = sum over (b, t, f) of dd[b, t, f, c] xp[b, t + i, f + j, c_x], with
// dd (B, T, F, C), xp (B, T + K - 1, F + K - 1, Cx) the input zero-padded in frequency, and
// c_x = c (Cx == C, depthwise) or 0 (Cx == 1: one input channel, depth multiplier C).
template <typename T, int K, bool OneInput>
void dw_weight_grad(const T* dd, const T* xp, int64_t B, int64_t frames, int64_t F, int64_t C, T* dw,
                    int threads) {
  constexpr int64_t L = kLanes<T>;
  constexpr int KK = K * K;
  const int64_t Cx = OneInput ? 1 : C, Fp = F + K - 1, Tp = frames + K - 1;
  const int64_t rows = B * frames, tiles = (rows + kTileRows - 1) / kTileRows, blocks = C / L;
  std::vector<double> totals(size_t(threads) * KK * C, 0.0);  // per thread, (K K, C)
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    double* total = &totals[size_t(tid) * KK * C];
    std::vector<T> partial(KK * C, T(0));  // (K K, C), T
    T* acc_mem = partial.data();
    int64_t tile0, tile1;
    split(tiles, tid, nt, &tile0, &tile1);
    int64_t since_flush = 0;
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kTileRows, r1 = std::min(rows, r0 + kTileRows);
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * L;
        Vec<T> acc[KK];
        for (int tap = 0; tap < KK; ++tap) acc[tap] = load(acc_mem + tap * C + c0);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / frames, t = r % frames;
          for (int64_t f = 0; f < F; ++f) {
            const Vec<T> d = load(dd + (r * F + f) * C + c0);
            for (int i = 0; i < K; ++i) {
              const T* xr = xp + ((b * Tp + t + i) * Fp + f) * Cx;
              for (int j = 0; j < K; ++j) {
                if (OneInput) acc[i * K + j] += d * xr[j];
                else acc[i * K + j] += d * load(xr + j * Cx + c0);
              }
            }
          }
        }
        for (int tap = 0; tap < KK; ++tap) store(acc_mem + tap * C + c0, acc[tap]);
      }
      for (int64_t c = blocks * L; c < C; ++c) {  // channels past the last full vector
        const int64_t cx = OneInput ? 0 : c;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / frames, t = r % frames;
          for (int64_t f = 0; f < F; ++f) {
            const T d = dd[(r * F + f) * C + c];
            for (int i = 0; i < K; ++i)
              for (int j = 0; j < K; ++j)
                acc_mem[(i * K + j) * C + c] += d * xp[((b * Tp + t + i) * Fp + f + j) * Cx + cx];
          }
        }
      }
      since_flush += r1 - r0;
      if (since_flush >= kFlushRows || tile + 1 == tile1) {
        for (int64_t k = 0; k < KK * C; ++k) {
          total[k] += double(acc_mem[k]);
          acc_mem[k] = T(0);
        }
        since_flush = 0;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int tap = 0; tap < KK; ++tap) {
      double sum = 0.0;
      for (int t = 0; t < threads; ++t) sum += totals[(size_t(t) * KK + tap) * C + c];
      dw[c * KK + tap] = T(sum);
    }
}

// dx (B, T + K - 1, F, C) for a true depthwise conv (C_in == C): dx[b, s, f, c] =
// sum over (i, j) of w[c, i K + j] ddp[b, s - i + K - 1, f + K - 1 - j, c], with ddp the output
// gradient zero-padded by K - 1 frames each side in time and (K - 1) / 2 each side in frequency,
// (B, T + 2 (K - 1), F + K - 1, C). Each output element is written once, by one thread.
template <typename T, int K>
void dw_input_grad(const T* ddp, const T* w, int64_t B, int64_t frames, int64_t F, int64_t C, T* dx, int threads) {
  constexpr int64_t L = kLanes<T>;
  constexpr int KK = K * K;
  const int64_t Tq = frames + 2 * (K - 1), Fq = F + K - 1, Tp = frames + K - 1;
  const int64_t rows = B * Tp, tiles = (rows + kTileRows - 1) / kTileRows, blocks = C / L;
  const std::vector<T> wt_data = taps_major(w, C, KK);
  const T* wt = wt_data.data();
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t tile0, tile1;
    split(tiles, tid, nt, &tile0, &tile1);
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kTileRows, r1 = std::min(rows, r0 + kTileRows);
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * L;
        Vec<T> wv[KK];
        for (int tap = 0; tap < KK; ++tap) wv[tap] = load(wt + tap * C + c0);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / Tp, s = r % Tp;
          for (int64_t f = 0; f < F; ++f) {
            Vec<T> acc = Vec<T>{};
            for (int i = 0; i < K; ++i) {
              const T* row = ddp + ((b * Tq + s - i + K - 1) * Fq + f + K - 1) * C + c0;
              for (int j = 0; j < K; ++j) acc += wv[i * K + j] * load(row - j * C);
            }
            store(dx + (r * F + f) * C + c0, acc);
          }
        }
      }
      for (int64_t c = blocks * L; c < C; ++c)
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / Tp, s = r % Tp;
          for (int64_t f = 0; f < F; ++f) {
            T acc = T(0);
            for (int i = 0; i < K; ++i)
              for (int j = 0; j < K; ++j)
                acc += wt[(i * K + j) * C + c] * ddp[((b * Tq + s - i + K - 1) * Fq + f + K - 1 - j) * C + c];
            dx[(r * F + f) * C + c] = acc;
          }
        }
    }
  }
}

// Block 1's forward conv (one input channel, C outputs: depth multiplier C) fused with the
// LeakyReLU and BN1's statistics: a[b, t, f, c] = leaky(bias[c] + sum over (i, j) of
// w[c, i K + j] xp[b, t + i, f + j]), xp (B, T + K - 1, F + K - 1) zero-padded in frequency,
// a written as (B T F, C) rows, with per-channel sums of a and a^2. Replaces oneDNN's conv and a
// separate pass over its full-resolution output.
template <typename T, int K>
void conv1_leaky_stats(const T* xp, const T* w, const T* bias, int64_t B, int64_t frames, int64_t F, int64_t C,
                       T slope, T* a, double* sum, double* sumsq, int threads) {
  constexpr int64_t L = kLanes<T>;
  constexpr int KK = K * K;
  const int64_t Fp = F + K - 1, Tp = frames + K - 1;
  const int64_t rows = B * frames, tiles = (rows + kTileRows - 1) / kTileRows, blocks = C / L;
  const std::vector<T> wt_data = taps_major(w, C, KK);
  const T* wt = wt_data.data();
  ThreadSums sums(threads, 2, C);
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    double* s = sums.of(tid, 0);
    double* q = sums.of(tid, 1);
    int64_t tile0, tile1;
    split(tiles, tid, nt, &tile0, &tile1);
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kTileRows, r1 = std::min(rows, r0 + kTileRows);
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * L;
        Vec<T> wv[KK];
        for (int tap = 0; tap < KK; ++tap) wv[tap] = load(wt + tap * C + c0);
        const Vec<T> bv = load(bias + c0);
        Vec<T> vs = Vec<T>{}, vq = Vec<T>{};
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / frames, t = r % frames;
          for (int64_t f = 0; f < F; ++f) {
            Vec<T> acc = bv;
            for (int i = 0; i < K; ++i) {
              const T* xr = xp + (b * Tp + t + i) * Fp + f;
              for (int j = 0; j < K; ++j) acc += wv[i * K + j] * xr[j];
            }
            acc = acc > T(0) ? acc : acc * slope;
            store(a + (r * F + f) * C + c0, acc);
            vs += acc;
            vq += acc * acc;
          }
        }
        for (int64_t l = 0; l < L; ++l) {
          s[c0 + l] += double(vs[l]);
          q[c0 + l] += double(vq[l]);
        }
      }
      for (int64_t c = blocks * L; c < C; ++c) {  // channels past the last full vector
        T ts = T(0), tq = T(0);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / frames, t = r % frames;
          for (int64_t f = 0; f < F; ++f) {
            T acc = bias[c];
            for (int i = 0; i < K; ++i)
              for (int j = 0; j < K; ++j) acc += wt[(i * K + j) * C + c] * xp[(b * Tp + t + i) * Fp + f + j];
            acc = acc > T(0) ? acc : acc * slope;
            a[(r * F + f) * C + c] = acc;
            ts += acc;
            tq += acc * acc;
          }
        }
        s[c] += double(ts);
        q[c] += double(tq);
      }
    }
  }
  sums.merge_into(0, sum);
  sums.merge_into(1, sumsq);
}

template <typename T>
int conv1_leaky_stats_any(const T* xp, const T* w, const T* bias, int64_t B, int64_t frames, int64_t F, int64_t C,
                          int64_t K, T slope, T* a, double* sum, double* sumsq, int threads) {
  switch (K) {
    case 3: conv1_leaky_stats<T, 3>(xp, w, bias, B, frames, F, C, slope, a, sum, sumsq, threads); return 0;
    case 5: conv1_leaky_stats<T, 5>(xp, w, bias, B, frames, F, C, slope, a, sum, sumsq, threads); return 0;
    case 7: conv1_leaky_stats<T, 7>(xp, w, bias, B, frames, F, C, slope, a, sum, sumsq, threads); return 0;
    default: return 1;
  }
}

// Runtime K -> template K (3, 5, 7); returns 0 when done, 1 for an unsupported K.
template <typename T>
int dw_weight_grad_any(const T* dd, const T* xp, int64_t B, int64_t frames, int64_t F, int64_t C, int64_t Cx,
                       int64_t K, T* dw, int threads) {
  const bool one = Cx == 1 && C != 1;
#define RTSED_DW_CASE(k)                                                                  \
  case k:                                                                                 \
    if (one) dw_weight_grad<T, k, true>(dd, xp, B, frames, F, C, dw, threads);           \
    else dw_weight_grad<T, k, false>(dd, xp, B, frames, F, C, dw, threads);              \
    return 0;
  switch (K) {
    RTSED_DW_CASE(3)
    RTSED_DW_CASE(5)
    RTSED_DW_CASE(7)
    default: return 1;
  }
#undef RTSED_DW_CASE
}

template <typename T>
int dw_input_grad_any(const T* ddp, const T* w, int64_t B, int64_t frames, int64_t F, int64_t C, int64_t K, T* dx,
                      int threads) {
  switch (K) {
    case 3: dw_input_grad<T, 3>(ddp, w, B, frames, F, C, dx, threads); return 0;
    case 5: dw_input_grad<T, 5>(ddp, w, B, frames, F, C, dx, threads); return 0;
    case 7: dw_input_grad<T, 7>(ddp, w, B, frames, F, C, dx, threads); return 0;
    default: return 1;
  }
}

}  // namespace

// C entry points (ctypes): <name>_f32 / <name>_f64.

extern "C" {

void act_stats_f32(float* z, int64_t rows, int64_t C, float slope, int write, double* sum, double* sumsq,
                   int threads) {
  if (write) act_stats<float, true>(z, rows, C, slope, sum, sumsq, threads);
  else act_stats<float, false>(z, rows, C, slope, sum, sumsq, threads);
}
void act_stats_f64(double* z, int64_t rows, int64_t C, double slope, int write, double* sum, double* sumsq,
                   int threads) {
  if (write) act_stats<double, true>(z, rows, C, slope, sum, sumsq, threads);
  else act_stats<double, false>(z, rows, C, slope, sum, sumsq, threads);
}

void relu_stats_pool_f32(const float* z, int64_t outer, int64_t F, int64_t C, int64_t P, const float* direction,
                         float* selected, int8_t* argpos, double* sum, double* sumsq, int threads) {
  relu_stats_pool<float>(z, outer, F, C, P, direction, selected, argpos, sum, sumsq, threads);
}
void relu_stats_pool_f64(const double* z, int64_t outer, int64_t F, int64_t C, int64_t P, const double* direction,
                         double* selected, int8_t* argpos, double* sum, double* sumsq, int threads) {
  relu_stats_pool<double>(z, outer, F, C, P, direction, selected, argpos, sum, sumsq, threads);
}

void relu_bn_pool_backward_f32(float* z, const float* grad, const int8_t* argpos, const float* scale,
                               const float* alpha, const float* beta, int64_t outer, int64_t F, int64_t C,
                               int64_t P, double* dz_sum, int threads) {
  relu_bn_pool_backward<float>(z, grad, argpos, scale, alpha, beta, outer, F, C, P, dz_sum, threads);
}
void relu_bn_pool_backward_f64(double* z, const double* grad, const int8_t* argpos, const double* scale,
                               const double* alpha, const double* beta, int64_t outer, int64_t F, int64_t C,
                               int64_t P, double* dz_sum, int threads) {
  relu_bn_pool_backward<double>(z, grad, argpos, scale, alpha, beta, outer, F, C, P, dz_sum, threads);
}

void grad_sums_f32(const float* g, const float* a, int64_t rows, int64_t C, double* sum_g, double* sum_ga,
                   int threads) {
  grad_sums<float>(g, a, rows, C, sum_g, sum_ga, threads);
}
void grad_sums_f64(const double* g, const double* a, int64_t rows, int64_t C, double* sum_g, double* sum_ga,
                   int threads) {
  grad_sums<double>(g, a, rows, C, sum_g, sum_ga, threads);
}

void leaky_bn_backward_f32(float* g, const float* a, const float* scale, const float* alpha, const float* beta,
                           float slope, int64_t rows, int64_t C, double* dz_sum, int threads) {
  leaky_bn_backward<float>(g, a, scale, alpha, beta, slope, rows, C, dz_sum, threads);
}
void leaky_bn_backward_f64(double* g, const double* a, const double* scale, const double* alpha,
                           const double* beta, double slope, int64_t rows, int64_t C, double* dz_sum,
                           int threads) {
  leaky_bn_backward<double>(g, a, scale, alpha, beta, slope, rows, C, dz_sum, threads);
}

void depthwise_weight_grad_f32(const float* dd, const float* xp, int64_t B, int64_t frames, int64_t F, int64_t C,
                               int64_t Cx, int64_t K, float* dw, int threads, int* status) {
  *status = dw_weight_grad_any<float>(dd, xp, B, frames, F, C, Cx, K, dw, threads);
}
void depthwise_weight_grad_f64(const double* dd, const double* xp, int64_t B, int64_t frames, int64_t F, int64_t C,
                               int64_t Cx, int64_t K, double* dw, int threads, int* status) {
  *status = dw_weight_grad_any<double>(dd, xp, B, frames, F, C, Cx, K, dw, threads);
}

void depthwise_input_grad_f32(const float* ddp, const float* w, int64_t B, int64_t frames, int64_t F, int64_t C,
                              int64_t K, float* dx, int threads, int* status) {
  *status = dw_input_grad_any<float>(ddp, w, B, frames, F, C, K, dx, threads);
}
void depthwise_input_grad_f64(const double* ddp, const double* w, int64_t B, int64_t frames, int64_t F, int64_t C,
                              int64_t K, double* dx, int threads, int* status) {
  *status = dw_input_grad_any<double>(ddp, w, B, frames, F, C, K, dx, threads);
}

void conv1_leaky_stats_f32(const float* xp, const float* w, const float* bias, int64_t B, int64_t frames, int64_t F,
                           int64_t C, int64_t K, float slope, float* a, double* sum, double* sumsq, int threads,
                           int* status) {
  *status = conv1_leaky_stats_any<float>(xp, w, bias, B, frames, F, C, K, slope, a, sum, sumsq, threads);
}
void conv1_leaky_stats_f64(const double* xp, const double* w, const double* bias, int64_t B, int64_t frames,
                           int64_t F, int64_t C, int64_t K, double slope, double* a, double* sum, double* sumsq,
                           int threads, int* status) {
  *status = conv1_leaky_stats_any<double>(xp, w, bias, B, frames, F, C, K, slope, a, sum, sumsq, threads);
}

}  // extern "C"
