// Memory checks of the SIMT emulator. The kernels' translation units are compiled with
// -fsanitize=thread but linked without the sanitizer runtime: the compiler's callbacks for
// every load and store (__tsan_readN / __tsan_writeN) land here instead. While an emulated
// thread runs they check the alignment of each access and record, per byte, which block wrote
// it and which read it; a byte written by one block and read or written by another in the
// same launch is reported as an error. Stacks of the emulated threads and shared memory
// (per block by construction) are exempt from the cross-block check. This file itself is not
// instrumented.
#include <cstdio>
#include <unordered_map>

#include "simt.h"

namespace emu {
namespace {

constexpr int32_t kNobody = -1, kSeveral = -2;

// Who wrote and who read each of 16 consecutive bytes during the current launch.
struct Granule {
  int32_t writer[16];
  int32_t reader[16];
  Granule() {
    for (int i = 0; i < 16; ++i) writer[i] = reader[i] = kNobody;
  }
};

std::unordered_map<uintptr_t, Granule>& granules() {
  static std::unordered_map<uintptr_t, Granule> map;
  return map;
}

std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(a));
  return buf;
}

void conflict(uintptr_t addr, int32_t first, const char* first_did, int32_t second,
              const char* second_did) {
  fail("byte " + hex(addr) + " " + first_did + " by block " + block_name(first) + " is " +
       second_did + " by block " + block_name(second) +
       " in the same launch: blocks run concurrently on a GPU, so this races");
}

void record(uintptr_t addr, int size, bool write) {
  Tracker& t = g_tracker;
  const int32_t me = static_cast<int32_t>(t.block);
  for (int i = 0; i < size; ++i) {
    const uintptr_t a = addr + static_cast<uintptr_t>(i);
    Granule& g = granules()[a >> 4];
    const int k = static_cast<int>(a & 15);
    int32_t& w = g.writer[k];
    int32_t& r = g.reader[k];
    if (w != kNobody && w != me) {
      conflict(a, w, "written", me, write ? "also written" : "read");
      return;
    }
    if (write) {
      if (r == kSeveral) {
        fail("byte " + hex(a) + " read by several blocks is written by block " + block_name(me) +
             " in the same launch: blocks run concurrently on a GPU");
        return;
      }
      if (r != kNobody && r != me) {
        conflict(a, r, "read", me, "written");
        return;
      }
      w = me;
    } else {
      r = (r == kNobody || r == me) ? me : kSeveral;
    }
  }
}

void access(const void* p, int size, bool write, bool aligned) {
  Tracker& t = g_tracker;
  if (!t.active || t.in_hook) return;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (addr >= t.stack_lo && addr < t.stack_hi) return;  // a thread's own locals
  t.in_hook = true;
  if (t.align && aligned && size > 1 && addr % static_cast<uintptr_t>(size) != 0) {
    fail(std::string("misaligned ") + std::to_string(size) + "-byte " +
         (write ? "store to " : "load from ") + hex(addr) +
         ": the device requires naturally aligned accesses (a vector access needs its "
         "pointer, strides and offsets aligned to its width)");
  }
  const bool shared = addr >= t.smem_lo && addr < t.smem_hi;
  if (t.write_set && !shared) record(addr, size, write);
  t.in_hook = false;
}

}  // namespace

std::string block_name(int64_t linear) {
  const State& s = st();
  const int64_t x = linear % s.grid.x, y = (linear / s.grid.x) % s.grid.y;
  const int64_t z = linear / (static_cast<int64_t>(s.grid.x) * s.grid.y);
  return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

void reset_accesses() { granules().clear(); }

}  // namespace emu

// The instrumentation callbacks (the names and signatures GCC and Clang emit).
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define EMU_HOOKS(N)                                                          \
  void __tsan_read##N(void* p) { emu::access(p, N, false, true); }            \
  void __tsan_write##N(void* p) { emu::access(p, N, true, true); }            \
  void __tsan_unaligned_read##N(void* p) { emu::access(p, N, false, false); } \
  void __tsan_unaligned_write##N(void* p) { emu::access(p, N, true, false); } \
  void __tsan_volatile_read##N(void* p) { emu::access(p, N, false, true); }   \
  void __tsan_volatile_write##N(void* p) { emu::access(p, N, true, true); }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
#undef EMU_HOOKS
void __tsan_read_range(void* p, unsigned long n) {
  for (unsigned long i = 0; i < n; ++i) emu::access(static_cast<char*>(p) + i, 1, false, false);
}
void __tsan_write_range(void* p, unsigned long n) {
  for (unsigned long i = 0; i < n; ++i) emu::access(static_cast<char*>(p) + i, 1, true, false);
}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
