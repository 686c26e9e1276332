// Attention for ESM-2 8M's 16-wide heads, on one thread, for `python -m bench.attention16`.
//
// q, k, v, out: element (t, h, d) at t * row + h * head + d, float32. For each head, blocks
// of R query rows: their scores against every key (fp32 FMAs, or AVX512-BF16 dot products
// on bf16-rounded q and k), an exact softmax, then the sum over the keys' values (fp32, or
// bf16 probabilities and values). One D-wide row is one 512-bit register.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

namespace {
constexpr int D = 16;
constexpr int R = 8;  // query rows a block: R accumulators + 16 key registers fit in 32

// exp(x) for x <= 0 (scores minus their row's max): 2^n * p(r), |r| <= ln2 / 2 (Cephes).
TARGET inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Rows of scores (keys past T masked, zero after) => unnormalised probabilities; 1/sum a row.
TARGET void softmax_rows(float* S, int rows, int T, int Tp, float* inv_sum) {
  const int full = T / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (T - full)) - 1);
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  for (int r = 0; r < rows; ++r) {
    float* s = S + (size_t)r * Tp;
    __m512 m = lowest;
    for (int j = 0; j < full; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
    if (tail) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(lowest, tail, s + full));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < full; j += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), max));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(s + j, e);
    }
    if (tail) {
      __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + full), max)));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(s + full, e);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

TARGET void head_fp32(const float* Q, const float* K, const float* V, float* O, int T,
                      size_t row, float scale, float* Kt, float* S) {
  const int Tp = (T + 15) / 16 * 16;
  for (int d = 0; d < D; ++d)
    for (int j = 0; j < Tp; ++j) Kt[(size_t)d * Tp + j] = j < T ? K[(size_t)j * row + d] : 0.f;
  float inv_sum[R];
  for (int i0 = 0; i0 < T; i0 += R) {
    const int rows = T - i0 < R ? T - i0 : R;
    float q[R][D];
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < D; ++d) q[r][d] = r < rows ? scale * Q[(size_t)(i0 + r) * row + d] : 0.f;
    for (int jb = 0; jb < Tp; jb += 16) {
      __m512 k[D], acc[R];
      for (int d = 0; d < D; ++d) k[d] = _mm512_loadu_ps(Kt + (size_t)d * Tp + jb);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int d = 0; d < D; ++d)
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k[d], acc[r]);
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(S + (size_t)r * Tp + jb, acc[r]);
    }
    softmax_rows(S, rows, T, Tp, inv_sum);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int j = 0; j < T; ++j) {
      const __m512 v = _mm512_loadu_ps(V + (size_t)j * row);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(S[(size_t)r * Tp + j]), v, acc[r]);
    }
    for (int r = 0; r < rows; ++r)
      _mm512_storeu_ps(O + (size_t)(i0 + r) * row, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv_sum[r])));
  }
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as the hardware converts
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Kp: (D/2, Tp, 2), pairs of dims of each key; Vp: (Tp/2, D, 2), pairs of keys of each dim;
// P: R rows of bf16 probabilities.
TARGET void head_bf16(const float* Q, const float* K, const float* V, float* O, int T,
                      size_t row, float scale, uint16_t* Kp, uint16_t* Vp, float* S, uint16_t* P) {
  const int Tp = (T + 15) / 16 * 16;
  for (int j = 0; j < Tp; ++j)
    for (int d = 0; d < D; ++d) {
      Kp[((size_t)(d / 2) * Tp + j) * 2 + d % 2] = j < T ? to_bf16(K[(size_t)j * row + d]) : 0;
      Vp[((size_t)(j / 2) * D + d) * 2 + j % 2] = j < T ? to_bf16(V[(size_t)j * row + d]) : 0;
    }
  float inv_sum[R];
  for (int i0 = 0; i0 < T; i0 += R) {
    const int rows = T - i0 < R ? T - i0 : R;
    alignas(32) uint32_t q[R][D / 2];
    for (int r = 0; r < R; ++r) {
      const __m512 qr = r < rows ? _mm512_mul_ps(_mm512_set1_ps(scale),
                                                 _mm512_loadu_ps(Q + (size_t)(i0 + r) * row))
                                 : _mm512_setzero_ps();
      _mm256_store_si256((__m256i*)q[r], (__m256i)_mm512_cvtneps_pbh(qr));
    }
    for (int jb = 0; jb < Tp; jb += 16) {
      __m512bh k[D / 2];
      __m512 acc[R];
      for (int m = 0; m < D / 2; ++m) k[m] = (__m512bh)_mm512_loadu_si512(Kp + ((size_t)m * Tp + jb) * 2);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int m = 0; m < D / 2; ++m)
        for (int r = 0; r < R; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)q[r][m]), k[m]);
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(S + (size_t)r * Tp + jb, acc[r]);
    }
    softmax_rows(S, rows, T, Tp, inv_sum);
    for (int r = 0; r < R; ++r)  // rows past `rows` hold stale scores: their sums are never stored
      for (int j = 0; j < Tp; j += 16)
        _mm256_storeu_si256((__m256i*)(P + (size_t)r * Tp + j),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(S + (size_t)r * Tp + j)));
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int j = 0; j < Tp; j += 2) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(Vp + (size_t)(j / 2) * D * 2);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, P + (size_t)r * Tp + j, 4);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), v);
      }
    }
    for (int r = 0; r < rows; ++r)
      _mm512_storeu_ps(O + (size_t)(i0 + r) * row, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv_sum[r])));
  }
}
}  // namespace

extern "C" int esm_attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

extern "C" void esm_attention(const float* q, const float* k, const float* v, float* out, int T,
                              int H, long row, long head, float scale, int bf16) {
  const int Tp = (T + 15) / 16 * 16;
  std::vector<float> S((size_t)R * Tp, 0.f), Kt((size_t)D * Tp);
  std::vector<uint16_t> Kp((size_t)D * Tp), Vp((size_t)Tp * D), P((size_t)R * Tp);
  for (int h = 0; h < H; ++h) {
    const size_t o = (size_t)h * head;
    if (bf16)
      head_bf16(q + o, k + o, v + o, out + o, T, row, scale, Kp.data(), Vp.data(), S.data(), P.data());
    else
      head_fp32(q + o, k + o, v + o, out + o, T, row, scale, Kt.data(), S.data());
  }
}
