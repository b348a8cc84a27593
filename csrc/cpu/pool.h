// A small persistent thread pool for the CPU kernels: fork-join over a fixed worker set, so a
// kernel call costs no thread creation. Workers spin briefly after a job (decode layers come
// back within microseconds) and then sleep on a condition variable, so an idle pool costs nothing.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace moespec {
namespace cpu {

class ThreadPool {
 public:
  static ThreadPool& instance();
  // Calls fn(ctx, tid) for tid in [0, n) concurrently (the caller runs tid 0) and returns when
  // all calls have returned. Calls from several host threads are serialised.
  void run(int n, void (*fn)(void*, int), void* ctx);
  ~ThreadPool();

 private:
  void grow(int workers);
  void loop(int id);
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0};
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  int n_ = 0;
  bool stop_ = false;
  std::mutex wake_m_, run_m_;
  std::condition_variable wake_cv_;
};

}  // namespace cpu
}  // namespace moespec
