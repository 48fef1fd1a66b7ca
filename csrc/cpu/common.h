// Pieces shared by the CPU kernel files.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vipo_cpu.h"

namespace vipo {
namespace cpu_detail {

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2

// C (log std + log(2 pi) / 2): the constant part of a position's log-density, in double.
// In fp32 its rounding (about C ulp of 0.5) is the same at every position of a sample and
// shifts every log-ratio alike; with C = 37 that bias alone tripled the error of approx_kl
// against the float64 reference. So per-position sums are kept in double, and the
// log-density is formed in double and rounded once (per position: a C-th of the work).
inline double log_density_constant(int64_t C, float sd) {
  return static_cast<double>(C) * (std::log(static_cast<double>(sd)) + kHalfLog2Pi);
}

// exp(x) for fp32, written so that a loop over positions vectorises (libm's expf does
// not without -ffast-math). Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then
// Cephes' degree-6 polynomial for expf (Stephen Moshier's Cephes library, expf.c; the
// same coefficients as sse_mathfun); about 1 ulp over the range, which the tests check
// against float64. Overflow gives inf, underflow 0 (fp32 subnormals flush), NaN stays NaN.
inline float exp_vec(float x) {
  // Ternaries, not std::fmin/fmax: those are libm calls under IEEE NaN rules and stop
  // vectorisation. A NaN passes through the clamp and is restored at the end.
  const float lo_clamped = x < -87.3f ? -87.3f : x;
  const float xc = lo_clamped > 88.7f ? 88.7f : lo_clamped;
  // Round to nearest by the 1.5 * 2^23 trick: SSE2 has no vector floor (roundps is SSE4.1).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 split in two for an exact first product
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const float scale = bits_to_f32(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  const float result = e * scale;
  const float big = x > 88.7228391f ? std::numeric_limits<float>::infinity() : result;
  const float small = x < -87.3365448f ? 0.0f : big;
  return x != x ? x : small;
}

inline int64_t num_blocks(const Sizes& s) { return (s.P + s.block_p - 1) / s.block_p; }

// What one OpenMP task owns: sample b, positions [p0, p0 + n). Task t is row t of the
// (B, n_blocks) per-block outputs.
struct Task {
  int64_t b, p0, n;
};
inline Task task_positions(int64_t task, int64_t n_blocks, const Sizes& s) {
  const int64_t p0 = (task % n_blocks) * s.block_p;
  return {task / n_blocks, p0, std::min(s.block_p, s.P - p0)};
}

// Pointer to element (b, c, p) of a latent.
inline const void* at(const Latent& t, int64_t b, int64_t c, int64_t p) {
  const int64_t elem = b * t.stride_b + c * t.stride_c + p;
  const int64_t bytes = t.dtype == DType::kFloat32 ? 4 : 2;
  return static_cast<const char*>(t.ptr) + elem * bytes;
}

inline void* at_out(void* ptr, DType dtype, int64_t offset) {
  return static_cast<char*>(ptr) + offset * (dtype == DType::kFloat32 ? 4 : 2);
}

// Per-thread scratch rows of block_p floats, allocated once per parallel region:
// O(threads * C * block_p), never the size of the latent.
struct Scratch {
  std::vector<float> storage;
  std::vector<double> sums;  // two double rows: per-position channel sums
  int64_t row;
  Scratch(int64_t rows, int64_t block_p)
      : storage(rows * block_p), sums(2 * block_p), row(block_p) {}
  float* operator[](int64_t i) { return storage.data() + i * row; }
  double* sum_row(int64_t i) { return sums.data() + i * row; }
};

}  // namespace cpu_detail
}  // namespace vipo
