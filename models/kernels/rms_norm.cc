// RMSNorm for XLA:CPU: y = scale * x / sqrt(mean(x^2) + eps), row by row, in float32.
//
// Why a kernel: XLA:CPU reduces a row at decode widths (tens of rows of hundreds of values)
// in tens of microseconds, many times what its bytes cost, and a step runs two per layer
// (benchmarks/NOTES.md). One thread suffices here: a call is a few microseconds of work.
//
// Each row's sum of squares runs in float64 (as accurate as XLA's float32 reduction or more:
// the next op may round the output to bfloat16) and in a fixed order (8 lanes, then the
// lanes in order), so a row's result does not depend on which other rows share the call
// (batch invariance).

#include <cmath>
#include <cstdint>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float F4 __attribute__((vector_size(16), aligned(4)));
typedef double D4 __attribute__((vector_size(32)));

// Rows of x [rows, d] into y, the scale ([d]: float32, or bfloat16's bits) widened as read.
template <typename S>
void Normalize(const float* x, const S* scale, float eps, int64_t rows, int64_t d, float* y) {
  const int64_t whole = d / kLanes * kLanes, eights = d / 8 * 8;
  for (int64_t r = 0; r < rows; ++r, x += d, y += d) {
    D4 lanes[2] = {};  // 8 lanes of float64, as two vectors of 4 (32 bytes: in registers on AVX2)
    for (int64_t i = 0; i < eights; i += 8) {
      for (int h = 0; h < 2; ++h) {
        const D4 wide = __builtin_convertvector(*reinterpret_cast<const F4*>(x + i + 4 * h), D4);
        lanes[h] += wide * wide;
      }
    }
    double sum = 0.0;
    for (int j = 0; j < 8; ++j) sum += lanes[j / 4][j % 4];
    for (int64_t i = eights; i < d; ++i) sum += double{x[i]} * x[i];
    const float inverse = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(d) + eps));
    for (int64_t i = 0; i < whole; i += kLanes)
      Store(y + i, Widen(scale + i) * (Load(x + i) * inverse));
    for (int64_t i = whole; i < d; ++i) y[i] = ToFloat(scale[i]) * (x[i] * inverse);
  }
}

ffi::Error RmsNorm(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer scale, float eps,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto type = scale.element_type();
  const int64_t d = xd.size() ? xd[xd.size() - 1] : 0;
  if (!xd.size() || scale.element_count() != d || y->element_count() != x.element_count() ||
      (type != ffi::DataType::F32 && type != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument(
        "rms_norm: expected x [..., d] (float32), scale [d] (float32 or bfloat16), y like x");
  }
  const int64_t rows = d ? x.element_count() / d : 0;
  if (type == ffi::DataType::F32) {
    Normalize(x.typed_data(), static_cast<const float*>(scale.untyped_data()), eps, rows, d,
              y->typed_data());
  } else {
    Normalize(x.typed_data(), static_cast<const uint16_t*>(scale.untyped_data()), eps, rows, d,
              y->typed_data());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FloverRmsNorm, RmsNorm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // scale
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
