#pragma once
// Software AVX-512 for the test-only emulated build (SPARAMX_EMULATED; tests/kernels/emulated.py): SIMDe (PyPI
// simde-py) where it has the intrinsic, a few lines here where it does not (vpexpandb / vpexpandw of VBMI2, the
// reduce-adds) or where its version touches other memory (masked loads and stores). Only what linear_avx512.cpp,
// linear_amx.cpp and attention_avx512.cpp use is mapped, so a new intrinsic in the kernels fails to compile here
// until it is added -- never silently runs something else.
#include <cstdint>
#include <cstring>

#include <simde/x86/avx512.h>

namespace sparamx {
namespace emulation {

template <typename Lane, int Lanes, typename Mask>
inline simde__m512i maskz_expand(Mask k, simde__m512i a) {
  Lane src[Lanes], dst[Lanes];
  std::memcpy(src, &a, 64);
  for (int i = 0, j = 0; i < Lanes; ++i) dst[i] = ((k >> i) & 1) ? src[j++] : Lane{0};
  simde__m512i out;
  std::memcpy(&out, dst, 64);
  return out;
}

// Masked loads and stores touch only the selected lanes' memory, as the instructions do (SIMDe's read and write all
// 64 bytes, and its store writes zeros to the others). Lane: the element type; the others keep src's lanes.
template <typename Lane, typename Vec>
inline Vec mask_loadu(Vec src, uint64_t k, const void* at) {
  constexpr int kLanes = 64 / sizeof(Lane);
  Lane lanes[kLanes];
  std::memcpy(lanes, &src, 64);
  for (int i = 0; i < kLanes; ++i)
    if ((k >> i) & 1) std::memcpy(&lanes[i], static_cast<const Lane*>(at) + i, sizeof(Lane));
  Vec out;
  std::memcpy(&out, lanes, 64);
  return out;
}

template <typename Lane, typename Vec>
inline void mask_storeu(void* at, uint64_t k, Vec a) {
  constexpr int kLanes = 64 / sizeof(Lane);
  Lane lanes[kLanes];
  std::memcpy(lanes, &a, 64);
  for (int i = 0; i < kLanes; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<Lane*>(at) + i, &lanes[i], sizeof(Lane));
}

// Each 128-bit lane shifted left by `bytes` bytes, zeros shifted in.
inline simde__m512i bslli_epi128(simde__m512i a, int bytes) {
  uint8_t in[64], out[64] = {};
  std::memcpy(in, &a, 64);
  for (int lane = 0; lane < 4; ++lane)
    for (int i = bytes; i < 16; ++i) out[16 * lane + i] = in[16 * lane + i - bytes];
  simde__m512i r;
  std::memcpy(&r, out, 64);
  return r;
}

inline uint16_t mask_cmpneq_epi32_mask(uint16_t k, simde__m512i a, simde__m512i b) {
  int32_t x[16], y[16];
  std::memcpy(x, &a, 64);
  std::memcpy(y, &b, 64);
  uint16_t out = 0;
  for (int i = 0; i < 16; ++i)
    if (((k >> i) & 1) && x[i] != y[i]) out |= static_cast<uint16_t>(1u << i);
  return out;
}

inline int32_t reduce_add_epi32(simde__m512i a) {
  uint32_t lanes[16], sum = 0;  // wraps as the instruction does
  std::memcpy(lanes, &a, 64);
  for (uint32_t lane : lanes) sum += lane;
  return static_cast<int32_t>(sum);
}

inline float reduce_add_ps(simde__m512 a) {  // halves added pairwise, as GCC's _mm512_reduce_add_ps
  float v[16];
  std::memcpy(v, &a, 64);
  for (int width = 8; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) v[i] += v[i + width];
  return v[0];
}

}  // namespace emulation
}  // namespace sparamx

#undef _mm512_setzero_si512
#undef _mm512_setzero_ps
#undef _mm512_loadu_si512
#undef _mm512_storeu_si512
#undef _mm512_loadu_ps
#undef _mm512_storeu_ps
#undef _mm512_dpbusd_epi32
#undef _mm512_castsi512_ps
#undef _mm512_slli_epi32
#undef _mm512_and_si512
#undef _mm512_set1_epi32
#undef _mm512_fmadd_ps
#undef _mm512_cvtepu16_epi32
#undef _mm512_castsi512_si256
#undef _mm512_extracti64x4_epi64
#undef _mm512_maskz_expand_epi8
#undef _mm512_maskz_expand_epi16
#undef _mm512_reduce_add_epi32
#undef _mm512_reduce_add_ps
#undef _mm512_set1_ps
#undef _mm512_max_ps
#undef _mm512_mul_ps
#undef _mm512_sub_ps
#undef _mm512_add_ps
#undef _mm512_roundscale_ps
#undef _mm512_cvttps_epi32
#undef _mm512_add_epi32
#undef _mm512_shuffle_f32x4
#undef _mm512_shuffle_ps
#undef __m512bh
#undef _mm512_dpbf16_ps
#undef _mm512_setr_epi32
#undef _mm512_permutex2var_ps
#undef _mm512_unpacklo_epi16
#undef _mm512_unpackhi_epi16
#undef __mmask16
#undef _mm512_castps_si512
#undef _mm512_mask_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm512_maskz_loadu_epi16
#undef _mm512_maskz_loadu_ps
#undef _mm512_maskz_mov_ps
#undef _mm512_permutex2var_epi16
#undef _mm512_reduce_max_ps
#undef _mm512_srli_epi32
#undef _mm512_permutexvar_ps
#undef _mm_storeu_ps
#undef _mm512_castps512_ps128
#undef _mm_prefetch

#define __m512i simde__m512i
#define __m512 simde__m512
#define __mmask32 simde__mmask32
#define _mm512_setzero_si512 simde_mm512_setzero_si512
#define _mm512_setzero_ps simde_mm512_setzero_ps
#define _mm512_loadu_si512 simde_mm512_loadu_si512
#define _mm512_storeu_si512 simde_mm512_storeu_si512
#define _mm512_loadu_ps simde_mm512_loadu_ps
#define _mm512_storeu_ps simde_mm512_storeu_ps
#define _mm512_dpbusd_epi32 simde_mm512_dpbusd_epi32
#define _mm512_castsi512_ps simde_mm512_castsi512_ps
#define _mm512_slli_epi32 simde_mm512_slli_epi32
#define _mm512_and_si512 simde_mm512_and_si512
#define _mm512_set1_epi32 simde_mm512_set1_epi32
#define _mm512_fmadd_ps simde_mm512_fmadd_ps
#define _mm512_cvtepu16_epi32 simde_mm512_cvtepu16_epi32
#define _mm512_castsi512_si256 simde_mm512_castsi512_si256
#define _mm512_extracti64x4_epi64 simde_mm512_extracti64x4_epi64
#define _mm512_set1_ps simde_mm512_set1_ps
#define _mm512_max_ps simde_mm512_max_ps
#define _mm512_mul_ps simde_mm512_mul_ps
#define _mm512_sub_ps simde_mm512_sub_ps
#define _mm512_add_ps simde_mm512_add_ps
#define _mm512_roundscale_ps simde_mm512_roundscale_ps
#define _mm512_cvttps_epi32 simde_mm512_cvttps_epi32
#define _mm512_add_epi32 simde_mm512_add_epi32
#define _mm512_shuffle_f32x4 simde_mm512_shuffle_f32x4
#define _mm512_shuffle_ps simde_mm512_shuffle_ps
#define _mm512_maskz_expand_epi8(k, a) sparamx::emulation::maskz_expand<int8_t, 64>(static_cast<uint64_t>(k), (a))
#define _mm512_maskz_expand_epi16(k, a) sparamx::emulation::maskz_expand<int16_t, 32>(static_cast<uint32_t>(k), (a))
#define _mm512_reduce_add_epi32 sparamx::emulation::reduce_add_epi32
#define _mm512_reduce_add_ps sparamx::emulation::reduce_add_ps
#define __m512bh simde__m512bh
#define _mm512_dpbf16_ps simde_mm512_dpbf16_ps
#define _mm512_setr_epi32 simde_mm512_setr_epi32
#define _mm512_permutex2var_ps simde_mm512_permutex2var_ps
#define _mm512_unpacklo_epi16 simde_mm512_unpacklo_epi16
#define _mm512_unpackhi_epi16 simde_mm512_unpackhi_epi16
#define __mmask16 simde__mmask16
#define _mm512_castps_si512 simde_mm512_castps_si512
#define _mm512_mask_loadu_ps(src, k, at) sparamx::emulation::mask_loadu<float>((src), (k), (at))
#define _mm512_maskz_loadu_epi16(k, at) sparamx::emulation::mask_loadu<uint16_t>(simde_mm512_setzero_si512(), (k), (at))
#define _mm512_mask_storeu_ps(at, k, a) sparamx::emulation::mask_storeu<float>((at), (k), (a))
#define _mm512_maskz_loadu_ps(k, at) sparamx::emulation::mask_loadu<float>(simde_mm512_setzero_ps(), (k), (at))
#define _mm512_maskz_mov_ps simde_mm512_maskz_mov_ps
#define _mm512_permutex2var_epi16 simde_mm512_permutex2var_epi16
#define _mm512_reduce_max_ps simde_mm512_reduce_max_ps
#define _mm512_srli_epi32 simde_mm512_srli_epi32
#define _mm512_permutexvar_ps simde_mm512_permutexvar_ps
#define _mm_storeu_ps simde_mm_storeu_ps
#define _mm512_castps512_ps128 simde_mm512_castps512_ps128
#define _mm_prefetch(address, hint) ((void)(address))
#define _mm512_set4_epi32 simde_mm512_set4_epi32
#define _mm512_set1_epi8 simde_mm512_set1_epi8
#define _mm512_shuffle_epi8 simde_mm512_shuffle_epi8
#define _mm512_srli_epi16 simde_mm512_srli_epi16
#define _mm512_add_epi8 simde_mm512_add_epi8
#define _mm512_sub_epi32 simde_mm512_sub_epi32
#define _mm512_maskz_mov_epi32 simde_mm512_maskz_mov_epi32
#define _mm512_maskz_loadu_epi32(k, at) sparamx::emulation::mask_loadu<uint32_t>(simde_mm512_setzero_si512(), (k), (at))
#define _mm512_mask_storeu_epi32(at, k, a) sparamx::emulation::mask_storeu<uint32_t>((at), (k), (a))
#define _mm512_bslli_epi128(a, bytes) sparamx::emulation::bslli_epi128((a), (bytes))
#define _mm512_mask_cmpneq_epi32_mask(k, a, b) sparamx::emulation::mask_cmpneq_epi32_mask((k), (a), (b))
