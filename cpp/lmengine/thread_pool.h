// A fork-join pool in the style of ggml's compute threads: one forward pass is a single `run()`
// in which every thread walks the same op sequence and claims chunks of each op from a shared
// counter. An op ends when all its chunks are *done*, not when all threads have *arrived*: a
// thread the OS descheduled does not hold the others back; when it wakes it finds the claimed
// counters exhausted and skips ahead. On a busy 2-core machine this is the difference between
// losing one time slice per step and losing one per op (hundreds per step).
// Workers spin briefly between runs (decode steps come back-to-back), then sleep.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace lme {

// Progress of one op: chunks handed out and work items finished.
struct alignas(64) OpProgress {
  std::atomic<int64_t> claimed{0};
  std::atomic<int64_t> done{0};
};

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Calls fn(tid, n_threads) on every thread (the caller is tid 0) and returns when all finish.
  // At most max_ops for_chunks() calls may happen inside one run.
  void run(const std::function<void(int, int)>& fn, int64_t max_ops);

  OpProgress& op(int64_t index) { return ops_[static_cast<size_t>(index)]; }

 private:
  void worker_loop(int tid);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::unique_ptr<OpProgress[]> ops_;
  int64_t n_ops_ = 0;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> running_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

// Waits with a short spin, then yields the core (the thread we wait for may need it).
void spin_wait_pause(int& spins);

// Per-thread view of one run(): each op calls for_chunks() and the threads share its work
// dynamically, then wait until every chunk is done.
class ParallelContext {
 public:
  // op_seconds (optional, indexed by the caller's op kinds): thread 0 adds each op's wall time
  // to the kind set by set_kind().
  ParallelContext(ThreadPool& pool, int tid, int nth, double* op_seconds = nullptr)
      : pool_(pool), tid_(tid), nth_(nth), op_seconds_(tid == 0 ? op_seconds : nullptr) {
    if (op_seconds_) last_ = std::chrono::steady_clock::now();
  }
  int tid() const { return tid_; }
  int nth() const { return nth_; }
  void set_kind(int kind) { kind_ = kind; }

  // Runs fn(begin, end) over [0, n) in chunks of `chunk`, shared among the threads; returns
  // once all of [0, n) is done (its writes visible to this thread).
  template <typename Fn>
  void for_chunks(int64_t n, int64_t chunk, Fn&& fn) {
    OpProgress& p = pool_.op(op_++);
    if (chunk < 1) chunk = 1;
    for (;;) {
      const int64_t start = p.claimed.fetch_add(chunk, std::memory_order_relaxed);
      if (start >= n) break;
      const int64_t end = start + chunk < n ? start + chunk : n;
      fn(start, end);
      p.done.fetch_add(end - start, std::memory_order_release);
    }
    int spins = 0;
    while (p.done.load(std::memory_order_acquire) < n) spin_wait_pause(spins);
    if (op_seconds_) {
      const auto now = std::chrono::steady_clock::now();
      op_seconds_[kind_] += std::chrono::duration<double>(now - last_).count();
      last_ = now;
    }
  }

 private:
  ThreadPool& pool_;
  int tid_;
  int nth_;
  int64_t op_ = 0;
  double* op_seconds_;
  int kind_ = 0;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace lme
