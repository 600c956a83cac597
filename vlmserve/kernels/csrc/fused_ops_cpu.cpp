// Fused elementwise ops of a decoder layer on the CPU. Each replaces a chain of torch ops that
// would read and write the activations several times with one pass over them, computed in float
// the way HF's modules compute them (float32 statistics for RMSNorm, rotate-half rotary).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vexp.h"

namespace {

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }

// Rows are independent: split them over threads, at least ~16K elements per task.
inline int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

// out = weight * rmsnorm(x [+ residual]); with a residual, sum <- x + residual first.
template <typename T>
void rms_norm_kernel(const at::Tensor& x, const at::Tensor* residual, at::Tensor* sum_out,
                     const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t xs = x.stride(0), os = out.stride(0), rs = residual ? residual->stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* sp = sum_out ? sum_out->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> h(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * xs;
      float ss = 0.f;
      if (rp) {
        const T* rr = rp + r * rs;
        T* sr = sp + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const T sum = from_f<T>(to_f(xr[i]) + to_f(rr[i]));  // the residual stream keeps its dtype
          sr[i] = sum;
          h[i] = to_f(sum);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) h[i] = to_f(xr[i]);
      }
      for (int64_t i = 0; i < n; ++i) ss += h[i] * h[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
      T* orow = op + r * os;
      // HF rounds the normalized value to the input dtype before scaling by the weight.
      for (int64_t i = 0; i < n; ++i) orow[i] = from_f<T>(to_f(wp[i]) * to_f(from_f<T>(h[i] * inv)));
    }
  });
}

// In place, rotate-half (GPT-NeoX) style on the first `rot` dims of each head:
// x[:h] <- x[:h] * cos[:h] - x[h:rot] * sin[:h];  x[h:rot] <- x[h:rot] * cos[h:] + x[:h] * sin[h:].
template <typename T>
void rotary_kernel(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rot) {
  const int64_t tokens = x.size(0), heads = x.size(1);
  const int64_t ts = x.stride(0), hs = x.stride(1), cs = cos.stride(0);
  const int64_t half = rot / 2;
  T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, tokens, grain(heads * rot), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cp + t * cs;
      const T* s = sp + t * cs;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = xp + t * ts + h * hs;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_f(v[i]), b = to_f(v[i + half]);
          v[i] = from_f<T>(a * to_f(c[i]) - b * to_f(s[i]));
          v[i + half] = from_f<T>(b * to_f(c[i + half]) + a * to_f(s[i + half]));
        }
      }
    }
  });
}

inline float silu_mul(float g, float u) { return g / (1.f + vexp(-g)) * u; }
inline float silu_mul(at::BFloat16 g, at::BFloat16 u) {  // torch rounds silu(g) to bf16 before the product
  const float gv = static_cast<float>(g);
  return static_cast<float>(static_cast<at::BFloat16>(gv / (1.f + vexp(-gv)))) * static_cast<float>(u);
}

template <typename T>
void silu_mul_row(const T* __restrict g, const T* __restrict u, T* __restrict o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = from_f<T>(silu_mul(g[i], u[i]));
}

// out[:, i] = silu(x[:, i]) * x[:, I + i] over a fused [gate | up] projection.
template <typename T>
void silu_and_mul_kernel(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), I = out.size(1), xs = x.stride(0), os = out.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(I), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row<T>(xp + r * xs, xp + r * xs + I, op + r * os, I);
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, name, " must be a CPU matrix with contiguous rows");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) rms_norm_kernel<float>(x, nullptr, nullptr, weight, out, eps);
  else rms_norm_kernel<at::BFloat16>(x, nullptr, nullptr, weight, out, eps);
  return out;
}

// -> (weight * rmsnorm(x + residual), x + residual); the inputs are left as they are.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type());
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto sum = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) rms_norm_kernel<float>(x, &residual, &sum, weight, out, eps);
  else rms_norm_kernel<at::BFloat16>(x, &residual, &sum, weight, out, eps);
  return {out, sum};
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t rot) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1, "x must be [tokens, heads, head_dim] with contiguous heads");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
              cos.size(0) == x.size(0) && cos.size(1) == rot && rot % 2 == 0 && rot <= x.size(2),
              "cos/sin must be [tokens, rotary_dim]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type());
  if (x.scalar_type() == at::kFloat) rotary_kernel<float>(x, cos, sin, rot);
  else rotary_kernel<at::BFloat16>(x, cos, sin, rot);
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0);
  auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (x.scalar_type() == at::kFloat) silu_and_mul_kernel<float>(x, out);
  else silu_and_mul_kernel<at::BFloat16>(x, out);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotary_", &rotary_);
  m.def("silu_and_mul", &silu_and_mul);
}
