// Hybrid attention on the CPU, forward and backward: the sliding window, landmark keys, global landmark rows, memory
// tokens and kv_start, in one softmax, as kernels/patterns.py defines them. A query at p (row i, p = i + Tk - Tq)
// sees key j iff j >= kv_start[b] and (not causal or j <= p) and (j in p's band, or j a landmark, or p a landmark with
// global_queries) and key_mask[b, j]; every query sees the memory tokens. Each key counts once.
//
// What a row sees is a few intervals: of the keys, its band (a global row: every key it may see), cut into the runs a
// key mask leaves visible; of the landmarks a key mask leaves visible, gathered once per kv head into an (L, D)
// buffer, the ones before and after its band; all memory tokens. Every row
// set (a block of query rows, with its global rows left out; then the global rows, a block at a time) runs through
// tiles of those three kinds of keys: scores from one float32 matmul per tile (gemm.h), the online softmax over the
// intervals (online_softmax.h), probabilities @ values in a second matmul. The backward recomputes the probabilities
// from lse; each task owns one (batch, kv head), its dk and dv and its landmark and memory gradients, which the
// landmark ones are added back to at their positions at the end.
//
// Non-finite values: as csrc/window_attention.cpp (the op reports a non-finite output; kernels/hybrid/cpu.py then
// takes the blockwise path's non-finite values and this kernel's on finite copies for the rest).
//
// Memory per task: (G * rows, 1024) float32 scores (and their gradients), the (L, D) landmark keys and values in
// float32 (and their gradients), widened key tiles for other dtypes; the backward adds float32 (Tk, D) dk and dv and
// (M, D) memory gradients per (batch, kv head) for the whole call. No Tq x Tk matrix.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "gemm.h"
#include "hybrid_pattern.h"
#include "vector_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace hybridrag_cpu::hybrid;
using hybridrag_cpu::gemm;
using hybridrag_cpu::Interval;
using hybridrag_cpu::kNegInf;
using hybridrag_cpu::Rows;

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
bool forward_set(const Rows<const T>& q, Operands<T>& ops, const Rows<T>& out, float* lse, const Pattern& pattern,
                 const RowSet& set, float scale, int64_t b, int64_t hkv, int64_t group, int64_t heads, int64_t tq) {
  const int64_t n = static_cast<int64_t>(set.rows.size()), m = group * n, dim = ops.dim;
  std::vector<float> query(m * dim), acc(m * dim, 0.f), max(m, kNegInf), sum(m, 0.f), scores;
  std::vector<Interval> parts;
  gather_queries(q, set, b, hkv, group, dim, query.data());
  for (const Tile& tile : tiles_for(pattern, set, b)) {
    const auto [keys, ldk, values, ldv] = ops.of(tile, b, hkv);
    scores.resize(m * tile.count);
    gemm(false, true, m, tile.count, dim, 1.f, query.data(), dim, keys, ldk, 0.f, scores.data(), tile.count);
    for (int64_t i = 0; i < m; ++i) {
      seen(pattern, set, b, i % n, tile, parts);
      hybridrag_cpu::online_softmax_row(&scores[i * tile.count], tile.count, parts.data(),
                                        static_cast<int>(parts.size()), scale, max[i], sum[i], &acc[i * dim], dim);
    }
    gemm(false, false, m, dim, tile.count, 1.f, scores.data(), tile.count, values, ldv, 1.f, acc.data(), dim);
  }
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = i % n;
    if (set.skip[r]) continue;
    const int64_t h = hkv * group + i / n, row = set.rows[r];
    float* a = &acc[i * dim];
    hybridrag_cpu::scale_in_place(a, dim, sum[i] > 0 ? 1.f / sum[i] : 0.f);
    finite = finite && hybridrag_cpu::all_finite(a, dim);
    at::vec::convert(a, out.at(b, h, row), dim);
    lse[(b * heads + h) * tq + row] = sum[i] > 0 ? max[i] + std::log(sum[i]) : kNegInf;
  }
  return finite;
}

template <typename T>
bool forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& memory_k,
             const c10::optional<at::Tensor>& memory_v, const Pattern& pattern, float scale, at::Tensor& out,
             at::Tensor& lse) {
  const int64_t batch = q.size(0), heads = q.size(1), tq = q.size(2), kv_heads = k.size(1), group = heads / kv_heads;
  const Rows<const T> qr(q);
  const Rows<T> outr(out);
  float* lse_data = lse.data_ptr<float>();
  const std::vector<RowSet> sets = row_sets(pattern, tq);
  const int64_t per_head = static_cast<int64_t>(sets.size());
  std::atomic<bool> finite{true};
  // one task per (batch, kv head, row set); the landmarks are gathered per task (L x D, small)
  at::parallel_for(0, batch * kv_heads * per_head, 1, [&](int64_t begin, int64_t end) {
    Operands<T> ops = operands<T>(k, v, memory_k, memory_v);
    int64_t gathered = -1;
    bool ok = true;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_head, b = bh / kv_heads, hkv = bh % kv_heads;
      if (gathered != bh) {
        ops.gather_landmarks(pattern, b, hkv);
        gathered = bh;
      }
      ok &= forward_set(qr, ops, outr, lse_data, pattern, sets[task % per_head], scale, b, hkv, group, heads, tq);
    }
    if (!ok) finite = false;
  });
  return finite.load();
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

struct Gradients {  // float32 gradient buffers of one (batch, kv head)
  float *dk, *dv, *landmark_dk, *landmark_dv, *memory_dk, *memory_dv;
  float* for_keys(const Tile& tile, bool values, int64_t dim) const {
    if (tile.kind == Kind::keys) return (values ? dv : dk) + tile.first * dim;
    if (tile.kind == Kind::landmarks) return (values ? landmark_dv : landmark_dk) + tile.first * dim;
    return values ? memory_dv : memory_dk;
  }
};

template <typename T>
bool backward_set(const Rows<const T>& q, const Rows<const T>& out, const Rows<const T>& grad_out, const float* lse,
                  const float* grad_lse, Operands<T>& ops, const Rows<T>& dq, const Gradients& grads,
                  const Pattern& pattern, const RowSet& set, float scale, int64_t b, int64_t hkv, int64_t group,
                  int64_t heads, int64_t tq) {
  const int64_t n = static_cast<int64_t>(set.rows.size()), m = group * n, dim = ops.dim;
  std::vector<float> query(m * dim), grad_o(m * dim), grad_q(m * dim, 0.f), delta(m), row_lse(m), row(dim), p, ds;
  std::vector<Interval> parts;
  gather_queries(q, set, b, hkv, group, dim, query.data());
  gather_queries(grad_out, set, b, hkv, group, dim, grad_o.data());
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = i % n, at = (b * heads + hkv * group + i / n) * tq + set.rows[r];
    at::vec::convert(out.at(b, hkv * group + i / n, set.rows[r]), row.data(), dim);
    delta[i] = hybridrag_cpu::dot(row.data(), &grad_o[i * dim], dim) - (grad_lse ? grad_lse[at] : 0.f);
    row_lse[i] = lse[at];
  }
  for (const Tile& tile : tiles_for(pattern, set, b)) {
    const int64_t c = tile.count;
    const auto [keys, ldk, values, ldv] = ops.of(tile, b, hkv);
    p.resize(m * c);
    ds.resize(m * c);
    gemm(false, true, m, c, dim, 1.f, query.data(), dim, keys, ldk, 0.f, p.data(), c);
    gemm(false, true, m, c, dim, 1.f, grad_o.data(), dim, values, ldv, 0.f, ds.data(), c);
    for (int64_t i = 0; i < m; ++i) {
      float* p_row = &p[i * c];
      float* ds_row = &ds[i * c];
      parts.clear();
      if (row_lse[i] != kNegInf) seen(pattern, set, b, i % n, tile, parts);
      int64_t done = 0;
      for (size_t s = 0; s < parts.size(); ++s) {
        if (parts[s].hi <= parts[s].lo) continue;
        std::fill(p_row + done, p_row + parts[s].lo, 0.f);
        std::fill(ds_row + done, ds_row + parts[s].lo, 0.f);
        const int64_t len = parts[s].hi - parts[s].lo;
        hybridrag_cpu::exp_in_place(p_row + parts[s].lo, len, scale, row_lse[i]);
        hybridrag_cpu::times_difference(p_row + parts[s].lo, ds_row + parts[s].lo, len, delta[i]);
        done = parts[s].hi;
      }
      std::fill(p_row + done, p_row + c, 0.f);
      std::fill(ds_row + done, ds_row + c, 0.f);
    }
    gemm(true, false, c, dim, m, 1.f, p.data(), c, grad_o.data(), dim, 1.f, grads.for_keys(tile, true, dim), dim);
    gemm(true, false, c, dim, m, scale, ds.data(), c, query.data(), dim, 1.f, grads.for_keys(tile, false, dim), dim);
    gemm(false, false, m, dim, c, scale, ds.data(), c, keys, ldk, 1.f, grad_q.data(), dim);
  }
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = i % n;
    if (set.skip[r]) continue;
    finite = finite && hybridrag_cpu::all_finite(&grad_q[i * dim], dim);
    at::vec::convert(&grad_q[i * dim], dq.at(b, hkv * group + i / n, set.rows[r]), dim);
  }
  return finite;
}

template <typename T>
bool backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse,
              const c10::optional<at::Tensor>& memory_k, const c10::optional<at::Tensor>& memory_v,
              const Pattern& pattern, float scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              at::Tensor& dmemory_k, at::Tensor& dmemory_v) {
  const int64_t batch = q.size(0), heads = q.size(1), tq = q.size(2), kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t tk = k.size(2), dim = q.size(3), memory = pattern.memory;
  const Rows<const T> qr(q), outr(out), gr(grad_out);
  const Rows<T> dqr(dq);
  const float* lse_data = lse.data_ptr<float>();
  const float* grad_lse_data = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  const std::vector<RowSet> sets = row_sets(pattern, tq);
  std::atomic<bool> finite{true};
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Operands<T> ops = operands<T>(k, v, memory_k, memory_v);
    std::vector<float> landmark_dk, landmark_dv;
    bool ok = true;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / kv_heads, hkv = bh % kv_heads, landmarks = pattern.num_marks(b);
      ops.gather_landmarks(pattern, b, hkv);
      landmark_dk.assign(landmarks * dim, 0.f);
      landmark_dv.assign(landmarks * dim, 0.f);
      float* dk_head = dk.data_ptr<float>() + bh * tk * dim;
      float* dv_head = dv.data_ptr<float>() + bh * tk * dim;
      const Gradients grads{dk_head, dv_head, landmark_dk.data(), landmark_dv.data(),
                            memory ? dmemory_k.data_ptr<float>() + bh * memory * dim : nullptr,
                            memory ? dmemory_v.data_ptr<float>() + bh * memory * dim : nullptr};
      for (const RowSet& set : sets)
        ok &= backward_set(qr, outr, gr, lse_data, grad_lse_data, ops, dqr, grads, pattern, set, scale, b, hkv, group,
                           heads, tq);
      for (int64_t i = 0; i < landmarks; ++i) {  // each landmark's key and value get what its column earned
        hybridrag_cpu::add_scaled(dk_head + pattern.marks(b)[i] * dim, &landmark_dk[i * dim], dim, 1.f);
        hybridrag_cpu::add_scaled(dv_head + pattern.marks(b)[i] * dim, &landmark_dv[i * dim], dim, 1.f);
      }
      ok = ok && hybridrag_cpu::all_finite(dk_head, tk * dim) && hybridrag_cpu::all_finite(dv_head, tk * dim);
      if (memory)
        ok = ok && hybridrag_cpu::all_finite(grads.memory_dk, memory * dim) &&
             hybridrag_cpu::all_finite(grads.memory_dv, memory * dim);
    }
    if (!ok) finite = false;
  });
  return finite.load();
}

// ---------------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& memory_k, const c10::optional<at::Tensor>& memory_v, double scale) {
  hybridrag_cpu::check_attention_inputs("hybrid attention", q, k, v, scale);
  TORCH_CHECK(memory_k.has_value() == memory_v.has_value(), "hybrid attention: memory_k and memory_v together");
  if (memory_k.has_value())
    TORCH_CHECK(memory_k->sizes() == memory_v->sizes() && memory_k->dim() == 4 &&
                    (memory_k->size(0) == 1 || memory_k->size(0) == q.size(0)) && memory_k->size(1) == k.size(1) &&
                    memory_k->size(3) == k.size(3) && memory_k->scalar_type() == q.scalar_type() &&
                    memory_v->scalar_type() == q.scalar_type() && memory_k->stride(3) == 1 && memory_v->stride(3) == 1,
                "hybrid attention: memory_k/v must be (1 or B, Hkv, M, D) in q's dtype with unit last strides");
}

std::tuple<at::Tensor, at::Tensor, bool> hybrid_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& landmarks,
    const c10::optional<at::Tensor>& memory_k, const c10::optional<at::Tensor>& memory_v,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& key_mask, int64_t left,
    int64_t right, bool causal, bool global_queries, double scale) {
  check_inputs(q, k, v, memory_k, memory_v, scale);
  const Pattern pattern =
      pattern_of(q, k, landmarks, memory_k, kv_start, key_mask, left, right, causal, global_queries);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  const float s = static_cast<float>(scale);
  bool finite;
  switch (q.scalar_type()) {
    case at::kFloat: finite = forward<float>(q, k, v, memory_k, memory_v, pattern, s, out, lse); break;
    case at::kBFloat16: finite = forward<c10::BFloat16>(q, k, v, memory_k, memory_v, pattern, s, out, lse); break;
    default: finite = forward<c10::Half>(q, k, v, memory_k, memory_v, pattern, s, out, lse); break;
  }
  return {out, lse, finite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> hybrid_attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& landmarks,
    const c10::optional<at::Tensor>& memory_k, const c10::optional<at::Tensor>& memory_v,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& key_mask, int64_t left,
    int64_t right, bool causal, bool global_queries, double scale) {
  check_inputs(q, k, v, memory_k, memory_v, scale);
  hybridrag_cpu::check_backward_inputs("hybrid attention", q, out, lse, grad_out, grad_lse);
  const Pattern pattern =
      pattern_of(q, k, landmarks, memory_k, kv_start, key_mask, left, right, causal, global_queries);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  const int64_t memory = pattern.memory;
  // per (batch, kv head): a batch-1 memory's gradient is summed over the batch by the caller
  at::Tensor dmemory_k = at::zeros({k.size(0), k.size(1), memory, k.size(3)}, f32);
  at::Tensor dmemory_v = at::zeros({k.size(0), k.size(1), memory, k.size(3)}, f32);
  const float s = static_cast<float>(scale);
  bool finite;
  switch (q.scalar_type()) {
    case at::kFloat:
      finite = backward<float>(q, k, v, out, lse, grad_out, grad_lse, memory_k, memory_v, pattern, s, dq, dk, dv,
                               dmemory_k, dmemory_v);
      break;
    case at::kBFloat16:
      finite = backward<c10::BFloat16>(q, k, v, out, lse, grad_out, grad_lse, memory_k, memory_v, pattern, s, dq, dk,
                                       dv, dmemory_k, dmemory_v);
      break;
    default:
      finite = backward<c10::Half>(q, k, v, out, lse, grad_out, grad_lse, memory_k, memory_v, pattern, s, dq, dk, dv,
                                   dmemory_k, dmemory_v);
      break;
  }
  return {dq, dk.to(k.scalar_type()), dv.to(v.scalar_type()), dmemory_k, dmemory_v, finite};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridrag_cpu, m) {
  m.def("hybrid_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor landmarks, Tensor? memory_k, Tensor? memory_v, "
        "Tensor? kv_start, Tensor? key_mask, int left, int right, bool causal, bool global_queries, float scale) -> "
        "(Tensor, Tensor, bool)");
  m.def("hybrid_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor grad_out, Tensor? grad_lse, "
        "Tensor landmarks, Tensor? memory_k, Tensor? memory_v, Tensor? kv_start, Tensor? key_mask, int left, "
        "int right, bool causal, bool global_queries, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(hybridrag_cpu, CPU, m) {
  m.impl("hybrid_attention_fwd", &hybrid_attention_fwd);
  m.impl("hybrid_attention_bwd", &hybrid_attention_bwd);
}
