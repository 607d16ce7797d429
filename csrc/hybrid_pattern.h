// The hybrid attention pattern on the CPU, shared by csrc/hybrid_attention.cpp (forward, backward) and
// csrc/hybrid_mass.cpp (attention mass): what each query row sees as intervals of three kinds of key tiles (the
// keys of its band, the landmarks gathered per kv head, the memory tokens), the row sets a (batch, kv head) is cut
// into, and the float32 operands of a tile. See csrc/hybrid_attention.cpp for the pattern's definition.
#pragma once

#include <ATen/core/Tensor.h>

#include "online_softmax.h"
#include "tensor_rows.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace hybridrag_cpu::hybrid {


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

inline Interval clip(Interval x, const Tile& tile) {
  const int64_t lo = std::clamp(x.lo, tile.first, tile.first + tile.count) - tile.first;
  const int64_t hi = std::clamp(x.hi, tile.first, tile.first + tile.count) - tile.first;
  return {lo, std::max(lo, hi)};
}

// What row r (index into the set) sees of `tile`, as ascending intervals of the tile's keys, into `out`.
inline void seen(const Pattern& pattern, const RowSet& set, int64_t b, int64_t r, const Tile& tile,
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

// The tiles of one row set: the keys of the union of its rows' bands, the landmarks its rows see outside their
// bands (only those: early row sets of a causal pattern see few), the memory tokens.
inline std::vector<Tile> tiles_for(const Pattern& pattern, const RowSet& set, int64_t b) {
  int64_t lo = pattern.keys, hi = 0, marks_lo = pattern.num_marks(b), marks_hi = 0;
  for (size_t r = 0; r < set.rows.size(); ++r) {
    if (set.skip[r]) continue;
    const Interval band = pattern.main(b, set.rows[r], set.global[r]);
    if (band.hi > band.lo) {
      lo = std::min(lo, band.lo);
      hi = std::max(hi, band.hi);
    }
    if (set.global[r]) continue;  // its band holds every landmark it sees
    Interval marks[2];
    pattern.seen_landmarks(b, set.rows[r], band, marks);
    for (const Interval& part : marks)
      if (part.hi > part.lo) {
        marks_lo = std::min(marks_lo, part.lo);
        marks_hi = std::max(marks_hi, part.hi);
      }
  }
  std::vector<Tile> tiles;
  for (int64_t first = lo; first < hi; first += kKeyTile)
    tiles.push_back({Kind::keys, first, std::min(kKeyTile, hi - first)});
  for (int64_t first = marks_lo; first < marks_hi; first += kKeyTile)
    tiles.push_back({Kind::landmarks, first, std::min(kKeyTile, marks_hi - first)});
  if (pattern.memory > 0) tiles.push_back({Kind::memory, 0, pattern.memory});
  return tiles;
}

// The row sets of one (batch, kv head): blocks of kRows query rows (global rows skipped), then the global rows.
inline std::vector<RowSet> row_sets(const Pattern& pattern, int64_t tq) {
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
// gathered, the memory tokens. With with_values false (the attention mass) only keys are read; values are nullptr.
template <typename T>
struct Operands {
  Rows<const T> k, v;
  std::optional<Rows<const T>> memory_k, memory_v;
  int64_t memory_batch, dim;
  std::vector<float> landmark_k, landmark_v, key_buffer, value_buffer;
  bool with_values = true;

  void gather_landmarks(const Pattern& pattern, int64_t b, int64_t h) {
    const int64_t count = pattern.num_marks(b);
    const int64_t* marks = pattern.marks(b);
    landmark_k.resize(count * dim);
    landmark_v.resize(with_values ? count * dim : 0);
    for (int64_t i = 0; i < count; ++i) {
      at::vec::convert(k.at(b, h, marks[i]), &landmark_k[i * dim], dim);
      if (with_values) at::vec::convert(v.at(b, h, marks[i]), &landmark_v[i * dim], dim);
    }
  }
  // (keys, ldk, values, ldv) of a tile
  std::tuple<const float*, int64_t, const float*, int64_t> of(const Tile& tile, int64_t b, int64_t h) {
    if (tile.kind == Kind::landmarks)
      return {&landmark_k[tile.first * dim], dim, with_values ? &landmark_v[tile.first * dim] : nullptr, dim};
    key_buffer.resize(tile.count * dim);
    const Rows<const T>& keys = tile.kind == Kind::keys ? k : *memory_k;
    const int64_t batch = tile.kind == Kind::keys ? b : (memory_batch == 1 ? 0 : b);
    const auto [kp, ldk] = hybridrag_cpu::float_rows(keys, batch, h, tile.first, tile.count, dim, key_buffer.data());
    if (!with_values) return {kp, ldk, nullptr, dim};
    value_buffer.resize(tile.count * dim);
    const Rows<const T>& values = tile.kind == Kind::keys ? v : *memory_v;
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

inline Pattern pattern_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& landmarks,
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

}  // namespace hybridrag_cpu::hybrid
