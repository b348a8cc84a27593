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
constexpr int kSpin = 2000;  // pause iterations (some tens of microseconds) before a worker sleeps
}  // namespace

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose (workers run forever): joining threads from a static destructor at
  // interpreter exit can deadlock.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

void ThreadPool::grow(int workers) {
  while ((int)workers_.size() < workers) {
    const int id = (int)workers_.size() + 1;
    workers_.emplace_back([this, id] { loop(id); });
    workers_.back().detach();
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
    // Announce first, then look: the caller closes the job before it waits for busy_ == 0, so
    // either it sees this worker and waits, or this worker sees the job closed (or the next one,
    // fully published) and never touches a finished job's context.
    busy_.fetch_add(1, std::memory_order_seq_cst);
    if (open_.load(std::memory_order_seq_cst) && id < n_) fn_(ctx_, id);
    busy_.fetch_sub(1, std::memory_order_release);
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
  open_.store(true, std::memory_order_seq_cst);
  {
    std::lock_guard<std::mutex> lk(wake_m_);
    epoch_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_cv_.notify_all();
  fn(ctx, 0);
  open_.store(false, std::memory_order_seq_cst);
  for (int i = 0; busy_.load(std::memory_order_seq_cst) != 0; ++i) {
    if (i < kSpin) {
      MOESPEC_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace cpu
}  // namespace moespec
