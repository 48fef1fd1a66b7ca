// Pieces shared by the CPU kernel files.
#pragma once

#include <cmath>
#include <cstdint>
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

inline int64_t num_blocks(const Sizes& s) { return (s.P + s.block_p - 1) / s.block_p; }

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
