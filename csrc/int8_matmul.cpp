// W8A16 matmul for a few rows of activations on the CPU: out (M, N) = x (M, K) @ (data (N, K) int8 * scale).T in
// float32. Each int8 weight is widened in registers once and meets up to 8 rows of x there, so the weight is read
// once per 8 rows and never copied (the PyTorch path widens it to a float buffer a block of rows at a time). Rows of
// the weight are split among the threads with at::parallel_for.
//
// scale is float32 (N, K / group_size), group_size 0 meaning one group of K (per output channel). The caller
// (hybridrag/kernels/int8/cpu.py) converts x to contiguous float32 and adds the bias; the shapes and dtypes are
// checked there, and again here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kMaxRows = 8;  // rows of x per pass over a weight row: the caller's SMALL_M

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

// One weight row against `Rows` rows of x: each 16 int8 weights are widened once (sign-extend, convert) and meet
// every row's fused multiply-add; a group's sum is scaled into a per-row vector total, reduced once at the end. A
// tail shorter than 16 values is read with masked loads (any K, any group size). (Chains: see the AVX2 version;
// unused here.)
template <int Rows, int Chains>
void row_times_x(const float* xs, int64_t depth, const int8_t* row, const float* row_scales, int64_t group,
                 int64_t groups, float* out, int64_t out_stride) {
  __m512 totals[Rows];
  for (int r = 0; r < Rows; ++r) totals[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group, end = begin + group;
    __m512 sums[Rows];
    for (int r = 0; r < Rows; ++r) sums[r] = _mm512_setzero_ps();
    int64_t k = begin;
    for (; k + 16 <= end; k += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      for (int r = 0; r < Rows; ++r) sums[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + r * depth + k), w, sums[r]);
    }
    if (k < end) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (end - k)) - 1u);
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row + k)));
      for (int r = 0; r < Rows; ++r)
        sums[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, xs + r * depth + k), w, sums[r]);
    }
    const __m512 scale = _mm512_set1_ps(row_scales[g]);
    for (int r = 0; r < Rows; ++r) totals[r] = _mm512_fmadd_ps(sums[r], scale, totals[r]);
  }
  for (int r = 0; r < Rows; ++r) out[r * out_stride] = _mm512_reduce_add_ps(totals[r]);
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// The same with 8 lanes (AVX2): 8 int8 weights widened at a time, `Chains` independent sums per row (one chain of
// dependent multiply-adds waits on each result: a single row needs several to keep the FMA units busy); a tail
// shorter than 8 in scalar code.
template <int Rows, int Chains>
void row_times_x(const float* xs, int64_t depth, const int8_t* row, const float* row_scales, int64_t group,
                 int64_t groups, float* out, int64_t out_stride) {
  constexpr int64_t kStep = 8 * Chains;
  __m256 totals[Rows];
  float tails[Rows] = {0.0f};
  for (int r = 0; r < Rows; ++r) totals[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group, end = begin + group;
    __m256 sums[Rows][Chains];
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < Chains; ++c) sums[r][c] = _mm256_setzero_ps();
    int64_t k = begin;
    for (; k + kStep <= end; k += kStep) {
      for (int c = 0; c < Chains; ++c) {
        const __m256 w = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8 * c))));
        for (int r = 0; r < Rows; ++r)
          sums[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + r * depth + k + 8 * c), w, sums[r][c]);
      }
    }
    for (; k + 8 <= end; k += 8) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
      for (int r = 0; r < Rows; ++r) sums[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + r * depth + k), w, sums[r][0]);
    }
    const __m256 scale = _mm256_set1_ps(row_scales[g]);
    for (int r = 0; r < Rows; ++r) {
      for (int c = 1; c < Chains; ++c) sums[r][0] = _mm256_add_ps(sums[r][0], sums[r][c]);
      totals[r] = _mm256_fmadd_ps(sums[r][0], scale, totals[r]);
      float tail = 0.0f;
      for (int64_t j = k; j < end; ++j) tail += xs[r * depth + j] * static_cast<float>(row[j]);
      tails[r] += tail * row_scales[g];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(totals[r]), _mm256_extractf128_ps(totals[r], 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    out[r * out_stride] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair))) + tails[r];
  }
}

#else

// Neither AVX-512 nor AVX2 on the machine that built this: plain loops, vectorized by the compiler where it can.
template <int Rows, int Chains>
void row_times_x(const float* xs, int64_t depth, const int8_t* row, const float* row_scales, int64_t group,
                 int64_t groups, float* out, int64_t out_stride) {
  for (int r = 0; r < Rows; ++r) {
    const float* x = xs + r * depth;
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += x[k] * static_cast<float>(row[k]);
      total += sum * row_scales[g];
    }
    out[r * out_stride] = total;
  }
}

#endif

using RowKernel = void (*)(const float*, int64_t, const int8_t*, const float*, int64_t, int64_t, float*, int64_t);
// by rows of x at once: 4 chains for one row, 2 for two or three, one from four (each row is a chain of its own)
constexpr RowKernel kRowKernels[kMaxRows] = {row_times_x<1, 4>, row_times_x<2, 2>, row_times_x<3, 2>,
                                             row_times_x<4, 1>, row_times_x<5, 1>, row_times_x<6, 1>,
                                             row_times_x<7, 1>, row_times_x<8, 1>};

at::Tensor w8a16_matmul(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "w8a16_matmul: x must be a contiguous float32 (M, K) tensor");
  TORCH_CHECK(data.dim() == 2 && data.scalar_type() == at::kChar && data.is_contiguous(),
              "w8a16_matmul: data must be a contiguous int8 (N, K) tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "w8a16_matmul: scale must be a contiguous float32 tensor");
  TORCH_CHECK(x.device().is_cpu() && data.device().is_cpu() && scale.device().is_cpu(),
              "w8a16_matmul: every tensor must be on the CPU");
  const int64_t rows = x.size(0), depth = x.size(1), columns = data.size(0);
  TORCH_CHECK(data.size(1) == depth, "w8a16_matmul: x is (", rows, ", ", depth, ") but data is (", columns, ", ",
              data.size(1), ")");
  const int64_t group = group_size > 0 ? group_size : depth;
  TORCH_CHECK(group_size >= 0 && depth % group == 0, "w8a16_matmul: group_size ", group_size, " must divide K ",
              depth);
  const int64_t groups = depth / group;
  TORCH_CHECK(scale.numel() == columns * groups, "w8a16_matmul: scale holds ", scale.numel(), " values, expected ",
              columns * groups);

  at::Tensor out = at::empty({rows, columns}, x.options());
  const float* xs = x.data_ptr<float>();
  const int8_t* weights = data.data_ptr<int8_t>();
  const float* scales = scale.data_ptr<float>();
  float* outs = out.data_ptr<float>();
  if (rows == 0 || columns == 0) return out;
  at::parallel_for(0, columns, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < rows; m += kMaxRows) {
      const int64_t count = std::min(kMaxRows, rows - m);
      const RowKernel kernel = kRowKernels[count - 1];
      for (int64_t n = begin; n < end; ++n)
        kernel(xs + m * depth, depth, weights + n * depth, scales + n * groups, group, groups, outs + m * columns + n,
               columns);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hybridrag_cpu, m) {
  m.def("w8a16_matmul(Tensor x, Tensor data, Tensor scale, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridrag_cpu, CPU, m) { m.impl("w8a16_matmul", &w8a16_matmul); }
