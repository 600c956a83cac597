// A vectorizable exp for the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

// exp(x) for float within ~2 ulp (Cephes' range reduction and polynomial). Plain arithmetic, so the
// compiler vectorizes loops that call it, which it does not do for std::exp.
static inline float vexp(float x) {
  x = std::max(-87.33f, std::min(x, 88.3f));
  // round to nearest by the 1.5 * 2^23 trick: floorf would keep the loop scalar
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
