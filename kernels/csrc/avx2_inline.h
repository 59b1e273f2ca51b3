// AVX2 helpers of the AVX2 kernel files (linear_avx2.cpp, attention_avx2.cpp). Included only inside a file's AVX2
// target region and anonymous namespace, after <immintrin.h>: these functions are compiled for AVX2 and nowhere
// else, with internal linkage (see isa_intrinsics.h for why no other header may be).

// The sum of v's 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
