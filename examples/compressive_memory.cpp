// examples/compressive_memory.cpp — Compressive Transformer steps (Rae et al., 2020) on polyattn's
// exact kernel with segmented keys and values.
//
// A layer attends from the current chunk of n tokens to [compressed memory | memory | chunk].
// The memory (the last m tokens' keys and values) lives in a ring buffer, so in sequence order
// it is two pieces of one buffer; the compressed memory is a second ring buffer. Each step
// attends to those four pieces and the chunk as segments — nothing is copied — then the oldest
// n memory rows are pooled by compress_memory (rate c) into the compressed memory and the chunk
// takes their place. A training step sends the gradients of every segment back through the
// same views; compress_memory_backward maps the compressed rows' gradients to the rows they
// pooled (in the paper old memories are detached; a model may or may not do this).
//
// The example checks each step against flash_attention on an explicitly concatenated copy.
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

namespace {

using view = polyattn::tensor_view<float, 4>;
using cview = polyattn::tensor_view<const float, 4>;
constexpr std::int64_t B = 1, H = 4, d = 64;  // batch, heads, head dim
constexpr std::int64_t n = 128;               // chunk length
constexpr std::int64_t m = 512;               // memory length (a multiple of n)
constexpr std::int64_t c = 4;                 // compression rate
constexpr std::int64_t cm = 256;              // compressed memory length (a multiple of n / c)

/// A [B, H, capacity, d] ring buffer of rows; `rows(first, count)` views rows in buffer order.
struct ring {
  std::int64_t capacity, head = 0, size = 0;  // the oldest row is at head
  std::vector<float> data;
  explicit ring(std::int64_t cap) : capacity(cap), data(static_cast<std::size_t>(B * H * cap * d), 0.0f) {}
  view rows(std::int64_t first, std::int64_t count) {
    return view(data.data() + first * d, {B, H, count, d}, {H * capacity * d, capacity * d, d, 1});
  }
  /// The valid rows in sequence order: up to two pieces (the ring wraps around).
  std::vector<view> pieces() {
    const std::int64_t first = std::min(size, capacity - head);
    return {rows(head, first), rows(0, size - first)};
  }
  /// Appends `count` rows given by `fill(destination view)`, dropping the oldest when full.
  template <class Fill>
  void push(std::int64_t count, Fill fill) {
    const std::int64_t tail = (head + size) % capacity;  // count divides capacity: no wrap inside
    fill(rows(tail, count));
    if (size + count <= capacity) size += count;
    else head = (head + count) % capacity;
  }
};

void copy_rows(cview from, view to) {
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < from.extent(2); ++i)
        for (std::int64_t x = 0; x < d; ++x) to(b, h, i, x) = from(b, h, i, x);
}

}  // namespace

int main() {
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  ring mem_k(m), mem_v(m), cmem_k(cm), cmem_v(cm);
  std::vector<float> q(B * H * n * d), k(q.size()), v(q.size()), out(q.size()), ref(q.size());
  const view Q(q.data(), {B, H, n, d}), K(k.data(), {B, H, n, d}), V(v.data(), {B, H, n, d}), O(out.data(), {B, H, n, d});
  polyattn::softmax_options causal;  // causal over the total length: the chunk sees all memories
  causal.causal = true;
  double worst = 0;
  for (int step = 0; step < 12; ++step) {
    for (auto* t : {&q, &k, &v})
      for (float& x : *t) x = normal(gen);

    // ---- attend to [compressed memory | memory | chunk] as segments, nothing copied
    std::vector<view> ks = cmem_k.pieces(), vs = cmem_v.pieces();
    for (const view& p : mem_k.pieces()) ks.push_back(p);
    for (const view& p : mem_v.pieces()) vs.push_back(p);
    ks.push_back(K);
    vs.push_back(V);
    const polyattn::segmented_view<float> keys(ks), values(vs);
    std::vector<float> lse(B * H * n);
    const polyattn::tensor_view<float, 3> stats(lse.data(), {B, H, n});
    polyattn::flash_attention<float>(Q, keys, values, O, causal, stats);

    // ---- the same attention on an explicit concatenation, for the check
    const std::int64_t total = keys.length();
    std::vector<float> kc(B * H * total * d), vc(kc.size());
    const view KC(kc.data(), {B, H, total, d}), VC(vc.data(), {B, H, total, d});
    std::int64_t at = 0;
    for (std::size_t s = 0; s < ks.size(); ++s) {
      const std::int64_t len = ks[s].extent(2);
      copy_rows(ks[s], view(kc.data() + at * d, {B, H, len, d}, KC.strides()));
      copy_rows(vs[s], view(vc.data() + at * d, {B, H, len, d}, VC.strides()));
      at += len;
    }
    polyattn::flash_attention<float>(Q, KC, VC, view(ref.data(), {B, H, n, d}), causal);
    double err = 0;
    for (std::size_t i = 0; i < out.size(); ++i) err = std::max(err, double(std::abs(out[i] - ref[i])));
    worst = std::max(worst, err);

    // ---- a training step: gradients of every segment through the same views
    std::vector<float> dout(out.size(), 1.0f / float(out.size())), dq(q.size());
    std::vector<std::vector<float>> grads;  // one buffer per segment gradient (dk, dv)
    std::vector<view> dks, dvs;
    for (const view& p : ks) {
      for (int which = 0; which < 2; ++which) {
        grads.emplace_back(static_cast<std::size_t>(B * H * p.extent(2) * d));
        (which == 0 ? dks : dvs).push_back(view(grads.back().data(), {B, H, p.extent(2), d}));
      }
    }
    polyattn::flash_attention_backward<float>(Q, keys, values, O, view(dout.data(), {B, H, n, d}), stats,
                                              view(dq.data(), {B, H, n, d}), polyattn::segmented_view<float>(dks),
                                              polyattn::segmented_view<float>(dvs), causal);

    std::printf("step %2d: %lld keys in %zu segments (compressed %lld, memory %lld, chunk %lld), "
                "max |segmented - concatenated| = %.2e\n",
                step, static_cast<long long>(total), ks.size(), static_cast<long long>(cmem_k.size),
                static_cast<long long>(mem_k.size), static_cast<long long>(n), err);

    // ---- move the oldest n memory rows into the compressed memory, the chunk into the memory
    if (mem_k.size == m) {
      for (const auto& pair : {std::pair<ring*, ring*>{&mem_k, &cmem_k}, std::pair<ring*, ring*>{&mem_v, &cmem_v}}) {
        ring* mem = pair.first;
        pair.second->push(n / c, [&](view dst) {
          polyattn::compress_memory<float>(mem->rows(mem->head, n), c, polyattn::pooling::mean, dst);
        });
      }
    }
    mem_k.push(n, [&](view dst) { copy_rows(K, dst); });
    mem_v.push(n, [&](view dst) { copy_rows(V, dst); });
  }
  // In a training step the compressed rows' gradients map back to the rows they pooled:
  std::vector<float> dc(B * H * (n / c) * d, 1.0f), dmem(B * H * n * d);
  polyattn::compress_memory_backward<float>(mem_k.rows(mem_k.head, n), c, polyattn::pooling::mean,
                                            view(dc.data(), {B, H, n / c, d}), view(dmem.data(), {B, H, n, d}));
  std::printf("compress_memory_backward: each pooled row gets dout / %lld = %.3f\n", static_cast<long long>(c), dmem[0]);
  if (worst > 1e-5 || std::abs(dmem[0] - 1.0f / float(c)) > 1e-6f) return 1;
  return 0;
}
