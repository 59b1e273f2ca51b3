// CPU feature detection, once per process: cpuid for the instructions, xgetbv for the OS saving their registers,
// and arch_prctl(ARCH_REQ_XCOMP_PERM) for permission to use AMX tile data (Linux >= 5.16).
// The test-only emulated build (SPARAMX_EMULATED, tests/kernels/emulated.py) runs AVX-512 and AMX in software, so
// it reports their features present on any CPU; AVX2 stays what the CPU has.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include "cpu_features.h"

namespace sparamx {
namespace {

struct Named {
  const char* name;
  int64_t bits;
};

constexpr Named kFeatureNames[] = {
    {"avx2", kAvx2},          {"fma", kFma},
    {"f16c", kF16c},          {"bmi2", kBmi2},
    {"avx512f", kAvx512F},
    {"avx512bw", kAvx512BW},  {"avx512vl", kAvx512VL},
    {"avx512_vbmi2", kAvx512Vbmi2}, {"avx512_vnni", kAvx512Vnni},
    {"avx512_bf16", kAvx512Bf16}, {"amx_tile", kAmxTile},
    {"amx_bf16", kAmxBf16},   {"amx_int8", kAmxInt8},
};

constexpr int64_t kAvx2Needs = kAvx2 | kFma | kF16c | kBmi2;
constexpr int64_t kAvx512Needs = kAvx2Needs | kAvx512F | kAvx512BW | kAvx512VL | kAvx512Vbmi2 | kAvx512Vnni | kAvx512Bf16;
constexpr Named kPaths[] = {  // in KernelPath order
    {"reference", 0},
    {"avx2", kAvx2Needs},
    {"avx512", kAvx512Needs},
    {"amx", kAvx512Needs | kAmxTile | kAmxBf16 | kAmxInt8},
};

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

int64_t detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // no OSXSAVE: no xgetbv
  const unsigned ecx1 = c;
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;        // SSE and AVX state enabled
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;   // ... and opmask, ZMM_Hi256, Hi16_ZMM
  int64_t features = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  const unsigned ebx7 = b, ecx7 = c, edx7 = d;
  __get_cpuid_count(7, 1, &a, &b, &c, &d);
  const unsigned eax71 = a;
  if (os_avx) {
    if (ebx7 & (1u << 5)) features |= kAvx2;
    if (ecx1 & (1u << 12)) features |= kFma;
    if (ecx1 & (1u << 29)) features |= kF16c;
    if (ebx7 & (1u << 8)) features |= kBmi2;
  }
  if (os_avx512) {
    if (ebx7 & (1u << 16)) features |= kAvx512F;
    if (ebx7 & (1u << 30)) features |= kAvx512BW;
    if (ebx7 & (1u << 31)) features |= kAvx512VL;
    if (ecx7 & (1u << 6)) features |= kAvx512Vbmi2;
    if (ecx7 & (1u << 11)) features |= kAvx512Vnni;
    if (eax71 & (1u << 5)) features |= kAvx512Bf16;
  }
#ifdef SPARAMX_EMULATED
  (void)edx7;
  features |= kAvx512Needs | kAmxTile | kAmxBf16 | kAmxInt8;
#else
  const bool amx = (edx7 & (1u << 24)) && (edx7 & (1u << 22));
  if (amx && (xcr0 & (3ull << 17)) == (3ull << 17)) {  // XTILECFG and XTILEDATA state enabled by the OS
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) {
      features |= kAmxTile | kAmxBf16;
      if (edx7 & (1u << 25)) features |= kAmxInt8;
    }
  }
#endif
  return features;
}

}  // namespace

int64_t cpu_features() {
  static const int64_t features = detect();
  return features;
}

bool has_path(KernelPath path) {
  const int64_t needs = kPaths[static_cast<int>(path)].bits;
  return (cpu_features() & needs) == needs;
}

bool parse_path(const std::string& name, KernelPath& path) {
  for (int i = 0; i < 4; ++i) {
    if (name == kPaths[i].name) {
      path = static_cast<KernelPath>(i);
      return true;
    }
  }
  return false;
}

const char* path_name(KernelPath path) { return kPaths[static_cast<int>(path)].name; }

KernelPath forced_path(const char* op, const std::string& name) {
  KernelPath path;
  TORCH_CHECK(parse_path(name, path), op, ": isa must be auto, reference, avx2, avx512 or amx, got ", name);
  TORCH_CHECK(has_path(path), op, ": isa=", name, " forced but this CPU (or the OS) lacks what it needs (",
              c10::Join(", ", kernel_path_needs(name)), ")");
  return path;
}

std::vector<std::string> cpu_feature_names() {
  std::vector<std::string> names;
  for (const Named& f : kFeatureNames) {
    if (cpu_features() & f.bits) names.emplace_back(f.name);
  }
  return names;
}

std::vector<std::string> kernel_paths() {
  std::vector<std::string> names;
  for (const Named& p : kPaths) names.emplace_back(p.name);
  return names;
}

std::vector<std::string> kernel_path_needs(const std::string& path) {
  KernelPath parsed;
  TORCH_CHECK(parse_path(path, parsed), "kernel_path_needs: unknown kernel path '", path,
              "' (reference, avx2, avx512, amx)");
  std::vector<std::string> names;
  for (const Named& f : kFeatureNames) {
    if (kPaths[static_cast<int>(parsed)].bits & f.bits) names.emplace_back(f.name);
  }
  return names;
}

}  // namespace sparamx
