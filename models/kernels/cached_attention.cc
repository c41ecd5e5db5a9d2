// Attention over the slot cache for XLA:CPU: each row is one query token against its
// slot's cached keys and values, read in place and only up to the row's length (and, in a
// sliding-window layer, only from its window's first position). A decode step has one row
// per slot of its window; a prefill piece one row per token of its prompts, each reading
// its slot's positions up to its own (causal).
//
// Why a kernel: XLA:CPU copies any slice of a bigger buffer before a dot reads
// it, and a dot over the whole cache reads every position, live or not. Here
// each (slot, KV head) reads its live K rows once for the scores and its live
// V rows once for the output, so a step reads exactly the live KV bytes. In a decode step
// those come from memory, (slot, KV head) after (slot, KV head): while a thread computes one,
// it fetches the next one it will take into L2, paced over its work. A prompt piece's
// consecutive rows on one slot read the same K and V rows: up to 8 of them go together, each
// block of K and V rows read from L2 once for all of them.
//
// Each (row, KV head) is computed in a fixed order, the same alone or beside the other rows
// of its piece, so a row's result does not depend on which other rows share the call (batch
// invariance).
// The cache holds float32 or bfloat16 (or bfloat16's bits as uint16), widened to
// float32 as it is read; the sums run in float32.
// Common head sizes (16, 32, 64, 128) take a vectorized path; others a scalar one.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel_for.h"
#include "prefetch.h"
#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes of a (0 to kLanes - 1) and b (kLanes on), picked by constant indices.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IV{__VA_ARGS__})
#endif

// A row of scores is padded to whole blocks of 16 positions.
constexpr int64_t Padded(int64_t length) { return (length + 15) / 16 * 16; }

// Positions in a last, partial block from which it is scored as a block rather than position
// by position: a block's sums cost about as much as 8 positions' (benchmarks/NOTES.md).
constexpr int64_t kBlockTail = 8;

// 16 independent partial sums: the compiler vectorizes this without reassociating.
template <typename KV>
inline float Dot(const KV* a, const float* b, int64_t n) {
  float lanes[16] = {};
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += ToFloat(a[e + j]) * b[e + j];
  float sum = 0.0f;
  for (; e < n; ++e) sum += ToFloat(a[e]) * b[e];
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  return sum;
}

// Softmax over row[0, length), in place, in float32, kLanes positions at a time: the row has
// room for a whole last block (Padded(length) floats), whose lanes past length are scratch.
inline void Softmax(float* row, int64_t length) {
  const int64_t padded = Padded(length);
  std::fill(row + length, row + padded, -INFINITY);
  FV lanes = Load(row);
  for (int64_t t = kLanes; t < padded; t += kLanes) {
    const FV x = Load(row + t);
    lanes = x > lanes ? x : lanes;
  }
  float max = lanes[0];
  for (int j = 1; j < kLanes; ++j) max = std::max(max, lanes[j]);
  IV lane;
  for (int j = 0; j < kLanes; ++j) lane[j] = j;
  FV sums = {};
  for (int64_t t = 0; t < padded; t += kLanes) {
    FV e = Exp<FV, IV>(Load(row + t) - max);
    e = lane < static_cast<int32_t>(length - t) ? e : FV{};  // Exp clamps: -inf is not 0
    Store(row + t, e);
    sums += e;
  }
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += sums[j];
  const FV inverse = Broadcast(1.0f / sum);
  for (int64_t t = 0; t < padded; t += kLanes) Store(row + t, Load(row + t) * inverse);
}

// The `group` query rows sharing one KV head against positions [0, length), length >= 1,
// adding to out (zeros). scores: scratch of group * Padded(length) floats.
template <typename KV>
void AttendOneHead(const float* q, const KV* k, const KV* v, float* out,
                   int64_t length, int64_t group, int64_t dim, float scale, float* scores) {
  const int64_t stride = Padded(length);
  for (int64_t t = 0; t < length; ++t)
    for (int64_t g = 0; g < group; ++g)
      scores[g * stride + t] = Dot(k + t * dim, q + g * dim, dim) * scale;
  for (int64_t g = 0; g < group; ++g) Softmax(scores + g * stride, length);
  for (int64_t t = 0; t < length; ++t) {
    const KV* v_row = v + t * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * stride + t];
      float* o = out + g * dim;
      for (int64_t e = 0; e < dim; ++e) o[e] += p * ToFloat(v_row[e]);
    }
  }
}

// Lane t of the result is the sum of the lanes of a[t], t < kLanes: one tree of shuffles and
// kLanes - 1 adds for kLanes sums, instead of a horizontal sum for each. The order of the adds
// is fixed. Each level adds halves of lanes, pairing vectors: a level's result holds, in
// blocks, partial sums of two of its inputs.
inline FV SumEach(const FV* a) {
#if defined(__AVX512F__)
  FV b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = SHUFFLE(a[2 * i], a[2 * i + 1],
                                   0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(a[2 * i], a[2 * i + 1],
                                   8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = SHUFFLE(b[2 * i], b[2 * i + 1],
                                   0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE(b[2 * i], b[2 * i + 1],
                                   4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = SHUFFLE(c[2 * i], c[2 * i + 1],
                                   0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE(c[2 * i], c[2 * i + 1],
                                   2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUFFLE(d[0], d[1],
                                 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(d[0], d[1],
                                 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif defined(__AVX__)
  FV b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           SHUFFLE(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return SHUFFLE(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         SHUFFLE(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
#else
  FV b[2];
  for (int i = 0; i < 2; ++i)
    b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 4, 5) + SHUFFLE(a[2 * i], a[2 * i + 1], 2, 3, 6, 7);
  return SHUFFLE(b[0], b[1], 0, 2, 4, 6) + SHUFFLE(b[0], b[1], 1, 3, 5, 7);
#endif
}

// The products of one K row and one query row, summed lane-wise over the head's C vectors
// (a head of kLanes * C values).
template <int C, typename KV>
inline FV RowProducts(const KV* k_row, const float* q_row) {
  FV acc = Widen(k_row) * Load(q_row);
  for (int c = 1; c < C; ++c) acc += Widen(k_row + kLanes * c) * Load(q_row + kLanes * c);
  return acc;
}

// The scaled scores of R query rows (q, row stride dim) against `count` (at most 16) K rows,
// into scores[r * stride, + 16) (lanes past count: scratch): each K row widened once; each
// score summed lane-wise over the head's C vectors (RowProducts' order), then over the lanes by
// SumEach.
template <int C, int R, typename KV>
inline void BlockScores(const KV* k_block, const float* q, float* scores, int64_t stride,
                        float scale, int count = 16) {
  constexpr int64_t dim = kLanes * C;
  FV q_rows[R][C], products[R][16];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) q_rows[r][c] = Load(q + r * dim + kLanes * c);
  for (int t = count; t < 16; ++t)
    for (int r = 0; r < R; ++r) products[r][t] = FV{};
  for (int t = 0; t < count; ++t) {
    FV k_row[C];
    for (int c = 0; c < C; ++c) k_row[c] = Widen(k_block + t * dim + kLanes * c);
    for (int r = 0; r < R; ++r) {
      FV acc = k_row[0] * q_rows[r][0];
      for (int c = 1; c < C; ++c) acc += k_row[c] * q_rows[r][c];
      products[r][t] = acc;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 16; t += kLanes)
      Store(scores + r * stride + t, SumEach(products[r] + t) * scale);
}

// out[r] += sum over t in [t0, t1) of p[r * stride + t] v[t] for R query rows, the sums held
// in registers; `ahead` steps once a position. Over consecutive ranges from t0 = 0 (out zeros)
// it adds the same products in the same order as one call over them all: bitwise the same.
template <int C, int R, typename KV, typename Ahead>
void WeightedSum(const float* p, const KV* v, float* out, int64_t t0, int64_t t1, int64_t stride,
                 Ahead& ahead) {
  constexpr int64_t dim = kLanes * C;
  FV acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Load(out + r * dim + kLanes * c);
  for (int64_t t = t0; t < t1; ++t) {
    FV v_row[C];
    for (int c = 0; c < C; ++c) v_row[c] = Widen(v + t * dim + kLanes * c);
    if (t + 16 < t1) __builtin_prefetch(v + (t + 16) * dim);
    for (int r = 0; r < R; ++r) {
      const FV weight = Broadcast(p[r * stride + t]);
      for (int c = 0; c < C; ++c) acc[r][c] += weight * v_row[c];
    }
    ahead.Step();
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) Store(out + r * dim + kLanes * c, acc[r][c]);
}

// One (row, KV head)'s live K and V rows, `length` of them from k and v (none: null).
template <typename KV>
struct LiveRows {
  const KV* k = nullptr;
  const KV* v = nullptr;
  int64_t length = 0;
};

// What AttendOneHeadVec fetches of the next item as it goes.
struct NextItem {
  Prefetcher k, v;
  void Step() { k.Step(), v.Step(); }
};

// The scores of `group` query rows (q, row stride kLanes C) against one block of `count` K rows,
// into scores[g * stride, + 16), up to 4 query rows per pass over the block.
template <int C, typename KV>
inline void GroupScores(const KV* k_block, const float* q, float* scores, int64_t stride,
                        int64_t group, float scale, int count) {
  constexpr int64_t dim = kLanes * C;
  for (int64_t g = 0; g < group; g += 4) {
    float* block_scores = scores + g * stride;
    const float* q_rows = q + g * dim;
    switch (std::min<int64_t>(4, group - g) + (count < 16 ? 4 : 0)) {
      case 1: BlockScores<C, 1>(k_block, q_rows, block_scores, stride, scale); break;
      case 2: BlockScores<C, 2>(k_block, q_rows, block_scores, stride, scale); break;
      case 3: BlockScores<C, 3>(k_block, q_rows, block_scores, stride, scale); break;
      case 4: BlockScores<C, 4>(k_block, q_rows, block_scores, stride, scale); break;
      case 5: BlockScores<C, 1>(k_block, q_rows, block_scores, stride, scale, count); break;
      case 6: BlockScores<C, 2>(k_block, q_rows, block_scores, stride, scale, count); break;
      case 7: BlockScores<C, 3>(k_block, q_rows, block_scores, stride, scale, count); break;
      default: BlockScores<C, 4>(k_block, q_rows, block_scores, stride, scale, count);
    }
  }
}

// One query row's scores at positions [from, length) (past its last scored block), one
// position at a time, then its softmax over [0, length).
template <int C, typename KV>
inline void ScoreTailAndSoftmax(const KV* k, const float* q_row, float* row, int64_t from,
                                int64_t length, float scale) {
  constexpr int64_t dim = kLanes * C;
  for (int64_t t = from; t < length; ++t) {
    const FV products = RowProducts<C>(k + t * dim, q_row);
    float sum = 0.0f;
    for (int j = 0; j < kLanes; ++j) sum += products[j];
    row[t] = sum * scale;
  }
  Softmax(row, length);
}

// Scored K blocks of a row of `length` positions: a last, partial block of at least
// kBlockTail positions is scored as a block, its other products zeros (the softmax drops those
// positions); a shorter one position by position.
constexpr int64_t ScoredBlocks(int64_t length) {
  return length / 16 + (length % 16 >= kBlockTail);
}

// AttendOneHead for head_dim = kLanes * C (out zeros, added to), vectorized: scores 16
// positions at a time, a vector softmax, and the V sums of several query rows in registers.
// Against the scalar path it ran 2.2-3.1x as fast with the KV in cache and 1.3-3x from memory
// (benchmarks/NOTES.md).
template <int C, typename KV>
void AttendOneHeadVec(const float* q, LiveRows<KV> live, float* out, int64_t group, float scale,
                      float* scores, LiveRows<KV> next) {
  constexpr int64_t dim = kLanes * C;
  constexpr int64_t kRows = C <= 4 ? 4 : 2;  // query rows per pass over V: sums in registers
  const KV *k = live.k, *v = live.v;
  const int64_t length = live.length, stride = Padded(length);
  const int64_t blocks = ScoredBlocks(length);
  // The next item's K and V rows come into L2 over this item's steps: one per K block, one per
  // V row and pass.
  const int64_t steps = blocks + (group + kRows - 1) / kRows * length;
  const int64_t next_bytes = next.length * dim * sizeof(KV);
  NextItem ahead{Prefetcher::Over(next.k, next_bytes, steps),
                 Prefetcher::Over(next.v, next_bytes, steps)};
  // The first V rows are read last; fetch them now so their stream starts warm.
  for (int64_t i = 0; i < std::min<int64_t>(length, 16) * dim; i += 16) __builtin_prefetch(v + i);
  // Scores 16 positions at a time, every query row while the block's K rows are in L1, up to
  // 4 query rows per pass over them: each K row is widened once per pass.
  for (int64_t b = 0; b < blocks; ++b) {
    const KV* k_block = k + 16 * b * dim;
    const int count = static_cast<int>(std::min<int64_t>(16, length - 16 * b));
    if (b + 1 < blocks)
      for (int64_t i = 0; i < 16 * dim; i += 16) __builtin_prefetch(k_block + 16 * dim + i);
    GroupScores<C>(k_block, q, scores + 16 * b, stride, group, scale, count);
    ahead.Step();
  }
  for (int64_t g = 0; g < group; ++g)
    ScoreTailAndSoftmax<C>(k, q + g * dim, scores + g * stride, 16 * blocks, length, scale);
  for (int64_t g = 0; g < group; g += kRows) {
    const float* p = scores + g * stride;
    float* o = out + g * dim;
    switch (std::min(kRows, group - g)) {
      case 1: WeightedSum<C, 1>(p, v, o, 0, length, stride, ahead); break;
      case 2: WeightedSum<C, 2>(p, v, o, 0, length, stride, ahead); break;
      case 3: WeightedSum<C, 3>(p, v, o, 0, length, stride, ahead); break;
      default: WeightedSum<C, 4>(p, v, o, 0, length, stride, ahead); break;
    }
  }
}

// A prompt piece's rows on one slot read the same K and V rows, each up to its own position.
// AttendRunVec takes up to kRunRows of them at once: each K block, and each block of kVBlock V
// rows, comes from L2 once for all of them and from L1 for the rest (one row at a time, every
// row read all of its slot's rows from L2: a 64-token piece at position 512 spent over a
// quarter of its call in attention).
constexpr int64_t kRunRows = 8;
constexpr int64_t kVBlock = 16;

// One row of a run: its `group` queries, output and scores (scratch of group * Padded(length)).
struct RunRow {
  const float* q;
  float* out;
  float* scores;
  int64_t length;
};

// AttendOneHeadVec for the `count` rows of a run, all reading from k and v (outs zeros). Each
// row's scores, softmax and sums are AttendOneHeadVec's operations in its order (the V sums
// kept in `out` between blocks of positions), so each row's result is bitwise
// what AttendOneHeadVec gives it alone.
template <int C, typename KV>
void AttendRunVec(const RunRow* rows, int64_t count, const KV* k, const KV* v, int64_t group,
                  float scale, LiveRows<KV> next) {
  constexpr int64_t dim = kLanes * C;
  constexpr int64_t kRows = C <= 4 ? 4 : 2;  // query rows per pass over V, as AttendOneHeadVec
  int64_t longest = 0, blocks = 0;
  for (int64_t r = 0; r < count; ++r) {
    longest = std::max(longest, rows[r].length);
    blocks = std::max(blocks, ScoredBlocks(rows[r].length));
  }
  const int64_t v_blocks = (longest + kVBlock - 1) / kVBlock;
  const int64_t next_bytes = next.length * dim * sizeof(KV);
  NextItem ahead{Prefetcher::Over(next.k, next_bytes, blocks + v_blocks),
                 Prefetcher::Over(next.v, next_bytes, blocks + v_blocks)};
  for (int64_t b = 0; b < blocks; ++b) {
    const KV* k_block = k + 16 * b * dim;
    if (b + 1 < blocks)
      for (int64_t i = 0; i < 16 * dim; i += 16) __builtin_prefetch(k_block + 16 * dim + i);
    for (int64_t r = 0; r < count; ++r) {
      const int64_t length = rows[r].length;
      if (b >= ScoredBlocks(length)) continue;
      GroupScores<C>(k_block, rows[r].q, rows[r].scores + 16 * b, Padded(length), group, scale,
                     static_cast<int>(std::min<int64_t>(16, length - 16 * b)));
    }
    ahead.Step();
  }
  for (int64_t r = 0; r < count; ++r) {
    const int64_t length = rows[r].length, stride = Padded(length);
    for (int64_t g = 0; g < group; ++g)
      ScoreTailAndSoftmax<C>(k, rows[r].q + g * dim, rows[r].scores + g * stride,
                             16 * ScoredBlocks(length), length, scale);
  }
  Prefetcher none = Prefetcher::Over(nullptr, 0, 1);  // the next item's rows: once a block, below
  for (int64_t t0 = 0; t0 < longest; t0 += kVBlock) {
    for (int64_t i = 0; i < kVBlock * dim; i += 16)
      __builtin_prefetch(v + (t0 + kVBlock) * dim + i);
    for (int64_t r = 0; r < count; ++r) {
      const int64_t t1 = std::min(t0 + kVBlock, rows[r].length), stride = Padded(rows[r].length);
      for (int64_t g = 0; g < group && t0 < t1; g += kRows) {
        const float* p = rows[r].scores + g * stride;
        float* o = rows[r].out + g * dim;
        switch (std::min(kRows, group - g)) {
          case 1: WeightedSum<C, 1>(p, v, o, t0, t1, stride, none); break;
          case 2: WeightedSum<C, 2>(p, v, o, t0, t1, stride, none); break;
          case 3: WeightedSum<C, 3>(p, v, o, t0, t1, stride, none); break;
          default: WeightedSum<C, 4>(p, v, o, t0, t1, stride, none); break;
        }
      }
    }
    ahead.Step();
  }
}

// q [w, kv_heads, group, dim]: the rows' queries; k_cache, v_cache
// [slots, kv_heads, max_len, dim]; slot_data [w]: the slot each row reads; lengths [w]:
// each row reads positions [firsts[i], lengths[i]) (a sliding window starts past 0;
// an empty range: the row attends nowhere and gets zeros); scale: the scores' factor.
// Work items are (run, KV head), a run being consecutive rows on one slot from one first
// position (a prompt piece's, up to kRunRows of them; in a decode step, one row).
template <typename KV>
void Attend(ffi::ThreadPool& pool, const float* q_data, const KV* k_data, const KV* v_data,
            const int32_t* slot_data, const int32_t* length_data, const int32_t* first_data,
            float* out_data, int64_t width, int64_t heads, int64_t group, int64_t dim,
            int64_t slots, int64_t max_len, float scale) {
  // The K and V rows (row, head) reads: positions [firsts, lengths) of its slot's head. Rows
  // of a run read from the same place (those that read anything).
  auto live_rows = [=](int64_t row, int64_t head) {
    const int64_t end = std::clamp<int64_t>(length_data[row], 0, max_len);
    const int64_t begin = std::clamp<int64_t>(first_data[row], 0, end);
    const int64_t slot = std::clamp<int64_t>(slot_data[row], 0, slots - 1);
    const int64_t offset = ((slot * heads + head) * max_len + begin) * dim;
    return LiveRows<KV>{k_data + offset, v_data + offset, end - begin};
  };
  const bool vectorized = dim == 16 || dim == 32 || dim == 64 || dim == 128;
  thread_local std::vector<int64_t> runs;  // each run's first row, then width; kept across calls
  runs.clear();
  for (int64_t row = 0; row < width; ++row) {
    if (runs.empty() || !vectorized || row - runs.back() == kRunRows ||
        slot_data[row] != slot_data[row - 1] || first_data[row] != first_data[row - 1])
      runs.push_back(row);
  }
  runs.push_back(width);
  const int64_t items = (static_cast<int64_t>(runs.size()) - 1) * heads;
  const int64_t* run_starts = runs.data();  // this thread's, read by the helpers
  auto attend = [=](int64_t item, int64_t next) {
    thread_local std::vector<float> scores;  // each thread's own, kept across calls
    const int64_t run = item / heads, head = item % heads;
    const int64_t first_row = run_starts[run], count = run_starts[run + 1] - first_row;
    // A decode step's items each read other rows, mostly from memory: the next one's are
    // fetched while this one computes. Not where the row before the next one read its slot
    // too (a prompt piece's tokens: the same rows, in cache already), nor past the last item.
    const int64_t next_row = next < items ? run_starts[next / heads] : 0;
    const bool fetch = next < items &&
                       (next_row == 0 || slot_data[next_row - 1] != slot_data[next_row]);
    const LiveRows<KV> ahead = fetch ? live_rows(next_row, next % heads) : LiveRows<KV>{};
    RunRow rows[kRunRows];
    LiveRows<KV> live;
    int64_t live_count = 0, scratch = 0;
    for (int64_t r = 0; r < count; ++r) {
      const int64_t row = first_row + r, at = (row * heads + head) * group * dim;
      std::fill(out_data + at, out_data + at + group * dim, 0.0f);
      const LiveRows<KV> row_live = live_rows(row, head);
      if (row_live.length == 0) continue;  // a row that attends nowhere gets zeros
      live = row_live;
      rows[live_count++] = {q_data + at, out_data + at, nullptr, row_live.length};
      scratch += group * Padded(row_live.length);
    }
    if (live_count == 0) return;
    scores.resize(scratch);
    for (int64_t r = 0, used = 0; r < live_count; used += group * Padded(rows[r].length), ++r)
      rows[r].scores = scores.data() + used;
    if (live_count == 1) {
      live.length = rows[0].length;
      const float* q = rows[0].q;
      float *out = rows[0].out, *s = rows[0].scores;
      switch (dim) {
        case 16: AttendOneHeadVec<16 / kLanes>(q, live, out, group, scale, s, ahead); break;
        case 32: AttendOneHeadVec<32 / kLanes>(q, live, out, group, scale, s, ahead); break;
        case 64: AttendOneHeadVec<64 / kLanes>(q, live, out, group, scale, s, ahead); break;
        case 128: AttendOneHeadVec<128 / kLanes>(q, live, out, group, scale, s, ahead); break;
        default: AttendOneHead(q, live.k, live.v, out, live.length, group, dim, scale, s);
      }
      return;
    }
    switch (dim) {  // runs of several rows have one of these head sizes
      case 16: AttendRunVec<16 / kLanes>(rows, live_count, live.k, live.v, group, scale, ahead); break;
      case 32: AttendRunVec<32 / kLanes>(rows, live_count, live.k, live.v, group, scale, ahead); break;
      case 64: AttendRunVec<64 / kLanes>(rows, live_count, live.k, live.v, group, scale, ahead); break;
      default: AttendRunVec<128 / kLanes>(rows, live_count, live.k, live.v, group, scale, ahead); break;
    }
  };
  ParallelFor(pool, items, attend);
}

ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> row_slots,
                           ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> firsts,
                           float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), cd = k_cache.dimensions(), vd = v_cache.dimensions();
  const auto type = k_cache.element_type();
  if (qd.size() != 4 || cd.size() != 4 || !std::equal(cd.begin(), cd.end(), vd.begin(), vd.end()) ||
      qd[1] != cd[1] || qd[3] != cd[3] || row_slots.element_count() != qd[0] ||
      lengths.element_count() != qd[0] ||
      firsts.element_count() != qd[0] || v_cache.element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16 && type != ffi::DataType::U16)) {
    return ffi::Error::InvalidArgument(
        "cached_attention: expected q [w, kv_heads, group, dim], caches "
        "[slots, kv_heads, max_len, dim] (both float32, or both bfloat16 or uint16: "
        "bfloat16's bits), slots [w], lengths [w] and firsts [w]");
  }
  const int64_t width = qd[0], heads = qd[1], group = qd[2], dim = qd[3];
  const int64_t slots = cd[0], max_len = cd[2];
  if (type == ffi::DataType::F32) {
    Attend(pool, q.typed_data(), static_cast<const float*>(k_cache.untyped_data()),
           static_cast<const float*>(v_cache.untyped_data()), row_slots.typed_data(),
           lengths.typed_data(), firsts.typed_data(), out->typed_data(), width, heads, group, dim,
           slots, max_len, scale);
  } else {
    Attend(pool, q.typed_data(), static_cast<const uint16_t*>(k_cache.untyped_data()),
           static_cast<const uint16_t*>(v_cache.untyped_data()), row_slots.typed_data(),
           lengths.typed_data(), firsts.typed_data(), out->typed_data(), width, heads, group, dim,
           slots, max_len, scale);
  }
  return ffi::Error::Success();
}

// k_rows, v_rows [n, kv_heads, dim] into k_cache, v_cache [slots, kv_heads, max_len, dim] in
// place (each output aliases its cache): row i at slot slots[i], position positions[i]; a row
// whose slot or position is out of range writes nothing, as in JAX's dropping scatter. XLA:CPU's
// scatter moves one element at a time; here each head's row is one copy.
ffi::Error CacheWrite(ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> slots,
                      ffi::Buffer<ffi::S32> positions, ffi::AnyBuffer k_rows,
                      ffi::AnyBuffer v_rows, ffi::Result<ffi::AnyBuffer> k_out,
                      ffi::Result<ffi::AnyBuffer> v_out) {
  const auto cd = k_cache.dimensions(), rd = k_rows.dimensions();
  const auto type = k_cache.element_type();
  const int64_t n = slots.element_count();
  const bool cache_match = std::equal(cd.begin(), cd.end(), v_cache.dimensions().begin(),
                                      v_cache.dimensions().end());
  const bool rows_match = std::equal(rd.begin(), rd.end(), v_rows.dimensions().begin(),
                                     v_rows.dimensions().end());
  if (cd.size() != 4 || !cache_match || rd.size() != 3 || !rows_match || rd[0] != n ||
      rd[1] != cd[1] || rd[2] != cd[3] || positions.element_count() != n ||
      v_cache.element_type() != type || k_rows.element_type() != type ||
      v_rows.element_type() != type || k_out->untyped_data() != k_cache.untyped_data() ||
      v_out->untyped_data() != v_cache.untyped_data()) {
    return ffi::Error::InvalidArgument(
        "cache_write: expected caches [slots, kv_heads, max_len, dim] and rows [n, kv_heads, "
        "dim] of one dtype, slots [n] and positions [n], each output aliasing its cache");
  }
  const int64_t num_slots = cd[0], heads = cd[1], max_len = cd[2];
  const int64_t row_bytes = cd[3] * static_cast<int64_t>(ffi::ByteWidth(type));
  const int32_t* slot_data = slots.typed_data();
  const int32_t* position_data = positions.typed_data();
  for (auto [cache, rows] : {std::pair{static_cast<char*>(k_out->untyped_data()),
                                       static_cast<const char*>(k_rows.untyped_data())},
                             std::pair{static_cast<char*>(v_out->untyped_data()),
                                       static_cast<const char*>(v_rows.untyped_data())}}) {
    for (int64_t i = 0; i < n; ++i) {
      // Negative indices count from the end, as in JAX's indexing.
      const int64_t slot = slot_data[i] + (slot_data[i] < 0 ? num_slots : 0);
      const int64_t position = position_data[i] + (position_data[i] < 0 ? max_len : 0);
      if (slot < 0 || slot >= num_slots || position < 0 || position >= max_len) continue;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(cache + ((slot * heads + h) * max_len + position) * row_bytes,
                    rows + (i * heads + h) * row_bytes, row_bytes);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloverCachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()   // firsts
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloverCacheWrite, CacheWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Arg<ffi::AnyBuffer>()          // k_rows
                                  .Arg<ffi::AnyBuffer>()          // v_rows
                                  .Ret<ffi::AnyBuffer>()          // k_cache, written
                                  .Ret<ffi::AnyBuffer>());        // v_cache, written
