#pragma once
// The intrinsics of the AVX-512 and AMX kernel files: the real ones, compiled for those instructions between
// SPARAMX_*_BEGIN / _END (after every other include, so no inline function of a header is compiled for AVX-512 and
// then picked by the linker for a machine without it), or -- in the test-only emulated build (SPARAMX_EMULATED,
// tests/kernels/emulated.py) -- software ones, so the same kernel sources are checked on any x86-64 CPU.
#ifdef SPARAMX_EMULATED
#include "emulation/amx.h"
#include "emulation/avx512.h"
#define SPARAMX_AVX512_BEGIN
#define SPARAMX_AMX_BEGIN
#define SPARAMX_ISA_END
#define SPARAMX_IN_REGISTER(x) ((void)0)
#else
#include <immintrin.h>
#define SPARAMX_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,avx512bf16,popcnt\")")
#define SPARAMX_AMX_BEGIN   \
  _Pragma("GCC push_options") \
      _Pragma(                  \
          "GCC target(\"avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,avx512bf16,popcnt,amx-tile,amx-bf16,amx-int8\")")
#define SPARAMX_ISA_END _Pragma("GCC pop_options")
// Keeps a loaded vector in a register: GCC would fold the load into vpexpand{b,w}'s memory form, which Zen 4 runs at
// half the rate of a load and the register form.
#define SPARAMX_IN_REGISTER(x) asm("" : "+v"(x))
#endif
