// Driver of the budgeted grouped experts on the CPU (docs/cpu-kernels.md): picks the ISA level,
// lays out the workspace, and runs three fork-join stages on the thread pool:
//   1. GEMM1 + bias + gated activation, items = (active expert, 32 intermediate columns)
//   2. GEMM2 + bias, times the routing weight, items = (active expert, 64 hidden columns)
//   3. combine: y[t] = sum of its active pairs in slot order, converted to the activation dtype
// Items are claimed dynamically (an atomic counter; threads that join late just find less work),
// but each output element is computed by one item in a fixed order, so results do not depend on
// the thread count or the schedule.
// Each item streams its slice of one expert's weights once for all of that expert's tokens.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "convert.h"
#include "cpu_kernels.h"
#include "experts_ctx.h"
#include "pool.h"

namespace moespec {
namespace cpu {

#if !defined(MOESPEC_CPU_HAVE_AVX2)
const IsaKernels* kernels_avx2() { return nullptr; }
#endif
#if !defined(MOESPEC_CPU_HAVE_AVX512)
const IsaKernels* kernels_avx512() { return nullptr; }
#endif
#if !defined(MOESPEC_CPU_HAVE_AVX512BF16)
const IsaKernels* kernels_avx512bf16() { return nullptr; }
#endif

namespace {

constexpr int kMetaActive = 3, kMetaPairs = 4;
// Item widths: fixed (not derived from the thread count), so the bits never depend on it.
constexpr int kIB = 32, kHB = 64;
constexpr int kMaxReadThreads = 256;


const IsaKernels* kernels_for(int isa) {
  switch (isa) {
    case kAvx512Bf16: return kernels_avx512bf16();
    case kAvx512: return kernels_avx512();
    case kAvx2: return kernels_avx2();
    default: return kernels_scalar();
  }
}

// One growing, 64-byte-aligned buffer: the only memory the experts allocate, and only when a
// call needs more than any call before it.
class Workspace {
 public:
  void* get(size_t bytes) {
    if (bytes > size_) {
      std::free(ptr_);
      size_ = (bytes + 63) / 64 * 64;
      ptr_ = std::aligned_alloc(64, size_);
      if (ptr_ == nullptr) size_ = 0;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

struct Carver {
  char* base;
  size_t off = 0;
  template <class T>
  T* take(size_t n) {
    T* p = reinterpret_cast<T*>(base + off);
    off += (n * sizeof(T) + 63) / 64 * 64;
    return p;
  }
};

struct Stage {
  const ExpertsCtx* c;
  const IsaKernels* kern;
  int which;  // 0: per-expert preparation, 1: GEMM1, 2: GEMM2, 3: combine
  int items, blocks, width;
  std::atomic<int> next{0};
  // combine
  const int* pair_position;
  void* out;
  float* acc;  // [threads, H]
};

void run_stage(void* p, int tid) {
  Stage& s = *static_cast<Stage*>(p);
  const ExpertsCtx& c = *s.c;
  if (s.which == 3) {
    const int T = c.T, H = c.H, k = c.k;
    float* acc = s.acc + (int64_t)tid * H;
    for (;;) {  // tokens claimed one at a time: whichever threads joined share them
      const int t = s.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= T) return;
      for (int j = 0; j < H; ++j) acc[j] = 0.f;
      for (int r = 0; r < k; ++r) {  // slot order
        const int pos = s.pair_position[(int64_t)t * k + r];
        if (pos < 0) continue;
        const float* y = c.y + (int64_t)pos * H;
        for (int j = 0; j < H; ++j) acc[j] += y[j];
      }
      if (c.dtype == 0) {
        std::memcpy(static_cast<float*>(s.out) + (int64_t)t * H, acc, sizeof(float) * H);
      } else {
        uint16_t* o = static_cast<uint16_t*>(s.out) + (int64_t)t * H;
        if (c.dtype == 1)
          for (int j = 0; j < H; ++j) o[j] = float_to_bf16(acc[j]);
        else
          for (int j = 0; j < H; ++j) o[j] = float_to_half(acc[j]);
      }
    }
  }
  float* scratch = c.scratch + (int64_t)tid * c.scratch_stride;
  for (;;) {
    const int it = s.next.fetch_add(1, std::memory_order_relaxed);
    if (it >= s.items) return;
    if (s.which == 0) {
      s.kern->prep(c, it);
      continue;
    }
    const int a = it / s.blocks, b = it % s.blocks;
    const int lo = b * s.width;
    const int hi = s.which == 1 ? (lo + s.width < c.I ? lo + s.width : c.I) : (lo + s.width < c.H ? lo + s.width : c.H);
    if (s.which == 1)
      s.kern->gemm1(c, a, lo, hi, scratch);
    else
      s.kern->gemm2(c, a, lo, hi, scratch);
  }
}

struct ReadJob {
  const IsaKernels* kern;
  const char* p;
  int64_t bytes, chunk;
  std::atomic<int64_t> next{0};
  double sums[kMaxReadThreads * 8];  // one per thread, a cache line apart
};

void run_read(void* p, int tid) {
  ReadJob& j = *static_cast<ReadJob*>(p);
  double s = 0;
  for (;;) {
    const int64_t i = j.next.fetch_add(1, std::memory_order_relaxed);
    const int64_t lo = i * j.chunk;
    if (lo >= j.bytes) break;
    s += j.kern->read_sum(j.p + lo, lo + j.chunk < j.bytes ? j.chunk : j.bytes - lo);
  }
  j.sums[tid * 8] = s;
}

}  // namespace

std::string stream_read(uintptr_t p, int64_t bytes, int threads, double* checksum) {
  if (p == 0 || bytes < 0) return "cpu stream read: need a buffer and bytes >= 0";
  if (threads < 1 || threads > kMaxReadThreads)
    return "cpu stream read: threads must be in [1, " + std::to_string(kMaxReadThreads) + "]";
  std::string err;
  const int isa = active_isa(&err);
  if (isa < 0) return "cpu stream read: " + err;
  ReadJob j;
  j.kern = kernels_for(isa);
  j.p = reinterpret_cast<const char*>(p);
  j.bytes = bytes;
  j.chunk = 1 << 20;  // claimed dynamically, like the experts' items
  for (double& v : j.sums) v = 0;
  ThreadPool::instance().run(threads, run_read, &j);
  double s = 0;
  for (int t = 0; t < threads; ++t) s += j.sums[t * 8];
  if (checksum != nullptr) *checksum = s;
  return "";
}

std::string moe_experts(const CpuExpertsArgs& a) {
  if (a.dtype < 0 || a.dtype > 2) return "cpu experts: bad dtype code " + std::to_string(a.dtype);
  if (a.T < 0 || a.k < 1 || a.H < 1 || a.I < 1)
    return "cpu experts: need T >= 0, k >= 1, H >= 1, I >= 1 (got T=" + std::to_string(a.T) + ", k=" +
           std::to_string(a.k) + ", H=" + std::to_string(a.H) + ", I=" + std::to_string(a.I) + ")";
  if (a.order < 0 || a.order > 2) return "cpu experts: bad gate/up order code";
  if (a.activation < 0 || a.activation > 1) return "cpu experts: bad activation code";
  if (a.threads < 1) return "cpu experts: threads must be >= 1";
  if (a.x == 0 || a.w_gu == 0 || a.w_down == 0 || a.meta == 0 || a.act_experts == 0 || a.act_offsets == 0 ||
      a.pair_token == 0 || a.pair_slot == 0 || a.pair_position == 0 || a.weights == 0 || a.out == 0)
    return "cpu experts: a buffer is missing";
  if (a.x_stride < a.H) return "cpu experts: x rows overlap (x_stride < H)";
  std::string err;
  const int isa = active_isa(&err);
  if (isa < 0) return "cpu experts: " + err;
  const IsaKernels* kern = kernels_for(isa);
  if (kern == nullptr) return std::string("cpu experts: ISA level ") + isa_name(isa) + " is not compiled in";

  const int T = a.T, H = a.H, I = a.I, k = a.k;
  const int* meta = reinterpret_cast<const int*>(a.meta);
  const int A = meta[kMetaActive], P = meta[kMetaPairs];
  const size_t esize = a.dtype == 0 ? 4 : 2;
  if (T == 0) return "";
  if (P <= 0 || A <= 0) {  // nothing routed to a kept expert: the output is zero
    std::memset(reinterpret_cast<void*>(a.out), 0, (size_t)T * H * esize);
    return "";
  }
  if (P > T * k || A > P) return "cpu experts: the plan's counts are inconsistent with T and k";
  const int64_t weight_bytes = (int64_t)A * 3 * H * I * (int64_t)esize;
  const int64_t by_work = a.min_thread_bytes > 0 ? weight_bytes / a.min_thread_bytes : a.threads;
  const int threads = (int)(by_work < 1 ? 1 : (by_work < a.threads ? by_work : a.threads));
  const bool bf16_dot = kern->bf16_dot && a.dtype == 1 && !a.transposed;

  // ---- workspace (grown on demand; calls are serialised by the mutex)
  static std::mutex ws_mutex;
  static Workspace ws;
  std::lock_guard<std::mutex> lock(ws_mutex);
  size_t need = 0;
  auto add = [&](size_t n, size_t sz) { need += (n * sz + 63) / 64 * 64; };
  const size_t rows = (size_t)P + (size_t)A * kLanePad;  // per-expert buffers, each rounded up (experts_ctx.h)
  const int64_t scratch_stride = 4 * (int64_t)(H > I ? H : I) + 4 * ((int64_t)T * k + kLanePad);
  add((size_t)T * H, 4);                    // xf
  add((size_t)P, sizeof(void*));            // xrows
  add((size_t)P, sizeof(void*));            // x16rows
  add(rows * H, 4);                         // xt
  add(rows * 2 * I, 4);                     // gu
  add(rows * I, 4);                         // h
  add(rows * I, 2);                         // h16
  add((size_t)P, sizeof(void*));            // hrows
  add((size_t)P, sizeof(void*));            // h16rows
  add((size_t)P * H, 4);                    // y
  add((size_t)threads * H, 4);              // combine accumulators
  add((size_t)threads * scratch_stride, 4); // per-thread scratch
  void* base = ws.get(need);
  if (base == nullptr) return "cpu experts: could not allocate the workspace (" + std::to_string(need) + " bytes)";
  Carver cv{static_cast<char*>(base)};
  float* xf = cv.take<float>((size_t)T * H);
  const float** xrows = cv.take<const float*>(P);
  const uint16_t** x16rows = cv.take<const uint16_t*>(P);
  float* xt = cv.take<float>(rows * H);
  float* gu = cv.take<float>(rows * 2 * I);
  float* h = cv.take<float>(rows * I);
  uint16_t* h16 = cv.take<uint16_t>(rows * I);
  const float** hrows = cv.take<const float*>(P);
  const uint16_t** h16rows = cv.take<const uint16_t*>(P);
  float* y = cv.take<float>((size_t)P * H);
  float* acc = cv.take<float>((size_t)threads * H);
  float* scratch = cv.take<float>((size_t)threads * scratch_stride);

  // ---- inputs as fp32 rows (the bf16 dot products read x as it is)
  const int* pair_token = reinterpret_cast<const int*>(a.pair_token);
  const void* x = reinterpret_cast<const void*>(a.x);
  if (a.dtype != 0) {
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < H; ++j) xf[(int64_t)t * H + j] = load_as_float(x, a.dtype, (int64_t)t * a.x_stride + j);
  }
  const int* act_offsets = reinterpret_cast<const int*>(a.act_offsets);
  for (int e = 0; e < A; ++e) {
    for (int p = act_offsets[e]; p < act_offsets[e + 1]; ++p) {
      const int t = pair_token[p];
      xrows[p] = a.dtype == 0 ? static_cast<const float*>(x) + (int64_t)t * a.x_stride : xf + (int64_t)t * H;
      x16rows[p] = static_cast<const uint16_t*>(x) + (int64_t)t * a.x_stride;
      const int64_t slot = p + (int64_t)e * kLanePad;  // the expert's rows start at p0 + e * kLanePad
      hrows[p] = h + slot * I;
      h16rows[p] = h16 + slot * I;
    }
  }

  ExpertsCtx c{};
  c.dtype = a.dtype;
  c.transposed = a.transposed;
  c.order = a.order;
  c.activation = a.activation;
  c.alpha = (float)a.alpha;
  c.limit = (float)a.limit;
  c.T = T, c.k = k, c.H = H, c.I = I;
  c.w_gu = reinterpret_cast<const void*>(a.w_gu);
  c.w_down = reinterpret_cast<const void*>(a.w_down);
  c.b_gu = reinterpret_cast<const float*>(a.b_gu);
  c.b_down = reinterpret_cast<const float*>(a.b_down);
  c.act_experts = reinterpret_cast<const int*>(a.act_experts);
  c.act_offsets = act_offsets;
  c.pair_token = pair_token;
  c.pair_slot = reinterpret_cast<const int*>(a.pair_slot);
  c.weights = reinterpret_cast<const float*>(a.weights);
  c.xrows = xrows;
  c.x16rows = bf16_dot ? x16rows : nullptr;
  c.xt = xt;
  c.gu = gu;
  c.h = h;
  c.h16 = bf16_dot ? h16 : nullptr;
  c.hrows = hrows;
  c.h16rows = bf16_dot ? h16rows : nullptr;
  c.y = y;
  c.scratch = scratch;
  c.scratch_stride = scratch_stride;

  ThreadPool& pool = ThreadPool::instance();
  Stage s0;
  s0.c = &c, s0.kern = kern, s0.which = 0, s0.items = A;
  pool.run(threads < A ? threads : A, run_stage, &s0);
  Stage s1;
  s1.c = &c, s1.kern = kern, s1.which = 1, s1.blocks = (I + kIB - 1) / kIB, s1.width = kIB;
  s1.items = A * s1.blocks;
  pool.run(threads < s1.items ? threads : s1.items, run_stage, &s1);
  Stage s2;
  s2.c = &c, s2.kern = kern, s2.which = 2, s2.blocks = (H + kHB - 1) / kHB, s2.width = kHB;
  s2.items = A * s2.blocks;
  pool.run(threads < s2.items ? threads : s2.items, run_stage, &s2);
  Stage s3;
  s3.c = &c, s3.kern = kern, s3.which = 3, s3.items = T;
  s3.pair_position = reinterpret_cast<const int*>(a.pair_position);
  s3.out = reinterpret_cast<void*>(a.out);
  s3.acc = acc;
  pool.run(threads < T ? threads : T, run_stage, &s3);
  return "";
}

}  // namespace cpu
}  // namespace moespec
