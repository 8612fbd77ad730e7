// A fork-join pool in the style of ggml's compute threads: one forward pass is a single
// `run()` in which every thread walks the same op sequence, claims chunks of each op from a shared
// counter, and meets the others at a barrier before the next op. Workers spin briefly between
// runs (decode steps come back-to-back) and then sleep, so an idle engine costs no CPU.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lme {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Calls fn(tid, n_threads) on every thread (the caller is tid 0) and returns when all finish.
  void run(const std::function<void(int, int)>& fn);
  // All threads inside run() must call it the same number of times.
  void barrier();

  // Chunk counters for ParallelContext; two so one can be reset while the other is in use.
  std::atomic<int64_t> chunk_counter[2];

 private:
  void worker_loop(int tid);

  int n_threads_;
  std::vector<std::thread> workers_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> running_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  // Sense-reversing barrier.
  alignas(64) std::atomic<int> barrier_count_{0};
  alignas(64) std::atomic<uint32_t> barrier_phase_{0};
};

// Per-thread view of one run(): each op calls for_chunks() and the threads share its work
// dynamically (a noisy 2-core machine punishes static splits), then meet at the barrier.
class ParallelContext {
 public:
  ParallelContext(ThreadPool& pool, int tid, int nth) : pool_(pool), tid_(tid), nth_(nth) {}
  int tid() const { return tid_; }
  int nth() const { return nth_; }

  template <typename Fn>
  void for_chunks(int64_t n, int64_t chunk, Fn&& fn) {
    std::atomic<int64_t>& counter = pool_.chunk_counter[op_ & 1];
    if (tid_ == 0) pool_.chunk_counter[(op_ + 1) & 1].store(0, std::memory_order_relaxed);
    if (chunk < 1) chunk = 1;
    for (;;) {
      int64_t start = counter.fetch_add(chunk, std::memory_order_relaxed);
      if (start >= n) break;
      fn(start, start + chunk < n ? start + chunk : n);
    }
    pool_.barrier();
    ++op_;
  }
  void barrier() { pool_.barrier(); }

 private:
  ThreadPool& pool_;
  int tid_;
  int nth_;
  int64_t op_ = 0;
};

}  // namespace lme
