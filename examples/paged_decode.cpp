// examples/paged_decode.cpp — the README's paged KV cache example: two sequences whose keys and
// values live in pages of one shared pool (vLLM-style block tables), a chunked prefill of 64
// tokens and then decode steps, each checked against the plain kernel on the sequence's keys
// copied into one contiguous buffer (the same bits are expected).
#include <polyattn/polyattn.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

int main() {
  const std::int64_t B = 2, H = 8, Hk = 2, d = 64, page = 16, num_pages = 64, max_pages = 24;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> k_pool(num_pages * page * Hk * d), v_pool(k_pool.size());
  for (auto* t : {&k_pool, &v_pool})
    for (float& x : *t) x = normal(gen);
  // Sequence 0 owns pages 5, 6, 1, ...; sequence 1 pages 40, 3, ... (any order, any pages).
  std::vector<std::int32_t> block_table(B * max_pages), seqlens = {300, 41};
  for (std::int64_t s = 0; s < max_pages; ++s) {
    block_table[s] = std::int32_t((5 + 7 * s) % 32);
    block_table[max_pages + s] = std::int32_t(32 + (8 + 5 * s) % 32);
  }

  // A paged cache: pools [num_pages, page_size, Hk, d], block table [B, max_pages], key lengths [B].
  using cview = polyattn::tensor_view<const float, 4>;
  const polyattn::paged_kv<float> cache{cview(k_pool.data(), {num_pages, page, Hk, d}),
                                        cview(v_pool.data(), {num_pages, page, Hk, d}),
                                        {block_table.data(), {B, max_pages}}, {seqlens.data(), {B}}};
  // Chunked prefill: each sequence's last 64 keys are new; its 64 queries attend causally
  // (bottom-right: query i sits at position seqlens[b] − 64 + i).
  const std::int64_t Nq = 64;
  std::vector<float> q(B * H * Nq * d), out(B * H * Nq * d);
  for (float& x : q) x = normal(gen);
  polyattn::softmax_options causal;
  causal.causal = true;
  polyattn::flash_attention<float>(cview(q.data(), {B, H, Nq, d}), cache, {out.data(), {B, H, Nq, d}}, causal);

  // The same rows from the plain kernel on contiguous copies of each sequence's keys.
  int bad = 0;
  auto check = [&](std::int64_t nq) {
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = seqlens[b];
      std::vector<float> k(Hk * n * d), v(k.size()), ref(H * nq * d);
      for (std::int64_t h = 0; h < Hk; ++h)
        for (std::int64_t j = 0; j < n; ++j) {
          const std::int64_t row = (block_table[b * max_pages + j / page] * page + j % page) * Hk + h;
          std::memcpy(&k[(h * n + j) * d], &k_pool[row * d], d * sizeof(float));
          std::memcpy(&v[(h * n + j) * d], &v_pool[row * d], d * sizeof(float));
        }
      polyattn::flash_attention<float>(cview(q.data() + b * H * nq * d, {1, H, nq, d}), cview(k.data(), {1, Hk, n, d}),
                                       cview(v.data(), {1, Hk, n, d}), {ref.data(), {1, H, nq, d}}, causal);
      bad += std::memcmp(ref.data(), out.data() + b * H * nq * d, ref.size() * sizeof(float)) != 0;
    }
  };
  check(Nq);

  // Decode steps: one query a sequence; the engine appends each new key and value to the
  // sequence's last page (a new page every 16 tokens) and bumps its length.
  for (int step = 0; step < 20; ++step) {
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t j = seqlens[b]++;
      const std::int64_t row = (block_table[b * max_pages + j / page] * page + j % page) * Hk;
      for (std::int64_t c = 0; c < Hk * d; ++c) {
        k_pool[row * d + c] = normal(gen);
        v_pool[row * d + c] = normal(gen);
      }
    }
    for (std::int64_t i = 0; i < B * H * d; ++i) q[i] = normal(gen);
    polyattn::flash_attention<float>(cview(q.data(), {B, H, 1, d}), cache, {out.data(), {B, H, 1, d}}, causal);
    check(1);
  }
  std::printf("paged prefill and 20 decode steps over %d and %d keys: %s\n", int(seqlens[0]), int(seqlens[1]),
              bad == 0 ? "the same bits as the contiguous kernel" : "DIFFERENT from the contiguous kernel");
  return bad == 0 ? 0 : 1;
}
