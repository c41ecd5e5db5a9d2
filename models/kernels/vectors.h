// 16 float lanes as GCC/Clang vector types, shared by the kernels: they compile to whatever
// -march=native offers (AVX-512, AVX2, NEON), so the vectorized paths need no intrinsics.
#pragma once

#include <cstring>

typedef float F16 __attribute__((vector_size(64), aligned(4)));  // unaligned access allowed

inline F16 Load(const float* p) {
  F16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void Store(float* p, F16 x) { std::memcpy(p, &x, sizeof x); }
inline F16 Broadcast(float x) { return F16{} + x; }
