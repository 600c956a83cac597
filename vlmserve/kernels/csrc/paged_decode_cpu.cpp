// Decode attention over the paged KV cache on the CPU, reading K and V in place through the block
// table: one query token per sequence, an online softmax over the sequence's blocks, so every cached
// row is read once. Work is split over (sequence, kv head); each item serves the q heads of its group.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vexp.h"

// Cached rows as float: float rows are used in place, others converted into `buf`.
static inline const float* krow_as_float(const float* row, float*, int64_t) { return row; }
static inline const float* krow_as_float(const at::BFloat16* row, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);
  return buf;
}
template <typename T>
static inline const float* block_as_float(const T* rows, float* buf, int64_t n) { return krow_as_float(rows, buf, n); }

static inline float dot1(const float* __restrict q, const float* __restrict k, int64_t D) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
  return dot;
}

// q . k for 4 keys `stride` apart: four independent vector sums keep the FMA units busy where one
// reduction per key would wait on the FMA latency at every step.
static inline void dot4(const float* __restrict q, const float* __restrict k, int64_t stride, int64_t D,
                        float* __restrict out) {
  const float* k0 = k;
  const float* k1 = k + stride;
  const float* k2 = k + 2 * stride;
  const float* k3 = k + 3 * stride;
  float r0 = 0.f, r1 = 0.f, r2 = 0.f, r3 = 0.f;
#pragma omp simd reduction(+ : r0, r1, r2, r3)
  for (int64_t d = 0; d < D; ++d) {
    r0 += q[d] * k0[d];
    r1 += q[d] * k1[d];
    r2 += q[d] * k2[d];
    r3 += q[d] * k3[d];
  }
  out[0] = r0;
  out[1] = r1;
  out[2] = r2;
  out[3] = r3;
}

// acc += p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3 for 4 value rows `stride` apart: one load and
// store of the accumulator per four tokens.
static inline void axpy4(float p0, float p1, float p2, float p3, const float* __restrict v, int64_t stride,
                         float* __restrict acc, int64_t D) {
  const float* v1 = v + stride;
  const float* v2 = v + 2 * stride;
  const float* v3 = v + 3 * stride;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += p0 * v[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
}

template <typename T>
static void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor& out,
                          double scale, int64_t window) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t tok_stride = Hkv * D, blk_stride = bs * Hkv * D;
  const float fscale = static_cast<float>(scale);

  // One work item per sequence: its blocks are read front to back, each token row (all kv heads,
  // contiguous) once for K and once for V, while the state of every q head stays in cache.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hq * D), acc(Hq * D), s(Hq * bs), m(Hq), l(Hq), kf(bs * tok_stride), vf(bs * tok_stride);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      for (int64_t i = 0; i < Hq * D; ++i) qf[i] = static_cast<float>(qp[b * Hq * D + i]) * fscale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t blk = start / bs; blk * bs < L && blk < max_blocks; ++blk) {
        const int64_t t0 = std::max(blk * bs, start), t1 = std::min(blk * bs + bs, L);
        const int64_t n = t1 - t0;
        const T* kblock = kp + bt[b * max_blocks + blk] * blk_stride + (t0 - blk * bs) * tok_stride;
        const T* vblock = vp + bt[b * max_blocks + blk] * blk_stride + (t0 - blk * bs) * tok_stride;
        if ((blk + 1) * bs < L && blk + 1 < max_blocks) {
          // Blocks are scattered in memory: fetch the next one while this one is computed.
          const int64_t next_len = std::min(bs, L - (blk + 1) * bs) * tok_stride * static_cast<int64_t>(sizeof(T));
          const char* nk = reinterpret_cast<const char*>(kp + bt[b * max_blocks + blk + 1] * blk_stride);
          const char* nv = reinterpret_cast<const char*>(vp + bt[b * max_blocks + blk + 1] * blk_stride);
          for (int64_t off = 0; off < next_len; off += 64) {
            __builtin_prefetch(nk + off);
            __builtin_prefetch(nv + off);
          }
        }
        const float* kb = block_as_float(kblock, kf.data(), n * tok_stride);
        int64_t t = 0;
        if (D % 8 == 0) {  // four tokens' rows at a time, every head
          for (; t + 4 <= n; t += 4)
            for (int64_t hq = 0; hq < Hq; ++hq)
              dot4(qf.data() + hq * D, kb + t * tok_stride + (hq / group) * D, tok_stride, D, s.data() + hq * bs + t);
        }
        for (; t < n; ++t)
          for (int64_t hq = 0; hq < Hq; ++hq)
            s[hq * bs + t] = dot1(qf.data() + hq * D, kb + t * tok_stride + (hq / group) * D, D);
        for (int64_t hq = 0; hq < Hq; ++hq) {
          float bmax = m[hq];
          for (int64_t t = 0; t < n; ++t) bmax = std::max(bmax, s[hq * bs + t]);
          const float corr = std::exp(m[hq] - bmax);  // 0 on the first block (m = -inf)
          l[hq] *= corr;
          float* ah = acc.data() + hq * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ah[d] *= corr;
          float* sh = s.data() + hq * bs;
          float lsum = 0.f;
#pragma omp simd reduction(+ : lsum)
          for (int64_t t = 0; t < n; ++t) {
            const float p = vexp(sh[t] - bmax);
            sh[t] = p;
            lsum += p;
          }
          l[hq] += lsum;
          m[hq] = bmax;
        }
        const float* vb = block_as_float(vblock, vf.data(), n * tok_stride);
        t = 0;
        for (; t + 4 <= n; t += 4) {  // four tokens per pass over the accumulators
          for (int64_t hq = 0; hq < Hq; ++hq) {
            const float* sh = s.data() + hq * bs + t;
            const float* v0 = vb + t * tok_stride + (hq / group) * D;
            axpy4(sh[0], sh[1], sh[2], sh[3], v0, tok_stride, acc.data() + hq * D, D);
          }
        }
        for (; t < n; ++t) {
          for (int64_t hq = 0; hq < Hq; ++hq) {
            const float p = s[hq * bs + t];
            const float* vh = vb + t * tok_stride + (hq / group) * D;
            float* ah = acc.data() + hq * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
          }
        }
      }
      for (int64_t hq = 0; hq < Hq; ++hq) {
        T* dst = op + (b * Hq + hq) * D;
        const float inv = l[hq] > 0.f ? 1.f / l[hq] : 0.f;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[hq * D + d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor seq_lens, double scale,
                                  int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  seq_lens = seq_lens.to(at::kLong).contiguous();
  TORCH_CHECK(block_tables.size(0) >= q.size(0) && seq_lens.size(0) >= q.size(0), "one table and length per query");
  // The blocks a sequence reads must exist: the kernel indexes the cache with them.
  const int64_t B = q.size(0), bs = k_cache.size(1), nb_cache = k_cache.size(0), width = block_tables.size(1);
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = (lens[b] + bs - 1) / bs;
    TORCH_CHECK(lens[b] >= 1 && used <= width, "sequence ", b, ": length ", lens[b], " does not fit its block table");
    for (int64_t i = 0; i < used; ++i)
      TORCH_CHECK(bt[b * width + i] >= 0 && bt[b * width + i] < nb_cache, "sequence ", b, ": block id ",
                  bt[b * width + i], " is outside the cache's ", nb_cache, " blocks");
  }
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    decode_kernel<float>(q, k_cache, v_cache, block_tables, seq_lens, out, scale, window);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_kernel<at::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, out, scale, window);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
