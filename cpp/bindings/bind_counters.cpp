// Binding for the per-pass counters (lme::PassCounters): records as flat dicts (one column per
// term, so pandas.DataFrame(records) works) and the term formulas for tests on synthetic inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "errors.h"
#include "lmengine/counters.h"

namespace py = pybind11;
using lme_py::raise_error;

namespace {

std::string lower(const char* s) {
  std::string out(s);
  for (char& ch : out) ch = static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
  return out;
}

py::dict record_dict(const lme::PassRecord& r) {
  py::dict d;
  d["index"] = r.index;
  d["mode"] = lme::pass_mode_name(r.mode);
  d["n_sequences"] = r.n_sequences;
  d["n_tokens"] = r.n_tokens;
  d["n_output_rows"] = r.n_output_rows;
  d["context_attended"] = r.context_attended;
  d["context_unique"] = r.context_unique;
  for (int i = 0; i < lme::kNumFlopTerms; ++i)
    d[("flops_" + std::string(lme::flop_term_name(i))).c_str()] = r.flops[i];
  for (int i = 0; i < lme::kNumWeightTerms; ++i) {
    d[("weight_bytes_" + std::string(lme::weight_term_name(i))).c_str()] = r.weight_bytes[i];
  }
  for (int i = 0; i < lme::kNumDTypeSlots; ++i) {
    d[("weight_bytes_dtype_" + lower(lme::dtype_name(lme::dtype_of_slot(i)))).c_str()] =
        r.weight_bytes_by_dtype[i];
  }
  d["kv_bytes_read"] = r.kv_bytes_read;
  d["kv_bytes_unique"] = r.kv_bytes_unique;
  d["kv_bytes_written"] = r.kv_bytes_written;
  d["moe_layers"] = r.moe_layers;
  d["experts_active_sum"] = r.experts_active_sum;
  d["attention_blocks_selected"] = r.attention_blocks_selected;
  d["seconds"] = r.seconds;
  d["t_end"] = r.t_end;
  return d;
}

py::dict attention_dict(const lme::AttentionTerms& t) {
  py::dict d;
  d["context_attended"] = t.context_attended;
  d["context_unique"] = t.context_unique;
  d["kv_bytes_read"] = t.kv_bytes_read;
  d["kv_bytes_unique"] = t.kv_bytes_unique;
  d["kv_bytes_written"] = t.kv_bytes_written;
  d["flops_attn_scores"] = t.flops;
  d["attention_blocks_selected"] = t.blocks_selected;
  return d;
}

lme::AttentionShape attention_shape(int64_t n_layers, int64_t n_heads, int64_t n_kv_heads,
                                    int64_t head_dim, int64_t page_size, int64_t kv_elem_bytes,
                                    int64_t sliding_window) {
  if (n_layers <= 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || page_size <= 0 ||
      kv_elem_bytes <= 0 || sliding_window < 0 || n_heads % n_kv_heads != 0) {
    raise_error(
        "InvalidRequestError",
        "attention shape needs positive sizes, n_heads a multiple of n_kv_heads and window >= 0");
  }
  lme::AttentionShape s;
  s.n_layers = n_layers;
  s.n_heads = n_heads;
  s.n_kv_heads = n_kv_heads;
  s.head_dim = head_dim;
  s.page_size = page_size;
  s.kv_elem_bytes = kv_elem_bytes;
  s.sliding_window = sliding_window;
  return s;
}

// bytes_by_dtype: {"q4_k": bytes, ...} -> slot array.
void fill_dtype_bytes(const py::dict& src, double* dst, const char* what) {
  for (auto item : src) {
    const std::string key = py::str(item.first);
    int slot = -1;
    for (int i = 0; i < lme::kNumDTypeSlots; ++i) {
      if (lower(lme::dtype_name(lme::dtype_of_slot(i))) == key) slot = i;
    }
    if (slot < 0)
      raise_error("InvalidRequestError", std::string(what) + ": unknown dtype '" + key + "'");
    dst[slot] = item.second.cast<double>();
  }
}

}  // namespace

py::list pass_records_list(const lme::PassCounters& c) {
  py::list out;
  for (int64_t i = 0; i < c.size(); ++i) out.append(record_dict(c.at(i)));
  return out;
}

void bind_counters(py::module_& m) {
  py::module_ k =
      m.def_submodule("counters", "Formulas of the per-pass work counters (see counters.h).");
  k.def(
      "dense_attention_terms",
      [](const std::vector<std::pair<int64_t, int64_t>>& chunks, int64_t n_layers, int64_t n_heads,
         int64_t n_kv_heads, int64_t head_dim, int64_t page_size, int64_t kv_elem_bytes,
         int64_t sliding_window) {
        const lme::AttentionShape s = attention_shape(n_layers, n_heads, n_kv_heads, head_dim,
                                                      page_size, kv_elem_bytes, sliding_window);
        lme::AttentionTerms t;
        for (const auto& ch : chunks) {
          if (ch.first < 0 || ch.second < 0)
            raise_error("InvalidRequestError", "chunk start and length must be >= 0");
          lme::dense_attention_terms_add(s, ch.first, ch.second, &t);
        }
        return attention_dict(t);
      },
      py::arg("chunks"), py::arg("n_layers"), py::arg("n_heads"), py::arg("n_kv_heads"),
      py::arg("head_dim"), py::arg("page_size"), py::arg("kv_elem_bytes"),
      py::arg("sliding_window") = 0,
      "Attention terms of a pass whose sequences add positions [start, start + n) for each "
      "(start, n) in chunks.");
  k.def(
      "block_sparse_attention_terms",
      [](int64_t n_query_tokens, const std::vector<int64_t>& selected_blocks,
         const std::vector<int64_t>& summaries, int64_t summary_bytes, int64_t n_layers,
         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t page_size,
         int64_t kv_elem_bytes) {
        const lme::AttentionShape s =
            attention_shape(n_layers, n_heads, n_kv_heads, head_dim, page_size, kv_elem_bytes, 0);
        if (static_cast<int64_t>(selected_blocks.size()) != n_layers ||
            static_cast<int64_t>(summaries.size()) != n_layers) {
          raise_error("InvalidRequestError",
                      "selected_blocks and summaries_scored need one entry per layer");
        }
        if (n_query_tokens < 0 || summary_bytes < 0) {
          raise_error("InvalidRequestError", "n_query_tokens and summary_bytes must be >= 0");
        }
        return attention_dict(lme::block_sparse_attention_terms(
            s, n_query_tokens, selected_blocks.data(), summaries.data(), summary_bytes));
      },
      py::arg("n_query_tokens"), py::arg("selected_blocks"), py::arg("summaries_scored"),
      py::arg("summary_bytes"), py::arg("n_layers"), py::arg("n_heads"), py::arg("n_kv_heads"),
      py::arg("head_dim"), py::arg("page_size"), py::arg("kv_elem_bytes"),
      "Attention terms of a block-sparse pass from per-layer counts of selected blocks and scored "
      "summaries.");
  k.def(
      "moe_layer_terms",
      [](const std::vector<int32_t>& expert_hits, int64_t n_tokens, int32_t top_k, int64_t d_model,
         int64_t expert_params, const py::dict& expert_bytes, int64_t router_params,
         const py::dict& router_bytes, int64_t shared_params, const py::dict& shared_bytes) {
        if (expert_hits.empty() || top_k <= 0 || n_tokens < 0 || expert_params < 0 ||
            router_params < 0 || shared_params < 0) {
          raise_error("InvalidRequestError",
                      "moe_layer_terms needs expert hits and non-negative sizes");
        }
        for (int32_t h : expert_hits) {
          if (h < 0) raise_error("InvalidRequestError", "expert hit counts must be >= 0");
        }
        lme::MoeLayerShape s;
        s.n_experts = static_cast<int32_t>(expert_hits.size());
        s.top_k = top_k;
        s.d_model = d_model;
        s.expert_params = expert_params;
        s.router_params = router_params;
        s.shared_params = shared_params;
        fill_dtype_bytes(expert_bytes, s.expert_bytes_by_dtype, "expert_bytes");
        fill_dtype_bytes(router_bytes, s.router_bytes_by_dtype, "router_bytes");
        fill_dtype_bytes(shared_bytes, s.shared_bytes_by_dtype, "shared_bytes");
        const lme::MoeLayerTerms t = lme::moe_layer_terms(s, expert_hits.data(), n_tokens);
        py::dict d;
        d["experts_active"] = t.experts_active;
        for (int i = 0; i < lme::kNumFlopTerms; ++i) {
          d[("flops_" + std::string(lme::flop_term_name(i))).c_str()] = t.flops[i];
        }
        for (int i = 0; i < lme::kNumWeightTerms; ++i) {
          d[("weight_bytes_" + std::string(lme::weight_term_name(i))).c_str()] = t.weight_bytes[i];
        }
        for (int i = 0; i < lme::kNumDTypeSlots; ++i) {
          d[("weight_bytes_dtype_" + lower(lme::dtype_name(lme::dtype_of_slot(i)))).c_str()] =
              t.weight_bytes_by_dtype[i];
        }
        return d;
      },
      py::arg("expert_hits"), py::arg("n_tokens"), py::arg("top_k"), py::arg("d_model"),
      py::arg("expert_params"), py::arg("expert_bytes"), py::arg("router_params"),
      py::arg("router_bytes"), py::arg("shared_params") = 0, py::arg("shared_bytes") = py::dict(),
      "Terms of one MoE layer from its per-expert (token, slot) hit counts; *_bytes map a dtype "
      "name "
      "('q4_k', 'f16', ...) to bytes of one expert / the router / all shared experts.");
}
