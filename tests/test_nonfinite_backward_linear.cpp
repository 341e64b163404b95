// tests/test_nonfinite_backward_linear.cpp — the linear family's backward passes
// (linear_attention_backward, polysketch_attention_backward with and without local_exact,
// sketched_attention_backward) with a non-finite input, and with subnormal denominators.
//
// Causal policy: a non-finite value reaches exactly the gradients whose terms it enters.
//   - a key's k, v (or feature / sketch) entry: the out, stats and query-side gradients of the
//     rows that cannot see the key (position i + Nk − Nq < j) keep their bits, and so does
//     every row of the other (batch, kv head) sequences;
//   - a query's q (or feature / sketch) or dout entry: every other query row keeps its bits,
//     and so do the key-side gradients of the keys that row cannot see (position > the row's).
// A masked pair's weight and weight gradient are 0 and 0 · NaN = NaN: the own block's pair
// products (dq += dW·K, dk += dWᵀ·Q, dv += Wᵀ·G) must not multiply a masked 0 by a later key's
// row or by an earlier query's row. Each check poisons one entry, runs forward and backward,
// and compares every row bitwise with the finite run (1 thread) at 1 or 2 threads.
//
// Subnormal denominators: with β = 0 and tiny features every den_i is subnormal, 1/den_i
// overflows and g_i = dout_i / den_i would be inf, while every true gradient is finite; the
// results are compared with long double oracles.
#include <polyattn/linear.hpp>
#include <polyattn/polysketch.hpp>
#include <polyattn/sketched.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "support/backward_battery.hpp"
#include "support/compare.hpp"
#include "support/linear_backward_oracle.hpp"
#include "support/linear_battery.hpp"
#include "support/nonfinite.hpp"
#include "support/sketched_backward_oracle.hpp"
#include "support/tensors.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

struct shape_case {
  index_t batch, heads, kv_heads, nq, nk, d, dv, block;
};

// several 16-key blocks; Nq < Nk with the first query inside a block; batch, GQA and a partial
// last block; then 256-key blocks (linear_attention's only block size; the other families,
// whose pair products are the same code, take the 16-key shapes only): one block of 100 keys
// (the backward's query chunks of 64 rows), two blocks with Nq < Nk
const shape_case kShapes[] = {{1, 1, 1, 40, 40, 8, 8, 16},
                              {1, 1, 1, 20, 50, 8, 5, 16},
                              {2, 4, 2, 37, 37, 6, 9, 16},
                              {1, 1, 1, 100, 100, 8, 8, 256},
                              {1, 1, 1, 280, 300, 6, 5, 256}};

/// Positions to poison: block edges (16, 256), the 64-row chunk edges, the middle and the last.
std::vector<index_t> positions(index_t nk) {
  std::vector<index_t> out;
  for (index_t p : {index_t(0), index_t(15), index_t(16), index_t(31), index_t(32), index_t(63), index_t(64),
                    index_t(255), index_t(256), nk / 2, nk - 1})
    if (p < nk && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  return out;
}

/// One call's inputs and results. Query-side inputs have a row per query (φq; q; q and s(q)),
/// key-side inputs a row per key (φk, v; k, v; k, s(k), v); the gradients have their shapes.
template <class T>
struct grad_case {
  shape_case s;
  std::vector<tensor4<T>> qin, kin;
  std::vector<std::string> qnames, knames;
  tensor4<T> dout, out, stats;  // stats [B, H, Nq, 1]
  std::vector<tensor4<T>> dqs, dks;
  int threads = 1;

  tensor_view<T, 3> stats_view() { return tensor_view<T, 3>(stats.storage.data(), {s.batch, s.heads, s.nq}); }
  tensor_view<const T, 3> stats_cview() const {
    return tensor_view<const T, 3>(stats.storage.data(), {s.batch, s.heads, s.nq});
  }
  /// Fresh outputs shaped like the inputs, every element NaN (an unwritten one is caught).
  void reset_outputs() {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    out = tensor4<T>(s.batch, s.heads, s.nq, s.dv);
    stats = tensor4<T>(s.batch, s.heads, s.nq, 1);
    dqs.clear();
    dks.clear();
    for (const tensor4<T>& x : qin) dqs.emplace_back(x.view.extent(0), x.view.extent(1), x.view.extent(2), x.view.extent(3));
    for (const tensor4<T>& x : kin) dks.emplace_back(x.view.extent(0), x.view.extent(1), x.view.extent(2), x.view.extent(3));
    for (tensor4<T>* t : {&out, &stats}) std::fill(t->storage.begin(), t->storage.end(), nan);
    for (std::vector<tensor4<T>>* g : {&dqs, &dks})
      for (tensor4<T>& t : *g) std::fill(t.storage.begin(), t.storage.end(), nan);
  }
};

/// A family under test: builds the inputs of a shape and runs forward and backward.
template <class T>
struct family {
  std::string name;
  std::function<grad_case<T>(const shape_case&)> make;
  std::function<void(grad_case<T>&)> run;
  bool blocks_of_256 = false;  // also the shapes with 256-key blocks (linear_attention's only block size)
  /// Whether entry `input` of the query side (`query`) or the key side at position `pos` is read
  /// at all (a check that the poisoned value reached some result).
  std::function<bool(std::size_t input, bool query, const shape_case&, index_t pos)> read =
      [](std::size_t, bool, const shape_case&, index_t) { return true; };
};

/// Rows of a and b that may not change must be bitwise equal; returns the number of non-finite
/// elements of b in rows that may.
template <class T, class May>
index_t compare_rows(const std::string& what, const tensor4<T>& a, const tensor4<T>& b, const May& may_change) {
  index_t reached = 0, changed = 0, first_b = 0, first_h = 0, first_i = 0;
  for (index_t x = 0; x < a.view.extent(0); ++x)
    for (index_t h = 0; h < a.view.extent(1); ++h)
      for (index_t i = 0; i < a.view.extent(2); ++i) {
        bool same = true;
        index_t bad = 0;
        for (index_t c = 0; c < a.view.extent(3); ++c) {
          const T ea = a(x, h, i, c), eb = b(x, h, i, c);
          same = same && std::memcmp(&ea, &eb, sizeof(T)) == 0;
          if (!std::isfinite(static_cast<double>(eb))) ++bad;
        }
        if (may_change(x, h, i))
          reached += bad;
        else if (!same && changed++ == 0) {
          first_b = x;
          first_h = h;
          first_i = i;
        }
      }
  if (changed > 0)
    FAIL_CHECK(what << ": " << changed << " rows changed that may not, the first row " << first_i << " (batch "
                    << first_b << ", head " << first_h << ")");
  return reached;
}

/// Every input entry of every kind, one at a time, NaN and +inf in turn (see the file header).
template <class T>
void check_family(const family<T>& fam) {
  for (const shape_case& s : kShapes) {
    if (s.block > 16 && !fam.blocks_of_256) continue;  // (sanitizer time: linear_attention has them)
    grad_case<T> ref = fam.make(s);
    ref.reset_outputs();
    fam.run(ref);
    REQUIRE(all_finite(ref.out));
    for (const auto* g : {&ref.dqs, &ref.dks})
      for (const tensor4<T>& t : *g) REQUIRE(all_finite(t));
    const index_t group = s.heads / s.kv_heads, off = s.nk - s.nq;
    const index_t bp = s.batch - 1, hkp = s.kv_heads - 1, hp = s.heads - 1;  // the poisoned sequence
    int count = 0;
    auto poisoned_run = [&](grad_case<T>& in, tensor4<T>& x, index_t row, const std::string& what) {
      const T bad = count % 2 ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::quiet_NaN();
      x(bp, x.view.extent(1) - 1, row, row % x.view.extent(3)) = bad;  // the last head (query or kv)
      in.threads = count % 3 == 2 ? 2 : 1;  // (2 threads for a third: NaN and inf in turn; sanitizer time)
      ++count;
      in.reset_outputs();
      fam.run(in);
      return std::string(fam.name) + " B=" + std::to_string(s.batch) + " H=" + std::to_string(s.heads) +
             " Hk=" + std::to_string(s.kv_heads) + " Nq=" + std::to_string(s.nq) + " Nk=" + std::to_string(s.nk) +
             " block=" + std::to_string(s.block) + " threads=" + std::to_string(in.threads) + ": " + what + " row " +
             std::to_string(row) + " = " + (std::isnan(bad) ? "NaN" : "inf");
    };
    // a key's entry: the rows before its position and the other sequences keep their bits
    for (std::size_t x = 0; x < ref.kin.size(); ++x)
      for (index_t j : positions(s.nk)) {
        grad_case<T> in = fam.make(s);
        const std::string what = poisoned_run(in, in.kin[x], j, ref.knames[x]);
        INFO(what);
        auto q_may = [&](index_t b, index_t h, index_t i) { return b == bp && h / group == hkp && i + off >= j; };
        auto k_may = [&](index_t b, index_t hk, index_t) { return b == bp && hk == hkp; };
        index_t reached = compare_rows("out", ref.out, in.out, q_may) + compare_rows("stats", ref.stats, in.stats, q_may);
        for (std::size_t g = 0; g < ref.dqs.size(); ++g)
          reached += compare_rows("d" + ref.qnames[g], ref.dqs[g], in.dqs[g], q_may);
        for (std::size_t g = 0; g < ref.dks.size(); ++g) compare_rows("d" + ref.knames[g], ref.dks[g], in.dks[g], k_may);
        if (fam.read(x, false, s, j)) CHECK(reached > 0);  // the value was read
      }
    // a query's entry (or its dout): the other rows and the keys after its position keep their bits
    for (std::size_t x = 0; x <= ref.qin.size(); ++x)
      for (index_t p : positions(s.nk)) {
        const index_t i = p - off;
        if (i < 0) continue;
        grad_case<T> in = fam.make(s);
        const bool is_dout = x == ref.qin.size();
        const std::string what = poisoned_run(in, is_dout ? in.dout : in.qin[x], i, is_dout ? "dout" : ref.qnames[x]);
        INFO(what);
        auto q_may = [&](index_t b, index_t h, index_t r) { return b == bp && h == hp && r == i; };
        auto k_may = [&](index_t b, index_t hk, index_t l) { return b == bp && hk == hp / group && l <= p; };
        index_t reached = compare_rows("out", ref.out, in.out, q_may) + compare_rows("stats", ref.stats, in.stats, q_may);
        for (std::size_t g = 0; g < ref.dqs.size(); ++g)
          reached += compare_rows("d" + ref.qnames[g], ref.dqs[g], in.dqs[g], q_may);
        for (std::size_t g = 0; g < ref.dks.size(); ++g)
          reached += compare_rows("d" + ref.knames[g], ref.dks[g], in.dks[g], k_may);
        if (is_dout || fam.read(x, true, s, p)) CHECK(reached > 0);
      }
  }
}

template <class T>
family<T> linear_family(double bias) {
  family<T> f;
  f.name = "linear_attention_backward bias=" + std::to_string(bias);
  f.make = [](const shape_case& s) {
    grad_case<T> c;
    c.s = s;
    c.qin = {random_features<T>(s.batch, s.heads, s.nq, s.d, 71, false)};
    c.kin = {random_features<T>(s.batch, s.kv_heads, s.nk, s.d, 72, false),
             random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, 73)};
    c.qnames = {"phi_q"};
    c.knames = {"phi_k", "v"};
    c.dout = random_tensor<T>(s.batch, s.heads, s.nq, s.dv, 74);
    return c;
  };
  f.run = [bias](grad_case<T>& c) {
    linear_options o;
    o.causal = true;
    o.normalizer_bias = bias;
    o.threads = c.threads;
    linear_attention<T>(c.qin[0].view, c.kin[0].view, c.kin[1].view, c.out.view, o, c.stats_view());
    linear_attention_backward<T>(c.qin[0].view, c.kin[0].view, c.kin[1].view, c.out.view, c.dout.view,
                                 c.stats_cview(), c.dqs[0].view, c.dks[0].view, c.dks[1].view, o);
  };
  f.blocks_of_256 = true;
  return f;
}

}  // namespace

TEMPLATE_TEST_CASE("linear_attention_backward: a non-finite input reaches only the gradients it enters",
                   "[linear][backward][causal][nonfinite]", float, double) {
  check_family<TestType>(linear_family<TestType>(0.0));  // (β = 1: the sketch families below)
}

namespace {

template <class T>
family<T> polysketch_family(bool local_exact) {
  family<T> f;
  f.name = std::string("polysketch_attention_backward local_exact=") + (local_exact ? "1" : "0");
  f.make = [](const shape_case& s) {
    grad_case<T> c;
    c.s = s;
    const double sigma = 1.0 / std::sqrt(double(s.d));
    c.qin = {random_tensor<T>(s.batch, s.heads, s.nq, s.d, 81, false, sigma)};
    c.kin = {random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, 82, false, sigma),
             random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, 83)};
    c.qnames = {"q"};
    c.knames = {"k", "v"};
    c.dout = random_tensor<T>(s.batch, s.heads, s.nq, s.dv, 84);
    return c;
  };
  f.run = [local_exact](grad_case<T>& c) {
    sketch_options so;
    so.sketch_size = 8;
    so.seed = 3;
    const polysketch<T> sketch(c.s.d, so);
    polysketch_options o;
    o.causal = true;
    o.local_exact = local_exact;
    o.block_size = c.s.block;
    o.threads = c.threads;
    polysketch_attention<T>(c.qin[0].view, c.kin[0].view, c.kin[1].view, c.out.view, sketch, o, c.stats_view());
    polysketch_attention_backward<T>(c.qin[0].view, c.kin[0].view, c.kin[1].view, c.out.view, c.dout.view,
                                     c.stats_cview(), c.dqs[0].view, c.dks[0].view, c.dks[1].view, sketch, o);
  };
  return f;
}

template <class T>
family<T> sketched_family(bool local_exact) {
  family<T> f;
  f.name = std::string("sketched_attention_backward local_exact=") + (local_exact ? "1" : "0");
  f.make = [](const shape_case& s) {
    grad_case<T> c;
    c.s = s;
    const double sigma = 1.0 / std::sqrt(double(s.d));
    c.qin = {random_tensor<T>(s.batch, s.heads, s.nq, s.d, 91, false, sigma),
             random_tensor<T>(s.batch, s.heads, s.nq, 5, 92, false, 0.5)};
    c.kin = {random_tensor<T>(s.batch, s.kv_heads, s.nk, s.d, 93, false, sigma),
             random_tensor<T>(s.batch, s.kv_heads, s.nk, 5, 94, false, 0.5),
             random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, 95)};
    c.qnames = {"q", "sq"};
    c.knames = {"k", "sk", "v"};
    c.dout = random_tensor<T>(s.batch, s.heads, s.nq, s.dv, 96);
    return c;
  };
  f.run = [local_exact](grad_case<T>& c) {
    sketched_options o;
    o.causal = true;
    o.local_exact = local_exact;
    o.block_size = c.s.block;
    o.threads = c.threads;
    sketched_attention<T>(c.qin[0].view, c.kin[0].view, c.qin[1].view, c.kin[1].view, c.kin[2].view, c.out.view, o,
                          c.stats_view());
    sketched_attention_backward<T>(c.qin[0].view, c.kin[0].view, c.qin[1].view, c.kin[1].view, c.kin[2].view,
                                   c.out.view, c.dout.view, c.stats_cview(), c.dqs[0].view, c.dks[0].view,
                                   c.dqs[1].view, c.dks[1].view, c.dks[2].view, o);
  };
  // q and k enter only the exact local weights (a key: when a query of its block sees it); with
  // those, s(q) and s(k) only the pairs of different blocks (a query after the first block, a
  // key before the last query's block)
  f.read = [local_exact](std::size_t input, bool query, const shape_case& s, index_t pos) {
    const index_t first_query = s.nk - s.nq;
    if (input == 0) return local_exact && (query || std::max(pos, first_query) / s.block == pos / s.block);
    if (input == 2 || !local_exact) return true;
    return query ? pos >= s.block : pos / s.block < (s.nk - 1) / s.block;
  };
  return f;
}

}  // namespace

TEMPLATE_TEST_CASE("polysketch_attention_backward: a non-finite input reaches only the gradients it enters",
                   "[polysketch][backward][causal][nonfinite]", float, double) {
  for (bool local_exact : {false, true}) check_family<TestType>(polysketch_family<TestType>(local_exact));
}

TEMPLATE_TEST_CASE("sketched_attention_backward: a non-finite input reaches only the gradients it enters",
                   "[sketched][backward][causal][nonfinite]", float, double) {
  for (bool local_exact : {false, true}) check_family<TestType>(sketched_family<TestType>(local_exact));
}

namespace {

/// c·|1 + 0.2·N(0, 1)| in every entry: weights of one sign and size.
template <class T>
tensor4<T> tiny_positive(index_t b, index_t h, index_t n, index_t d, double c, std::uint64_t seed) {
  tensor4<T> t = random_tensor<T>(b, h, n, d, seed, false, 0.2);
  for (T& e : t.storage) e = static_cast<T>(c * std::abs(1.0 + static_cast<double>(e)));
  return t;
}

/// A gradient against the long double oracle: finite, and within `tolerance` × its magnitude.
template <class T>
void check_gradient(const std::string& name, const tensor4<T>& got, const dense_result& want, double tolerance) {
  const error_summary e = compare<T>(got.cview(), want);
  const double magnitude = max_abs_value(want);
  INFO(name << ": error " << e.max_abs << ", magnitude " << magnitude);
  CHECK(e.finite);
  CHECK(e.max_abs <= tolerance * magnitude);
}

/// The case: g_i = dout_i / den_i or c_i = −dout_i·out_i / den_i (the oracle's den and
/// out) overflows T for some row. Returns the largest den.
template <class T>
double check_g_overflows(const tensor4<T>& dout, const dense_gradients& g) {
  double largest = 0, ratio = 0;
  const tensor_view<const T, 4> d = dout.cview();
  for (index_t b = 0; b < d.extent(0); ++b)
    for (index_t h = 0; h < d.extent(1); ++h)
      for (index_t i = 0; i < d.extent(2); ++i) {
        const double den = g.stats[static_cast<std::size_t>((b * d.extent(1) + h) * d.extent(2) + i)];
        largest = std::max(largest, den);
        double dot = 0;
        for (index_t c = 0; c < d.extent(3); ++c) {
          ratio = std::max(ratio, std::abs(double(d(b, h, i, c))) / den);
          dot += double(d(b, h, i, c)) * g.out(b, h, i, c);
        }
        ratio = std::max(ratio, std::abs(dot) / den);
      }
  INFO("largest |g|, |c| " << ratio);
  CHECK(ratio > static_cast<double>(std::numeric_limits<T>::max()));
  return largest;
}

}  // namespace

TEMPLATE_TEST_CASE("linear_attention_backward with subnormal denominators", "[linear][backward][subnormal]", float,
                   double) {
  // β = 0 and features ≈ 5e-21 (float) or 1e-160 (double): each w_ij = φq_i·φk_j is ~1e-40 or
  // ~1e-320 and the denominators are subnormal (or barely normal), so g = dout / den or
  // c = −dout·out / den overflows, while p_ij = w_ij / den_i is O(1) and every true gradient is
  // finite (|dφ| ~ 1/c, |dv| ≤ 4). The long double oracle holds the weights as normal numbers;
  // the kernel's forward rounds each subnormal product to a multiple of T's denorm_min, 6e-5
  // (float) or 5e-4 (double) of a product: the tolerance is 20 times that, relative to each
  // result's magnitude.
  using T = TestType;
  const bool is_float = std::is_same_v<T, float>;
  const double c = is_float ? 5e-21 : 1e-160, tolerance = is_float ? 1e-3 : 1e-2;
  const shape_case shapes[] = {{1, 2, 1, 40, 40, 3, 3, 256}, {1, 1, 1, 24, 40, 3, 3, 256}, {1, 1, 1, 260, 260, 2, 3, 256}};
  for (const shape_case& s : shapes)
    for (bool causal : {true, false}) {
      if (s.nk > 256 && !causal) continue;  // (two blocks matter to the causal scans only)
      INFO("Nq=" << s.nq << " Nk=" << s.nk << " causal=" << causal);
      tensor4<T> pq = tiny_positive<T>(s.batch, s.heads, s.nq, s.d, c, 101);
      tensor4<T> pk = tiny_positive<T>(s.batch, s.kv_heads, s.nk, s.d, c, 102);
      tensor4<T> v = random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, 103);
      tensor4<T> dout = random_tensor<T>(s.batch, s.heads, s.nq, s.dv, 104);
      tensor4<T> out(s.batch, s.heads, s.nq, s.dv), dpq(s.batch, s.heads, s.nq, s.d), dpk(s.batch, s.kv_heads, s.nk, s.d),
          dv(s.batch, s.kv_heads, s.nk, s.dv);
      tensor3<T> stats(s.batch, s.heads, s.nq);
      linear_options o;
      o.causal = causal;
      o.threads = 2;
      linear_attention<T>(pq.view, pk.view, v.view, out.view, o, stats.view);
      linear_attention_backward<T>(pq.view, pk.view, v.view, out.view, dout.view, stats.cview(), dpq.view, dpk.view,
                                   dv.view, o);
      const dense_gradients exact =
          linear_gradients_oracle<T, long double>(pq.cview(), pk.cview(), v.cview(), dout.cview(), causal, 0.0);
      INFO("largest den " << check_g_overflows<T>(dout, exact));
      check_gradient<T>("out", out, exact.out, tolerance);
      check_gradient<T>("dphi_q", dpq, exact.dq, tolerance);
      check_gradient<T>("dphi_k", dpk, exact.dk, tolerance);
      check_gradient<T>("dv", dv, exact.dv, tolerance);
    }
}

TEMPLATE_TEST_CASE("sketched_attention_backward with subnormal denominators", "[sketched][backward][subnormal]",
                   float, double) {
  // β = 0, sketches ≈ 1e-10 (float) or 1e-80 (double): w_ij = (sq_i·sk_j)² ~ 1e-40 or 1e-320;
  // with local_exact, q and k ≈ 5e-6 or 5e-41 give (q_i·k_j)^4 of the same size (d = 4). The
  // tolerances of the test above (these weights are products of normal numbers, rounded once).
  using T = TestType;
  const bool is_float = std::is_same_v<T, float>;
  const double cs = is_float ? 1e-10 : 1e-80, cq = is_float ? 5e-6 : 5e-41, tolerance = is_float ? 1e-3 : 1e-2;
  const shape_case s{1, 2, 1, 40, 40, 4, 3, 16};
  for (bool local_exact : {false, true}) {
    INFO("local_exact=" << local_exact);
    tensor4<T> q = tiny_positive<T>(s.batch, s.heads, s.nq, s.d, cq, 111);
    tensor4<T> k = tiny_positive<T>(s.batch, s.kv_heads, s.nk, s.d, cq, 112);
    tensor4<T> sq = tiny_positive<T>(s.batch, s.heads, s.nq, 3, cs, 113);
    tensor4<T> sk = tiny_positive<T>(s.batch, s.kv_heads, s.nk, 3, cs, 114);
    tensor4<T> v = random_tensor<T>(s.batch, s.kv_heads, s.nk, s.dv, 115);
    tensor4<T> dout = random_tensor<T>(s.batch, s.heads, s.nq, s.dv, 116);
    tensor4<T> out(s.batch, s.heads, s.nq, s.dv), dq(s.batch, s.heads, s.nq, s.d), dk(s.batch, s.kv_heads, s.nk, s.d),
        dsq(s.batch, s.heads, s.nq, 3), dsk(s.batch, s.kv_heads, s.nk, 3), dv(s.batch, s.kv_heads, s.nk, s.dv);
    tensor3<T> stats(s.batch, s.heads, s.nq);
    sketched_options o;
    o.causal = true;
    o.local_exact = local_exact;
    o.block_size = s.block;
    o.normalizer_bias = 0;
    o.threads = 2;
    sketched_attention<T>(q.view, k.view, sq.view, sk.view, v.view, out.view, o, stats.view);
    sketched_attention_backward<T>(q.view, k.view, sq.view, sk.view, v.view, out.view, dout.view, stats.cview(), dq.view,
                                   dk.view, dsq.view, dsk.view, dv.view, o);
    const sketched_gradients exact = sketched_gradients_oracle<T, long double>(q.cview(), k.cview(), sq.cview(),
                                                                             sk.cview(), v.cview(), dout.cview(), o);
    INFO("largest den " << check_g_overflows<T>(dout, exact));
    check_gradient<T>("out", out, exact.out, tolerance);
    if (local_exact) {
      check_gradient<T>("dq", dq, exact.dq, tolerance);
      check_gradient<T>("dk", dk, exact.dk, tolerance);
    }
    check_gradient<T>("dsq", dsq, exact.dsq, tolerance);
    check_gradient<T>("dsk", dsk, exact.dsk, tolerance);
    check_gradient<T>("dv", dv, exact.dv, tolerance);
  }
}

namespace {

// Non-causal sketched attention with exact local weights: query i (position i + Nk − Nq) weighs
// the keys of its own block exactly and every other key by the sketches, so a poisoned sketch
// row of key j enters the pairs (i, j) with i outside j's block, and one of query i the pairs
// (i, l) with l outside i's block. The kernels read each block's queries against "every block
// but the own": computed as total − own, a NaN or inf of the own block (which those queries do
// not read) would come back as NaN (NaN − NaN, inf − inf).
struct noncausal_case {
  index_t batch, heads, kv_heads, nq, nk, d, dv;
};

// three 16-key blocks, the last partial; GQA with a batch; Nq < Nk (the first query inside a
// block); Nq > Nk (queries before every key read the whole total); one block (the sketches enter
// no pair at all); no keys (rows of β alone)
const noncausal_case kNoncausalShapes[] = {{1, 1, 1, 40, 40, 8, 8}, {2, 4, 2, 37, 37, 6, 9}, {1, 1, 1, 20, 50, 8, 5},
                                           {1, 2, 1, 60, 40, 8, 8}, {1, 1, 1, 10, 10, 8, 8}, {1, 2, 1, 5, 0, 8, 8}};

template <class T>
struct noncausal_run {
  tensor4<T> out, stats, dq, dk, dsq, dsk, dv;  // stats [B, H, Nq, 1]
};

template <class T>
struct noncausal_inputs {
  static constexpr index_t kBlock = 16, kRank = 5;
  noncausal_case s;
  tensor4<T> q, k, sq, sk, v, dout;

  explicit noncausal_inputs(const noncausal_case& c)
      : s(c),
        q(random_tensor<T>(c.batch, c.heads, c.nq, c.d, 121, false, 1.0 / std::sqrt(double(c.d)))),
        k(random_tensor<T>(c.batch, c.kv_heads, c.nk, c.d, 122, false, 1.0 / std::sqrt(double(c.d)))),
        sq(random_tensor<T>(c.batch, c.heads, c.nq, kRank, 123, false, 0.5)),
        sk(random_tensor<T>(c.batch, c.kv_heads, c.nk, kRank, 124, false, 0.5)),
        v(random_tensor<T>(c.batch, c.kv_heads, c.nk, c.dv, 125)),
        dout(random_tensor<T>(c.batch, c.heads, c.nq, c.dv, 126)) {}

  sketched_options options(int threads) const {
    sketched_options o;
    o.causal = false;
    o.local_exact = true;
    o.block_size = kBlock;
    o.threads = threads;
    return o;
  }
  /// The forward on these inputs, then the backward with `fwd`'s out and stats (the finite run's,
  /// so that each pass is checked for its own terms).
  noncausal_run<T> run(int threads, const noncausal_run<T>* fwd) const {
    const noncausal_case& c = s;
    noncausal_run<T> r{tensor4<T>(c.batch, c.heads, c.nq, c.dv),      tensor4<T>(c.batch, c.heads, c.nq, 1),
                       tensor4<T>(c.batch, c.heads, c.nq, c.d),       tensor4<T>(c.batch, c.kv_heads, c.nk, c.d),
                       tensor4<T>(c.batch, c.heads, c.nq, kRank),     tensor4<T>(c.batch, c.kv_heads, c.nk, kRank),
                       tensor4<T>(c.batch, c.kv_heads, c.nk, c.dv)};
    const sketched_options o = options(threads);
    sketched_attention<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), r.out.view, o,
                          tensor_view<T, 3>(r.stats.storage.data(), {c.batch, c.heads, c.nq}));
    const noncausal_run<T>& f = fwd ? *fwd : r;
    sketched_attention_backward<T>(q.cview(), k.cview(), sq.cview(), sk.cview(), v.cview(), f.out.cview(),
                                   dout.cview(), tensor_view<const T, 3>(f.stats.storage.data(), {c.batch, c.heads, c.nq}),
                                   r.dq.view, r.dk.view, r.dsq.view, r.dsk.view, r.dv.view, o);
    return r;
  }
  /// Whether query i and key l are weighed by their sketches (different blocks).
  bool sketched(index_t i, index_t l) const {
    const index_t b = std::min(kBlock, s.nk);  // (a block longer than the keys is all the keys)
    const auto block_of = [b](index_t pos) { return pos >= 0 ? pos / b : -1; };  // (every position < 0: no key)
    return block_of(i + s.nk - s.nq) != block_of(l);
  }
};

enum class expect { same_bits, close, not_finite };

/// Every row (b, h, i) of got against ref as want(b, h, i) says: bitwise equal; finite and within
/// tolerance × max(1, the largest |ref|); or holding a non-finite element.
template <class T, class Want>
void check_rows(const std::string& what, const tensor4<T>& ref, const tensor4<T>& got, const Want& want) {
  const double tol = std::is_same_v<T, float> ? 2e-3 : 1e-9;
  double scale = 1;
  for (T x : ref.storage) scale = std::max(scale, std::abs(static_cast<double>(x)));
  const auto& e = ref.view;
  for (index_t b = 0; b < e.extent(0); ++b)
    for (index_t h = 0; h < e.extent(1); ++h)
      for (index_t i = 0; i < e.extent(2); ++i) {
        bool same = true, finite = true;
        double err = 0;
        for (index_t c = 0; c < e.extent(3); ++c) {
          const T x = ref(b, h, i, c), y = got(b, h, i, c);
          same = same && std::memcmp(&x, &y, sizeof(T)) == 0;
          finite = finite && std::isfinite(static_cast<double>(y));
          err = std::max(err, std::abs(static_cast<double>(y) - static_cast<double>(x)));
        }
        const expect w = want(b, h, i);
        INFO(what << " row " << i << " (batch " << b << ", head " << h << ")");
        if (w == expect::same_bits)
          CHECK(same);
        else if (w == expect::close)
          CHECK((finite && err <= tol * scale));
        else
          CHECK_FALSE(finite);
      }
}

/// Poisons sketch entry (bp, last head, row, row % r) of sq (query) or sk (key) with NaN or +inf
/// and checks every result of forward and backward against the finite run.
template <class T>
void check_noncausal_sketch(const noncausal_case& s, bool query, index_t row, T bad, int threads) {
  const noncausal_inputs<T> in(s);
  const noncausal_run<T> ref = in.run(threads, nullptr);
  noncausal_inputs<T> pin = in;
  tensor4<T>& x = query ? pin.sq : pin.sk;
  const index_t bp = s.batch - 1, hp = x.view.extent(1) - 1, group = s.heads / s.kv_heads;
  const index_t hkp = query ? hp / group : hp;
  x(bp, hp, row, row % noncausal_inputs<T>::kRank) = bad;
  const noncausal_run<T> got = pin.run(threads, &ref);
  INFO("Nq=" << s.nq << " Nk=" << s.nk << " H=" << s.heads << " Hk=" << s.kv_heads << " threads=" << threads << ": "
             << (query ? "sq" : "sk") << " row " << row << " = " << bad);
  const auto pair_of = [&](index_t i, index_t l) {  // the poisoned sketch enters pair (query i, key l) of head h
    return query ? i == row && in.sketched(i, l) : l == row && in.sketched(i, l);
  };
  // query-side rows: (b, h, i); poisoned when a pair of the row holds the sketch
  const auto query_rows = [&](bool affected) {
    return [&, affected](index_t b, index_t h, index_t i) {
      if (b != bp || h / group != hkp) return expect::same_bits;
      bool hit = false;
      for (index_t l = 0; l < s.nk && (!query || h == hp); ++l) hit = hit || pair_of(i, l);
      return affected && hit ? expect::not_finite : expect::close;
    };
  };
  const auto key_rows = [&](bool affected) {
    return [&, affected](index_t b, index_t hk, index_t l) {
      if (b != bp || hk != hkp) return expect::same_bits;
      bool hit = false;
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t i = 0; i < s.nq && (!query || h == hp); ++i) hit = hit || pair_of(i, l);
      return affected && hit ? expect::not_finite : expect::close;
    };
  };
  check_rows("out", ref.out, got.out, query_rows(true));
  check_rows("stats", ref.stats, got.stats, query_rows(true));
  // the backward with the finite out and stats: the sketch's pairs reach ds of the other side's
  // sketch (dsq of their queries, dsk and dv of their keys) and, for the poisoned row itself,
  // its own sketch's gradient; q and k enter only the exact pairs
  check_rows("dq", ref.dq, got.dq, query_rows(false));
  check_rows("dk", ref.dk, got.dk, key_rows(false));
  check_rows("dsq", ref.dsq, got.dsq, query_rows(true));
  check_rows("dsk", ref.dsk, got.dsk, key_rows(true));
  check_rows("dv", ref.dv, got.dv, key_rows(true));
}

}  // namespace

TEMPLATE_TEST_CASE("sketched_attention non-causal with local_exact: a non-finite sketch reaches only the pairs it enters",
                   "[sketched][backward][nonfinite]", float, double) {
  using T = TestType;
  int count = 0;
  for (const noncausal_case& s : kNoncausalShapes) {
    for (bool query : {false, true}) {
      const index_t n = query ? s.nq : s.nk;
      for (index_t row : {index_t(0), index_t(15), index_t(16), n / 2, n - 1}) {
        if (row < 0 || row >= n) continue;
        const T bad = count % 2 ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::quiet_NaN();
        check_noncausal_sketch<T>(s, query, row, bad, count % 3 == 2 ? 2 : 1);
        ++count;
      }
    }
  }
}
