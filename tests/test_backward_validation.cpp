// tests/test_backward_validation.cpp — argument rules of the backward entry points and of the forward
// overloads that write stats: every new argument (dout, stats, dq, dk, dv) is checked for shape,
// well-formedness, writability and overlap, with messages naming the function, argument and shapes;
// the matching valid call runs, so every test can fail both ways.
#include <catch2/catch.hpp>

#include "support/throws.hpp"

#include <array>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <polyattn/polyattn.hpp>

using namespace polyattn;
using polyattn::test::require_invalid_argument;

namespace {

using ext4 = std::array<index_t, 4>;
using ext3 = std::array<index_t, 3>;
using in_view = tensor_view<const float, 4>;
using out_view = tensor_view<float, 4>;

template <std::size_t R>
std::string fmt(const std::array<index_t, R>& e) {
  std::ostringstream os;
  os << '[';
  for (std::size_t r = 0; r < R; ++r) os << (r ? ", " : "") << e[r];
  os << ']';
  return os.str();
}

template <std::size_t R>
std::size_t count(const std::array<index_t, R>& e) {
  index_t n = 1;
  for (index_t x : e) n *= x;
  return static_cast<std::size_t>(n < 0 ? 0 : n);
}

/// A valid backward problem: q [1, 2, 8, 4], k [1, 2, 10, 4], v [1, 2, 10, 6], out and dout
/// [1, 2, 8, 6], stats [1, 2, 8]; a test replaces one view to break one rule.
struct problem {
  ext4 qe{1, 2, 8, 4}, ke{1, 2, 10, 4}, ve{1, 2, 10, 6}, oe{1, 2, 8, 6};
  ext3 se{1, 2, 8};
  std::vector<float> qs, ks, vs, os, dos, ss, dqs, dks, dvs, shared;
  in_view q, k, v, out, dout;
  tensor_view<const float, 3> stats;
  out_view dq, dk, dv;

  problem()
      : qs(count(qe), 0.25f), ks(count(ke), -0.5f), vs(count(ve), 1.0f), os(count(oe), 0.5f), dos(count(oe), 1.0f),
        ss(count(se), 1.0f), dqs(count(qe), 42.0f), dks(count(ke), 42.0f), dvs(count(ve), 42.0f),
        shared(1024, 0.0f), q(qs.data(), qe), k(ks.data(), ke), v(vs.data(), ve), out(os.data(), oe),
        dout(dos.data(), oe), stats(ss.data(), se), dq(dqs.data(), qe), dk(dks.data(), ke), dv(dvs.data(), ve) {
    for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = 0.01f * static_cast<float>(i % 17);
    for (std::size_t i = 0; i < ks.size(); ++i) ks[i] = -0.02f * static_cast<float>(i % 13);
  }
  problem(const problem&) = delete;
  problem& operator=(const problem&) = delete;

  /// f(view, extents) on the gradient-side argument `name`.
  template <class F>
  void with_new_arg(const std::string& name, F&& f) {
    if (name == "dout") f(dout);
    else if (name == "dq") f(dq);
    else if (name == "dk") f(dk);
    else f(dv);
  }
};

struct flash_bwd {
  static constexpr const char* name = "flash_attention_backward";
  using options = softmax_options;
  static void run(const problem& p, const options& o = {}) {
    flash_attention_backward<float>(p.q, p.k, p.v, p.out, p.dout, p.stats, p.dq, p.dk, p.dv, o);
  }
};

struct polynomial_bwd {
  static constexpr const char* name = "polynomial_attention_backward";
  using options = polynomial_options;
  static void run(const problem& p, const options& o = {}) {
    polynomial_attention_backward<float>(p.q, p.k, p.v, p.out, p.dout, p.stats, p.dq, p.dk, p.dv, o);
  }
};

template <class Api>
std::string fn_name() {
  return std::string("polyattn::") + Api::name;
}

const char* const kNewArgs[] = {"dout", "dq", "dk", "dv"};

}  // namespace

#define BACKWARD_APIS flash_bwd, polynomial_bwd

TEMPLATE_TEST_CASE("backward validation accepts valid inputs", "[validation][backward]", BACKWARD_APIS) {
  SECTION("the default problem writes every gradient") {
    problem p;
    REQUIRE_NOTHROW(TestType::run(p));
    for (const auto* g : {&p.dqs, &p.dks, &p.dvs})
      for (float x : *g) REQUIRE((std::isfinite(x) && x != 42.0f));
  }
  SECTION("strided [B, N, H, D] gradients and a padded stats view") {
    problem p;
    std::vector<float> dq(p.dqs.size()), dk(p.dks.size()), dv(p.dvs.size()), st(64, 1.0f);
    p.dq = view_bnhd(dq.data(), 1, 8, 2, 4);
    p.dk = view_bnhd(dk.data(), 1, 10, 2, 4);
    p.dv = view_bnhd(dv.data(), 1, 10, 2, 6);
    p.stats = tensor_view<const float, 3>(st.data(), {1, 2, 8}, {32, 16, 1});
    REQUIRE_NOTHROW(TestType::run(p));
  }
  SECTION("null pointers where there are no elements") {
    problem p;
    p.q = in_view(nullptr, {1, 2, 0, 4});
    p.out = in_view(nullptr, {1, 2, 0, 6});
    p.dout = in_view(nullptr, {1, 2, 0, 6});
    p.stats = tensor_view<const float, 3>(nullptr, {1, 2, 0});
    p.dq = out_view(nullptr, {1, 2, 0, 4});
    REQUIRE_NOTHROW(TestType::run(p));
    for (float x : p.dks) REQUIRE(x == 0.0f);  // no query: dk and dv are written as 0
    for (float x : p.dvs) REQUIRE(x == 0.0f);
  }
}

TEMPLATE_TEST_CASE("backward validation rejects shape mismatches of the new arguments", "[validation][backward]",
                   BACKWARD_APIS) {
  const std::pair<const char*, const char*> partners[] = {{"dout", "out"}, {"dq", "q"}, {"dk", "k"}, {"dv", "v"}};
  for (const auto& [arg, partner] : partners)
    for (std::size_t dim = 0; dim < 4; ++dim) {
      problem p;
      ext4 bad{}, good{};
      std::vector<float> storage(2048, 0.0f);
      p.with_new_arg(arg, [&](auto& view) {
        good = view.extents();
        bad = good;
        bad[dim] += 1;
        view = std::decay_t<decltype(view)>(storage.data(), bad);
      });
      INFO(arg << " dimension " << dim);
      require_invalid_argument([&] { TestType::run(p); },
                               {fn_name<TestType>(), std::string("'") + arg + "'", std::string("'") + partner + "'",
                                fmt(bad), fmt(good)});
    }
  for (std::size_t dim = 0; dim < 3; ++dim) {
    problem p;
    ext3 bad = p.se;
    bad[dim] += 1;
    std::vector<float> storage(64, 0.0f);
    p.stats = tensor_view<const float, 3>(storage.data(), bad);
    INFO("stats dimension " << dim);
    require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'stats'", fmt(bad), "[1, 2, 8]"});
  }
}

TEMPLATE_TEST_CASE("backward validation rejects malformed new views", "[validation][backward]", BACKWARD_APIS) {
  for (const std::string arg : kNewArgs) {
    INFO("argument " << arg);
    {
      problem p;
      ext4 e{};
      p.with_new_arg(arg, [&](auto& view) {
        e = view.extents();
        view = std::decay_t<decltype(view)>(nullptr, e);
      });
      require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'" + arg + "'", "null", fmt(e)});
    }
    {
      problem p;
      std::vector<float> storage(4096, 0.0f);
      p.with_new_arg(arg, [&](auto& view) {
        auto st = view.strides();
        st[3] = 2;
        st[2] *= 2;
        st[1] *= 2;
        st[0] *= 2;
        view = std::decay_t<decltype(view)>(storage.data(), view.extents(), st);
      });
      require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'" + arg + "'", "contiguous"});
    }
  }
  {
    problem p;
    p.stats = tensor_view<const float, 3>(nullptr, p.se);
    require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'stats'", "null", "[1, 2, 8]"});
  }
  {
    problem p;
    std::vector<float> storage(64, 0.0f);
    p.stats = tensor_view<const float, 3>(storage.data(), p.se, {16, 8, 2});
    require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'stats'", "contiguous"});
  }
}

TEMPLATE_TEST_CASE("backward validation rejects gradients that overlap themselves", "[validation][backward]",
                   BACKWARD_APIS) {
  for (const std::string arg : {"dq", "dk", "dv"}) {
    problem p;
    p.with_new_arg(arg, [&](auto& view) {
      auto st = view.strides();
      st[1] = 0;  // both heads on the same memory
      view = std::decay_t<decltype(view)>(view.data(), view.extents(), st);
    });
    INFO("argument " << arg);
    require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "output '" + arg + "'", "stride 0"});
  }
}

TEMPLATE_TEST_CASE("backward validation rejects gradients overlapping an input or each other",
                   "[validation][backward]", BACKWARD_APIS) {
  const char* inputs[] = {"q", "k", "v", "out", "dout", "stats"};
  for (const std::string grad : {"dq", "dk", "dv"})
    for (const std::string input : inputs) {
      problem p;
      float* base = p.shared.data();
      p.with_new_arg(grad, [&](auto& view) { view = std::decay_t<decltype(view)>(base, view.extents()); });
      if (input == "q") p.q = in_view(base, p.qe);
      else if (input == "k") p.k = in_view(base, p.ke);
      else if (input == "v") p.v = in_view(base, p.ve);
      else if (input == "out") p.out = in_view(base, p.oe);
      else if (input == "dout") p.dout = in_view(base, p.oe);
      else p.stats = tensor_view<const float, 3>(base, p.se);
      INFO(grad << " over " << input);
      require_invalid_argument([&] { TestType::run(p); },
                               {fn_name<TestType>(), "'" + grad + "'", "overlaps input '" + input + "'"});
    }
  const std::pair<const char*, const char*> pairs[] = {{"dq", "dk"}, {"dq", "dv"}, {"dk", "dv"}};
  for (const auto& [a, b] : pairs) {
    problem p;
    float* base = p.shared.data();
    p.with_new_arg(a, [&](auto& view) { view = std::decay_t<decltype(view)>(base, view.extents()); });
    p.with_new_arg(b, [&](auto& view) { view = std::decay_t<decltype(view)>(base + 8, view.extents()); });
    INFO(a << " and " << b);
    require_invalid_argument([&] { TestType::run(p); },
                             {fn_name<TestType>(), std::string("outputs '") + a + "'", std::string("'") + b + "'",
                              "overlap"});
  }
}

TEMPLATE_TEST_CASE("backward validation checks the options", "[validation][backward]", BACKWARD_APIS) {
  problem p;
  typename TestType::options o;
  o.threads = -1;
  require_invalid_argument([&] { TestType::run(p, o); }, {fn_name<TestType>(), "threads"});
  typename TestType::options bad_scale;
  bad_scale.scale = std::numeric_limits<double>::quiet_NaN();
  require_invalid_argument([&] { TestType::run(p, bad_scale); }, {fn_name<TestType>(), "scale"});
}

TEST_CASE("polynomial_attention_backward checks degree and normalizer_bias", "[validation][backward]") {
  problem p;
  polynomial_options o;
  o.degree = 3;
  require_invalid_argument([&] { polynomial_bwd::run(p, o); }, {"polynomial_attention_backward", "degree", "3"});
  polynomial_options b;
  b.normalizer_bias = -1;
  require_invalid_argument([&] { polynomial_bwd::run(p, b); }, {"polynomial_attention_backward", "normalizer_bias"});
}

// ---- the forward overloads that write stats

namespace {
struct softmax_fwd {
  static constexpr const char* name = "softmax_attention";
  static void run(const problem& p, tensor_view<float, 3> s, out_view out) {
    softmax_attention<float>(p.q, p.k, p.v, out, softmax_options{}, s);
  }
};
struct flash_fwd {
  static constexpr const char* name = "flash_attention";
  static void run(const problem& p, tensor_view<float, 3> s, out_view out) {
    flash_attention<float>(p.q, p.k, p.v, out, softmax_options{}, s);
  }
};
struct polynomial_fwd {
  static constexpr const char* name = "polynomial_attention";
  static void run(const problem& p, tensor_view<float, 3> s, out_view out) {
    polynomial_attention<float>(p.q, p.k, p.v, out, polynomial_options{}, s);
  }
};
}  // namespace

TEMPLATE_TEST_CASE("forward validation of the stats argument", "[validation][backward]", softmax_fwd, flash_fwd,
                   polynomial_fwd) {
  problem p;
  std::vector<float> out(count(p.oe), 0.0f), st(64, 7.0f);
  const out_view o(out.data(), p.oe);
  SECTION("valid, padded rows") {
    REQUIRE_NOTHROW(TestType::run(p, tensor_view<float, 3>(st.data(), p.se, {32, 16, 1}), o));
    CHECK(st[0] != 7.0f);
  }
  SECTION("shape") {
    for (std::size_t dim = 0; dim < 3; ++dim) {
      ext3 bad = p.se;
      bad[dim] += 1;
      require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(st.data(), bad), o); },
                               {fn_name<TestType>(), "'stats'", fmt(bad), "[1, 2, 8]"});
    }
  }
  SECTION("null, self-overlap") {
    require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(nullptr, p.se), o); },
                             {fn_name<TestType>(), "'stats'", "null"});
    require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(st.data(), p.se, {16, 0, 1}), o); },
                             {fn_name<TestType>(), "'stats'", "stride 0"});
  }
  SECTION("overlap with an input or out") {
    require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(p.qs.data(), p.se), o); },
                             {fn_name<TestType>(), "'stats'", "overlaps input 'q'"});
    require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(p.ks.data(), p.se), o); },
                             {fn_name<TestType>(), "'stats'", "overlaps input 'k'"});
    require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(p.vs.data(), p.se), o); },
                             {fn_name<TestType>(), "'stats'", "overlaps input 'v'"});
    require_invalid_argument([&] { TestType::run(p, tensor_view<float, 3>(out.data() + 4, p.se), o); },
                             {fn_name<TestType>(), "outputs 'out'", "'stats'", "overlap"});
  }
}

// Internally an empty stats view means "not wanted": an empty view handed to an overload that
// writes stats must still be rejected when the problem has rows (and accepted when it has none).
TEST_CASE("forward overloads that write stats reject an empty stats view", "[validation][backward]") {
  problem p;
  std::vector<float> out(count(p.oe), 0.0f);
  const out_view o(out.data(), p.oe);
  const tensor_view<float, 3> none{};
  auto expect = [](const char* fn, auto&& call) {
    require_invalid_argument(call, {fn, "'stats'", "[0, 0, 0]", "[1, 2, 8]"});
  };
  expect("softmax_attention", [&] { softmax_attention<float>(p.q, p.k, p.v, o, softmax_options{}, none); });
  expect("flash_attention", [&] { flash_attention<float>(p.q, p.k, p.v, o, softmax_options{}, none); });
  expect("polynomial_attention", [&] { polynomial_attention<float>(p.q, p.k, p.v, o, polynomial_options{}, none); });
  expect("shaped_attention", [&] { shaped_attention<float>(p.q, p.k, p.v, o, shaped_options{}, none); });
  const segmented_view<const float> ks{p.k}, vs{p.v};
  expect("flash_attention", [&] { flash_attention<float>(p.q, ks, vs, o, softmax_options{}, none); });
  expect("softmax_attention", [&] { softmax_attention<float>(p.q, ks, vs, o, softmax_options{}, none); });
  expect("polynomial_attention", [&] { polynomial_attention<float>(p.q, ks, vs, o, polynomial_options{}, none); });
  std::vector<float> e(4 * 10, 0.1f);
  const tensor_view<const float, 2> E(e.data(), {4, 10});
  expect("linformer_attention", [&] { linformer_attention<float>(p.q, p.k, p.v, E, E, o, linformer_options{}, none); });
  // the linear family: caller features (here q and k themselves, non-negative enough for a check)
  expect("linear_attention", [&] { linear_attention<float>(p.q, p.k, p.v, o, linear_options{}, none); });
  expect("sketched_attention", [&] { sketched_attention<float>(p.q, p.k, p.q, p.k, p.v, o, sketched_options{}, none); });
  sketch_options so;
  so.sketch_size = 4;
  const polysketch<float> sketch(4, so);
  expect("polysketch_attention", [&] { polysketch_attention<float>(p.q, p.k, p.v, o, sketch, polysketch_options{}, none); });

  // no rows: an empty stats view is the right shape
  std::vector<float> q0(1);
  const in_view qe(q0.data(), {1, 2, 0, 4});
  const out_view oe(out.data(), {1, 2, 0, 6});
  const tensor_view<float, 3> se(nullptr, {1, 2, 0});
  REQUIRE_NOTHROW(flash_attention<float>(qe, p.k, p.v, oe, softmax_options{}, se));
  REQUIRE_NOTHROW(polysketch_attention<float>(qe, p.k, p.v, oe, sketch, polysketch_options{}, se));
}
