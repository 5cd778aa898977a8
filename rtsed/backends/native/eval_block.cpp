// The non-GEMM parts of an eval-mode (BN-folded) CNN block on the CPU, offline and streaming
// (rtsed.backends.cpu_eval.dws_block drives them on rtsed.ops.folded_block's folded operands; the
// pointwise GEMM between them stays in oneDNN, which runs it at this CPU's peak).
//
// - depthwise_conv_leaky: the block's K x K conv (depthwise C -> C, or one input channel -> C:
//   depth multiplier C) with bias and LeakyReLU, stride 1, frequency zero-padded by K / 2, no time
//   padding, channels-last in and out. Its input window is two pieces concatenated in time, the
//   streaming history and the new frames, read in place (no torch.cat per step).
// - pool_relu_affine: ReLU -> BN (a per-channel affine a r + b) -> max-pool over P frequencies
//   of the pointwise GEMM's (rows, C) output, as one pass writing the pooled (rows / P, C).
//
// At a streaming step these replace block 1's patch copy and K = 25 GEMM, blocks 2 and 3's
// oneDNN depthwise convs and their LeakyReLU pass, and three amax / relu / addcmul chains.
//
// Layout: (B, T, F, C) row-major, C contiguous; vectors of kLanes channels; channels past the
// last full vector run a scalar loop. Threads split output rows (b, t) statically; each output
// element is computed by one thread in a fixed order (results do not depend on the thread count).
// Every function is instantiated for float and double (the tests check the double ones to
// ~1e-12 against the torch composition).

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "common.h"  // Vec, load / store, split

namespace {

// Output positions along frequency computed together (register blocking): each input vector
// (or broadcast input sample) loaded feeds up to K accumulators, and each output's K x K taps are
// independent FMA chains interleaved R ways, so the FMA latency is hidden. 8 accumulators + the
// input + the weights stay within the 32 vector registers of AVX-512.
constexpr int kMaxPositions = 8;

// The frequency row of window time s for batch b: windows are cat(head, tail) over time, head
// (B, H, F, Cx) and tail (B, N, F, Cx) (H may be 0: head unused).
template <typename T>
inline const T* window_row(const T* head, int64_t H, const T* tail, int64_t N, int64_t b, int64_t s,
                           int64_t row_size) {
  return s < H ? head + (b * H + s) * row_size : tail + (b * N + s - H) * row_size;
}

// R consecutive output positions f0 .. f0 + R - 1 of one output row (b, t), one vector of
// channels c0 .. c0 + L - 1:
//   out[f, c] = leaky(bias[c] + sum over (i, j) of w[i K + j, c] x[t + i, f + j - K / 2, c or 0])
// with x zero outside [0, F) in frequency. rows[i] is window row t + i ((F, Cx)); wt is (K K, C),
// taps-major. The loops over u (input column relative to f0 - K / 2) and r unroll fully, so the
// tap index j = u - r is a constant and the out-of-range (u, r) pairs vanish at compile time;
// only the frequency-edge test on the input column stays, a predictable branch.
template <typename T, int K, bool OneInput, int R>
inline void conv_positions(const T* const* rows, int64_t f0, int64_t F, int64_t C, int64_t c0, const T* wt,
                           const Vec<T>& bias, T slope, T* out) {
  constexpr int pad = K / 2;
  const int64_t Cx = OneInput ? 1 : C;
  Vec<T> acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = bias;
  for (int i = 0; i < K; ++i) {
    const T* row = rows[i];
    // Row i's K weights in registers: each feeds R FMAs. (As FMA memory operands they were
    // reloaded per FMA, and with one 64-byte load per cycle the loads, not the FMAs, set the
    // pace.)
    Vec<T> w[K];
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) w[j] = load(wt + (int64_t(i) * K + j) * C + c0);
#pragma GCC unroll 16
    for (int u = 0; u < R + K - 1; ++u) {
      const int64_t s = f0 - pad + u;
      if (s < 0 || s >= F) continue;  // frequency zero padding
      Vec<T> xv;
      if constexpr (OneInput) {
        xv = Vec<T>{} + row[s];  // one input channel: broadcast the sample
      } else {
        xv = load(row + s * Cx + c0);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int j = u - r;
        if (j >= 0 && j < K) acc[r] += w[j] * xv;
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const Vec<T> v = acc[r] > T(0) ? acc[r] : acc[r] * slope;
    store(out + r * C, v);
  }
}

// Scalar version of conv_positions for one channel c past the last full vector.
template <typename T, int K, bool OneInput>
inline T conv_scalar(const T* const* rows, int64_t f, int64_t F, int64_t C, int64_t c, const T* wt, T bias,
                     T slope) {
  constexpr int pad = K / 2;
  const int64_t Cx = OneInput ? 1 : C, cx = OneInput ? 0 : c;
  T acc = bias;
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) {
      const int64_t s = f + j - pad;
      if (s >= 0 && s < F) acc += wt[(int64_t(i) * K + j) * C + c] * rows[i][s * Cx + cx];
    }
  return acc > T(0) ? acc : acc * slope;
}

// head <- the last H frames of cat(head, tail) over time, per batch element: a streaming
// history advanced past the N new frames (head (B, H, row), tail (B, N, row)).
template <typename T>
void advance_history(T* head, int64_t H, const T* tail, int64_t N, int64_t B, int64_t row) {
  for (int64_t b = 0; b < B; ++b) {
    T* kept = head + b * H * row;
    const T* fresh = tail + b * N * row;
    if (N >= H) {
      std::memcpy(kept, fresh + (N - H) * row, sizeof(T) * H * row);
    } else {
      std::memmove(kept, kept + N * row, sizeof(T) * (H - N) * row);
      std::memcpy(kept + (H - N) * row, fresh, sizeof(T) * N * row);
    }
  }
}

// out (B, H + N - K + 1, F, C) = leaky(conv(window) + bias), window = cat(head, tail) over time
// (see window_row), Cx = 1 (OneInput) or C input channels, wt (K K, C) taps-major, bias (C,).
// With `advance`, head is then advanced in place (advance_history): a streaming step's state
// update, done here once every thread has read the window (it saves the step a torch copy).
template <typename T, int K, bool OneInput>
void depthwise_conv_leaky(T* head, int64_t H, const T* tail, int64_t N, int64_t B, int64_t F, int64_t C,
                          const T* wt, const T* bias, T slope, T* out, bool advance, int threads) {
  constexpr int64_t L = kLanes<T>;
  const int64_t Cx = OneInput ? 1 : C;
  const int64_t frames = H + N - K + 1, rows = B * frames, blocks = C / L;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t r0, r1;
    split(rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / frames, t = r % frames;
      const T* window[K];
      for (int i = 0; i < K; ++i) window[i] = window_row(head, H, tail, N, b, t + i, F * Cx);
      T* out_row = out + r * F * C;
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * L;
        const Vec<T> bv = load(bias + c0);
        int64_t f = 0;
        for (; f + 8 <= F; f += 8)
          conv_positions<T, K, OneInput, 8>(window, f, F, C, c0, wt, bv, slope, out_row + f * C + c0);
        if (f + 4 <= F) {
          conv_positions<T, K, OneInput, 4>(window, f, F, C, c0, wt, bv, slope, out_row + f * C + c0);
          f += 4;
        }
        if (f + 2 <= F) {
          conv_positions<T, K, OneInput, 2>(window, f, F, C, c0, wt, bv, slope, out_row + f * C + c0);
          f += 2;
        }
        if (f < F) conv_positions<T, K, OneInput, 1>(window, f, F, C, c0, wt, bv, slope, out_row + f * C + c0);
      }
      for (int64_t c = blocks * L; c < C; ++c)
        for (int64_t f = 0; f < F; ++f)
          out_row[f * C + c] = conv_scalar<T, K, OneInput>(window, f, F, C, c, wt, bias[c], slope);
    }
  }
  if (advance && H > 0) advance_history(head, H, tail, N, B, F * Cx);
}

// Runtime K -> template K (3, 5, 7; the wrapper, rtsed/native/eval_block.py, rejects others).
template <typename T>
void depthwise_conv_leaky_any(T* head, int64_t H, const T* tail, int64_t N, int64_t B, int64_t F, int64_t C,
                             int64_t Cx, int64_t K, const T* wt, const T* bias, T slope, T* out, bool advance,
                             int threads) {
  const bool one = Cx == 1;
#define RTSED_DW_CASE(k)                                                                          \
  case k:                                                                                         \
    if (one) depthwise_conv_leaky<T, k, true>(head, H, tail, N, B, F, C, wt, bias, slope, out, advance, threads);  \
    else depthwise_conv_leaky<T, k, false>(head, H, tail, N, B, F, C, wt, bias, slope, out, advance, threads);     \
    return;
  switch (K) {
    RTSED_DW_CASE(3)
    RTSED_DW_CASE(5)
    RTSED_DW_CASE(7)
    default: return;
  }
#undef RTSED_DW_CASE
}

// y (outer, F, C) pointwise-conv output -> out (outer, F / P, C):
//   out[o, g, c] = shift[c] + magnitude[c] max over p < P of sign[c] relu(y[o, g P + p, c])
// which is max-pool(BN(relu(y))) for a BN affine a r + b with sign = sign(a), magnitude = |a|,
// shift = b (max_p(a r_p + b) = |a| max_p(sign(a) r_p) + b holds for either sign of a). The last
// F mod P frequencies are dropped, as by torch's max-pool.
template <typename T>
void pool_relu_affine(const T* y, int64_t outer, int64_t F, int64_t C, int64_t P, const T* sign, const T* magnitude,
                      const T* shift, T* out, int threads) {
  constexpr int64_t L = kLanes<T>;
  const int64_t groups = F / P, units = outer * groups, blocks = C / L;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t u0, u1;
    split(units, omp_get_thread_num(), omp_get_num_threads(), &u0, &u1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t o = u / groups, g = u % groups;
      const T* window = y + (o * F + g * P) * C;  // P rows of C
      T* out_row = out + u * C;
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * L;
        const Vec<T> sv = load(sign + c0);
        Vec<T> v = load(window + c0);
        Vec<T> best = sv * (v > T(0) ? v : T(0));
        for (int64_t p = 1; p < P; ++p) {
          v = load(window + p * C + c0);
          const Vec<T> key = sv * (v > T(0) ? v : T(0));
          best = key > best ? key : best;
        }
        store(out_row + c0, load(shift + c0) + load(magnitude + c0) * best);
      }
      for (int64_t c = blocks * L; c < C; ++c) {
        T best = sign[c] * std::max(window[c], T(0));
        for (int64_t p = 1; p < P; ++p) best = std::max(best, sign[c] * std::max(window[p * C + c], T(0)));
        out_row[c] = shift[c] + magnitude[c] * best;
      }
    }
  }
}

}  // namespace

// C entry points (ctypes): <name>_f32 / <name>_f64.

extern "C" {

void depthwise_conv_leaky_f32(float* head, int64_t H, const float* tail, int64_t N, int64_t B, int64_t F,
                              int64_t C, int64_t Cx, int64_t K, const float* wt, const float* bias, float slope,
                              float* out, int advance, int threads) {
  depthwise_conv_leaky_any<float>(head, H, tail, N, B, F, C, Cx, K, wt, bias, slope, out, advance != 0, threads);
}
void depthwise_conv_leaky_f64(double* head, int64_t H, const double* tail, int64_t N, int64_t B, int64_t F,
                              int64_t C, int64_t Cx, int64_t K, const double* wt, const double* bias, double slope,
                              double* out, int advance, int threads) {
  depthwise_conv_leaky_any<double>(head, H, tail, N, B, F, C, Cx, K, wt, bias, slope, out, advance != 0, threads);
}

void pool_relu_affine_f32(const float* y, int64_t outer, int64_t F, int64_t C, int64_t P, const float* sign,
                          const float* magnitude, const float* shift, float* out, int threads) {
  pool_relu_affine<float>(y, outer, F, C, P, sign, magnitude, shift, out, threads);
}
void pool_relu_affine_f64(const double* y, int64_t outer, int64_t F, int64_t C, int64_t P, const double* sign,
                          const double* magnitude, const double* shift, double* out, int threads) {
  pool_relu_affine<double>(y, outer, F, C, P, sign, magnitude, shift, out, threads);
}

}  // extern "C"
