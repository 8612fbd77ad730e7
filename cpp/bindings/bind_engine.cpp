// Binding for lme::Engine: builds the model from Python-owned (memory-mapped) tensors, validates
// every shape and pointer before the core sees it, and runs steps with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "bind_moe.h"
#include "errors.h"
#include "lmengine/model.h"
#include "lmengine/ops.h"

namespace py = pybind11;
using lme_py::raise_error;
using lme_py::raise_if_error;

py::list pass_records_list(const lme::PassCounters& c);  // bind_counters.cpp

namespace {

template <typename T>
T cfg_get(const py::dict& cfg, const char* key) {
  if (!cfg.contains(key)) raise_error("InvalidRequestError", std::string("model config is missing '") + key + "'");
  try {
    return cfg[key].cast<T>();
  } catch (const py::cast_error&) {
    raise_error("InvalidRequestError", std::string("model config field '") + key + "' has the wrong type");
  }
}

template <typename T>
T cfg_get_or(const py::dict& cfg, const char* key, T fallback) {
  return cfg.contains(key) && !cfg[key].is_none() ? cfg_get<T>(cfg, key) : fallback;
}

class PyEngine {
 public:
  PyEngine(const py::dict& cfg, const py::dict& tensors, int64_t kv_pages, int32_t page_size,
           const std::string& kv_dtype, int n_threads, bool block_summaries) {
    lme::ModelConfig c;
    c.n_layers = cfg_get<int32_t>(cfg, "n_layers");
    c.d_model = cfg_get<int32_t>(cfg, "d_model");
    c.n_heads = cfg_get<int32_t>(cfg, "n_heads");
    c.n_kv_heads = cfg_get<int32_t>(cfg, "n_kv_heads");
    c.head_dim = cfg_get<int32_t>(cfg, "head_dim");
    c.d_ff = cfg_get<int32_t>(cfg, "d_ff");
    c.vocab_size = cfg_get<int32_t>(cfg, "vocab_size");
    c.max_context = cfg_get<int64_t>(cfg, "max_context");
    c.rms_eps = cfg_get<float>(cfg, "rms_eps");
    c.attn_scale = cfg_get_or<float>(cfg, "attn_scale", 0.f);
    c.rope_interleaved = cfg_get<bool>(cfg, "rope_interleaved");
    c.rope_inv_freq = cfg_get<std::vector<float>>(cfg, "rope_inv_freq");
    c.sliding_window = cfg_get_or<int32_t>(cfg, "sliding_window", 0);
    c.qkv_bias = cfg_get_or<bool>(cfg, "qkv_bias", false);
    c.embed_scale = cfg_get_or<float>(cfg, "embed_scale", 0.f);
    c.post_norms = cfg_get_or<bool>(cfg, "post_norms", false);
    c.layer_sliding_window = cfg_get_or<std::vector<int32_t>>(cfg, "layer_sliding_window", {});
    c.rope_inv_freq_local = cfg_get_or<std::vector<float>>(cfg, "rope_inv_freq_local", {});
    const std::string act = cfg_get_or<std::string>(cfg, "ffn_activation", "silu");
    if (act == "silu") {
      c.ffn_activation = lme::kActSiLU;
    } else if (act == "gelu_tanh") {
      c.ffn_activation = lme::kActGeluTanh;
    } else {
      raise_error("UnsupportedModelError", "ffn_activation must be 'silu' or 'gelu_tanh', got '" + act + "'");
    }
    c.activation_bits = cfg_get_or<int32_t>(cfg, "activation_bits", 16);
    c.two_level_mask = cfg_get_or<int32_t>(cfg, "two_level_mask", 31);
    lme_py::moe_config_from_dict(cfg, c);
    c.decode_split_pages = cfg_get_or<int32_t>(cfg, "decode_split_pages", 16);
    if (c.decode_split_pages < 0) raise_error("InvalidRequestError", "decode_split_pages must be >= 0");
    c.sparse_score_blocks = cfg_get_or<int32_t>(cfg, "sparse_score_blocks", 1024);
    if (c.sparse_score_blocks < 1)
      raise_error("InvalidRequestError", "sparse_score_blocks must be >= 1");
    c.f32_prompt_min_tokens = cfg_get_or<int32_t>(cfg, "f32_prompt_min_tokens", 8);
    if (c.f32_prompt_min_tokens < 0) {
      raise_error("InvalidRequestError", "f32_prompt_min_tokens must be >= 0");
    }
    if (c.activation_bits != 8 && c.activation_bits != 16) {
      raise_error("InvalidRequestError", "activation_bits must be 8 or 16");
    }
    if (c.n_layers <= 0 || c.n_layers > 4096) raise_error("InvalidRequestError", "n_layers out of range");

    lme::ModelWeights w;
    w.layers.resize(c.n_layers);
    std::set<std::string> used;
    auto get = [&](const std::string& name, bool required) -> lme::WeightTensor {
      used.insert(name);
      if (!tensors.contains(name)) {
        if (required) raise_error("ModelFileError", "model is missing tensor '" + name + "'");
        return {};
      }
      py::tuple item;
      try {
        item = tensors[name.c_str()].cast<py::tuple>();
      } catch (const py::cast_error&) {
        raise_error("InvalidRequestError", "tensor '" + name + "' must be (ggml_type, array, rows, cols)");
      }
      if (item.size() != 4) raise_error("InvalidRequestError", "tensor '" + name + "' must be (ggml_type, array, rows, cols)");
      const int32_t type = item[0].cast<int32_t>();
      if (!lme::dtype_is_supported(type)) {
        raise_error("UnsupportedModelError",
                    "tensor '" + name + "' has unsupported type id " + std::to_string(type));
      }
      py::array arr = py::array::ensure(item[1]);
      if (!arr || !(arr.flags() & py::array::c_style)) {
        raise_error("InvalidRequestError", "tensor '" + name + "' must be a C-contiguous array");
      }
      lme::WeightTensor t;
      t.type = static_cast<lme::DType>(type);
      t.rows = item[2].cast<int64_t>();
      t.cols = item[3].cast<int64_t>();
      if (t.rows <= 0 || t.cols <= 0 || t.cols % lme::dtype_block_size(t.type) != 0) {
        raise_error("ModelFileError", "tensor '" + name + "' has an invalid shape for its type " +
                                          lme::dtype_name(t.type));
      }
      const int64_t expect = t.rows * lme::dtype_row_bytes(t.type, t.cols);
      if (static_cast<int64_t>(arr.nbytes()) != expect) {
        raise_error("ModelFileError", "tensor '" + name + "' holds " + std::to_string(arr.nbytes()) +
                                          " bytes, its shape and type need " + std::to_string(expect));
      }
      t.data = static_cast<const uint8_t*>(arr.data());
      keepalive_.append(arr);
      return t;
    };
    w.tok_embd = get("token_embd", true);
    w.out_norm = get("output_norm", true);
    w.lm_head = tensors.contains("output") ? get("output", true) : w.tok_embd;
    for (int32_t l = 0; l < c.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      lme::LayerWeights& L = w.layers[l];
      L.attn_norm = get(p + "attn_norm", true);
      L.wq = get(p + "attn_q", true);
      L.wk = get(p + "attn_k", true);
      L.wv = get(p + "attn_v", true);
      L.wo = get(p + "attn_output", true);
      L.bq = get(p + "attn_q.bias", c.qkv_bias);
      L.bk = get(p + "attn_k.bias", c.qkv_bias);
      L.bv = get(p + "attn_v.bias", c.qkv_bias);
      if (c.post_norms) {
        L.post_attn_norm = get(p + "post_attention_norm", true);
        L.post_ffn_norm = get(p + "post_ffw_norm", true);
      }
      L.ffn_norm = get(p + "ffn_norm", true);
      const bool dense = c.moe.n_experts == 0 || c.moe_layers[l] == 0;
      L.w_gate = get(p + "ffn_gate", dense);
      L.w_up = get(p + "ffn_up", dense);
      L.w_down = get(p + "ffn_down", dense);
      lme_py::moe_layer_weights(get, c, l, L);
    }
    for (auto item : tensors) {
      const std::string name = py::str(item.first);
      if (used.count(name) == 0) {
        raise_error("UnsupportedModelError", "tensor '" + name + "' has no place in the " +
                                                 "Llama-family core (unsupported architecture feature)");
      }
    }
    raise_if_error(lme::validate_model(c, w));

    if (page_size <= 0 || page_size > 4096) raise_error("InvalidRequestError", "page_size must be in [1, 4096]");
    if (kv_pages <= 0) raise_error("InvalidRequestError", "the KV cache needs at least one page");
    if (n_threads <= 0 || n_threads > 1024) raise_error("InvalidRequestError", "n_threads must be in [1, 1024]");
    lme::KVCacheConfig kc;
    kc.n_layers = c.n_layers;
    kc.n_kv_heads = c.n_kv_heads;
    kc.head_dim = c.head_dim;
    kc.page_size = page_size;
    kc.n_pages = kv_pages;
    kc.block_summaries = block_summaries;
    if (kv_dtype == "f32") {
      kc.dtype = lme::KVDType::F32;
    } else if (kv_dtype == "f16") {
      kc.dtype = lme::KVDType::F16;
    } else if (kv_dtype == "bf16") {
      kc.dtype = lme::KVDType::BF16;
    } else {
      raise_error("InvalidRequestError", "kv_dtype must be 'f32', 'f16' or 'bf16', got '" + kv_dtype + "'");
    }
    vocab_ = c.vocab_size;
    engine_ = std::make_unique<lme::Engine>(std::move(c), std::move(w), kc, n_threads);
    if (!engine_->kv().allocated()) {
      const int64_t bytes = engine_->kv().pool_bytes();
      engine_.reset();
      raise_error("KVCacheFullError", "could not allocate the KV cache pool of " + std::to_string(bytes) +
                                          " bytes; lower kv_cache_tokens");
    }
  }

  int32_t seq_create() {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_->kv().seq_create();
  }
  void seq_free(int32_t seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    raise_if_error(engine_->kv().seq_free(seq));
  }
  int64_t seq_length(int32_t seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_seq(seq);
    return engine_->kv().seq_length(seq);
  }
  void seq_truncate(int32_t seq, int64_t length) {
    std::lock_guard<std::mutex> lock(mutex_);
    raise_if_error(engine_->kv().seq_truncate(seq, length));
  }

  py::array_t<float> step(const std::vector<int32_t>& seq_ids, const py::list& tokens,
                          const std::vector<bool>& all_logits, const std::optional<std::vector<bool>>& sparse) {
    if (seq_ids.size() != tokens.size() || seq_ids.size() != all_logits.size()) {
      raise_error("InvalidRequestError", "seq_ids, tokens and all_logits must have the same length");
    }
    if (sparse && sparse->size() != seq_ids.size()) {
      raise_error("InvalidRequestError", "sparse must have one entry per sequence");
    }
    std::vector<py::array_t<int32_t, py::array::c_style | py::array::forcecast>> arrays;
    std::vector<lme::StepSequence> batch(seq_ids.size());
    arrays.reserve(seq_ids.size());
    for (size_t i = 0; i < seq_ids.size(); ++i) {
      py::array_t<int32_t, py::array::c_style | py::array::forcecast> a;
      try {
        a = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(tokens[i]);
      } catch (const py::error_already_set&) {
        a = {};
      }
      if (!a || a.ndim() != 1) raise_error("InvalidRequestError", "tokens must be 1-D integer arrays");
      if (a.size() > (int64_t(1) << 30)) raise_error("InvalidRequestError", "token chunk too long");
      batch[i].seq = seq_ids[i];
      batch[i].tokens = a.data();
      batch[i].n_tokens = static_cast<int32_t>(a.size());
      batch[i].all_logits = all_logits[i];
      batch[i].sparse = sparse && (*sparse)[i];
      arrays.push_back(std::move(a));
    }
    const int64_t rows = lme::Engine::output_rows(batch);
    py::array_t<float> out({rows, static_cast<int64_t>(vocab_)});
    float* dst = out.mutable_data();
    lme::Status s;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      s = engine_->step(batch, dst);
    }
    raise_if_error(s);
    return out;
  }

  // k, v: float32 [n_layers, n, n_kv_heads, head_dim] (layer None) or [n, n_kv_heads, head_dim].
  void seq_write_kv(int32_t seq, int64_t pos0, const py::array& k, const py::array& v, py::object layer) {
    const lme::ModelConfig& c = engine_->config();
    const bool all_layers = layer.is_none();
    const int ndim = all_layers ? 4 : 3;
    for (const auto& [a, name] : {std::pair<const py::array&, const char*>{k, "k"}, {v, "v"}}) {
      if (!a.dtype().is(py::dtype::of<float>())) {
        raise_error("InvalidRequestError", std::string(name) + " must be float32, got " +
                                               py::str(a.dtype()).cast<std::string>());
      }
      if (a.ndim() != ndim) {
        raise_error("InvalidRequestError", std::string(name) + " must be " + std::to_string(ndim) +
                                               "-D [" + (all_layers ? "n_layers, " : "") +
                                               "n, n_kv_heads, head_dim], got " + std::to_string(a.ndim()) + "-D");
      }
    }
    const int64_t expect[4] = {all_layers ? int64_t(c.n_layers) : k.shape(0), k.shape(ndim - 3),
                               int64_t(c.n_kv_heads), int64_t(c.head_dim)};
    for (int i = 0; i < ndim; ++i) {
      const int64_t want = expect[4 - ndim + i];
      if (k.shape(i) != want || v.shape(i) != want) {
        raise_error("InvalidRequestError", "k and v must have the same shape [" +
                                               std::string(all_layers ? "n_layers=" + std::to_string(c.n_layers) + ", " : "") +
                                               "n, n_kv_heads=" + std::to_string(c.n_kv_heads) +
                                               ", head_dim=" + std::to_string(c.head_dim) + "]");
      }
    }
    const int32_t layer0 = all_layers ? 0 : layer.cast<int32_t>();
    const int32_t n_layers = all_layers ? c.n_layers : 1;
    auto kc = py::array_t<float, py::array::c_style>::ensure(k);
    auto vc = py::array_t<float, py::array::c_style>::ensure(v);
    const int64_t n = k.shape(ndim - 3);
    lme::Status s;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      s = engine_->seq_write_kv(seq, layer0, n_layers, pos0, n, kc.data(), vc.data());
    }
    raise_if_error(s);
  }
  py::tuple seq_read_kv(int32_t seq, int32_t layer, int64_t pos0, int64_t n) {
    const lme::ModelConfig& c = engine_->config();
    if (n < 0) raise_error("InvalidRequestError", "n must be >= 0");
    py::array_t<float> k({n, int64_t(c.n_kv_heads), int64_t(c.head_dim)});
    py::array_t<float> v({n, int64_t(c.n_kv_heads), int64_t(c.head_dim)});
    lme::Status s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      s = engine_->seq_read_kv(seq, layer, pos0, n, k.mutable_data(), v.mutable_data());
    }
    raise_if_error(s);
    return py::make_tuple(k, v);
  }

  py::dict op_seconds() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    for (int k = 0; k < lme::kNumOpKinds; ++k) d[lme::op_kind_name(k)] = engine_->op_seconds()[k];
    d["steps"] = engine_->steps_run();
    d["tokens"] = engine_->tokens_run();
    return d;
  }
  void set_sparse_attention(double keep, int32_t n_min, int32_t n_local, int32_t n_sink) {
    std::lock_guard<std::mutex> lock(mutex_);
    lme::SparseAttentionConfig c;
    c.keep = keep;
    c.n_min = n_min;
    c.n_local = n_local;
    c.n_sink = n_sink;
    raise_if_error(engine_->set_sparse_attention(c));
  }
  py::dict sparse_counters() {
    std::lock_guard<std::mutex> lock(mutex_);
    const lme::SparseCounters& c = engine_->sparse_counters();
    const lme::KVCache& kv = engine_->kv();
    py::dict d;
    d["tokens"] = c.tokens;
    d["blocks_candidate"] = c.blocks_candidate;
    d["blocks_selected"] = c.blocks_selected;
    // Bytes the sparse tokens' attention read (selected K+V blocks and every candidate's summary)
    // and what dense attention would have read for the same tokens.
    d["kv_bytes_read"] = c.blocks_selected * 2 * kv.block_bytes() + c.blocks_candidate * kv.summary_bytes();
    d["kv_bytes_dense"] = c.blocks_candidate * 2 * kv.block_bytes();
    return d;
  }
  void reset_op_seconds() {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_->reset_op_seconds();
  }
  py::dict counters() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    d["records"] = pass_records_list(engine_->counters());
    d["dropped"] = engine_->counters().dropped();
    return d;
  }
  void reset_counters() {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_->counters().clear();
  }

  // [n_layers, n_experts] tokens per expert: the last step (last=True) or since the reset.
  py::array_t<int64_t> expert_counts(bool last) {
    std::lock_guard<std::mutex> lock(mutex_);
    const lme::MoEStats& st = engine_->moe_stats();
    py::array_t<int64_t> out({int64_t(st.n_layers), int64_t(st.n_experts)});
    const auto& src = last ? st.last : st.total;
    std::copy(src.begin(), src.end(), out.mutable_data());
    return out;
  }
  // Distinct experts hit per layer in the last step (the S-MBU counter's E_act).
  py::array_t<int32_t> experts_active() {
    std::lock_guard<std::mutex> lock(mutex_);
    const lme::MoEStats& st = engine_->moe_stats();
    py::array_t<int32_t> out(int64_t(st.n_layers));
    st.distinct_last(out.mutable_data());
    return out;
  }
  void reset_expert_counts() {
    std::lock_guard<std::mutex> lock(mutex_);
    engine_->reset_moe_stats();
  }
  int64_t expert_passes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_->moe_stats().passes;
  }

  // The block summaries of one layer of a sequence, for tests: [n_blocks, n_kv_heads, 2, head_dim].
  py::array_t<float> read_block_summaries(int32_t seq, int32_t layer) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_seq(seq);
    lme::KVCache& kv = engine_->kv();
    const lme::KVCacheConfig& c = kv.config();
    if (!c.block_summaries) raise_error("InvalidRequestError", "this engine keeps no block summaries");
    if (layer < 0 || layer >= c.n_layers) raise_error("InvalidRequestError", "layer out of range");
    const int64_t n = kv.pages_for(kv.seq_length(seq)), H = c.n_kv_heads, D = c.head_dim;
    py::array_t<float> out({n, H, int64_t(2), D});
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        lme::kv_to_f32(static_cast<int32_t>(c.dtype), kv.block_summary(kv.seq_pages(seq)[b], layer, static_cast<int32_t>(h)),
                       out.mutable_data() + (b * H + h) * 2 * D, 2 * D);
      }
    }
    return out;
  }

  int64_t free_pages() {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_->kv().free_pages();
  }
  int64_t total_pages() const { return engine_->kv().total_pages(); }
  int32_t page_size() const { return engine_->kv().config().page_size; }
  int n_threads() const { return engine_->n_threads(); }
  int64_t active_sequences() {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine_->kv().n_active_seqs();
  }

 private:
  void check_seq(int32_t seq) {
    if (!engine_->kv().seq_valid(seq)) raise_error("InvalidRequestError", "unknown sequence id " + std::to_string(seq));
  }

  std::unique_ptr<lme::Engine> engine_;
  py::list keepalive_;  // the arrays whose memory the core reads
  int32_t vocab_ = 0;
  std::mutex mutex_;
};

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<const py::dict&, const py::dict&, int64_t, int32_t, const std::string&, int, bool>(),
           py::arg("config"), py::arg("tensors"), py::arg("kv_pages"), py::arg("page_size") = 16,
           py::arg("kv_dtype") = "f32", py::arg("n_threads") = 1, py::arg("block_summaries") = false)
      .def("seq_create", &PyEngine::seq_create)
      .def("seq_free", &PyEngine::seq_free)
      .def("seq_length", &PyEngine::seq_length)
      .def("seq_truncate", &PyEngine::seq_truncate)
      .def("step", &PyEngine::step, py::arg("seq_ids"), py::arg("tokens"), py::arg("all_logits"),
           py::arg("sparse") = py::none(),
           "Appends each tokens[i] to sequence seq_ids[i] and returns logits, float32 "
           "[rows, vocab]: every new position where all_logits[i], else the last one. sparse[i]: "
           "a one-token chunk attends block-sparsely (engine built with block_summaries).")
      .def("set_sparse_attention", &PyEngine::set_sparse_attention, py::arg("keep"), py::arg("n_min"),
           py::arg("n_local"), py::arg("n_sink"), "Block selection parameters of sparse decode tokens.")
      .def("sparse_counters", &PyEngine::sparse_counters,
           "Sparse decode tokens, candidate and selected blocks (per token, layer and KV head) and "
           "the KV bytes they read vs dense, since the last reset_op_seconds.")
      .def("seq_write_kv", &PyEngine::seq_write_kv, py::arg("seq"), py::arg("pos0"), py::arg("k"), py::arg("v"),
           py::arg("layer") = py::none(),
           "Writes post-RoPE K and V rows of positions [pos0, pos0 + n) into a sequence's pages. k, v: "
           "float32 [n_layers, n, n_kv_heads, head_dim] (every layer; may extend the sequence, pos0 <= "
           "length) or [n, n_kv_heads, head_dim] for one `layer` (within the length).")
      .def("seq_read_kv", &PyEngine::seq_read_kv, py::arg("seq"), py::arg("layer"), py::arg("pos0"), py::arg("n"),
           "(k, v) of positions [pos0, pos0 + n) of one layer, float32 [n, n_kv_heads, head_dim].")
      .def("op_seconds", &PyEngine::op_seconds,
           "Wall seconds per op kind accumulated since the last reset, with steps and tokens.")
      .def("reset_op_seconds", &PyEngine::reset_op_seconds)
      .def("counters", &PyEngine::counters,
           "Per-pass work records since the last reset (oldest first; 'dropped' counts passes the "
           "ring buffer no longer holds).")
      .def("reset_counters", &PyEngine::reset_counters)
      .def("expert_counts", &PyEngine::expert_counts, py::arg("last") = false,
           "int64 [n_layers, n_experts]: tokens routed to each expert, in the last step (last=True)"
           " or accumulated since reset_expert_counts(); dense models have n_experts = 0.")
      .def("experts_active", &PyEngine::experts_active,
           "int32 [n_layers]: distinct experts that got at least one token in the last step.")
      .def("reset_expert_counts", &PyEngine::reset_expert_counts)
      .def_property_readonly("expert_passes", &PyEngine::expert_passes,
                             "Steps accumulated in expert_counts() since the reset.")
      .def("read_block_summaries", &PyEngine::read_block_summaries, py::arg("seq"), py::arg("layer"),
           "Key min/max per block: float32 [n_blocks, n_kv_heads, 2, head_dim] copy.")
      .def_property_readonly("free_pages", &PyEngine::free_pages)
      .def_property_readonly("total_pages", &PyEngine::total_pages)
      .def_property_readonly("page_size", &PyEngine::page_size)
      .def_property_readonly("n_threads", &PyEngine::n_threads)
      .def_property_readonly("active_sequences", &PyEngine::active_sequences);
}
