// Helpers shared by the native kernels' sources (rtsed/native/*.cpp include this file; the build
// hashes it with them, so editing it rebuilds the library).
//
// Everything here has internal linkage (an anonymous namespace): each source gets its own copy,
// and the shared library exports only the sources' extern "C" entry points.

#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 64-byte SIMD vectors through GCC's vector extensions (portable: one zmm register with AVX-512,
// two ymm with AVX2, and so on). The attribute cannot be applied to a dependent type, hence one
// typedef per element type.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

// Elements of T per Vec<T>: 16 floats or 8 doubles.
template <typename T>
constexpr int64_t kLanes = int64_t(64 / sizeof(T));

// Unaligned load and store (memcpy compiles to one vector move).
template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

// [begin, end) of `n` items for thread `tid` of `nt`: contiguous, static.
inline void split(int64_t n, int tid, int nt, int64_t* begin, int64_t* end) {
  *begin = n * tid / nt;
  *end = n * (tid + 1) / nt;
}

// A conv weight (C, K K) as (K K, C): one vector load per tap for a block of channels.
template <typename T>
std::vector<T> taps_major(const T* w, int64_t C, int KK) {
  std::vector<T> out(static_cast<size_t>(KK) * C);
  for (int64_t c = 0; c < C; ++c)
    for (int tap = 0; tap < KK; ++tap) out[tap * C + c] = w[c * KK + tap];
  return out;
}

}  // namespace
