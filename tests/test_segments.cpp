// tests/test_segments.cpp — the exact kernels over segmented keys and values (segmented_view):
// attended as their concatenation, forward and backward, against the dense oracles on the
// concatenated sequence and against the plain kernels on it.
#include "support/backward_battery.hpp"
#include "support/throws.hpp"

using namespace polyattn;
using namespace polyattn::test;

namespace {

/// The rows [begin, begin + n) of `full` along the sequence, as a tensor of their own
/// (alternately [B, H, n, d] and strided [B, n, H, d] storage).
template <class T>
tensor4<T> rows_of(const tensor4<T>& full, index_t begin, index_t n, bool bnhd) {
  const auto& v = full.view;
  tensor4<T> t(v.extent(0), v.extent(1), n, v.extent(3), bnhd);
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t h = 0; h < v.extent(1); ++h)
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < v.extent(3); ++c) t(b, h, i, c) = v(b, h, begin + i, c);
  return t;
}

/// A sequence cut into segments of the given lengths, each in its own buffer.
template <class T>
struct segments {
  std::vector<tensor4<T>> parts;
  segments(const tensor4<T>& full, const std::vector<index_t>& lengths) {
    index_t at = 0;
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      parts.push_back(rows_of(full, at, lengths[s], s % 2 == 1));
      at += lengths[s];
    }
    REQUIRE(at == full.view.extent(2));
  }
  segmented_view<T> view() {
    std::vector<tensor_view<T, 4>> v;
    for (auto& p : parts) v.push_back(p.view);
    return segmented_view<T>(v);
  }
  segmented_view<const T> cview() {
    std::vector<tensor_view<const T, 4>> v;
    for (auto& p : parts) v.push_back(p.view);
    return segmented_view<const T>(v);
  }
  /// Back into one tensor shaped like `like`.
  tensor4<T> joined(const tensor4<T>& like) const {
    tensor4<T> t(like.view.extent(0), like.view.extent(1), like.view.extent(2), like.view.extent(3));
    index_t at = 0;
    for (const auto& p : parts) {
      for (index_t b = 0; b < p.view.extent(0); ++b)
        for (index_t h = 0; h < p.view.extent(1); ++h)
          for (index_t i = 0; i < p.view.extent(2); ++i)
            for (index_t c = 0; c < p.view.extent(3); ++c) t(b, h, at + i, c) = p(b, h, i, c);
      at += p.view.extent(2);
    }
    return t;
  }
};

/// Max |a − b| over all elements.
template <class T>
double max_diff(const tensor4<T>& a, const tensor4<T>& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.storage.size(); ++i)
    e = std::max(e, std::abs(double(a.storage[i]) - double(b.storage[i])));
  return e;
}

template <class T>
double tolerance(double magnitude) {
  return (std::is_same_v<T, float> ? 2e-5 : 1e-12) * std::max(1.0, magnitude);
}

struct segment_case {
  attention_shape shape;
  std::vector<index_t> lengths;  // sums to Nk
};

std::vector<segment_case> segment_cases() {
  return {
      {{1, 2, 1, 200, 333, 40, 24, false}, {0, 1, 150, 0, 131, 51}},   // empty and length-1 segments
      {{2, 4, 2, 97, 113, 19, 33, false}, {50, 13, 50}},               // GQA, batch 2
      {{1, 1, 1, 1, 257, 16, 16, false}, {128, 128, 1}},               // a decode step over a paged cache
      {{1, 1, 1, 300, 97, 17, 9, false}, {1, 95, 1}},                  // Nq > Nk: early rows see nothing
      {{1, 1, 1, 64, 64, 8, 8, false}, {64}},                          // one segment
  };
}

}  // namespace

TEMPLATE_TEST_CASE("segmented keys and values attend as their concatenation", "[segments]", float, double) {
  using T = TestType;
  for (const segment_case& sc : segment_cases())
    for (const bool causal : {false, true})
      for (const index_t window : {index_t(-1), index_t(20)}) {
        const attention_shape& s = sc.shape;
        INFO(s.str() << " causal " << causal << " window " << window << " segments " << sc.lengths.size());
        backward_inputs<T> in(s, 31);
        segments<T> ks(in.k, sc.lengths), vs(in.v, sc.lengths);
        exact_case_options o{causal, 2};
        o.window_left = window;
        if (window >= 0) o.global.assign(1, std::min<index_t>(3, s.nk - 1));
        const test_mask mask = o.mask();

        // forward: every kernel, with and without stats, against the oracle and the plain kernel
        for (int kernel = 0; kernel < 3; ++kernel) {
          tensor4<T> plain(s.batch, s.heads, s.nq, s.dv), seg(s.batch, s.heads, s.nq, s.dv);
          tensor3<T> stats(s.batch, s.heads, s.nq);
          dense_result exact;
          if (kernel == 2) {
            polynomial_options p = polynomial_kernel::options(o);
            polynomial_attention<T>(in.q.view, in.k.view, in.v.view, plain.view, p);
            polynomial_attention<T>(in.q.view, ks.cview(), vs.cview(), seg.view, p, stats.view);
            exact = polynomial_oracle<T>(in.q.cview(), in.k.cview(), in.v.cview(), mask, p.degree, p.scale,
                                         p.normalizer_bias);
          } else {
            const softmax_options so = flash_kernel::options(o);
            if (kernel == 0) {
              flash_attention<T>(in.q.view, in.k.view, in.v.view, plain.view, so);
              flash_attention<T>(in.q.view, ks.cview(), vs.cview(), seg.view, so, stats.view);
            } else {
              softmax_attention<T>(in.q.view, in.k.view, in.v.view, plain.view, so);
              softmax_attention<T>(in.q.view, ks.cview(), vs.cview(), seg.view, so);
            }
            exact = softmax_oracle<T>(in.q.cview(), in.k.cview(), in.v.cview(), mask,
                                      flash_kernel::effective_scale(o, s.d));
          }
          const error_summary plain_err = compare<T>(plain.cview(), exact), seg_err = compare<T>(seg.cview(), exact);
          INFO("kernel " << kernel << ": segmented error " << seg_err.max_abs << ", plain error " << plain_err.max_abs);
          REQUIRE(seg_err.finite);
          CHECK(seg_err.max_abs <= 2 * plain_err.max_abs + tolerance<T>(0) * 1e-2);
          CHECK(max_diff(plain, seg) <= tolerance<T>(1));
        }

        // backward: dk, dv written into segments, against the plain backward on the concatenation
        for (const bool poly : {false, true}) {
          backward_inputs<T> ref(s, 31);
          if (poly)
            ref.template run<polynomial_backward_kernel>(o);
          else
            ref.template run<flash_backward_kernel>(o);
          segments<T> dks(in.dk, sc.lengths), dvs(in.dv, sc.lengths);  // (shapes only: overwritten)
          for (auto* part : {&dks, &dvs})
            for (auto& t : part->parts) std::fill(t.storage.begin(), t.storage.end(), std::numeric_limits<T>::quiet_NaN());
          if (poly)
            polynomial_attention_backward<T>(in.q.view, ks.cview(), vs.cview(), ref.out.view, ref.dout.view,
                                             ref.stats.view, in.dq.view, dks.view(), dvs.view(),
                                             polynomial_kernel::options(o));
          else
            flash_attention_backward<T>(in.q.view, ks.cview(), vs.cview(), ref.out.view, ref.dout.view, ref.stats.view,
                                        in.dq.view, dks.view(), dvs.view(), flash_kernel::options(o));
          const tensor4<T> dk = dks.joined(ref.dk), dv = dvs.joined(ref.dv);
          INFO("polynomial " << poly);
          const double mag = std::max({max_abs_of<T>(ref.dq.cview()), max_abs_of<T>(ref.dk.cview()),
                                       max_abs_of<T>(ref.dv.cview())});
          // (dq is compared through a contiguous copy: in.dq may be strided)
          CHECK(max_diff(rows_of(in.dq, 0, s.nq, false), rows_of(ref.dq, 0, s.nq, false)) <= tolerance<T>(mag));
          CHECK(max_diff(dk, rows_of(ref.dk, 0, s.nk, false)) <= tolerance<T>(mag));
          CHECK(max_diff(dv, rows_of(ref.dv, 0, s.nk, false)) <= tolerance<T>(mag));
        }
      }
}

TEST_CASE("segments cut at whole key blocks give the plain kernels' bits, for any thread count", "[segments][threads]") {
  // 384 is a multiple of the forward's 128-key and the backward's 96-key blocks: the same tiles
  const attention_shape s{1, 2, 1, 300, 868, 32, 16, false};
  const std::vector<index_t> lengths{384, 0, 384, 100};
  for (const bool causal : {false, true}) {
    backward_inputs<float> a(s, 5);
    exact_case_options o{causal, 1};
    a.run<flash_backward_kernel>(o);
    segments<float> ks(a.k, lengths), vs(a.v, lengths);
    for (int threads : {1, 2, 3}) {
      INFO("causal " << causal << " threads " << threads);
      o.threads = threads;
      tensor4<float> out(s.batch, s.heads, s.nq, s.dv), dq(s.batch, s.heads, s.nq, s.d);
      tensor3<float> stats(s.batch, s.heads, s.nq);
      segments<float> dks(a.k, lengths), dvs(a.v, lengths);
      const softmax_options so = flash_kernel::options(o);
      flash_attention<float>(a.q.view, ks.cview(), vs.cview(), out.view, so, stats.view);
      CHECK(bitwise_equal<float>(out.cview(), a.out.cview()));
      flash_attention_backward<float>(a.q.view, ks.cview(), vs.cview(), out.view, a.dout.view, stats.view, dq.view,
                                      dks.view(), dvs.view(), so);
      CHECK(bitwise_equal<float>(dq.cview(), a.dq.cview()));
      const tensor4<float> dk = dks.joined(a.dk), dv = dvs.joined(a.dv);
      CHECK(bitwise_equal<float>(dk.cview(), a.dk.cview()));
      CHECK(bitwise_equal<float>(dv.cview(), a.dv.cview()));
    }
  }
}

TEST_CASE("segmented arguments are validated", "[segments][validation]") {
  const attention_shape s{1, 2, 1, 8, 10, 4, 4, false};
  backward_inputs<float> in(s, 3);
  segments<float> ks(in.k, {4, 6}), vs(in.v, {4, 6}), dks(in.k, {4, 6}), dvs(in.v, {4, 6});
  auto flash = [&](segmented_view<const float> k, segmented_view<const float> v) {
    flash_attention<float>(in.q.view, k, v, in.out.view, softmax_options{});
  };
  require_invalid_argument([&] { flash({}, {}); }, {"flash_attention", "'k' has no segments"});
  require_invalid_argument([&] { flash(ks.cview(), segmented_view<const float>{vs.parts[0].view}); },
                           {"flash_attention", "as many segments", "2 and 1"});
  tensor4<float> odd(1, 1, 6, 4);  // one kv head where k[0] has... and q needs a multiple
  tensor4<float> wide(1, 1, 6, 5);
  require_invalid_argument([&] { flash({ks.parts[0].view, wide.view}, vs.cview()); },
                           {"flash_attention", "head dim", "k[1]"});
  tensor4<float> two_heads(1, 2, 6, 4);
  require_invalid_argument([&] { flash({ks.parts[0].view, two_heads.view}, {vs.parts[0].view, two_heads.view}); },
                           {"flash_attention", "kv head count", "k[1]"});
  tensor4<float> short_v(1, 1, 5, 4);
  require_invalid_argument([&] { flash(ks.cview(), {vs.parts[0].view, short_v.view}); },
                           {"flash_attention", "key count", "v[1]"});
  // the output overlapping a segment
  require_invalid_argument(
      [&] {
        flash_attention<float>(in.q.view, segmented_view<const float>{ks.parts[0].view, in.out.view},
                               segmented_view<const float>{vs.parts[0].view, in.out.view}, in.out.view, softmax_options{});
      },
      {"flash_attention", "overlap"});
  (void)odd;
  // backward: a gradient segment overlapping another segment's input, and two gradient segments sharing memory
  auto backward = [&](segmented_view<float> dk, segmented_view<float> dv) {
    flash_attention_backward<float>(in.q.view, ks.cview(), vs.cview(), in.out.view, in.dout.view, in.stats.view,
                                    in.dq.view, dk, dv, softmax_options{});
  };
  flash_attention<float>(in.q.view, ks.cview(), vs.cview(), in.out.view, softmax_options{}, in.stats.view);
  REQUIRE_NOTHROW(backward(dks.view(), dvs.view()));
  tensor_view<float, 4> k1_alias(ks.parts[1].storage.data(), {1, 1, 6, 4});
  require_invalid_argument([&] { backward({dks.parts[0].view, k1_alias}, dvs.view()); },
                           {"flash_attention_backward", "dk[1]", "k[1]"});
  tensor_view<float, 4> dk0_alias(dks.parts[0].storage.data(), {1, 1, 6, 4});
  require_invalid_argument([&] { backward(dks.view(), {dvs.parts[0].view, dk0_alias}); },
                           {"flash_attention_backward", "overlap"});
  require_invalid_argument([&] { backward(segmented_view<float>{dks.parts[0].view}, dvs.view()); },
                           {"flash_attention_backward", "as many segments"});
  polynomial_options p;
  p.global_positions.assign(1, 10);  // positions run over the total length 10
  require_invalid_argument(
      [&] { polynomial_attention<float>(in.q.view, ks.cview(), vs.cview(), in.out.view, p); },
      {"polynomial_attention", "global_positions", "[0, 10)"});
}

namespace {

/// Key j of `buf` ([1, 1, n, d], contiguous) as a one-key segment.
template <class T>
tensor_view<T, 4> key_row(tensor4<T>& buf, index_t j) {
  return tensor_view<T, 4>(buf.view.data() + j * buf.view.extent(3), {1, 1, 1, buf.view.extent(3)});
}

}  // namespace

TEST_CASE("many one-key segments: the backward validates them as a sweep, and still finds every overlap",
          "[segments][validation]") {
  // The backward used to check every pair of segments: ~18 s of validation for 10^4 segments.
  const index_t n = 10000, d = 4;
  const attention_shape s{1, 1, 1, 3, n, d, d, false};
  backward_inputs<float> in(s, 7);
  flash_attention<float>(in.q.view, in.k.cview(), in.v.cview(), in.out.view, softmax_options{}, in.stats.view);
  std::vector<tensor_view<const float, 4>> k, v;
  std::vector<tensor_view<float, 4>> dk, dv;
  for (index_t j = 0; j < n; ++j) {
    k.push_back(key_row(in.k, j));
    v.push_back(key_row(in.v, j));
    dk.push_back(key_row(in.dk, j));
    dv.push_back(key_row(in.dv, j));
  }
  auto backward = [&](const std::vector<tensor_view<float, 4>>& gk, const std::vector<tensor_view<float, 4>>& gv) {
    flash_attention_backward<float>(in.q.view, segmented_view<const float>(k), segmented_view<const float>(v),
                                    in.out.view, in.dout.view, in.stats.view, in.dq.view, segmented_view<float>(gk),
                                    segmented_view<float>(gv), softmax_options{});
  };
  REQUIRE_NOTHROW(backward(dk, dv));
  // the plain kernel on the same keys: the gradients agree (one-key segments cut every tile)
  backward_inputs<float> plain(s, 7);
  flash_attention<float>(plain.q.view, plain.k.cview(), plain.v.cview(), plain.out.view, softmax_options{},
                         plain.stats.view);
  flash_attention_backward<float>(plain.q.view, plain.k.cview(), plain.v.cview(), plain.out.view, plain.dout.view,
                                  plain.stats.view, plain.dq.view, plain.dk.view, plain.dv.view, softmax_options{});
  CHECK(max_diff(in.dk, plain.dk) <= 1e-5);
  CHECK(max_diff(in.dv, plain.dv) <= 1e-5);
  // a gradient segment on another segment's key, far apart in the list
  auto bad_dk = dk;
  bad_dk[n - 1] = tensor_view<float, 4>(const_cast<float*>(k[0].data()), {1, 1, 1, d});
  require_invalid_argument([&] { backward(bad_dk, dv); },
                           {"flash_attention_backward", "output 'dk[9999]'", "overlaps input 'k[0]'"});
  auto bad_dv = dv;
  bad_dv[5000] = tensor_view<float, 4>(const_cast<float*>(v[17].data()), {1, 1, 1, d});
  require_invalid_argument([&] { backward(dk, bad_dv); },
                           {"flash_attention_backward", "output 'dv[5000]'", "overlaps input 'v[17]'"});
  // two gradient segments on one row, found however far apart they are in the list
  bad_dv = dv;
  bad_dv[7] = dk[4000];
  require_invalid_argument([&] { backward(dk, bad_dv); },
                           {"flash_attention_backward", "outputs 'dk[4000]'", "'dv[7]'", "overlap"});
  bad_dk = dk;
  bad_dk[100] = tensor_view<float, 4>(in.dv.view.data() + 99 * d, {1, 1, 1, d});
  require_invalid_argument([&] { backward(bad_dk, dv); },
                           {"flash_attention_backward", "'dk[100]'", "'dv[99]'", "overlap"});
}

TEST_CASE("overlap messages say that the test is on address ranges", "[segments][validation]") {
  // dk and dv interleaved in one buffer share no element, and are still rejected: the message says why
  const attention_shape s{1, 1, 1, 4, 6, 4, 4, false};
  backward_inputs<float> in(s, 9);
  flash_attention<float>(in.q.view, in.k.cview(), in.v.cview(), in.out.view, softmax_options{}, in.stats.view);
  std::vector<float> both(2 * 6 * 4);
  const tensor_view<float, 4> dk(both.data(), {1, 1, 6, 4}, {48, 48, 8, 1}), dv(both.data() + 4, {1, 1, 6, 4}, {48, 48, 8, 1});
  require_invalid_argument(
      [&] {
        flash_attention_backward<float>(in.q.view, in.k.cview(), in.v.cview(), in.out.view, in.dout.view,
                                        in.stats.view, in.dq.view, dk, dv, softmax_options{});
      },
      {"flash_attention_backward", "outputs 'dk'", "'dv'", "overlap", "address ranges"});
}
