// The CUDA emulation runtime (MOESPEC_CUDA=EMU); see emu.h for the model and README.md for details.
#include "moespec_emu/emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define MOESPEC_EMU_ASAN 1
#endif

extern "C" char __start_moespec_emu_shared[];  // provided by the linker for the section
extern "C" char __stop_moespec_emu_shared[];

// Keep the section (and so the symbols above) even when no kernel declares static shared memory.
static char g_section_anchor[16] __attribute__((section("moespec_emu_shared"), aligned(16), used));

// ------------------------------------------------------------------------ context switching
#if defined(__x86_64__)
// switch_stack(save, to): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, and resumes the context whose stack pointer
// is `to` (the layout make_stack builds).
extern "C" void moespec_emu_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .globl moespec_emu_switch
    .hidden moespec_emu_switch
    .type moespec_emu_switch,@function
moespec_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size moespec_emu_switch,.-moespec_emu_switch
)");
#endif

namespace moespec_emu {

ThreadState* g_thread = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (mapped lazily)
constexpr size_t kGuardBytes = 4096;        // a PROT_NONE page below each stack: overflow faults
constexpr size_t kSmemNoOptIn = 48 * 1024;  // dynamic shared memory a kernel gets without opting in
constexpr size_t kSmemMaxOptIn = 227 * 1024;  // sm_90 per-block maximum (sm_80: 163 KiB)
constexpr unsigned char kPoison = 0xFF;       // 0xFFFF is NaN in bf16 and fp16, 0xFFFFFFFF in fp32

// ------------------------------------------------------------------------ random numbers
struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
};

uint64_t initial_seed() {
  const char* env = std::getenv("MOESPEC_EMU_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 0) : 0x6d6f657370656355ull;
}
uint64_t g_seed = initial_seed();
uint64_t g_launches = 0;  // launches since the seed was set: each gets its own order


enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kFlagWait, kDone };

struct Copy {
  void* dst;
  const void* src;
  int size;
  int src_size;
  int group;  // -1 until committed
};

struct Fiber {
  char* stack = nullptr;  // usable stack [stack, stack + kStackBytes)
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  ThreadState ts{};
  int linear = 0;
  State state = State::kRunnable;
  std::vector<Copy> copies;
  int committed = 0;  // cp.async groups committed so far
  uint64_t result = 0;
  float d[4] = {0, 0, 0, 0};
  bool griddep_waited = false;  // called griddep_wait (checked at exit in a PDL launch)
  bool bounded = false;         // parked in a bounded wait (wait_bits): the scheduler may time it out
  bool timed_out = false;       // the scheduler timed that wait out
  uint64_t perf_chain = 0;      // dependent global round trips this thread reported (perf_event)
};

struct WarpSlot {
  int kind = -1;
  unsigned mask = 0;
  unsigned arrived = 0;
  uint64_t value[32];
  int arg[32];
  uint64_t out[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  bool bf16 = true;
};

struct Launch {
  const char* name = "";
  Body body{};
  dim3 grid, block;
  uint3 block_idx{};
  int nthreads = 0;
  std::vector<Fiber*> fibers;
  std::vector<int> runnable;
  int live = 0;
  int at_block_barrier = 0;
  std::vector<WarpSlot> warps;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  char* dyn = nullptr;
  size_t dyn_bytes = 0;
  std::vector<int> waiters;  // threads of the current block parked in wait_geq
  bool progress = false;     // a thread did something other than a failed flag poll
  bool failed = false;
  cudaError_t fail_code = cudaErrorLaunchFailure;
  std::string error;
  Rng rng{0};
  bool pdl = false;  // programmatic dependent launch: every thread must call griddep_wait
  uint64_t cur_block = 0;             // linear index of the running block
  std::vector<PerfBlock> perf;        // per block (tracing on), indexed by linear block index
};

Launch* g_launch = nullptr;
std::mutex g_launch_mutex;  // one emulated launch at a time (g_thread and the shared section are global)
std::vector<Fiber*> g_fiber_pool;
std::vector<char> g_dyn_arena;
std::map<const void*, int> g_max_dyn_smem;  // per-kernel opt-in, as the driver keeps it
std::string g_error_text;                   // detail of the most recent error
int g_resident_limit = 0;                   // competing resident blocks (set_resident_limit)
int g_image_arch = 90;                      // the loaded image's architecture (set_image_arch)
double g_timeout_rate = 0.0;                // random timeouts of bounded waits (set_wait_timeout_rate)
int64_t g_timeouts = 0;                     // bounded waits timed out since take_wait_timeouts
bool g_perf_on = false, g_count_only = false;
std::vector<PerfLaunch> g_perf_log;
std::vector<std::pair<std::string, bool>> g_launch_log;

#if defined(MOESPEC_EMU_ASAN)
void* g_fake_stack = nullptr;
#endif

void switch_to_fiber(Launch& L, Fiber* f) {
  L.current = f;
  g_thread = &f->ts;
#if defined(MOESPEC_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack, kStackBytes);
#endif
#if defined(__x86_64__)
  moespec_emu_switch(&L.sched_sp, f->sp);
#else
  swapcontext(&L.sched_uc, &f->uc);
#endif
#if defined(MOESPEC_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_thread = nullptr;
  L.current = nullptr;
}

void switch_to_scheduler(Launch& L, Fiber* f, bool exiting) {
#if defined(MOESPEC_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &g_fake_stack, nullptr, 0);
#else
  (void)exiting;
#endif
#if defined(__x86_64__)
  moespec_emu_switch(&f->sp, L.sched_sp);
#else
  swapcontext(&f->uc, &L.sched_uc);
#endif
#if defined(MOESPEC_EMU_ASAN)
  __sanitizer_finish_switch_fiber(g_fake_stack, nullptr, nullptr);
#endif
}

Launch& current_launch(const char* what) {
  if (g_launch == nullptr || g_launch->current == nullptr) {
    std::fprintf(stderr, "moespec emu: %s called outside an emulated kernel\n", what);
    std::abort();
  }
  return *g_launch;
}

std::string thread_name(const Launch& L, const Fiber* f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %d lane %d] of block (%u,%u,%u)", f->ts.thread_idx.x,
                f->ts.thread_idx.y, f->ts.thread_idx.z, f->linear / 32, f->linear % 32, L.block_idx.x, L.block_idx.y,
                L.block_idx.z);
  return buf;
}

// Abort the launch from inside a fiber: the scheduler never resumes it (nor any other thread).
[[noreturn]] void fail(const std::string& msg, cudaError_t code = cudaErrorLaunchFailure) {
  Launch& L = current_launch("fail");
  if (!L.failed) {
    L.failed = true;
    L.fail_code = code;
    L.error = std::string("kernel ") + L.name + ": " + msg;
  }
  switch_to_scheduler(L, L.current, true);
  std::fprintf(stderr, "moespec emu: a failed thread was resumed\n");
  std::abort();
}

// Lands every outstanding copy of a thread (at exit: a copy never waited for still lands).
void finish_copies(Fiber* f) {
  for (const Copy& c : f->copies) {
    if (c.src_size > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_size));
    if (c.src_size < c.size) std::memset(static_cast<char*>(c.dst) + c.src_size, 0, static_cast<size_t>(c.size - c.src_size));
  }
  f->copies.clear();
}

void fiber_entry() {
#if defined(MOESPEC_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Launch& L = *g_launch;
  Fiber* f = L.current;
  L.body.call(L.body.ctx);
  if (!L.perf.empty()) {
    PerfBlock& pb = L.perf[L.cur_block];
    pb.round_trips = std::max(pb.round_trips, f->perf_chain);
  }
  if (L.pdl && !f->griddep_waited)  // on a GPU it could read the previous kernel's outputs too early
    fail(thread_name(L, f) + " exited without griddepcontrol.wait in a programmatic dependent launch");
  finish_copies(f);
  f->state = State::kDone;
  --L.live;
  switch_to_scheduler(L, f, true);
  std::fprintf(stderr, "moespec emu: an exited thread was resumed\n");
  std::abort();
}

void make_stack(Fiber* f) {
#if defined(MOESPEC_EMU_ASAN)
  // Frames of the stack's previous thread (abandoned at exit or on failure) left poisoned shadow.
  ASAN_UNPOISON_MEMORY_REGION(f->stack, kStackBytes);
#endif
#if defined(__x86_64__)
  // Stack as moespec_emu_switch expects it to resume: [mxcsr|fpcw][r15..rbp][return address],
  // with the entry function seeing the alignment of a normal call (rsp % 16 == 8).
  uintptr_t top = reinterpret_cast<uintptr_t>(f->stack + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // fake return address of the entry function (it never returns)
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = 0;
  --sp;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = kStackBytes;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

Fiber* pooled_fiber(size_t i) {
  while (g_fiber_pool.size() <= i) {
    void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return nullptr;
    mprotect(mem, kGuardBytes, PROT_NONE);
    auto* f = new Fiber();
    f->stack = static_cast<char*>(mem) + kGuardBytes;
    g_fiber_pool.push_back(f);
  }
  return g_fiber_pool[i];
}

unsigned warp_lanes(const Launch& L, int warp) {
  const int n = L.nthreads - warp * 32;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

std::string lane_list(unsigned bits) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (bits & (1u << l)) s += (s.empty() ? "" : ",") + std::to_string(l);
  return s.empty() ? "none" : s;
}

// Why no thread can run although some have not finished.
std::string deadlock_report(const Launch& L) {
  std::string msg = "deadlock in block (" + std::to_string(L.block_idx.x) + "," + std::to_string(L.block_idx.y) +
                    "," + std::to_string(L.block_idx.z) + "): ";
  int done = 0;
  for (int i = 0; i < L.nthreads; ++i) done += L.fibers[i]->state == State::kDone;
  if (L.at_block_barrier > 0) {
    msg += "__syncthreads reached by " + std::to_string(L.at_block_barrier) + " of " + std::to_string(L.nthreads) +
           " threads";
    if (done > 0) msg += " (" + std::to_string(done) + " threads exited before it)";
    msg += "; ";
  }
  for (size_t w = 0; w < L.warps.size(); ++w) {
    const WarpSlot& s = L.warps[w];
    if (s.arrived == 0) continue;
    unsigned exited = 0, at_bar = 0;
    for (int l = 0; l < 32; ++l) {
      const int i = static_cast<int>(w) * 32 + l;
      if (i >= L.nthreads) break;
      if (L.fibers[i]->state == State::kDone) exited |= 1u << l;
      if (L.fibers[i]->state == State::kBlockBarrier) at_bar |= 1u << l;
    }
    msg += "warp " + std::to_string(w) + ": " + collective_name(s.kind) + " reached by lanes " + lane_list(s.arrived) +
           ", missing lanes " + lane_list(s.mask & ~s.arrived);
    if (exited & s.mask) msg += " (exited: " + lane_list(exited & s.mask) + ")";
    if (at_bar & s.mask) msg += " (waiting at __syncthreads: " + lane_list(at_bar & s.mask) + ")";
    msg += "; ";
  }
  return msg + "a barrier or collective that not all its threads reach never completes on a GPU";
}

int g_sm_count = 5;  // emulated SMs: the co-residency limit of a launch (set_sm_count)

// The bytes of the static shared section that hold variables: the whole section, less (in the ASan
// lane) the red zones AddressSanitizer put after the variables it protects. Those are the template
// kernels' statics of internal linkage, which shared.ld moves here (GCC's ASan leaves variables in
// COMDAT or user-named sections alone). The emulator must not touch the red zones itself.
struct ByteRange {
  char* p;
  size_t n;
};
const std::vector<ByteRange>& shared_ranges() {
  static const std::vector<ByteRange> ranges = [] {
    std::vector<ByteRange> r;
    char* p = __start_moespec_emu_shared;
    char* const end = __stop_moespec_emu_shared;
#if defined(MOESPEC_EMU_ASAN)
    while (p < end) {
      char* bad = static_cast<char*>(__asan_region_is_poisoned(p, static_cast<size_t>(end - p)));
      char* stop = bad != nullptr ? bad : end;
      if (stop > p) r.push_back(ByteRange{p, static_cast<size_t>(stop - p)});
      p = stop;
      while (p < end && __asan_address_is_poisoned(p)) ++p;
    }
#else
    if (end > p) r.push_back(ByteRange{p, static_cast<size_t>(end - p)});
#endif
    return r;
  }();
  return ranges;
}

void poison_static_shared() {
  for (const ByteRange& r : shared_ranges()) std::memset(r.p, kPoison, r.n);
}
// A block's copy of the static shared section (the bytes of shared_ranges(), in order).
void save_static_shared(std::vector<char>& to) {
  to.clear();
  for (const ByteRange& r : shared_ranges()) to.insert(to.end(), r.p, r.p + r.n);
}
void restore_static_shared(const std::vector<char>& from) {
  size_t at = 0;
  for (const ByteRange& r : shared_ranges()) {
    std::memcpy(r.p, from.data() + at, r.n);
    at += r.n;
  }
}

// A resident block's state while another block runs (Launch holds the running block's).
struct Resident {
  uint3 block_idx{};
  std::vector<Fiber*> fibers;
  std::vector<int> runnable;
  std::vector<int> waiters;
  int live = 0;
  int at_block_barrier = 0;
  std::vector<WarpSlot> warps;
  char* dyn = nullptr;
  std::vector<char> shared;  // its copy of the static shared section
  int slot = 0;              // fibers [slot*nthreads, ...) of the pool, dyn arena slot
  uint64_t cur_block = 0;
};

void swap_block(Launch& L, Resident& r) {
  std::swap(L.block_idx, r.block_idx);
  L.fibers.swap(r.fibers);
  L.runnable.swap(r.runnable);
  L.waiters.swap(r.waiters);
  std::swap(L.live, r.live);
  std::swap(L.at_block_barrier, r.at_block_barrier);
  L.warps.swap(r.warps);
  std::swap(L.dyn, r.dyn);
  std::swap(L.cur_block, r.cur_block);
}

// Runs the current block's threads until none is runnable (all exited, or waiting at barriers
// or flags).
void run_threads(Launch& L) {
  while (!L.failed && !L.runnable.empty()) {
    const size_t j = L.rng.below(L.runnable.size());
    const int idx = L.runnable[j];
    L.runnable[j] = L.runnable.back();
    L.runnable.pop_back();
    Fiber* f = L.fibers[idx];
    switch_to_fiber(L, f);
    if (f->state != State::kFlagWait) L.progress = true;
  }
}

void start_block(Launch& L) {
  // Shared memory of the previous block must not leak into this one.
  poison_static_shared();
  std::memset(L.dyn, kPoison, L.dyn_bytes);
  L.runnable.clear();
  L.waiters.clear();
  L.live = L.nthreads;
  L.at_block_barrier = 0;
  for (WarpSlot& s : L.warps) {
    s.kind = -1;
    s.arrived = 0;
  }
  for (int i = 0; i < L.nthreads; ++i) {
    Fiber* f = L.fibers[i];
    f->linear = i;
    f->ts.thread_idx = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    f->ts.block_idx = L.block_idx;
    f->ts.block_dim = L.block;
    f->ts.grid_dim = L.grid;
    f->state = State::kRunnable;
    f->copies.clear();
    f->committed = 0;
    f->griddep_waited = false;
    f->bounded = f->timed_out = false;
    f->perf_chain = 0;
    make_stack(f);
    L.runnable.push_back(i);
  }
}

// Marks the lanes in `lanes` of warp `w` runnable again.
void release_warp(Launch& L, int w, unsigned lanes) {
  for (int l = 0; l < 32; ++l)
    if (lanes & (1u << l)) {
      Fiber* f = L.fibers[w * 32 + l];
      f->state = State::kRunnable;
      L.runnable.push_back(w * 32 + l);
    }
}

float frag_to_float(bool bf16, uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  return bf16 ? bf16_to_float(bits) : half_to_float(bits);
}

// The warp-wide m16n8k16 product, from the fragment layouts of the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type"): groupID = lane / 4, threadID_in_group = lane % 4.
void compute_mma(WarpSlot& s) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 8; ++i) {  // A: a0..a7, two per 32-bit register (lower index in the low half)
      const int row = (i == 2 || i == 3 || i == 6 || i == 7) ? group + 8 : group;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = frag_to_float(s.bf16, s.a[lane][i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {  // B: b0..b3
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][group] = frag_to_float(s.bf16, s.b[lane][i / 2], i % 2);
    }
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = 0.0;  // products of 16-bit floats are exact in fp32; sum them exactly, round once
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[m][k]) * static_cast<double>(B[k][n]);
      D[m][n] = static_cast<float>(acc);
    }
  for (int lane = 0; lane < 32; ++lane) {  // C/D: c0..c3
    const int group = lane >> 2, tig = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0);
      const int col = tig * 2 + (i & 1);
      s.c[lane][i] = s.c[lane][i] + D[row][col];
    }
  }
}

void complete_collective(Launch& L, int w, WarpSlot& s) {
  const unsigned lanes = s.mask;
  for (int l = 0; l < 32; ++l) {
    if (!(lanes & (1u << l))) continue;
    int src = l;
    switch (s.kind) {
      case kShflIdx: src = s.arg[l] & 31; break;
      case kShflUp: src = l - s.arg[l] >= 0 ? l - s.arg[l] : l; break;
      case kShflDown: src = l + s.arg[l] < 32 ? l + s.arg[l] : l; break;
      case kShflXor: src = (l ^ s.arg[l]) & 31; break;
      default: break;
    }
    if (s.kind == kShflIdx || s.kind == kShflUp || s.kind == kShflDown || s.kind == kShflXor) {
      if (!(lanes & (1u << src))) {
        L.current->state = State::kRunnable;
        fail(std::string(collective_name(s.kind)) + " in warp " + std::to_string(w) + ": lane " + std::to_string(l) +
             " reads lane " + std::to_string(src) + ", which is not in the mask (undefined on a GPU)");
      }
      s.out[l] = s.value[src];
    }
  }
  if (s.kind == kVoteAll || s.kind == kVoteAny || s.kind == kVoteBallot) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((lanes & (1u << l)) && s.value[l]) ballot |= 1u << l;
    const uint64_t v = s.kind == kVoteBallot ? ballot : s.kind == kVoteAll ? (ballot == lanes) : (ballot != 0);
    for (int l = 0; l < 32; ++l) s.out[l] = v;
  }
  if (s.kind == kMma) compute_mma(s);
  for (int l = 0; l < 32; ++l)
    if (lanes & (1u << l)) {
      Fiber* f = L.fibers[w * 32 + l];
      f->result = s.out[l];
      if (s.kind == kMma) std::memcpy(f->d, s.c[l], sizeof f->d);
    }
  s.kind = -1;
  s.arrived = 0;
  release_warp(L, w, lanes);
}

// Arrive at a warp collective; returns once every lane of the mask has arrived.
Fiber* arrive(Launch& L, int kind, unsigned mask, uint64_t value, int arg, WarpSlot** slot_out, int* lane_out) {
  Fiber* f = L.current;
  const int w = f->linear / 32, lane = f->linear % 32;
  const unsigned full = warp_lanes(L, w);
  if (mask != full) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "0x%08x (warp's lanes: 0x%08x)", mask, full);
    fail(std::string(collective_name(kind)) + " with mask " + buf + " by " + thread_name(L, f) +
         ": the emulator, like moespec's kernels, requires full-warp masks");
  }
  WarpSlot& s = L.warps[w];
  if (s.arrived != 0 && s.kind != kind)
    fail("divergent warp " + std::to_string(w) + ": lane " + std::to_string(lane) + " is at " + collective_name(kind) +
         " while lanes " + lane_list(s.arrived) + " wait at " + collective_name(s.kind));
  if (s.arrived == 0) {
    s.kind = kind;
    s.mask = mask;
  }
  s.value[lane] = value;
  s.arg[lane] = arg;
  s.arrived |= 1u << lane;
  *slot_out = &s;
  *lane_out = lane;
  return f;
}

void wait_or_complete(Launch& L, Fiber* f, WarpSlot& s) {
  const int w = f->linear / 32;
  f->state = State::kWarpBarrier;
  if (s.arrived == s.mask) complete_collective(L, w, s);
  switch_to_scheduler(L, f, false);
}

bool in_shared(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  const Launch& L = *g_launch;
  if (c >= __start_moespec_emu_shared && c + n <= __stop_moespec_emu_shared) return true;
  return L.dyn != nullptr && c >= L.dyn && c + n <= L.dyn + L.dyn_bytes;
}

void set_error_text(cudaError_t code, const std::string& detail) {
  (void)code;
  g_error_text = detail;
}

}  // namespace

const char* collective_name(int kind) {
  switch (kind) {
    case kSyncWarp: return "__syncwarp";
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kVoteAll: return "__all_sync";
    case kVoteAny: return "__any_sync";
    case kVoteBallot: return "__ballot_sync";
    case kMma: return "mma.sync.m16n8k16";
    default: return "?";
  }
}

uint64_t warp_collective(int kind, unsigned mask, uint64_t value, int arg) {
  Launch& L = current_launch(collective_name(kind));
  WarpSlot* s;
  int lane;
  Fiber* f = arrive(L, kind, mask, value, arg, &s, &lane);
  wait_or_complete(L, f, *s);
  return f->result;
}

void mma_m16n8k16(bool bf16, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Launch& L = current_launch("mma");
  if (g_count_only) return;  // count-only mode: the products are not needed
  WarpSlot* s;
  int lane;
  Fiber* f = arrive(L, kMma, 0xffffffffu, 0, 0, &s, &lane);
  if (s->arrived == (1u << lane)) s->bf16 = bf16;
  if (s->bf16 != bf16) fail("mma.sync in one warp mixes bf16 and fp16 operands");
  for (int i = 0; i < 4; ++i) s->a[lane][i] = a[i];
  s->b[lane][0] = b0;
  s->b[lane][1] = b1;
  for (int i = 0; i < 4; ++i) s->c[lane][i] = c[i];
  wait_or_complete(L, f, *s);
  for (int i = 0; i < 4; ++i) c[i] = f->d[i];
}

void syncthreads() {
  Launch& L = current_launch("__syncthreads");
  Fiber* f = L.current;
  f->state = State::kBlockBarrier;
  if (++L.at_block_barrier == L.nthreads) {
    L.at_block_barrier = 0;
    for (int i = 0; i < L.nthreads; ++i) {
      L.fibers[i]->state = State::kRunnable;
      L.runnable.push_back(i);
    }
  }
  switch_to_scheduler(L, f, false);
}

void cp_async(void* dst, const void* src, int cp_size, int src_size) {
  Launch& L = current_launch("cp.async");
  Fiber* f = L.current;
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    fail("cp.async copy size must be 4, 8 or 16 bytes, got " + std::to_string(cp_size));
  if (src_size < 0 || src_size > cp_size)
    fail("cp.async source size " + std::to_string(src_size) + " outside [0, " + std::to_string(cp_size) + "]");
  if (reinterpret_cast<uintptr_t>(dst) % cp_size || reinterpret_cast<uintptr_t>(src) % cp_size) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "dst %p, src %p", dst, src);
    fail("misaligned cp.async of " + std::to_string(cp_size) + " bytes by " + thread_name(L, f) + ": " + buf,
         cudaErrorIllegalAddress);
  }
  if (!in_shared(dst, static_cast<size_t>(cp_size)))
    fail("cp.async destination is not in shared memory (" + thread_name(L, f) + ")", cudaErrorIllegalAddress);
  if (!L.perf.empty()) L.perf[L.cur_block].cp_bytes += static_cast<uint64_t>(src_size);
  if (g_count_only) return;  // counted, never copied (the source need not exist)
  std::memset(dst, kPoison, static_cast<size_t>(cp_size));  // nothing has landed yet
  f->copies.push_back(Copy{dst, src, cp_size, src_size, -1});
}

void cp_async_commit() {
  Launch& L = current_launch("cp.async.commit_group");
  Fiber* f = L.current;
  for (Copy& c : f->copies)
    if (c.group < 0) c.group = f->committed;
  ++f->committed;
}

void cp_async_wait(int n) {
  Launch& L = current_launch("cp.async.wait_group");
  Fiber* f = L.current;
  const int complete_below = f->committed - n;  // groups [0, committed - n) must have landed
  std::vector<Copy> pending;
  for (const Copy& c : f->copies) {
    if (c.group >= 0 && c.group < complete_below) {
      if (c.src_size > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_size));
      if (c.src_size < c.size)
        std::memset(static_cast<char*>(c.dst) + c.src_size, 0, static_cast<size_t>(c.size - c.src_size));
    } else {
      pending.push_back(c);
    }
  }
  f->copies.swap(pending);
}

void* dynamic_smem() { return current_launch("dynamic shared memory").dyn; }

void griddep_wait() {
  // Launches run in order: the previous kernel has completed. Record the call for the exit check.
  Launch& L = current_launch("griddepcontrol.wait");
  if (g_image_arch < 90) return;  // compiled out below sm_90 (common.cuh): it waits for nothing
  L.current->griddep_waited = true;
}

void griddep_launch_dependents() { (void)current_launch("griddepcontrol.launch_dependents"); }

std::vector<std::pair<uintptr_t, uint32_t>> g_prefetches;  // guarded by g_launch_mutex while a launch runs

void prefetch_l2(const void* p, uint32_t bytes) {
  Launch& L = current_launch("prefetch.L2");
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (p == nullptr || bytes == 0 || a % 16 || bytes % 16) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%p, %u bytes", p, bytes);
    fail("L2 prefetch of a null, empty or misaligned range by " + thread_name(L, L.current) + ": " + buf);
  }
  // Touch the range's ends: a range outside the tensor faults here (or trips the ASan lane).
  const volatile char* c = static_cast<const volatile char*>(p);
  (void)c[0];
  (void)c[bytes - 1];
  g_prefetches.emplace_back(a, bytes);
}

std::vector<std::pair<uintptr_t, uint32_t>> take_prefetches() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::vector<std::pair<uintptr_t, uint32_t>> out;
  out.swap(g_prefetches);
  return out;
}

void wait_geq(const volatile int* flag, int value) {
  Launch& L = current_launch("flag wait");
  Fiber* f = L.current;
  while (*flag < value) {  // poll; park until the scheduler lets this block's waiters poll again
    f->state = State::kFlagWait;
    L.waiters.push_back(f->linear);
    switch_to_scheduler(L, f, false);
  }
}

int wait_bits(const volatile int* flag, int need) {
  Launch& L = current_launch("bounded flag wait");
  Fiber* f = L.current;
  for (;;) {
    const int v = *flag;
    if ((v & need) == need) return v;
    if (g_timeout_rate > 0 && static_cast<double>(L.rng.next() >> 11) * 0x1.0p-53 < g_timeout_rate) {
      ++g_timeouts;
      return v;
    }
    f->state = State::kFlagWait;
    f->bounded = true;
    L.waiters.push_back(f->linear);
    switch_to_scheduler(L, f, false);
    f->bounded = false;
    if (f->timed_out) {
      f->timed_out = false;
      ++g_timeouts;
      return *flag;
    }
  }
}

void set_wait_timeout_rate(double rate) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_timeout_rate = rate < 0 ? 0 : (rate > 1 ? 1 : rate);
}
int64_t take_wait_timeouts() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const int64_t n = g_timeouts;
  g_timeouts = 0;
  return n;
}

void perf_event(int kind, int64_t a, int64_t b) {
  Launch& L = current_launch("perf event");
  if (L.perf.empty()) return;
  Fiber* f = L.current;
  PerfBlock& pb = L.perf[L.cur_block];
  if (kind == kPerfRoundTrips) f->perf_chain += static_cast<uint64_t>(a);
  if (kind == kPerfBytes) pb.mem_bytes += static_cast<uint64_t>(a);
  if (f->linear == 0) pb.events.push_back(PerfEventRec{kind, a, b, pb.cp_bytes});
}

void set_perf(bool on, bool count_only) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_perf_on = on;
  g_count_only = on && count_only;
  g_perf_log.clear();
}
std::vector<PerfLaunch> take_perf() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::vector<PerfLaunch> out;
  out.swap(g_perf_log);
  return out;
}
std::vector<std::pair<std::string, bool>> take_launches() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::vector<std::pair<std::string, bool>> out;
  out.swap(g_launch_log);
  return out;
}

void set_sm_count(int n) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_sm_count = n < 1 ? 1 : n;
}
int sm_count() { return g_sm_count; }
void set_resident_limit(int n) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_resident_limit = n < 0 ? 0 : n;
}
int resident_limit() { return g_resident_limit; }
void set_image_arch(int arch) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_image_arch = arch;
}
int image_arch() { return g_image_arch; }

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kSmemMaxOptIn) {
      set_error_text(cudaErrorInvalidValue, "cudaFuncSetAttribute: MaxDynamicSharedMemorySize " + std::to_string(value) +
                                                " exceeds the device limit " + std::to_string(kSmemMaxOptIn));
      return cudaErrorInvalidValue;
    }
    g_max_dyn_smem[kernel] = value;
  }
  return cudaSuccess;
}

cudaError_t launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Body body, bool pdl) {
  (void)stream;  // everything runs synchronously, in launch order
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  auto reject = [&](cudaError_t code, const std::string& why) {
    set_error_text(code, std::string("kernel ") + name + ": " + why);
    return code;
  };
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
    return reject(cudaErrorInvalidConfiguration, "a grid or block dimension is 0");
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024)
    return reject(cudaErrorInvalidConfiguration, "block of " + std::to_string(threads) + " threads exceeds the limits");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return reject(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                                                     std::to_string(grid.z) + ") exceeds the limits");
  if (smem > kSmemNoOptIn) {
    const auto it = g_max_dyn_smem.find(kernel);
    const int allowed = it == g_max_dyn_smem.end() ? static_cast<int>(kSmemNoOptIn) : it->second;
    if (smem > static_cast<size_t>(allowed) || smem > kSmemMaxOptIn)
      return reject(cudaErrorInvalidValue,
                    "asks for " + std::to_string(smem) + " bytes of dynamic shared memory but may use " +
                        std::to_string(allowed) +
                        (it == g_max_dyn_smem.end()
                             ? " (more than 48 KiB needs cudaFuncSetAttribute(kernel, "
                               "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) for this kernel)"
                             : " (its cudaFuncAttributeMaxDynamicSharedMemorySize)"));
  }

  Launch L;
  L.name = name;
  L.body = body;
  L.grid = grid;
  L.block = block;
  L.nthreads = static_cast<int>(threads);
  L.pdl = pdl;
  L.rng.s = g_seed ^ (0xA24BAED4963EE407ull * ++g_launches);
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  // Up to one block per emulated SM is resident at a time (the guarantee a persistent kernel gets
  // when its grid does not exceed the SM count at one block per SM), fewer when competing blocks
  // hold SMs (set_resident_limit).
  const int free_sms = g_resident_limit > 0 ? std::min(g_resident_limit, g_sm_count) : g_sm_count;
  const int slots = static_cast<int>(std::min<uint64_t>(nblocks, static_cast<uint64_t>(free_sms)));
  if (g_launch_log.size() >= 4096) g_launch_log.erase(g_launch_log.begin(), g_launch_log.begin() + 2048);
  g_launch_log.emplace_back(name, pdl);
  if (g_perf_on) {
    L.perf.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) L.perf[i].block = i;
  }
  // Stacks are mapped when a slot first runs a block (below): a kernel without flag waits runs its
  // blocks one after another in one slot, so a large grid of large blocks maps one block's stacks.
  const size_t stride = (smem + 127) & ~size_t(127);
  const size_t arena = stride * slots + 128;
  if (g_dyn_arena.size() < arena) g_dyn_arena.resize(arena);
  char* arena0 = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(g_dyn_arena.data()) + 127) & ~uintptr_t(127));
  L.dyn_bytes = smem;
  const int nwarps = (L.nthreads + 31) / 32;

  // Blocks start in a random order; a block runs until it exits or all its live threads wait (at a
  // barrier or on a flag of wait_geq). Then the next block starts while an SM is free; when none
  // is, the flag waiters of every resident block poll again, the blocks in a random order. A
  // kernel without flag waits thus runs its blocks one after another, as before.
  std::vector<uint64_t> order(nblocks);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[L.rng.below(i)]);

  std::vector<Resident> parked;
  std::vector<int> free_slots;
  for (int sl = slots - 1; sl >= 0; --sl) free_slots.push_back(sl);
  size_t next = 0;
  g_launch = &L;
  // After the running block stops: frees its SM, reports a barrier deadlock, or parks it.
  auto settle = [&](int slot) {
    if (L.live == 0) {
      free_slots.push_back(slot);
      return;
    }
    if (L.waiters.empty()) {  // nothing can wake it: a barrier no thread will complete
      L.failed = true;
      L.error = std::string("kernel ") + L.name + ": " + deadlock_report(L);
      return;
    }
    Resident r;
    r.slot = slot;
    save_static_shared(r.shared);
    swap_block(L, r);
    parked.push_back(std::move(r));
  };
  while (!L.failed) {
    if (next < order.size() && !free_slots.empty()) {
      const uint64_t b = order[next++];
      const int slot = free_slots.back();
      free_slots.pop_back();
      bool mapped = true;
      for (size_t i = static_cast<size_t>(slot) * L.nthreads; i < static_cast<size_t>(slot + 1) * L.nthreads; ++i)
        if (pooled_fiber(i) == nullptr) mapped = false;
      if (!mapped) {
        L.failed = true;
        L.fail_code = cudaErrorLaunchFailure;
        L.error = std::string("kernel ") + L.name + ": cannot map emulated thread stacks";
        break;
      }
      L.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                          static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
      L.fibers.assign(g_fiber_pool.begin() + static_cast<ptrdiff_t>(slot) * L.nthreads,
                      g_fiber_pool.begin() + static_cast<ptrdiff_t>(slot + 1) * L.nthreads);
      L.warps.assign(static_cast<size_t>(nwarps), WarpSlot());
      L.dyn = arena0 + stride * static_cast<size_t>(slot);
      L.cur_block = b;
      start_block(L);
      run_threads(L);
      if (!L.failed) settle(slot);
      continue;
    }
    if (parked.empty()) break;  // every block has exited
    if (!L.progress) {
      // No block can move: time out the bounded waits of one parked block (a GPU's bounded spin
      // would expire; the kernel then recomputes what it waited for).
      std::vector<size_t> bounded;
      for (size_t i = 0; i < parked.size(); ++i)
        for (int w : parked[i].waiters)
          if (parked[i].fibers[w]->bounded) {
            bounded.push_back(i);
            break;
          }
      if (!bounded.empty()) {
        Resident& r = parked[bounded[L.rng.below(bounded.size())]];
        for (int w : r.waiters)
          if (r.fibers[w]->bounded) r.fibers[w]->timed_out = true;
        L.progress = true;
      }
    }
    if (!L.progress) {          // the last round only polled flags that no thread will set
      L.failed = true;
      std::string who;
      for (const Resident& r : parked)
        who += (who.empty() ? "" : ", ") + std::string("(") + std::to_string(r.block_idx.x) + "," +
               std::to_string(r.block_idx.y) + "," + std::to_string(r.block_idx.z) + ")";
      L.error = std::string("kernel ") + L.name + ": deadlock: every resident block waits on a flag (blocks " + who +
                " on " + std::to_string(slots) + " emulated SMs; " + std::to_string(order.size() - next) +
                " blocks not started): a wait for another block's work needs that block resident and able to finish it";
      break;
    }
    L.progress = false;
    std::vector<Resident> round;
    round.swap(parked);
    for (size_t i = round.size(); i > 1; --i) std::swap(round[i - 1], round[L.rng.below(i)]);
    for (size_t i = 0; i < round.size(); ++i) {
      Resident& r = round[i];
      if (L.failed) {
        parked.push_back(std::move(r));
        continue;
      }
      swap_block(L, r);
      restore_static_shared(r.shared);
      for (int w : L.waiters) {
        L.fibers[w]->state = State::kRunnable;
        L.runnable.push_back(w);
      }
      L.waiters.clear();
      run_threads(L);
      if (!L.failed) settle(r.slot);
    }
  }
  g_launch = nullptr;
  g_thread = nullptr;
  if (L.failed) {
    set_error_text(L.fail_code, L.error);
    return L.fail_code;
  }
  if (g_perf_on) g_perf_log.push_back(PerfLaunch{name, grid, block, smem, pdl, std::move(L.perf)});
  return cudaSuccess;
}

void set_seed(uint64_t s) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_seed = s;
  g_launches = 0;
}
uint64_t seed() { return g_seed; }

// ------------------------------------------------------------------------ 16-bit floats
float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    const uint32_t u = 0x7f800000u | (mant << 13);
    std::memcpy(&v, &u, 4);
  } else {
    const uint32_t u = ((exp + 112u) << 23) | (mant << 13);
    std::memcpy(&v, &u, 4);
  }
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u |= sign;
  std::memcpy(&v, &u, 4);
  return v;
}

uint16_t float_to_half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN, inf
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                         // below 2^-14: a subnormal half (or zero)
    if (ax <= 0x33000000u) return sign;           // <= 2^-25 rounds to zero (ties to even)
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // value / 2^-24 = m >> shift
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = (ax >> 13) - (112u << 10);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

}  // namespace moespec_emu

// ------------------------------------------------------------------------ runtime API
namespace {
cudaError_t g_sticky = cudaSuccess;
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_sticky;
  g_sticky = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_sticky; }

const char* cudaGetErrorString(cudaError_t err) {
  static thread_local std::string text;
  const char* base = "unknown error";
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: base = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: base = "invalid configuration argument"; break;
    case cudaErrorNoDevice: base = "no CUDA-capable device is detected"; break;
    case cudaErrorInvalidDeviceFunction: base = "invalid device function"; break;
    case cudaErrorIllegalAddress: base = "an illegal memory access was encountered"; break;
    case cudaErrorLaunchFailure: base = "unspecified launch failure"; break;
  }
  text = std::string(base) + (moespec_emu::g_error_text.empty() ? "" : " [emu: " + moespec_emu::g_error_text + "]");
  return text.c_str();
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;
  return cudaErrorNoDevice;
}
