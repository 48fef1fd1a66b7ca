// CPU fused ViPO loss, forward and backward in one pass (METHOD.md section 4); the
// layout and the partial-sum contract are in vipo_cpu.h. Mirrors the Triton kernels
// _vipo_loss_position_kernel and _vipo_grad_sample_kernel in vipo_kernels/triton_backend.py.
#include <algorithm>
#include <limits>

#include "common.h"

namespace vipo {

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
  // Rows 0-3: v, z, x, ref conversions; 6: dL/dl(p); 7: the gradient row being stored;
  // sum_row(0), sum_row(1): sum_c diff^2 and sum_c dmean^2 in double (see common.h). Then, when the gradient is written, the block's
  // diff = x - mu for every channel and, with a reference, dmean = mu - mu_ref, so the
  // second sweep over channels reads them from cache instead of converting inputs again.
  const int64_t diff_row = 8;
  const int64_t dmean_row = diff_row + (write_grad ? s.C : 1);
  const int64_t n_rows = dmean_row + (write_grad ? s.C : 1);
#pragma omp parallel num_threads(num_threads)
  {
    cpu_detail::Scratch scratch(n_rows, s.block_p);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t b = task / n_blocks;
      const int64_t block = task % n_blocks;
      const int64_t p0 = block * s.block_p;
      const int64_t n = std::min(s.block_p, s.P - p0);
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

      // Per position (a C-th of the elements, so scalar code is fine here).
      // Log-ratio as in METHOD.md 2-3: old holds the full log-density, constants included.
      const double norm = cpu_detail::log_density_constant(s.C, sd);
      const double half_inv_var = 0.5 / (static_cast<double>(sd) * sd);
      const float a = adv[b];
      const float* old_b = old + b * s.P + p0;
      const float* map_b = amap != nullptr ? amap + b * s.P + p0 : nullptr;
      float* __restrict__ dlogp = scratch[6];
      double term_sum = 0.0, kl_sum = 0.0, n_low = 0.0, n_high = 0.0, lr2_sum = 0.0,
             ratio_sum = 0.0;
      float ratio_min = std::numeric_limits<float>::infinity();
      float ratio_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float log_ratio = static_cast<float>(-half_inv_var * sq[j] - norm - old_b[j]);
        const float ratio = std::exp(log_ratio);
        const float dense_adv = map_b != nullptr ? a * map_b[j] : a;
        // PPO clip: the unclipped branch carries the gradient where it is the max, and
        // inside the clip range where both branches coincide.
        const float clipped = std::min(std::max(ratio, lo), hi);
        const float unclipped_term = -dense_adv * ratio;
        const float clipped_term = -dense_adv * clipped;
        const bool inside = ratio >= lo && ratio <= hi;
        const bool active = unclipped_term > clipped_term || inside;
        // dL/dl(p) = -A^p rho / (B|P|) on the active branch, 0 where the clip binds.
        dlogp[j] = active ? unclipped_term * grad_scale : 0.0f;
        term_sum += std::max(unclipped_term, clipped_term);
        kl_sum += half_inv_var * kl[j];
        n_low += ratio < lo ? 1.0 : 0.0;
        n_high += ratio > hi ? 1.0 : 0.0;
        lr2_sum += static_cast<double>(log_ratio) * log_ratio;
        ratio_sum += ratio;
        ratio_min = std::min(ratio_min, ratio);
        ratio_max = std::max(ratio_max, ratio);
      }
      float* out = partials_out + (b * n_blocks + block) * kNumStats;
      out[0] = static_cast<float>(term_sum);
      out[1] = static_cast<float>(kl_sum);
      out[2] = static_cast<float>(n_low);
      out[3] = static_cast<float>(n_high);
      out[4] = static_cast<float>(lr2_sum);
      out[5] = static_cast<float>(ratio_sum);
      out[6] = ratio_min;
      out[7] = ratio_max;

      if (write_grad) {
        // dl(p)/dv_c = co (x - mu) / std^2; the KL term adds kl_coef co (mu - mu_ref) / std^2,
        // scaled by the mean's 1/(B|P|). Every input row of this block was read above, so
        // writing over v (in-place backward) is safe.
        const float g_logp = co * inv_var;
        const float g_kl = kl_coef * grad_scale * co * inv_var;
        float* __restrict__ g = scratch[7];
        for (int64_t c = 0; c < s.C; ++c) {
          const float* __restrict__ diff = scratch[diff_row + c];
          if (has_ref) {
            const float* __restrict__ dmean = scratch[dmean_row + c];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) g[j] = g_logp * diff[j] * dlogp[j] + g_kl * dmean[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) g[j] = g_logp * diff[j] * dlogp[j];
          }
          store_row(cpu_detail::at_out(grad_out, grad_dtype, (b * s.C + c) * s.P + p0),
                    grad_dtype, g, n);
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
      const int64_t b = task / n_blocks;
      const int64_t block = task % n_blocks;
      const int64_t p0 = block * s.block_p;
      const int64_t n = std::min(s.block_p, s.P - p0);
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
      kl_out[b * n_blocks + block] = static_cast<float>(0.5 / (static_cast<double>(sd) * sd) * kl_sum);
    }
  }
}

}  // namespace vipo
