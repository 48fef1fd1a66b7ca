// CUDA fused ViPO loss, forward and backward in one launch (docs/method.md sections 4-5), and the
// upstream-gradient scaling of backward; host API in vipo_cuda.h. Mirrors
// _vipo_loss_position_kernel / _vipo_grad_sample_kernel of vipo_kernels/triton_backend.py
// and csrc/cpu/loss_cpu.cpp.
//
// Each thread block reduces its partials (csrc/partials.h) in shared memory and writes one
// row; the sum over blocks is vipo_kernels/partials.py's reduce_partials (torch ops on the
// device, no host sync), so there are no atomics and the result is deterministic.
//
// The gradient sweep reads v, z, x (and ref) a second time instead of keeping the block's
// diff for every channel in registers (C is a runtime size); the second read is of data
// this thread block read moments before, so it is served by L2, not HBM.
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace vipo {
namespace {

using cuda_detail::kVec;

struct LatentPtrs {
  int64_t v_stride_b, v_stride_c, z_stride_b, z_stride_c, x_stride_b, x_stride_c,
      r_stride_b, r_stride_c;
};

// sum_k w_k clip(A_k) over the rewards with A_k > 0 (pos) and A_k < 0 (neg): since M >= 0,
// reward k's clip branch depends only on the sign of A_k (csrc/cpu/loss_cpu.cpp).
struct SignedAdvantage {
  float pos, neg;
};

__device__ __forceinline__ float clip_advantage(float a, float bound) {
  return fminf(fmaxf(a, -bound), bound);
}

__device__ __forceinline__ SignedAdvantage signed_advantage(const CudaAdvantages& adv, int64_t b) {
  double pos = 0.0, neg = 0.0;
  for (int64_t k = 0; k < adv.K; ++k) {
    const double a = clip_advantage(adv.values[b * adv.K + k], adv.adv_clip);
    if (a > 0) pos += adv.weights[k] * a; else neg += adv.weights[k] * a;
  }
  return {static_cast<float>(pos), static_cast<float>(neg)};
}

template <typename TV, typename TZ>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    loss_position_kernel(float* __restrict__ partials_out, TV* grad, const TV* v, const TZ* z,
                         const TZ* x, const TV* ref, LatentPtrs st,
                         const float* __restrict__ old, const float* __restrict__ amap,
                         CudaAdvantages adv, const float* __restrict__ cs_ptr,
                         const float* __restrict__ co_ptr, const float* __restrict__ std_ptr,
                         int64_t C, int64_t P, int64_t n_blocks, int64_t block_p, float lo,
                         float hi, float kl_coef, float grad_scale, bool aligned,
                         bool grad_aligned) {
  const cuda_detail::Tile t = cuda_detail::tile(n_blocks, block_p);
  const bool has_ref = ref != nullptr;
  const float cs = cs_ptr[t.b], co = co_ptr[t.b], sd = std_ptr[t.b];
  const float inv_var = 1.0f / (sd * sd);
  const TV* vb = v + t.b * st.v_stride_b;
  const TZ* zb = z + t.b * st.z_stride_b;
  const TZ* xb = x + t.b * st.x_stride_b;
  const TV* rb = has_ref ? ref + t.b * st.r_stride_b : nullptr;

  // Sweep 1: per position, sum_c (x - mu)^2 and sum_c (mu - mu_ref)^2, in double (the
  // reason is in csrc/cpu/common.h: the log-density is a large number minus a large one).
  double sq[kVec] = {}, kl[kVec] = {};
  if (t.p < P) {
    for (int64_t c = 0; c < C; ++c) {
      float vv[kVec], zz[kVec], xx[kVec];
      cuda_detail::load_positions(vb + c * st.v_stride_c, t.p, P, aligned, vv);
      cuda_detail::load_positions(zb + c * st.z_stride_c, t.p, P, aligned, zz);
      cuda_detail::load_positions(xb + c * st.x_stride_c, t.p, P, aligned, xx);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = xx[i] - (cs * zz[i] + co * vv[i]);
        sq[i] += static_cast<double>(d) * d;
      }
      if (has_ref) {
        float rr[kVec];
        cuda_detail::load_positions(rb + c * st.r_stride_c, t.p, P, aligned, rr);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float dm = co * (vv[i] - rr[i]);  // mu - mu_ref: the sample term cancels
          kl[i] += static_cast<double>(dm) * dm;
        }
      }
    }
  }

  // Per position: ratio, every reward's clip, dL/dl(p), the partials (csrc/partials.h).
  const double norm = static_cast<double>(C) * (log(static_cast<double>(sd)) +
                                                cuda_detail::kHalfLog2Pi);
  const double half_inv_var = 0.5 / (static_cast<double>(sd) * sd);
  const SignedAdvantage a = signed_advantage(adv, t.b);
  float stats[partial::kCount] = {};
  stats[partial::kRatioMin] = INFINITY;
  stats[partial::kRatioMax] = -INFINITY;
  float dlogp[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    dlogp[i] = 0.0f;
    const int64_t p = t.p + i;
    if (p >= P) continue;
    const float old_p = old[t.b * P + p];
    const float log_ratio = static_cast<float>(-half_inv_var * sq[i] - norm - old_p);
    const float ratio = expf(log_ratio);
    const float m = amap != nullptr ? amap[t.b * P + p] : 1.0f;
    // Reward k's unclipped branch carries the gradient for rho <= 1 + eps if A_k > 0 and for
    // rho >= 1 - eps if A_k < 0; dL/dl(p) = -w A M rho / (B|P|).
    const float coef = (ratio <= hi ? a.pos : 0.0f) + (ratio >= lo ? a.neg : 0.0f);
    dlogp[i] = -m * ratio * coef * grad_scale;
    stats[partial::kSurrogateUpper] += m * fminf(ratio, hi);
    stats[partial::kSurrogateLower] += m * fmaxf(ratio, lo);
    stats[partial::kKL] += static_cast<float>(half_inv_var * kl[i]);
    stats[partial::kNLow] += ratio < lo ? 1.0f : 0.0f;
    stats[partial::kNHigh] += ratio > hi ? 1.0f : 0.0f;
    stats[partial::kLogRatioSq] += log_ratio * log_ratio;
    stats[partial::kRatioSum] += ratio;
    stats[partial::kRatioMin] = fminf(stats[partial::kRatioMin], ratio);
    stats[partial::kRatioMax] = fmaxf(stats[partial::kRatioMax], ratio);
    stats[partial::kBadOld] += isfinite(old_p) ? 0.0f : 1.0f;
    stats[partial::kBadMap] += (m >= 0.0f && isfinite(m)) ? 0.0f : 1.0f;
  }
  cuda_detail::block_reduce<partial::kCount, partial::kRatioMin, partial::kRatioMax>(stats);
  if (threadIdx.x == 0) {
    float* out = partials_out + (t.b * n_blocks + t.block) * partial::kCount;
#pragma unroll
    for (int k = 0; k < partial::kCount; ++k) out[k] = stats[k];
  }

  // Sweep 2: dl(p)/dv_c = co (x - mu) / std^2, plus kl_coef co (mu - mu_ref) / std^2 scaled
  // by the mean's 1/(B|P|). Each element of v is read before this thread overwrites it
  // (in-place backward: grad may alias v), and no other thread touches these positions.
  if (grad == nullptr || t.p >= P) return;
  const float g_logp = co * inv_var;
  const float g_kl = kl_coef * grad_scale * co * inv_var;
  TV* gb = grad + t.b * C * P;
  for (int64_t c = 0; c < C; ++c) {
    float vv[kVec], zz[kVec], xx[kVec], g[kVec];
    cuda_detail::load_positions(vb + c * st.v_stride_c, t.p, P, aligned, vv);
    cuda_detail::load_positions(zb + c * st.z_stride_c, t.p, P, aligned, zz);
    cuda_detail::load_positions(xb + c * st.x_stride_c, t.p, P, aligned, xx);
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = g_logp * (xx[i] - (cs * zz[i] + co * vv[i])) * dlogp[i];
    if (has_ref) {
      float rr[kVec];
      cuda_detail::load_positions(rb + c * st.r_stride_c, t.p, P, aligned, rr);
#pragma unroll
      for (int i = 0; i < kVec; ++i) g[i] += g_kl * (co * (vv[i] - rr[i]));
    }
    cuda_detail::store_positions(gb + c * P, t.p, P, grad_aligned, g);
  }
}

template <typename TV, typename TZ>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    grad_sample_kernel(float* __restrict__ kl_out, TV* grad, const TV* v, const TZ* z,
                       const TZ* x, const TV* ref, LatentPtrs st,
                       const float* __restrict__ dlogp_ptr, const float* __restrict__ cs_ptr,
                       const float* __restrict__ co_ptr, const float* __restrict__ std_ptr,
                       int64_t C, int64_t P, int64_t n_blocks, int64_t block_p, float kl_coef,
                       float grad_scale, bool aligned, bool grad_aligned) {
  const cuda_detail::Tile t = cuda_detail::tile(n_blocks, block_p);
  const bool has_ref = ref != nullptr;
  const float cs = cs_ptr[t.b], co = co_ptr[t.b], sd = std_ptr[t.b];
  const float inv_var = 1.0f / (sd * sd);
  // dL/dl(c, p) is one number per sample at this level (it passes through the mean).
  const float g_logp = dlogp_ptr[t.b] * co * inv_var;
  const float g_kl = kl_coef * grad_scale * co * inv_var;
  const TV* vb = v + t.b * st.v_stride_b;
  const TZ* zb = z + t.b * st.z_stride_b;
  const TZ* xb = x + t.b * st.x_stride_b;
  const TV* rb = has_ref ? ref + t.b * st.r_stride_b : nullptr;
  TV* gb = grad != nullptr ? grad + t.b * C * P : nullptr;
  double kl = 0.0;
  if (t.p < P) {
    for (int64_t c = 0; c < C; ++c) {
      float vv[kVec], rr[kVec] = {}, g[kVec] = {};
      cuda_detail::load_positions(vb + c * st.v_stride_c, t.p, P, aligned, vv);
      if (has_ref) {
        cuda_detail::load_positions(rb + c * st.r_stride_c, t.p, P, aligned, rr);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float dm = co * (vv[i] - rr[i]);
          kl += static_cast<double>(dm) * dm;  // 0 beyond P: both loads gave 0 there
          g[i] = g_kl * dm;
        }
      }
      if (gb == nullptr) continue;
      float zz[kVec], xx[kVec];
      cuda_detail::load_positions(zb + c * st.z_stride_c, t.p, P, aligned, zz);
      cuda_detail::load_positions(xb + c * st.x_stride_c, t.p, P, aligned, xx);
#pragma unroll
      for (int i = 0; i < kVec; ++i) g[i] += g_logp * (xx[i] - (cs * zz[i] + co * vv[i]));
      // This channel's v was read above: writing over it (in-place) is safe.
      cuda_detail::store_positions(gb + c * P, t.p, P, grad_aligned, g);
    }
  }
  float sums[1] = {static_cast<float>(0.5 / (static_cast<double>(sd) * sd) * kl)};
  cuda_detail::block_reduce<1, -1, -1>(sums);
  if (threadIdx.x == 0) kl_out[t.b * n_blocks + t.block] = sums[0];
}

LatentPtrs strides(CudaLatent v, CudaLatent z, CudaLatent x, CudaLatent ref) {
  return {v.stride_b, v.stride_c, z.stride_b, z.stride_c,
          x.stride_b, x.stride_c, ref.stride_b, ref.stride_c};
}

// Whether every input latent can be read in vector packs (see pack_aligned).
template <typename TV, typename TZ>
bool inputs_aligned(const CudaLatent& v, const CudaLatent& z, const CudaLatent& x,
                    const CudaLatent& ref) {
  return cuda_detail::pack_aligned<TV>(v.ptr, v.stride_b, v.stride_c) &&
         cuda_detail::pack_aligned<TZ>(z.ptr, z.stride_b, z.stride_c) &&
         cuda_detail::pack_aligned<TZ>(x.ptr, x.stride_b, x.stride_c) &&
         cuda_detail::pack_aligned<TV>(ref.ptr, ref.stride_b, ref.stride_c);
}

// The mean's 1/(B|P|).
float mean_grad_scale(const CudaStep& s) {
  return static_cast<float>(1.0 / (static_cast<double>(s.B) * static_cast<double>(s.P)));
}

template <typename T>
__global__ void scale_grad_kernel(T* grad, int64_t n, const float* __restrict__ dloss) {
  const float scale = *dloss;
  if (scale == 1.0f) return;  // the common case: no pass over the gradient
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    grad[i] = cuda_detail::from_float<T>(cuda_detail::to_float(grad[i]) * scale);
}

}  // namespace

cudaError_t launch_scale_grad(void* grad, DType dtype, int64_t n, const float* dloss,
                              cudaStream_t stream) {
  if (n < 1) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 4096);
  return cuda_detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    scale_grad_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        static_cast<T*>(grad), n, dloss);
    return cudaGetLastError();
  });
}

cudaError_t launch_loss_position(float* partials_out, void* grad_out, CudaLatent v,
                                 CudaLatent z, CudaLatent x, CudaLatent ref, const float* old,
                                 const float* amap, CudaAdvantages adv, DType v_dtype,
                                 DType z_dtype, CudaStep s, double clip_range, float kl_coef,
                                 cudaStream_t stream) {
  const float grad_scale = mean_grad_scale(s);
  int64_t n_blocks;
  dim3 grid, block;
  cudaError_t err = cuda_detail::grid_for(s, &n_blocks, &grid, &block);
  if (err != cudaSuccess) return err;
  // The bounds are formed in double and rounded once, as Triton does with its constexpr.
  const float lo = static_cast<float>(1.0 - clip_range);
  const float hi = static_cast<float>(1.0 + clip_range);
  return cuda_detail::dispatch_dtype(v_dtype, [&](auto v_tag) {
    using TV = typename decltype(v_tag)::type;
    return cuda_detail::dispatch_dtype(z_dtype, [&](auto z_tag) {
      using TZ = typename decltype(z_tag)::type;
      const bool aligned = inputs_aligned<TV, TZ>(v, z, x, ref);
      const bool grad_aligned = cuda_detail::pack_aligned<TV>(grad_out, s.C * s.P, s.P);
      loss_position_kernel<TV, TZ><<<grid, block, 0, stream>>>(
          partials_out, static_cast<TV*>(grad_out), static_cast<const TV*>(v.ptr),
          static_cast<const TZ*>(z.ptr), static_cast<const TZ*>(x.ptr),
          static_cast<const TV*>(ref.ptr), strides(v, z, x, ref), old, amap, adv, s.cs, s.co,
          s.std, s.C, s.P, n_blocks, s.block_p, lo, hi, kl_coef, grad_scale, aligned,
          grad_aligned);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_grad_sample(float* kl_out, void* grad_out, CudaLatent v, CudaLatent z,
                               CudaLatent x, CudaLatent ref, const float* dlogp, DType v_dtype,
                               DType z_dtype, CudaStep s, float kl_coef, cudaStream_t stream) {
  const float grad_scale = mean_grad_scale(s);
  int64_t n_blocks;
  dim3 grid, block;
  cudaError_t err = cuda_detail::grid_for(s, &n_blocks, &grid, &block);
  if (err != cudaSuccess) return err;
  return cuda_detail::dispatch_dtype(v_dtype, [&](auto v_tag) {
    using TV = typename decltype(v_tag)::type;
    return cuda_detail::dispatch_dtype(z_dtype, [&](auto z_tag) {
      using TZ = typename decltype(z_tag)::type;
      const bool aligned = inputs_aligned<TV, TZ>(v, z, x, ref);
      const bool grad_aligned = cuda_detail::pack_aligned<TV>(grad_out, s.C * s.P, s.P);
      grad_sample_kernel<TV, TZ><<<grid, block, 0, stream>>>(
          kl_out, static_cast<TV*>(grad_out), static_cast<const TV*>(v.ptr),
          static_cast<const TZ*>(z.ptr), static_cast<const TZ*>(x.ptr),
          static_cast<const TV*>(ref.ptr), strides(v, z, x, ref), dlogp, s.cs, s.co, s.std,
          s.C, s.P, n_blocks, s.block_p, kl_coef, grad_scale, aligned, grad_aligned);
      return cudaGetLastError();
    });
  });
}

}  // namespace vipo
