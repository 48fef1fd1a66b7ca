// CPU SDE step and log-prob (docs/method.md sections 1-2); see vipo_cpu.h for the layout.
#include <algorithm>

#include "common.h"

namespace vipo {

void gaussian_step_cpu(void* next_out, DType next_dtype, int64_t next_stride_b,
                       int64_t next_stride_c, float* logp_out, Latent v, Latent z, Latent x,
                       StepCoefficients coef, Sizes s, bool sample_noise, int num_threads) {
  const int64_t n_blocks = cpu_detail::num_blocks(s);
  const int64_t n_tasks = s.B * n_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    // Rows: v, z, x conversions, the mean, the next value; sum_row(0): sum_c diff^2.
    cpu_detail::Scratch scratch(5, s.block_p);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const auto [b, p0, n] = cpu_detail::task_positions(task, n_blocks, s);
      const float cs = coef.cs[b], co = coef.co[b], sd = coef.std[b];
      float* __restrict__ mean = scratch[3];
      double* __restrict__ sq = scratch.sum_row(0);
      std::fill(sq, sq + n, 0.0);
      for (int64_t c = 0; c < s.C; ++c) {
        const float* __restrict__ vr = load_row(cpu_detail::at(v, b, c, p0), v.dtype, n, scratch[0]);
        const float* __restrict__ zr = load_row(cpu_detail::at(z, b, c, p0), z.dtype, n, scratch[1]);
        const float* __restrict__ xr = load_row(cpu_detail::at(x, b, c, p0), x.dtype, n, scratch[2]);
        const float* __restrict__ target = xr;
        if (sample_noise) {
          void* dst = cpu_detail::at_out(next_out, next_dtype,
                                         b * next_stride_b + c * next_stride_c + p0);
          // fp32 samples are computed straight into place; 16-bit ones via a row.
          float* __restrict__ nxt =
              next_dtype == DType::kFloat32 ? static_cast<float*>(dst) : scratch[4];
          // The reference's operation order: the mean, then + std * noise (no FMA: see
          // setup.py), so the stored sample rounds exactly as torch's does.
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            mean[j] = cs * zr[j] + co * vr[j];
            nxt[j] = mean[j] + sd * xr[j];
          }
          if (next_dtype != DType::kFloat32) {
            store_row(dst, next_dtype, nxt, n);
            // The log-prob is of the stored (rounded) value, so a recompute from it matches.
            round_row(next_dtype, nxt, n);
          }
          target = nxt;
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) mean[j] = cs * zr[j] + co * vr[j];
        }
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float d = target[j] - mean[j];
          sq[j] += static_cast<double>(d) * d;
        }
      }
      const double norm = cpu_detail::log_density_constant(s.C, sd);
      const double two_var = 2.0 * sd * sd;
      float* __restrict__ out = logp_out + b * s.P + p0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(-sq[j] / two_var - norm);
    }
  }
}

}  // namespace vipo
