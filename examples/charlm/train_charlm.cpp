// examples/charlm/train_charlm.cpp — a character-level language model trained in C++ with polyattn.
//
// A decoder-only transformer (token + position embeddings, pre-LayerNorm blocks of attention and
// MLP, final LayerNorm, output head) in one file, the layers in order and each backward next to
// its forward, in the manner of llm.c's train_gpt2.c. Eigen does the dense layers, polyattn the
// attention — softmax (flash_attention), exact polynomial (polynomial_attention), PolySketch
// with a random sketch (polysketch_attention) or the paper's learned sketch
// (sketched_attention) — everything else (LayerNorm, GELU, cross-entropy, AdamW) is written here.
// The choices behind the model (the polynomial scale, the learned sketch and its init) are in
// docs/design.md §9.
//
//   train_charlm --data kjv.txt --attention polysketch --local-exact --steps 1000 --log run.csv
//
// The model is a template on the scalar: float for training, double for the finite-difference
// gradient check of tests/test_charlm.cpp, which includes this file with CHARLM_NO_MAIN.
#include <polyattn/polyattn.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#include <unistd.h>  // isatty

namespace charlm {

using index_t = std::int64_t;

// ----------------------------------------------------------------------------------------------
// configuration

enum class attention_kind { softmax, polynomial, polysketch, learned };

inline const char* kind_name(attention_kind k) {
  switch (k) {
    case attention_kind::softmax: return "softmax";
    case attention_kind::polynomial: return "polynomial";
    case attention_kind::polysketch: return "polysketch";
    case attention_kind::learned: return "learned";
  }
  return "?";
}

struct config {
  attention_kind kind = attention_kind::softmax;
  bool local_exact = false;   // sketched kinds: exact (scale·q·k)^p inside the query's block
  index_t context = 256;      // N, characters per training sequence
  index_t layers = 4;
  index_t dim = 128;          // C
  index_t heads = 4;          // H; head dim C / H
  index_t batch = 16;         // sequences per step
  index_t steps = 3000;      // about 10 minutes of softmax on 2 cores (docs/design.md §9.6)
  double lr = 5e-3;           // peak AdamW learning rate (linear warm-up, cosine decay to lr/10)
  index_t warmup = 100;
  double weight_decay = 0.1;  // on the matrices only
  double grad_clip = 1.0;     // global L2 norm
  std::uint64_t seed = 1;
  int threads = 0;            // 0 = every core
  int degree = 4;             // p of the polynomial kinds
  index_t sketch_size = 32;   // r of the sketched kinds
  index_t block = 64;         // block size of the sketched kinds (semantic with local_exact)
  index_t eval_every = 100;
  index_t val_chars = 65536;  // characters of the validation split scored at each evaluation (0: all)
  // the ablation of docs/design.md §9.8 (defaults: the model of §9.1 with RoPE, §9.8's recipe)
  bool rope = true;             // rotary position embedding on q and k (before the per-head LayerNorm)
  bool head_gain = false;       // a learned per-head gain exp(τ_h) on the q given to the kernel
  double normalizer_bias = 1;   // β of the polynomial kinds
  bool learn_bias = false;      // β = exp(θ) learned per layer, θ starting at log β
  double beta2 = 0.95;          // AdamW β₂
  double qk_lr = 1;             // learning-rate multiplier of wq, bq, wk, bk, the q/k LayerNorms and gains
  double qk_gain_init = 1;      // initial per-head q/k LayerNorm gain (polynomial kinds)
  std::string data, log, attn_log;
  index_t vocab = 0;          // from the data

  index_t head_dim() const { return dim / heads; }
  bool normalises_qk() const { return kind != attention_kind::softmax; }
  bool sketched() const { return kind == attention_kind::polysketch || kind == attention_kind::learned; }
  bool learns_bias() const { return learn_bias && normalises_qk(); }
  /// Scale of the polynomial weights (scale·q·k)^p on LayerNorm-ed q, k: 1/√head_dim, so an
  /// unrelated pair's scaled score has unit variance, as softmax's q·k/√d (docs/design.md §9).
  double poly_scale() const { return 1.0 / std::sqrt(double(head_dim())); }
};

// ----------------------------------------------------------------------------------------------
// seeded random numbers (splitmix64; Box–Muller for normals): the same seed, the same model

struct rng {
  std::uint64_t state;
  explicit rng(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  index_t below(index_t n) { return index_t(next() % std::uint64_t(n)); }
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();  // u1 in (0, 1]
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// ----------------------------------------------------------------------------------------------
// parameters: one flat array, tensors at fixed offsets (the same layout binds the gradients)

struct param_tensor {
  std::string name;
  index_t offset, rows, cols;
  bool decay;  // AdamW weight decay (matrices, not gains and biases)
  enum init_kind { normal, zeros, ones, constant } init;
  double sigma;        // normal: the standard deviation; constant: the value
  double lr_mult = 1;  // learning-rate multiplier (config::qk_lr on the q/k path)
};

template <class T>
struct layer_params {
  T *ln1_g, *ln1_b;                      // pre-attention LayerNorm [C]
  T *wq, *bq, *wk, *bk, *wv, *bv;        // [C, C], [C]
  T *qln_g, *qln_b, *kln_g, *kln_b;      // per-head LayerNorm of q and k [hd] (polynomial kinds)
  T *qgain, *nbias;                      // --head-gain: log-gains τ [H]; learned β: θ = log β [1]
  T *sk_ln_g[2], *sk_ln_b[2];            // learned sketch, per branch: LayerNorm [hd],
  T *sk_w1[2], *sk_w2[2];                //   Dense [hd, 8r], Dense [8r, r]
  T *wo, *bo;                            // attention output projection [C, C], [C]
  T *ln2_g, *ln2_b;                      // pre-MLP LayerNorm [C]
  T *wfc, *bfc, *wpr, *bpr;              // MLP [C, 4C], [4C], [4C, C], [C]
};

template <class T>
struct params {
  T *wte, *wpe;                          // token [V, C] and position [N, C] embeddings
  std::vector<layer_params<T>> layer;
  T *lnf_g, *lnf_b;                      // final LayerNorm [C]
  T *whead;                              // output head [C, V]
};

/// The layout of every parameter tensor, in order, and the total count. bind_params() below walks the
/// same order, so the list and the pointers cannot disagree.
inline std::vector<param_tensor> param_layout(const config& c) {
  std::vector<param_tensor> l;
  index_t off = 0;
  auto add = [&](std::string name, index_t rows, index_t cols, param_tensor::init_kind init, double sigma = 0) {
    l.push_back({std::move(name), off, rows, cols, rows > 1 && cols > 1, init, sigma});
    off += rows * cols;
  };
  auto qk_path = [&]() { l.back().lr_mult = c.qk_lr; };
  const index_t C = c.dim, hd = c.head_dim(), r = c.sketch_size;
  // N(0, 0.06²) for the matrices and embeddings, the residual projections scaled by 1/√(2L) as
  // in GPT-2; with GPT-2's 0.02 (chosen for width 768) this width-128 model stayed on its bigram
  // plateau (3.3 bits/char) for hundreds of steps longer in the pilot (docs/design.md §9.4)
  const double sigma = 0.06, sigma_res = sigma / std::sqrt(2.0 * double(c.layers));
  add("wte", c.vocab, C, param_tensor::normal, sigma);
  add("wpe", c.context, C, param_tensor::normal, sigma);
  for (index_t i = 0; i < c.layers; ++i) {
    const std::string p = "l" + std::to_string(i) + ".";
    add(p + "ln1_g", 1, C, param_tensor::ones);
    add(p + "ln1_b", 1, C, param_tensor::zeros);
    for (const char* w : {"q", "k", "v"}) {
      add(p + "w" + w, C, C, param_tensor::normal, sigma);
      if (*w != 'v') qk_path();
      add(p + "b" + w, 1, C, param_tensor::zeros);
      if (*w != 'v') qk_path();
    }
    if (c.normalises_qk())
      for (const char* w : {"qln_g", "qln_b", "kln_g", "kln_b"}) {
        if (w[4] == 'g') add(p + w, 1, hd, param_tensor::constant, c.qk_gain_init);
        else add(p + w, 1, hd, param_tensor::zeros);
        qk_path();
      }
    if (c.head_gain) add(p + "qgain", 1, c.heads, param_tensor::zeros), qk_path();
    if (c.learns_bias()) add(p + "nbias", 1, 1, param_tensor::constant, std::log(c.normalizer_bias));
    if (c.kind == attention_kind::learned)
      for (int b = 0; b < 2; ++b) {
        const std::string s = p + "sk" + std::to_string(b) + "_";
        add(s + "ln_g", 1, hd, param_tensor::ones);
        add(s + "ln_b", 1, hd, param_tensor::zeros);
        add(s + "w1", hd, 8 * r, param_tensor::normal, 1.0 / std::sqrt(double(hd)));  // LeCun normal
        add(s + "w2", 8 * r, r, param_tensor::normal, 1.0 / std::sqrt(double(8 * r)));
      }
    add(p + "wo", C, C, param_tensor::normal, sigma_res);
    add(p + "bo", 1, C, param_tensor::zeros);
    add(p + "ln2_g", 1, C, param_tensor::ones);
    add(p + "ln2_b", 1, C, param_tensor::zeros);
    add(p + "wfc", C, 4 * C, param_tensor::normal, sigma);
    add(p + "bfc", 1, 4 * C, param_tensor::zeros);
    add(p + "wpr", 4 * C, C, param_tensor::normal, sigma_res);
    add(p + "bpr", 1, C, param_tensor::zeros);
  }
  add("lnf_g", 1, C, param_tensor::ones);
  add("lnf_b", 1, C, param_tensor::zeros);
  add("whead", C, c.vocab, param_tensor::normal, sigma);
  return l;
}

inline index_t param_count(const std::vector<param_tensor>& l) {
  return l.empty() ? 0 : l.back().offset + l.back().rows * l.back().cols;
}

/// Pointers into a flat array laid out by param_layout (parameters or their gradients).
template <class T>
params<T> bind_params(const config& c, const std::vector<param_tensor>& layout, T* base) {
  std::size_t next = 0;
  auto take = [&]() { return base + layout.at(next++).offset; };
  params<T> p{};
  p.wte = take();
  p.wpe = take();
  p.layer.resize(std::size_t(c.layers));
  for (layer_params<T>& l : p.layer) {
    l = layer_params<T>{};
    l.ln1_g = take(), l.ln1_b = take();
    l.wq = take(), l.bq = take(), l.wk = take(), l.bk = take(), l.wv = take(), l.bv = take();
    if (c.normalises_qk()) l.qln_g = take(), l.qln_b = take(), l.kln_g = take(), l.kln_b = take();
    if (c.head_gain) l.qgain = take();
    if (c.learns_bias()) l.nbias = take();
    if (c.kind == attention_kind::learned)
      for (int b = 0; b < 2; ++b) l.sk_ln_g[b] = take(), l.sk_ln_b[b] = take(), l.sk_w1[b] = take(), l.sk_w2[b] = take();
    l.wo = take(), l.bo = take(), l.ln2_g = take(), l.ln2_b = take();
    l.wfc = take(), l.bfc = take(), l.wpr = take(), l.bpr = take();
  }
  p.lnf_g = take(), p.lnf_b = take(), p.whead = take();
  if (next != layout.size()) throw std::logic_error("charlm::bind_params: layout and binding disagree");
  return p;
}

// ----------------------------------------------------------------------------------------------
// the layers: each forward, then its backward. Gradients of parameters accumulate (+=); the
// gradient of a layer's input accumulates too, so a residual stream can sum its branches.

template <class T>
using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using mmap = Eigen::Map<mat<T>>;
template <class T>
using cmap = Eigen::Map<const mat<T>>;
template <class T>
using rowmap = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
template <class T>
using crowmap = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;

/// f(i) for i in [0, n) on `threads` threads; each i is independent, so the result is the same
/// for any thread count.
template <class F>
void parallel_for(index_t n, int threads, F f) {
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (index_t i = 0; i < n; ++i) f(i);
  (void)threads;
}

// --- embedding: x[b,t,:] = wte[tok[b,t]] + wpe[t]
template <class T>
void embed_forward(T* x, const int* tok, const T* wte, const T* wpe, index_t B, index_t N, index_t C) {
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < N; ++t) {
      T* row = x + (b * N + t) * C;
      const T *e = wte + index_t(tok[b * N + t]) * C, *p = wpe + t * C;
      for (index_t c = 0; c < C; ++c) row[c] = e[c] + p[c];
    }
}
template <class T>
void embed_backward(T* dwte, T* dwpe, const T* dx, const int* tok, index_t B, index_t N, index_t C) {
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < N; ++t) {
      const T* d = dx + (b * N + t) * C;
      T *de = dwte + index_t(tok[b * N + t]) * C, *dp = dwpe + t * C;
      for (index_t c = 0; c < C; ++c) de[c] += d[c], dp[c] += d[c];  // x = wte[tok] + wpe[t]
    }
}

// --- LayerNorm over rows of width C: y = (x − μ)·rstd·g + b, rstd = 1/√(var + 1e-5)
template <class T>
void layernorm_forward(T* y, T* mean, T* rstd, const T* x, const T* g, const T* bias, index_t rows, index_t C,
                       int threads) {
  parallel_for(rows, threads, [&](index_t i) {
    const T* xi = x + i * C;
    T m = 0, v = 0;
    for (index_t c = 0; c < C; ++c) m += xi[c];
    m /= T(C);
    for (index_t c = 0; c < C; ++c) v += (xi[c] - m) * (xi[c] - m);
    const T s = T(1) / std::sqrt(v / T(C) + T(1e-5));
    T* yi = y + i * C;
    for (index_t c = 0; c < C; ++c) yi[c] = (xi[c] - m) * s * g[c] + bias[c];
    mean[i] = m, rstd[i] = s;
  });
}
template <class T>
void layernorm_backward(T* dx, T* dg, T* db, const T* dy, const T* x, const T* mean, const T* rstd, const T* g,
                        index_t rows, index_t C, int threads) {
  parallel_for(rows, threads, [&](index_t i) {
    const T *xi = x + i * C, *dyi = dy + i * C;
    // n = (x − μ)·rstd; y = n·g + b, so dn = dy·g and dx = rstd·(dn − mean(dn) − n·mean(dn·n))
    T dn_mean = 0, dn_n_mean = 0;
    for (index_t c = 0; c < C; ++c) {
      const T n = (xi[c] - mean[i]) * rstd[i], dn = dyi[c] * g[c];
      dn_mean += dn, dn_n_mean += dn * n;
    }
    dn_mean /= T(C), dn_n_mean /= T(C);
    T* dxi = dx + i * C;
    for (index_t c = 0; c < C; ++c) {
      const T n = (xi[c] - mean[i]) * rstd[i];
      dxi[c] += (dyi[c] * g[c] - dn_mean - n * dn_n_mean) * rstd[i];
    }
  });
  for (index_t i = 0; i < rows; ++i) {  // dg, db: sums over rows, in row order
    const T *xi = x + i * C, *dyi = dy + i * C;
    for (index_t c = 0; c < C; ++c) dg[c] += dyi[c] * (xi[c] - mean[i]) * rstd[i], db[c] += dyi[c];
  }
}

// --- dense layer: y [R, O] = x [R, I] · w [I, O] (+ b). Each GEMM is split into one block per
// thread (rows of y and dx, columns of dw) computed by single-threaded Eigen: Eigen's own
// parallel GEMM synchronises inside the product, which costs more than it gains at these sizes
// and collapses when the cores are shared.
template <class F>
void parallel_blocks(index_t n, int threads, F f) {  // f(begin, end) on `threads` contiguous blocks
  const index_t parts = std::max<index_t>(1, std::min<index_t>(threads, n));
  parallel_for(parts, int(parts), [&](index_t t) { f(n * t / parts, n * (t + 1) / parts); });
}

template <class T>
void linear_forward(T* y, const T* x, const T* w, const T* b, index_t R, index_t I, index_t O, int threads) {
  parallel_blocks(R, threads, [&](index_t r0, index_t r1) {
    mmap<T> Y(y + r0 * O, r1 - r0, O);
    Y.noalias() = cmap<T>(x + r0 * I, r1 - r0, I) * cmap<T>(w, I, O);
    if (b) Y.rowwise() += crowmap<T>(b, O);
  });
}
template <class T>
void linear_backward(T* dx, T* dw, T* db, const T* dy, const T* x, const T* w, index_t R, index_t I, index_t O,
                     int threads) {
  using stride = Eigen::OuterStride<>;
  using block = Eigen::Map<mat<T>, 0, stride>;
  using cblock = Eigen::Map<const mat<T>, 0, stride>;
  if (dx)  // y = x·w: dx += dy·wᵀ
    parallel_blocks(R, threads, [&](index_t r0, index_t r1) {
      mmap<T>(dx + r0 * I, r1 - r0, I).noalias() += cmap<T>(dy + r0 * O, r1 - r0, O) * cmap<T>(w, I, O).transpose();
    });
  parallel_blocks(O, threads, [&](index_t c0, index_t c1) {  // dw += xᵀ·dy, by columns of dw
    const cblock dY(dy + c0, R, c1 - c0, stride(O));
    block(dw + c0, I, c1 - c0, stride(O)).noalias() += cmap<T>(x, R, I).transpose() * dY;
    if (db) rowmap<T>(db + c0, c1 - c0) += dY.colwise().sum();  // y += b: db += Σ_rows dy
  });
}

// --- GELU, tanh approximation: y = ½x(1 + tanh(√(2/π)(x + 0.044715x³))). Eigen's array tanh is
// vectorised (libm's tanhf, one value at a time, took half of a training step), so the
// elementwise layers run as array expressions over chunks of kChunk values.
constexpr index_t kChunk = 4096;
template <class T>
using arr = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using carr = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

template <class F>
void parallel_chunks(index_t n, int threads, F f) {  // f(offset, count) on chunks of kChunk
  parallel_for((n + kChunk - 1) / kChunk, threads, [&](index_t c) { f(c * kChunk, std::min(kChunk, n - c * kChunk)); });
}

template <class T>
void gelu_forward(T* y, const T* x, index_t n, int threads) {
  const T k = T(0.7978845608028654), a = T(0.044715);
  parallel_chunks(n, threads, [&](index_t o, index_t m) {
    const carr<T> u(x + o, m);
    arr<T>(y + o, m) = T(0.5) * u * (T(1) + (k * (u + a * u.cube())).tanh());
  });
}
template <class T>
void gelu_backward(T* dx, const T* x, const T* dy, index_t n, int threads) {
  const T k = T(0.7978845608028654), a = T(0.044715);
  parallel_chunks(n, threads, [&](index_t o, index_t m) {
    const carr<T> u(x + o, m);
    const Eigen::Array<T, Eigen::Dynamic, 1> t = (k * (u + a * u.cube())).tanh();
    // dy/du = ½(1 + t) + ½u·(1 − t²)·k(1 + 3a·u²)
    arr<T>(dx + o, m) += carr<T>(dy + o, m) *
                         (T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t.square()) * k * (T(1) + T(3) * a * u.square()));
  });
}

// --- rotary position embedding (RoFormer): in each head, the pair of dims (2i, 2i+1) of the row at
// position t is rotated by the angle t·10000^(−2i/hd), so q_t·k_s depends on t − s through the
// rotation. cs holds cos, sin for every position and pair [N, hd/2, 2]; inverse rotates back (the
// transpose, which is the backward of the rotation).
template <class T>
void rope_rotate(T* x, const T* cs, index_t rows, index_t N, index_t H, index_t hd, bool inverse, int threads) {
  parallel_for(rows, threads, [&](index_t row) {
    const T* a = cs + (row % N) * hd;
    for (index_t h = 0; h < H; ++h) {
      T* v = x + (row * H + h) * hd;
      for (index_t i = 0; i < hd / 2; ++i) {
        const T c = a[2 * i], s = inverse ? -a[2 * i + 1] : a[2 * i + 1], u = v[2 * i], w = v[2 * i + 1];
        v[2 * i] = c * u - s * w, v[2 * i + 1] = s * u + c * w;
      }
    }
  });
}
template <class T>
std::vector<T> rope_table(index_t N, index_t hd) {
  std::vector<T> cs(std::size_t(N * hd));
  for (index_t t = 0; t < N; ++t)
    for (index_t i = 0; i < hd / 2; ++i) {
      const double angle = double(t) * std::pow(10000.0, -2.0 * double(i) / double(hd));
      cs[std::size_t(t * hd + 2 * i)] = T(std::cos(angle)), cs[std::size_t(t * hd + 2 * i + 1)] = T(std::sin(angle));
    }
  return cs;
}

// --- softmax cross-entropy: loss = mean over rows of (logsumexp(logits) − logits[target]);
// probs overwrite logits. Returns the summed loss (in nats) of the rows.
template <class T>
double crossentropy_forward(T* logits, T* row_loss, const int* target, index_t R, index_t V, int threads) {
  parallel_for(R, threads, [&](index_t i) {
    T* z = logits + i * V;
    T m = z[0];
    for (index_t j = 1; j < V; ++j) m = std::max(m, z[j]);
    const T zt = z[target[i]] - m;
    T s = 0;
    for (index_t j = 0; j < V; ++j) s += (z[j] = std::exp(z[j] - m));
    row_loss[i] = std::log(s) - zt;  // −log p_target = log Σ exp(z − m) − (z_target − m)
    for (index_t j = 0; j < V; ++j) z[j] /= s;
  });
  double total = 0;
  for (index_t i = 0; i < R; ++i) total += double(row_loss[i]);
  return total;
}
template <class T>
void crossentropy_backward(T* dlogits, const T* probs, const int* target, index_t R, index_t V, T dloss,
                           int threads) {
  parallel_for(R, threads, [&](index_t i) {  // d(−log softmax_t)/dz_j = p_j − [j = t]
    for (index_t j = 0; j < V; ++j) dlogits[i * V + j] = dloss * (probs[i * V + j] - T(j == target[i]));
  });
}

// --- the learned sketch (PolySketchFormer's learned sketch, docs/design.md §9): two branches of
// LayerNorm → Dense(hd → 8r) → GELU → Dense(8r → r), s = √r · tanh(s₁ ∘ s₂ / √r), on rows of hd.
template <class T>
struct sketch_acts {  // per branch: LayerNorm out and stats, pre- and post-GELU hidden, output
  std::vector<T> ln[2], mean[2], rstd[2], h[2], a[2], s[2];
  void resize(index_t rows, index_t hd, index_t r) {
    for (int b = 0; b < 2; ++b) {
      ln[b].resize(std::size_t(rows * hd)), mean[b].resize(std::size_t(rows)), rstd[b].resize(std::size_t(rows));
      h[b].resize(std::size_t(rows * 8 * r)), a[b].resize(std::size_t(rows * 8 * r)), s[b].resize(std::size_t(rows * r));
    }
  }
};
template <class T>
void sketch_forward(T* s, sketch_acts<T>& a, const T* x, const layer_params<T>& p, index_t rows, index_t hd,
                    index_t r, int threads) {
  for (int b = 0; b < 2; ++b) {
    layernorm_forward(a.ln[b].data(), a.mean[b].data(), a.rstd[b].data(), x, p.sk_ln_g[b], p.sk_ln_b[b], rows, hd,
                      threads);
    linear_forward<T>(a.h[b].data(), a.ln[b].data(), p.sk_w1[b], nullptr, rows, hd, 8 * r, threads);
    gelu_forward(a.a[b].data(), a.h[b].data(), rows * 8 * r, threads);
    linear_forward<T>(a.s[b].data(), a.a[b].data(), p.sk_w2[b], nullptr, rows, 8 * r, r, threads);
  }
  const T root = std::sqrt(T(r));
  parallel_chunks(rows * r, threads, [&](index_t o, index_t m) {
    arr<T>(s + o, m) = root * (carr<T>(a.s[0].data() + o, m) * carr<T>(a.s[1].data() + o, m) / root).tanh();
  });
}
template <class T>
void sketch_backward(T* dx, const layer_params<T>& dp, const T* ds, const T* s, const sketch_acts<T>& a, const T* x,
                     const layer_params<T>& p, index_t rows, index_t hd, index_t r, int threads,
                     std::vector<T>& scratch) {
  const T root = std::sqrt(T(r));
  scratch.resize(std::size_t(rows * (2 * r + 16 * r + hd)));
  T *ds0 = scratch.data(), *ds1 = ds0 + rows * r, *da = ds1 + rows * r, *dh = da + rows * 8 * r, *dln = dh + rows * 8 * r;
  // s = √r·tanh(t), t = s₁∘s₂/√r: ds₁ = ds·√r(1 − tanh²t)·s₂/√r = ds·(1 − (s/√r)²)·s₂, alike ds₂
  parallel_for(rows * r, threads, [&](index_t i) {
    const T th = s[i] / root, dt = ds[i] * (T(1) - th * th);
    ds0[i] = dt * a.s[1][i], ds1[i] = dt * a.s[0][i];
  });
  for (int b = 0; b < 2; ++b) {
    // s_b = a_b · w2
    std::fill(da, da + rows * 8 * r, T(0));
    linear_backward<T>(da, dp.sk_w2[b], nullptr, b == 0 ? ds0 : ds1, a.a[b].data(), p.sk_w2[b], rows, 8 * r, r,
                       threads);
    // a_b = gelu(h_b)
    std::fill(dh, dh + rows * 8 * r, T(0));
    gelu_backward(dh, a.h[b].data(), da, rows * 8 * r, threads);
    // h_b = ln_b · w1
    std::fill(dln, dln + rows * hd, T(0));
    linear_backward<T>(dln, dp.sk_w1[b], nullptr, dh, a.ln[b].data(), p.sk_w1[b], rows, hd, 8 * r, threads);
    // ln_b = LayerNorm(x)
    layernorm_backward(dx, dp.sk_ln_g[b], dp.sk_ln_b[b], dln, x, a.mean[b].data(), a.rstd[b].data(), p.sk_ln_g[b],
                       rows, hd, threads);
  }
}

// ----------------------------------------------------------------------------------------------
// attention: q, k, v, out are [B, N, C] = [B, N, H, hd] buffers, viewed as polyattn's
// [B, H, N, hd] without copying (view_bnhd)

template <class T>
using view4 = polyattn::tensor_view<T, 4>;
template <class T>
using cview4 = polyattn::tensor_view<const T, 4>;

template <class T>
struct attention_call {
  const config& c;
  index_t B, N;
  const polyattn::polysketch<T>* sketch;  // polysketch kind: the layer's fixed random sketch
  double beta;                            // the polynomial kinds' normaliser bias β

  cview4<T> in(const T* x, index_t width) const {
    return polyattn::view_bnhd<const T>(x, B, N, c.heads, width);
  }
  view4<T> out(T* x, index_t width) const { return polyattn::view_bnhd<T>(x, B, N, c.heads, width); }
  polyattn::tensor_view<T, 3> stats(T* s) const { return polyattn::tensor_view<T, 3>(s, {B, c.heads, N}); }

  polyattn::softmax_options softmax() const {
    polyattn::softmax_options o;
    o.causal = true, o.threads = c.threads;  // scale 1/√hd
    return o;
  }
  polyattn::polynomial_options polynomial() const {
    polyattn::polynomial_options o;
    o.causal = true, o.degree = c.degree, o.scale = c.poly_scale(), o.normalizer_bias = beta, o.threads = c.threads;
    return o;
  }
  polyattn::polysketch_options polysketch() const {
    polyattn::polysketch_options o;
    o.causal = true, o.block_size = c.block, o.local_exact = c.local_exact, o.scale = c.poly_scale();
    o.normalizer_bias = beta, o.threads = c.threads;
    return o;
  }
  polyattn::sketched_options learned() const {
    polyattn::sketched_options o;
    o.causal = true, o.block_size = c.block, o.local_exact = c.local_exact, o.degree = c.degree;
    o.scale = c.poly_scale(), o.normalizer_bias = beta, o.threads = c.threads;
    return o;
  }

  /// out = attention(q, k, v) and its per-row stats; sq, sk: the learned sketches [B, N, H, r]
  void forward(T* o, T* st, const T* q, const T* k, const T* v, const T* sq, const T* sk) const {
    const index_t hd = c.head_dim();
    switch (c.kind) {
      case attention_kind::softmax:
        polyattn::flash_attention<T>(in(q, hd), in(k, hd), in(v, hd), out(o, hd), softmax(), stats(st));
        break;
      case attention_kind::polynomial:
        polyattn::polynomial_attention<T>(in(q, hd), in(k, hd), in(v, hd), out(o, hd), polynomial(), stats(st));
        break;
      case attention_kind::polysketch:
        polyattn::polysketch_attention<T>(in(q, hd), in(k, hd), in(v, hd), out(o, hd), *sketch, polysketch(), stats(st));
        break;
      case attention_kind::learned:
        polyattn::sketched_attention<T>(in(q, hd), in(k, hd), in(sq, c.sketch_size), in(sk, c.sketch_size), in(v, hd),
                                        out(o, hd), learned(), stats(st));
        break;
    }
  }
  /// dq, dk, dv (and dsq, dsk for the learned kind) from dout: written, not accumulated
  void backward(T* dq, T* dk, T* dv, T* dsq, T* dsk, const T* dout, const T* o, const T* st, const T* q, const T* k,
                const T* v, const T* sq, const T* sk) const {
    const index_t hd = c.head_dim();
    const polyattn::tensor_view<const T, 3> s(st, {B, c.heads, N});
    switch (c.kind) {
      case attention_kind::softmax:
        polyattn::flash_attention_backward<T>(in(q, hd), in(k, hd), in(v, hd), in(o, hd), in(dout, hd), s, out(dq, hd),
                                              out(dk, hd), out(dv, hd), softmax());
        break;
      case attention_kind::polynomial:
        polyattn::polynomial_attention_backward<T>(in(q, hd), in(k, hd), in(v, hd), in(o, hd), in(dout, hd), s,
                                                   out(dq, hd), out(dk, hd), out(dv, hd), polynomial());
        break;
      case attention_kind::polysketch:  // the random sketch is fixed: no leaf gradients
        polyattn::polysketch_attention_backward<T>(in(q, hd), in(k, hd), in(v, hd), in(o, hd), in(dout, hd), s,
                                                   out(dq, hd), out(dk, hd), out(dv, hd), *sketch, polysketch());
        break;
      case attention_kind::learned:
        polyattn::sketched_attention_backward<T>(in(q, hd), in(k, hd), in(sq, c.sketch_size), in(sk, c.sketch_size),
                                                 in(v, hd), in(o, hd), in(dout, hd), s, out(dq, hd), out(dk, hd),
                                                 out(dsq, c.sketch_size), out(dsk, c.sketch_size), out(dv, hd),
                                                 learned());
        break;
    }
  }
};

// ----------------------------------------------------------------------------------------------
// the model

template <class T>
struct layer_acts {
  std::vector<T> ln1, ln1_mean, ln1_rstd;  // LayerNorm(x) [BN, C]
  std::vector<T> q, k, v;                  // projections [BN, C]
  std::vector<T> qkn, qkn_mean, qkn_rstd;  // per-head LayerNorm of q then k [2, BN, C] (polynomial kinds)
  std::vector<T> sketch;                   // learned sketches of q then k [2, BN·H, r]
  sketch_acts<T> sk;                       // the sketch network's activations over those 2·BN·H rows
  std::vector<T> qg;                       // --head-gain: the kernel's q [BN, C]
  const T *q_att = nullptr, *k_att = nullptr;  // the q and k the kernel was given
  std::vector<T> att, stats;               // attention out [BN, C], stats [B, H, N]
  std::vector<T> res1;                     // x + attention branch [BN, C]
  std::vector<T> ln2, ln2_mean, ln2_rstd;  // LayerNorm(res1)
  std::vector<T> fc, fcg;                  // MLP hidden before and after GELU [BN, 4C]
};

template <class T>
class model {
 public:
  config cfg;
  std::vector<param_tensor> layout;
  std::vector<T> param, grad;
  std::vector<float> adam_m, adam_v;  // AdamW moments
  params<T> p, g;
  std::vector<polyattn::polysketch<T>> sketches;  // polysketch kind: one fixed random sketch per layer

  explicit model(const config& c) : cfg(c), layout(param_layout(c)) {
    if (cfg.vocab < 1 || cfg.context < 1 || cfg.layers < 1 || cfg.heads < 1 || cfg.dim % cfg.heads != 0)
      throw std::invalid_argument("charlm::model: bad configuration");
    Eigen::setNbThreads(1);  // the dense layers split their GEMMs into one block per thread themselves
    const index_t n = param_count(layout);
    param.assign(std::size_t(n), T(0));
    grad.assign(std::size_t(n), T(0));
    adam_m.assign(std::size_t(n), 0.f);
    adam_v.assign(std::size_t(n), 0.f);
    p = bind_params(cfg, layout, param.data());
    g = bind_params(cfg, layout, grad.data());
    rng gen(cfg.seed);
    for (const param_tensor& t : layout)
      for (index_t i = 0; i < t.rows * t.cols; ++i)
        param[std::size_t(t.offset + i)] =
            t.init == param_tensor::normal ? T(t.sigma * gen.normal())
            : T(t.init == param_tensor::ones ? 1 : t.init == param_tensor::constant ? t.sigma : 0);
    if (cfg.kind == attention_kind::polysketch)
      for (index_t l = 0; l < cfg.layers; ++l) {
        polyattn::sketch_options so;
        so.degree = cfg.degree, so.sketch_size = cfg.sketch_size, so.seed = cfg.seed * 1000003u + std::uint64_t(l);
        sketches.emplace_back(cfg.head_dim(), so);
      }
  }

  index_t num_params() const { return param_count(layout); }

  /// Mean cross-entropy (nats) of targets given inputs, tokens [B, N] (B <= cfg.batch).
  /// Keeps every activation the backward pass needs.
  double forward(const int* inputs, const int* targets, index_t B) {
    const config& c = cfg;
    const index_t N = c.context, C = c.dim, H = c.heads, hd = c.head_dim(), BN = B * N, V = c.vocab;
    const index_t r = c.sketch_size;
    const int th = c.threads;
    allocate(B);
    targets_.assign(targets, targets + BN);
    inputs_.assign(inputs, inputs + BN);
    embed_forward(resid_[0].data(), inputs, p.wte, p.wpe, B, N, C);
    for (index_t l = 0; l < c.layers; ++l) {
      const layer_params<T>& w = p.layer[std::size_t(l)];
      layer_acts<T>& a = acts_[std::size_t(l)];
      const T* x = resid_[std::size_t(l)].data();
      layernorm_forward(a.ln1.data(), a.ln1_mean.data(), a.ln1_rstd.data(), x, w.ln1_g, w.ln1_b, BN, C, th);
      linear_forward(a.q.data(), a.ln1.data(), w.wq, w.bq, BN, C, C, th);
      linear_forward(a.k.data(), a.ln1.data(), w.wk, w.bk, BN, C, C, th);
      linear_forward(a.v.data(), a.ln1.data(), w.wv, w.bv, BN, C, C, th);
      if (c.rope) {  // q, k rotated in place (the projections' backward needs only ln1)
        rope_rotate(a.q.data(), rope_.data(), BN, N, H, hd, false, th);
        rope_rotate(a.k.data(), rope_.data(), BN, N, H, hd, false, th);
      }
      const T *q = a.q.data(), *k = a.k.data(), *sq = nullptr, *sk = nullptr;
      if (c.normalises_qk()) {  // q, k LayerNorm-ed per head (rows of hd), as the paper's models do
        T* qn = a.qkn.data();
        layernorm_forward(qn, a.qkn_mean.data(), a.qkn_rstd.data(), a.q.data(), w.qln_g, w.qln_b, BN * H, hd, th);
        layernorm_forward(qn + BN * C, a.qkn_mean.data() + BN * H, a.qkn_rstd.data() + BN * H, a.k.data(), w.kln_g,
                          w.kln_b, BN * H, hd, th);
        q = qn, k = qn + BN * C;
      }
      if (c.kind == attention_kind::learned) {  // one network sketches q's and k's rows alike
        sketch_forward(a.sketch.data(), a.sk, a.qkn.data(), w, 2 * BN * H, hd, r, th);
        sq = a.sketch.data(), sk = a.sketch.data() + BN * H * r;
      }
      if (c.head_gain) {  // the kernel's q: exp(τ_h)·q in head h
        parallel_for(BN * H, th, [&](index_t i) {
          const T f = std::exp(w.qgain[i % H]);
          for (index_t j = 0; j < hd; ++j) a.qg[std::size_t(i * hd + j)] = f * q[i * hd + j];
        });
        q = a.qg.data();
      }
      a.q_att = q, a.k_att = k;
      call(B, l).forward(a.att.data(), a.stats.data(), q, k, a.v.data(), sq, sk);
      // res1 = x + att·wo + bo
      linear_forward(a.res1.data(), a.att.data(), w.wo, w.bo, BN, C, C, th);
      mmap<T>(a.res1.data(), BN, C) += cmap<T>(x, BN, C);
      layernorm_forward(a.ln2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), a.res1.data(), w.ln2_g, w.ln2_b, BN, C, th);
      linear_forward(a.fc.data(), a.ln2.data(), w.wfc, w.bfc, BN, C, 4 * C, th);
      gelu_forward(a.fcg.data(), a.fc.data(), BN * 4 * C, th);
      // x_{l+1} = res1 + gelu(fc)·wpr + bpr
      T* out = resid_[std::size_t(l + 1)].data();
      linear_forward(out, a.fcg.data(), w.wpr, w.bpr, BN, 4 * C, C, th);
      mmap<T>(out, BN, C) += cmap<T>(a.res1.data(), BN, C);
    }
    layernorm_forward(lnf_.data(), lnf_mean_.data(), lnf_rstd_.data(), resid_.back().data(), p.lnf_g, p.lnf_b, BN, C,
                      th);
    linear_forward<T>(logits_.data(), lnf_.data(), p.whead, nullptr, BN, C, V, th);
    return crossentropy_forward(logits_.data(), row_loss_.data(), targets, BN, V, th) / double(BN);
  }

  void zero_grad() { std::fill(grad.begin(), grad.end(), T(0)); }

  /// Gradients of the last forward's mean loss, accumulated into grad.
  void backward() {
    const config& c = cfg;
    const index_t B = cur_batch_, N = c.context, C = c.dim, H = c.heads, hd = c.head_dim(), BN = B * N, V = c.vocab;
    const index_t r = c.sketch_size;
    const int th = c.threads;
    // loss = mean_rows CE(logits)
    crossentropy_backward(dlogits_.data(), logits_.data(), targets_.data(), BN, V, T(1) / T(BN), th);
    // logits = lnf·whead
    std::fill(dln_.begin(), dln_.end(), T(0));
    linear_backward<T>(dln_.data(), g.whead, nullptr, dlogits_.data(), lnf_.data(), p.whead, BN, C, V, th);
    // lnf = LayerNorm(x_L)
    std::fill(dres_.begin(), dres_.end(), T(0));
    layernorm_backward(dres_.data(), g.lnf_g, g.lnf_b, dln_.data(), resid_.back().data(), lnf_mean_.data(),
                       lnf_rstd_.data(), p.lnf_g, BN, C, th);
    for (index_t l = c.layers - 1; l >= 0; --l) {
      const layer_params<T>& w = p.layer[std::size_t(l)];
      const layer_params<T>& dw = g.layer[std::size_t(l)];
      layer_acts<T>& a = acts_[std::size_t(l)];
      const T* x = resid_[std::size_t(l)].data();
      // dres_ is dL/dx_{l+1}; x_{l+1} = res1 + fcg·wpr + bpr: res1 gets dres_ unchanged
      std::fill(dfc_.begin(), dfc_.end(), T(0));
      linear_backward(dfc_.data(), dw.wpr, dw.bpr, dres_.data(), a.fcg.data(), w.wpr, BN, 4 * C, C, th);
      // fcg = gelu(fc): dfc from dfcg (in dfc_), into dfc2_
      std::fill(dfc2_.begin(), dfc2_.end(), T(0));
      gelu_backward(dfc2_.data(), a.fc.data(), dfc_.data(), BN * 4 * C, th);
      // fc = ln2·wfc + bfc
      std::fill(dln_.begin(), dln_.end(), T(0));
      linear_backward(dln_.data(), dw.wfc, dw.bfc, dfc2_.data(), a.ln2.data(), w.wfc, BN, C, 4 * C, th);
      // ln2 = LayerNorm(res1): adds to dres_, now dL/dres1
      layernorm_backward(dres_.data(), dw.ln2_g, dw.ln2_b, dln_.data(), a.res1.data(), a.ln2_mean.data(),
                         a.ln2_rstd.data(), w.ln2_g, BN, C, th);
      // res1 = x + att·wo + bo: x gets dres_ unchanged
      std::fill(datt_.begin(), datt_.end(), T(0));
      linear_backward(datt_.data(), dw.wo, dw.bo, dres_.data(), a.att.data(), w.wo, BN, C, C, th);
      if (c.learns_bias()) {  // β = exp(θ): o = Σ w v / (β + Σ w), so dL/dβ = −Σ_rows (dout·o) / stats
        const T beta = std::exp(*w.nbias);
        double sum = 0;
        for (index_t i = 0; i < BN * H; ++i) {  // rows of [B, N, H]; stats are [B, H, N]
          const index_t b = i / (N * H), t = i / H % N, h = i % H;
          double dot = 0;
          for (index_t j = 0; j < hd; ++j) dot += double(datt_[std::size_t(i * hd + j)]) * double(a.att[std::size_t(i * hd + j)]);
          sum -= dot / double(a.stats[std::size_t((b * H + h) * N + t)]);
        }
        *dw.nbias += T(sum * double(beta));
      }
      // att = attention(q', k', v) with q' = q (softmax) or per-head LayerNorm(q) (polynomial kinds)
      const bool norm = c.normalises_qk();
      const T* q = a.q_att;
      const T* k = a.k_att;
      T* dq = norm ? dqkn_.data() : dq_.data();
      T* dk = norm ? dqkn_.data() + BN * C : dk_.data();
      const bool learned = c.kind == attention_kind::learned;
      const T* sq = learned ? a.sketch.data() : nullptr;
      const T* sk = learned ? a.sketch.data() + BN * H * r : nullptr;
      call(B, l).backward(dq, dk, dv_.data(), learned ? dsketch_.data() : nullptr,
                       learned ? dsketch_.data() + BN * H * r : nullptr, datt_.data(), a.att.data(), a.stats.data(), q,
                       k, a.v.data(), sq, sk);
      if (c.head_gain)  // q'' = exp(τ_h)·q': dτ_h += Σ dq''·q'', dq' = exp(τ_h)·dq''
        for (index_t h = 0; h < H; ++h) {
          const T f = std::exp(w.qgain[h]);
          double s = 0;
          for (index_t i = h; i < BN * H; i += H)
            for (index_t j = 0; j < hd; ++j) {
              T& d = dq[i * hd + j];
              s += double(d) * double(q[i * hd + j]);
              d *= f;
            }
          dw.qgain[h] += T(s);
        }
      // sketch = sketch_net([q'; k']): adds to dq', dk'
      if (learned)
        sketch_backward(dqkn_.data(), dw, dsketch_.data(), a.sketch.data(), a.sk, a.qkn.data(), w, 2 * BN * H, hd, r,
                        th, sketch_scratch_);
      if (norm) {  // q' = LayerNorm_head(q), k' = LayerNorm_head(k)
        std::fill(dq_.begin(), dq_.end(), T(0));
        std::fill(dk_.begin(), dk_.end(), T(0));
        layernorm_backward(dq_.data(), dw.qln_g, dw.qln_b, dqkn_.data(), a.q.data(), a.qkn_mean.data(),
                           a.qkn_rstd.data(), w.qln_g, BN * H, hd, th);
        layernorm_backward(dk_.data(), dw.kln_g, dw.kln_b, dqkn_.data() + BN * C, a.k.data(),
                           a.qkn_mean.data() + BN * H, a.qkn_rstd.data() + BN * H, w.kln_g, BN * H, hd, th);
      }
      if (c.rope) {  // q, k were rotated after the projections
        rope_rotate(dq_.data(), rope_.data(), BN, N, H, hd, true, th);
        rope_rotate(dk_.data(), rope_.data(), BN, N, H, hd, true, th);
      }
      // q = ln1·wq + bq, k = ln1·wk + bk, v = ln1·wv + bv
      std::fill(dln_.begin(), dln_.end(), T(0));
      linear_backward(dln_.data(), dw.wq, dw.bq, dq_.data(), a.ln1.data(), w.wq, BN, C, C, th);
      linear_backward(dln_.data(), dw.wk, dw.bk, dk_.data(), a.ln1.data(), w.wk, BN, C, C, th);
      linear_backward(dln_.data(), dw.wv, dw.bv, dv_.data(), a.ln1.data(), w.wv, BN, C, C, th);
      // ln1 = LayerNorm(x): adds to dres_, now dL/dx_l
      layernorm_backward(dres_.data(), dw.ln1_g, dw.ln1_b, dln_.data(), x, a.ln1_mean.data(), a.ln1_rstd.data(),
                         w.ln1_g, BN, C, th);
    }
    // x_0 = wte[tok] + wpe[t]
    embed_backward(g.wte, g.wpe, dres_.data(), inputs_.data(), B, N, C);
  }

  /// Scales the gradients to a global L2 norm of at most max_norm; returns the norm before.
  double clip_gradients(double max_norm) {
    double s = 0;
    for (T x : grad) s += double(x) * double(x);
    const double norm = std::sqrt(s);
    if (max_norm > 0 && norm > max_norm) {
      const T f = T(max_norm / norm);
      for (T& x : grad) x *= f;
    }
    return norm;
  }

  /// What the attention rows of the last forward look like, per layer and head (layer-major):
  /// means over the rows at positions 1 … N−1 of its first `seqs` sequences of the weight on the
  /// previous position, on the own position, the largest weight and the entropy (bits) of the
  /// row's weights normalised to sum 1. Recomputed here from the kernel's q and k by the textbook
  /// formula (softmax of scale·q·k; (scale·q·k)^p / (β + Σ)), so only for the exact kinds.
  struct head_summary {
    double prev = 0, self = 0, max = 0, entropy = 0;
  };
  std::vector<head_summary> attention_summary(index_t seqs) const {
    const config& c = cfg;
    if (c.sketched()) throw std::invalid_argument("charlm::model::attention_summary: exact kinds only");
    const index_t N = c.context, H = c.heads, hd = c.head_dim(), S = std::min(seqs, cur_batch_);
    std::vector<head_summary> out(std::size_t(c.layers * H));
    std::vector<double> wt(static_cast<std::size_t>(N));
    for (index_t l = 0; l < c.layers; ++l) {
      const layer_acts<T>& a = acts_[std::size_t(l)];
      const double beta_l = beta(l);
      for (index_t h = 0; h < H; ++h) {
        head_summary& o = out[std::size_t(l * H + h)];
        for (index_t b = 0; b < S; ++b)
          for (index_t t = 1; t < N; ++t) {
            const T* q = a.q_att + ((b * N + t) * H + h) * hd;
            double top = -std::numeric_limits<double>::infinity(), sum = 0;
            for (index_t j = 0; j <= t; ++j) {
              const T* k = a.k_att + ((b * N + j) * H + h) * hd;
              double d = 0;
              for (index_t e = 0; e < hd; ++e) d += double(q[e]) * double(k[e]);
              wt[std::size_t(j)] = c.kind == attention_kind::softmax ? d / std::sqrt(double(hd))
                                                                     : std::pow(d * c.poly_scale(), c.degree);
              top = std::max(top, wt[std::size_t(j)]);
            }
            for (index_t j = 0; j <= t; ++j) {
              double& x = wt[std::size_t(j)];
              if (c.kind == attention_kind::softmax) x = std::exp(x - top);
              sum += x;
            }
            const double denom = c.kind == attention_kind::softmax ? sum : beta_l + sum;
            double biggest = 0, entropy = 0;
            for (index_t j = 0; j <= t; ++j) {
              const double x = wt[std::size_t(j)];
              biggest = std::max(biggest, x);
              if (x > 0) entropy -= x / sum * std::log2(x / sum);
            }
            o.prev += wt[std::size_t(t - 1)] / denom, o.self += wt[std::size_t(t)] / denom;
            o.max += biggest / denom, o.entropy += entropy;
          }
        const double rows = double(S * (N - 1));
        o.prev /= rows, o.self /= rows, o.max /= rows, o.entropy /= rows;
      }
    }
    return out;
  }

  /// The normaliser bias β of layer l's polynomial kernel (learned or fixed).
  double beta(index_t l) const {
    return cfg.learns_bias() ? std::exp(double(*p.layer[std::size_t(l)].nbias)) : cfg.normalizer_bias;
  }

  /// One AdamW step (β₁ = 0.9, β₂ = --beta2 (0.95), ε = 1e-8; decoupled weight decay on the matrices).
  void adamw_step(double lr, index_t t) {
    const double b1 = 0.9, b2 = cfg.beta2, eps = 1e-8;
    const double c1 = 1 - std::pow(b1, double(t)), c2 = 1 - std::pow(b2, double(t));
    for (const param_tensor& pt : layout) {
      const double wd = pt.decay ? cfg.weight_decay : 0.0, lr_t = lr * pt.lr_mult;
      parallel_for(pt.rows * pt.cols, cfg.threads, [&](index_t j) {
        const std::size_t i = std::size_t(pt.offset + j);
        const double gi = double(grad[i]);
        const double m = b1 * adam_m[i] + (1 - b1) * gi, v = b2 * adam_v[i] + (1 - b2) * gi * gi;
        adam_m[i] = float(m), adam_v[i] = float(v);
        param[i] = T(double(param[i]) - lr_t * ((m / c1) / (std::sqrt(v / c2) + eps) + wd * double(param[i])));
      });
    }
  }

 private:
  index_t cur_batch_ = -1;
  std::vector<std::vector<T>> resid_;  // x_0 … x_L, the residual stream into each layer [BN, C]
  std::vector<layer_acts<T>> acts_;
  std::vector<T> lnf_, lnf_mean_, lnf_rstd_, logits_, row_loss_;
  std::vector<int> inputs_, targets_;
  // backward scratch, shared by the layers
  std::vector<T> rope_;  // --rope: cos, sin [N, hd/2, 2]
  std::vector<T> dres_, dln_, dfc_, dfc2_, datt_, dq_, dk_, dv_, dqkn_, dsketch_, dlogits_, sketch_scratch_;

  attention_call<T> call(index_t B, index_t layer) const {
    return {cfg, B, cfg.context, cfg.kind == attention_kind::polysketch ? &sketches[std::size_t(layer)] : nullptr,
            beta(layer)};
  }

  void allocate(index_t B) {
    if (B < 1 || B > cfg.batch) throw std::invalid_argument("charlm::model::forward: batch out of range");
    cur_batch_ = B;
    if (!resid_.empty()) return;  // sized for cfg.batch once
    const config& c = cfg;
    const auto BN = std::size_t(c.batch * c.context), C = std::size_t(c.dim), H = std::size_t(c.heads),
               V = std::size_t(c.vocab), r = std::size_t(c.sketch_size);
    resid_.assign(std::size_t(c.layers + 1), std::vector<T>(BN * C));
    acts_.resize(std::size_t(c.layers));
    for (layer_acts<T>& a : acts_) {
      for (auto* v : {&a.ln1, &a.q, &a.k, &a.v, &a.att, &a.res1, &a.ln2}) v->resize(BN * C);
      for (auto* v : {&a.ln1_mean, &a.ln1_rstd, &a.ln2_mean, &a.ln2_rstd}) v->resize(BN);
      a.stats.resize(BN * H);
      if (c.head_gain) a.qg.resize(BN * C);
      a.fc.resize(BN * 4 * C), a.fcg.resize(BN * 4 * C);
      if (c.normalises_qk()) a.qkn.resize(2 * BN * C), a.qkn_mean.resize(2 * BN * H), a.qkn_rstd.resize(2 * BN * H);
      if (c.kind == attention_kind::learned) {
        a.sketch.resize(2 * BN * H * r);
        a.sk.resize(index_t(2 * BN * H), c.head_dim(), c.sketch_size);
      }
    }
    lnf_.resize(BN * C), lnf_mean_.resize(BN), lnf_rstd_.resize(BN), logits_.resize(BN * V), row_loss_.resize(BN);
    for (auto* v : {&dres_, &dln_, &datt_, &dq_, &dk_, &dv_}) v->resize(BN * C);
    dfc_.resize(BN * 4 * C), dfc2_.resize(BN * 4 * C), dlogits_.resize(BN * V);
    if (c.normalises_qk()) dqkn_.resize(2 * BN * C);
    if (c.kind == attention_kind::learned) dsketch_.resize(2 * BN * H * r);
    if (c.rope) rope_ = rope_table<T>(c.context, c.head_dim());
  }
};

// ----------------------------------------------------------------------------------------------
// data: any text file as bytes; the vocabulary is the bytes it contains; the last 5 % is validation

struct dataset {
  std::vector<unsigned char> chars;  // token id -> byte
  std::vector<int> train, val;
};

inline dataset load_text(const std::string& text) {
  if (text.size() < 64) throw std::invalid_argument("charlm::load_text: need at least 64 characters of text");
  bool seen[256] = {};
  for (unsigned char ch : text) seen[ch] = true;
  int id[256];
  dataset d;
  for (int ch = 0; ch < 256; ++ch)
    if (seen[ch]) id[ch] = int(d.chars.size()), d.chars.push_back((unsigned char)ch);
  const std::size_t n_val = text.size() / 20, n_train = text.size() - n_val;
  d.train.reserve(n_train), d.val.reserve(n_val);
  for (std::size_t i = 0; i < text.size(); ++i)
    (i < n_train ? d.train : d.val).push_back(id[(unsigned char)text[i]]);
  return d;
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read '" + path + "'");
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// The text of `bible -f` (Debian's bible-kjv) without its verse labels: each line must start
/// with a label — a book abbreviation (an optional leading digit, then letters), chapter:verse —
/// and one space, e.g. "1Cor13:4 Charity suffereth long". Throws on a line that does not.
inline std::string strip_verse_labels(const std::string& in, index_t* verses = nullptr) {
  std::string out;
  out.reserve(in.size());
  index_t count = 0, line_no = 0;
  std::size_t pos = 0;
  while (pos < in.size()) {
    std::size_t end = in.find('\n', pos);
    if (end == std::string::npos) end = in.size();
    ++line_no;
    std::size_t i = pos;
    auto digits = [&]() {
      const std::size_t s = i;
      while (i < end && in[i] >= '0' && in[i] <= '9') ++i;
      return i > s;
    };
    auto letters = [&]() {
      const std::size_t s = i;
      while (i < end && ((in[i] >= 'A' && in[i] <= 'Z') || (in[i] >= 'a' && in[i] <= 'z'))) ++i;
      return i > s;
    };
    if (i < end && in[i] >= '1' && in[i] <= '9') ++i;  // 1Cor, 2Sm, 3Jn
    const bool ok = letters() && digits() && i < end && in[i++] == ':' && digits() && i < end && in[i++] == ' ';
    if (!ok)
      throw std::runtime_error("strip_verse_labels: line " + std::to_string(line_no) +
                               " does not start with a verse label: '" + in.substr(pos, std::min<std::size_t>(40, end - pos)) +
                               "'");
    out.append(in, i, end - i);
    out.push_back('\n');
    ++count;
    pos = end + 1;
  }
  if (verses) *verses = count;
  return out;
}

// ----------------------------------------------------------------------------------------------
// training

/// Learning rate at step t (1-based): linear warm-up, then cosine decay to lr/10.
inline double learning_rate(const config& c, index_t t) {
  if (t <= c.warmup) return c.lr * double(t) / double(std::max<index_t>(c.warmup, 1));
  const double f = double(t - c.warmup) / double(std::max<index_t>(c.steps - c.warmup, 1));
  return c.lr * (0.1 + 0.9 * 0.5 * (1 + std::cos(3.141592653589793 * std::min(f, 1.0))));
}

/// A batch of B random windows of the training split: inputs x[b, t], targets y[b, t] = x[b, t + 1].
inline void sample_batch(std::vector<int>& x, std::vector<int>& y, const std::vector<int>& tokens, index_t B,
                         index_t N, rng& gen) {
  x.resize(std::size_t(B * N)), y.resize(std::size_t(B * N));
  for (index_t b = 0; b < B; ++b) {
    const index_t off = gen.below(index_t(tokens.size()) - N);
    for (index_t t = 0; t < N; ++t)
      x[std::size_t(b * N + t)] = tokens[std::size_t(off + t)], y[std::size_t(b * N + t)] = tokens[std::size_t(off + t + 1)];
  }
}

/// Bits per character on the validation split: non-overlapping windows of `context`
/// characters (each scored on all its targets), evenly spread; `chars` = 0 scores them all.
/// Returns bits/char and sets *scored to the number of characters scored.
template <class T>
double evaluate(model<T>& m, const std::vector<int>& val, index_t chars, index_t* scored) {
  const index_t N = m.cfg.context, windows = (index_t(val.size()) - 1) / N;
  if (windows < 1) throw std::invalid_argument("validation split shorter than the context");
  const index_t use = chars <= 0 ? windows : std::clamp<index_t>(chars / N, 1, windows);
  std::vector<int> x, y;
  double total = 0;
  for (index_t w0 = 0; w0 < use; w0 += m.cfg.batch) {
    const index_t B = std::min(m.cfg.batch, use - w0);
    x.resize(std::size_t(B * N)), y.resize(std::size_t(B * N));
    for (index_t b = 0; b < B; ++b) {
      const index_t off = (w0 + b) * windows / use * N;  // window index spread over the split
      for (index_t t = 0; t < N; ++t)
        x[std::size_t(b * N + t)] = val[std::size_t(off + t)], y[std::size_t(b * N + t)] = val[std::size_t(off + t + 1)];
    }
    total += m.forward(x.data(), y.data(), B) * double(B * N);
  }
  if (scored) *scored = use * N;
  return total / double(use * N) / std::log(2.0);
}

inline std::string format_duration(double s) {
  char buf[32];
  const long t = long(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, t / 60 % 60);
  else std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

/// The training run of `train_charlm`: returns the final validation bits/char (whole split).
inline double train(config c, const dataset& data) {
  using clock = std::chrono::steady_clock;
  c.vocab = index_t(data.chars.size());
  model<float> m(c);
  std::fprintf(stderr,
               "charlm: %s%s, context %lld, %lld layers, dim %lld, %lld heads, batch %lld, %lld steps, lr %g, "
               "%lld parameters, vocabulary %lld, %zu train / %zu validation characters, %d threads\n",
               kind_name(c.kind), c.sketched() && c.local_exact ? " (local_exact)" : "", (long long)c.context,
               (long long)c.layers, (long long)c.dim, (long long)c.heads, (long long)c.batch, (long long)c.steps, c.lr,
               (long long)m.num_params(), (long long)c.vocab, data.train.size(), data.val.size(), c.threads);
  if (!c.rope || c.head_gain || c.learns_bias() || c.normalizer_bias != 1 || c.beta2 != 0.95 || c.qk_lr != 1 ||
      c.qk_gain_init != 1)
    std::fprintf(stderr, "charlm: rope %d, head gain %d, normaliser bias %g%s, beta2 %g, q/k lr x%g, q/k gain init %g\n",
                 int(c.rope), int(c.head_gain), c.normalizer_bias, c.learns_bias() ? " (learned)" : "", c.beta2, c.qk_lr,
                 c.qk_gain_init);
  if (c.sketched())
    std::fprintf(stderr, "charlm: sketch size r = %lld, block %lld, degree %d\n", (long long)c.sketch_size,
                 (long long)c.block, c.degree);
  std::FILE* log = nullptr;
  if (!c.log.empty()) {
    log = std::fopen(c.log.c_str(), "w");
    if (!log) throw std::runtime_error("cannot write '" + c.log + "'");
    std::fprintf(log, "step,train_loss,val_bpc,seconds,val_chars\n");
  }
  std::FILE* attn_log = nullptr;
  if (!c.attn_log.empty()) {
    if (c.sketched()) throw std::invalid_argument("--attn-log: softmax and polynomial only");
    attn_log = std::fopen(c.attn_log.c_str(), "w");
    if (!attn_log) throw std::runtime_error("cannot write '" + c.attn_log + "'");
    std::fprintf(attn_log, "step,layer,head,prev,self,max,entropy_bits\n");
  }
  const bool tty = isatty(2);
  rng gen(c.seed ^ 0x5EEDull);
  std::vector<int> x, y;
  double train_seconds = 0, loss_sum = 0, eval_seconds = 0;
  std::vector<double> step_seconds;
  index_t loss_count = 0, evals = 0;
  auto last_print = clock::now();
  auto log_row = [&](index_t step, index_t chars) {
    const auto t0 = clock::now();
    index_t scored = 0;
    const double bpc = evaluate(m, data.val, chars, &scored);
    eval_seconds += std::chrono::duration<double>(clock::now() - t0).count();
    ++evals;
    const double tl = loss_count ? loss_sum / double(loss_count) : std::nan("");
    std::fprintf(stderr, "%sstep %6lld  train loss %.4f  val %.4f bits/char (%lld chars)  %.1f s\n", tty ? "\r\033[K" : "",
                 (long long)step, tl, bpc, (long long)scored, train_seconds);
    if (log) std::fprintf(log, "%lld,%.6f,%.6f,%.3f,%lld\n", (long long)step, tl, bpc, train_seconds, (long long)scored), std::fflush(log);
    loss_sum = 0, loss_count = 0;
    if (attn_log) {  // the rows of the evaluation's last batch (4 sequences)
      const auto heads = m.attention_summary(4);
      for (std::size_t i = 0; i < heads.size(); ++i)
        std::fprintf(attn_log, "%lld,%lld,%lld,%.5f,%.5f,%.5f,%.4f\n", (long long)step, (long long)(index_t(i) / c.heads),
                     (long long)(index_t(i) % c.heads), heads[i].prev, heads[i].self, heads[i].max, heads[i].entropy);
      std::fflush(attn_log);
    }
    return bpc;
  };
  log_row(0, c.val_chars);
  for (index_t step = 1; step <= c.steps; ++step) {
    const auto t0 = clock::now();
    sample_batch(x, y, data.train, c.batch, c.context, gen);
    const double loss = m.forward(x.data(), y.data(), c.batch);
    m.zero_grad();
    m.backward();
    m.clip_gradients(c.grad_clip);
    m.adamw_step(learning_rate(c, step), step);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    train_seconds += dt;
    step_seconds.push_back(dt);
    if (!std::isfinite(loss)) throw std::runtime_error("loss is not finite at step " + std::to_string(step));
    loss_sum += loss, ++loss_count;
    const bool eval_now = step % c.eval_every == 0 && step != c.steps;
    const auto now = clock::now();
    if (eval_now || step == c.steps || std::chrono::duration<double>(now - last_print).count() > (tty ? 0.25 : 10.0)) {
      last_print = now;
      const double per_step = train_seconds / double(step);
      const double per_eval = evals ? eval_seconds / double(evals) : 0;
      const double eta = per_step * double(c.steps - step) + per_eval * double((c.steps - step) / c.eval_every + 1);
      std::fprintf(stderr, "%sstep %lld/%lld  loss %.4f  %.0f tokens/s  ETA %s%s", tty ? "\r\033[K" : "",
                   (long long)step, (long long)c.steps, loss, double(c.batch * c.context) / per_step,
                   format_duration(eta).c_str(), tty ? "" : "\n");
      std::fflush(stderr);
    }
    if (eval_now) log_row(step, c.val_chars);
  }
  const double final_bpc = log_row(c.steps, 0);  // the last row scores the whole validation split
  std::sort(step_seconds.begin(), step_seconds.end());  // the median step resists a busy machine
  std::fprintf(stderr,
               "charlm: final validation %.4f bits/char, %.0f tokens/s, median step %.1f ms, %.1f s training, "
               "%.1f s evaluating\n",
               final_bpc, double(c.batch * c.context * c.steps) / train_seconds,
               1000 * step_seconds[step_seconds.size() / 2], train_seconds, eval_seconds);
  if (log) std::fclose(log);
  if (attn_log) std::fclose(attn_log);
  return final_bpc;
}

// ----------------------------------------------------------------------------------------------
// command line

inline const char* usage() {
  return "usage: train_charlm --data FILE [options]\n"
         "       train_charlm --strip-verse-labels IN OUT   (the KJV text of Debian's `bible -f`)\n"
         "  --attention softmax|polynomial|polysketch|learned   (default softmax)\n"
         "  --local-exact          sketched kinds: exact weights inside each query's block\n"
         "  --context N            characters per sequence (256)\n"
         "  --layers L --dim C --heads H   (4, 128, 4)\n"
         "  --batch B --steps S --lr LR    (16, 3000, 5e-3)\n"
         "  --seed S --threads T           (1, 0 = every core)\n"
         "  --degree P             polynomial degree (4)\n"
         "  --sketch-size R        sketch size r of polysketch / learned (32)\n"
         "  --block B              block size of the sketched kinds (64)\n"
         "  --warmup S --weight-decay W --grad-clip G   (100, 0.1, 1.0)\n"
         "  --eval-every S --val-chars N   evaluation period and characters scored (100, 65536; 0 = all)\n"
         "  --log FILE             CSV: step, train_loss (nats), val_bpc, seconds (training only), val_chars\n"
         "ablation (docs/design.md §9.8):\n"
         "  --rope, --no-rope      rotary position embedding on q and k, before the q/k LayerNorm (on)\n"
         "  --head-gain            a learned per-head gain exp(tau) on q (softmax: a temperature)\n"
         "  --normalizer-bias B|learned   beta of the polynomial kinds (1; learned: exp(theta) per layer from 1)\n"
         "  --beta2 B              AdamW beta2 (0.95)\n"
         "  --qk-lr M              learning-rate multiplier of the q/k projections, LayerNorms and gains (1)\n"
         "  --qk-gain-init G       initial q/k LayerNorm gain of the polynomial kinds (1)\n"
         "  --attn-log FILE        CSV at each evaluation, exact kinds: per layer and head the mean weight on\n"
         "                         the previous and the own position, the largest weight, the entropy (bits)\n";
}

inline config parse_args(int argc, char** argv) {
  config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("missing value after " + a);
      return argv[++i];
    };
    auto integer = [&](index_t lo) {
      const std::string v = value();
      std::size_t used = 0;
      long long n = 0;
      try {
        n = std::stoll(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || n < lo)
        throw std::invalid_argument(a + " needs an integer >= " + std::to_string(lo) + ", got '" + v + "'");
      return index_t(n);
    };
    auto real = [&]() {
      const std::string v = value();
      std::size_t used = 0;
      double x = 0;
      try {
        x = std::stod(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || !(x >= 0)) throw std::invalid_argument(a + " needs a number >= 0, got '" + v + "'");
      return x;
    };
    if (a == "--attention") {
      const std::string k = value();
      if (k == "softmax") c.kind = attention_kind::softmax;
      else if (k == "polynomial") c.kind = attention_kind::polynomial;
      else if (k == "polysketch") c.kind = attention_kind::polysketch;
      else if (k == "learned") c.kind = attention_kind::learned;
      else throw std::invalid_argument("--attention must be softmax, polynomial, polysketch or learned, got '" + k + "'");
    } else if (a == "--local-exact") c.local_exact = true;
    else if (a == "--context") c.context = integer(1);
    else if (a == "--layers") c.layers = integer(1);
    else if (a == "--dim") c.dim = integer(1);
    else if (a == "--heads") c.heads = integer(1);
    else if (a == "--batch") c.batch = integer(1);
    else if (a == "--steps") c.steps = integer(1);
    else if (a == "--lr") c.lr = real();
    else if (a == "--seed") c.seed = std::uint64_t(integer(0));
    else if (a == "--threads") c.threads = int(integer(0));
    else if (a == "--degree") c.degree = int(integer(2));
    else if (a == "--sketch-size") c.sketch_size = integer(1);
    else if (a == "--block") c.block = integer(1);
    else if (a == "--warmup") c.warmup = integer(0);
    else if (a == "--weight-decay") c.weight_decay = real();
    else if (a == "--grad-clip") c.grad_clip = real();
    else if (a == "--eval-every") c.eval_every = integer(1);
    else if (a == "--val-chars") c.val_chars = integer(0);
    else if (a == "--data") c.data = value();
    else if (a == "--log") c.log = value();
    else if (a == "--rope") c.rope = true;
    else if (a == "--no-rope") c.rope = false;
    else if (a == "--head-gain") c.head_gain = true;
    else if (a == "--normalizer-bias") {
      if (i + 1 < argc && std::string(argv[i + 1]) == "learned") c.learn_bias = true, ++i;
      else c.normalizer_bias = real();
    } else if (a == "--beta2") c.beta2 = real();
    else if (a == "--qk-lr") c.qk_lr = real();
    else if (a == "--qk-gain-init") c.qk_gain_init = real();
    else if (a == "--attn-log") c.attn_log = value();
    else throw std::invalid_argument("unknown argument '" + a + "'");
  }
  if (c.data.empty()) throw std::invalid_argument("--data FILE is required");
  if (c.dim % c.heads != 0) throw std::invalid_argument("--dim must be a multiple of --heads");
  if (c.rope && c.head_dim() % 2 != 0) throw std::invalid_argument("--rope needs an even head dim (--dim / --heads)");
  if (!(c.beta2 < 1)) throw std::invalid_argument("--beta2 must be below 1");
  if (c.degree % 2 != 0) throw std::invalid_argument("--degree must be even");
  if (c.kind == attention_kind::polysketch && c.degree != 2 && c.degree != 4 && c.degree != 8 && c.degree != 16)
    throw std::invalid_argument("--attention polysketch needs --degree 2, 4, 8 or 16");
  if (c.threads == 0) {
#if defined(_OPENMP)
    c.threads = omp_get_max_threads();
#else
    c.threads = 1;
#endif
  }
  return c;
}

}  // namespace charlm

#ifndef CHARLM_NO_MAIN
int main(int argc, char** argv) {
  try {
    if (argc == 4 && std::string(argv[1]) == "--strip-verse-labels") {
      charlm::index_t verses = 0;
      const std::string text = charlm::strip_verse_labels(charlm::read_file(argv[2]), &verses);
      std::ofstream out(argv[3], std::ios::binary);
      out << text;
      if (!out) throw std::runtime_error(std::string("cannot write '") + argv[3] + "'");
      std::fprintf(stderr, "strip_verse_labels: %lld verses, %zu characters -> %s\n", (long long)verses, text.size(),
                   argv[3]);
      return 0;
    }
    if (argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
      std::fputs(charlm::usage(), stdout);
      return 0;
    }
    const charlm::config c = charlm::parse_args(argc, argv);
    charlm::train(c, charlm::load_text(charlm::read_file(c.data)));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_charlm: %s\n%s", e.what(), charlm::usage());
    return 1;
  }
}
#endif
