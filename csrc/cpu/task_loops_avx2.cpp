// fastmaml: the CPU task loops compiled for AVX2 + FMA (x86-64), chosen at run time when the CPU has
// them (maml_cpu.cpp). The build flags stay portable (no -march): only this file's functions use AVX2,
// through a target pragma placed after the standard headers, in their own namespaces. 32-byte vectors
// and fused multiply-adds do twice the work of the SSE2 baseline's 16-byte vectors per instruction.
#include <cstdint>
#include <math.h>

#include "task_loops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define FASTMAML_CPU_ISA avx2
#define FASTMAML_TASK_NAMESPACE task_avx2
#define FASTMAML_VECTOR_BYTES 32
#include "task_loops.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fastmaml {
namespace cpu {
namespace avx2 {
bool compiled() { return true; }
}  // namespace avx2
}  // namespace cpu
}  // namespace fastmaml

#else  // no AVX2 build here: the table is never asked for (compiled() is false)

namespace fastmaml {
namespace cpu {
namespace avx2 {
bool compiled() { return false; }
template <typename T>
LoopTable<T> table() {
  return baseline::table<T>();
}
template LoopTable<float> table<float>();
template LoopTable<double> table<double>();
}  // namespace avx2
}  // namespace cpu
}  // namespace fastmaml

#endif
