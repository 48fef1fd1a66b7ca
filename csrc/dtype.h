// Element type of a latent, shared by the CPU kernels, the CUDA launchers and the torch
// binding (which maps torch dtypes onto it). No torch or CUDA headers.
#pragma once

namespace vipo {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace vipo
