// fastmaml: the reverse sweep's barrier timeline, a profiling aid (benchmarks/phase_timeline.py).
//
// The float reverse sweep has a variant (bwd_f32_timeline.cu) whose team writes, in the blocks that
// record, one record at every barrier: where it was called (a site: the file's tag and the line) and
// the clock (clock64, the multiprocessor's cycles) at which each warp arrived and the block left. The
// gaps between records are the sweep's phases; a phase's time is the work between two barriers, plus
// the wait for its slowest warp, plus the barrier itself. ncu says how busy the units are over a whole
// kernel; this says which of the ~30-100 phases of a task the time goes to.
//
// A record is kTimelineWords int64: [site, departure (thread 0, after the barrier), the arrival of warp
// 0, 1, ... (lane 0, before it)]; unwritten words stay as the caller filled them (-1). Markers without
// a barrier: kTaskStart before each task of the block, kTasksEnd after its last.
//
// No torch and no CUDA headers: file_tag is compiled by g++ in the tests, against the Python twin that
// names the sites (benchmarks/phase_timeline.py, site_names).
#pragma once

#include <cstdint>

#include "../task/config.h"

namespace fastmaml {
namespace cuda {

constexpr int kTimelineWarps = 4;  // a block's warps at most (kMaxThreads / 32, checked in kernels.cuh)
constexpr int kTimelineWords = 2 + kTimelineWarps;
constexpr int64_t kTaskStart = 1;  // sites below 1 << 20 are markers (a file tag is never 0 in practice)
constexpr int64_t kTasksEnd = 2;

// 32-bit FNV-1a of the file name's last component (after the last '/' or '\\'): __builtin_FILE() spells
// the path as the build found it, the name alone is the same on every machine. A constant expression:
// nvcc folds it into the call site's record (checked in the SASS: one move of a constant a record).
FASTMAML_HD constexpr uint32_t file_tag(const char* path) {
  uint32_t h = 2166136261u;
  for (const char* p = path; *p != '\0'; ++p) {
    if (*p == '/' || *p == '\\') {
      h = 2166136261u;
    } else {
      h = (h ^ static_cast<uint32_t>(static_cast<unsigned char>(*p))) * 16777619u;
    }
  }
  return h;
}

// A barrier's site: the file's tag above the line (lines below 2^20).
FASTMAML_HD constexpr int64_t timeline_site(uint32_t tag, int line) {
  return (static_cast<int64_t>(tag) << 20) | static_cast<int64_t>(line & 0xFFFFF);
}

// Where the timeline variant writes: `records` [blocks, capacity, kTimelineWords] on GPU `device` (blocks
// 0 .. blocks - 1 record, each its first `capacity` records); null (`Timeline{}`): none is asked for.
struct Timeline {
  int64_t* records = nullptr;
  int capacity = 0;
  int blocks = 0;
  int device = -1;
};

}  // namespace cuda
}  // namespace fastmaml
