// One row of an online softmax over key tiles (flash attention's update), shared by the CPU attention kernels.
#pragma once

#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace hybridrag_cpu {

struct Interval {  // keys [lo, hi) of a tile that a row sees
  int64_t lo, hi;
};

// `row` holds a tile's n raw scores q.k of one query row, which sees the keys in `seen` (count disjoint, ascending
// intervals). Turns the row into exp(score * scale - max) over the seen keys and 0 elsewhere, with max the row's
// running maximum (updated here, as is its running sum), and rescales the row's float32 accumulator (dim values)
// when the maximum moves. Hidden scores are never read.
inline void online_softmax_row(float* row, int64_t n, const Interval* seen, int count, float scale, float& max,
                               float& sum, float* acc, int64_t dim) {
  float tile_max = kNegInf;
  bool any = false, finite = true;
  for (int s = 0; s < count; ++s) {
    if (seen[s].hi <= seen[s].lo) continue;
    any = true;
    bool part_finite;
    tile_max = nan_max(tile_max, max_of_finite(row + seen[s].lo, seen[s].hi - seen[s].lo, part_finite));
    finite = finite && part_finite;
  }
  if (!any) {
    std::fill_n(row, n, 0.f);
    return;
  }
  if (!finite || std::isnan(max)) {
    // A non-finite score seen: a non-finite q or k (finite ones give finite scores). The contract makes the row
    // NaN (a -inf score must not vanish in the softmax); so does this, which the caller sees in the output and
    // redoes on the path whose non-finite semantics are the contract's.
    std::fill_n(row, n, std::numeric_limits<float>::quiet_NaN());
    max = sum = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float previous = max, now = std::max(previous, tile_max * scale);
  int64_t done = 0;
  float total = 0.f;
  for (int s = 0; s < count; ++s) {
    if (seen[s].hi <= seen[s].lo) continue;
    std::fill(row + done, row + seen[s].lo, 0.f);
    total += exp_in_place(row + seen[s].lo, seen[s].hi - seen[s].lo, scale, now);
    done = seen[s].hi;
  }
  std::fill(row + done, row + n, 0.f);
  if (previous != now && previous != kNegInf) {
    const float rescale = std::exp(previous - now);
    sum *= rescale;
    scale_in_place(acc, dim, rescale);
  }
  sum += total;
  max = now;
}

}  // namespace hybridrag_cpu
