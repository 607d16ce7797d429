// Attention mass on the CPU: for each (batch, head), the probability the selected query rows give to the keys of
// each segment, weighted by row (hybridrag.attention_mass; the pattern is the hybrid one, csrc/hybrid_pattern.h).
//
// One task per (batch, kv head, row set), in two passes over the row set's tiles: the scores' log-sum-exp of every
// row (the online softmax of the forward, without values), then the scores again, turned into probabilities
// exp(s * scale - lse) on what each row sees, weighted by the row's weight and summed over rows (one (1 x n) @ (n x
// tile) product per head) into the tile's key columns, which add to their keys' segments. A row set whose rows all
// have weight 0 is skipped. Each parallel chunk sums into its own (B, H, S + 1) buffer; the buffers are added under a
// lock at the end of the chunk (S + 1: the bin of keys in no segment, dropped).
//
// Non-finite values: a non-finite score seen by a row makes its lse NaN, and the op reports a non-finite mass;
// kernels/hybrid/cpu.py then takes the blockwise path's non-finite values and this kernel's on finite copies.
//
// Memory per task: (G * rows, 1024) float32 scores, the (L, D) landmark keys in float32, widened key tiles for other
// dtypes; per chunk a (B, H, S + 1) float32 sum. No Tq x Tk matrix.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "gemm.h"
#include "hybrid_pattern.h"
#include "vector_math.h"

#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

namespace {

using namespace hybridrag_cpu::hybrid;
using hybridrag_cpu::gemm;
using hybridrag_cpu::Interval;
using hybridrag_cpu::kNegInf;
using hybridrag_cpu::Rows;

struct Segments {
  const int64_t* ids;        // (B, Tk): the segment of each key, < 0 for none
  const float* row_weights;  // (B, Tq)
  int64_t num, keys, rows;
  int64_t bin(int64_t b, int64_t key) const {
    const int64_t id = ids[b * keys + key];
    return id < 0 ? num : id;
  }
};

// The log-sum-exp of every row of the set (G * n), -inf for a row that sees nothing, NaN for one that saw a
// non-finite score. `query` holds the set's rows as float32.
template <typename T>
void row_lse(const float* query, Operands<T>& ops, const Pattern& pattern, const RowSet& set, float scale, int64_t b,
             int64_t hkv, int64_t m, const std::vector<Tile>& tiles, float* lse) {
  const int64_t n = static_cast<int64_t>(set.rows.size()), dim = ops.dim;
  std::vector<float> max(m, kNegInf), sum(m, 0.f), scores;
  std::vector<Interval> parts;
  for (const Tile& tile : tiles) {
    const auto [keys, ldk, unused_values, unused_ldv] = ops.of(tile, b, hkv);
    scores.resize(m * tile.count);
    gemm(false, true, m, tile.count, dim, 1.f, query, dim, keys, ldk, 0.f, scores.data(), tile.count);
    for (int64_t i = 0; i < m; ++i) {
      seen(pattern, set, b, i % n, tile, parts);
      hybridrag_cpu::online_softmax_row(&scores[i * tile.count], tile.count, parts.data(),
                                        static_cast<int>(parts.size()), scale, max[i], sum[i], nullptr, 0);
    }
  }
  for (int64_t i = 0; i < m; ++i)  // a NaN sum (a non-finite score seen) gives a NaN lse
    lse[i] = sum[i] > 0 || std::isnan(sum[i]) ? max[i] + std::log(sum[i]) : kNegInf;
}

// Adds the set's weighted probabilities to `mass` (B, H, S + 1); false when a row's lse is not finite (NaN).
template <typename T>
bool mass_set(const Rows<const T>& q, Operands<T>& ops, const Pattern& pattern, const RowSet& set,
              const Segments& segments, float scale, int64_t b, int64_t hkv, int64_t group, int64_t heads,
              float* mass) {
  const int64_t n = static_cast<int64_t>(set.rows.size()), m = group * n, dim = ops.dim;
  std::vector<float> weights(n);
  bool any = false;
  for (int64_t r = 0; r < n; ++r) {
    weights[r] = set.skip[r] ? 0.f : segments.row_weights[b * segments.rows + set.rows[r]];
    any = any || weights[r] != 0.f;
  }
  if (!any) return true;
  std::vector<float> query(m * dim), lse(m), p, column;
  std::vector<Interval> parts;
  gather_queries(q, set, b, hkv, group, dim, query.data());
  const std::vector<Tile> tiles = tiles_for(pattern, set, b);
  row_lse(query.data(), ops, pattern, set, scale, b, hkv, m, tiles, lse.data());
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) finite = finite && !std::isnan(lse[i]);
  for (const Tile& tile : tiles) {
    const int64_t c = tile.count;
    const auto [keys, ldk, unused_values, unused_ldv] = ops.of(tile, b, hkv);
    p.resize(m * c);
    column.resize(c);
    gemm(false, true, m, c, dim, 1.f, query.data(), dim, keys, ldk, 0.f, p.data(), c);
    for (int64_t i = 0; i < m; ++i) {
      float* row = &p[i * c];
      parts.clear();
      if (weights[i % n] != 0.f && lse[i] != kNegInf) seen(pattern, set, b, i % n, tile, parts);
      int64_t done = 0;
      for (const Interval& part : parts) {
        if (part.hi <= part.lo) continue;
        std::fill(row + done, row + part.lo, 0.f);
        hybridrag_cpu::exp_in_place(row + part.lo, part.hi - part.lo, scale, lse[i]);
        done = part.hi;
      }
      std::fill(row + done, row + c, 0.f);
    }
    for (int64_t g = 0; g < group; ++g) {
      gemm(false, false, 1, c, n, 1.f, weights.data(), n, &p[g * n * c], c, 0.f, column.data(), c);
      float* head_mass = mass + (b * heads + hkv * group + g) * (segments.num + 1);
      if (tile.kind == Kind::keys) {
        for (int64_t j = 0; j < c; ++j) head_mass[segments.bin(b, tile.first + j)] += column[j];
      } else if (tile.kind == Kind::landmarks) {
        for (int64_t j = 0; j < c; ++j) head_mass[segments.bin(b, pattern.marks(b)[tile.first + j])] += column[j];
      }  // memory tokens belong to no segment
    }
  }
  return finite;
}

template <typename T>
bool attention_mass(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& memory_k,
                    const Pattern& pattern, const Segments& segments, float scale, at::Tensor& mass) {
  const int64_t batch = q.size(0), heads = q.size(1), tq = q.size(2), kv_heads = k.size(1), group = heads / kv_heads;
  const Rows<const T> qr(q);
  const std::vector<RowSet> sets = row_sets(pattern, tq);
  const int64_t per_head = static_cast<int64_t>(sets.size()), bins = batch * heads * (segments.num + 1);
  float* total = mass.data_ptr<float>();
  std::atomic<bool> finite{true};
  std::mutex adding;
  at::parallel_for(0, batch * kv_heads * per_head, 1, [&](int64_t begin, int64_t end) {
    Operands<T> ops = operands<T>(k, k, memory_k, memory_k);  // the keys stand in for the values, never read
    ops.with_values = false;
    std::vector<float> local(bins, 0.f);
    int64_t gathered = -1;
    bool ok = true;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_head, b = bh / kv_heads, hkv = bh % kv_heads;
      if (gathered != bh) {
        ops.gather_landmarks(pattern, b, hkv);
        gathered = bh;
      }
      ok &= mass_set(qr, ops, pattern, sets[task % per_head], segments, scale, b, hkv, group, heads, local.data());
    }
    const std::lock_guard<std::mutex> lock(adding);
    hybridrag_cpu::add_scaled(total, local.data(), bins, 1.f);
    if (!ok) finite = false;
  });
  return finite.load() && hybridrag_cpu::all_finite(total, bins);
}

// (B, H, S) float32 attention mass, and whether it is finite.
std::tuple<at::Tensor, bool> hybrid_attention_mass(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& segments, int64_t num_segments,
    const at::Tensor& row_weights, const at::Tensor& landmarks, const c10::optional<at::Tensor>& memory_k,
    const c10::optional<at::Tensor>& kv_start, const c10::optional<at::Tensor>& key_mask, int64_t left,
    int64_t right, bool causal, bool global_queries, double scale) {
  hybridrag_cpu::check_attention_inputs("attention mass", q, k, k, scale);
  TORCH_CHECK(!memory_k.has_value() ||
                  (memory_k->dim() == 4 && (memory_k->size(0) == 1 || memory_k->size(0) == q.size(0)) &&
                   memory_k->size(1) == k.size(1) && memory_k->size(3) == k.size(3) &&
                   memory_k->scalar_type() == q.scalar_type() && memory_k->stride(3) == 1),
              "attention mass: memory_k must be (1 or B, Hkv, M, D) in q's dtype with a unit last stride");
  TORCH_CHECK(num_segments >= 0, "attention mass: num_segments must be >= 0");
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.is_contiguous() && segments.dim() == 2 &&
                  segments.size(0) == q.size(0) && segments.size(1) == k.size(2),
              "attention mass: segments must be contiguous int64 (B, Tk)");
  TORCH_CHECK(row_weights.scalar_type() == at::kFloat && row_weights.is_contiguous() && row_weights.dim() == 2 &&
                  row_weights.size(0) == q.size(0) && row_weights.size(1) == q.size(2),
              "attention mass: row_weights must be contiguous float32 (B, Tq)");
  const int64_t* ids = segments.data_ptr<int64_t>();
  for (int64_t i = 0; i < segments.numel(); ++i)
    TORCH_CHECK(ids[i] < num_segments, "attention mass: segment ids must be < num_segments");
  const Pattern pattern =
      pattern_of(q, k, landmarks, memory_k, kv_start, key_mask, left, right, causal, global_queries);
  const Segments bins{ids, row_weights.data_ptr<float>(), num_segments, k.size(2), q.size(2)};
  at::Tensor mass = at::zeros({q.size(0), q.size(1), num_segments + 1}, q.options().dtype(at::kFloat));
  const float s = static_cast<float>(scale);
  bool finite;
  switch (q.scalar_type()) {
    case at::kFloat: finite = attention_mass<float>(q, k, memory_k, pattern, bins, s, mass); break;
    case at::kBFloat16: finite = attention_mass<c10::BFloat16>(q, k, memory_k, pattern, bins, s, mass); break;
    default: finite = attention_mass<c10::Half>(q, k, memory_k, pattern, bins, s, mass); break;
  }
  return {mass.narrow(2, 0, num_segments).contiguous(), finite};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridrag_cpu, m) {
  m.def("hybrid_attention_mass(Tensor q, Tensor k, Tensor segments, int num_segments, Tensor row_weights, "
        "Tensor landmarks, Tensor? memory_k, Tensor? kv_start, Tensor? key_mask, int left, int right, bool causal, "
        "bool global_queries, float scale) -> (Tensor, bool)");
}

TORCH_LIBRARY_IMPL(hybridrag_cpu, CPU, m) { m.impl("hybrid_attention_mass", &hybrid_attention_mass); }
