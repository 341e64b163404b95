// tests/test_paged.cpp — the exact forward over a paged KV cache (paged.hpp): every sequence's
// rows bitwise equal to the plain kernel on its keys copied into one contiguous view (decode and
// chunked prefill, shuffled and consecutive pages, page sizes 1, 16, 48, partial last pages,
// empty sequences, GQA, masks), the float64 oracle, thread invariance, bf16, validation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <cstring>
#include <random>
#include <vector>

#include <polyattn/paged.hpp>

#include "support/compare.hpp"
#include "support/oracles.hpp"
#include "support/tensors.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

struct paged_shape {
  index_t H, Hk, Nq, d, dv, page_size;
  std::vector<index_t> lengths;  // keys of each sequence
};

/// A paged cache holding the sequences of `s` in pages of a shared pool (shuffled, or in order
/// so that runs join), with 3 spare pages, a table padded with -1 past each sequence's pages,
/// and every sequence's keys and values also as contiguous [1, Hk, n, d] tensors.
template <class T, class I = std::int32_t>
struct paged_cache {
  index_t pages = 0, slots = 0;
  std::vector<T> kp, vp;
  std::vector<I> table, lens;
  std::vector<tensor4<T>> k, v;

  paged_cache(const paged_shape& s, bool shuffled, std::uint64_t seed) {
    const index_t ps = s.page_size, B = index_t(s.lengths.size());
    for (index_t n : s.lengths) slots = std::max(slots, (n + ps - 1) / ps + 1);
    for (index_t n : s.lengths) pages += (n + ps - 1) / ps;
    pages += 3;
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> nd;
    kp.resize(std::size_t(pages * ps * s.Hk * s.d));
    vp.resize(std::size_t(pages * ps * s.Hk * s.dv));
    for (T& x : kp) x = T(nd(gen));
    for (T& x : vp) x = T(nd(gen));
    std::vector<I> order(static_cast<std::size_t>(pages));
    std::iota(order.begin(), order.end(), I(0));
    if (shuffled) std::shuffle(order.begin(), order.end(), gen);
    table.assign(std::size_t(B * slots), I(-1));
    std::size_t next = 1;  // (page order[0] stays unused)
    for (index_t b = 0; b < B; ++b) {
      const index_t n = s.lengths[std::size_t(b)];
      lens.push_back(I(n));
      for (index_t sl = 0; sl < (n + ps - 1) / ps; ++sl) table[std::size_t(b * slots + sl)] = order[next++];
      k.emplace_back(1, s.Hk, n, s.d);
      v.emplace_back(1, s.Hk, n, s.dv);
      for (index_t h = 0; h < s.Hk; ++h)
        for (index_t j = 0; j < n; ++j) {
          const index_t row = (index_t(table[std::size_t(b * slots + j / ps)]) * ps + j % ps) * s.Hk + h;
          for (index_t c = 0; c < s.d; ++c) k.back()(0, h, j, c) = kp[std::size_t(row * s.d + c)];
          for (index_t c = 0; c < s.dv; ++c) v.back()(0, h, j, c) = vp[std::size_t(row * s.dv + c)];
        }
    }
  }
  paged_kv<T, I> view(const paged_shape& s) const {
    const index_t B = index_t(lens.size());
    return paged_kv<T, I>{tensor_view<const T, 4>(kp.data(), {pages, s.page_size, s.Hk, s.d}),
                          tensor_view<const T, 4>(vp.data(), {pages, s.page_size, s.Hk, s.dv}),
                          tensor_view<const I, 2>(table.data(), {B, slots}), tensor_view<const I, 1>(lens.data(), {B})};
  }
};

struct mask_case {
  bool causal;
  index_t wl, wr;
  std::vector<index_t> global;
};

const std::vector<mask_case>& mask_cases() {
  static const std::vector<mask_case> m = {
      {false, -1, -1, {}}, {true, -1, -1, {}}, {true, 40, -1, {}}, {false, 20, 5, {0, 33}}};
  return m;
}

template <class O>
O options_of(const mask_case& m, int threads) {
  O o;
  o.causal = m.causal;
  o.window_left = m.wl;
  o.window_right = m.wr;
  o.global_positions = m.global;
  o.threads = threads;
  return o;
}

/// Runs the paged kernel (flash or polynomial) on the whole batch and the plain one on each
/// sequence; requires the same bits for out and stats, and (with `oracle`) the float64 oracle.
template <class T, class I = std::int32_t>
void check_paged(const paged_shape& s, const mask_case& m, bool polynomial, bool shuffled, bool oracle, int threads = 2) {
  const index_t B = index_t(s.lengths.size());
  const paged_cache<T, I> cache(s, shuffled, 7 + std::uint64_t(s.page_size));
  const tensor4<T> q = random_tensor<T>(B, s.H, s.Nq, s.d, 3);
  tensor4<T> out(B, s.H, s.Nq, s.dv);
  std::vector<accum_t<T>> st(std::size_t(B * s.H * s.Nq), accum_t<T>(-7));
  const tensor_view<accum_t<T>, 3> stats(st.data(), {B, s.H, s.Nq});
  const auto so = options_of<softmax_options>(m, threads);
  auto po = options_of<polynomial_options>(m, threads);
  po.scale = 0.3;
  if (polynomial)
    polynomial_attention<T>(q.cview(), cache.view(s), out.view, po, stats);
  else
    flash_attention<T>(q.cview(), cache.view(s), out.view, so, stats);
  for (index_t b = 0; b < B; ++b) {
    const index_t n = s.lengths[std::size_t(b)];
    INFO("sequence " << b << " of " << n << " keys, page size " << s.page_size << ", Nq " << s.Nq << ", causal "
                     << m.causal << ", window " << m.wl << "/" << m.wr << ", globals " << m.global.size()
                     << (polynomial ? ", polynomial" : ", flash") << (shuffled ? ", shuffled" : ", in order"));
    tensor4<T> ref(1, s.H, s.Nq, s.dv);
    std::vector<accum_t<T>> rst(std::size_t(s.H * s.Nq));
    const tensor_view<accum_t<T>, 3> rstats(rst.data(), {1, s.H, s.Nq});
    auto mo = m;  // the sequence's own global positions: those below its length
    mo.global.erase(std::remove_if(mo.global.begin(), mo.global.end(), [&](index_t g) { return g >= n; }), mo.global.end());
    auto pso = options_of<polynomial_options>(mo, 1);
    pso.scale = 0.3;
    const tensor_view<const T, 4> qb = rows_of(q.cview(), 0, s.Nq), qs(&qb(b, 0, 0, 0), {1, s.H, s.Nq, s.d}, qb.strides());
    if (polynomial)
      polynomial_attention<T>(qs, cache.k[std::size_t(b)].cview(), cache.v[std::size_t(b)].cview(), ref.view, pso, rstats);
    else
      flash_attention<T>(qs, cache.k[std::size_t(b)].cview(), cache.v[std::size_t(b)].cview(), ref.view,
                         options_of<softmax_options>(mo, 1), rstats);
    const tensor_view<const T, 4> ob(&out(b, 0, 0, 0), {1, s.H, s.Nq, s.dv}, out.view.strides());
    CHECK(bitwise_equal<T>(ob, ref.cview()));
    CHECK(std::memcmp(&st[std::size_t(b * s.H * s.Nq)], rst.data(), rst.size() * sizeof(accum_t<T>)) == 0);
    if (n == 0) CHECK(max_abs_of<T>(ob) == 0.0);  // (no keys: zero rows; the oracle takes Nk >= 1)
    if (!oracle || n == 0) continue;
    const test_mask tm(mo.causal, mo.wl, mo.wr, mo.global);
    const dense_result x = polynomial ? polynomial_oracle<T>(qs, cache.k[std::size_t(b)].cview(),
                                                             cache.v[std::size_t(b)].cview(), tm, 4, 0.3, 1.0)
                                      : softmax_oracle<T>(qs, cache.k[std::size_t(b)].cview(),
                                                          cache.v[std::size_t(b)].cview(), tm, 1.0 / std::sqrt(double(s.d)));
    const error_summary e = compare<T>(ob, x);
    const double tol = (std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 2e-5 : 2e-2) * (1 + e.max_expected);
    INFO("oracle error " << e.max_abs << " (tolerance " << tol << ")");
    CHECK(e.finite);
    CHECK(e.max_abs <= tol);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("paged: decode and chunked prefill equal the contiguous kernels bit for bit", "[paged]", float, double) {
  for (index_t ps : {1, 16, 48})
    for (index_t nq : {1, 3, 100})
      for (const mask_case& m : mask_cases()) {
        // GQA 4:2; an empty sequence, one key, a partial last page, several pages and blocks
        const paged_shape s{4, 2, nq, 32, 24, ps, {0, 1, 37, 300}};
        check_paged<TestType>(s, m, false, true, ps == 16);
        check_paged<TestType>(s, m, true, true, ps == 16);
      }
}

TEST_CASE("paged: consecutive pages join, int64 tables, long sequences across decode chunks", "[paged]") {
  const paged_shape s{2, 1, 1, 64, 64, 16, {5000, 4097, 100}};  // one head pair; 4096-key chunks
  for (bool shuffled : {false, true}) {
    check_paged<float>(s, mask_cases()[1], false, shuffled, true);
    check_paged<float, std::int64_t>(s, mask_cases()[2], true, shuffled, false);
  }
  const paged_shape prefill{8, 2, 5, 16, 16, 48, {700, 0, 260}};  // Nq = 5: the tiled path, blocks across pages
  check_paged<double, std::int64_t>(prefill, mask_cases()[1], false, false, true);
  check_paged<double, std::int64_t>(prefill, mask_cases()[3], false, true, true);
  // split-KV prefill (Nq <= 192 over more than 4096 keys: 4096-key chunks, pages across their
  // boundaries): the contiguous kernel's bits and the oracle
  const paged_shape split{2, 1, 40, 16, 16, 64, {9000, 5000, 300}};
  check_paged<float>(split, mask_cases()[1], false, true, true);
  check_paged<float>(split, mask_cases()[2], true, true, false);
}

TEST_CASE("paged: the same bits for 1 and 2 threads, sequences in parallel or one after the other", "[paged][threads]") {
  std::vector<index_t> many(12, 90);  // many equal sequences: run in parallel
  many[3] = 0;
  many[5] = 200;
  for (const paged_shape& s : {paged_shape{4, 2, 1, 32, 32, 16, many}, paged_shape{4, 1, 3, 32, 32, 16, {3000, 10}},
                               paged_shape{2, 2, 60, 32, 32, 16, {400, 300, 200, 100}}}) {
    const index_t B = index_t(s.lengths.size());
    const paged_cache<float> cache(s, true, 5);
    const tensor4<float> q = random_tensor<float>(B, s.H, s.Nq, s.d, 9);
    tensor4<float> o1(B, s.H, s.Nq, s.dv), o2 = o1;
    softmax_options so;
    so.causal = true;
    so.threads = 1;
    flash_attention<float>(q.cview(), cache.view(s), o1.view, so);
    so.threads = 2;
    flash_attention<float>(q.cview(), cache.view(s), o2.view, so);
    CHECK(bitwise_equal<float>(o1.cview(), o2.cview()));
  }
}

TEST_CASE("paged: bf16 pages equal the contiguous bf16 kernel and meet the oracle", "[paged][half]") {
  for (index_t nq : {1, 100})
    check_paged<bf16>(paged_shape{4, 1, nq, 32, 32, 16, {0, 77, 300}}, mask_cases()[1], false, true, true);
  check_paged<bf16>(paged_shape{2, 2, 3, 32, 16, 1, {50, 129}}, mask_cases()[2], true, true, false);
}

TEST_CASE("paged: pools whose pages are not consecutive rows never join", "[paged]") {
  // a pool with a gap after every page: [pages, ps, Hk, d] with page stride > ps·Hk·d
  const index_t ps = 4, pages = 6, d = 8, gap = 3;
  std::vector<float> kp(std::size_t(pages * (ps * d + gap))), vp(kp.size()), kc(std::size_t(20 * d)), vc(kc.size());
  std::mt19937 gen(2);
  std::normal_distribution<float> nd;
  for (float& x : kp) x = nd(gen);
  for (float& x : vp) x = nd(gen);
  const std::vector<std::int32_t> table = {0, 1, 2, 3, 4}, lens = {20};
  for (index_t j = 0; j < 20; ++j)
    for (index_t c = 0; c < d; ++c) {
      kc[std::size_t(j * d + c)] = kp[std::size_t((j / ps) * (ps * d + gap) + (j % ps) * d + c)];
      vc[std::size_t(j * d + c)] = vp[std::size_t((j / ps) * (ps * d + gap) + (j % ps) * d + c)];
    }
  const tensor_view<const float, 4> K(kp.data(), {pages, ps, 1, d}, {ps * d + gap, d, d, 1}),
      V(vp.data(), {pages, ps, 1, d}, {ps * d + gap, d, d, 1});
  const paged_kv<float> kv{K, V, tensor_view<const std::int32_t, 2>(table.data(), {1, 5}),
                           tensor_view<const std::int32_t, 1>(lens.data(), {1})};
  for (index_t nq : {1, 7}) {
    const tensor4<float> q = random_tensor<float>(1, 2, nq, d, 4);
    tensor4<float> a(1, 2, nq, d), b = a;
    flash_attention<float>(q.cview(), kv, a.view);
    flash_attention<float>(q.cview(), tensor_view<const float, 4>(kc.data(), {1, 1, 20, d}),
                           tensor_view<const float, 4>(vc.data(), {1, 1, 20, d}), b.view);
    CHECK(bitwise_equal<float>(a.cview(), b.cview()));
  }
}

TEST_CASE("paged: invalid arguments name the function, the argument and the shapes", "[paged][validation]") {
  const paged_shape s{4, 2, 1, 8, 8, 4, {5, 8}};
  paged_cache<float> cache(s, false, 1);
  const tensor4<float> q = random_tensor<float>(2, 4, 1, 8, 2);
  tensor4<float> out(2, 4, 1, 8);
  auto run = [&](const paged_kv<float>& kv, const tensor4<float>& qq, tensor4<float>& oo) {
    flash_attention<float>(qq.cview(), kv, oo.view);
  };
  paged_kv<float> kv = cache.view(s);
  cache.table[1] = 99;  // sequence 0, slot 1
  require_invalid_argument([&] { run(kv, q, out); },
                           {"polyattn::flash_attention", "'block_table' entry [0, 1]", "sequence 0, slot 1", "page 99",
                            "[0, 7)", "'k_pages' [7, 4, 2, 8]"});
  cache.table[1] = -1;
  require_invalid_argument([&] { run(kv, q, out); }, {"entry [0, 1]", "page -1"});
  cache.table[1] = 2;
  cache.lens[1] = 13;  // 4 pages of 4 hold 12 at most... the table has 3 slots
  require_invalid_argument([&] { run(kv, q, out); }, {"'seqlens_k' entry 1 is 13", "3 pages of size 4", "[2, 3]"});
  cache.lens[1] = -2;
  require_invalid_argument([&] { run(kv, q, out); }, {"'seqlens_k' entry 1 is -2"});
  cache.lens[1] = 8;
  paged_kv<float> bad = kv;
  bad.block_table = tensor_view<const std::int32_t, 2>(cache.table.data(), {1, 3});
  require_invalid_argument([&] { run(bad, q, out); },
                           {"batch size mismatch", "'block_table' has shape [1, 3]", "'q' has shape [2, 4, 1, 8]"});
  bad = kv;
  bad.seqlens_k = tensor_view<const std::int32_t, 1>(cache.lens.data(), {3});
  require_invalid_argument([&] { run(bad, q, out); }, {"batch size mismatch", "'seqlens_k' has shape [3]"});
  bad = kv;
  bad.v_pages = tensor_view<const float, 4>(cache.vp.data(), {7, 2, 2, 8});
  require_invalid_argument([&] { run(bad, q, out); }, {"page size mismatch", "'v_pages' has shape [7, 2, 2, 8]"});
  bad.v_pages = tensor_view<const float, 4>(cache.vp.data(), {6, 4, 2, 8});
  require_invalid_argument([&] { run(bad, q, out); }, {"page count mismatch"});
  bad.v_pages = tensor_view<const float, 4>(cache.vp.data(), {7, 4, 1, 8});
  require_invalid_argument([&] { run(bad, q, out); }, {"kv head count mismatch"});
  bad = kv;
  bad.k_pages = tensor_view<const float, 4>(cache.kp.data(), {7, 4, 2, 4});
  require_invalid_argument([&] { run(bad, q, out); }, {"head dim mismatch", "'k_pages' has shape [7, 4, 2, 4]"});
  const tensor4<float> q3 = random_tensor<float>(2, 3, 1, 8, 2);
  tensor4<float> out3(2, 3, 1, 8);
  require_invalid_argument([&] { run(kv, q3, out3); }, {"multiple of the kv head count", "[2, 3, 1, 8]", "[7, 4, 2, 8]"});
  tensor4<float> out_dv(2, 4, 1, 5);
  require_invalid_argument([&] { run(kv, q, out_dv); }, {"value dim mismatch", "'out' has shape [2, 4, 1, 5]"});
  bad = kv;
  bad.k_pages = tensor_view<const float, 4>(cache.kp.data(), {7, 0, 2, 8});
  bad.v_pages = tensor_view<const float, 4>(cache.vp.data(), {7, 0, 2, 8});
  require_invalid_argument([&] { run(bad, q, out); }, {"page size 0"});
  const tensor_view<float, 4> over(cache.kp.data(), {2, 4, 1, 8});  // out over the key pool
  require_invalid_argument([&] { flash_attention<float>(q.cview(), kv, over); }, {"'out'", "overlaps input 'k_pages'"});
  polynomial_options po;
  po.global_positions = {8};  // the longest sequence has 8 keys
  require_invalid_argument([&] { polynomial_attention<float>(q.cview(), kv, out.view, po); },
                           {"polyattn::polynomial_attention", "'global_positions' entry 0 is 8", "[0, 8)"});
  std::vector<float> st(8);
  require_invalid_argument(
      [&] { flash_attention<float>(q.cview(), kv, out.view, {}, tensor_view<float, 3>(st.data(), {2, 4, 2})); },
      {"'stats' has shape [2, 4, 2]"});
}

TEST_CASE("paged: score modifiers (sinks, softcap, ALiBi) give the contiguous kernel's bits", "[paged][modifiers]") {
  // pages of 16 in reverse order; the contiguous kernel with the same modifiers is checked
  // against the float64 oracle in test_modifiers.cpp
  const index_t H = 4, Hk = 2, d = 16, ps = 16, n = 300, pages = n / ps + 1;
  std::mt19937 gen(3);
  std::normal_distribution<float> nd;
  std::vector<float> kp(static_cast<std::size_t>(pages * ps * Hk * d)), vp(kp.size());
  for (float& x : kp) x = nd(gen);
  for (float& x : vp) x = nd(gen);
  std::vector<std::int32_t> table(static_cast<std::size_t>(pages)), lens = {std::int32_t(n)};
  for (index_t i = 0; i < pages; ++i) table[std::size_t(i)] = std::int32_t(pages - 1 - i);
  std::vector<float> kc(static_cast<std::size_t>(Hk * n * d)), vc(kc.size());
  for (index_t h = 0; h < Hk; ++h)
    for (index_t j = 0; j < n; ++j)
      for (index_t c = 0; c < d; ++c) {
        const std::size_t from = std::size_t(((table[std::size_t(j / ps)] * ps + j % ps) * Hk + h) * d + c);
        kc[std::size_t((h * n + j) * d + c)] = kp[from];
        vc[std::size_t((h * n + j) * d + c)] = vp[from];
      }
  softmax_options o;
  o.causal = true;
  o.sinks = {0.5, -1.0, 0.0, 2.0};
  o.softcap = 5.0;
  o.alibi_slopes = {0.5, 0.25, 0.125, 0.0625};
  const paged_kv<float> kv{{kp.data(), {pages, ps, Hk, d}}, {vp.data(), {pages, ps, Hk, d}}, {table.data(), {1, pages}},
                           {lens.data(), {1}}};
  for (const index_t nq : {index_t(1), index_t(3), index_t(60)}) {
    INFO("Nq = " << nq);
    std::vector<float> q(static_cast<std::size_t>(H * nq * d)), paged(q.size()), plain(q.size());
    for (float& x : q) x = nd(gen);
    const tensor_view<const float, 4> Q(q.data(), {1, H, nq, d});
    flash_attention<float>(Q, kv, {paged.data(), {1, H, nq, d}}, o);
    flash_attention<float>(Q, tensor_view<const float, 4>(kc.data(), {1, Hk, n, d}),
                           tensor_view<const float, 4>(vc.data(), {1, Hk, n, d}), {plain.data(), {1, H, nq, d}}, o);
    CHECK(std::memcmp(paged.data(), plain.data(), paged.size() * sizeof(float)) == 0);
    softmax_options none = o;
    none.sinks.clear();
    flash_attention<float>(Q, kv, {plain.data(), {1, H, nq, d}}, none);
    CHECK(std::memcmp(paged.data(), plain.data(), paged.size() * sizeof(float)) != 0);  // the sinks took effect
  }
}
