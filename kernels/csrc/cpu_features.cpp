// CPU feature detection, once per process: cpuid for the instructions, xgetbv for the OS saving their registers,
// and arch_prctl(ARCH_REQ_XCOMP_PERM) for permission to use AMX tile data (Linux >= 5.16).
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_features.h"

namespace sparamx {
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

int64_t detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // no OSXSAVE: no xgetbv
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state enabled
  int64_t features = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  const unsigned ebx7 = b, ecx7 = c, edx7 = d;
  __get_cpuid_count(7, 1, &a, &b, &c, &d);
  const unsigned eax71 = a;
  if (os_avx512) {
    if (ebx7 & (1u << 16)) features |= kAvx512F;
    if (ebx7 & (1u << 30)) features |= kAvx512BW;
    if (ebx7 & (1u << 31)) features |= kAvx512VL;
    if (ecx7 & (1u << 6)) features |= kAvx512Vbmi2;
    if (ecx7 & (1u << 11)) features |= kAvx512Vnni;
    if (eax71 & (1u << 5)) features |= kAvx512Bf16;
  }
  const bool amx = (edx7 & (1u << 24)) && (edx7 & (1u << 22));
  if (amx && (xcr0 & (3ull << 17)) == (3ull << 17)) {  // XTILECFG and XTILEDATA state enabled by the OS
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) {
      features |= kAmxTile | kAmxBf16;
      if (edx7 & (1u << 25)) features |= kAmxInt8;
    }
  }
  return features;
}

}  // namespace

int64_t cpu_features() {
  static const int64_t features = detect();
  return features;
}

bool has_avx512_kernels() {
  constexpr int64_t need = kAvx512F | kAvx512BW | kAvx512VL | kAvx512Vbmi2 | kAvx512Vnni | kAvx512Bf16;
  return (cpu_features() & need) == need;
}

bool has_amx_kernels() {
  constexpr int64_t need = kAmxTile | kAmxBf16 | kAmxInt8;
  return has_avx512_kernels() && (cpu_features() & need) == need;
}

}  // namespace sparamx
