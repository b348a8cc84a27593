// A small persistent thread pool for the CPU kernels: fork-join over a fixed worker set, so a
// kernel call costs no thread creation. Jobs claim their work items dynamically, and the caller
// waits only for workers that actually joined the job: on a busy machine a worker that is not
// scheduled in time simply misses the job instead of stalling it. Workers spin briefly after a
// job (decode layers come back within microseconds), then sleep on a condition variable.
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
  // Calls fn(ctx, tid) on the caller (tid 0) and on up to n - 1 workers (tids 1..n-1) that join
  // in time; returns when every call that started has returned. fn must share its work through
  // the context (e.g. an atomic item counter), since not every tid is guaranteed to run. Calls
  // from several host threads are serialised.
  void run(int n, void (*fn)(void*, int), void* ctx);

 private:
  ThreadPool() = default;
  void grow(int workers);
  void loop(int id);
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> busy_{0};
  std::atomic<bool> open_{false};
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  int n_ = 0;
  std::mutex wake_m_, run_m_;
  std::condition_variable wake_cv_;
};

}  // namespace cpu
}  // namespace moespec
