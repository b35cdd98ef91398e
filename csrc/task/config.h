// fastmaml: the build settings of the per-task math (csrc/task/), in one place: every file of the
// folder includes this one first, so each translation unit sees one setting of them.
//
// FASTMAML_HD marks what the CUDA kernel calls (host and device). FASTMAML_HOST_VECTORS selects the
// host register tiles of the matrix products (host_tiles.h), FASTMAML_VECTOR_BYTES their width. Every
// file of csrc/task/ declares its functions in the same three namespaces: fastmaml,
// FASTMAML_TASK_NAMESPACE, and the inline namespace FASTMAML_IMPL_NAMESPACE.
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTMAML_HD __host__ __device__
#else
#define FASTMAML_HD
#endif

// The reverse sweep (task_backward) is inlined into its CUDA kernels by force: left to nvcc's budget, a
// few more lines in it made nvcc call it as a function, its registers spilled around the call (sm_90a
// ptxas -v: 664 B of stack, 0.8 KiB of spills a thread); forced, it spills less than it did when nvcc
// chose to inline it (benchmarks/RESULTS.md).
#if defined(__CUDA_ARCH__)
#define FASTMAML_FORCE_INLINE __forceinline__
#else
#define FASTMAML_FORCE_INLINE inline
#endif

// A rarely taken part of the per-task math kept out of its caller on the host, so that the host
// compiler inlines and vectorises the common path as it did without it; inlined on a GPU, into a kernel
// that is inlined whole (FASTMAML_FORCE_INLINE).
#if defined(__CUDA_ARCH__)
#define FASTMAML_HOST_NOINLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FASTMAML_HOST_NOINLINE __attribute__((noinline))
#else
#define FASTMAML_HOST_NOINLINE
#endif

// Unrolls a loop of a compile-time trip count (the register tiles of team_tiles.h must stay in
// registers, which needs every index known): in device code and with clang. gcc (the host pass of nvcc
// too) would warn of an unknown pragma, and unrolls such loops itself at -O3.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__) || defined(__clang__)
#define FASTMAML_UNROLL _Pragma("unroll")
#else
#define FASTMAML_UNROLL
#endif

// Host builds with gcc or clang use the compilers' generic vector types in the matrix products (see
// gemm_nn_acc); CUDA device code, other compilers and -DFASTMAML_NO_HOST_VECTORS use plain loops.
#if !defined(FASTMAML_NO_HOST_VECTORS) && !defined(__CUDACC__) && !defined(__HIPCC__) && \
    (defined(__GNUC__) || defined(__clang__))
#define FASTMAML_HOST_VECTORS 1
#ifndef FASTMAML_VECTOR_BYTES
#define FASTMAML_VECTOR_BYTES 16
#endif
#if FASTMAML_VECTOR_BYTES == 16
#define FASTMAML_IMPL_NAMESPACE vec16
#elif FASTMAML_VECTOR_BYTES == 32
#define FASTMAML_IMPL_NAMESPACE vec32
#else
#error "FASTMAML_VECTOR_BYTES must be 16 or 32"
#endif
#else
#define FASTMAML_IMPL_NAMESPACE scalar
#endif

// The namespace is a macro so that one library can hold this math compiled for several instruction
// sets (csrc/cpu/task_loops_*.cpp); the inline namespace names the loop variant, so translation units
// that compile the header differently (a .cu file's host pass, an AVX2 file) never give the linker two
// different bodies under one symbol name.
#ifndef FASTMAML_TASK_NAMESPACE
#define FASTMAML_TASK_NAMESPACE task
#endif
