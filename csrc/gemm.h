// Row-major float32 matrix products for the CPU kernels: C (m, n) = alpha * op(A) (m, k) @ op(B) (k, n) + beta * C.
// op(A) is A, stored (m, k) with leading dimension lda, or with trans_a the transpose of A stored (k, m); op(B) is B
// stored (k, n), or with trans_b the transpose of B stored (n, k).
//
// The product runs in the BLAS PyTorch links (MKL's sgemm_, looked up as a weak symbol so that a PyTorch without
// MKL still loads this library), called from inside at::parallel_for: one thread per product, no tensor objects,
// no allocation. Without sgemm_ it goes through at::mm_out on tensors wrapped around the same memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

extern "C" void sgemm_(const char* trans_a, const char* trans_b, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace hybridrag_cpu {

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    // Column-major BLAS sees each row-major matrix transposed: C^T (n, m) = op(B)^T @ op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  auto wrap = [&](const float* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
    at::Tensor x = at::from_blob(const_cast<float*>(data), {transposed ? cols : rows, transposed ? rows : cols},
                                 {ld, 1}, options);
    return transposed ? x.t() : x;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::addmm_out(out, out, wrap(a, m, k, lda, trans_a), wrap(b, k, n, ldb, trans_b), beta, alpha);
}

}  // namespace hybridrag_cpu
