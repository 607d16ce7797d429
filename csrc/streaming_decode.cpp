// Streaming attention for a few new tokens (decode): the chunk's queries against the rolling KV cache read in place
// (the sink slots, the ring in slot order) and against the chunk itself, with no gather and no Tq x Tk matrix.
// Positions and visibility are kernels/streaming/cache_layout.py's: after `length` tokens, sink slot s holds position
// s (s < min(sinks, length)); with N = length - sinks > 0 tokens past the sinks, ring slot r holds position
// sinks + r + window * floor((N - 1 - r) / window), or nothing when that floor is negative; the chunk's key c is at
// length + c. A query at p sees key j iff j <= p and (j < sinks or j > p - window). Along the ring the positions are
// two linear runs (the slots up to the newest one, and the older slots after it), so what a row sees of a tile of
// slots is at most two intervals, found by arithmetic.
//
// Tasks (at::parallel_for) are (batch, kv head, tile of keys): a tile's scores for the kv head's G * C query rows
// come from one float32 matmul (gemm.h), then the softmax of each row over the keys it sees (online_softmax.h), then
// probabilities @ values in a second matmul; the tiles' results merge by their log-sum-exp. bfloat16 and float16
// tiles are widened to float32 first. Each call reads the cache once. A NaN or inf that a row cannot see can still
// meet a zero probability in a matmul: the op's second output says whether every output is finite, and the caller
// (kernels/streaming/cpu.py) then runs the PyTorch path, and this kernel on finite copies for every other value.
//
// streaming_decode_append is the same call followed by the chunk's store into the cache (when every output is
// finite), so that a decode step's attention and append are one op call (eager mode; under torch.compile the
// functional streaming_decode runs and the cache's copies are traced in Python).
//
// Memory: the output, and per task (G * C, tile) float32 scores, (G * C, D) float32 partial outputs and, for other
// dtypes, the widened tile.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "gemm.h"
#include "online_softmax.h"
#include "tensor_rows.h"
#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using hybridrag_cpu::Interval;
using hybridrag_cpu::Rows;
using hybridrag_cpu::kNegInf;
constexpr int64_t kMaxTile = 1024;  // keys per task at most

enum class Part { sinks, ring, chunk };

struct Tile {
  Part part;
  int64_t first, count;  // slots [first, first + count) of its part
};

struct Stream {
  int64_t length, sinks, window, chunk;
  int64_t cached_sinks() const { return std::min(sinks, length); }
  int64_t past_sinks() const { return std::max<int64_t>(length - sinks, 0); }

  // What the query at chunk row c sees of `tile`, as intervals of the tile's keys; returns how many.
  int seen(const Tile& tile, int64_t c, Interval* out) const {
    const int64_t p = length + c, lo = tile.first, hi = tile.first + tile.count;
    auto clip = [&](int64_t a, int64_t b) { return Interval{std::clamp(a, lo, hi) - lo, std::clamp(b, lo, hi) - lo}; };
    if (tile.part == Part::sinks) {
      out[0] = clip(0, p + 1);
      return 1;
    }
    if (tile.part == Part::chunk) {  // key c2 at length + c2: a sink while length + c2 < sinks, else in the window
      const Interval sink_keys = clip(0, std::clamp<int64_t>(sinks - length, 0, c + 1));
      const Interval recent = clip(std::max<int64_t>(0, c - window + 1), c + 1);
      if (sink_keys.hi >= recent.lo) {
        out[0] = Interval{0, recent.hi};
        return 1;
      }
      out[0] = sink_keys;
      out[1] = recent;
      return 2;
    }
    // ring: slots [0, newest] hold sinks + r + window * base; slots after it, a lap earlier (when there was one)
    const int64_t n = past_sinks(), base = (n - 1) / window, newest = (n - 1) % window;
    int count = 0;
    for (const int64_t lap : {base, base - 1}) {
      if (lap < 0) continue;
      const int64_t offset = sinks + window * lap;  // position of slot r = offset + r
      const int64_t run_lo = lap == base ? 0 : newest + 1, run_hi = lap == base ? newest + 1 : window;
      const Interval part = clip(std::max(run_lo, p - window - offset + 1), std::min(run_hi, p - offset + 1));
      if (part.hi > part.lo) out[count++] = part;
    }
    if (count == 2 && out[1].lo < out[0].lo) std::swap(out[0], out[1]);
    return count;
  }
};

template <typename T>
struct Cache {
  Rows<const T> sinks, ring, chunk;
  const Rows<const T>& of(Part part) const { return part == Part::sinks ? sinks : part == Part::ring ? ring : chunk; }
};

struct Partial {  // one tile's softmax, per query row
  std::vector<float> max, sum, out;
};

template <typename T>
void attend_tile(const Rows<const T>& q, const Cache<T>& keys, const Cache<T>& values, const Stream& stream,
                 const Tile& tile, float scale, int64_t b, int64_t hkv, int64_t group, int64_t dim, Partial& part) {
  const int64_t chunk = stream.chunk, m = group * chunk, n = tile.count;
  std::vector<float> query(m * dim), scores(m * n), key_buffer, value_buffer;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < chunk; ++c)
      at::vec::convert(q.at(b, hkv * group + g, c), &query[(g * chunk + c) * dim], dim);
  part.max.assign(m, kNegInf);
  part.sum.assign(m, 0.f);
  part.out.assign(m * dim, 0.f);
  if (!std::is_same_v<T, float>) {
    key_buffer.resize(n * dim);
    value_buffer.resize(n * dim);
  }
  const auto [k, ldk] = hybridrag_cpu::float_rows(keys.of(tile.part), b, hkv, tile.first, n, dim, key_buffer.data());
  const auto [v, ldv] = hybridrag_cpu::float_rows(values.of(tile.part), b, hkv, tile.first, n, dim,
                                                  value_buffer.data());
  hybridrag_cpu::gemm(false, true, m, n, dim, 1.f, query.data(), dim, k, ldk, 0.f, scores.data(), n);
  for (int64_t i = 0; i < m; ++i) {
    Interval seen[2];
    const int count = stream.seen(tile, i % chunk, seen);
    hybridrag_cpu::online_softmax_row(&scores[i * n], n, seen, count, scale, part.max[i], part.sum[i],
                                      &part.out[i * dim], dim);
  }
  hybridrag_cpu::gemm(false, false, m, dim, n, 1.f, scores.data(), n, v, ldv, 0.f, part.out.data(), dim);
}

std::vector<Tile> tiles_of(const Stream& stream, int64_t tile) {
  std::vector<Tile> out;
  if (stream.cached_sinks() > 0) out.push_back({Part::sinks, 0, stream.cached_sinks()});
  if (stream.past_sinks() > 0) {
    const int64_t filled = std::min(stream.past_sinks(), stream.window);  // the ring fills slot 0 first
    for (int64_t first = 0; first < filled; first += tile)
      out.push_back({Part::ring, first, std::min(tile, filled - first)});
  }
  out.push_back({Part::chunk, 0, stream.chunk});
  return out;
}

template <typename T>
bool decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sink_k,
            const at::Tensor& sink_v, const at::Tensor& ring_k, const at::Tensor& ring_v, const Stream& stream,
            float scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3), kv_heads = k.size(1);
  const int64_t group = heads / kv_heads, m = group * stream.chunk, heads_total = batch * kv_heads;
  const Rows<const T> qs(q);
  const Cache<T> keys{Rows<const T>(sink_k), Rows<const T>(ring_k), Rows<const T>(k)};
  const Cache<T> values{Rows<const T>(sink_v), Rows<const T>(ring_v), Rows<const T>(v)};
  // enough ring tiles for every thread to have about two tasks, none longer than kMaxTile keys
  const int64_t wanted = std::max<int64_t>(1, (2 * at::get_num_threads() + heads_total - 1) / heads_total);
  const int64_t tile = std::clamp<int64_t>((stream.window + wanted - 1) / wanted, 64, kMaxTile);
  const std::vector<Tile> tiles = tiles_of(stream, tile);
  const int64_t per_head = static_cast<int64_t>(tiles.size());
  std::vector<Partial> parts(heads_total * per_head);
  at::parallel_for(0, heads_total * per_head, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_head;
      attend_tile(qs, keys, values, stream, tiles[task % per_head], scale, bh / kv_heads, bh % kv_heads, group, dim,
                  parts[task]);
    }
  });
  // the merge is small ((B * Hkv * G * C) rows of D over a few tiles): one thread, no second parallel region
  T* out_data = static_cast<T*>(out.data_ptr());
  std::vector<float> row(dim);
  bool finite = true;
  for (int64_t bh = 0; bh < heads_total; ++bh) {
    for (int64_t i = 0; i < m; ++i) {
      float best = kNegInf;  // NaN when a tile's row is NaN (a non-finite q or k): then the whole row is
      for (int64_t t = 0; t < per_head; ++t) best = hybridrag_cpu::nan_max(best, parts[bh * per_head + t].max[i]);
      std::fill(row.begin(), row.end(), 0.f);
      float sum = 0.f;
      for (int64_t t = 0; t < per_head; ++t) {
        const Partial& part = parts[bh * per_head + t];
        if (part.max[i] == kNegInf) continue;  // the tile holds no key this row sees
        const float weight = std::exp(part.max[i] - best);
        sum += weight * part.sum[i];
        hybridrag_cpu::add_scaled(row.data(), &part.out[i * dim], dim, weight);
      }
      hybridrag_cpu::scale_in_place(row.data(), dim, sum > 0 ? 1.f / sum : 0.f);
      finite = finite && hybridrag_cpu::all_finite(row.data(), dim);
      const int64_t b = bh / kv_heads, h = (bh % kv_heads) * group + i / stream.chunk, c = i % stream.chunk;
      at::vec::convert(row.data(), out_data + ((b * heads + h) * stream.chunk + c) * dim, dim);
    }
  }
  return finite;
}

// The chunk's keys and values into the cache after `length` tokens, token after token (a later token takes the slot
// of an earlier one when the chunk is longer than the window): position p < sinks to sink slot p, later ones to ring
// slot (p - sinks) % window, as StreamingKVCache.append stores them.
template <typename T>
void store_chunk(const at::Tensor& k, const at::Tensor& v, const at::Tensor& sink_k, const at::Tensor& sink_v,
                 const at::Tensor& ring_k, const at::Tensor& ring_v, const Stream& stream) {
  const Rows<const T> keys(k), values(v);
  const Rows<T> sink_keys(sink_k), sink_values(sink_v), ring_keys(ring_k), ring_values(ring_v);
  const int64_t batch = k.size(0), kv_heads = k.size(1), dim = k.size(3);
  for (int64_t c = 0; c < stream.chunk; ++c) {
    const int64_t p = stream.length + c;
    const bool sink = p < stream.sinks;
    const int64_t slot = sink ? p : (p - stream.sinks) % stream.window;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::copy_n(keys.at(b, h, c), dim, (sink ? sink_keys : ring_keys).at(b, h, slot));
        std::copy_n(values.at(b, h, c), dim, (sink ? sink_values : ring_values).at(b, h, slot));
      }
  }
}

std::tuple<at::Tensor, bool> streaming_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& sink_k, const at::Tensor& sink_v,
                                              const at::Tensor& ring_k, const at::Tensor& ring_v, int64_t length,
                                              int64_t sinks, int64_t window, double scale) {
  for (const at::Tensor* t : {&q, &k, &v, &sink_k, &sink_v, &ring_k, &ring_v}) {
    TORCH_CHECK(t->dim() == 4 && t->device().is_cpu() && t->scalar_type() == q.scalar_type() && t->stride(3) == 1,
                "streaming decode: 4-d CPU tensors of q's dtype with unit last strides");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "streaming decode: float32, bfloat16 or float16 inputs");
  const int64_t batch = q.size(0), kv_heads = k.size(1), chunk = q.size(2), dim = q.size(3);
  TORCH_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0, "streaming decode: H must be a multiple of Hkv");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(2) == chunk && k.size(3) == dim && chunk > 0,
              "streaming decode: k and v must be (B, Hkv, C, D) for q (B, H, C, D), C >= 1");
  TORCH_CHECK(sink_k.sizes() == sink_v.sizes() && ring_k.sizes() == ring_v.sizes() && sink_k.size(0) == batch &&
                  ring_k.size(0) == batch && sink_k.size(1) == kv_heads && ring_k.size(1) == kv_heads &&
                  sink_k.size(2) == sinks && ring_k.size(2) == window && sink_k.size(3) == dim &&
                  ring_k.size(3) == dim,
              "streaming decode: sink_k/v must be (B, Hkv, sinks, D) and ring_k/v (B, Hkv, window, D)");
  TORCH_CHECK(length >= 0 && sinks >= 0 && window >= 1 && scale > 0,
              "streaming decode: length >= 0, sinks >= 0, window >= 1, scale > 0");
  const Stream stream{length, sinks, window, chunk};
  at::Tensor out = at::empty(q.sizes(), q.options());
  const float s = static_cast<float>(scale);
  bool finite;
  switch (q.scalar_type()) {
    case at::kFloat: finite = decode<float>(q, k, v, sink_k, sink_v, ring_k, ring_v, stream, s, out); break;
    case at::kBFloat16:
      finite = decode<c10::BFloat16>(q, k, v, sink_k, sink_v, ring_k, ring_v, stream, s, out);
      break;
    default: finite = decode<c10::Half>(q, k, v, sink_k, sink_v, ring_k, ring_v, stream, s, out); break;
  }
  return {out, finite};
}

// streaming_decode, then, when every output is finite, the chunk stored into the cache (after every row is computed:
// a chunk's later token may take a slot its earlier rows see). A non-finite output leaves the cache as it was, for
// the caller's second pass. One call for a decode step's attention and append.
std::tuple<at::Tensor, bool> streaming_decode_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     at::Tensor& sink_k, at::Tensor& sink_v, at::Tensor& ring_k,
                                                     at::Tensor& ring_v, int64_t length, int64_t sinks,
                                                     int64_t window, double scale) {
  auto [out, finite] = streaming_decode(q, k, v, sink_k, sink_v, ring_k, ring_v, length, sinks, window, scale);
  if (!finite) return {out, false};
  const Stream stream{length, sinks, window, q.size(2)};
  switch (q.scalar_type()) {
    case at::kFloat: store_chunk<float>(k, v, sink_k, sink_v, ring_k, ring_v, stream); break;
    case at::kBFloat16: store_chunk<c10::BFloat16>(k, v, sink_k, sink_v, ring_k, ring_v, stream); break;
    default: store_chunk<c10::Half>(k, v, sink_k, sink_v, ring_k, ring_v, stream); break;
  }
  return {out, true};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hybridrag_cpu, m) {
  m.def("streaming_decode(Tensor q, Tensor k, Tensor v, Tensor sink_k, Tensor sink_v, Tensor ring_k, "
        "Tensor ring_v, int length, int sinks, int window, float scale) -> (Tensor, bool)");
  m.def("streaming_decode_append(Tensor q, Tensor k, Tensor v, Tensor(a!) sink_k, Tensor(b!) sink_v, "
        "Tensor(c!) ring_k, Tensor(d!) ring_v, int length, int sinks, int window, float scale) -> (Tensor, bool)");
}

TORCH_LIBRARY_IMPL(hybridrag_cpu, CPU, m) {
  m.impl("streaming_decode", &streaming_decode);
  m.impl("streaming_decode_append", &streaming_decode_append);
}
