// The synthetic cache model of docs/synthetic.md. Every vector is built in
// "logit units": a key row is sqrt(D) * kappa and a query row is chi, so that
// the logit q.k / sqrt(D) equals chi . kappa and the constants below are the
// logits themselves (before the layer's gain and the head multipliers).
#include "client/cli/synth.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "client/io/safetensors.h"
#include "kernels/common/status.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace medakv {
namespace {

// Logits at gain 1 and head multipliers 1 (docs/synthetic.md, "Constants").
constexpr double kSinkLogit = 7.0;         // every query row towards the (visual) sink keys
constexpr double kHeavyLogit = 3.5;        // text rows towards the heavy hitters (times w in [0.75, 1.25])
constexpr double kRecencyLogit = 4.0;      // every row towards the last token, times the profile a(j)
constexpr double kTargetLogit = 5.0;       // visual heads towards the question's region of each image
constexpr double kSecondaryLogit = 2.5;    // visual heads towards one more region of their own
constexpr double kSelfLogit = 3.0;         // visual rows towards their own region
constexpr double kVisualHeavyLogit = 2.0;  // visual rows towards the heavy hitters
constexpr double kNoiseLogit = 1.0;        // std of the unstructured part of a text key's logit
// Key shapes, |kappa| ~ 1; eps is N(0, 1/D) per element (norm ~ 1).
constexpr double kSinkKeyNoise = 0.1;     // (visual) sink key = u_sink + 0.1 eps
constexpr double kVisualKeyNoise = 0.25;  // visual key = c_k + 0.25 eps + 0.35 a(j) u_rec
constexpr double kTextKeyNoise = 0.8;     // text key = 0.8 eps' + 0.35 a(j) u_rec (+ w u_heavy)
constexpr double kRecencyKey = 0.35;      // the key's component along u_rec at the last token
constexpr double kRecencyWindow = 16.0;   // W of the profile a(j)
// Values.
constexpr double kValueCentre = 0.9;  // visual value = sqrt(D) 0.9 mu_k + 0.45 N(0, 1)
constexpr double kValueNoise = 0.45;
constexpr double kSinkValue = 0.1;  // (visual) sink value = 0.1 N(0, 1): sinks carry little
// Multipliers drawn per head.
constexpr double kHeadGainLo = 0.85, kHeadGainHi = 1.15;        // per kv head, on every logit
constexpr double kRoleLo = 0.85, kRoleHi = 1.15;                // per kv head, per structure
constexpr double kHeavyWeightLo = 0.75, kHeavyWeightHi = 1.25;  // per (kv head, heavy token): w
constexpr double kQueryGainLo = 0.95, kQueryGainHi = 1.05;      // per query head
// Query noise: shared by the kv head's group, by the query head, and the row's own.
constexpr double kShareKv = 0.6, kShareQ = 0.6;  // the row's own share is sqrt(1 - 0.36 - 0.36)
constexpr double kLayerJitter = 0.05;            // per-layer jitter of the sharpness profile
constexpr int kMaxTargetImages = 4;              // images the question is about

// ---- Random numbers: xoshiro256** seeded by SplitMix64, Box-Muller normals.
// Written out (not <random>'s distributions) so the bytes do not depend on
// the standard library.

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Streams: 0 for the token plan, 1 + 2 l for layer l, 2 + 2 l for its held-out rows.
uint64_t StreamSeed(uint64_t seed, uint64_t stream) {
  uint64_t a = seed, b = stream ^ 0x5851f42d4c957f2dULL;
  return SplitMix64(a) ^ (SplitMix64(b) * 0xd1342543de82ef95ULL);
}

class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (uint64_t& w : s_) w = SplitMix64(seed);
  }
  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }
  int64_t Below(int64_t n) {  // [0, n), n >= 1
    return std::min<int64_t>(n - 1, static_cast<int64_t>(Uniform() * static_cast<double>(n)));
  }
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = static_cast<double>((Next() >> 11) + 1) * 0x1.0p-53;  // (0, 1]
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
  double spare_ = 0.0;
  bool has_spare_ = false;
};

int64_t RoundHalfUp(double x) { return static_cast<int64_t>(std::floor(x + 0.5)); }

double Dot(const std::vector<double>& a, const double* b) {
  double s = 0.0;
  for (size_t x = 0; x < a.size(); ++x) s += a[x] * b[x];
  return s;
}

// A random unit vector of length n.
std::vector<double> UnitVector(Rng& rng, int64_t n) {
  std::vector<double> v(n);
  double norm2 = 0.0;
  for (double& x : v) {
    x = rng.Normal();
    norm2 += x * x;
  }
  const double inv = norm2 > 0.0 ? 1.0 / std::sqrt(norm2) : 0.0;
  for (double& x : v) x *= inv;
  return v;
}

// Removes from v its components along the orthonormal `basis` and
// renormalises it; keeps v as it is when that leaves (almost) nothing (tiny D).
void Orthogonalise(std::vector<double>& v, const std::vector<const std::vector<double>*>& basis) {
  std::vector<double> w = v;
  for (const std::vector<double>* b : basis) {
    const double dot = Dot(*b, w.data());
    for (size_t x = 0; x < w.size(); ++x) w[x] -= dot * (*b)[x];
  }
  const double norm2 = Dot(w, w.data());
  if (norm2 < 1e-6) return;
  const double inv = 1.0 / std::sqrt(norm2);
  for (size_t x = 0; x < w.size(); ++x) v[x] = w[x] * inv;
}

// `count` distinct elements of `from`, uniformly (a partial Fisher-Yates
// shuffle), in ascending order.
std::vector<int64_t> Choose(Rng& rng, std::vector<int64_t> from, int64_t count) {
  const int64_t n = static_cast<int64_t>(from.size());
  count = std::clamp<int64_t>(count, 0, n);
  for (int64_t i = 0; i < count; ++i) std::swap(from[i], from[i + rng.Below(n - i)]);
  from.resize(count);
  std::sort(from.begin(), from.end());
  return from;
}

// ---- The token plan: shared by every layer, from stream 0.

struct Plan {
  std::vector<uint8_t> modality;  // [tokens]
  std::vector<uint8_t> role;      // [tokens] TokenRole
  std::vector<int32_t> image;     // [tokens]
  std::vector<int32_t> cluster;   // [tokens]
  std::vector<double> recency;    // [tokens] the profile a(j), 1 at the last token
  int64_t clusters = 0;           // over all images
  std::vector<int32_t> targets;   // cluster ids the visual heads read
  std::vector<double> gain;       // [layers]
};

std::vector<ModalitySpan> SortedSpans(const SynthOptions& o) {
  if (o.text_only) return {};
  std::vector<ModalitySpan> spans = o.visual;
  if (spans.empty()) spans.push_back({o.tokens / 10, o.tokens * 7 / 10 - o.tokens / 10, Modality::kVisual});
  std::stable_sort(spans.begin(), spans.end(),
                   [](const ModalitySpan& a, const ModalitySpan& b) { return a.start < b.start; });
  return spans;
}

// Layer l's sharpness in [0, 1]: 0.5 - 0.5 cos(3 pi l / (L - 1)) plus
// jitter: flat at layer 0, peaked a third of the way, flat again at two
// thirds, peaked at the last layer.
double Sharpness(int64_t l, int64_t layers, double jitter) {
  const double x = layers > 1 ? static_cast<double>(l) / static_cast<double>(layers - 1) : 0.0;
  return std::clamp(0.5 - 0.5 * std::cos(3.0 * std::numbers::pi * x) + jitter, 0.0, 1.0);
}

Plan MakePlan(const SynthOptions& o, const std::vector<ModalitySpan>& spans, std::vector<uint8_t> modality) {
  Plan p;
  const int64_t t = o.tokens;
  p.modality = std::move(modality);
  // a(j) = 1 - ln(1 + (T - 1 - j) / W) / ln(1 + (T - 1) / W).
  const double span = std::log1p(static_cast<double>(t - 1) / kRecencyWindow);
  for (int64_t j = 0; j < t; ++j) {
    p.recency.push_back(t > 1 ? 1.0 - std::log1p(static_cast<double>(t - 1 - j) / kRecencyWindow) / span : 1.0);
  }

  Rng rng(StreamSeed(o.seed, 0));
  p.role.assign(t, static_cast<uint8_t>(TokenRole::kText));
  p.image.assign(t, -1);
  p.cluster.assign(t, -1);
  std::vector<int64_t> text;  // text tokens that are not sinks
  for (int64_t j = 0; j < t; ++j) {
    if (j < o.sinks) {
      p.role[j] = static_cast<uint8_t>(TokenRole::kSink);
    } else if (p.modality[j] != 0) {
      p.role[j] = static_cast<uint8_t>(TokenRole::kVisual);
    } else {
      text.push_back(j);
    }
  }
  // Heavy hitters: round(heavy_fraction * n) of those n text tokens, uniformly.
  for (int64_t j : Choose(rng, text, RoundHalfUp(o.heavy_fraction * static_cast<double>(text.size())))) {
    p.role[j] = static_cast<uint8_t>(TokenRole::kHeavy);
  }
  std::vector<int32_t> image_targets;
  for (size_t m = 0; m < spans.size(); ++m) {
    // The image is a grid of ceil(sqrt(n)) columns; its regions are the
    // Voronoi cells of K random points, so a region is a contiguous patch.
    const int64_t n = spans[m].length, k = std::min(o.image_clusters, n);
    const int64_t width = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
    const int64_t height = (n + width - 1) / width;
    std::vector<double> pr(k), pc(k);
    for (int64_t c = 0; c < k; ++c) {
      pr[c] = rng.Uniform(0.0, static_cast<double>(height));
      pc[c] = rng.Uniform(0.0, static_cast<double>(width));
    }
    std::vector<int64_t> members;  // the image's tokens that are not sinks
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = spans[m].start + i;
      p.image[j] = static_cast<int32_t>(m);
      if (p.role[j] == static_cast<uint8_t>(TokenRole::kSink)) continue;
      const double r = static_cast<double>(i / width) + 0.5, col = static_cast<double>(i % width) + 0.5;
      int64_t best = 0;
      double best_d = INFINITY;
      for (int64_t c = 0; c < k; ++c) {
        const double dist = (r - pr[c]) * (r - pr[c]) + (col - pc[c]) * (col - pc[c]);
        if (dist < best_d) best_d = dist, best = c;
      }
      p.cluster[j] = static_cast<int32_t>(p.clusters + best);
      members.push_back(j);
    }
    // Visual sinks: round(visual_sink_fraction * n) of the image's tokens,
    // at least 1 when the fraction is > 0, at most half of them, uniformly.
    int64_t visual_sinks = RoundHalfUp(o.visual_sink_fraction * static_cast<double>(n));
    if (o.visual_sink_fraction > 0.0) visual_sinks = std::max<int64_t>(visual_sinks, 1);
    visual_sinks = std::min<int64_t>(visual_sinks, static_cast<int64_t>(members.size()) / 2);
    for (int64_t j : Choose(rng, members, visual_sinks)) {
      p.role[j] = static_cast<uint8_t>(TokenRole::kVisualSink);
      p.cluster[j] = -1;
    }
    // The question's region of this image: one of its non-empty regions, uniformly.
    std::vector<int32_t> regions;
    for (int64_t j : members) {
      if (p.cluster[j] >= 0) regions.push_back(p.cluster[j]);
    }
    std::sort(regions.begin(), regions.end());
    regions.erase(std::unique(regions.begin(), regions.end()), regions.end());
    image_targets.push_back(regions.empty() ? -1 : regions[rng.Below(static_cast<int64_t>(regions.size()))]);
    p.clusters += k;
  }
  // The question is about at most kMaxTargetImages images (a partial shuffle).
  for (size_t i = 0; i < image_targets.size() && i < kMaxTargetImages; ++i) {
    std::swap(image_targets[i], image_targets[i + rng.Below(static_cast<int64_t>(image_targets.size() - i))]);
    if (image_targets[i] >= 0) p.targets.push_back(image_targets[i]);
  }
  std::sort(p.targets.begin(), p.targets.end());
  for (int64_t l = 0; l < o.layers; ++l) {
    const double s = Sharpness(l, o.layers, rng.Uniform(-kLayerJitter, kLayerJitter));
    p.gain.push_back(o.sharpness_min + (o.sharpness_max - o.sharpness_min) * s);
  }
  return p;
}

// ---- One layer, from its own stream.

struct KvHead {
  // [D] unit directions; sink, heavy and recency are orthonormal, the key
  // centres orthogonal to all three.
  std::vector<double> sink, heavy, recency, share;
  std::vector<double> centre;        // [clusters, D] unit key centres c_k
  std::vector<double> value_centre;  // [clusters, D] unit value centres mu_k
  // An orthonormal basis of the sink, heavy, recency and target directions.
  std::vector<std::vector<double>> exact;
  double gain = 1.0, m_sink = 1.0, m_heavy = 1.0, m_visual = 1.0, m_recency = 1.0;
};

struct QHead {
  std::vector<double> share;  // [D] unit
  bool visual = false;        // reads images
  int32_t secondary = -1;     // one more region it reads (never a target)
  double gain = 1.0;
};

// row += a * v
void Axpy(double a, const double* v, std::vector<double>& row) {
  for (size_t x = 0; x < row.size(); ++x) row[x] += a * v[x];
}

// One query row of query head `q` (of kv head `kv`); `cluster` is the visual
// region of the row's token, -1 for a text row.
void QueryRow(const Plan& p, const KvHead& kv, const QHead& q, double gamma, int32_t cluster, Rng& rng,
              std::vector<double>& row) {
  const int64_t d = static_cast<int64_t>(row.size());
  const double g = gamma * kv.gain * q.gain;
  const double own = std::sqrt(1.0 - kShareKv * kShareKv - kShareQ * kShareQ);
  // Scaled so that its dot product with a text key's noise has std g * kNoiseLogit.
  const double noise = g * kNoiseLogit * std::sqrt(static_cast<double>(d)) / kTextKeyNoise;
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  for (int64_t x = 0; x < d; ++x) {
    row[x] = noise * (kShareKv * kv.share[x] + kShareQ * q.share[x] + own * rng.Normal() * inv_sqrt_d);
  }
  // The noise has no component along the sink, heavy, recency and target
  // directions: those logits are as designed.
  for (const std::vector<double>& b : kv.exact) Axpy(-Dot(b, row.data()), b.data(), row);
  Axpy(g * kSinkLogit * kv.m_sink, kv.sink.data(), row);
  Axpy(g * kRecencyLogit * kv.m_recency / kRecencyKey, kv.recency.data(), row);
  if (cluster < 0) {
    Axpy(g * kHeavyLogit * kv.m_heavy, kv.heavy.data(), row);
    if (q.visual) {
      for (int32_t target : p.targets) Axpy(g * kTargetLogit * kv.m_visual, kv.centre.data() + target * d, row);
      if (q.secondary >= 0) Axpy(g * kSecondaryLogit * kv.m_visual, kv.centre.data() + q.secondary * d, row);
    }
  } else {
    Axpy(g * kSelfLogit * kv.m_visual, kv.centre.data() + cluster * d, row);
    Axpy(g * kVisualHeavyLogit * kv.m_heavy, kv.heavy.data(), row);
  }
}

void Store(DType dtype, const std::vector<double>& row, std::vector<float>& scratch, void* dst) {
  for (size_t x = 0; x < row.size(); ++x) scratch[x] = static_cast<float>(row[x]);
  RowFromFloat(dtype, scratch.data(), dst, static_cast<int64_t>(row.size()));
}

void MakeLayer(const SynthOptions& o, const Plan& p, int64_t held_out, int64_t l, SynthLayer* out) {
  Rng rng(StreamSeed(o.seed, 1 + 2 * static_cast<uint64_t>(l)));
  const int64_t d = o.head_dim, t = o.tokens, kvh = o.kv_heads, group = o.q_heads / o.kv_heads;
  const double gamma = p.gain[l], sqrt_d = std::sqrt(static_cast<double>(d)), inv_sqrt_d = 1.0 / sqrt_d;
  out->gain = gamma;

  std::vector<KvHead> kv(kvh);
  for (KvHead& h : kv) {
    h.sink = UnitVector(rng, d);
    h.heavy = UnitVector(rng, d);
    Orthogonalise(h.heavy, {&h.sink});
    h.recency = UnitVector(rng, d);
    Orthogonalise(h.recency, {&h.sink, &h.heavy});
    h.share = UnitVector(rng, d);
    for (int64_t k = 0; k < p.clusters; ++k) {
      std::vector<double> u = UnitVector(rng, d);
      Orthogonalise(u, {&h.sink, &h.heavy, &h.recency});
      const std::vector<double> v = UnitVector(rng, d);
      h.centre.insert(h.centre.end(), u.begin(), u.end());
      h.value_centre.insert(h.value_centre.end(), v.begin(), v.end());
    }
    h.exact = {h.sink, h.heavy, h.recency};
    for (int32_t target : p.targets) {
      std::vector<double> u(h.centre.begin() + target * d, h.centre.begin() + (target + 1) * d);
      std::vector<const std::vector<double>*> basis;
      for (const std::vector<double>& b : h.exact) basis.push_back(&b);
      Orthogonalise(u, basis);
      h.exact.push_back(std::move(u));
    }
    h.gain = rng.Uniform(kHeadGainLo, kHeadGainHi);
    h.m_sink = rng.Uniform(kRoleLo, kRoleHi);
    h.m_heavy = rng.Uniform(kRoleLo, kRoleHi);
    h.m_visual = rng.Uniform(kRoleLo, kRoleHi);
    h.m_recency = rng.Uniform(kRoleLo, kRoleHi);
  }
  // The first round(f * q_heads) query heads of a random order read images.
  std::vector<int64_t> order(o.q_heads);
  for (int64_t i = 0; i < o.q_heads; ++i) order[i] = i;
  for (int64_t i = o.q_heads - 1; i > 0; --i) std::swap(order[i], order[rng.Below(i + 1)]);
  const int64_t visual_heads = RoundHalfUp(o.visual_head_fraction * static_cast<double>(o.q_heads));
  std::vector<QHead> qh(o.q_heads);
  for (int64_t i = 0; i < o.q_heads; ++i) qh[order[i]].visual = i < visual_heads;
  for (QHead& q : qh) {
    q.share = UnitVector(rng, d);
    q.gain = rng.Uniform(kQueryGainLo, kQueryGainHi);
    // One more region, never a target (a draw is made either way).
    q.secondary = p.clusters > 0 ? static_cast<int32_t>(rng.Below(p.clusters)) : -1;
    if (std::binary_search(p.targets.begin(), p.targets.end(), q.secondary)) q.secondary = -1;
  }

  // Keys and values: [kv_heads, tokens, head_dim] in the requested dtype and layout.
  std::vector<double> krow(d), vrow(d);
  std::vector<float> scratch(d);
  const int64_t kv_bytes = kvh * t * d * DTypeSize(o.dtype);
  out->key.resize(kv_bytes);
  out->value.resize(kv_bytes);
  const MutableTensorView key{out->key.data(), o.dtype, o.layout, kvh, t, d};
  const MutableTensorView value{out->value.data(), o.dtype, o.layout, kvh, t, d};
  for (int64_t h = 0; h < kvh; ++h) {
    const KvHead& hp = kv[h];
    for (int64_t j = 0; j < t; ++j) {
      const auto role = static_cast<TokenRole>(p.role[j]);
      const bool sink = role == TokenRole::kSink || role == TokenRole::kVisualSink;
      const bool text = role == TokenRole::kText || role == TokenRole::kHeavy;
      const double noise = sink ? kSinkKeyNoise : text ? kTextKeyNoise : kVisualKeyNoise;
      for (double& x : krow) x = noise * rng.Normal() * inv_sqrt_d;
      if (text) {
        // A text key's random content has no sink, heavy or recency
        // component: only heavy hitters meet the heavy direction, and the
        // recency bonus is exactly the profile.
        const double on_sink = Dot(hp.sink, krow.data()), on_heavy = Dot(hp.heavy, krow.data()),
                     on_recency = Dot(hp.recency, krow.data());
        Axpy(-on_sink, hp.sink.data(), krow);
        Axpy(-on_heavy, hp.heavy.data(), krow);
        Axpy(-on_recency, hp.recency.data(), krow);
      }
      if (sink) {
        // Sinks carry no recency component: their pull does not fade.
        Axpy(1.0, hp.sink.data(), krow);
      } else {
        Axpy(kRecencyKey * p.recency[j], hp.recency.data(), krow);
        if (role == TokenRole::kHeavy) {
          Axpy(rng.Uniform(kHeavyWeightLo, kHeavyWeightHi), hp.heavy.data(), krow);
        } else if (role == TokenRole::kVisual) {
          Axpy(1.0, hp.centre.data() + p.cluster[j] * d, krow);
        }
      }
      for (double& x : krow) x *= sqrt_d;
      Store(o.dtype, krow, scratch, key.Row(h, j));

      if (sink) {
        for (double& x : vrow) x = kSinkValue * rng.Normal();
      } else if (role == TokenRole::kVisual) {
        const double* centre = hp.value_centre.data() + p.cluster[j] * d;
        for (int64_t x = 0; x < d; ++x) vrow[x] = sqrt_d * kValueCentre * centre[x] + kValueNoise * rng.Normal();
      } else {
        for (double& x : vrow) x = rng.Normal();
      }
      Store(o.dtype, vrow, scratch, value.Row(h, j));
    }
  }

  // Queries: [q_heads, q_tokens, head_dim] at the last q_tokens positions.
  std::vector<double> qrow(d);
  out->query.resize(o.q_heads * o.q_tokens * d * DTypeSize(o.dtype));
  const MutableTensorView query{out->query.data(), o.dtype, o.layout, o.q_heads, o.q_tokens, d};
  for (int64_t h = 0; h < o.q_heads; ++h) {
    for (int64_t i = 0; i < o.q_tokens; ++i) {
      const int64_t pos = t - o.q_tokens + i;
      QueryRow(p, kv[h / group], qh[h], gamma, p.cluster[pos], rng, qrow);
      Store(o.dtype, qrow, scratch, query.Row(h, i));
    }
  }
  // Held-out rows (text, after the prompt) from their own stream, so that
  // asking for them changes nothing else: [q_heads, held_out, head_dim].
  out->held_out_query.resize(o.q_heads * held_out * d * DTypeSize(o.dtype));
  Rng held_rng(StreamSeed(o.seed, 2 + 2 * static_cast<uint64_t>(l)));
  const MutableTensorView held{out->held_out_query.data(), o.dtype, o.layout, o.q_heads, held_out, d};
  for (int64_t h = 0; h < o.q_heads; ++h) {
    for (int64_t i = 0; i < held_out; ++i) {
      QueryRow(p, kv[h / group], qh[h], gamma, -1, held_rng, qrow);
      Store(o.dtype, qrow, scratch, held.Row(h, i));
    }
  }
}

absl::Status CheckFraction(const char* flag, double v) {
  if (!(v >= 0.0 && v <= 1.0)) return absl::InvalidArgumentError(absl::StrCat(flag, " must be in [0, 1], got ", v));
  return absl::OkStatus();
}

safetensors::ElementType ElementTypeOf(DType d) {
  return d == DType::kFloat16    ? safetensors::ElementType::kF16
         : d == DType::kBFloat16 ? safetensors::ElementType::kBF16
                                 : safetensors::ElementType::kF32;
}

}  // namespace

absl::Status ValidateSynthOptions(const SynthOptions& o) {
  constexpr int64_t kMaxDim = int64_t{1} << 24;  // as ValidateCacheInput
  const std::pair<const char*, int64_t> dims[] = {{"--layers", o.layers},     {"--kv-heads", o.kv_heads},
                                                  {"--q-heads", o.q_heads},   {"--tokens", o.tokens},
                                                  {"--head-dim", o.head_dim}, {"--q-tokens", o.q_tokens}};
  for (const auto& [name, v] : dims) {
    if (v <= 0 || v > kMaxDim) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be in [1, ", kMaxDim, "], got ", v));
    }
  }
  if (o.q_heads % o.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--q-heads (", o.q_heads, ") must be a multiple of --kv-heads (", o.kv_heads, ")"));
  }
  if (o.q_tokens > o.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("--q-tokens (", o.q_tokens, ") exceeds --tokens (", o.tokens, ")"));
  }
  if (o.dtype != DType::kFloat16 && o.dtype != DType::kBFloat16 && o.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError("--dtype must be float16, bfloat16 or float32");
  }
  if (o.layout != Layout::kHND && o.layout != Layout::kNHD) {
    return absl::InvalidArgumentError("--layout must be hnd or nhd");
  }
  if (o.sinks < 0) return absl::InvalidArgumentError(absl::StrCat("--sinks must be >= 0, got ", o.sinks));
  MEDAKV_RETURN_IF_ERROR(CheckFraction("--heavy-fraction", o.heavy_fraction));
  MEDAKV_RETURN_IF_ERROR(CheckFraction("--visual-sink-fraction", o.visual_sink_fraction));
  MEDAKV_RETURN_IF_ERROR(CheckFraction("--visual-head-fraction", o.visual_head_fraction));
  if (o.image_clusters < 1 || o.image_clusters > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("--image-clusters must be in [1, ", kMaxDim, "], got ", o.image_clusters));
  }
  constexpr double kMaxSharpness = 10.0;  // keeps logits, keys and queries well inside fp16
  if (!(o.sharpness_min >= 0.0 && o.sharpness_min <= kMaxSharpness)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--sharpness-min must be in [0, ", kMaxSharpness, "], got ", o.sharpness_min));
  }
  if (!(o.sharpness_max >= o.sharpness_min && o.sharpness_max <= kMaxSharpness)) {
    return absl::InvalidArgumentError(absl::StrCat("--sharpness-max must be in [--sharpness-min (", o.sharpness_min,
                                                   "), ", kMaxSharpness, "], got ", o.sharpness_max));
  }
  if (o.held_out < 0 || o.held_out > INT32_MAX - o.tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("--held-out must be in [0, ", INT32_MAX - o.tokens, "] (positions are int32), got ", o.held_out));
  }
  if (o.text_only && !o.visual.empty()) return absl::InvalidArgumentError("--text-only conflicts with --visual");
  for (size_t i = 0; i < o.visual.size(); ++i) {
    const ModalitySpan& s = o.visual[i];
    if (s.start < 0 || s.length <= 0 || s.start >= o.tokens || s.length > o.tokens - s.start) {
      return absl::InvalidArgumentError(absl::StrCat("--visual ", s.start, ":", s.length, " (span ", i,
                                                     "): expected LENGTH > 0 inside [0, ", o.tokens, ") (--tokens)"));
    }
    if (s.modality != Modality::kVisual) {
      return absl::InvalidArgumentError(absl::StrCat("--visual span ", i, ": modality must be visual"));
    }
  }
  const std::vector<ModalitySpan> spans = SortedSpans(o);
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].start < spans[i - 1].start + spans[i - 1].length) {
      return absl::InvalidArgumentError(absl::StrCat("--visual ", spans[i - 1].start, ":", spans[i - 1].length, " and ",
                                                     spans[i].start, ":", spans[i].length, " overlap"));
    }
  }
  // Memory: refuse sizes whose byte counts would not fit (1 TiB and up).
  const double bytes = static_cast<double>(o.layers) * static_cast<double>(DTypeSize(o.dtype)) *
                       static_cast<double>(o.head_dim) *
                       (2.0 * static_cast<double>(o.kv_heads) * static_cast<double>(o.tokens) +
                        static_cast<double>(o.q_heads) * static_cast<double>(o.q_tokens + o.held_out));
  if (bytes >= 0x1.0p40) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers x --kv-heads x --tokens x --head-dim: the cache would need ", bytes / 0x1.0p30, " GiB"));
  }
  return absl::OkStatus();
}

TensorView SynthCache::Query(int64_t layer) const {
  const int64_t q_tokens = static_cast<int64_t>(query_positions.size());
  return TensorView{layers[layer].query.data(), input.dtype, input.layout, input.q_heads, q_tokens, input.head_dim};
}

TensorView SynthCache::HeldOutQuery(int64_t layer) const {
  const int64_t held = static_cast<int64_t>(held_out_positions.size());
  return TensorView{
      layers[layer].held_out_query.data(), input.dtype, input.layout, input.q_heads, held, input.head_dim};
}

absl::StatusOr<SynthCache> MakeSynthCache(const SynthOptions& o) {
  MEDAKV_RETURN_IF_ERROR(ValidateSynthOptions(o));
  const std::vector<ModalitySpan> spans = SortedSpans(o);
  MEDAKV_ASSIGN_OR_RETURN(std::vector<uint8_t> modality, ModalityFromSpans(o.tokens, spans));
  Plan plan = MakePlan(o, spans, std::move(modality));

  SynthCache cache;
  for (int64_t i = 0; i < o.q_tokens; ++i) {
    cache.query_positions.push_back(static_cast<int32_t>(o.tokens - o.q_tokens + i));
  }
  for (int64_t i = 0; i < o.held_out; ++i) cache.held_out_positions.push_back(static_cast<int32_t>(o.tokens + i));
  cache.layers.resize(o.layers);
  cpu::ParallelFor(o.layers, [&](int64_t l) { MakeLayer(o, plan, o.held_out, l, &cache.layers[l]); });

  CacheInput& in = cache.input;
  in.kv_heads = o.kv_heads;
  in.q_heads = o.q_heads;
  in.head_dim = o.head_dim;
  in.tokens = o.tokens;
  in.dtype = o.dtype;
  in.layout = o.layout;
  in.modality = plan.modality;
  in.stats = o.precomputed ? StatsForm::kPrecomputed : StatsForm::kQueries;
  for (int64_t l = 0; l < o.layers; ++l) {
    SynthLayer& layer = cache.layers[l];
    LayerInput li;
    li.key = TensorView{layer.key.data(), o.dtype, o.layout, o.kv_heads, o.tokens, o.head_dim};
    li.value = TensorView{layer.value.data(), o.dtype, o.layout, o.kv_heads, o.tokens, o.head_dim};
    if (o.precomputed) {
      AttentionStatsArgs args;
      args.query = cache.Query(l);
      args.key = li.key;
      args.query_positions = cache.query_positions.data();
      args.modality = plan.modality.data();
      args.scale = 1.f / std::sqrt(static_cast<float>(o.head_dim));
      layer.scores.resize(o.kv_heads * o.tokens);
      AttentionStatsOutput out;
      out.scores = layer.scores.data();
      MEDAKV_RETURN_IF_ERROR(cpu::AttentionStats(args, &out));
      layer.entropy = out.entropy;
      li.scores = layer.scores.data();
      li.score_heads = o.kv_heads;
      li.entropy = layer.entropy;
    } else {
      li.query = cache.Query(l);
      li.query_positions = cache.query_positions;
    }
    in.layers.push_back(std::move(li));
  }
  cache.role = std::move(plan.role);
  cache.image = std::move(plan.image);
  cache.cluster = std::move(plan.cluster);
  cache.target_clusters = std::move(plan.targets);
  return cache;
}

absl::Status WriteSynthCache(const SynthOptions& o, const std::string& path) {
  MEDAKV_ASSIGN_OR_RETURN(const SynthCache cache, MakeSynthCache(o));
  safetensors::Writer w;
  const auto type = ElementTypeOf(o.dtype);
  auto shape3 = [&](int64_t heads, int64_t tokens) {
    return o.layout == Layout::kHND ? std::vector<int64_t>{heads, tokens, o.head_dim}
                                    : std::vector<int64_t>{tokens, heads, o.head_dim};
  };
  auto bytes = [](const auto& v) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(v[0]));
  };
  for (int64_t l = 0; l < o.layers; ++l) {
    const SynthLayer& layer = cache.layers[l];
    const std::string p = absl::StrCat("layer.", l, ".");
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "key", type, shape3(o.kv_heads, o.tokens), layer.key));
    MEDAKV_RETURN_IF_ERROR(w.Add(p + "value", type, shape3(o.kv_heads, o.tokens), layer.value));
    if (o.precomputed) {
      MEDAKV_RETURN_IF_ERROR(
          w.Add(p + "scores", safetensors::ElementType::kF32, {o.kv_heads, o.tokens}, bytes(layer.scores)));
      MEDAKV_RETURN_IF_ERROR(w.Add(p + "entropy", safetensors::ElementType::kF32, {1},
                                   absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(&layer.entropy), 4)));
    } else {
      MEDAKV_RETURN_IF_ERROR(w.Add(p + "query", type, shape3(o.q_heads, o.q_tokens), layer.query));
      MEDAKV_RETURN_IF_ERROR(
          w.Add(p + "query_positions", safetensors::ElementType::kI32, {o.q_tokens}, bytes(cache.query_positions)));
    }
  }
  MEDAKV_RETURN_IF_ERROR(w.Add("modality", safetensors::ElementType::kU8, {o.tokens}, cache.input.modality));
  w.SetMetadata("format", "medakv.cache.v1");
  w.SetMetadata("layout", LayoutName(o.layout));
  w.SetMetadata("generator", absl::StrCat("medakv synth v2 seed=", o.seed));
  return w.WriteFile(path);
}

}  // namespace medakv
