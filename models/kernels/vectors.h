// Float vectors as GCC/Clang vector types, shared by the kernels: they compile to whatever
// -march=native offers (AVX-512, AVX2, NEON), so the vectorized paths need no intrinsics
// (but for widening int8, below, where GCC's portable conversion is scalar).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// The widest vector the target keeps in registers: 16 float lanes with AVX-512, 8 with AVX, 4
// elsewhere (SSE, NEON). A wider vector type than the target's is no error, but GCC keeps it
// in memory and moves it piece by piece: the kernels ran at a scalar's speed on AVX2 while
// their vectors were 16 lanes wide everywhere (benchmarks/NOTES.md).
#if defined(__AVX512F__)
#define FLOVER_LANES 16
#elif defined(__AVX__)
#define FLOVER_LANES 8
#else
#define FLOVER_LANES 4
#endif
constexpr int kLanes = FLOVER_LANES;
typedef float FV __attribute__((vector_size(4 * FLOVER_LANES), aligned(4)));  // unaligned access allowed
typedef int32_t IV __attribute__((vector_size(4 * FLOVER_LANES), aligned(4)));  // FV's lane indices
typedef uint32_t UV __attribute__((vector_size(4 * FLOVER_LANES), aligned(4)));
typedef uint16_t BfV __attribute__((vector_size(2 * FLOVER_LANES), aligned(2)));  // bfloat16 bits
#undef FLOVER_LANES

// Loads and stores dereference the vector types rather than memcpy them: where GCC tunes for a
// CPU it takes to prefer 256-bit moves (-march=native on some virtual Sapphire Rapids says
// rocketlake), a 64-byte memcpy becomes two 32-byte stores and a 64-byte reload, a stall on
// every load (benchmarks/NOTES.md has what it cost).
inline FV Load(const float* p) { return *reinterpret_cast<const FV*>(p); }
inline void Store(float* p, FV x) { *reinterpret_cast<FV*>(p) = x; }
inline FV Broadcast(float x) { return FV{} + x; }

// kLanes consecutive stored values as float32 lanes: float32, bfloat16 (uint16_t bits: the
// high half of a float32) or int8, and one such value as a float.
inline FV Widen(const float* p) { return Load(p); }
inline FV Widen(const uint16_t* p) {
  const BfV half = *reinterpret_cast<const BfV*>(p);
  return (FV)(__builtin_convertvector(half, UV) << 16);  // a cast between vectors keeps the bits
}
inline FV Widen(const int8_t* p) {  // GCC turns the portable conversion into scalar code
#if defined(__AVX512F__)
  return (FV)_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (FV)_mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  FV x;
  for (int i = 0; i < kLanes; ++i) x[i] = p[i];
  return x;
#endif
}

// kLanes columns' bfloat16 pairs (inputs 2i and 2i + 1 of a column side by side, the even one
// first) as the even (odd = 0) or the odd inputs' float32 lanes.
inline FV WidenPair(const uint16_t* p, int odd) {
  const UV bits = *reinterpret_cast<const UV*>(p);
  return (FV)(odd ? bits & 0xFFFF0000u : bits << 16);
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

// e^x for a float or a vector (F = float, I = int32_t or FV, IV): std::exp does not
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
