// Row access to (B, H, T, D) tensors with unit last stride, and float32 views of their rows, for the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "vector_math.h"

#include <cstdint>
#include <type_traits>
#include <utility>

namespace hybridrag_cpu {

// A (B, H, T, D) tensor with unit last stride, read or written a row at a time.
template <typename T>
struct Rows {
  T* data;
  int64_t batch_stride, head_stride, row_stride;
  explicit Rows(const at::Tensor& x)
      : data(static_cast<T*>(x.data_ptr())), batch_stride(x.stride(0)), head_stride(x.stride(1)),
        row_stride(x.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t row) const {
    return data + b * batch_stride + h * head_stride + row * row_stride;
  }
};

// Rows [first, first + count) of head (b, h) as float32 into `dst` (count, dim), row after row.
template <typename T>
void widen_rows(const Rows<T>& x, int64_t b, int64_t h, int64_t first, int64_t count, int64_t dim, float* dst) {
  for (int64_t r = 0; r < count; ++r) at::vec::convert(x.at(b, h, first + r), dst + r * dim, dim);
}

// Rows [first, first + count) of head (b, h) as a float32 matrix: the tensor's memory itself when it is float32,
// else a widened copy in `buffer` (count * dim floats). Returns (pointer, leading dimension).
template <typename T>
std::pair<const float*, int64_t> float_rows(const Rows<T>& x, int64_t b, int64_t h, int64_t first, int64_t count,
                                            int64_t dim, float* buffer) {
  if constexpr (std::is_same_v<std::remove_const_t<T>, float>) {
    return {x.at(b, h, first), x.row_stride};
  } else {
    widen_rows(x, b, h, first, count, dim, buffer);
    return {buffer, dim};
  }
}

}  // namespace hybridrag_cpu
