// fastmaml: the CPU task loops for the baseline instruction set of the build (SSE2 on x86-64, NEON on
// arm64): what every CPU the library runs on has.
#define FASTMAML_CPU_ISA baseline
#define FASTMAML_TASK_NAMESPACE task
#include "task_loops.inc"
