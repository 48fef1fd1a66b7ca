// Pieces shared by the CPU kernel files.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "vipo_cpu.h"

namespace vipo {
namespace cpu_detail {

constexpr float kHalfLog2Pi = 0.91893853320467274178f;  // log(2 pi) / 2

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
  int64_t row;
  Scratch(int64_t rows, int64_t block_p) : storage(rows * block_p), row(block_p) {}
  float* operator[](int64_t i) { return storage.data() + i * row; }
};

}  // namespace cpu_detail
}  // namespace vipo
