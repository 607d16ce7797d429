// Vectorized row operations of the attention kernels (at::vec: AVX-512 or AVX2, whichever the build targets).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace hybridrag_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max(a, b), NaN when either is NaN (std::max keeps its first argument when the second is NaN)
inline float nan_max(float a, float b) {
  return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b);
}

// The largest of n values, and whether all are finite (no NaN, no -inf, no +inf).
inline float max_of_finite(const float* x, int64_t n, bool& finite) {
  int64_t i = 0;
  Vec best(kNegInf), low(std::numeric_limits<float>::infinity());
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    best = at::vec::maximum(best, v);
    low = at::vec::minimum(low, v);
  }
  float high = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  float lowest = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, low);
  for (; i < n; ++i) {
    high = nan_max(high, x[i]);
    lowest = x[i] != x[i] ? x[i] : std::min(lowest, x[i]);
  }
  finite = std::isfinite(high) && std::isfinite(lowest);
  return high;
}

// x = exp(x * scale - shift) for n values; returns their sum.
inline float exp_in_place(float* x, int64_t n, float scale, float shift) {
  const Vec vscale(scale), vshift(shift);
  Vec sums(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = at::vec::fmsub(Vec::loadu(x + i), vscale, vshift).exp();
    e.store(x + i);
    sums = sums + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sums);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] * scale - shift);
    total += x[i];
  }
  return total;
}

inline void scale_in_place(float* x, int64_t n, float factor) {
  const Vec f(factor);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * f).store(x + i);
  for (; i < n; ++i) x[i] *= factor;
}

// out += factor * x
inline void add_scaled(float* out, const float* x, int64_t n, float factor) {
  const Vec f(factor);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    at::vec::fmadd(Vec::loadu(x + i), f, Vec::loadu(out + i)).store(out + i);
  for (; i < n; ++i) out[i] += factor * x[i];
}

// d = p * (d - delta)
inline void times_difference(const float* p, float* d, int64_t n, float delta) {
  const Vec vdelta(delta);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(p + i) * (Vec::loadu(d + i) - vdelta)).store(d + i);
  for (; i < n; ++i) d[i] = p[i] * (d[i] - delta);
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec sums(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) sums = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), sums);
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sums);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

inline bool all_finite(const float* x, int64_t n) {
  // x - x is 0 for finite x and NaN for NaN and +-inf: one sum of the differences tells
  Vec sums(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    sums = sums + (v - v);
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sums);
  for (; i < n; ++i) total += x[i] - x[i];
  return total == 0.f;
}

}  // namespace hybridrag_cpu
