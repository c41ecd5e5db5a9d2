// 16 float lanes as GCC/Clang vector types, shared by the kernels: they compile to whatever
// -march=native offers (AVX-512, AVX2, NEON), so the vectorized paths need no intrinsics
// (but for widening int8, below, where GCC's portable conversion is scalar).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float F16 __attribute__((vector_size(64), aligned(4)));  // unaligned access allowed
typedef int32_t I16 __attribute__((vector_size(64), aligned(4)));  // F16's lane indices

// Loads and stores dereference the vector types rather than memcpy them: where GCC tunes for a
// CPU it takes to prefer 256-bit moves (-march=native on some virtual Sapphire Rapids says
// rocketlake), a 64-byte memcpy becomes two 32-byte stores and a 64-byte reload, a stall on
// every load (benchmarks/NOTES.md has what it cost).
inline F16 Load(const float* p) { return *reinterpret_cast<const F16*>(p); }
inline void Store(float* p, F16 x) { *reinterpret_cast<F16*>(p) = x; }
inline F16 Broadcast(float x) { return F16{} + x; }

// 16 consecutive stored values as float32 lanes: float32, bfloat16 (uint16_t bits: the high
// half of a float32) or int8, and one such value as a float.
typedef uint16_t Bf16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t U32x16 __attribute__((vector_size(64), aligned(4)));

inline F16 Widen(const float* p) { return Load(p); }
inline F16 Widen(const uint16_t* p) {
  const Bf16x16 half = *reinterpret_cast<const Bf16x16*>(p);
  return (F16)(__builtin_convertvector(half, U32x16) << 16);  // a cast between vectors keeps the bits
}
inline F16 Widen(const int8_t* p) {
  F16 x;
#if defined(__AVX512F__)  // GCC turns the portable conversion below into scalar code
  x = (F16)_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  for (int half = 0; half < 2; ++half) {
    const __m256 wide = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * half))));
    std::memcpy(reinterpret_cast<float*>(&x) + 8 * half, &wide, sizeof wide);
  }
#else
  for (int i = 0; i < 16; ++i) x[i] = p[i];
#endif
  return x;
}

// 16 columns' bfloat16 pairs (inputs 2i and 2i + 1 of a column side by side, the even one
// first) as the even inputs' and the odd inputs' float32 lanes.
inline void WidenPairs(const uint16_t* p, F16& even, F16& odd) {
  const U32x16 bits = *reinterpret_cast<const U32x16*>(p);
  even = (F16)(bits << 16);
  odd = (F16)(bits & 0xFFFF0000u);
}

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

// x's bits as a To: a vector by a cast between vector types (a memcpy of 64 bytes goes
// through the stack where GCC tunes for 256-bit moves), a scalar by memcpy.
template <typename To, typename From>
inline To BitCast(From x) {
  static_assert(sizeof(To) == sizeof(From));
  if constexpr (std::is_arithmetic_v<From>) {
    To y;
    std::memcpy(&y, &x, sizeof y);
    return y;
  } else {
    return (To)x;
  }
}

// e^x for a float or 16 lanes (F = float, I = int32_t or F16, I16): std::exp does not
// vectorize without -ffast-math. x = n ln2 + r with |r| <= ln2 / 2, e^r by the Cephes expf
// polynomial, 2^n built in the exponent bits. At most 1.4 ulp from e^x; x is taken into
// [-87, 88] (e^-87 is 1.6e-38, e^88 1.7e38: 2^n stays a normal float).
template <typename F, typename I>
inline F Exp(F x) {
  const F lowest = F{} - 87.0f, highest = F{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const F shifter = F{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const F shifted = x * 1.44269504088896341f + shifter;
  const F n = shifted - shifter;
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n sits in the low mantissa bits of `shifted`; 2^n is its exponent field.
  const I scale_bits = (BitCast<I>(shifted) - 0x4B400000 + 127) << 23;
  return p * BitCast<F>(scale_bits);
}
