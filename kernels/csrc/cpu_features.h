#pragma once
// What the CPU (and OS) can run, detected once per process, and which kernel path needs what. The names here are the
// ones Python sees (kernels/ops.py asks the ops below; it keeps no copy of these tables).
#include <cstdint>
#include <string>
#include <vector>

namespace sparamx {

enum CpuFeature : int64_t {
  kAvx2 = 1 << 0,
  kFma = 1 << 1,
  kF16c = 1 << 2,
  kAvx512F = 1 << 3,
  kAvx512BW = 1 << 4,
  kAvx512VL = 1 << 5,
  kAvx512Vbmi2 = 1 << 6,
  kAvx512Vnni = 1 << 7,
  kAvx512Bf16 = 1 << 8,
  kAmxTile = 1 << 9,  // set only when the OS granted tile-data permission to this process
  kAmxBf16 = 1 << 10,
  kAmxInt8 = 1 << 11,
  kBmi2 = 1 << 12,
};

// The kernel paths, worst to best; isa=auto takes the best one the CPU has (AMX only from kAmxRows rows of x).
enum class KernelPath { kReference, kAvx2, kAvx512, kAmx };

int64_t cpu_features();
bool has_path(KernelPath path);
// "reference" | "avx2" | "avx512" | "amx" -> the path; false when the name is none of them.
bool parse_path(const std::string& name, KernelPath& path);
const char* path_name(KernelPath path);
// The path an op's isa argument forces (anything but "auto"): raises, naming `op`, when the name is unknown or the CPU
// (or the OS) lacks what the path needs.
KernelPath forced_path(const char* op, const std::string& name);

// The ops behind kernels/ops.py's capability questions.
std::vector<std::string> cpu_feature_names();
std::vector<std::string> kernel_paths();
std::vector<std::string> kernel_path_needs(const std::string& path);

}  // namespace sparamx
