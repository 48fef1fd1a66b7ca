// The fused loss's two tables, as C++ enums: the columns of the per-block partial sums every
// position-level kernel writes (CPU, CUDA; Triton in vipo_kernels/triton_backend.py), and the
// statistics vector the CPU reduction returns. vipo_kernels/partials.py defines the meaning
// of each column and the Python reduction; tests/test_partials.py checks that these enums
// list the same names in the same order (kSurrogateUpper is "surrogate_upper"). No torch or
// CUDA headers: the CPU kernels, the .cu files and the bindings all include it.
#pragma once

namespace vipo {

namespace partial {
enum Column : int {
  kSurrogateUpper,  // sum_p M(p) min(rho, 1 + eps): the surrogate of every reward with A > 0
  kSurrogateLower,  // sum_p M(p) max(rho, 1 - eps): ... and with A < 0
  kKL,              // sum_p sum_c (mu - mu_ref)^2 / (2 std^2)
  kNLow,            // #positions with rho < 1 - eps
  kNHigh,           // #positions with rho > 1 + eps
  kLogRatioSq,      // sum_p log(rho)^2
  kRatioSum,        // sum_p rho
  kRatioMin,        // min_p rho
  kRatioMax,        // max_p rho
  kBadOld,          // #positions whose old log-prob is NaN or infinite
  kBadMap,          // #positions whose map value is negative, NaN or infinite
  kCount
};
}  // namespace partial

namespace stat {
// The reduced statistics; one unweighted clip loss per reward follows them.
enum Index : int {
  kLoss,
  kLossClip,
  kLossKL,
  kClipFracLow,
  kClipFracHigh,
  kApproxKL,
  kRatioMean,
  kRatioMin,
  kRatioMax,
  kCount
};
}  // namespace stat

// The value checks' messages (vipo_kernels/validation.py MESSAGES has the same).
constexpr const char* kBadStdMessage = "std must be finite and > 0";
constexpr const char* kBadAdvantagesMessage = "advantages contains NaN or inf";
constexpr const char* kBadMapMessage = "allocation_map must be finite and >= 0";
constexpr const char* kBadOldMessage = "old_log_prob contains NaN or inf";

}  // namespace vipo
