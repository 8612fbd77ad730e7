#include "lmengine/kv_cache.h"

#include <cstdlib>
#include <string>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "lmengine/kv_summaries.h"

namespace lme {

int64_t kv_dtype_bytes(KVDType t) { return t == KVDType::F32 ? 4 : 2; }

PoolMemory::PoolMemory(int64_t bytes) {
  if (bytes <= 0) return;
#if defined(__linux__)
  void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
#if defined(MADV_HUGEPAGE)
  madvise(p, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
#endif
  ptr_ = static_cast<uint8_t*>(p);
#else
  ptr_ = static_cast<uint8_t*>(std::calloc(static_cast<size_t>(bytes), 1));
#endif
  if (ptr_ != nullptr) bytes_ = bytes;
}

PoolMemory::~PoolMemory() {
  if (ptr_ == nullptr) return;
#if defined(__linux__)
  munmap(ptr_, static_cast<size_t>(bytes_));
#else
  std::free(ptr_);
#endif
}

PoolMemory& PoolMemory::operator=(PoolMemory&& other) noexcept {
  if (this != &other) {
    PoolMemory old(std::move(*this));
    ptr_ = other.ptr_;
    bytes_ = other.bytes_;
    other.ptr_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

KVCache::KVCache(const KVCacheConfig& config)
    : config_(config),
      block_elems_(static_cast<int64_t>(config.page_size) * config.head_dim) {
  const int64_t blocks = allocated_pages() * config_.n_layers * config_.n_kv_heads;
  k_pool_ = PoolMemory(blocks * block_bytes());
  v_pool_ = PoolMemory(blocks * block_bytes());
  if (config_.block_summaries) summary_pool_ = PoolMemory(blocks * summary_bytes());
  free_list_.reserve(static_cast<size_t>(config_.n_pages));
  // Hand out low page numbers first: pop_back takes from the end.
  for (int64_t p = config_.n_pages - 1; p >= 0; --p) free_list_.push_back(static_cast<int32_t>(p));
}

int32_t KVCache::seq_create() {
  int32_t id;
  if (!free_seq_ids_.empty()) {
    id = free_seq_ids_.back();
    free_seq_ids_.pop_back();
  } else {
    id = static_cast<int32_t>(seqs_.size());
    seqs_.emplace_back();
  }
  seqs_[id] = SeqState{};
  seqs_[id].active = true;
  return id;
}

bool KVCache::seq_valid(int32_t seq) const {
  return seq >= 0 && seq < static_cast<int32_t>(seqs_.size()) && seqs_[seq].active;
}

Status KVCache::seq_free(int32_t seq) {
  if (!seq_valid(seq)) {
    return Status::Error(StatusCode::kInvalidArgument, "unknown sequence id " + std::to_string(seq));
  }
  for (int32_t p : seqs_[seq].pages) free_list_.push_back(p);
  seqs_[seq] = SeqState{};
  free_seq_ids_.push_back(seq);
  return Status::Ok();
}

Status KVCache::seq_reserve(int32_t seq, int64_t new_length) {
  SeqState& s = seqs_[seq];
  const int64_t need = pages_for(new_length) - static_cast<int64_t>(s.pages.size());
  if (need <= 0) return Status::Ok();
  if (need > free_pages()) {
    return Status::Error(StatusCode::kOutOfPages,
                         "KV cache full: sequence " + std::to_string(seq) + " needs " +
                             std::to_string(need) + " more pages of " +
                             std::to_string(config_.page_size) + " tokens, " +
                             std::to_string(free_pages()) + " of " +
                             std::to_string(config_.n_pages) + " are free");
  }
  for (int64_t i = 0; i < need; ++i) {
    s.pages.push_back(free_list_.back());
    free_list_.pop_back();
  }
  return Status::Ok();
}

Status KVCache::seq_truncate(int32_t seq, int64_t length) {
  if (!seq_valid(seq)) {
    return Status::Error(StatusCode::kInvalidArgument, "unknown sequence id " + std::to_string(seq));
  }
  SeqState& s = seqs_[seq];
  if (length < 0 || length > s.length) {
    return Status::Error(StatusCode::kInvalidArgument, "truncate length out of range");
  }
  const int64_t keep = pages_for(length);
  while (static_cast<int64_t>(s.pages.size()) > keep) {
    free_list_.push_back(s.pages.back());
    s.pages.pop_back();
  }
  s.length = length;
  // The new last block may now end mid-page: its summary must forget the dropped keys.
  if (config_.block_summaries && length % config_.page_size != 0) {
    return kv_summaries_update(*this, seq, -1, length - 1, length);
  }
  return Status::Ok();
}

int64_t KVCache::n_active_seqs() const {
  int64_t n = 0;
  for (const auto& s : seqs_) n += s.active ? 1 : 0;
  return n;
}

}  // namespace lme
