// examples/approximation_error.cpp — one accuracy report for every approximation in polyattn: on the
// same inputs, the relative error of each approximate kernel against the exact kernel it
// approximates, and its time.
//
//   PolySketch (r = 16 … 128, local_exact off / on)   vs polynomial attention (p = 4, β = 1), causal
//   Performer  (favor_features, m = 64 … 512)          vs softmax attention, causal
//   Linformer  (kp = 64 … 512, mean-pooling E = F)     vs softmax attention, non-causal
//   sliding window (w = 64, 256, 1024 keys back)       vs softmax attention, causal
//
// One head, d = dv = 64, scale 1/√d. The error of a method is ‖out − exact‖_F / ‖exact‖_F over all
// rows, the mean over 3 seeds of its random map (PolySketch, Performer; Linformer's pooling is
// deterministic). The exact references are computed in double (flash_attention<double>,
// polynomial_attention<double>); the approximations run in float, as they would in a model, and
// their time is the best of 3 calls (one at N = 32768 and with --quick), with every core unless
// --threads says otherwise. The exact kernels' own float times are printed too, for comparison.
//
// usage: example_approximation_error [--quick] [--csv FILE] [--threads T]
//   --quick      N = 1024 only (what the test runs, with --threads 1: about a second)
//   default      N = 4096 and 32768 (the README table, minutes)
//   --csv FILE   also write every row as CSV, for examples/approximation_error_plot.py
//   --threads T  threads of every timed call (default 0: all cores); errors do not depend on it
//   --cpu-time   time = CPU time of the calling thread (with --threads 1): on a shared machine, what
//                the call costs on an idle core
//
// Returns 1 if an output or an error is not finite, if PolySketch's error on random inputs does
// not fall from r = 16 to r = 128, if Performer's error on the soft inputs does not fall from
// m = 64 to m = 512 by at least 1.5x (1/√m predicts 2.8x), or if a sliding window's error on the
// soft inputs does not fall from w = 64 to w = 1024.
#include <polyattn/polyattn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

using polyattn::index_t;
using mat = polyattn::matrix<float>;
using matd = polyattn::matrix<double>;

constexpr index_t d = 64;
constexpr int seeds = 3;  // seeds of every random map (PolySketch sketch, Performer W)
int threads = 0;          // of every timed call (--threads; 0 = all cores)
bool cpu_time = false;    // time = CPU time of the calling thread (--cpu-time, with --threads 1)

// Small portable Gaussian generator (splitmix64 + Box–Muller), so the inputs are the same with
// every standard library (std::normal_distribution is not specified bit for bit).
class gaussian {
 public:
  explicit gaussian(std::uint64_t seed) : state_(seed) {}
  double operator()() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
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

mat gaussian_matrix(index_t rows, index_t cols, gaussian& g) {
  mat m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t c = 0; c < cols; ++c) m(i, c) = static_cast<float>(g());
  return m;
}

// What a model does to q and k first: per row, zero mean and unit variance over the d entries
// (no learned gain/bias), then `gain`. Afterwards ‖row‖² = gain²·d.
void layer_norm_rows(mat& x, double gain = 1.0) {
  for (index_t i = 0; i < x.rows(); ++i) {
    const double mean = x.row(i).cast<double>().mean();
    const double var = (x.row(i).cast<double>().array() - mean).square().mean();
    const double inv = gain / std::sqrt(var + 1e-5);
    for (index_t c = 0; c < x.cols(); ++c) x(i, c) = static_cast<float>((x(i, c) - mean) * inv);
  }
}

struct problem {
  std::string name;
  mat q, k, v;
};

// random: i.i.d. LayerNorm-ed rows; q·k/√d ~ N(0, 1), attention spread over many keys.
// With gain 1/2 ("soft"): q·k/√d ~ N(0, 1/16), nearly uniform attention, and ‖d^(−1/4) q‖² = 2
// instead of 8: the regime in which Performer's random features have a usable variance.
problem random_inputs(index_t n, const char* name, double gain) {
  gaussian g(101);
  problem p{name, gaussian_matrix(n, d, g), gaussian_matrix(n, d, g), gaussian_matrix(n, d, g)};
  layer_norm_rows(p.q, gain);
  layer_norm_rows(p.k, gain);
  return p;
}

// copies: q_i = LayerNorm(k_j + 0.3·noise) for one random earlier key j <= i, so each query has one
// strongly matching key (q·k/√d ≈ 7.6 against ~N(0, 1)) and attention is peaked: retrieval.
problem copy_inputs(index_t n) {
  gaussian g(202);
  problem p{"copies", mat(n, d), gaussian_matrix(n, d, g), gaussian_matrix(n, d, g)};
  layer_norm_rows(p.k);
  for (index_t i = 0; i < n; ++i) {
    const index_t j = g.below(i + 1);
    for (index_t c = 0; c < d; ++c) p.q(i, c) = p.k(j, c) + static_cast<float>(0.3 * g());
  }
  layer_norm_rows(p.q);
  return p;
}

// clustered: keys and queries are noisy copies of 16 random centres, so q·k is either large (same
// cluster, ~0.8 d) or small (~√d): a low-rank, strongly non-orthogonal regime.
problem clustered_inputs(index_t n) {
  gaussian g(404);
  const index_t clusters = 16;
  const mat centres = gaussian_matrix(clusters, d, g);
  problem p{"clustered", mat(n, d), mat(n, d), gaussian_matrix(n, d, g)};
  for (mat* x : {&p.q, &p.k})
    for (index_t i = 0; i < n; ++i) {
      const index_t m = g.below(clusters);
      for (index_t c = 0; c < d; ++c) x->coeffRef(i, c) = centres(m, c) + static_cast<float>(0.5 * g());
    }
  layer_norm_rows(p.q);
  layer_norm_rows(p.k);
  return p;
}

// ---- measurement --------------------------------------------------------------------------------

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// CPU time of the calling thread (s): with threads = 1 every kernel runs on it, so this is the
/// time the call would take on an idle core even when the machine is shared.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

/// Best time of `reps` calls of run (ms; wall time, or the thread's CPU time with --cpu-time).
/// Every call writes into buffers allocated and touched before: the times are the kernels', not
/// the first-touch page faults of fresh outputs (on the virtual machine of the README's numbers
/// those cost ~3 ms per MiB, more than a Performer call's arithmetic at N = 32768).
double timed(int reps, const std::function<void()>& run) {
  double best_ms = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = thread_cpu_seconds();
    run();
    best_ms = std::min(best_ms, 1e3 * (cpu_time ? thread_cpu_seconds() - c0 : seconds_since(t0)));
  }
  return best_ms;
}

using cview = polyattn::tensor_view<const float, 4>;
using view = polyattn::tensor_view<float, 4>;
cview head(const mat& x) { return cview(x.data(), {1, 1, x.rows(), x.cols()}); }  // one head [1, 1, rows, cols]
view head(mat& x) { return view(x.data(), {1, 1, x.rows(), x.cols()}); }

/// ‖out − exact‖_F / ‖exact‖_F, summed in double in a plain loop (Eigen's vectorised norm() of
/// a double matrix trips GCC 12's -Wmaybe-uninitialized inside its AVX-512 intrinsics).
double relative_error(const mat& out, const matd& exact) {
  double diff = 0, ref = 0;
  for (index_t i = 0; i < exact.rows(); ++i)
    for (index_t c = 0; c < exact.cols(); ++c) {
      const double e = exact(i, c), d = double(out(i, c)) - e;
      diff += d * d;
      ref += e * e;
    }
  return std::sqrt(diff / ref);
}

struct row {
  std::string inputs;
  index_t n;
  std::string method, param, reference;
  double error, ms;  // error < 0: an exact kernel (time only)
};

struct context {
  const problem& p;
  index_t n;
  int reps;
  matd softmax_causal, softmax_full, polynomial_causal;  // double references
  std::vector<row>* rows;
  mat out;  // [n, d], zeroed once: every timed call writes it
  bool finite = true;

  void add(const std::string& method, const std::string& param, const std::string& reference, double err,
           double ms) {
    if (err >= 0 && !std::isfinite(err)) finite = false;
    rows->push_back({p.name, n, method, param, reference, err, ms});
  }
};

constexpr double scale = 0.125;  // 1/√d

polyattn::polynomial_options polynomial_opts() {
  polyattn::polynomial_options o;
  o.causal = true;
  o.degree = 4;
  o.scale = scale;
  o.normalizer_bias = 1.0;
  o.threads = threads;
  return o;
}

// ---- one function per approximation family --------------------------------------------------------

// The exact kernels in float: their times are the baseline every approximation is compared with.
void exact_rows(context& c) {
  polyattn::softmax_options causal, full;
  causal.causal = true;
  causal.threads = full.threads = threads;
  const cview q = head(c.p.q), k = head(c.p.k), v = head(c.p.v);
  const view out = head(c.out);
  c.add("flash (exact)", "causal", "softmax", -1,
        timed(c.reps, [&] { polyattn::flash_attention<float>(q, k, v, out, causal); }));
  c.add("flash (exact)", "non-causal", "softmax", -1,
        timed(c.reps, [&] { polyattn::flash_attention<float>(q, k, v, out, full); }));
  c.add("polynomial (exact)", "p = 4, causal", "polynomial", -1,
        timed(c.reps, [&] { polyattn::polynomial_attention<float>(q, k, v, out, polynomial_opts()); }));
}

// PolySketch: degree-4 sketches of size r (r(r+1)/2 packed features), block 256.
void polysketch_rows(context& c) {
  for (const index_t r : {16, 32, 64, 128})
    for (const bool local : {false, true}) {
      double err = 0, best = 1e300;
      for (int seed = 1; seed <= seeds; ++seed) {
        polyattn::sketch_options so;
        so.degree = 4;
        so.sketch_size = r;
        so.seed = static_cast<std::uint64_t>(seed);
        const polyattn::polysketch<float> sketch(d, so);
        polyattn::polysketch_options o;
        o.causal = true;
        o.block_size = 256;
        o.local_exact = local;
        o.scale = scale;
        o.normalizer_bias = 1.0;
        o.threads = threads;
        best = std::min(best, timed(c.reps, [&] {
          polyattn::polysketch_attention<float>(head(c.p.q), head(c.p.k), head(c.p.v), head(c.out), sketch, o);
        }));
        err += relative_error(c.out, c.polynomial_causal) / seeds;
      }
      c.add(local ? "PolySketch, local_exact" : "PolySketch", "r = " + std::to_string(r), "polynomial", err, best);
    }
}

// Performer: favor_features (orthogonal, m features) + causal linear_attention; the feature maps
// are part of the timed call.
void performer_rows(context& c) {
  for (const index_t m : {64, 128, 256, 512}) {
    mat fq = mat::Zero(c.n, m), fk = mat::Zero(c.n, m);
    double err = 0, best = 1e300;
    for (int seed = 1; seed <= seeds; ++seed) {
      polyattn::favor_options fo;
      fo.features = m;
      fo.seed = static_cast<std::uint64_t>(seed);
      fo.threads = threads;
      const polyattn::favor_features<float> favor(d, fo);
      polyattn::linear_options o;
      o.causal = true;
      o.threads = threads;
      best = std::min(best, timed(c.reps, [&] {
        favor.queries(head(c.p.q), head(fq));
        favor.keys(head(c.p.k), head(fk));
        polyattn::linear_attention<float>(head(fq), head(fk), head(c.p.v), head(c.out), o);
      }));
      err += relative_error(c.out, c.softmax_causal) / seeds;
    }
    c.add("Performer", "m = " + std::to_string(m), "softmax", err, best);
  }
}

// Linformer: E = F = mean pooling over kp contiguous segments of the sequence (an untrained,
// deterministic projection; a model learns E and F), non-causal.
void linformer_rows(context& c) {
  for (const index_t kp : {64, 128, 256, 512}) {
    mat pool = mat::Zero(kp, c.n);
    for (index_t r = 0; r < kp; ++r) {
      const index_t j0 = r * c.n / kp, j1 = (r + 1) * c.n / kp;
      for (index_t j = j0; j < j1; ++j) pool(r, j) = 1.0f / static_cast<float>(j1 - j0);
    }
    const polyattn::tensor_view<const float, 2> E(pool.data(), {kp, c.n});
    polyattn::linformer_options o;
    o.threads = threads;
    const double ms = timed(c.reps, [&] {
      polyattn::linformer_attention<float>(head(c.p.q), head(c.p.k), head(c.p.v), E, E, head(c.out), o);
    });
    c.add("Linformer (mean pooling)", "kp = " + std::to_string(kp), "softmax, non-causal",
          relative_error(c.out, c.softmax_full), ms);
  }
}

// Sliding windows: causal flash where each query sees only its w most recent keys and itself
// (Mistral-style local attention): exact inside the window, nothing outside it.
void window_rows(context& c) {
  for (const index_t w : {64, 256, 1024}) {
    polyattn::softmax_options o;
    o.causal = true;
    o.window_left = w;
    o.threads = threads;
    const double ms =
        timed(c.reps, [&] { polyattn::flash_attention<float>(head(c.p.q), head(c.p.k), head(c.p.v), head(c.out), o); });
    c.add("sliding window (flash)", "w = " + std::to_string(w), "softmax", relative_error(c.out, c.softmax_causal), ms);
  }
}

// ---- driver --------------------------------------------------------------------------------------

std::string format_error(double e) {
  char buf[32];
  std::snprintf(buf, sizeof buf, e < 0 ? "(exact)" : e < 0.01 ? "%.2e" : "%.3f", e);
  return buf;
}

const row* find(const std::vector<row>& rows, index_t n, const std::string& inputs, const std::string& method,
                const std::string& param) {
  for (const row& r : rows)
    if (r.n == n && r.inputs == inputs && r.method == method && r.param == param) return &r;
  return nullptr;
}

/// One line per (method, parameter) at length n: the error on every input set, then the time on
/// the first input set (the inputs do not change the cost).
void summary_table(const std::vector<row>& rows, index_t n) {
  std::vector<std::string> inputs;
  for (const row& r : rows)
    if (r.n == n && std::find(inputs.begin(), inputs.end(), r.inputs) == inputs.end()) inputs.push_back(r.inputs);
  std::printf("N = %lld, relative error by input set:\n\n| method | parameter | exact kernel |", static_cast<long long>(n));
  for (const std::string& name : inputs) std::printf(" %s |", name.c_str());
  std::printf(" ms |\n|---|---|---|");
  for (std::size_t i = 0; i < inputs.size(); ++i) std::printf("---:|");
  std::printf("---:|\n");
  for (const row& r : rows) {
    if (r.n != n || r.inputs != inputs.front()) continue;
    std::printf("| %s | %s | %s |", r.method.c_str(), r.param.c_str(), r.reference.c_str());
    for (const std::string& name : inputs) {
      const row* x = find(rows, n, name, r.method, r.param);
      std::printf(" %s |", x ? format_error(x->error).c_str() : "-");
    }
    std::printf(" %.3g |\n", r.ms);
  }
}

int main(int argc, char** argv) {
  bool quick = false;
  const char* csv = nullptr;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[a], "--csv") == 0 && a + 1 < argc) {
      csv = argv[++a];
    } else if (std::strcmp(argv[a], "--threads") == 0 && a + 1 < argc && std::atoi(argv[a + 1]) >= 0) {
      threads = std::atoi(argv[++a]);
    } else if (std::strcmp(argv[a], "--cpu-time") == 0) {
      cpu_time = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--csv FILE] [--threads T] [--cpu-time]\n", argv[0]);
      return 2;
    }
  }
  if (cpu_time && threads != 1) {
    std::fprintf(stderr, "%s: --cpu-time measures the calling thread: use it with --threads 1\n", argv[0]);
    return 2;
  }
  const auto t_start = std::chrono::steady_clock::now();
  const std::vector<index_t> lengths = quick ? std::vector<index_t>{1024} : std::vector<index_t>{4096, 32768};

  std::vector<row> rows;
  bool ok = true;
  for (const index_t n : lengths) {
    const problem problems[] = {random_inputs(n, "random", 1.0), random_inputs(n, "random, soft (x 1/2)", 0.5),
                                copy_inputs(n), clustered_inputs(n)};
    for (const problem& p : problems) {
      const auto t0 = std::chrono::steady_clock::now();
      context c{p, n, quick || n >= 32768 ? 1 : 3, {}, {}, {}, &rows, mat::Zero(n, d)};
      const matd q = p.q.cast<double>(), k = p.k.cast<double>(), v = p.v.cast<double>();
      polyattn::softmax_options causal;
      causal.causal = true;
      c.softmax_causal = polyattn::flash_attention(q, k, v, causal);
      c.softmax_full = polyattn::flash_attention(q, k, v);
      c.polynomial_causal = polyattn::polynomial_attention(q, k, v, polynomial_opts());
      exact_rows(c);
      polysketch_rows(c);
      performer_rows(c);
      linformer_rows(c);
      window_rows(c);
      if (!c.finite) {
        std::printf("FAIL: a non-finite error on '%s', N = %lld\n", p.name.c_str(), static_cast<long long>(n));
        ok = false;
      }
      std::fprintf(stderr, "approximation_error: N = %lld, %s: %.1f s\n", static_cast<long long>(n), p.name.c_str(),
                   seconds_since(t0));
    }
    // the properties the approximations are supposed to have
    for (const char* method : {"PolySketch", "PolySketch, local_exact"}) {
      const row *a = find(rows, n, "random", method, "r = 16"), *b = find(rows, n, "random", method, "r = 128");
      if (!(a && b && b->error < a->error)) {
        std::printf("FAIL: %s's error on random inputs does not fall from r = 16 to r = 128 (N = %lld)\n", method,
                    static_cast<long long>(n));
        ok = false;
      }
    }
    const row *w64 = find(rows, n, "random, soft (x 1/2)", "sliding window (flash)", "w = 64"),
              *w1024 = find(rows, n, "random, soft (x 1/2)", "sliding window (flash)", "w = 1024");
    if (!(w64 && w1024 && w1024->error < w64->error)) {
      std::printf("FAIL: the sliding window's error on the soft inputs does not fall from w = 64 to w = 1024 (N = %lld)\n",
                  static_cast<long long>(n));
      ok = false;
    }
    const row *p64 = find(rows, n, "random, soft (x 1/2)", "Performer", "m = 64"),
              *p512 = find(rows, n, "random, soft (x 1/2)", "Performer", "m = 512");
    if (!(p64 && p512 && p64->error > 1.5 * p512->error)) {
      std::printf("FAIL: Performer's error on the soft inputs does not fall by 1.5x from m = 64 to m = 512 (N = %lld)\n",
                  static_cast<long long>(n));
      ok = false;
    }
  }

  std::printf("Relative error ||out - exact||_F / ||exact||_F against the exact kernel each method approximates\n"
              "(double-precision reference; mean over %d seeds of the random maps), and time per call (ms, float,\n"
              "best of 3 calls, 1 at N = 32768; %s%s). One head, d = dv = %lld, scale 1/sqrt(d); PolySketch p = 4, beta = 1,\n"
              "block 256; Performer orthogonal features; Linformer E = F = mean pooling over kp segments;\n"
              "sliding window: causal flash, each query sees its w previous keys and itself.\n\n",
              seeds, threads == 0 ? "all cores" : (std::to_string(threads) + " thread(s)").c_str(),
              cpu_time ? ", CPU time of the thread" : ", wall time", static_cast<long long>(d));
  for (const index_t n : lengths) {
    summary_table(rows, n);
    std::printf("\n");
  }
  std::printf("Every row:\n\n");
  std::printf("| inputs | N | method | parameter | exact kernel | rel. error | ms |\n");
  std::printf("|---|---:|---|---|---|---:|---:|\n");
  for (const row& r : rows)
    std::printf("| %s | %lld | %s | %s | %s | %s | %.3g |\n", r.inputs.c_str(), static_cast<long long>(r.n),
                r.method.c_str(), r.param.c_str(), r.reference.c_str(), format_error(r.error).c_str(), r.ms);

  if (csv) {
    std::FILE* f = std::fopen(csv, "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", csv);
      return 1;
    }
    std::fprintf(f, "inputs,N,method,parameter,reference,error,ms\n");
    for (const row& r : rows)
      std::fprintf(f, "\"%s\",%lld,\"%s\",\"%s\",\"%s\",%.6g,%.6g\n", r.inputs.c_str(), static_cast<long long>(r.n),
                   r.method.c_str(), r.param.c_str(), r.reference.c_str(), r.error, r.ms);
    std::fclose(f);
  }
  std::fprintf(stderr, "approximation_error: %.1f s in all\n", seconds_since(t_start));
  return ok ? 0 : 1;
}
