// examples/polysketch_error.cpp — how far is PolySketch attention from the exact polynomial
// attention it sketches? Prints a markdown table (README-ready) of the per-row relative error of
// polysketch_attention against polynomial_attention (p = 4, β = 1, causal, one head, d = 64,
// N = 1024) for sketch sizes r = 16..128, with local_exact off and on, on a few input
// distributions. Everything is seeded, so the output is reproducible.
//
// Returns 1 if an output or an error is not finite, or if the error on random inputs does not
// decrease from r = 16 to r = 128 (the property the sketch is supposed to have).
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

using polyattn::index_t;
using mat = polyattn::matrix<float>;

constexpr index_t N = 1024, d = 64;
constexpr int degree = 4;
constexpr index_t block = 256;                 // block size of the block algorithm (local_exact)
constexpr int sketch_seeds = 3;                // every table entry pools 3 independent sketches
const index_t sketch_sizes[] = {16, 32, 64, 128};

// Small portable Gaussian generator (splitmix64 + Box–Muller), so the inputs are the same with
// every standard library (std::normal_distribution is not specified bit for bit).
class gaussian {
 public:
  explicit gaussian(std::uint64_t seed) : state_(seed) {}
  double operator()() {
    if (have_spare_) { have_spare_ = false; return spare_; }
    const double u1 = uniform(), u2 = uniform(), rad = std::sqrt(-2.0 * std::log(u1));
    const double angle = 6.283185307179586 * u2;
    spare_ = rad * std::sin(angle);
    have_spare_ = true;
    return rad * std::cos(angle);
  }
  index_t below(index_t n) { return static_cast<index_t>(next() % static_cast<std::uint64_t>(n)); }  // [0, n)

 private:
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)
  std::uint64_t state_;
  double spare_ = 0;
  bool have_spare_ = false;
};

mat gaussian_matrix(index_t rows, index_t cols, gaussian& g, double stddev = 1.0) {
  mat m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < cols; ++c) m(i, c) = static_cast<float>(stddev * g());
  return m;
}

// What the model does to q and k before PolySketch attention: per row, zero mean and unit
// variance over the d entries (no learned gain/bias). Afterwards ‖row‖² = d.
void layer_norm_rows(mat& x) {
  for (index_t i = 0; i < x.rows(); ++i) {
    const double mean = x.row(i).cast<double>().mean();
    const double var = (x.row(i).cast<double>().array() - mean).square().mean();
    const double inv = 1.0 / std::sqrt(var + 1e-5);
    for (index_t c = 0; c < x.cols(); ++c) x(i, c) = static_cast<float>((x(i, c) - mean) * inv);
  }
}

struct problem {
  std::string name;
  mat q, k, v;
};

// 1. random: i.i.d. rows; q·k of two LayerNorm-ed rows is nearly orthogonal (|q·k| ~ √d ≪ d).
problem random_inputs() {
  gaussian g(101);
  problem p{"random", gaussian_matrix(N, d, g), gaussian_matrix(N, d, g), gaussian_matrix(N, d, g)};
  layer_norm_rows(p.q);
  layer_norm_rows(p.k);
  return p;
}

// 2./3. copies: q_i = LayerNorm(k_j + 0.3·noise) for one random earlier key j = j(i) <= i, so each
// query has one strongly matching key and attention is peaked (retrieval, the case where attention
// matters). window = 0: j uniform over [0, i]; window = w: j uniform over the last w positions.
problem copy_inputs(const char* name, index_t window, std::uint64_t seed) {
  gaussian g(seed);
  problem p{name, mat(N, d), gaussian_matrix(N, d, g), gaussian_matrix(N, d, g)};
  layer_norm_rows(p.k);
  for (index_t i = 0; i < N; ++i) {
    const index_t lo = window > 0 ? std::max<index_t>(0, i - window + 1) : 0;
    const index_t j = lo + g.below(i - lo + 1);
    for (index_t c = 0; c < d; ++c) p.q(i, c) = p.k(j, c) + static_cast<float>(0.3 * g());
  }
  layer_norm_rows(p.q);
  return p;
}

// 4. clustered: keys and queries are noisy copies of 16 random centres, so q·k is either large
// (same cluster, ~0.8 d) or small (~√d): a low-rank, strongly non-orthogonal regime.
problem clustered_inputs() {
  gaussian g(404);
  const index_t clusters = 16;
  const mat centres = gaussian_matrix(clusters, d, g);
  problem p{"clustered", mat(N, d), mat(N, d), gaussian_matrix(N, d, g)};
  for (mat* x : {&p.q, &p.k})
    for (index_t i = 0; i < N; ++i) {
      const index_t m = g.below(clusters);
      for (index_t c = 0; c < d; ++c) x->coeffRef(i, c) = centres(m, c) + static_cast<float>(0.5 * g());
    }
  layer_norm_rows(p.q);
  layer_norm_rows(p.k);
  return p;
}

struct stats {
  std::vector<double> errs;  // per-row relative errors, pooled over sketch seeds
  double late_sum = 0;        // errors of the rows past the first block (i >= block_size)
  double corr_sum = 0, used_mass = 0, exact_mass = 0;
  index_t late_rows = 0, corr_rows = 0;
  bool finite = true;
};

// Pearson correlation of two equally long sequences.
double correlation(const std::vector<double>& a, const std::vector<double>& b) {
  const double n = static_cast<double>(a.size());
  double ma = 0, mb = 0;
  for (std::size_t t = 0; t < a.size(); ++t) { ma += a[t]; mb += b[t]; }
  ma /= n;
  mb /= n;
  double sab = 0, saa = 0, sbb = 0;
  for (std::size_t t = 0; t < a.size(); ++t) {
    sab += (a[t] - ma) * (b[t] - mb);
    saa += (a[t] - ma) * (a[t] - ma);
    sbb += (b[t] - mb) * (b[t] - mb);
  }
  return sab / std::sqrt(saa * sbb);
}

int main() {
  const auto t0 = std::chrono::steady_clock::now();

  // Scale: with LayerNorm-ed rows ‖q‖² = ‖k‖² = d, so scale = 1/√d makes scale·q·k ~ N(0, 1) for
  // unrelated rows (weight (scale·q·k)^4 ≈ 3 on average) and ≈ 0.9·√d ≈ 7.6 for a noisy copy
  // (weight ≈ 3·10³), keeping the β = 1 of the normaliser in play without dominating it. The
  // paper's code uses scale = 1 (weights up to d^4 ≈ 1.7·10⁷); that only shrinks β's relative
  // influence: the sketch's relative error does not depend on the scale.
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));

  polyattn::polynomial_options exact_opts;
  exact_opts.causal = true;
  exact_opts.degree = degree;
  exact_opts.scale = scale;
  exact_opts.normalizer_bias = 1.0;
  exact_opts.threads = 1;  // results do not depend on threads; 1 keeps the run time predictable

  const problem problems[] = {random_inputs(), copy_inputs("copies", 0, 202),
                              copy_inputs("recent copies", 64, 303), clustered_inputs()};

  std::printf("PolySketch attention vs exact polynomial attention (p = %d, beta = 1, scale = 1/sqrt(d), causal,\n"
              "one head, d = %lld, N = %lld, LayerNorm-ed q and k; local_exact uses block_size = %lld).\n"
              "err: per-row ||out_sketch,i - out_exact,i|| / ||out_exact,i||, all rows of %d sketch seeds\n"
              "(i >= %lld: only the queries past the first block, which local_exact leaves fully exact).\n"
              "corr: mean over rows i >= 31 of the Pearson correlation of the weights used (sketched, or exact\n"
              "in the query's own block with local_exact) with the exact weights (scale q_i.k_j)^4, j <= i.\n"
              "mass: sum of the weights used / sum of the exact weights, over all causal pairs.\n\n",
              degree, static_cast<long long>(d), static_cast<long long>(N), static_cast<long long>(block),
              sketch_seeds, static_cast<long long>(block));
  std::printf("| inputs | r | features | local_exact | mean err | median err | mean err, i >= %lld | corr | mass |\n",
              static_cast<long long>(block));
  std::printf("|---|---:|---:|---|---:|---:|---:|---:|---:|\n");

  bool ok = true;
  for (const problem& pr : problems) {
    const mat exact = polyattn::polynomial_attention(pr.q, pr.k, pr.v, exact_opts);
    if (!exact.allFinite()) {
      std::printf("FAIL: exact output not finite on '%s'\n", pr.name.c_str());
      return 1;
    }
    const Eigen::VectorXd exact_norm = exact.cast<double>().rowwise().norm();
    // the exact weights (scale·q_i·k_j)^4
    const Eigen::MatrixXd exact_w = ((scale * pr.q.cast<double>()) * pr.k.cast<double>().transpose()).array().pow(4);

    std::vector<double> mean_err_by_r[2];  // for the check on random inputs
    for (const index_t r : sketch_sizes) {
      stats st[2];  // [local_exact]
      for (int seed = 1; seed <= sketch_seeds; ++seed) {
        polyattn::sketch_options sk_opts;
        sk_opts.degree = degree;
        sk_opts.sketch_size = r;
        sk_opts.seed = static_cast<std::uint64_t>(seed);
        const polyattn::polysketch<float> sketch(d, sk_opts);

        // the sketched weights φ(scale·q_i)·φ(k_j) = (s(scale·q_i)·s(k_j))², from the r-dim sketches
        const mat sq = sketch.sketch((static_cast<float>(scale) * pr.q).eval()), sk = sketch.sketch(pr.k);
        const Eigen::MatrixXd sketch_w = (sq.cast<double>() * sk.cast<double>().transpose()).array().square();

        for (int local = 0; local < 2; ++local) {
          stats& s = st[local];
          polyattn::polysketch_options opts;
          opts.causal = true;
          opts.block_size = block;
          opts.local_exact = local == 1;
          opts.scale = scale;
          opts.normalizer_bias = 1.0;
          opts.threads = 1;
          const mat out = polyattn::polysketch_attention(pr.q, pr.k, pr.v, sketch, opts);
          if (!out.allFinite()) s.finite = false;
          for (index_t i = 0; i < N; ++i) {
            const double err = (out.row(i) - exact.row(i)).cast<double>().norm() / exact_norm(i);
            s.errs.push_back(err);
            if (i >= block) {
              s.late_sum += err;
              ++s.late_rows;
            }
          }

          std::vector<double> used, ref;
          for (index_t i = 0; i < N; ++i) {
            used.assign(static_cast<std::size_t>(i + 1), 0.0);
            ref.assign(used.size(), 0.0);
            for (index_t j = 0; j <= i; ++j) {
              const bool exact_here = opts.local_exact && j / block == i / block;
              used[static_cast<std::size_t>(j)] = exact_here ? exact_w(i, j) : sketch_w(i, j);
              ref[static_cast<std::size_t>(j)] = exact_w(i, j);
              s.used_mass += used[static_cast<std::size_t>(j)];
              s.exact_mass += ref[static_cast<std::size_t>(j)];
            }
            if (i >= 31) {  // rows with at least 32 keys
              s.corr_sum += correlation(used, ref);
              ++s.corr_rows;
            }
          }
        }
      }
      for (int local = 0; local < 2; ++local) {
        stats& s = st[local];
        std::vector<double>& e = s.errs;
        double sum = 0;
        for (double x : e) sum += x;
        const double mean = sum / static_cast<double>(e.size());
        std::nth_element(e.begin(), e.begin() + static_cast<std::ptrdiff_t>(e.size() / 2), e.end());
        const double median = e[e.size() / 2];
        const double late = s.late_sum / static_cast<double>(s.late_rows);
        const double corr = s.corr_sum / static_cast<double>(s.corr_rows), mass = s.used_mass / s.exact_mass;
        std::printf("| %s | %lld | %lld | %s | %.3f | %.3f | %.3f | %.3f | %.1f |\n", pr.name.c_str(),
                    static_cast<long long>(r), static_cast<long long>(r * (r + 1) / 2), local ? "on" : "off", mean,
                    median, late, corr, mass);
        if (!s.finite || !std::isfinite(mean) || !std::isfinite(late) || !std::isfinite(corr) || !std::isfinite(mass)) {
          std::printf("FAIL: non-finite output or error on '%s', r = %lld, local_exact = %s\n", pr.name.c_str(),
                      static_cast<long long>(r), local ? "on" : "off");
          ok = false;
        }
        mean_err_by_r[local].push_back(mean);
      }
    }
    if (pr.name == "random")
      for (int local = 0; local < 2; ++local)
        if (!(mean_err_by_r[local].back() < mean_err_by_r[local].front())) {
          std::printf("FAIL: on random inputs (local_exact %s) the mean error does not decrease from r = 16 "
                      "(%.3f) to r = 128 (%.3f)\n",
                      local ? "on" : "off", mean_err_by_r[local].front(), mean_err_by_r[local].back());
          ok = false;
        }
  }

  std::printf(
      "\nHow to read it: s(q).s(k) is an unbiased but high-variance estimate of (q.k)^2 whose error is relative\n"
      "to ||q||^2 ||k||^2 (docs/design.md §1, honest note), and its square, the weight, overestimates (q.k)^4 by\n"
      "that variance, about ||scale q||^4 ||k||^4 / r = 4096 / r here against a mean exact weight of 3 (the mass\n"
      "column): for the nearly orthogonal q, k of real inputs most sketched weight is noise spread over the whole\n"
      "past. Larger r reduces the error. local_exact makes the query's own block exact, so the first block is\n"
      "error-free, but past it the inflated sketched weights of earlier blocks still outweigh the exact local\n"
      "ones (compare the i >= %lld column): with a random sketch it does not rescue recent-context retrieval.\n",
      static_cast<long long>(block));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "polysketch_error: %.2f s\n", secs);
  return ok ? 0 : 1;
}
