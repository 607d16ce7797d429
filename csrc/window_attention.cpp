// Sliding-window attention on the CPU, forward and backward: out = softmax(q k^T * scale + band mask) v, where query
// row i (position p = i + Tk - Tq) sees the keys p - left .. p + right (-1: unbounded), as kernels/patterns.py
// defines it. A row touches only the contiguous run of keys it sees: no Tq x Tk matrix.
//
// Forward: at::parallel_for over (batch, kv head, block of query rows); a kv head's G query heads are stacked into
// one (G * rows, D) tile so they share each key tile. Per key tile (up to kKeyTile keys): the scores come from one
// float32 matmul (gemm.h), one vectorized pass masks the band's edges, updates each row's running max and sum (an
// online softmax) and leaves the probabilities in place, and a second matmul adds probabilities @ values to a float32
// accumulator. Backward: at::parallel_for over (batch, kv head), each task owning its dk and dv (no atomics); the
// probabilities are recomputed from lse, dS = P * (dP - delta) with delta = rowsum(o * do) - dlse.
//
// Every input dtype (float32, bfloat16, float16) multiplies in float32: query, key and value tiles of other dtypes
// are widened into per-thread buffers. (The bfloat16 matmuls at hand, oneDNN through at::mm, round their products
// to bfloat16, and scores so rounded lose ~2^-9 of their size.)
//
// Masked scores never enter a sum, but a matmul multiplies a hidden key's or value's NaN by the zero it meets. Each
// op's last output says whether every output value is finite; where one is not, the caller
// (kernels/sliding_window/cpu.py) runs the PyTorch path, which keeps NaN to the rows that see it, and this kernel on
// finite copies of the inputs for every other value.
//
// Memory per thread: (G * rows, D) query and accumulator tiles, (G * rows, kKeyTile) scores (the backward: and their
// gradients) in float32, widened key/value tiles; the backward adds float32 (Tk, D) dk and dv for the whole call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "gemm.h"
#include "online_softmax.h"
#include "tensor_rows.h"
#include "vector_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using hybridrag_cpu::gemm;
using hybridrag_cpu::Rows;
using hybridrag_cpu::widen_rows;
using hybridrag_cpu::kNegInf;
constexpr int64_t kKeyTile = 1024;  // keys per score tile: a block's whole band up to a window of ~960

// The band: the keys [lo, hi) query row `row` sees.
struct Band {
  int64_t left, right, offset, keys;
  int64_t lo(int64_t row) const { return left < 0 ? 0 : std::max<int64_t>(row + offset - left, 0); }
  int64_t hi(int64_t row) const {
    const int64_t end = right < 0 ? keys : std::min<int64_t>(row + offset + right + 1, keys);
    return std::max(end, lo(row));
  }
};

// Query rows per block: the rectangle of keys a block spans exceeds its band by about rows / window, and matmuls
// of fewer rows run further from their peak.
int64_t query_block(const Band& band, int64_t group) {
  const int64_t width = band.left < 0 || band.right < 0 ? band.keys : band.left + band.right + 1;
  const int64_t rows = width >= 256 ? 64 : 32;
  return std::max<int64_t>(8, rows / std::min<int64_t>(group, 4));
}

struct Shape {
  int64_t batch, heads, kv_heads, group, tq, tk, dim;
  explicit Shape(const at::Tensor& q, const at::Tensor& k)
      : batch(q.size(0)), heads(q.size(1)), kv_heads(k.size(1)), group(q.size(1) / k.size(1)), tq(q.size(2)),
        tk(k.size(2)), dim(q.size(3)) {}
};

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

struct ForwardScratch {
  std::vector<float> query, scores, acc, max, sum, keys, values;
  ForwardScratch(int64_t m, int64_t dim)
      : query(m * dim), scores(m * kKeyTile), acc(m * dim), max(m), sum(m), keys(kKeyTile * dim),
        values(kKeyTile * dim) {}
};

// The rows [first, first + rows) of kv head (b, hkv)'s query heads; returns whether every output is finite.
template <typename T>
bool forward_block(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const Rows<T>& out, float* lse,
                   const Shape& s, const Band& band, float scale, int64_t b, int64_t hkv, int64_t first,
                   int64_t rows, ForwardScratch& w) {
  const int64_t m = s.group * rows, dim = s.dim;
  for (int64_t g = 0; g < s.group; ++g) widen_rows(q, b, hkv * s.group + g, first, rows, dim, &w.query[g * rows * dim]);
  std::fill_n(w.acc.data(), m * dim, 0.f);
  std::fill_n(w.max.data(), m, kNegInf);
  std::fill_n(w.sum.data(), m, 0.f);
  const int64_t key_lo = band.lo(first), key_hi = band.hi(first + rows - 1);
  for (int64_t tile_lo = key_lo; tile_lo < key_hi; tile_lo += kKeyTile) {
    const int64_t n = std::min(kKeyTile, key_hi - tile_lo);
    const auto [keys, ldk] = hybridrag_cpu::float_rows(k, b, hkv, tile_lo, n, dim, w.keys.data());
    const auto [values, ldv] = hybridrag_cpu::float_rows(v, b, hkv, tile_lo, n, dim, w.values.data());
    float* scores = w.scores.data();  // (m, n), leading dimension n
    gemm(false, true, m, n, dim, 1.f, w.query.data(), dim, keys, ldk, 0.f, scores, n);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = first + i % rows;
      const hybridrag_cpu::Interval seen{std::max(band.lo(r), tile_lo) - tile_lo,
                                         std::min(band.hi(r), tile_lo + n) - tile_lo};
      hybridrag_cpu::online_softmax_row(scores + i * n, n, &seen, 1, scale, w.max[i], w.sum[i], &w.acc[i * dim], dim);
    }
    gemm(false, false, m, dim, n, 1.f, scores, n, values, ldv, 1.f, w.acc.data(), dim);
  }
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t h = hkv * s.group + i / rows, r = first + i % rows;
    const float total = w.sum[i];
    float* row = &w.acc[i * dim];
    hybridrag_cpu::scale_in_place(row, dim, total > 0 ? 1.f / total : 0.f);
    finite = finite && hybridrag_cpu::all_finite(row, dim);
    at::vec::convert(row, out.at(b, h, r), dim);
    lse[(b * s.heads + h) * s.tq + r] = total > 0 ? w.max[i] + std::log(total) : kNegInf;
  }
  return finite;
}

template <typename T>
bool forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             const Band& band, float scale) {
  const Shape s(q, k);
  const Rows<T> qr(q), kr(k), vr(v), outr(out);
  float* lse_data = lse.data_ptr<float>();
  const int64_t rows = query_block(band, s.group), blocks = (s.tq + rows - 1) / rows;
  std::atomic<bool> finite{true};
  at::parallel_for(0, s.batch * s.kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch scratch(s.group * rows, s.dim);
    bool ok = true;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks, bh = task / blocks, first = block * rows;
      ok &= forward_block(qr, kr, vr, outr, lse_data, s, band, scale, bh / s.kv_heads, bh % s.kv_heads, first,
                          std::min(rows, s.tq - first), scratch);
    }
    if (!ok) finite = false;
  });
  return finite.load();
}

std::tuple<at::Tensor, at::Tensor, bool> window_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, int64_t left, int64_t right,
                                                              double scale) {
  hybridrag_cpu::check_attention_inputs("window attention", q, k, v, scale);
  const Band band{left, right, k.size(2) - q.size(2), k.size(2)};
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  const float s = static_cast<float>(scale);
  bool finite;
  switch (q.scalar_type()) {
    case at::kFloat: finite = forward<float>(q, k, v, out, lse, band, s); break;
    case at::kBFloat16: finite = forward<c10::BFloat16>(q, k, v, out, lse, band, s); break;
    default: finite = forward<c10::Half>(q, k, v, out, lse, band, s); break;
  }
  return {out, lse, finite};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

struct BackwardScratch {
  std::vector<float> query, grad_out, scores, grad_scores, grad_query, delta, lse, keys, values, row;
  BackwardScratch(int64_t m, int64_t dim)
      : query(m * dim), grad_out(m * dim), scores(m * kKeyTile), grad_scores(m * kKeyTile), grad_query(m * dim),
        delta(m), lse(m), keys(kKeyTile * dim), values(kKeyTile * dim), row(dim) {}
};

// Every query block of kv head (b, hkv)'s query heads against its keys: dq written, dk and dv (float32 (Tk, D))
// summed. Returns whether every dq value is finite.
template <typename T>
bool backward_head(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const Rows<T>& out, const float* lse,
                   const Rows<T>& grad_out, const float* grad_lse, const Rows<T>& dq, float* dk, float* dv,
                   const Shape& s, const Band& band, float scale, int64_t b, int64_t hkv, int64_t block_rows,
                   BackwardScratch& w) {
  const int64_t dim = s.dim;
  bool finite = true;
  for (int64_t first = 0; first < s.tq; first += block_rows) {
    const int64_t rows = std::min(block_rows, s.tq - first), m = s.group * rows;
    const int64_t key_lo = band.lo(first), key_hi = band.hi(first + rows - 1);
    std::fill_n(w.grad_query.data(), m * dim, 0.f);
    if (key_hi > key_lo) {
      for (int64_t g = 0; g < s.group; ++g) {
        const int64_t h = hkv * s.group + g;
        widen_rows(q, b, h, first, rows, dim, &w.query[g * rows * dim]);
        widen_rows(grad_out, b, h, first, rows, dim, &w.grad_out[g * rows * dim]);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = g * rows + r, at = (b * s.heads + h) * s.tq + first + r;
          at::vec::convert(out.at(b, h, first + r), w.row.data(), dim);
          w.delta[i] = hybridrag_cpu::dot(w.row.data(), &w.grad_out[i * dim], dim) - (grad_lse ? grad_lse[at] : 0.f);
          w.lse[i] = lse[at];
        }
      }
      for (int64_t tile_lo = key_lo; tile_lo < key_hi; tile_lo += kKeyTile) {
        const int64_t n = std::min(kKeyTile, key_hi - tile_lo);
        const auto [keys, ldk] = hybridrag_cpu::float_rows(k, b, hkv, tile_lo, n, dim, w.keys.data());
        const auto [values, ldv] = hybridrag_cpu::float_rows(v, b, hkv, tile_lo, n, dim, w.values.data());
        float* p = w.scores.data();
        float* ds = w.grad_scores.data();
        gemm(false, true, m, n, dim, 1.f, w.query.data(), dim, keys, ldk, 0.f, p, n);
        gemm(false, true, m, n, dim, 1.f, w.grad_out.data(), dim, values, ldv, 0.f, ds, n);
        for (int64_t i = 0; i < m; ++i) {
          float* p_row = p + i * n;
          float* ds_row = ds + i * n;
          const int64_t r = first + i % rows;
          const int64_t lo = std::max(band.lo(r), tile_lo) - tile_lo,
                        hi = std::min(band.hi(r), tile_lo + n) - tile_lo;
          if (hi <= lo || w.lse[i] == kNegInf) {
            std::fill_n(p_row, n, 0.f);
            std::fill_n(ds_row, n, 0.f);
            continue;
          }
          hybridrag_cpu::exp_in_place(p_row + lo, hi - lo, scale, w.lse[i]);
          hybridrag_cpu::times_difference(p_row + lo, ds_row + lo, hi - lo, w.delta[i]);  // ds = p * (dp - delta)
          for (float* x : {p_row, ds_row}) {
            std::fill(x, x + lo, 0.f);
            std::fill(x + hi, x + n, 0.f);
          }
        }
        gemm(true, false, n, dim, m, 1.f, p, n, w.grad_out.data(), dim, 1.f, dv + tile_lo * dim, dim);
        gemm(true, false, n, dim, m, scale, ds, n, w.query.data(), dim, 1.f, dk + tile_lo * dim, dim);
        gemm(false, false, m, dim, n, scale, ds, n, keys, ldk, 1.f, w.grad_query.data(), dim);
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      const float* row = &w.grad_query[i * dim];
      finite = finite && hybridrag_cpu::all_finite(row, dim);
      at::vec::convert(row, dq.at(b, hkv * s.group + i / rows, first + i % rows), dim);
    }
  }
  return finite;
}

template <typename T>
bool backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const Band& band, float scale) {
  const Shape s(q, k);
  const Rows<T> qr(q), kr(k), vr(v), outr(out), gr(grad_out), dqr(dq);
  const float* lse_data = lse.data_ptr<float>();
  const float* grad_lse_data = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  float* dk_data = dk.data_ptr<float>();
  float* dv_data = dv.data_ptr<float>();
  const int64_t rows = query_block(band, s.group);
  std::atomic<bool> finite{true};
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    BackwardScratch scratch(s.group * rows, s.dim);
    bool ok = true;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t offset = task * s.tk * s.dim;
      ok &= backward_head(qr, kr, vr, outr, lse_data, gr, grad_lse_data, dqr, dk_data + offset, dv_data + offset, s,
                          band, scale, task / s.kv_heads, task % s.kv_heads, rows, scratch);
      ok = ok && hybridrag_cpu::all_finite(dk_data + offset, s.tk * s.dim) &&
           hybridrag_cpu::all_finite(dv_data + offset, s.tk * s.dim);
    }
    if (!ok) finite = false;
  });
  return finite.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> window_attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, int64_t left, int64_t right, double scale) {
  hybridrag_cpu::check_attention_inputs("window attention", q, k, v, scale);
  hybridrag_cpu::check_backward_inputs("window attention", q, out, lse, grad_out, grad_lse);
  const Band band{left, right, k.size(2) - q.size(2), k.size(2)};
  at::Tensor dq = at::empty(q.sizes(), q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  const float s = static_cast<float>(scale);
  bool finite;
  switch (q.scalar_type()) {
    case at::kFloat: finite = backward<float>(q, k, v, out, lse, grad_out, grad_lse, dq, dk, dv, band, s); break;
    case at::kBFloat16:
      finite = backward<c10::BFloat16>(q, k, v, out, lse, grad_out, grad_lse, dq, dk, dv, band, s);
      break;
    default: finite = backward<c10::Half>(q, k, v, out, lse, grad_out, grad_lse, dq, dk, dv, band, s); break;
  }
  return {dq, dk.to(k.scalar_type()), dv.to(v.scalar_type()), finite};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridrag_cpu, m) {
  m.def("window_attention_fwd(Tensor q, Tensor k, Tensor v, int left, int right, float scale) -> "
        "(Tensor, Tensor, bool)");
  m.def("window_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, "
        "Tensor? grad_lse, int left, int right, float scale) -> (Tensor, Tensor, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(hybridrag_cpu, CPU, m) {
  m.impl("window_attention_fwd", &window_attention_fwd);
  m.impl("window_attention_bwd", &window_attention_bwd);
}
