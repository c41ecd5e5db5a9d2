// Decode attention for XLA:CPU: one query token per slot against that slot's
// cached keys and values, read in place and only up to the slot's length.
//
// Why a kernel: XLA:CPU copies any slice of a bigger buffer before a dot reads
// it, and a dot over the whole cache reads every position, live or not. Here
// each (slot, KV head) reads its live K rows once for the scores and its live
// V rows once for the output, so a step reads exactly the live KV bytes.
//
// Each (slot, KV head) is computed alone, in a fixed order, so a row's result
// does not depend on which other slots share the step (batch invariance).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 independent partial sums: the compiler vectorizes this without reassociating.
inline float Dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {};
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[e + j] * b[e + j];
  float sum = 0.0f;
  for (; e < n; ++e) sum += a[e] * b[e];
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  return sum;
}

// e^x for x <= 0 (scores minus their maximum), written so that the softmax loop
// vectorizes, which std::exp does not without -ffast-math: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by the Cephes expf polynomial, 2^n built in the exponent
// bits. At most 1.4 ulp from e^x; x below -87 counts as -87 (e^-87 is 1.6e-38).
// It made the kernel about 20% faster at 240 and 480 cached tokens.
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t n_bits;  // n sits in the low mantissa bits of `shifted`
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  const int32_t scale_bits = (n_bits - 0x4B400000 + 127) << 23;  // the float 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// The `group` query rows sharing one KV head against positions [0, length).
// scores: scratch of group * length floats.
void AttendOneHead(const float* q, const float* k, const float* v, float* out,
                   int64_t length, int64_t group, int64_t dim, float scale, float* scores) {
  std::fill(out, out + group * dim, 0.0f);
  if (length == 0) return;
  for (int64_t t = 0; t < length; ++t)
    for (int64_t g = 0; g < group; ++g)
      scores[g * length + t] = Dot(k + t * dim, q + g * dim, dim) * scale;
  for (int64_t g = 0; g < group; ++g) {  // softmax over positions, in float32
    float* row = scores + g * length;
    const float max = *std::max_element(row, row + length);
    float sum = 0.0f;
    for (int64_t t = 0; t < length; ++t) sum += (row[t] = ExpNonPositive(row[t] - max));
    const float inverse = 1.0f / sum;
    for (int64_t t = 0; t < length; ++t) row[t] *= inverse;
  }
  for (int64_t t = 0; t < length; ++t) {
    const float* v_row = v + t * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * length + t];
      float* o = out + g * dim;
      for (int64_t e = 0; e < dim; ++e) o[e] += p * v_row[e];
    }
  }
}

// q [w, kv_heads, group, dim]: the window's queries; k_cache, v_cache
// [slots, kv_heads, max_len, dim]; start: the window's first slot; lengths [w]:
// positions each row reads (0: the row attends nowhere and gets zeros).
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                           ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), cd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 4 || cd.size() != 4 || !std::equal(cd.begin(), cd.end(), vd.begin(), vd.end()) ||
      qd[1] != cd[1] || qd[3] != cd[3] || qd[0] > cd[0] || lengths.element_count() != qd[0]) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [w, kv_heads, group, dim], caches "
        "[slots >= w, kv_heads, max_len, dim] and lengths [w]");
  }
  const int64_t width = qd[0], heads = qd[1], group = qd[2], dim = qd[3];
  const int64_t slots = cd[0], max_len = cd[2];
  const int64_t first = std::clamp<int64_t>(start.typed_data()[0], 0, slots - width);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const float* q_data = q.typed_data();
  const float* k_data = k_cache.typed_data();
  const float* v_data = v_cache.typed_data();
  const int32_t* length_data = lengths.typed_data();
  float* out_data = out->typed_data();
  const int64_t items = width * heads;

  auto attend = [=](int64_t item, std::vector<float>& scores) {
    const int64_t row = item / heads, head = item % heads;
    const int64_t length = std::clamp<int64_t>(length_data[row], 0, max_len);
    scores.resize(group * length);
    const int64_t cache_offset = ((first + row) * heads + head) * max_len * dim;
    AttendOneHead(q_data + item * group * dim, k_data + cache_offset, v_data + cache_offset,
                  out_data + item * group * dim, length, group, dim, scale, scores.data());
  };
  // Work is shared through a counter: the calling thread and XLA's intra-op
  // pool threads take (slot, head) items until none are left. Helpers that
  // start late find nothing to do, so the caller waits only for items.
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto drain = [=] {
    std::vector<float> scores;
    int64_t finished = 0;
    for (int64_t i; (i = progress->next.fetch_add(1)) < items; ++finished) attend(i, scores);
    progress->done.fetch_add(finished);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([drain] { drain(); });
  drain();
  while (progress->done.load() < items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloverDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // start
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
