// CPU fused ViPO loss, forward and backward in one pass (METHOD.md section 4); the
// layout and the partial-sum contract are in vipo_cpu.h. Mirrors the Triton kernels
// _vipo_loss_position_kernel and _vipo_grad_sample_kernel in vipo_kernels/triton_backend.py.
#include <algorithm>
#include <limits>

#include "common.h"

namespace vipo {

namespace {

// The PPO clip of n positions (METHOD.md 4): dL/dl(p) into dlogp, and the block's row of
// partials, [surrogate sum, KL sum, #ratio < lo, #ratio > hi, sum log(ratio)^2, sum ratio,
// min, max]. A function of its own so that every value is a local the vectoriser can keep
// in registers (shared variables of the OpenMP region are read through a pointer).
void clip_and_reduce(const float* __restrict__ ratio, const float* __restrict__ log_ratio,
                     const float* __restrict__ dense, const double* __restrict__ kl,
                     double half_inv_var, float lo, float hi, float grad_scale, int64_t n,
                     float* __restrict__ dlogp, float* __restrict__ out) {
  // fp32 sums over at most a block of positions (exact counts up to 2^24), as Triton's.
  float term_sum = 0.0f, kl_sum = 0.0f, n_low = 0.0f, n_high = 0.0f, lr2_sum = 0.0f,
        ratio_sum = 0.0f;
  float ratio_min = std::numeric_limits<float>::infinity();
  float ratio_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(+ : term_sum, kl_sum, n_low, n_high, lr2_sum, ratio_sum) \
    reduction(min : ratio_min) reduction(max : ratio_max)
  for (int64_t j = 0; j < n; ++j) {
    const float rho = ratio[j];
    // The unclipped branch carries the gradient where it is the max, and inside the clip
    // range where both branches coincide (& and |, not && and ||: no branches).
    const float clipped = std::min(std::max(rho, lo), hi);
    const float unclipped_term = -dense[j] * rho;
    const float clipped_term = -dense[j] * clipped;
    const bool inside = (rho >= lo) & (rho <= hi);
    const bool active = (unclipped_term > clipped_term) | inside;
    dlogp[j] = active ? unclipped_term * grad_scale : 0.0f;  // -A^p rho / (B|P|), or 0
    term_sum += std::max(unclipped_term, clipped_term);
    kl_sum += static_cast<float>(half_inv_var * kl[j]);
    n_low += rho < lo ? 1.0f : 0.0f;
    n_high += rho > hi ? 1.0f : 0.0f;
    lr2_sum += log_ratio[j] * log_ratio[j];
    ratio_sum += rho;
    ratio_min = std::min(ratio_min, rho);
    ratio_max = std::max(ratio_max, rho);
  }
  out[0] = term_sum;
  out[1] = kl_sum;
  out[2] = n_low;
  out[3] = n_high;
  out[4] = lr2_sum;
  out[5] = ratio_sum;
  out[6] = ratio_min;
  out[7] = ratio_max;
}

}  // namespace

void loss_position_cpu(float* partials_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                       Latent x, Latent ref, const float* old, const float* amap,
                       const float* adv, StepCoefficients coef, Sizes s, double clip_range,
                       float kl_coef, float grad_scale, int num_threads) {
  const bool has_ref = ref.ptr != nullptr;
  const bool write_grad = grad_out != nullptr;
  // The bounds are formed in double and rounded once, as Triton does with its constexpr.
  const float lo = static_cast<float>(1.0 - clip_range);
  const float hi = static_cast<float>(1.0 + clip_range);
  const int64_t n_blocks = cpu_detail::num_blocks(s);
  const int64_t n_tasks = s.B * n_blocks;
  // Rows 0-3: v, z, x, ref conversions; 4: A^p; 6: dL/dl(p); 7: the gradient row stored;
  // 8, 9: log-ratio and ratio; sum_row(0), sum_row(1): sum_c diff^2 and sum_c dmean^2 in
  // double (see common.h). Then, when the gradient is written, the block's
  // diff = x - mu for every channel and, with a reference, dmean = mu - mu_ref, so the
  // second sweep over channels reads them from cache instead of converting inputs again.
  const int64_t diff_row = 10;
  const int64_t dmean_row = diff_row + (write_grad ? s.C : 1);
  const int64_t n_rows = dmean_row + (write_grad ? s.C : 1);
#pragma omp parallel num_threads(num_threads)
  {
    cpu_detail::Scratch scratch(n_rows, s.block_p);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const auto [b, p0, n] = cpu_detail::task_positions(task, n_blocks, s);
      const float cs = coef.cs[b], co = coef.co[b], sd = coef.std[b];
      const float inv_var = 1.0f / (sd * sd);
      double* __restrict__ sq = scratch.sum_row(0);
      double* __restrict__ kl = scratch.sum_row(1);
      std::fill(sq, sq + n, 0.0);
      std::fill(kl, kl + n, 0.0);

      for (int64_t c = 0; c < s.C; ++c) {
        const float* __restrict__ vr = load_row(cpu_detail::at(v, b, c, p0), v.dtype, n, scratch[0]);
        const float* __restrict__ zr = load_row(cpu_detail::at(z, b, c, p0), z.dtype, n, scratch[1]);
        const float* __restrict__ xr = load_row(cpu_detail::at(x, b, c, p0), x.dtype, n, scratch[2]);
        float* __restrict__ diff = scratch[diff_row + (write_grad ? c : 0)];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          diff[j] = xr[j] - (cs * zr[j] + co * vr[j]);
          sq[j] += static_cast<double>(diff[j]) * diff[j];
        }
        if (has_ref) {
          const float* __restrict__ rr =
              load_row(cpu_detail::at(ref, b, c, p0), ref.dtype, n, scratch[3]);
          float* __restrict__ dmean = scratch[dmean_row + (write_grad ? c : 0)];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            dmean[j] = co * (vr[j] - rr[j]);  // mu - mu_ref: the sample term cancels
            kl[j] += static_cast<double>(dmean[j]) * dmean[j];
          }
        }
      }

      // Per position, in vectorised passes: the log-ratio (METHOD.md 2-3: old holds the full
      // log-density, constants included), the ratio, A^p, then the clip and statistics.
      const double norm = cpu_detail::log_density_constant(s.C, sd);
      const double half_inv_var = 0.5 / (static_cast<double>(sd) * sd);
      const float a = adv[b];
      const float* __restrict__ old_b = old + b * s.P + p0;
      const float* __restrict__ map_b = amap != nullptr ? amap + b * s.P + p0 : nullptr;
      float* __restrict__ log_ratio = scratch[8];
      float* __restrict__ ratio = scratch[9];
      float* __restrict__ dlogp = scratch[6];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        log_ratio[j] = static_cast<float>(-half_inv_var * sq[j] - norm - old_b[j]);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ratio[j] = cpu_detail::exp_vec(log_ratio[j]);
      float* __restrict__ dense = scratch[4];  // A^p = A M(p)
      if (map_b != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dense[j] = a * map_b[j];
      } else {
        std::fill(dense, dense + n, a);
      }
      clip_and_reduce(ratio, log_ratio, dense, kl, half_inv_var, lo, hi, grad_scale, n, dlogp,
                      partials_out + task * kNumStats);

      if (write_grad) {
        // dl(p)/dv_c = co (x - mu) / std^2; the KL term adds kl_coef co (mu - mu_ref) / std^2,
        // scaled by the mean's 1/(B|P|). Every input row of this block was read above, so
        // writing over v (in-place backward) is safe.
        const float g_logp = co * inv_var;
        const float g_kl = kl_coef * grad_scale * co * inv_var;
        for (int64_t c = 0; c < s.C; ++c) {
          void* dst = cpu_detail::at_out(grad_out, grad_dtype, (b * s.C + c) * s.P + p0);
          // fp32 gradients are computed straight into place; 16-bit ones via a row.
          float* __restrict__ g =
              grad_dtype == DType::kFloat32 ? static_cast<float*>(dst) : scratch[7];
          const float* __restrict__ diff = scratch[diff_row + c];
          if (has_ref) {
            const float* __restrict__ dmean = scratch[dmean_row + c];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) g[j] = g_logp * diff[j] * dlogp[j] + g_kl * dmean[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) g[j] = g_logp * diff[j] * dlogp[j];
          }
          if (grad_dtype != DType::kFloat32) store_row(dst, grad_dtype, g, n);
        }
      }
    }
  }
}

void grad_sample_cpu(float* kl_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                     Latent x, Latent ref, const float* dlogp, StepCoefficients coef, Sizes s,
                     float kl_coef, float grad_scale, int num_threads) {
  const bool has_ref = ref.ptr != nullptr;
  const bool write_grad = grad_out != nullptr;
  const int64_t n_blocks = cpu_detail::num_blocks(s);
  const int64_t n_tasks = s.B * n_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    // Rows 0-3: v, z, x, ref conversions; 5: the gradient row; sum_row(0): sum_c dmean^2.
    cpu_detail::Scratch scratch(6, s.block_p);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const auto [b, p0, n] = cpu_detail::task_positions(task, n_blocks, s);
      const float cs = coef.cs[b], co = coef.co[b], sd = coef.std[b];
      const float inv_var = 1.0f / (sd * sd);
      // dL/dl(c, p) is one number per sample at this level (it passes through the mean).
      const float g_logp = dlogp[b] * co * inv_var;
      const float g_kl = kl_coef * grad_scale * co * inv_var;
      double* __restrict__ kl = scratch.sum_row(0);
      float* __restrict__ g = scratch[5];
      std::fill(kl, kl + n, 0.0);
      for (int64_t c = 0; c < s.C; ++c) {
        const float* __restrict__ vr = load_row(cpu_detail::at(v, b, c, p0), v.dtype, n, scratch[0]);
        const float* __restrict__ rr =
            has_ref ? load_row(cpu_detail::at(ref, b, c, p0), ref.dtype, n, scratch[3]) : nullptr;
        if (has_ref) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float dmean = co * (vr[j] - rr[j]);
            kl[j] += static_cast<double>(dmean) * dmean;
          }
        }
        if (!write_grad) continue;
        const float* __restrict__ zr = load_row(cpu_detail::at(z, b, c, p0), z.dtype, n, scratch[1]);
        const float* __restrict__ xr = load_row(cpu_detail::at(x, b, c, p0), x.dtype, n, scratch[2]);
        if (has_ref) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j)
            g[j] = g_logp * (xr[j] - (cs * zr[j] + co * vr[j])) + g_kl * (co * (vr[j] - rr[j]));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) g[j] = g_logp * (xr[j] - (cs * zr[j] + co * vr[j]));
        }
        // This channel row of v was read above: writing over it (in-place) is safe.
        store_row(cpu_detail::at_out(grad_out, grad_dtype, (b * s.C + c) * s.P + p0),
                  grad_dtype, g, n);
      }
      double kl_sum = 0.0;
      for (int64_t j = 0; j < n; ++j) kl_sum += kl[j];
      kl_out[task] = static_cast<float>(0.5 / (static_cast<double>(sd) * sd) * kl_sum);
    }
  }
}

}  // namespace vipo
