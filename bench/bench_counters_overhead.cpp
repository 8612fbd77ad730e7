// Cost of the per-pass counters (PassCounters::begin_pass + end_pass) on SmolLM2-135M's shapes,
// for the "< 1% of a step" requirement. Weights are never read by the counters, so a dummy
// pointer stands in for them. Compare with a step's wall time (passes.csv of `lmengine bench cap`:
// a decode step of this model takes ~10-70 ms on 2 cores, a 512-token prefill ~1-3 s).
//
// Build and run (after scripts/dev_build.sh):
//   g++ -O2 -std=c++17 -Icpp bench/bench_counters_overhead.cpp build-dev/liblmengine_core.a \
//       -lpthread -o /tmp/bench_counters_overhead && /tmp/bench_counters_overhead
#include <chrono>
#include <cstdio>

#include "lmengine/counters.h"
#include "lmengine/model.h"
using namespace lme;
int main() {
  ModelConfig c;
  c.n_layers = 30;
  c.d_model = 576;
  c.n_heads = 9;
  c.n_kv_heads = 3;
  c.head_dim = 64;
  c.d_ff = 1536;
  c.vocab_size = 49152;
  c.max_context = 8192;
  static uint8_t dummy[1];
  auto t = [&](DType ty, int64_t r, int64_t k) {
    WeightTensor w;
    w.type = ty;
    w.data = dummy;
    w.rows = r;
    w.cols = k;
    return w;
  };
  ModelWeights w;
  w.tok_embd = t(DType::Q8_0, 49152, 576);
  w.out_norm = t(DType::F32, 1, 576);
  w.lm_head = w.tok_embd;
  for (int l = 0; l < 30; ++l) {
    LayerWeights L;
    L.attn_norm = t(DType::F32, 1, 576);
    L.ffn_norm = L.attn_norm;
    L.wq = t(DType::Q4_1, 576, 576);
    L.wk = t(DType::Q4_1, 192, 576);
    L.wv = L.wk;
    L.wo = L.wq;
    L.w_gate = t(DType::Q4_1, 1536, 576);
    L.w_up = L.w_gate;
    L.w_down = t(DType::Q4_1, 576, 1536);
    w.layers.push_back(L);
  }
  KVCacheConfig kc;
  kc.n_layers = 30;
  kc.n_kv_heads = 3;
  kc.head_dim = 64;
  kc.page_size = 16;
  kc.n_pages = 64 * 70;
  KVCache kv(kc);
  std::vector<StepSequence> batch;
  static int32_t tok[512] = {};
  for (int i = 0; i < 64; ++i) {
    int s = kv.seq_create();
    kv.seq_reserve(s, 1000);
    kv.seq_set_length(s, 1000);
    batch.push_back({s, tok, 1, false});
  }
  PassCounters pc;
  pc.configure(c, w, kc);
  for (int rep = 0; rep < 2; ++rep) {
    auto run = [&](const char* name, std::vector<StepSequence>& b) {
      const int N = 100000;
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < N; ++i) {
        pc.begin_pass(b, kv);
        pc.end_pass();
      }
      double us =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / N * 1e6;
      std::printf("%s: %.3f us per pass\n", name, us);
    };
    run("decode, 64 sequences", batch);
    std::vector<StepSequence> one = {{batch[0].seq, tok, 1, false}};
    run("decode, 1 sequence", one);
    std::vector<StepSequence> pre = {{batch[1].seq, tok, 512, false}};
    run("prefill chunk of 512 tokens", pre);
  }
}
