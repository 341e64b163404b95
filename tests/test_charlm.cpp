// tests/test_charlm.cpp — the character-level language model of examples/charlm/train_charlm.cpp:
// the whole model's gradients against central finite differences in double for every attention
// kind, a short training run whose loss must fall, the verse-label stripping of the KJV text and
// the command line. The example is included whole (llm.c's test_gpt2.c does the same), without
// its main.
#define CHARLM_NO_MAIN
#include "train_charlm.cpp"

#include <catch2/catch.hpp>

#include <set>

using namespace charlm;

namespace {

/// A small text with some structure to learn (repeated phrases, a few hundred characters).
std::string sample_text(int repeats) {
  const std::string verses[] = {
      "and the lamp was lit in the house, and the light was upon the table.\n",
      "and the sower went forth to sow, and the seed fell upon the good ground.\n",
      "and the light was good, and the ground brought forth fruit in its season.\n",
  };
  std::string s;
  for (int i = 0; i < repeats; ++i) s += verses[i % 3];
  return s;
}

/// The tiny model of the gradient check: 2 layers, 2 heads of dim 4, context 12 in blocks of 4
/// (so the sketched kinds use both their exact local block and their sketched past).
config tiny_config(attention_kind kind, bool local_exact, index_t vocab) {
  config c;
  c.kind = kind, c.local_exact = local_exact;
  c.context = 12, c.layers = 2, c.dim = 8, c.heads = 2, c.batch = 2;
  c.sketch_size = 3, c.block = 4, c.degree = 4, c.threads = 1, c.seed = 7, c.vocab = vocab;
  c.rope = false;  // the model of §9.1; the gradient check's ablation variants add RoPE and the rest
  return c;
}

struct batch {
  std::vector<int> x, y;
};

batch first_windows(const dataset& d, index_t B, index_t N) {
  batch b;
  for (index_t i = 0; i < B; ++i)
    for (index_t t = 0; t < N; ++t) {
      const std::size_t off = std::size_t(i * 31 + t);  // overlapping windows at offsets 0, 31, …
      b.x.push_back(d.train[off]), b.y.push_back(d.train[off + 1]);
    }
  return b;
}

}  // namespace

TEST_CASE("charlm: the whole model's gradients match central finite differences (double)", "[charlm]") {
  const dataset data = load_text(sample_text(6));
  const index_t V = index_t(data.chars.size());
  struct variant {
    attention_kind kind;
    bool local_exact, ablation;  // ablation: --rope, --head-gain and a learned β (polynomial kinds)
  };
  const variant kinds[] = {
      {attention_kind::softmax, false, false},   {attention_kind::polynomial, false, false},
      {attention_kind::polysketch, false, false}, {attention_kind::polysketch, true, false},
      {attention_kind::learned, false, false},    {attention_kind::learned, true, false},
      {attention_kind::softmax, false, true},    {attention_kind::polynomial, false, true},
      {attention_kind::polysketch, true, true},  {attention_kind::learned, true, true}};
  for (const auto& [kind, local_exact, ablation] : kinds) {
    config c = tiny_config(kind, local_exact, V);
    if (ablation) c.rope = c.head_gain = c.learn_bias = true, c.normalizer_bias = 0.5;
    model<double> m(c);
    // parameters of order 0.3 rather than the 0.02 of training's init, so that every path
    // (attention weights far from uniform, GELU and tanh away from their linear parts) carries
    // gradient; the gains stay near 1
    rng gen(99);
    for (const param_tensor& t : m.layout)
      for (index_t i = 0; i < t.rows * t.cols; ++i) m.param[std::size_t(t.offset + i)] += 0.3 * gen.normal();
    const batch b = first_windows(data, c.batch, c.context);
    m.forward(b.x.data(), b.y.data(), c.batch);
    m.zero_grad();
    m.backward();
    const std::vector<double> analytic = m.grad;
    auto loss_at = [&](std::size_t i, double x) {
      const double keep = m.param[i];
      m.param[i] = x;
      const double l = m.forward(b.x.data(), b.y.data(), c.batch);
      m.param[i] = keep;
      return l;
    };
    // every parameter tensor: its largest-gradient entry and three random ones
    double worst = 0;
    std::string worst_at;
    index_t checked = 0;
    for (const param_tensor& t : m.layout) {
      const index_t n = t.rows * t.cols;
      std::set<index_t> picks;
      index_t arg = 0;
      for (index_t i = 1; i < n; ++i)
        if (std::abs(analytic[std::size_t(t.offset + i)]) > std::abs(analytic[std::size_t(t.offset + arg)])) arg = i;
      picks.insert(arg);
      for (int j = 0; j < 3; ++j) picks.insert(gen.below(n));
      for (index_t i : picks) {
        const std::size_t at = std::size_t(t.offset + i);
        // the ablation's tiny models (rope, head gain and learned β on parameters moved by 0.3) have
        // large higher derivatives: polysketch's worst entry is off by 1 % at h = 1e-3 and by
        // 3e-6 at 1e-4, and converges as h shrinks (3e-7 at 1e-5); 3e-5 keeps both that error and
        // the rounding (about 1e-16·L/h) well below the bound
        const double h = ablation ? 3e-5 : 1e-4, x = m.param[at];
        // the five-point central difference: truncation O(h^4 f5), rounding about 1e-16 L/h, 1e-12
        const double fd = (8 * (loss_at(at, x + h) - loss_at(at, x - h)) -
                           (loss_at(at, x + 2 * h) - loss_at(at, x - 2 * h))) / (12 * h);
        const double an = analytic[at];
        // relative error; below gradients of 1e-4 an absolute one of at most 1e-10 (the
        // difference quotient's rounding is about 1e-12 here)
        const double err = std::abs(fd - an) / (1e-4 + std::abs(fd) + std::abs(an));
        if (err > worst) worst = err, worst_at = t.name + "[" + std::to_string(i) + "] fd " + std::to_string(fd) +
                                                 " analytic " + std::to_string(an);
        ++checked;
      }
    }
    INFO(kind_name(kind) << (local_exact ? " local_exact" : "") << (ablation ? " rope, head gain, learned bias" : "")
                         << ": " << checked << " entries of "
                         << m.layout.size() << " tensors, worst relative error " << worst << " at " << worst_at);
    CHECK(checked >= index_t(m.layout.size()));
    CHECK(worst < 1e-6);
  }
}

TEST_CASE("charlm: the gradients are not zero where they must not be", "[charlm]") {
  // the finite-difference check compares only entries; a path that is cut (an attention kind
  // whose q, k or sketch get no gradient) would pass it with both sides zero, so every tensor
  // of every kind must have some non-zero gradient
  const dataset data = load_text(sample_text(6));
  for (attention_kind kind :
       {attention_kind::softmax, attention_kind::polynomial, attention_kind::polysketch, attention_kind::learned}) {
    const config c = tiny_config(kind, true, index_t(data.chars.size()));
    model<double> m(c);
    const batch b = first_windows(data, c.batch, c.context);
    m.forward(b.x.data(), b.y.data(), c.batch);
    m.zero_grad();
    m.backward();
    for (const param_tensor& t : m.layout) {
      double s = 0;
      for (index_t i = 0; i < t.rows * t.cols; ++i) s += std::abs(m.grad[std::size_t(t.offset + i)]);
      INFO(kind_name(kind) << " " << t.name << ": sum of |gradient| " << s);
      // softmax is invariant to a key bias (q·(k + b) shifts a row's scores by a constant):
      // its bk has no gradient, up to rounding
      if (kind == attention_kind::softmax && t.name.size() > 3 && t.name.substr(t.name.size() - 3) == ".bk")
        CHECK(s < 1e-12);
      else
        CHECK(s > 1e-8);
    }
  }
}

TEST_CASE("charlm: a short training run lowers the loss for every attention kind", "[charlm]") {
  const dataset data = load_text(sample_text(40));
  for (attention_kind kind :
       {attention_kind::softmax, attention_kind::polynomial, attention_kind::polysketch, attention_kind::learned}) {
    config c;
    c.kind = kind, c.local_exact = true;
    c.context = 32, c.layers = 1, c.dim = 32, c.heads = 2, c.batch = 4, c.steps = 100, c.warmup = 10, c.lr = 1e-2;
    c.sketch_size = 8, c.block = 8, c.threads = 1, c.vocab = index_t(data.chars.size());
    model<float> m(c);
    rng gen(3);
    std::vector<int> x, y;
    double first = 0, last = 0;
    for (index_t step = 1; step <= c.steps; ++step) {
      sample_batch(x, y, data.train, c.batch, c.context, gen);
      const double loss = m.forward(x.data(), y.data(), c.batch);
      m.zero_grad();
      m.backward();
      m.clip_gradients(c.grad_clip);
      m.adamw_step(learning_rate(c, step), step);
      if (step <= 5) first += loss / 5;
      if (step > c.steps - 5) last += loss / 5;
    }
    const double bpc = evaluate(m, data.val, 0, nullptr);
    INFO(kind_name(kind) << ": mean loss of the first 5 steps " << first << ", of the last 5 " << last
                         << " nats; validation " << bpc << " bits/char; log V = " << std::log(double(c.vocab)));
    CHECK(first > 0.8 * std::log(double(c.vocab)));  // it starts near chance
    CHECK(last < 0.5 * first);                        // and learns the phrases
    CHECK(bpc * std::log(2.0) < 0.6 * first);
  }
}

TEST_CASE("charlm: strip_verse_labels removes bible -f's labels and rejects other lines", "[charlm]") {
  index_t verses = 0;
  const std::string in =
      "Ge1:1 In the beginning God created the heaven and the earth.\n"
      "SSol1:1 The song of songs, which is Solomon's.\n"
      "1Cor13:4 Charity suffereth long, and is kind;\n"
      "3Jn1:15 Peace be to thee. Our friends salute thee.\n"
      "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.\n";
  CHECK(strip_verse_labels(in, &verses) ==
        "In the beginning God created the heaven and the earth.\n"
        "The song of songs, which is Solomon's.\n"
        "Charity suffereth long, and is kind;\n"
        "Peace be to thee. Our friends salute thee.\n"
        "The grace of our Lord Jesus Christ be with you all. Amen.\n");
  CHECK(verses == 5);
  // a last line without its newline still gets one; a label in the middle of a verse stays
  CHECK(strip_verse_labels("Psa23:1 The LORD is my shepherd; see Joh10:11", &verses) ==
        "The LORD is my shepherd; see Joh10:11\n");
  CHECK(verses == 1);
  for (const char* bad : {"In the beginning\n", "Ge1 In the beginning\n", "Ge1:1In the beginning\n", "Ge:1 x\n",
                          "Ge1:1 ok\n\n", "12Cor1:1 x\n"})
    CHECK_THROWS_WITH(strip_verse_labels(bad), Catch::Contains("does not start with a verse label"));
}

TEST_CASE("charlm: the data split and the command line", "[charlm]") {
  const std::string text = sample_text(9);
  const dataset d = load_text(text);
  CHECK(d.train.size() + d.val.size() == text.size());
  CHECK(d.val.size() == text.size() / 20);
  CHECK(d.chars[std::size_t(d.val.back())] == '\n');
  std::vector<std::string> args = {"train_charlm", "--data", "x.txt", "--attention", "learned", "--local-exact",
                                   "--context", "64", "--threads", "1"};
  auto parse = [&](std::vector<std::string> a) {
    std::vector<char*> argv;
    for (std::string& s : a) argv.push_back(s.data());
    return parse_args(int(argv.size()), argv.data());
  };
  const config c = parse(args);
  CHECK(c.kind == attention_kind::learned);
  CHECK(c.local_exact);
  CHECK(c.context == 64);
  CHECK(c.threads == 1);
  CHECK_THROWS_WITH(parse({"train_charlm", "--data", "x", "--attention", "cosine"}), Catch::Contains("--attention"));
  CHECK_THROWS_WITH(parse({"train_charlm", "--data", "x", "--dim", "10", "--heads", "4"}), Catch::Contains("--heads"));
  CHECK_THROWS_WITH(parse({"train_charlm", "--data", "x", "--steps", "-3"}), Catch::Contains("--steps"));
  CHECK_THROWS_WITH(parse({"train_charlm", "--context", "8"}), Catch::Contains("--data"));
  CHECK_THROWS_WITH(parse({"train_charlm", "--data", "x", "--attention", "polysketch", "--degree", "6"}),
                    Catch::Contains("--degree"));
  // the ablation flags
  const config a = parse({"train_charlm", "--data", "x", "--rope", "--head-gain", "--normalizer-bias", "learned",
                          "--beta2", "0.99", "--qk-lr", "3", "--qk-gain-init", "0.5", "--attn-log", "a.csv"});
  CHECK((a.rope && a.head_gain && a.learn_bias && a.beta2 == 0.99 && a.qk_lr == 3 && a.qk_gain_init == 0.5));
  CHECK(a.attn_log == "a.csv");
  CHECK(parse({"train_charlm", "--data", "x", "--normalizer-bias", "0"}).normalizer_bias == 0);
  CHECK(parse({"train_charlm", "--data", "x"}).rope);  // the recipe of docs/design.md §9.8
  CHECK_FALSE(parse({"train_charlm", "--data", "x", "--no-rope"}).rope);
  CHECK_FALSE(parse({"train_charlm", "--data", "x", "--normalizer-bias", "0"}).learn_bias);
  CHECK_THROWS_WITH(parse({"train_charlm", "--data", "x", "--beta2", "1"}), Catch::Contains("--beta2"));
  CHECK_THROWS_WITH(parse({"train_charlm", "--data", "x", "--rope", "--dim", "9", "--heads", "3"}),
                    Catch::Contains("--rope"));
}

TEST_CASE("charlm: RoPE makes q·k depend on the offset only, and its inverse undoes it", "[charlm]") {
  const index_t N = 40, H = 2, hd = 8;
  const std::vector<double> cs = rope_table<double>(N, hd);
  rng gen(5);
  std::vector<double> u(std::size_t(hd * H)), w(std::size_t(hd * H));
  for (double& x : u) x = gen.normal();
  for (double& x : w) x = gen.normal();
  // the same q at every position, the same k at every position: after rotation q_t·k_s is a
  // function of t − s (and differs between offsets)
  std::vector<double> q, k;
  for (index_t t = 0; t < N; ++t) q.insert(q.end(), u.begin(), u.end()), k.insert(k.end(), w.begin(), w.end());
  const std::vector<double> q0 = q;
  rope_rotate(q.data(), cs.data(), N, N, H, hd, false, 1);
  rope_rotate(k.data(), cs.data(), N, N, H, hd, false, 1);
  auto dot = [&](index_t t, index_t s, index_t h) {
    double d = 0;
    for (index_t e = 0; e < hd; ++e) d += q[std::size_t((t * H + h) * hd + e)] * k[std::size_t((s * H + h) * hd + e)];
    return d;
  };
  for (index_t h = 0; h < H; ++h) {
    for (index_t off : {0, 1, 7})
      for (index_t t : {off, index_t(13), index_t(N - 1)}) CHECK(dot(t, t - off, h) == Approx(dot(off, 0, h)).margin(1e-12));
    CHECK(std::abs(dot(5, 4, h) - dot(5, 0, h)) > 1e-3);
  }
  rope_rotate(q.data(), cs.data(), N, N, H, hd, true, 1);
  for (std::size_t i = 0; i < q.size(); ++i) CHECK(q[i] == Approx(q0[i]).margin(1e-12));
}

TEST_CASE("charlm: attention_summary of rows with equal scores", "[charlm]") {
  // q = k = the same vector on every row (wq = wk = 0, bq = bk = c) makes every score of a row
  // equal: weights 1/(t + 1) (softmax) or w/(β + (t + 1)w) (polynomial), whose means over the
  // rows t = 1 … N−1 are written here in closed form
  const dataset data = load_text(sample_text(6));
  for (attention_kind kind : {attention_kind::softmax, attention_kind::polynomial}) {
    config c = tiny_config(kind, false, index_t(data.chars.size()));
    c.normalizer_bias = 3;
    model<double> m(c);
    const index_t C = c.dim, hd = c.head_dim(), N = c.context;
    const double cvec[] = {0.3, -1.2, 0.7, 2.0};  // per head dim; the heads get the same
    for (index_t l = 0; l < c.layers; ++l) {
      const layer_params<double>& w = m.p.layer[std::size_t(l)];
      std::fill(w.wq, w.wq + C * C, 0.0), std::fill(w.wk, w.wk + C * C, 0.0);
      for (index_t i = 0; i < C; ++i) w.bq[i] = w.bk[i] = cvec[i % hd];
    }
    const batch b = first_windows(data, c.batch, N);
    m.forward(b.x.data(), b.y.data(), c.batch);
    // polynomial: q' = k' = LayerNorm(c) (gain 1, bias 0), w = (scale·q'·q')^p
    double mu = 0, var = 0;
    for (double x : cvec) mu += x / double(hd);
    for (double x : cvec) var += (x - mu) * (x - mu) / double(hd);
    const double nn = double(hd) * var / (var + 1e-5), wgt = std::pow(nn * c.poly_scale(), c.degree);
    double prev = 0, entropy = 0;
    for (index_t t = 1; t < N; ++t) {
      prev += kind == attention_kind::softmax ? 1.0 / double(t + 1) : wgt / (3 + double(t + 1) * wgt);
      entropy += std::log2(double(t + 1));
    }
    prev /= double(N - 1), entropy /= double(N - 1);
    for (const auto& h : m.attention_summary(2)) {
      INFO(kind_name(kind));
      CHECK(h.prev == Approx(prev).epsilon(1e-9));
      CHECK(h.self == Approx(prev).epsilon(1e-9));
      CHECK(h.max == Approx(prev).epsilon(1e-9));
      CHECK(h.entropy == Approx(entropy).epsilon(1e-9));
    }
  }
}
