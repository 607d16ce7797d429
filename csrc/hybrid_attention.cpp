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
#include "online_softmax.h"
#include "tensor_rows.h"
#include "vector_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using hybridrag_cpu::gemm;
using hybridrag_cpu::Interval;
using hybridrag_cpu::kNegInf;
using hybridrag_cpu::Rows;
constexpr int64_t kKeyTile = 1024;
constexpr int64_t kRows = 64;  // query rows per row set

struct Pattern {
  int64_t left, right, offset, keys;
  bool causal, global_queries;
  const int64_t* landmarks;
  int64_t num_landmarks, memory;
  const int64_t* kv_start;  // (B,) or nullptr
  // With a key mask: per batch row, the runs of keys it leaves visible, and the landmarks it leaves visible (a
  // hidden landmark is no key at all; a landmark row stays a global row). Empty without a key mask.
  std::vector<std::vector<Interval>> visible_runs;
  std::vector<std::vector<int64_t>> visible_landmarks;

  bool masked() const { return !visible_runs.empty(); }
  const int64_t* marks(int64_t b) const { return masked() ? visible_landmarks[b].data() : landmarks; }
  int64_t num_marks(int64_t b) const {
    return masked() ? static_cast<int64_t>(visible_landmarks[b].size()) : num_landmarks;
  }
  int64_t first_key(int64_t b) const { return kv_start ? std::clamp<int64_t>(kv_start[b], 0, keys) : 0; }
  int64_t end_key(int64_t row) const { return causal ? std::clamp<int64_t>(row + offset + 1, 0, keys) : keys; }
  int64_t landmarks_below(int64_t b, int64_t position) const {
    return std::lower_bound(marks(b), marks(b) + num_marks(b), position) - marks(b);
  }
  bool is_global(int64_t row) const {
    return global_queries && std::binary_search(landmarks, landmarks + num_landmarks, row + offset);
  }
  // The keys of row `row` seen in its band (a global row: all it may see).
  Interval main(int64_t b, int64_t row, bool global) const {
    const int64_t p = row + offset, lo_key = first_key(b), end = end_key(row);
    if (global) return {lo_key, std::max(end, lo_key)};
    const int64_t lo = std::max(lo_key, left < 0 ? 0 : p - left);
    const int64_t hi = std::min(end, right < 0 ? keys : p + right + 1);
    return {std::min(lo, std::max(hi, lo)), std::max(hi, lo)};
  }
  // The landmarks (as indices into the sorted list) row `row` sees outside its band: before it and after it.
  int seen_landmarks(int64_t b, int64_t row, Interval band, Interval* out) const {
    const int64_t lo_key = first_key(b), end = std::max(end_key(row), lo_key);
    out[0] = {landmarks_below(b, lo_key), landmarks_below(b, std::clamp(band.lo, lo_key, end))};
    out[1] = {landmarks_below(b, std::clamp(band.hi, lo_key, end)), landmarks_below(b, end)};
    out[1].lo = std::max(out[1].lo, out[0].hi);
    return 2;
  }
};

enum class Kind { keys, landmarks, memory };

struct Tile {  // keys [first, first + count) of one kind
  Kind kind;
  int64_t first, count;
};

// One row set: which rows, and what each of them sees.
struct RowSet {
  std::vector<int64_t> rows;  // query rows (within Tq) of every head of the group
  std::vector<char> global;   // the row is a global row (it sees every key it may see)
  std::vector<char> skip;     // the row is computed elsewhere (a global row in its block)
};

Interval clip(Interval x, const Tile& tile) {
  const int64_t lo = std::clamp(x.lo, tile.first, tile.first + tile.count) - tile.first;
  const int64_t hi = std::clamp(x.hi, tile.first, tile.first + tile.count) - tile.first;
  return {lo, std::max(lo, hi)};
}

// What row r (index into the set) sees of `tile`, as ascending intervals of the tile's keys, into `out`.
void seen(const Pattern& pattern, const RowSet& set, int64_t b, int64_t r, const Tile& tile,
          std::vector<Interval>& out) {
  out.clear();
  if (set.skip[r]) return;
  const int64_t row = set.rows[r];
  const Interval band = pattern.main(b, row, set.global[r]);
  if (tile.kind == Kind::keys) {
    if (!pattern.masked()) {
      out.push_back(clip(band, tile));
      return;
    }
    for (const Interval& run : pattern.visible_runs[b]) {  // the band's visible runs
      const Interval part = clip({std::max(run.lo, band.lo), std::min(run.hi, band.hi)}, tile);
      if (part.hi > part.lo) out.push_back(part);
    }
    return;
  }
  if (tile.kind == Kind::memory) {
    out.push_back({0, tile.count});
    return;
  }
  if (set.global[r]) return;  // its band already holds every landmark it may see
  Interval marks[2];
  pattern.seen_landmarks(b, row, band, marks);
  out.push_back(clip(marks[0], tile));
  out.push_back(clip(marks[1], tile));
}

std::vector<Tile> tiles_for(const Pattern& pattern, const RowSet& set, int64_t b) {
  const int64_t landmarks = pattern.num_marks(b);
  int64_t lo = pattern.keys, hi = 0;
  for (size_t r = 0; r < set.rows.size(); ++r) {
    if (set.skip[r]) continue;
    const Interval band = pattern.main(b, set.rows[r], set.global[r]);
    if (band.hi > band.lo) {
      lo = std::min(lo, band.lo);
      hi = std::max(hi, band.hi);
    }
  }
  std::vector<Tile> tiles;
  for (int64_t first = lo; first < hi; first += kKeyTile)
    tiles.push_back({Kind::keys, first, std::min(kKeyTile, hi - first)});
  for (int64_t first = 0; first < landmarks; first += kKeyTile)
    tiles.push_back({Kind::landmarks, first, std::min(kKeyTile, landmarks - first)});
  if (pattern.memory > 0) tiles.push_back({Kind::memory, 0, pattern.memory});
  return tiles;
}

// The row sets of one (batch, kv head): blocks of kRows query rows (global rows skipped), then the global rows.
std::vector<RowSet> row_sets(const Pattern& pattern, int64_t tq) {
  std::vector<RowSet> sets;
  std::vector<int64_t> globals;
  for (int64_t first = 0; first < tq; first += kRows) {
    RowSet set;
    for (int64_t row = first; row < std::min(tq, first + kRows); ++row) {
      const bool global = pattern.is_global(row);
      set.rows.push_back(row);
      set.global.push_back(0);
      set.skip.push_back(global);
      if (global) globals.push_back(row);
    }
    sets.push_back(std::move(set));
  }
  for (size_t first = 0; first < globals.size(); first += kRows) {
    RowSet set;
    for (size_t i = first; i < std::min(globals.size(), first + kRows); ++i) {
      set.rows.push_back(globals[i]);
      set.global.push_back(1);
      set.skip.push_back(0);
    }
    sets.push_back(std::move(set));
  }
  return sets;
}

// The float32 keys and values of one (batch, kv head): tiles of the keys read in place (or widened), the landmarks
// gathered, the memory tokens.
template <typename T>
struct Operands {
  Rows<const T> k, v;
  std::optional<Rows<const T>> memory_k, memory_v;
  int64_t memory_batch, dim;
  std::vector<float> landmark_k, landmark_v, key_buffer, value_buffer;

  void gather_landmarks(const Pattern& pattern, int64_t b, int64_t h) {
    const int64_t count = pattern.num_marks(b);
    const int64_t* marks = pattern.marks(b);
    landmark_k.resize(count * dim);
    landmark_v.resize(count * dim);
    for (int64_t i = 0; i < count; ++i) {
      at::vec::convert(k.at(b, h, marks[i]), &landmark_k[i * dim], dim);
      at::vec::convert(v.at(b, h, marks[i]), &landmark_v[i * dim], dim);
    }
  }
  // (keys, ldk, values, ldv) of a tile
  std::tuple<const float*, int64_t, const float*, int64_t> of(const Tile& tile, int64_t b, int64_t h) {
    if (tile.kind == Kind::landmarks)
      return {&landmark_k[tile.first * dim], dim, &landmark_v[tile.first * dim], dim};
    key_buffer.resize(tile.count * dim);
    value_buffer.resize(tile.count * dim);
    const Rows<const T>& keys = tile.kind == Kind::keys ? k : *memory_k;
    const Rows<const T>& values = tile.kind == Kind::keys ? v : *memory_v;
    const int64_t batch = tile.kind == Kind::keys ? b : (memory_batch == 1 ? 0 : b);
    const auto [kp, ldk] = hybridrag_cpu::float_rows(keys, batch, h, tile.first, tile.count, dim, key_buffer.data());
    const auto [vp, ldv] = hybridrag_cpu::float_rows(values, batch, h, tile.first, tile.count, dim,
                                                     value_buffer.data());
    return {kp, ldk, vp, ldv};
  }
};

template <typename T>
Operands<T> operands(const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& memory_k,
                     const c10::optional<at::Tensor>& memory_v) {
  Operands<T> ops{Rows<const T>(k), Rows<const T>(v), std::nullopt, std::nullopt, 1, k.size(3), {}, {}, {}, {}};
  if (memory_k.has_value()) {
    ops.memory_k.emplace(*memory_k);
    ops.memory_v.emplace(*memory_v);
    ops.memory_batch = memory_k->size(0);
  }
  return ops;
}

// Query rows of the set, every head of kv head hkv's group, as float32 (G * n, D): head after head.
template <typename T>
void gather_queries(const Rows<const T>& x, const RowSet& set, int64_t b, int64_t hkv, int64_t group, int64_t dim,
                    float* out) {
  const int64_t n = static_cast<int64_t>(set.rows.size());
  for (int64_t g = 0; g < group; ++g)
    for (int64_t r = 0; r < n; ++r)
      at::vec::convert(x.at(b, hkv * group + g, set.rows[r]), out + (g * n + r) * dim, dim);
}

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

Pattern pattern_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& landmarks,
                   const c10::optional<at::Tensor>& memory_k, const c10::optional<at::Tensor>& kv_start,
                   const c10::optional<at::Tensor>& key_mask, int64_t left, int64_t right, bool causal,
                   bool global_queries) {
  TORCH_CHECK(!key_mask.has_value() || (key_mask->scalar_type() == at::kBool && key_mask->is_contiguous() &&
                                        key_mask->dim() == 2 && key_mask->size(0) == q.size(0) &&
                                        key_mask->size(1) == k.size(2)),
              "hybrid attention: key_mask must be contiguous bool (B, Tk)");
  TORCH_CHECK(landmarks.dim() == 1 && landmarks.scalar_type() == at::kLong && landmarks.is_contiguous(),
              "hybrid attention: landmarks must be contiguous int64 (L,)");
  TORCH_CHECK(!kv_start.has_value() || (kv_start->scalar_type() == at::kLong && kv_start->is_contiguous() &&
                                        kv_start->numel() == q.size(0)),
              "hybrid attention: kv_start must be contiguous int64 (B,)");
  const int64_t* marks = landmarks.data_ptr<int64_t>();
  for (int64_t i = 0; i < landmarks.numel(); ++i)
    TORCH_CHECK(marks[i] >= 0 && marks[i] < k.size(2) && (i == 0 || marks[i] > marks[i - 1]),
                "hybrid attention: landmarks must be sorted, distinct positions in [0, Tk)");
  Pattern pattern{left, right, k.size(2) - q.size(2), k.size(2), causal, global_queries, marks, landmarks.numel(),
                  memory_k.has_value() ? memory_k->size(2) : 0,
                  kv_start.has_value() ? kv_start->data_ptr<int64_t>() : nullptr, {}, {}};
  if (key_mask.has_value()) {
    const bool* mask = key_mask->data_ptr<bool>();
    const int64_t batch = q.size(0), tk = k.size(2);
    pattern.visible_runs.resize(batch);
    pattern.visible_landmarks.resize(batch);
    for (int64_t b = 0; b < batch; ++b) {
      const bool* row = mask + b * tk;
      for (int64_t j = 0; j < tk;) {
        if (!row[j]) {
          ++j;
          continue;
        }
        const int64_t start = j;
        while (j < tk && row[j]) ++j;
        pattern.visible_runs[b].push_back({start, j});
      }
      for (int64_t i = 0; i < landmarks.numel(); ++i)
        if (row[marks[i]]) pattern.visible_landmarks[b].push_back(marks[i]);
    }
  }
  return pattern;
}

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
