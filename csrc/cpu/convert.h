// fp32 <-> bf16 / fp16 by bit manipulation, branch-free so that loops over a row of
// positions auto-vectorise (the scalar c10 converters go through F16C intrinsics or
// libgcc calls, which block vectorisation). No torch headers: the CPU kernels build
// with a plain C++ compiler (CMakeLists.txt's vipo_cpu library).
//
// Provenance: the fp16 conversions implement the branch-free method of Marat Dukhan's
// FP16 library (github.com/Maratyszcza/FP16, include/fp16/fp16.h, MIT licence),
// fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value, which c10/util/Half.h also uses;
// rewritten here with memcpy bit casts. Both round to nearest even, as torch's .to() does,
// so a value this code rounds matches the reference's rounding bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "../dtype.h"

namespace vipo {

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Branch-free select on integers. A ternary here lets GCC sink the float arithmetic of the
// unused arm into a branch, which it then cannot if-convert under -ftrapping-math (the
// default), and the row loops stop vectorising.
inline uint32_t select(bool cond, uint32_t if_true, uint32_t if_false) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (if_true & mask) | (if_false & ~mask);
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  // Round to nearest even by adding 0x7fff plus the lowest kept bit; NaN stays a quiet NaN.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
  // Normal numbers: move the exponent/mantissa into fp32 position, rebias by a multiply
  // (2^-112 turns fp16 inf/NaN exponents into fp32 inf/NaN for free).
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: mantissa as the low bits of 0.5's significand, minus 0.5.
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t denormalized_bits = f32_to_bits(denormalized);
  const uint32_t normalized_bits = f32_to_bits(normalized);
  return bits_to_f32(sign | select(two_w < (1u << 27), denormalized_bits, normalized_bits));
}

inline uint16_t f32_to_f16(float f) {
  // Scale so that fp32 rounding in the addition below performs fp16's round-to-nearest-even.
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t magnitude = select(shl1_w > 0xFF000000u, 0x7E00u, nonsign);  // NaN -> quiet NaN
  return static_cast<uint16_t>((sign >> 16) | magnitude);
}

// A row of n elements starting at src, as fp32. fp32 rows are returned in place (no copy);
// 16-bit rows are converted into buf, which must hold n floats.
inline const float* load_row(const void* src, DType dtype, int64_t n, float* __restrict__ buf) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(src);
    case DType::kBFloat16: {
      const uint16_t* __restrict__ s = static_cast<const uint16_t*>(src);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_f32(s[j]);
      return buf;
    }
    case DType::kFloat16: {
      const uint16_t* __restrict__ s = static_cast<const uint16_t*>(src);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) buf[j] = f16_to_f32(s[j]);
      return buf;
    }
  }
  return nullptr;
}

// Stores n fp32 values as dtype at dst.
inline void store_row(void* dst, DType dtype, const float* __restrict__ src, int64_t n) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kBFloat16: {
      uint16_t* __restrict__ d = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = f32_to_bf16(src[j]);
      return;
    }
    case DType::kFloat16: {
      uint16_t* __restrict__ d = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = f32_to_f16(src[j]);
      return;
    }
  }
}

// Rounds each value to dtype and back, in place: what a store then a load would give.
inline void round_row(DType dtype, float* __restrict__ row, int64_t n) {
  if (dtype == DType::kBFloat16) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = bf16_to_f32(f32_to_bf16(row[j]));
  } else if (dtype == DType::kFloat16) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = f16_to_f32(f32_to_f16(row[j]));
  }
}

}  // namespace vipo
