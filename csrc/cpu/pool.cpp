#include "pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOESPEC_PAUSE() _mm_pause()
#else
#define MOESPEC_PAUSE() std::this_thread::yield()
#endif

namespace moespec {
namespace cpu {

namespace {
constexpr int kSpin = 20000;  // pause iterations (tens of microseconds) before a worker sleeps
struct Noop {
  static void fn(void*, int) {}
};
}  // namespace

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can deadlock.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(wake_m_);
    stop_ = true;
    epoch_.fetch_add(1);
  }
  wake_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::grow(int workers) {
  while ((int)workers_.size() < workers) {
    const int id = (int)workers_.size() + 1;
    workers_.emplace_back([this, id] { loop(id); });
  }
}

void ThreadPool::loop(int id) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t now = epoch_.load(std::memory_order_acquire);
    for (int i = 0; now == seen && i < kSpin; ++i) {
      MOESPEC_PAUSE();
      now = epoch_.load(std::memory_order_acquire);
    }
    if (now == seen) {
      std::unique_lock<std::mutex> lk(wake_m_);
      wake_cv_.wait(lk, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
      now = epoch_.load(std::memory_order_acquire);
    }
    seen = now;
    if (stop_) return;
    // Every worker takes part in every epoch (ids beyond n_ return at once), so none can skip
    // one and mistake the next job's arguments for the current one's.
    if (id < n_) fn_(ctx_, id);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(int n, void (*fn)(void*, int), void* ctx) {
  if (n <= 1) {
    fn(ctx, 0);
    return;
  }
  std::lock_guard<std::mutex> guard(run_m_);
  grow(n - 1);
  fn_ = fn;
  ctx_ = ctx;
  n_ = n;
  pending_.store((int)workers_.size(), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(wake_m_);
    epoch_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_cv_.notify_all();
  fn(ctx, 0);
  for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
    if (i < kSpin) {
      MOESPEC_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  fn_ = Noop::fn;
}

}  // namespace cpu
}  // namespace moespec
