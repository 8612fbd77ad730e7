#include "lmengine/thread_pool.h"

#include <sched.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LME_CPU_RELAX() _mm_pause()
#else
#define LME_CPU_RELAX() ((void)0)
#endif

namespace lme {

namespace {
// About 1-2 ms of spinning before a worker sleeps: long enough to bridge decode steps, short
// enough that an idle engine gives the cores back.
constexpr int kSpinBeforeSleep = 1 << 16;
// Inside a run, spin then yield: on an oversubscribed machine a pure spin starves the very
// thread everyone waits for.
constexpr int kSpinBeforeYield = 1 << 10;
}  // namespace

void spin_wait_pause(int& spins) {
  if (++spins < kSpinBeforeYield) {
    LME_CPU_RELAX();
  } else {
    sched_yield();
  }
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
  for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t] { worker_loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::run(const std::function<void(int, int)>& fn, int64_t max_ops) {
  // No worker is inside a run here, so the progress counters can be reset plainly.
  if (max_ops > n_ops_) {
    ops_.reset(new OpProgress[static_cast<size_t>(max_ops)]);
    n_ops_ = max_ops;
  }
  for (int64_t i = 0; i < max_ops; ++i) {
    ops_[i].claimed.store(0, std::memory_order_relaxed);
    ops_[i].done.store(0, std::memory_order_relaxed);
  }
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  running_.store(n_threads_ - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
  fn(0, n_threads_);
  int spins = 0;
  while (running_.load(std::memory_order_acquire) != 0) spin_wait_pause(spins);
  job_ = nullptr;
}

void ThreadPool::worker_loop(int tid) {
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    uint64_t gen;
    while ((gen = generation_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpinBeforeSleep) {
        LME_CPU_RELAX();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1);
      spins = 0;
    }
    seen = gen;
    if (stop_.load()) return;
    (*job_)(tid, n_threads_);
    running_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace lme
