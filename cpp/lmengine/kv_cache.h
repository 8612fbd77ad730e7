// Paged KV cache: one pool of fixed-size pages allocated at start-up, handed to sequences
// through per-sequence page tables. A page holds `page_size` consecutive positions of one
// sequence for every layer and KV head, so freeing a sequence returns whole pages and the page
// is the unit block-sparse attention selects.
//
// Layout of the K and V pools, innermost last, with pages in groups of kPageGroup:
//   K: [page group][layer][kv_head][page in group][head_dim][slot in page]   (transposed: a
//                                         page's scores are page_size-wide vector FMAs)
//   V: [page group][layer][kv_head][page in group][slot in page][head_dim]
// so one (page, layer, head) block is page_size * head_dim contiguous elements, and the blocks
// of consecutive pages of one layer and head follow each other within a group (decode attention
// walks them as one stream; 2 KiB blocks 180 KiB apart, as a [page][layer][head] order puts them
// for SmolLM2, read at about half the speed on one core). The group is the unit in which the
// lazily mapped pools grow. With block_summaries, a third pool holds per (page, layer, head) the
// element-wise min and max of the page's valid keys, [2][head_dim] in the KV dtype (min row, then
// max row), in the same order, for block-sparse attention's selection (kv_summaries.h keeps it up
// to date).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "lmengine/status.h"

namespace lme {

enum class KVDType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

int64_t kv_dtype_bytes(KVDType t);

struct KVCacheConfig {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 16;
  int64_t n_pages = 0;
  KVDType dtype = KVDType::F32;
  bool block_summaries = false;
};

// Zeroed memory for one pool: an anonymous mapping the OS fills lazily, so resident memory grows
// with the positions used, not with the pool's size. On Linux it is marked for transparent huge
// pages: a (page, layer, head) block is 1-4 KiB and a sequence's pages lie anywhere in the pool,
// so with 4 KiB pages most blocks a long-context attention reads (every block past a page
// group's end, every block a sparse selection picks) would cost their own TLB miss and walk.
class PoolMemory {
 public:
  PoolMemory() = default;
  explicit PoolMemory(int64_t bytes);
  ~PoolMemory();
  PoolMemory(PoolMemory&& other) noexcept : ptr_(other.ptr_), bytes_(other.bytes_) {
    other.ptr_ = nullptr;
    other.bytes_ = 0;
  }
  PoolMemory& operator=(PoolMemory&& other) noexcept;
  PoolMemory(const PoolMemory&) = delete;
  PoolMemory& operator=(const PoolMemory&) = delete;
  uint8_t* get() const { return ptr_; }
  bool operator==(std::nullptr_t) const { return ptr_ == nullptr; }
  bool operator!=(std::nullptr_t) const { return ptr_ != nullptr; }

 private:
  uint8_t* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

class KVCache {
 public:
  explicit KVCache(const KVCacheConfig& config);

  const KVCacheConfig& config() const { return config_; }
  // False when the pool could not be allocated (the caller must not use this cache).
  bool allocated() const {
    return k_pool_ != nullptr && v_pool_ != nullptr && (!config_.block_summaries || summary_pool_ != nullptr);
  }
  // Pages per group of the pool layout (above); the pools hold n_pages rounded up to a multiple.
  static constexpr int64_t kPageGroup = 32;
  int64_t pool_bytes() const {
    return allocated_pages() * config_.n_layers * config_.n_kv_heads *
           (2 * block_bytes() + summary_bytes());
  }
  int64_t allocated_pages() const {
    return (config_.n_pages + kPageGroup - 1) / kPageGroup * kPageGroup;
  }
  int64_t free_pages() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t total_pages() const { return config_.n_pages; }
  int64_t pages_for(int64_t n_tokens) const {
    return (n_tokens + config_.page_size - 1) / config_.page_size;
  }

  int32_t seq_create();
  Status seq_free(int32_t seq);
  bool seq_valid(int32_t seq) const;
  int64_t seq_length(int32_t seq) const { return seqs_[seq].length; }
  const std::vector<int32_t>& seq_pages(int32_t seq) const { return seqs_[seq].pages; }
  // Makes room for new_length positions (allocating pages), without changing the length.
  Status seq_reserve(int32_t seq, int64_t new_length);
  void seq_set_length(int32_t seq, int64_t length) { seqs_[seq].length = length; }
  // Drops positions >= length and returns pages no longer needed.
  Status seq_truncate(int32_t seq, int64_t length);
  int64_t n_active_seqs() const;

  // Start of the (page, layer, head) block in the K or V pool, as raw bytes.
  uint8_t* k_block(int32_t page, int32_t layer, int32_t head) {
    return k_pool_.get() + block_offset(page, layer, head);
  }
  uint8_t* v_block(int32_t page, int32_t layer, int32_t head) {
    return v_pool_.get() + block_offset(page, layer, head);
  }
  int64_t block_bytes() const { return block_elems_ * kv_dtype_bytes(config_.dtype); }
  // Min/max summary of the (page, layer, head) block: [2][head_dim] in the cache's dtype (the
  // extremes of stored keys are stored keys, so a 16-bit cache's summaries are exact in 16 bits
  // and cost half what fp32 would); null without summaries. Readers take the elements in place
  // (attention_vec::Half/BHalf).
  uint8_t* block_summary(int32_t page, int32_t layer, int32_t head) {
    if (summary_pool_ == nullptr) return nullptr;
    return summary_pool_.get() + block_index(page, layer, head) * summary_bytes();
  }
  int64_t summary_bytes() const {
    return config_.block_summaries ? 2 * config_.head_dim * kv_dtype_bytes(config_.dtype) : 0;
  }

 private:
  struct SeqState {
    std::vector<int32_t> pages;
    int64_t length = 0;
    bool active = false;
  };
  int64_t block_index(int32_t page, int32_t layer, int32_t head) const {
    const int64_t group = page / kPageGroup, in_group = page % kPageGroup;
    return ((group * config_.n_layers + layer) * config_.n_kv_heads + head) * kPageGroup + in_group;
  }
  int64_t block_offset(int32_t page, int32_t layer, int32_t head) const {
    return block_index(page, layer, head) * block_bytes();
  }

  KVCacheConfig config_;
  int64_t block_elems_;
  PoolMemory k_pool_, v_pool_, summary_pool_;
  std::vector<int32_t> free_list_;
  std::vector<SeqState> seqs_;
  std::vector<int32_t> free_seq_ids_;
};

}  // namespace lme
