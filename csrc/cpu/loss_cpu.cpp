// CPU fused ViPO loss, forward and backward in one pass (docs/method.md sections 4-5), and the
// reduction of its partials; the layout is in vipo_cpu.h, the partials' columns in
// ../partials.h. Mirrors _vipo_loss_position_kernel and _vipo_grad_sample_kernel in
// vipo_kernels/triton_backend.py and reduce_partials in vipo_kernels/partials.py.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace vipo {

namespace {

constexpr float kFloatMax = std::numeric_limits<float>::max();

// The scratch rows of one thread, by name, block_p values each; allocated once per parallel
// region, so O(threads * C * block_p), never the size of the latent.
class LossRows {
 public:
  // keep_channels: keep x - mu and mu - mu_ref of every channel of the block, so the gradient
  // sweep reads them from cache instead of converting the inputs again; else one row each.
  LossRows(int64_t block_p, int64_t channels, bool keep_channels)
      : n_(block_p),
        kept_(keep_channels ? channels : 1),
        rows_(static_cast<size_t>((kNamed + 2 * kept_) * block_p)),
        sums_(static_cast<size_t>(2 * block_p)) {}
  float* v() { return row(0); }  // input rows converted to fp32 (16-bit inputs only)
  float* z() { return row(1); }
  float* x() { return row(2); }
  float* ref() { return row(3); }
  float* log_ratio() { return row(4); }
  float* ratio() { return row(5); }
  float* dlogp() { return row(6); }  // dL/dl(p)
  float* grad() { return row(7); }   // a 16-bit gradient row before it is stored
  float* diff(int64_t c) { return row(kNamed + std::min(c, kept_ - 1)); }           // x - mu
  float* dmean(int64_t c) { return row(kNamed + kept_ + std::min(c, kept_ - 1)); }  // mu - mu_ref
  // Per-position channel sums in double (see common.h): sum_c (x - mu)^2, sum_c dmean^2.
  double* sq() { return sums_.data(); }
  double* kl() { return sums_.data() + n_; }

 private:
  static constexpr int64_t kNamed = 8;
  float* row(int64_t i) { return rows_.data() + i * n_; }
  int64_t n_, kept_;
  std::vector<float> rows_;
  std::vector<double> sums_;
};

// One task: sample b, positions [p0, p0 + n), and the sample's step coefficients.
struct LossTask {
  int64_t b, p0, n;
  float cs, co, sd;
};

LossTask loss_task(int64_t task, int64_t n_blocks, const Sizes& s, const StepCoefficients& coef) {
  const auto [b, p0, n] = cpu_detail::task_positions(task, n_blocks, s);
  return {b, p0, n, coef.cs[b], coef.co[b], coef.std[b]};
}

float clip_advantage(float a, float bound) { return std::min(std::max(a, -bound), bound); }

// sum_k w_k clip(A_k) over the rewards with A_k > 0 (pos) and with A_k < 0 (neg). Since M >= 0,
// the clip branch of reward k depends only on the sign of A_k, so these two numbers are all
// the gradient needs of a sample's K advantages.
struct SignedAdvantage {
  float pos, neg;
};

SignedAdvantage signed_advantage(const Advantages& adv, int64_t b) {
  double pos = 0.0, neg = 0.0;
  for (int64_t k = 0; k < adv.K; ++k) {
    const double a = clip_advantage(adv.values[b * adv.K + k], adv.adv_clip);
    (a > 0 ? pos : neg) += adv.weights[k] * a;
  }
  return {static_cast<float>(pos), static_cast<float>(neg)};
}

// Sweep 1 over channels: x - mu into rows.diff(c), its square summed into rows.sq(); with a
// reference, mu - mu_ref into rows.dmean(c), its square summed into rows.kl().
void residual_sweep(const LossTask& t, const Latent& v, const Latent& z, const Latent& x,
                    const Latent& ref, int64_t C, LossRows& rows) {
  double* __restrict__ sq = rows.sq();
  double* __restrict__ kl = rows.kl();
  std::fill(sq, sq + t.n, 0.0);
  std::fill(kl, kl + t.n, 0.0);
  const float cs = t.cs, co = t.co;
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict__ vr = load_row(cpu_detail::at(v, t.b, c, t.p0), v.dtype, t.n, rows.v());
    const float* __restrict__ zr = load_row(cpu_detail::at(z, t.b, c, t.p0), z.dtype, t.n, rows.z());
    const float* __restrict__ xr = load_row(cpu_detail::at(x, t.b, c, t.p0), x.dtype, t.n, rows.x());
    float* __restrict__ diff = rows.diff(c);
#pragma omp simd
    for (int64_t j = 0; j < t.n; ++j) {
      diff[j] = xr[j] - (cs * zr[j] + co * vr[j]);
      sq[j] += static_cast<double>(diff[j]) * diff[j];
    }
    if (ref.ptr == nullptr) continue;
    const float* __restrict__ rr =
        load_row(cpu_detail::at(ref, t.b, c, t.p0), ref.dtype, t.n, rows.ref());
    float* __restrict__ dmean = rows.dmean(c);
#pragma omp simd
    for (int64_t j = 0; j < t.n; ++j) {
      dmean[j] = co * (vr[j] - rr[j]);  // mu - mu_ref: the sample term cancels
      kl[j] += static_cast<double>(dmean[j]) * dmean[j];
    }
  }
}

// Per position, after sweep 1: the log-ratio (docs/method.md 2-3: old holds the full log-density,
// constants included), the ratio, every reward's clip, dL/dl(p) into rows.dlogp(), and the
// block's row of partials into out. kHasMap false: M = 1. A template, and its values locals,
// so that the reduction loop vectorises.
template <bool kHasMap>
void position_pass(const LossTask& t, const float* __restrict__ old_b,
                   const float* __restrict__ map_b, SignedAdvantage a, int64_t C, float lo,
                   float hi, float grad_scale, LossRows& rows, float* __restrict__ out) {
  const double norm = cpu_detail::log_density_constant(C, t.sd);
  const double half_inv_var = 0.5 / (static_cast<double>(t.sd) * t.sd);
  const double* __restrict__ sq = rows.sq();
  const double* __restrict__ klr = rows.kl();
  float* __restrict__ log_ratio = rows.log_ratio();
  float* __restrict__ ratio = rows.ratio();
  float* __restrict__ dlogp = rows.dlogp();
#pragma omp simd
  for (int64_t j = 0; j < t.n; ++j)
    log_ratio[j] = static_cast<float>(-half_inv_var * sq[j] - norm - old_b[j]);
#pragma omp simd
  for (int64_t j = 0; j < t.n; ++j) ratio[j] = cpu_detail::exp_vec(log_ratio[j]);

  // fp32 sums over at most a block of positions (exact counts up to 2^24), as Triton's.
  float upper = 0.0f, lower = 0.0f, kl = 0.0f, n_low = 0.0f, n_high = 0.0f, lr2 = 0.0f,
        ratio_sum = 0.0f, bad_old = 0.0f, bad_map = 0.0f;
  float ratio_min = std::numeric_limits<float>::infinity();
  float ratio_max = -std::numeric_limits<float>::infinity();
  const float g_pos = -a.pos * grad_scale, g_neg = -a.neg * grad_scale;
#pragma omp simd reduction(+ : upper, lower, kl, n_low, n_high, lr2, ratio_sum, bad_old, \
                               bad_map) reduction(min : ratio_min) reduction(max : ratio_max)
  for (int64_t j = 0; j < t.n; ++j) {
    const float rho = ratio[j];
    const float m = kHasMap ? map_b[j] : 1.0f;
    upper += m * std::min(rho, hi);
    lower += m * std::max(rho, lo);
    // Reward k's unclipped branch carries the gradient for rho <= 1 + eps if A_k > 0 and for
    // rho >= 1 - eps if A_k < 0 (both inside the range); dL/dl(p) = -w A M rho / (B|P|).
    dlogp[j] = m * rho * ((rho <= hi ? g_pos : 0.0f) + (rho >= lo ? g_neg : 0.0f));
    kl += static_cast<float>(half_inv_var * klr[j]);
    n_low += rho < lo ? 1.0f : 0.0f;
    n_high += rho > hi ? 1.0f : 0.0f;
    lr2 += log_ratio[j] * log_ratio[j];
    ratio_sum += rho;
    ratio_min = std::min(ratio_min, rho);
    ratio_max = std::max(ratio_max, rho);
    // fabs(NaN) <= max is false, as is NaN >= 0: non-finite values count as bad.
    bad_old += std::fabs(old_b[j]) <= kFloatMax ? 0.0f : 1.0f;
    if (kHasMap) bad_map += (m >= 0.0f) & (m <= kFloatMax) ? 0.0f : 1.0f;
  }
  out[partial::kSurrogateUpper] = upper;
  out[partial::kSurrogateLower] = lower;
  out[partial::kKL] = kl;
  out[partial::kNLow] = n_low;
  out[partial::kNHigh] = n_high;
  out[partial::kLogRatioSq] = lr2;
  out[partial::kRatioSum] = ratio_sum;
  out[partial::kRatioMin] = ratio_min;
  out[partial::kRatioMax] = ratio_max;
  out[partial::kBadOld] = bad_old;
  out[partial::kBadMap] = bad_map;
}

// Sweep 2 over channels: dL/dv_c = co (x - mu) / std^2 dL/dl(p), plus kl_coef co (mu - mu_ref)
// / std^2 scaled by the mean's 1/(B|P|). Every input row of this block was read in sweep 1,
// so writing over v (in-place backward) is safe.
void gradient_sweep(const LossTask& t, const Sizes& s, bool has_ref, float kl_coef,
                    float grad_scale, void* grad_out, DType grad_dtype, LossRows& rows) {
  const float inv_var = 1.0f / (t.sd * t.sd);
  const float g_logp = t.co * inv_var;
  const float g_kl = kl_coef * grad_scale * t.co * inv_var;
  const float* __restrict__ dlogp = rows.dlogp();
  for (int64_t c = 0; c < s.C; ++c) {
    void* dst = cpu_detail::at_out(grad_out, grad_dtype, (t.b * s.C + c) * s.P + t.p0);
    // fp32 gradients are computed straight into place; 16-bit ones via a row.
    float* __restrict__ g = grad_dtype == DType::kFloat32 ? static_cast<float*>(dst) : rows.grad();
    const float* __restrict__ diff = rows.diff(c);
    if (has_ref) {
      const float* __restrict__ dmean = rows.dmean(c);
#pragma omp simd
      for (int64_t j = 0; j < t.n; ++j) g[j] = g_logp * diff[j] * dlogp[j] + g_kl * dmean[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < t.n; ++j) g[j] = g_logp * diff[j] * dlogp[j];
    }
    if (grad_dtype != DType::kFloat32) store_row(dst, grad_dtype, g, t.n);
  }
}

float mean_grad_scale(const Sizes& s) {
  return static_cast<float>(1.0 / (static_cast<double>(s.B) * static_cast<double>(s.P)));
}

}  // namespace

void loss_position_cpu(float* partials_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                       Latent x, Latent ref, const float* old, const float* amap,
                       Advantages adv, StepCoefficients coef, Sizes s, double clip_range,
                       float kl_coef, int num_threads) {
  const bool write_grad = grad_out != nullptr;
  // The bounds are formed in double and rounded once, as Triton does with its constexpr.
  const float lo = static_cast<float>(1.0 - clip_range);
  const float hi = static_cast<float>(1.0 + clip_range);
  const float grad_scale = mean_grad_scale(s);
  const int64_t n_blocks = cpu_detail::num_blocks(s);
  const int64_t n_tasks = s.B * n_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    LossRows rows(s.block_p, s.C, write_grad);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const LossTask t = loss_task(task, n_blocks, s, coef);
      residual_sweep(t, v, z, x, ref, s.C, rows);
      const float* old_b = old + t.b * s.P + t.p0;
      const SignedAdvantage a = signed_advantage(adv, t.b);
      float* out = partials_out + task * partial::kCount;
      if (amap != nullptr) {
        position_pass<true>(t, old_b, amap + t.b * s.P + t.p0, a, s.C, lo, hi, grad_scale, rows,
                            out);
      } else {
        position_pass<false>(t, old_b, nullptr, a, s.C, lo, hi, grad_scale, rows, out);
      }
      if (write_grad) gradient_sweep(t, s, ref.ptr != nullptr, kl_coef, grad_scale, grad_out,
                                     grad_dtype, rows);
    }
  }
}

const char* reduce_partials_cpu(const float* partials, int64_t B, int64_t n_blocks,
                                int64_t positions, Advantages adv, const float* std,
                                double kl_coef, float* stats_out) {
  const double count = static_cast<double>(B) * static_cast<double>(positions);
  double totals[partial::kCount] = {};
  float ratio_min = std::numeric_limits<float>::infinity();
  float ratio_max = -std::numeric_limits<float>::infinity();
  std::vector<double> per_reward(static_cast<size_t>(adv.K), 0.0);
  bool std_ok = true, adv_ok = true;
  for (int64_t b = 0; b < B; ++b) {
    double sample[partial::kCount] = {};
    for (int64_t block = 0; block < n_blocks; ++block) {
      const float* row = partials + (b * n_blocks + block) * partial::kCount;
      for (int col = 0; col < partial::kCount; ++col) sample[col] += row[col];
      ratio_min = std::min(ratio_min, row[partial::kRatioMin]);
      ratio_max = std::max(ratio_max, row[partial::kRatioMax]);
    }
    for (int col = 0; col < partial::kCount; ++col) totals[col] += sample[col];
    // The surrogate of reward k, by the sign of A_k (vipo_kernels/partials.py).
    for (int64_t k = 0; k < adv.K; ++k) {
      const float raw = adv.values[b * adv.K + k];
      const double a = clip_advantage(raw, adv.adv_clip);
      per_reward[k] += -a * (a > 0 ? sample[partial::kSurrogateUpper]
                                   : sample[partial::kSurrogateLower]);
      adv_ok &= std::isfinite(raw);
    }
    std_ok &= std::isfinite(std[b]) && std[b] > 0.0f;
  }
  double loss_clip = 0.0;
  for (int64_t k = 0; k < adv.K; ++k) {
    per_reward[k] /= count;
    loss_clip += adv.weights[k] * per_reward[k];
    stats_out[stat::kCount + k] = static_cast<float>(per_reward[k]);
  }
  const double loss_kl = kl_coef * totals[partial::kKL] / count;
  stats_out[stat::kLoss] = static_cast<float>(loss_clip + loss_kl);
  stats_out[stat::kLossClip] = static_cast<float>(loss_clip);
  stats_out[stat::kLossKL] = static_cast<float>(loss_kl);
  stats_out[stat::kClipFracLow] = static_cast<float>(totals[partial::kNLow] / count);
  stats_out[stat::kClipFracHigh] = static_cast<float>(totals[partial::kNHigh] / count);
  stats_out[stat::kApproxKL] = static_cast<float>(0.5 * totals[partial::kLogRatioSq] / count);
  stats_out[stat::kRatioMean] = static_cast<float>(totals[partial::kRatioSum] / count);
  stats_out[stat::kRatioMin] = ratio_min;
  stats_out[stat::kRatioMax] = ratio_max;
  if (!std_ok) return kBadStdMessage;
  if (!adv_ok) return kBadAdvantagesMessage;
  if (totals[partial::kBadOld] != 0) return kBadOldMessage;
  if (totals[partial::kBadMap] != 0) return kBadMapMessage;
  return nullptr;
}

void grad_sample_cpu(float* kl_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                     Latent x, Latent ref, const float* dlogp, StepCoefficients coef, Sizes s,
                     float kl_coef, int num_threads) {
  const bool has_ref = ref.ptr != nullptr;
  const bool write_grad = grad_out != nullptr;
  const float grad_scale = mean_grad_scale(s);
  const int64_t n_blocks = cpu_detail::num_blocks(s);
  const int64_t n_tasks = s.B * n_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    LossRows rows(s.block_p, s.C, /*keep_channels=*/false);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const LossTask t = loss_task(task, n_blocks, s, coef);
      const float inv_var = 1.0f / (t.sd * t.sd);
      // dL/dl(c, p) is one number per sample at this level (it passes through the mean).
      const float g_logp = dlogp[t.b] * t.co * inv_var;
      const float g_kl = kl_coef * grad_scale * t.co * inv_var;
      const float cs = t.cs, co = t.co;
      double* __restrict__ kl = rows.kl();
      float* __restrict__ g = rows.grad();
      std::fill(kl, kl + t.n, 0.0);
      for (int64_t c = 0; c < s.C; ++c) {
        const float* __restrict__ vr = load_row(cpu_detail::at(v, t.b, c, t.p0), v.dtype, t.n, rows.v());
        const float* __restrict__ rr =
            has_ref ? load_row(cpu_detail::at(ref, t.b, c, t.p0), ref.dtype, t.n, rows.ref()) : nullptr;
        if (has_ref) {
#pragma omp simd
          for (int64_t j = 0; j < t.n; ++j) {
            const float dmean = co * (vr[j] - rr[j]);
            kl[j] += static_cast<double>(dmean) * dmean;
          }
        }
        if (!write_grad) continue;
        const float* __restrict__ zr = load_row(cpu_detail::at(z, t.b, c, t.p0), z.dtype, t.n, rows.z());
        const float* __restrict__ xr = load_row(cpu_detail::at(x, t.b, c, t.p0), x.dtype, t.n, rows.x());
        if (has_ref) {
#pragma omp simd
          for (int64_t j = 0; j < t.n; ++j)
            g[j] = g_logp * (xr[j] - (cs * zr[j] + co * vr[j])) + g_kl * (co * (vr[j] - rr[j]));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < t.n; ++j) g[j] = g_logp * (xr[j] - (cs * zr[j] + co * vr[j]));
        }
        // This channel row of v was read above: writing over it (in-place) is safe.
        store_row(cpu_detail::at_out(grad_out, grad_dtype, (t.b * s.C + c) * s.P + t.p0),
                  grad_dtype, g, t.n);
      }
      double kl_sum = 0.0;
      for (int64_t j = 0; j < t.n; ++j) kl_sum += kl[j];
      kl_out[task] = static_cast<float>(0.5 / (static_cast<double>(t.sd) * t.sd) * kl_sum);
    }
  }
}

}  // namespace vipo
