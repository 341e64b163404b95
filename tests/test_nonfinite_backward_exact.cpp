// tests/test_nonfinite_backward_exact.cpp — a NaN or inf in q, k, v, dout or the stats of the exact
// kernels reaches exactly the outputs and gradients whose terms it enters, and nothing else.
//
// A hidden weight is 0 and 0 · NaN = NaN: the backward's tile products over a boundary tile
// (dQ += dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO) must not carry a non-finite row of one side into the
// entries the mask hides. A row that sees a NaN or +inf score (polynomial: an infinite one) must
// come out NaN, out and stats, never the zero row with stats −inf of a row that sees no key;
// and a NaN statistic given to a backward is a NaN row, not an empty one.
//
// Each check poisons one entry, runs the forward and the backward (both schedules) and compares
// with the finite run bitwise: the rows and keys the value cannot reach through the mask (the
// mask written out entry by entry, tests/support/oracles.hpp test_mask) keep their bits; the rows
// whose visible scores (computed here in double) include NaN or +inf are NaN, with their dq and
// the dk, dv of every key they see.
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support/backward_battery.hpp"
#include "support/nonfinite.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

using detail::to_size;

struct mask_spec {
  const char* name;
  bool causal;
  index_t window_left, window_right;
};

const mask_spec kCausal{"causal", true, -1, -1};

struct poison_case {
  attention_shape shape;
  mask_spec mask;
  bool in_double;  // also run in double (the float runs cover every case; keeps the sanitizer runs short)
};

// Causal; a causal window (keys that only rows before a key see exist); two-sided windows, one
// wider than a 96-key tile (so that some queries see every key of a boundary tile). Shapes of two
// 64-query / 96-key backward tiles (48 / 128 forward) each way; GQA; Nq > Nk (causal rows that see
// no key); two batches with Nq < Nk and two 128-key forward blocks.
const poison_case kCases[] = {
    {{1, 2, 1, 100, 100, 8, 5, false}, kCausal, false},
    {{1, 2, 1, 100, 100, 8, 5, false}, {"causal window 20", true, 20, -1}, false},
    {{1, 2, 1, 100, 100, 8, 5, false}, {"window 7|7", false, 7, 7}, false},
    {{1, 2, 1, 100, 100, 8, 5, false}, {"window 70|30", false, 70, 30}, true},
    {{1, 2, 1, 120, 50, 8, 5, false}, kCausal, false},
    {{2, 1, 1, 50, 140, 9, 8, false}, {"causal window 20", true, 20, -1}, false},
};

exact_case_options options_of(const mask_spec& m, bool polynomial) {
  exact_case_options o;
  o.causal = m.causal;
  o.window_left = m.window_left;
  o.window_right = m.window_right;
  o.threads = 1;  // (the tasks are the same for any thread count; results are thread-invariant)
  if (polynomial) o.scale = 0.5;
  return o;
}

enum class poisoned { k, v, q, dout, stats };

const char* name_of(poisoned p) {
  switch (p) {
    case poisoned::k: return "k";
    case poisoned::v: return "v";
    case poisoned::q: return "q";
    case poisoned::dout: return "dout";
    default: return "stats";
  }
}

/// Mismatches of one comparison, with the first one described.
struct tally {
  int count = 0;
  std::string first;
  void fail(const std::string& what) {
    if (count++ == 0) first = what;
  }
};

std::string where(const char* what, index_t b, index_t h, index_t i) {
  std::ostringstream os;
  os << what << "(" << b << ", " << h << ", " << i << ")";
  return os.str();
}

/// One shape, mask, kernel and schedule: the finite run, and poisoned runs compared with it.
/// Kernel: an adapter of tests/support/backward_battery.hpp with its schedule.
template <class Kernel, class T>
struct nonfinite_case {
  attention_shape s;
  exact_case_options o;
  test_mask mask;
  index_t group;
  backward_inputs<T> ref;

  nonfinite_case(const attention_shape& shape, const exact_case_options& opts)
      : s(shape), o(opts), mask(opts.mask()), group(shape.heads / shape.kv_heads), ref(shape, 71) {
    run(ref);
    REQUIRE((all_finite(ref.out) && all_finite(ref.dq) && all_finite(ref.dk) && all_finite(ref.dv)));
  }

  bool sees(index_t i, index_t j) const { return mask(i, j, s.nq, s.nk); }
  bool sees_some_key(index_t i) const {
    for (index_t j = 0; j < s.nk; ++j)
      if (sees(i, j)) return true;
    return false;
  }
  void forward(backward_inputs<T>& in) const {
    Kernel::template forward<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, in.stats.view, o);
  }
  void backward(backward_inputs<T>& in) const {
    Kernel::template backward<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.cview(), in.dout.cview(),
                                 in.stats.cview(), in.dq.view, in.dk.view, in.dv.view, o);
  }
  void run(backward_inputs<T>& in) const {
    forward(in);
    backward(in);
  }

  /// q_i·k_j of (batch b, head h) in double (the scale is positive: the sign is the score's).
  double score(const backward_inputs<T>& in, index_t b, index_t h, index_t i, index_t j) const {
    double acc = 0;
    for (index_t c = 0; c < s.d; ++c) acc += double(in.q(b, h, i, c)) * double(in.k(b, h / group, j, c));
    return acc;
  }
  /// A score that makes its row NaN: NaN or +inf for softmax (−inf is a weight of 0), NaN or
  /// ±inf for polynomial (w = s^p = +inf).
  static bool bad(double sc) { return std::isnan(sc) || (Kernel::polynomial ? std::isinf(sc) : sc == HUGE_VAL); }
  bool sees_bad_score(const backward_inputs<T>& in, index_t b, index_t h, index_t i) const {
    for (index_t j = 0; j < s.nk; ++j)
      if (sees(i, j) && bad(score(in, b, h, i, j))) return true;
    return false;
  }
  std::size_t at(index_t b, index_t h, index_t i) const { return static_cast<std::size_t>((b * s.heads + h) * s.nq + i); }

  /// `in` against the finite run. Rows with rows[i] = 0 keep out, stats and dq (out and stats
  /// of every row when `forward_same`); keys no such row sees keep dk and dv. Rows with
  /// nan[at(b, h, i)] are NaN: out and stats (unless forward_same), dq, and dk, dv of their keys.
  /// Returns how many changed rows hold a non-finite out or dq entry.
  index_t compare(const backward_inputs<T>& in, const std::vector<char>& rows, const std::vector<char>& nan,
                  bool forward_same) const {
    std::vector<char> keys(static_cast<std::size_t>(s.nk), 0);
    for (index_t i = 0; i < s.nq; ++i)
      for (index_t j = 0; j < s.nk && rows[to_size(i)]; ++j)
        if (sees(i, j)) keys[to_size(j)] = 1;
    tally t;
    index_t reached = 0;
    for (index_t b = 0; b < s.batch; ++b)
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq; ++i) {
          const T sa = ref.stats.view(b, h, i), sb = in.stats.view(b, h, i);
          const bool same_stat = std::memcmp(&sa, &sb, sizeof(T)) == 0;
          if (!rows[to_size(i)] || forward_same)
            if (!same_row(ref.out, in.out, b, h, i)) t.fail(where("out", b, h, i) + " changed");
          if (!rows[to_size(i)] && !same_stat) t.fail(where("stats", b, h, i) + " changed");
          if (!rows[to_size(i)]) {
            if (!same_row(ref.dq, in.dq, b, h, i)) t.fail(where("dq", b, h, i) + " changed");
          } else if (row_has_nonfinite(in.out, b, h, i) || row_has_nonfinite(in.dq, b, h, i)) {
            ++reached;
          }
          if (!nan[at(b, h, i)]) continue;
          if (!forward_same && !row_all_nan(in.out, b, h, i)) t.fail(where("out", b, h, i) + " is not a NaN row");
          if (!forward_same && !std::isnan(static_cast<double>(sb))) t.fail(where("stats", b, h, i) + " is not NaN");
          if (!row_all_nan(in.dq, b, h, i)) t.fail(where("dq", b, h, i) + " is not a NaN row");
          for (index_t j = 0; j < s.nk; ++j)
            if (sees(i, j) && !(row_all_nan(in.dk, b, h / group, j) && row_all_nan(in.dv, b, h / group, j)))
              t.fail(where("dk/dv", b, h / group, j) + " of a key NaN row " + std::to_string(i) + " sees is not NaN");
        }
    for (index_t b = 0; b < s.batch; ++b)
      for (index_t hk = 0; hk < s.kv_heads; ++hk)
        for (index_t j = 0; j < s.nk; ++j)
          if (!keys[to_size(j)] && !(same_row(ref.dk, in.dk, b, hk, j) && same_row(ref.dv, in.dv, b, hk, j)))
            t.fail(where("dk/dv", b, hk, j) + " changed; no row that changed sees that key");
    INFO("first of " << t.count << ": " << t.first);
    CHECK(t.count == 0);
    return reached;
  }

  /// Poisons entry (j, j % dim) of k, v, q or dout (every batch and head) or stats(·, ·, j), and
  /// checks the run against the finite one.
  void check(poisoned what, index_t j, T bad_value) {
    INFO(Kernel::name << " " << s.str() << " causal=" << o.causal << " window=" << o.window_left << "|"
                      << o.window_right << ": " << name_of(what) << " " << j << " = " << bad_value);
    backward_inputs<T> in(s, 71);
    std::vector<char> rows(static_cast<std::size_t>(s.nq), 0), nan(static_cast<std::size_t>(s.batch * s.heads * s.nq), 0);
    const bool key_side = what == poisoned::k || what == poisoned::v;
    for (index_t i = 0; i < s.nq; ++i) rows[to_size(i)] = key_side ? sees(i, j) : i == j;
    if (what == poisoned::stats) {
      forward(in);
      for (index_t b = 0; b < s.batch; ++b)
        for (index_t h = 0; h < s.heads; ++h) in.stats.view(b, h, j) = bad_value;
      backward(in);
    } else {
      poison(what == poisoned::k ? in.k : what == poisoned::v ? in.v : what == poisoned::q ? in.q : in.dout, j,
             bad_value);
      run(in);
    }
    bool some_nan = false;
    for (index_t b = 0; b < s.batch; ++b)
      for (index_t h = 0; h < s.heads; ++h)
        for (index_t i = 0; i < s.nq; ++i) {
          bool n = false;
          if (what == poisoned::k) n = sees(i, j) && bad(score(in, b, h, i, j));
          if (what == poisoned::q) n = i == j && sees_bad_score(in, b, h, i);
          if (what == poisoned::stats) n = i == j && sees_some_key(i);
          nan[at(b, h, i)] = n;
          some_nan = some_nan || n;
        }
    const bool forward_same = what == poisoned::dout || what == poisoned::stats;
    const index_t reached = compare(in, rows, nan, forward_same);
    bool seen = false;
    for (index_t i = 0; i < s.nq; ++i) seen = seen || (rows[to_size(i)] && sees_some_key(i));
    if (some_nan || (seen && (what == poisoned::v || what == poisoned::dout))) CHECK(reached > 0);
  }
};

/// Query rows to poison: the forward's and backward's query-block edges, and the queries on either
/// side of the edge of "sees every key of a backward tile" (positions 95 and 191 end 96-key tiles;
/// a window's edge is window_left past a tile's first key, window_right before its last).
std::vector<index_t> query_rows(const attention_shape& s, const mask_spec& m) {
  const index_t offset = s.nk - s.nq;
  std::vector<index_t> positions = {94, 95, s.nk - 2};
  for (index_t j0 : {index_t(0), index_t(96)})
    if (m.window_left >= 0) positions.insert(positions.end(), {j0 + m.window_left, j0 + m.window_left + 1});
  for (index_t jl : {index_t(95), s.nk - 1})
    if (m.window_right >= 0) positions.insert(positions.end(), {jl - m.window_right - 1, jl - m.window_right});
  std::vector<index_t> rows = {0, 47, 48, 63, 64};
  for (index_t p : positions)
    if (p - offset >= 0 && p - offset < s.nq) rows.push_back(p - offset);
  return rows;
}

template <class Kernel, class T>
void check_poisoned(const std::vector<poisoned>& kinds) {
  for (const poison_case& pc : kCases) {
    if (std::is_same_v<T, double> && !pc.in_double) continue;
    const attention_shape& s = pc.shape;
    const mask_spec& m = pc.mask;
    nonfinite_case<Kernel, T> c(s, options_of(m, Kernel::polynomial));
    for (poisoned what : kinds) {
      if (what == poisoned::v && m.window_left < 0 && m.window_right < 0) continue;  // test_nonfinite_values.cpp
      const bool key_side = what == poisoned::k || what == poisoned::v;
      // the edges of the backward's 64-query and 96-key tiles
      for (const auto& [j, bad] : key_side ? poisoned_keys<T>(s.nk, {0, 63, 64, 95, 96})
                                           : poisoned_keys<T>(s.nq, query_rows(s, m)))
        c.check(what, j, bad);
    }
  }
}

template <class Kernel, class T>
void check_both_schedules(const std::vector<poisoned>& kinds) {
  check_poisoned<with_schedule<Kernel, detail::backward_schedule::partials>, T>(kinds);
  check_poisoned<with_schedule<Kernel, detail::backward_schedule::recompute>, T>(kinds);
}

}  // namespace

// ---- item 5: a non-finite k, q or dout stays out of what the mask hides from it

TEMPLATE_TEST_CASE("flash_attention_backward: a non-finite k, v, q or dout reaches only what sees it",
                   "[flash][backward][nonfinite]", float, double) {
  check_both_schedules<flash_backward_kernel, TestType>({poisoned::k, poisoned::v, poisoned::q, poisoned::dout});
}

TEMPLATE_TEST_CASE("polynomial_attention_backward: a non-finite k, v, q or dout reaches only what sees it",
                   "[polynomial][backward][nonfinite]", float, double) {
  check_both_schedules<polynomial_backward_kernel, TestType>({poisoned::k, poisoned::v, poisoned::q, poisoned::dout});
}

// ---- NaN in the stats given to a backward is a NaN row (and +inf, a non-finite normaliser)

TEMPLATE_TEST_CASE("flash_attention_backward: NaN or +inf stats make a NaN row, not an empty one",
                   "[flash][backward][nonfinite]", float, double) {
  check_both_schedules<flash_backward_kernel, TestType>({poisoned::stats});
}

TEMPLATE_TEST_CASE("polynomial_attention_backward: NaN or +inf stats make a NaN row, not an empty one",
                   "[polynomial][backward][nonfinite]", float, double) {
  check_both_schedules<polynomial_backward_kernel, TestType>({poisoned::stats});
}

namespace {

/// The statistic of a row with no key (softmax −∞, polynomial with β = 0: 0) still gives it zero
/// gradients, and changes nothing that row cannot reach.
template <class Kernel>
void check_empty_statistic() {
  using T = float;
  exact_case_options o = options_of(kCausal, Kernel::polynomial);
  o.normalizer_bias = 0.0;
  const attention_shape s{1, 2, 1, 100, 100, 8, 5, false};
  nonfinite_case<Kernel, T> c(s, o);
  for (index_t i : {0, 64, 99}) {
    INFO(Kernel::name << " row " << i);
    backward_inputs<T> in(s, 71);
    c.forward(in);
    for (index_t h = 0; h < s.heads; ++h)
      in.stats.view(0, h, i) = Kernel::polynomial ? T(0) : -std::numeric_limits<T>::infinity();
    c.backward(in);
    std::vector<char> rows(static_cast<std::size_t>(s.nq), 0), nan(static_cast<std::size_t>(s.heads * s.nq), 0);
    rows[to_size(i)] = 1;
    c.compare(in, rows, nan, true);
    for (index_t h = 0; h < s.heads; ++h)
      for (index_t col = 0; col < s.d; ++col) CHECK(in.dq(0, h, i, col) == T(0));
  }
}

}  // namespace

TEST_CASE("the empty row's statistic still gives an empty row in the backward", "[backward][nonfinite]") {
  check_empty_statistic<with_schedule<flash_backward_kernel, detail::backward_schedule::partials>>();
  check_empty_statistic<with_schedule<flash_backward_kernel, detail::backward_schedule::recompute>>();
  check_empty_statistic<with_schedule<polynomial_backward_kernel, detail::backward_schedule::partials>>();
  check_empty_statistic<with_schedule<polynomial_backward_kernel, detail::backward_schedule::recompute>>();
}

// ---- item 7: a row that sees a NaN or +inf score is NaN, not the empty row's zero

namespace {

struct softmax_stats_kernel {
  static constexpr const char* name = "softmax_attention";
  static constexpr bool polynomial = false;
  template <class T>
  static void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                      tensor_view<T, 4> out, tensor_view<T, 3> stats, const exact_case_options& o) {
    softmax_attention<T>(q, k, v, out, flash_kernel::options(o), stats);
  }
};

/// Forward only: k_j or q_i poisoned; rows that do not see it keep out and stats bitwise, rows
/// that see a NaN or +inf score (polynomial: ±inf) are NaN rows with NaN stats.
template <class Kernel, class T>
void check_forward_bad_scores() {
  for (const poison_case& pc : kCases) {
    const attention_shape& s = pc.shape;
    const mask_spec& m = pc.mask;
    const exact_case_options o = options_of(m, Kernel::polynomial);
    const test_mask mask = o.mask();
    const index_t group = s.heads / s.kv_heads;
    attention_inputs<T> ref(s, 81);
    tensor3<T> ref_stats(s.batch, s.heads, s.nq);
    Kernel::template forward<T>(ref.q.cview(), ref.k.cview(), ref.v.cview(), ref.out.view, ref_stats.view, o);
    REQUIRE(all_finite(ref.out));
    for (bool key_side : {true, false})
      for (const auto& [j, bad] : key_side ? poisoned_keys<T>(s.nk, {0, 47, 48, 95, 96, 127, 128})
                                           : poisoned_keys<T>(s.nq, {0, 47, 48})) {
        INFO(Kernel::name << " " << s.str() << " " << m.name << ": " << (key_side ? "k " : "q ") << j << " = " << bad);
        attention_inputs<T> in(s, 81);
        tensor3<T> stats(s.batch, s.heads, s.nq);
        poison(key_side ? in.k : in.q, j, bad);
        Kernel::template forward<T>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, stats.view, o);
        tally t;
        index_t nan_rows = 0;
        bool any_hit = false;
        for (index_t b = 0; b < s.batch; ++b)
          for (index_t h = 0; h < s.heads; ++h)
            for (index_t i = 0; i < s.nq; ++i) {
              bool hit = false, nan = false;
              for (index_t l = 0; l < s.nk; ++l) {
                if (!mask(i, l, s.nq, s.nk) || (key_side ? l != j : i != j)) continue;
                hit = any_hit = true;
                double sc = 0;
                for (index_t c = 0; c < s.d; ++c) sc += double(in.q(b, h, i, c)) * double(in.k(b, h / group, l, c));
                nan = nan || std::isnan(sc) || (Kernel::polynomial ? std::isinf(sc) : sc == HUGE_VAL);
              }
              const T sa = ref_stats.view(b, h, i), sb = stats.view(b, h, i);
              if (!hit && !(same_row(ref.out, in.out, b, h, i) && std::memcmp(&sa, &sb, sizeof(T)) == 0))
                t.fail(where("row", b, h, i) + " changed; it cannot see the poisoned entry");
              if (!nan) continue;
              ++nan_rows;
              if (!row_all_nan(in.out, b, h, i)) t.fail(where("out", b, h, i) + " is not a NaN row");
              if (!std::isnan(static_cast<double>(sb))) t.fail(where("stats", b, h, i) + " is not NaN");
            }
        INFO("first of " << t.count << ": " << t.first);
        CHECK(t.count == 0);
        if (std::isnan(static_cast<double>(bad)) && any_hit) CHECK(nan_rows > 0);
      }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("softmax_attention: a row that sees a NaN or +inf score is NaN, with NaN stats",
                   "[softmax][nonfinite]", float, double) {
  check_forward_bad_scores<softmax_stats_kernel, TestType>();
}

TEMPLATE_TEST_CASE("flash_attention: a row that sees a NaN or +inf score is NaN, with NaN stats",
                   "[flash][nonfinite]", float, double) {
  check_forward_bad_scores<flash_backward_kernel, TestType>();
}

TEMPLATE_TEST_CASE("polynomial_attention: a row that sees a NaN or infinite score is NaN, with NaN stats",
                   "[polynomial][nonfinite]", float, double) {
  check_forward_bad_scores<polynomial_backward_kernel, TestType>();
}

TEST_CASE("polynomial_attention: a row whose denominator overflows is NaN, not 0", "[polynomial][nonfinite]") {
  // q = k = 1 (d = 1), scale 3e18, degree 2: every weight is 9e36 (finite in float), so the
  // causal row i has the denominator 1 + 9e36·(i + 1), which overflows from i ≈ 37 on, while
  // Σ w v with |v| ~ 1e-3 stays finite: O / inf would be a plausible zero row.
  const attention_shape s{1, 1, 1, 100, 100, 1, 4, false};
  attention_inputs<float> in(s, 5);
  std::fill(in.q.storage.begin(), in.q.storage.end(), 1.0f);
  std::fill(in.k.storage.begin(), in.k.storage.end(), 1.0f);
  for (float& x : in.v.storage) x *= 1e-3f;
  exact_case_options o;
  o.causal = true;
  o.scale = 3e18;
  o.degree = 2;
  tensor3<float> stats(1, 1, s.nq);
  polynomial_backward_kernel::forward<float>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.view, stats.view, o);
  const double w = 3e18 * 3e18, fmax = std::numeric_limits<float>::max();
  for (index_t i = 0; i < s.nq; ++i) {
    INFO("row " << i << " out(0) = " << in.out(0, 0, i, 0) << " stats = " << stats.view(0, 0, i));
    const double den = 1 + w * double(i + 1);
    if (den < fmax / 2) {
      CHECK(!row_has_nonfinite(in.out, 0, 0, i));
      CHECK(std::isfinite(stats.view(0, 0, i)));
    } else if (den > 2 * fmax) {
      CHECK(row_all_nan(in.out, 0, 0, i));
      CHECK(std::isnan(stats.view(0, 0, i)));
    }
  }
  // and the backward makes those rows' gradients NaN, not zero
  tensor4<float> dout = random_tensor<float>(1, 1, s.nq, s.dv, 9), dq(1, 1, s.nq, 1), dk(1, 1, s.nk, 1),
                 dv(1, 1, s.nk, s.dv);
  polynomial_backward_kernel::backward<float>(in.q.cview(), in.k.cview(), in.v.cview(), in.out.cview(), dout.cview(),
                                              stats.cview(), dq.view, dk.view, dv.view, o);
  CHECK(row_all_nan(dq, 0, 0, s.nq - 1));
  CHECK(row_all_nan(dv, 0, 0, 0));  // key 0 is seen by every row
}
