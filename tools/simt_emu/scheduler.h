// The SIMT emulator's scheduler: resident blocks of coroutine threads, warp collectives,
// barriers, per-block shared memory and the launch (see simt.h for the overview).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <map>

namespace emu {

enum Wait { kRunnable, kAtBarrier, kAtWarpOp, kDone };
enum WarpOp { kShflXor, kShflDown, kShflIdx, kBallot, kMatchAny };

constexpr size_t kStack = 128 * 1024;         // per emulated thread
constexpr size_t kSharedDefault = 48 * 1024;  // static + dynamic without an opt-in
constexpr int kMaxSharedOptIn = 227 * 1024;   // sm_90's opt-in ceiling
constexpr size_t kSharedSlot = 256 * 1024;    // arena per resident block
constexpr unsigned char kPoison = 0xff;       // NaN floats, -1 ints

struct Thread {
  ucontext_t ctx;
  Wait wait = kRunnable;
  int op = 0;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  uint64_t result = 0;
};

// One resident block: its threads, and its shared memory (dynamic first, then the static
// variables in the order the kernel first reaches them).
struct Block {
  bool live = false;
  uint3 idx{0, 0, 0};
  std::vector<Thread> threads;
  char* smem = nullptr;
  size_t smem_end = 0;
  // Static variables: declaration key and offset. A plain array: code that runs inside an
  // emulated thread calls no library template, whose instantiations here are instrumented.
  static constexpr int kMaxStatics = 64;
  const char* static_key[kMaxStatics];
  size_t static_offset[kMaxStatics];
  int statics = 0;
};

// What the memory hooks of memcheck.cpp read: written by the scheduler, never by kernels.
struct Tracker {
  bool active = false;  // an emulated thread runs and the checks are on
  bool in_hook = false;
  bool align = true, write_set = true;
  int64_t block = -1;  // linear index of the running block
  uintptr_t stack_lo = 0, stack_hi = 0, smem_lo = 0, smem_hi = 0;
};
inline Tracker g_tracker;

// Linear block index -> coordinates, for messages.
std::string block_name(int64_t linear);
// Called by run_grid at each launch: forget the previous launch's accesses.
void reset_accesses();

struct State {
  std::vector<Block> blocks;  // resident slots
  unsigned cur_slot = 0, cur_thread = 0;
  ucontext_t scheduler;
  dim3 grid{1, 1, 1}, block{1, 1, 1};
  size_t dyn_smem = 0, smem_limit = kSharedDefault;
  void (*entry)(void*) = nullptr;
  void* entry_ctx = nullptr;
  std::mt19937 rng{12345};
  std::string error;
  cudaError_t last_error = cudaSuccess;
  int sm_count = 132;
  int blocks_per_sm = 3;
  // What c10::cuda::current_device() answers: one emulated device per (sm_count,
  // blocks_per_sm) setting, so that per-device caches of the glue see a new device when a
  // test changes the setting (select_device).
  int device = 0;
  std::vector<std::pair<int, int>> devices{{132, 3}};
  bool interleave = true;
  unsigned max_resident = 4;
  std::map<const void*, int> smem_opt_in;
  char* stacks = nullptr;
  size_t stacks_size = 0;
  char* shared = nullptr;
  size_t shared_size = 0;
};

EMU_NOSAN inline State& st() {
  static State s;
  return s;
}
EMU_NOSAN inline Block& cur_block() { return st().blocks[st().cur_slot]; }

EMU_NOSAN inline void fail(const std::string& msg) {
  State& s = st();
  if (s.error.empty()) s.error = msg;
}

// Make the current settings' emulated device current (a new id for a new setting).
EMU_NOSAN inline void select_device() {
  State& s = st();
  const std::pair<int, int> config{s.sm_count, s.blocks_per_sm};
  const auto it = std::find(s.devices.begin(), s.devices.end(), config);
  s.device = static_cast<int>(it - s.devices.begin());
  if (it == s.devices.end()) s.devices.push_back(config);
  if (s.device > 255) throw std::runtime_error("more than 256 emulated device settings");
}

// Per-block storage of a static __shared__ variable; `key` names the declaration. Poisoned.
template <typename T>
EMU_NOSAN T& block_shared(const char* key) {
  State& s = st();
  Block& b = cur_block();
  for (int i = 0; i < b.statics; ++i) {
    if (b.static_key[i] == key) return *reinterpret_cast<T*>(b.smem + b.static_offset[i]);
  }
  const size_t offset = (b.smem_end + 15) / 16 * 16;
  b.smem_end = offset + sizeof(T);
  if (b.smem_end > s.smem_limit || b.statics == Block::kMaxStatics) {
    fail("static (" + std::to_string(b.smem_end - s.dyn_smem) + " B) + dynamic (" +
         std::to_string(s.dyn_smem) + " B) shared memory exceed the " +
         std::to_string(s.smem_limit) + " B this launch may use" +
         (s.smem_limit == kSharedDefault
              ? " without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"
              : ""));
    static T junk;  // the thread stops at its next yield
    return junk;
  }
  std::memset(b.smem + offset, kPoison, sizeof(T));
  b.static_key[b.statics] = key;
  b.static_offset[b.statics++] = offset;
  return *reinterpret_cast<T*>(b.smem + offset);
}

// The block's dynamic shared memory (`extern __shared__ T name[];`), poisoned at block start.
template <typename T>
EMU_NOSAN T* dynamic_shared() {
  return reinterpret_cast<T*>(cur_block().smem);
}

EMU_NOSAN inline void yield_to_scheduler() {
  State& s = st();
  swapcontext(&cur_block().threads[s.cur_thread].ctx, &s.scheduler);
}

EMU_NOSAN inline uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg) {
  State& s = st();
  Block& b = cur_block();
  const unsigned me = s.cur_thread;
  Thread& t = b.threads[me];
  t.wait = kAtWarpOp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  yield_to_scheduler();
  return b.threads[me].result;
}

EMU_NOSAN inline int block_barrier(int predicate) {
  State& s = st();
  Block& b = cur_block();
  const unsigned me = s.cur_thread;
  b.threads[me].wait = kAtBarrier;
  b.threads[me].value = predicate != 0;
  yield_to_scheduler();
  return static_cast<int>(b.threads[me].result);
}

EMU_NOSAN inline uint64_t warp_result(int op, const uint64_t (&vals)[32], unsigned lane, int arg) {
  switch (op) {
    case kShflXor: {
      const unsigned src = lane ^ static_cast<unsigned>(arg);
      return src < 32 ? vals[src] : vals[lane];
    }
    case kShflDown: {
      const unsigned src = lane + static_cast<unsigned>(arg);
      return src < 32 ? vals[src] : vals[lane];
    }
    case kShflIdx:
      return vals[static_cast<unsigned>(arg) & 31u];
    case kBallot: {
      uint64_t bits = 0;
      for (unsigned k = 0; k < 32; ++k) bits |= (vals[k] != 0 ? 1ull : 0ull) << k;
      return bits;
    }
    default: {  // kMatchAny
      uint64_t bits = 0;
      for (unsigned k = 0; k < 32; ++k) bits |= (vals[k] == vals[lane] ? 1ull : 0ull) << k;
      return bits;
    }
  }
}

EMU_NOSAN inline bool release_warp(Block& b, unsigned w) {
  const unsigned n = static_cast<unsigned>(b.threads.size());
  const unsigned first = 32 * w, last = std::min(n, first + 32);
  if (last - first != 32) {
    fail("a warp collective in a block whose size is not a multiple of 32");
    return false;
  }
  for (unsigned i = first; i < last; ++i) {
    if (b.threads[i].wait != kAtWarpOp) return false;
  }
  const Thread& lead = b.threads[first];
  uint64_t vals[32];
  for (unsigned l = 0; l < 32; ++l) {
    const Thread& t = b.threads[first + l];
    if (t.op != lead.op || t.mask != 0xffffffffu) {
      fail("lanes of one warp reached different collectives or used a partial mask");
      return false;
    }
    vals[l] = t.value;
  }
  for (unsigned l = 0; l < 32; ++l) {
    Thread& t = b.threads[first + l];
    t.result = warp_result(t.op, vals, l, t.arg);
    t.wait = kRunnable;
  }
  return true;
}

EMU_NOSAN inline bool release_block_barrier(Block& b) {
  bool any = false;
  uint64_t orv = 0;
  for (const Thread& t : b.threads) {
    if (t.wait == kDone) continue;
    if (t.wait != kAtBarrier) return false;
    any = true;
    orv |= t.value;
  }
  if (!any) return false;
  for (Thread& t : b.threads) {
    if (t.wait == kAtBarrier) {
      t.result = orv;
      t.wait = kRunnable;
    }
  }
  return true;
}

EMU_NOSAN inline void trampoline() {
  State& s = st();
  s.entry(s.entry_ctx);
  cur_block().threads[s.cur_thread].wait = kDone;  // returning resumes the scheduler (uc_link)
}

// Memory for `slots` resident blocks of `n` threads: stacks and shared-memory arenas, mapped
// lazily (untouched pages cost nothing) and kept between launches.
EMU_NOSAN inline void reserve(unsigned slots, unsigned n) {
  State& s = st();
  auto grow = [](char*& base, size_t& size, size_t want) {
    if (size >= want) return;
    if (base != nullptr) munmap(base, size);
    void* p = mmap(nullptr, want, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("SIMT emulator: out of memory");
    base = static_cast<char*>(p);
    size = want;
  };
  grow(s.stacks, s.stacks_size, static_cast<size_t>(slots) * n * kStack);
  grow(s.shared, s.shared_size, static_cast<size_t>(slots) * kSharedSlot);
  if (s.blocks.size() < slots) s.blocks.resize(slots);
  Tracker& t = g_tracker;
  t.stack_lo = reinterpret_cast<uintptr_t>(s.stacks);
  t.stack_hi = t.stack_lo + s.stacks_size;
  t.smem_lo = reinterpret_cast<uintptr_t>(s.shared);
  t.smem_hi = t.smem_lo + s.shared_size;
}

EMU_NOSAN inline void start_block(unsigned slot, unsigned linear) {
  State& s = st();
  Block& b = s.blocks[slot];
  const unsigned n = s.block.x * s.block.y * s.block.z;
  b.live = true;
  b.idx = {linear % s.grid.x, (linear / s.grid.x) % s.grid.y, linear / (s.grid.x * s.grid.y)};
  b.smem = s.shared + slot * kSharedSlot;
  b.smem_end = s.dyn_smem;
  b.statics = 0;
  std::memset(b.smem, kPoison, s.dyn_smem);
  b.threads.assign(n, Thread{});
  for (unsigned i = 0; i < n; ++i) {
    ucontext_t& c = b.threads[i].ctx;
    getcontext(&c);
    c.uc_stack.ss_sp = s.stacks + (static_cast<size_t>(slot) * n + i) * kStack;
    c.uc_stack.ss_size = kStack;
    c.uc_link = &s.scheduler;
    makecontext(&c, trampoline, 0);
  }
}

// Runs every runnable thread of the resident blocks once, in a random order.
EMU_NOSAN inline bool run_round(std::vector<std::pair<unsigned, unsigned>>& order) {
  State& s = st();
  order.clear();
  for (unsigned slot = 0; slot < s.blocks.size(); ++slot) {
    Block& b = s.blocks[slot];
    if (!b.live) continue;
    for (unsigned i = 0; i < b.threads.size(); ++i) {
      if (b.threads[i].wait == kRunnable) order.emplace_back(slot, i);
    }
  }
  std::shuffle(order.begin(), order.end(), s.rng);
  Tracker& t = g_tracker;
  for (const auto& [slot, i] : order) {
    s.cur_slot = slot;
    s.cur_thread = i;
    const uint3 bi = s.blocks[slot].idx;
    t.block = (static_cast<int64_t>(bi.z) * s.grid.y + bi.y) * s.grid.x + bi.x;
    t.active = true;
    swapcontext(&s.scheduler, &s.blocks[slot].threads[i].ctx);
    t.active = false;
    if (!s.error.empty()) break;
  }
  return !order.empty();
}

// Releases the collectives and barriers that every thread concerned has reached, and retires
// finished blocks. Returns false when a block can make no progress (a deadlock).
EMU_NOSAN inline bool settle_blocks() {
  State& s = st();
  for (unsigned slot = 0; slot < s.blocks.size(); ++slot) {
    Block& b = s.blocks[slot];
    if (!b.live) continue;
    bool runnable = false, done = true;
    for (const Thread& t : b.threads) {
      runnable |= t.wait == kRunnable;
      done &= t.wait == kDone;
    }
    if (done) {
      b.live = false;
      continue;
    }
    if (runnable) continue;
    bool released = false;
    for (unsigned w = 0; w * 32 < b.threads.size(); ++w) released |= release_warp(b, w);
    if (!released) released = release_block_barrier(b);
    if (!released && s.error.empty()) {
      s.cur_slot = slot;
      fail("deadlock: threads wait at a barrier or warp collective that others never reach");
    }
    if (!s.error.empty()) return false;
  }
  return true;
}

// Runs the grid: blocks admitted in a random order (in index order without interleaving),
// up to max_resident at a time, their threads interleaved at every yield.
EMU_NOSAN inline void run_grid() {
  State& s = st();
  const unsigned total = s.grid.x * s.grid.y * s.grid.z;
  const unsigned n = s.block.x * s.block.y * s.block.z;
  const unsigned slots = s.interleave ? std::min(total, s.max_resident) : 1u;
  reserve(slots, n);
  for (Block& b : s.blocks) b.live = false;
  reset_accesses();
  std::vector<unsigned> admit(total);
  for (unsigned i = 0; i < total; ++i) admit[i] = i;
  if (s.interleave) std::shuffle(admit.begin(), admit.end(), s.rng);
  std::vector<std::pair<unsigned, unsigned>> order;
  unsigned next = 0;
  while (s.error.empty()) {
    bool any = false;
    for (unsigned slot = 0; slot < slots; ++slot) {
      if (!s.blocks[slot].live && next < total) start_block(slot, admit[next++]);
      any |= s.blocks[slot].live;
    }
    if (!any) break;
    run_round(order);
    if (s.error.empty()) settle_blocks();
  }
  if (!s.error.empty()) {
    const uint3 bi = cur_block().idx;
    const std::string msg = "SIMT emulator, launch of " + std::to_string(total) + " blocks of " +
                            std::to_string(n) + " threads, block (" + std::to_string(bi.x) + ", " +
                            std::to_string(bi.y) + ", " + std::to_string(bi.z) + "): " + s.error;
    s.error.clear();
    for (Block& b : s.blocks) b.live = false;
    throw std::runtime_error(msg);
  }
}

template <typename F>
EMU_NOSAN void call_body(void* f) {
  (*static_cast<F*>(f))();
}

template <typename Kernel, typename... Args>
EMU_NOSAN void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Kernel kernel,
                      Args... args) {
  State& s = st();
  const unsigned threads = block.x * block.y * block.z;
  const auto opt = s.smem_opt_in.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = opt == s.smem_opt_in.end() ? kSharedDefault : kMaxSharedOptIn;
  const size_t dyn_limit = opt == s.smem_opt_in.end() ? kSharedDefault : opt->second;
  if (threads == 0 || threads > 1024 || smem > dyn_limit || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  s.grid = grid;
  s.block = block;
  s.dyn_smem = smem;
  s.smem_limit = limit;
  auto body = [&]() __attribute__((no_sanitize("thread"))) { kernel(args...); };
  s.entry = &call_body<decltype(body)>;
  s.entry_ctx = &body;
  run_grid();
}

EMU_NOSAN inline uint3 thread_idx() {
  const State& s = st();
  const unsigned i = s.cur_thread;
  return {i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y)};
}

}  // namespace emu
