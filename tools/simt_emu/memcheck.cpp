// Memory checks of the SIMT emulator. The kernels' translation units are compiled with
// -fsanitize=thread but linked without the sanitizer runtime: the compiler's callbacks for
// every load and store (__tsan_readN / __tsan_writeN) land here instead. While an emulated
// thread runs they check the alignment of each access and record, per byte, which block wrote
// it and which read it; a byte written by one block and read or written by another in the
// same launch is reported as an error. Stacks of the emulated threads and shared memory
// (per block by construction) are exempt from the cross-block check. This file itself is not
// instrumented.
#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_map>
#include <utility>

#include "simt.h"

namespace emu {
namespace {

constexpr int32_t kNobody = -1, kSeveral = -2;

// Who wrote and who read each of 16 consecutive bytes during the current launch, and the
// writer's release generation at the time of the write.
struct Granule {
  int32_t writer[16];
  int32_t reader[16];
  int32_t generation[16];
  Granule() {
    for (int i = 0; i < 16; ++i) writer[i] = reader[i] = kNobody;
  }
};

std::unordered_map<uintptr_t, Granule>& granules() {
  static std::unordered_map<uintptr_t, Granule> map;
  return map;
}

// The handshake state of the current launch. A block's generation counts its releases: its
// writes of generation g are published by release g + 1 (an atomic reached with every thread's
// writes fenced). Acquiring through a counter learns every release made on it so far.
struct Handshakes {
  std::set<std::pair<int32_t, unsigned>> unfenced;           // (block, thread) with unfenced writes
  std::map<int32_t, int32_t> generation;                     // block -> releases so far
  std::map<uintptr_t, std::map<int32_t, int32_t>> released;  // counter -> block -> generations
  std::map<int32_t, std::map<int32_t, int32_t>> acquired;    // block -> writer -> generations
};

Handshakes& handshakes() {
  static Handshakes h;
  return h;
}

// Whether block `me` acquired the write of `writer` made at generation `gen`.
bool ordered(int32_t me, int32_t writer, int32_t gen) {
  const auto& acq = handshakes().acquired;
  const auto mine = acq.find(me);
  if (mine == acq.end()) return false;
  const auto it = mine->second.find(writer);
  return it != mine->second.end() && gen < it->second;
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
    if (w != kNobody && w != me && !ordered(me, w, g.generation[k])) {
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
      g.generation[k] = handshakes().generation[me];
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
  if (t.write_set && !shared) {
    if (write) handshakes().unfenced.insert({static_cast<int32_t>(t.block), st().cur_thread});
    record(addr, size, write);
  }
  t.in_hook = false;
}

}  // namespace

std::string block_name(int64_t linear) {
  const State& s = st();
  const int64_t x = linear % s.grid.x, y = (linear / s.grid.x) % s.grid.y;
  const int64_t z = linear / (static_cast<int64_t>(s.grid.x) * s.grid.y);
  return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

void reset_accesses() {
  granules().clear();
  handshakes() = Handshakes{};
}

void fence() {
  const Tracker& t = g_tracker;
  if (t.active) handshakes().unfenced.erase({static_cast<int32_t>(t.block), st().cur_thread});
}

// An atomic of `size` bytes at p by the running thread: aligned, never a race itself; a release
// by its block when no thread of the block has unfenced writes, then an acquire of every
// earlier release on p.
void atomic_sync(const void* p, int size) {
  Tracker& t = g_tracker;
  if (!t.active || t.in_hook) return;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (t.align && addr % static_cast<uintptr_t>(size) != 0) {
    fail("misaligned " + std::to_string(size) + "-byte atomic at " + hex(addr));
  }
  if (!t.write_set || (addr >= t.smem_lo && addr < t.smem_hi)) return;
  Handshakes& h = handshakes();
  const int32_t me = static_cast<int32_t>(t.block);
  const auto dirty = h.unfenced.lower_bound({me, 0u});
  const bool fenced = dirty == h.unfenced.end() || dirty->first != me;
  std::map<int32_t, int32_t>& on_counter = h.released[addr];
  if (fenced) on_counter[me] = ++h.generation[me];
  std::map<int32_t, int32_t>& mine = h.acquired[me];
  for (const auto& [block, gen] : on_counter) {
    if (block != me) mine[block] = std::max(mine[block], gen);
  }
}

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
