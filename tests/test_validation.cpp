// tests/test_validation.cpp — every argument rule of the exact entry points (docs/design.md §2): each bad
// input throws std::invalid_argument whose message names the function, the argument and the shapes;
// the matching valid input does not throw, so every test can fail both ways.
#include <catch2/catch.hpp>

#include "support/throws.hpp"

#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <polyattn/polyattn.hpp>

using namespace polyattn;
using polyattn::test::require_invalid_argument;

namespace {

using ext4 = std::array<index_t, 4>;
using in_view = tensor_view<const float, 4>;
using out_view = tensor_view<float, 4>;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

/// "[1, 2, 8, 4]", the shape format of the messages (written out independently of the library).
std::string fmt(const ext4& e) {
  std::ostringstream os;
  os << '[' << e[0] << ", " << e[1] << ", " << e[2] << ", " << e[3] << ']';
  return os.str();
}

index_t count(const ext4& e) {
  index_t n = 1;
  for (index_t x : e) n *= x;
  return n < 0 ? 0 : n;
}

/// Extents of the four arguments. The defaults are a valid problem whose four shapes are all
/// different, so a shape in a message identifies its argument.
struct shapes {
  ext4 q{1, 2, 8, 4};
  ext4 k{1, 2, 10, 4};
  ext4 v{1, 2, 10, 6};
  ext4 out{1, 2, 8, 6};

  ext4& operator[](const std::string& name) { return name == "q" ? q : name == "k" ? k : name == "v" ? v : out; }
};

/// Owning contiguous q, k, v, out for `shapes`; a test replaces one view (or an option) to break one rule.
struct problem {
  std::vector<float> qs, ks, vs, os;
  in_view q, k, v;
  out_view out;

  explicit problem(const shapes& s = {})
      : qs(static_cast<std::size_t>(count(s.q)), 0.25f),
        ks(static_cast<std::size_t>(count(s.k)), -0.5f),
        vs(static_cast<std::size_t>(count(s.v)), 1.0f),
        os(static_cast<std::size_t>(count(s.out)), 42.0f),
        q(qs.data(), s.q),
        k(ks.data(), s.k),
        v(vs.data(), s.v),
        out(os.data(), s.out) {
    for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = 0.01f * static_cast<float>(i % 17);
    for (std::size_t i = 0; i < ks.size(); ++i) ks[i] = -0.02f * static_cast<float>(i % 13);
  }
  problem(const problem&) = delete;
  problem& operator=(const problem&) = delete;

  /// Calls f(view) on the argument called `name` ("q", "k", "v" or "out").
  template <class F>
  void with_arg(const std::string& name, F&& f) {
    if (name == "q") f(q);
    else if (name == "k") f(k);
    else if (name == "v") f(v);
    else f(out);
  }
};

const std::initializer_list<const char*> kArgs = {"q", "k", "v", "out"};

// Adapters: one per entry point, so each rule is written once and run against all three.
struct softmax_api {
  static constexpr const char* name = "softmax_attention";
  using options = softmax_options;
  static void run(const problem& p, const options& o = {}) { softmax_attention<float>(p.q, p.k, p.v, p.out, o); }
  static matrix<float> run_eigen(const matrix<float>& q, const matrix<float>& k, const matrix<float>& v) {
    return softmax_attention(q, k, v, options{});
  }
  static options with_scale(double s) {
    options o;
    o.scale = s;
    return o;
  }
};

struct flash_api {
  static constexpr const char* name = "flash_attention";
  using options = softmax_options;
  static void run(const problem& p, const options& o = {}) { flash_attention<float>(p.q, p.k, p.v, p.out, o); }
  static matrix<float> run_eigen(const matrix<float>& q, const matrix<float>& k, const matrix<float>& v) {
    return flash_attention(q, k, v, options{});
  }
  static options with_scale(double s) {
    options o;
    o.scale = s;
    return o;
  }
};

struct polynomial_api {
  static constexpr const char* name = "polynomial_attention";
  using options = polynomial_options;
  static void run(const problem& p, const options& o = {}) { polynomial_attention<float>(p.q, p.k, p.v, p.out, o); }
  static matrix<float> run_eigen(const matrix<float>& q, const matrix<float>& k, const matrix<float>& v) {
    return polynomial_attention(q, k, v, options{});
  }
  static options with_scale(double s) {
    options o;
    o.scale = s;
    return o;
  }
};

template <class Api>
std::string fn_name() {
  return std::string("polyattn::") + Api::name;
}

bool all_finite(const std::vector<float>& xs) {
  for (float x : xs)
    if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace

#define ALL_APIS softmax_api, flash_api, polynomial_api

// ---------------------------------------------------------------------------------------------
// Valid inputs: these must run, so that every rejection below is a real rule and not a blanket throw.

TEMPLATE_TEST_CASE("validation accepts valid inputs", "[validation]", ALL_APIS) {
  SECTION("the default problem") {
    problem p;
    REQUIRE_NOTHROW(TestType::run(p));
    CHECK(all_finite(p.os));
    CHECK(p.os[0] != 42.0f);  // the kernel really wrote the output
  }
  SECTION("grouped-query attention, H a multiple of Hk") {
    for (index_t hk : {1, 2, 4}) {
      shapes s;
      s.q[1] = s.out[1] = 4;
      s.k[1] = s.v[1] = hk;
      INFO("H = 4, Hk = " << hk);
      problem p(s);
      REQUIRE_NOTHROW(TestType::run(p));
      CHECK(all_finite(p.os));
    }
  }
  SECTION("strided [B, N, H, D] views") {
    problem p;
    std::vector<float> qb(p.qs), kb(p.ks), vb(p.vs), ob(p.os.size());
    p.q = view_bnhd<const float>(qb.data(), 1, 8, 2, 4);
    p.k = view_bnhd<const float>(kb.data(), 1, 10, 2, 4);
    p.v = view_bnhd<const float>(vb.data(), 1, 10, 2, 6);
    p.out = view_bnhd(ob.data(), 1, 8, 2, 6);
    REQUIRE_NOTHROW(TestType::run(p));
  }
  SECTION("zero (broadcast) strides on inputs, zero stride on an output extent of 1") {
    problem p;
    p.k = in_view(p.ks.data(), {1, 2, 10, 4}, {0, 0, 4, 1});     // both heads read head 0
    p.v = in_view(p.vs.data(), {1, 2, 10, 6}, {0, 0, 6, 1});
    p.q = in_view(p.qs.data(), {1, 2, 8, 4}, {0, 32, 4, 1});     // batch extent 1
    p.out = out_view(p.os.data(), {1, 2, 8, 6}, {0, 48, 6, 1});  // batch extent 1: no aliasing
    REQUIRE_NOTHROW(TestType::run(p));
    // A single key broadcast over a length-1 innermost dimension needs no stride 1 either.
    shapes s;
    s.q[3] = s.k[3] = 1;
    problem p1(s);
    p1.q = in_view(p1.qs.data(), s.q, {16, 8, 1, 7});
    REQUIRE_NOTHROW(TestType::run(p1));
  }
  SECTION("explicit thread counts") {
    for (int t : {0, 1, 2, 3}) {
      problem p;
      typename TestType::options o;
      o.threads = t;
      INFO("threads = " << t);
      REQUIRE_NOTHROW(TestType::run(p, o));
    }
  }
  SECTION("finite scales") {
    for (double sc : {1.0, 0.125, -2.0, 0.0}) {
      problem p;
      INFO("scale = " << sc);
      REQUIRE_NOTHROW(TestType::run(p, TestType::with_scale(sc)));
    }
  }
}

TEMPLATE_TEST_CASE("validation accepts null pointers when there are no elements", "[validation]", ALL_APIS) {
  SECTION("all extents zero") {
    problem p;
    p.q = in_view(nullptr, {0, 0, 0, 0});
    p.k = in_view(nullptr, {0, 0, 0, 0});
    p.v = in_view(nullptr, {0, 0, 0, 0});
    p.out = out_view(nullptr, {0, 0, 0, 0});
    REQUIRE_NOTHROW(TestType::run(p));
  }
  SECTION("batch size zero") {
    problem p;
    p.q = in_view(nullptr, {0, 2, 8, 4});
    p.k = in_view(nullptr, {0, 2, 10, 4});
    p.v = in_view(nullptr, {0, 2, 10, 6});
    p.out = out_view(nullptr, {0, 2, 8, 6});
    REQUIRE_NOTHROW(TestType::run(p));
  }
  SECTION("sequence lengths zero") {
    problem p;
    p.q = in_view(nullptr, {1, 2, 0, 4});
    p.k = in_view(nullptr, {1, 2, 0, 4});
    p.v = in_view(nullptr, {1, 2, 0, 6});
    p.out = out_view(nullptr, {1, 2, 0, 6});
    REQUIRE_NOTHROW(TestType::run(p));
  }
  SECTION("no keys: null k and v, real q and out (output rows are 0)") {
    problem p;
    p.k = in_view(nullptr, {1, 2, 0, 4});
    p.v = in_view(nullptr, {1, 2, 0, 6});
    REQUIRE_NOTHROW(TestType::run(p));
    for (float x : p.os) REQUIRE(x == 0.0f);
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes.

TEMPLATE_TEST_CASE("validation rejects shape mismatches naming both arguments and shapes", "[validation][shape]",
                   ALL_APIS) {
  // Each rule changes one extent of one argument; the message must quote it and its partner.
  struct rule {
    const char* what;     // words of the message
    const char* changed;  // argument whose extent is changed
    std::size_t dim;
    index_t value;
    const char* partner;  // argument it is compared with
  };
  const rule rules[] = {
      {"batch size", "k", 0, 2, "q"},   {"batch size", "v", 0, 2, "q"},  {"batch size", "out", 0, 2, "q"},
      {"head count", "out", 1, 4, "q"}, {"head count", "v", 1, 1, "k"},  {"head dim", "k", 3, 5, "q"},
      {"key count", "v", 2, 11, "k"},   {"query count", "out", 2, 9, "q"}, {"value dim", "out", 3, 7, "v"},
  };
  for (const rule& r : rules) {
    shapes s;
    s[r.changed][r.dim] = r.value;
    INFO(r.what << ": '" << r.changed << "' " << fmt(s[r.changed]) << " vs '" << r.partner << "' "
                << fmt(s[r.partner]));
    problem p(s);
    require_invalid_argument([&] { TestType::run(p); },
                             {fn_name<TestType>(), r.what, std::string("'") + r.changed + "'",
                              std::string("'") + r.partner + "'", fmt(s[r.changed]), fmt(s[r.partner])});
  }

  // The format itself, spelled out once: "[1, 2, 8, 4]".
  shapes s;
  s.k[3] = 5;
  problem p(s);
  require_invalid_argument([&] { TestType::run(p); }, {"[1, 2, 10, 5]", "[1, 2, 8, 4]"});
}

TEMPLATE_TEST_CASE("validation rejects a query head count that is not a multiple of the kv head count",
                   "[validation][shape][gqa]", ALL_APIS) {
  for (auto hh : {std::array<index_t, 2>{3, 2}, std::array<index_t, 2>{1, 2}, std::array<index_t, 2>{6, 4},
                  std::array<index_t, 2>{2, 0}}) {
    shapes s;
    s.q[1] = s.out[1] = hh[0];
    s.k[1] = s.v[1] = hh[1];
    INFO("H = " << hh[0] << ", Hk = " << hh[1]);
    problem p(s);
    require_invalid_argument([&] { TestType::run(p); },
                             {fn_name<TestType>(), "multiple", "'q'", "'k'", fmt(s.q), fmt(s.k)});
  }
}

// ---------------------------------------------------------------------------------------------
// Well-formedness of each view.

TEMPLATE_TEST_CASE("validation rejects a null pointer with non-zero extents", "[validation][view]", ALL_APIS) {
  for (const std::string arg : kArgs) {
    INFO("argument " << arg);
    problem p;
    p.with_arg(arg, [](auto& view) { view = std::decay_t<decltype(view)>(nullptr, view.extents()); });
    require_invalid_argument([&] { TestType::run(p); },
                             {fn_name<TestType>(), "'" + arg + "'", "null", fmt(shapes{}[arg])});
  }
}

TEMPLATE_TEST_CASE("validation rejects a negative extent", "[validation][view]", ALL_APIS) {
  for (const std::string arg : kArgs)
    for (std::size_t dim = 0; dim < 4; ++dim) {
      INFO("argument " << arg << ", dimension " << dim);
      problem p;
      ext4 bad{};
      p.with_arg(arg, [&](auto& view) {
        bad = view.extents();
        bad[dim] = -bad[dim];
        view = std::decay_t<decltype(view)>(view.data(), bad, view.strides());
      });
      require_invalid_argument([&] { TestType::run(p); },
                               {fn_name<TestType>(), "'" + arg + "'", "negative extent", fmt(bad)});
    }
}

TEMPLATE_TEST_CASE("validation names a negative extent given to the contiguous constructor", "[validation][view]",
                   ALL_APIS) {
  // the contiguous strides of a negative extent are negative in the dimensions before it: the
  // message must still name the extent and its dimension
  for (const std::string arg : kArgs)
    for (std::size_t dim = 0; dim < 4; ++dim) {
      INFO("argument " << arg << ", dimension " << dim);
      problem p;
      ext4 bad{};
      p.with_arg(arg, [&](auto& view) {
        bad = view.extents();
        bad[dim] = -bad[dim];
        view = std::decay_t<decltype(view)>(view.data(), bad);
      });
      require_invalid_argument([&] { TestType::run(p); },
                               {fn_name<TestType>(), "'" + arg + "'", "negative extent in dimension " + std::to_string(dim)});
    }
}

TEMPLATE_TEST_CASE("validation rejects absurd extents without overflowing (contiguous constructor)",
                   "[validation][view]", ALL_APIS) {
  for (const std::string arg : kArgs) {
    INFO("argument " << arg);
    problem p;
    const index_t e = index_t(1) << 20;  // 2^80 elements: the strides and the size wrap, never overflow
    p.with_arg(arg, [&](auto& view) { view = std::decay_t<decltype(view)>(view.data(), {e, e, e, e}); });
    require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'" + arg + "'"});
  }
}

TEMPLATE_TEST_CASE("validation rejects a negative stride", "[validation][view]", ALL_APIS) {
  for (const std::string arg : kArgs)
    for (std::size_t dim = 0; dim < 3; ++dim) {
      INFO("argument " << arg << ", dimension " << dim);
      problem p;
      p.with_arg(arg, [&](auto& view) {
        // A memory-safe reversed view of dimension `dim`: starts at its last slice.
        auto st = view.strides();
        const auto first = view.data() + (view.extent(dim) - 1) * st[dim];
        st[dim] = -st[dim];
        view = std::decay_t<decltype(view)>(first, view.extents(), st);
      });
      require_invalid_argument([&] { TestType::run(p); },
                               {fn_name<TestType>(), "'" + arg + "'", "negative stride",
                                "dimension " + std::to_string(dim), fmt(shapes{}[arg])});
    }
}

TEMPLATE_TEST_CASE("validation rejects a non-contiguous innermost dimension", "[validation][view]", ALL_APIS) {
  for (const std::string arg : kArgs) {
    INFO("argument " << arg);
    problem p;
    const ext4 e = shapes{}[arg];
    std::vector<float> wide(static_cast<std::size_t>(2 * count(e)), 0.5f);  // every other element
    const auto cs = out_view::contiguous_strides(e);
    const ext4 st{2 * cs[0], 2 * cs[1], 2 * cs[2], 2};
    p.with_arg(arg, [&](auto& view) { view = std::decay_t<decltype(view)>(wide.data(), e, st); });
    require_invalid_argument([&] { TestType::run(p); },
                             {fn_name<TestType>(), "'" + arg + "'", "contiguous", "stride 2", fmt(e)});
  }
}

// ---------------------------------------------------------------------------------------------
// The output.

TEMPLATE_TEST_CASE("validation rejects out overlapping an input", "[validation][overlap]", ALL_APIS) {
  const shapes s;
  for (const std::string arg : {"q", "k", "v"}) {
    const index_t n_arg = count(shapes{}[arg]), n_out = count(s.out);
    // One buffer holding both: the input starts at `base`, out at `base + shift`, |shift| <= n_arg + n_out.
    std::vector<float> shared(static_cast<std::size_t>(3 * (n_arg + n_out)), 0.5f);
    float* base = shared.data() + (n_arg + n_out);
    const auto place = [&](problem& p, index_t shift) {
      p.with_arg(arg, [&](auto& view) {
        if constexpr (std::is_const_v<typename std::decay_t<decltype(view)>::element_type>)
          view = in_view(base, shapes{}[arg]);
      });
      p.out = out_view(base + shift, s.out);
    };
    const auto expect_overlap = [&](index_t shift) {
      INFO("out of '" << arg << "' shifted by " << shift << " elements");
      problem p;
      place(p, shift);
      require_invalid_argument([&] { TestType::run(p); },
                               {fn_name<TestType>(), "overlaps", "'out'", fmt(s.out), "'" + arg + "'",
                                fmt(shapes{}[arg])});
    };
    expect_overlap(0);              // in place
    expect_overlap(n_arg - 1);      // out's first element is the input's last
    expect_overlap(-(n_out - 1));   // out's last element is the input's first
    expect_overlap(3);

    // Adjacent but disjoint ranges of the same buffer are fine.
    for (index_t shift : {n_arg, -n_out}) {
      INFO("'" << arg << "' and out adjacent, shift " << shift);
      problem p;
      place(p, shift);
      REQUIRE_NOTHROW(TestType::run(p));
    }
  }
}

TEMPLATE_TEST_CASE("validation rejects out with a zero stride over an extent > 1", "[validation][overlap]",
                   ALL_APIS) {
  shapes s;
  s.q[0] = s.k[0] = s.v[0] = s.out[0] = 2;
  for (std::size_t dim = 0; dim < 3; ++dim) {
    INFO("zero stride in dimension " << dim);
    problem p(s);
    auto st = p.out.strides();
    st[dim] = 0;
    p.out = out_view(p.os.data(), s.out, st);
    require_invalid_argument([&] { TestType::run(p); },
                             {fn_name<TestType>(), "'out'", "stride 0", "dimension " + std::to_string(dim),
                              fmt(s.out)});
  }
  // Extent 1 with stride 0 writes one element once: accepted.
  problem p;
  p.out = out_view(p.os.data(), p.out.extents(), {0, 48, 6, 1});
  REQUIRE_NOTHROW(TestType::run(p));
}

TEMPLATE_TEST_CASE("validation rejects an output that overlaps itself", "[validation][overlap]", ALL_APIS) {
  // out [1, 2, 8, 6]: rows 1 element apart overlap; head 1 starting inside head 0 overlaps
  for (const std::array<index_t, 4>& st : {std::array<index_t, 4>{96, 48, 1, 1}, std::array<index_t, 4>{96, 6, 6, 1}}) {
    problem p;
    p.out = out_view(p.os.data(), p.out.extents(), st);
    require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'out'", "overlaps itself", "[1, 2, 8, 6]"});
  }
  problem p;  // a padded but disjoint layout is fine
  p.out = out_view(p.os.data(), p.out.extents(), {96, 48, 6, 1});
  REQUIRE_NOTHROW(TestType::run(p));
}

TEMPLATE_TEST_CASE("validation rejects extents that overflow 64-bit indexing", "[validation]", ALL_APIS) {
  problem p;
  const index_t big = index_t(1) << 32;
  p.q = in_view(nullptr, {1, big, big, 4}, {0, 0, 4, 1});  // explicit strides: contiguous ones would overflow
  require_invalid_argument([&] { TestType::run(p); }, {fn_name<TestType>(), "'q'", "too large"});
}

TEMPLATE_TEST_CASE("validation fails before writing the output", "[validation]", ALL_APIS) {
  shapes s;
  s.v[2] = 11;  // key count mismatch
  problem p(s);
  REQUIRE_THROWS_AS(TestType::run(p), std::invalid_argument);
  for (float x : p.os) REQUIRE(x == 42.0f);

  problem p2;
  typename TestType::options o;
  o.threads = -1;  // an option error, checked after the shapes
  REQUIRE_THROWS_AS(TestType::run(p2, o), std::invalid_argument);
  for (float x : p2.os) REQUIRE(x == 42.0f);
}

// ---------------------------------------------------------------------------------------------
// Options.

TEMPLATE_TEST_CASE("validation rejects a negative thread count", "[validation][options]", ALL_APIS) {
  for (int t : {-1, -8}) {
    INFO("threads = " << t);
    problem p;
    typename TestType::options o;
    o.threads = t;
    require_invalid_argument([&] { TestType::run(p, o); }, {fn_name<TestType>(), "threads", std::to_string(t)});
  }
}

TEMPLATE_TEST_CASE("validation rejects a non-finite scale", "[validation][options]", ALL_APIS) {
  for (double sc : {kNaN, kInf, -kInf}) {
    INFO("scale = " << sc);
    problem p;
    require_invalid_argument([&] { TestType::run(p, TestType::with_scale(sc)); },
                             {fn_name<TestType>(), "scale", "finite"});
  }
}

TEST_CASE("polynomial_attention rejects an odd, zero or negative degree", "[validation][options][polynomial]") {
  for (int d : {1, 3, 5, 0, -2, -4, -3}) {
    INFO("degree = " << d);
    problem p;
    polynomial_options o;
    o.degree = d;
    require_invalid_argument([&] { polynomial_api::run(p, o); },
                             {"polyattn::polynomial_attention", "degree", "even", std::to_string(d)});
  }
  for (int d : {2, 4, 6, 8, 16}) {
    INFO("degree = " << d);
    problem p;
    polynomial_options o;
    o.degree = d;
    REQUIRE_NOTHROW(polynomial_api::run(p, o));
    CHECK(all_finite(p.os));
  }
}

TEST_CASE("polynomial_attention rejects a negative or NaN normalizer_bias", "[validation][options][polynomial]") {
  for (double b : {-1.0, -1e-30, kNaN, kInf}) {
    INFO("normalizer_bias = " << b);
    problem p;
    polynomial_options o;
    o.normalizer_bias = b;
    require_invalid_argument([&] { polynomial_api::run(p, o); },
                             {"polyattn::polynomial_attention", "normalizer_bias"});
  }
  for (double b : {0.0, 1e-9, 1.0, 100.0}) {
    INFO("normalizer_bias = " << b);
    problem p;
    polynomial_options o;
    o.normalizer_bias = b;
    REQUIRE_NOTHROW(polynomial_api::run(p, o));
    CHECK(all_finite(p.os));
  }
}

// ---------------------------------------------------------------------------------------------
// Single-head Eigen overloads validate through the same checks.

TEMPLATE_TEST_CASE("validation of the single-head Eigen overload", "[validation][eigen]", ALL_APIS) {
  const matrix<float> q = matrix<float>::Constant(5, 4, 0.1f);
  const matrix<float> k = matrix<float>::Constant(7, 4, 0.2f);
  const matrix<float> v = matrix<float>::Constant(7, 3, 1.0f);

  matrix<float> out;
  REQUIRE_NOTHROW(out = TestType::run_eigen(q, k, v));
  CHECK(out.rows() == 5);
  CHECK(out.cols() == 3);

  const matrix<float> k3 = matrix<float>::Constant(7, 3, 0.2f);
  require_invalid_argument([&] { TestType::run_eigen(q, k3, v); },
                           {fn_name<TestType>(), "head dim", "'k'", "[1, 1, 7, 3]", "'q'", "[1, 1, 5, 4]"});

  const matrix<float> v6 = matrix<float>::Constant(6, 3, 1.0f);
  require_invalid_argument([&] { TestType::run_eigen(q, k, v6); },
                           {fn_name<TestType>(), "key count", "'v'", "[1, 1, 6, 3]", "'k'", "[1, 1, 7, 4]"});
}
