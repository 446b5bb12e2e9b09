// AllocateEntropyBudgets (docs/algorithm.md, MEDA step 2) against hand-computed
// budgets, the naive reference, and the properties of the exact-total rule.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gtest/gtest.h"
#include "kernels/cpu/budget.h"
#include "tests/kernels/test_util.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

BudgetOptions Options(double rho, double tau = 1.0, bool exact = true, double alpha_min = 0.01,
                      double alpha_max = 1.0) {
  BudgetOptions o;
  o.rho = rho;
  o.tau = tau;
  o.alpha_min = alpha_min;
  o.alpha_max = alpha_max;
  o.exact_total = exact;
  return o;
}

LayerBudgets Allocate(const std::vector<float>& entropy, int64_t tokens, const BudgetOptions& o) {
  absl::StatusOr<LayerBudgets> r = AllocateEntropyBudgets(entropy, tokens, o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : LayerBudgets{};
}

int64_t Sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

// ---- hand cases ------------------------------------------------------------------

TEST(BudgetHandTest, EqualEntropiesGiveEqualBudgets) {
  for (bool exact : {true, false}) {
    // rho * T = 20 tokens per layer.
    const LayerBudgets b = Allocate({1.5f, 1.5f, 1.5f, 1.5f}, 100, Options(0.2, 1.0, exact));
    EXPECT_EQ(b.budget, (std::vector<int64_t>{20, 20, 20, 20})) << "exact " << exact;
    for (double a : b.alpha) EXPECT_NEAR(a, 0.2, 1e-12);
  }
  // Odd sizes: the total is round(0.25 * 8 * 769) = 1538 = 8 * 192 + 2; the
  // equal fractional parts give the 2 extra tokens to the lowest layers.
  const LayerBudgets b = Allocate(std::vector<float>(8, 0.3f), 769, Options(0.25));
  EXPECT_EQ(b.budget, (std::vector<int64_t>{193, 193, 192, 192, 192, 192, 192, 192}));
  // 0.5 * 7 = 3.5 per layer, 7 in all for 2 layers: ties of the fractional
  // part go to the lower layer.
  const LayerBudgets odd = Allocate({2.f, 2.f}, 7, Options(0.5));
  EXPECT_EQ(odd.budget, (std::vector<int64_t>{4, 3}));
}

TEST(BudgetHandTest, KnownEntropiesGiveKnownSoftmaxAlphas) {
  // E = (0, ln 2, ln 3): w = (1, 2, 3) / 6; alpha = w * 3 * 0.2 = (0.1, 0.2, 0.3).
  const std::vector<float> e = {0.f, static_cast<float>(std::log(2.0)), static_cast<float>(std::log(3.0))};
  const LayerBudgets exact = Allocate(e, 1000, Options(0.2));
  EXPECT_NEAR(exact.alpha[0], 0.1, 1e-7);
  EXPECT_NEAR(exact.alpha[1], 0.2, 1e-7);
  EXPECT_NEAR(exact.alpha[2], 0.3, 1e-7);
  EXPECT_EQ(exact.budget, (std::vector<int64_t>{100, 200, 300}));
  // Off: floor(alpha * T) per layer.
  const LayerBudgets plain = Allocate(e, 1000, Options(0.2, 1.0, false));
  for (size_t l = 0; l < e.size(); ++l) {
    EXPECT_EQ(plain.budget[l], static_cast<int64_t>(std::floor(plain.alpha[l] * 1000.0)));
    EXPECT_NEAR(static_cast<double>(plain.budget[l]), 100.0 * (l + 1), 1.0);
  }
  // tau divides the entropies: E = (0, 2 ln 2) at tau = 2 gives w = (1/3, 2/3).
  const LayerBudgets t2 = Allocate({0.f, static_cast<float>(2 * std::log(2.0))}, 300, Options(0.5, 2.0));
  EXPECT_NEAR(t2.alpha[0], 1.0 / 3, 1e-7);
  EXPECT_NEAR(t2.alpha[1], 2.0 / 3, 1e-7);
  EXPECT_EQ(t2.budget, (std::vector<int64_t>{100, 200}));
  // Higher entropy, larger budget (softmax of +E, as the formula says).
  const LayerBudgets order = Allocate({0.5f, 2.0f, 1.0f}, 500, Options(0.3));
  EXPECT_GT(order.budget[1], order.budget[2]);
  EXPECT_GT(order.budget[2], order.budget[0]);
}

TEST(BudgetHandTest, ClampAtAlphaMaxPushesTheRestToOthers) {
  // w ~ (0.987, 0.0066, 0.0066); alpha_max = 0.5 caps layer 0 at 50 tokens,
  // the other 70 of round(0.4 * 3 * 100) = 120 are shared equally.
  const std::vector<float> e = {5.f, 0.f, 0.f};
  const LayerBudgets exact = Allocate(e, 100, Options(0.4, 1.0, true, 0.01, 0.5));
  EXPECT_EQ(exact.budget, (std::vector<int64_t>{50, 35, 35}));
  EXPECT_DOUBLE_EQ(exact.alpha[0], 0.5);
  // Without exact_total the clamps are final: 0.5 T and alpha_min T = 1 token.
  const LayerBudgets plain = Allocate(e, 100, Options(0.4, 1.0, false, 0.01, 0.5));
  EXPECT_EQ(plain.budget, (std::vector<int64_t>{50, 1, 1}));
  EXPECT_DOUBLE_EQ(plain.alpha[1], 0.01);
  // alpha_min lifts a starved layer to ceil(alpha_min T) and the others pay.
  const LayerBudgets lifted = Allocate({10.f, 0.f}, 100, Options(0.5, 1.0, true, 0.2, 1.0));
  EXPECT_EQ(lifted.budget, (std::vector<int64_t>{80, 20}));
}

TEST(BudgetHandTest, RhoOneKeepsEverything) {
  // With exact_total the total is L * T, so every layer is full.
  const LayerBudgets b = Allocate({0.1f, 3.f, 7.f, 0.f, 1.f}, 769, Options(1.0));
  EXPECT_EQ(b.budget, std::vector<int64_t>(5, 769));
  // Without it, only the layers whose alpha reaches 1 are full (alpha_max = 1).
  const LayerBudgets plain = Allocate({0.1f, 3.f, 7.f, 0.f, 1.f}, 769, Options(1.0, 1.0, false));
  EXPECT_EQ(plain.budget[2], 769);
  EXPECT_LT(plain.budget[0], 769);
  // Equal entropies: alpha = rho = 1 everywhere.
  const LayerBudgets equal = Allocate({2.f, 2.f, 2.f}, 769, Options(1.0, 1.0, false));
  EXPECT_EQ(equal.budget, std::vector<int64_t>(3, 769));
}

TEST(BudgetHandTest, NoLayerGetsZeroTokens) {
  // A near-zero share still gets one token, with exact_total and without.
  for (bool exact : {true, false}) {
    const LayerBudgets b = Allocate({0.f, 30.f}, 7, Options(0.1, 1.0, exact, 0.0, 1.0));
    EXPECT_GE(b.budget[0], 1) << "exact " << exact;
    EXPECT_GE(b.budget[1], 1);
  }
  EXPECT_EQ(TargetTotal(0.5, 3, 7), 11);  // 10.5 rounds half up
  EXPECT_EQ(TargetTotal(0.2, 4, 100), 80);
}

// ---- property sweep against the reference ------------------------------------------

struct BudgetCase {
  int64_t layers;
  int64_t tokens;
  double rho;
  double tau;
};

std::string BudgetName(const BudgetCase& c) {
  return absl::StrReplaceAll(absl::StrCat("L", c.layers, "_T", c.tokens, "_Rho", c.rho, "_Tau", c.tau),
                             {{".", "p"}});
}

std::vector<BudgetCase> BudgetCases() {
  std::vector<BudgetCase> out;
  for (int64_t layers : {1, 2, 7, 32}) {
    for (int64_t tokens : {1, 7, 769, 4096}) {
      for (double rho : {0.01, 0.1, 0.2, 0.5, 1.0}) {
        for (double tau : {0.1, 1.0, 10.0}) out.push_back({layers, tokens, rho, tau});
      }
    }
  }
  return out;
}

class BudgetSweepTest : public ::testing::TestWithParam<BudgetCase> {};

TEST_P(BudgetSweepTest, ExactTotalPropertiesAndReference) {
  const BudgetCase& c = GetParam();
  const double alpha_min = 0.01, alpha_max = 1.0;
  const int64_t lo = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(alpha_min * c.tokens)));
  const int64_t hi = std::min<int64_t>(c.tokens, static_cast<int64_t>(std::floor(alpha_max * c.tokens)));
  const int64_t target = std::clamp<int64_t>(
      reference::RoundHalfUp(c.rho * c.layers * c.tokens), c.layers * lo, c.layers * hi);
  for (uint64_t seed = 0; seed < 4; ++seed) {
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    test::Rng rng(seed * 7919 + c.layers * 31 + c.tokens);
    std::vector<float> entropy(c.layers);
    for (float& e : entropy) e = static_cast<float>(rng.Uniform(0.0, 8.0));
    if (seed == 3 && c.layers > 2) entropy[1] = entropy[2];  // a tie

    const LayerBudgets got = Allocate(entropy, c.tokens, Options(c.rho, c.tau, true, alpha_min, alpha_max));
    ASSERT_EQ(got.budget.size(), static_cast<size_t>(c.layers));
    EXPECT_EQ(Sum(got.budget), target);
    EXPECT_EQ(TargetTotal(c.rho, c.layers, c.tokens), reference::RoundHalfUp(c.rho * c.layers * c.tokens));
    for (int64_t b : got.budget) {
      EXPECT_GE(b, lo);
      EXPECT_LE(b, hi);
    }
    // Higher entropy never gets fewer tokens.
    for (int64_t a = 0; a < c.layers; ++a) {
      for (int64_t b = 0; b < c.layers; ++b) {
        if (entropy[a] > entropy[b]) {
          EXPECT_GE(got.budget[a], got.budget[b]) << a << " vs " << b;
        }
      }
    }
    if (c.rho == 1.0) {
      EXPECT_EQ(got.budget, std::vector<int64_t>(c.layers, c.tokens));
    }

    const std::vector<double> e64(entropy.begin(), entropy.end());
    const reference::RefBudgetResult ref =
        reference::RefBudgets(e64, c.tokens, c.rho, c.tau, alpha_min, alpha_max, true);
    EXPECT_EQ(got.budget, ref.budget);
    EXPECT_TRUE(test::AllNear(got.alpha, ref.alpha, 1e-12, 1e-15));

    // exact_total off: clamp and floor, never below 1.
    const LayerBudgets plain = Allocate(entropy, c.tokens, Options(c.rho, c.tau, false, alpha_min, alpha_max));
    const reference::RefBudgetResult ref_plain =
        reference::RefBudgets(e64, c.tokens, c.rho, c.tau, alpha_min, alpha_max, false);
    EXPECT_EQ(plain.budget, ref_plain.budget);
    EXPECT_TRUE(test::AllNear(plain.alpha, ref_plain.alpha, 1e-12, 1e-15));
    for (int64_t b : plain.budget) {
      EXPECT_GE(b, 1);
      EXPECT_LE(b, c.tokens);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, BudgetSweepTest, ::testing::ValuesIn(BudgetCases()),
                         [](const ::testing::TestParamInfo<BudgetCase>& info) {
                           return BudgetName(info.param);
                         });

// Other clamps, against the reference.
TEST(BudgetReferenceTest, NonDefaultClamps) {
  const std::vector<std::pair<double, double>> clamps = {{0.0, 1.0}, {0.05, 0.3}, {0.1, 0.1}, {0.02, 0.6}};
  for (const auto& [amin, amax] : clamps) {
    for (int64_t tokens : {7, 769, 4096}) {
      for (int64_t layers : {2, 7, 32}) {
        SCOPED_TRACE(absl::StrCat("clamp [", amin, ", ", amax, "] T ", tokens, " L ", layers));
        test::Rng rng(static_cast<uint64_t>(tokens * 100 + layers));
        std::vector<float> entropy(layers);
        for (float& e : entropy) e = static_cast<float>(rng.Uniform(0.0, 6.0));
        const std::vector<double> e64(entropy.begin(), entropy.end());
        for (bool exact : {true, false}) {
          const LayerBudgets got = Allocate(entropy, tokens, Options(0.2, 1.0, exact, amin, amax));
          const reference::RefBudgetResult ref =
              reference::RefBudgets(e64, tokens, 0.2, 1.0, amin, amax, exact);
          EXPECT_EQ(got.budget, ref.budget) << "exact " << exact;
        }
      }
    }
  }
}

// ---- invalid options ---------------------------------------------------------------

TEST(BudgetInvalidTest, RejectsBadOptionsAndInputs) {
  const std::vector<float> e = {1.f, 2.f};
  auto code = [&](const BudgetOptions& o, const std::vector<float>& entropy = {1.f, 2.f},
                  int64_t tokens = 10) {
    return AllocateEntropyBudgets(entropy, tokens, o).status().code();
  };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(code(Options(0.2)), absl::StatusCode::kOk);
  for (double rho : {0.0, -0.1, 1.0000001, 2.0, nan}) EXPECT_EQ(code(Options(rho)), kInvalid) << rho;
  for (double tau : {0.0, -1.0, nan}) EXPECT_EQ(code(Options(0.2, tau)), kInvalid) << tau;
  EXPECT_EQ(code(Options(0.2, 1.0, true, 0.5, 0.4)), kInvalid);   // alpha_min > alpha_max
  EXPECT_EQ(code(Options(0.2, 1.0, false, 0.5, 0.4)), kInvalid);
  EXPECT_EQ(code(Options(0.2), {1.f, std::numeric_limits<float>::quiet_NaN()}), kInvalid);
  EXPECT_EQ(code(Options(0.2), {std::numeric_limits<float>::infinity(), 1.f}), kInvalid);
  EXPECT_EQ(code(Options(0.2), e, 0), kInvalid);
  EXPECT_EQ(code(Options(0.2), e, -5), kInvalid);
  EXPECT_EQ(code(Options(0.2), {}), kInvalid);  // zero layers
}

// ---- AllocateMassBudgets (amber's layer_budget mass, docs/amber.md) ----------------

absl::StatusOr<LayerBudgets> Mass(const std::vector<std::vector<float>>& scores, int64_t kv_heads, int64_t tokens,
                                  double rho, double alpha_min = 0.01, double alpha_max = 1.0) {
  return AllocateMassBudgets(scores, kv_heads, tokens, Options(rho, 1.0, true, alpha_min, alpha_max));
}

TEST(MassBudgetHandTest, ConcentratedLayersGiveTokensToSpreadOnes) {
  // Layer 0: all mass on one token per head; layer 1: spread evenly over 10.
  // rho 0.3 of 2 x 10: 6 tokens; lo = 1 each; layer 0's 2nd token gains 0, so
  // the 4 left go to layer 1 (gain 0.1 each).
  std::vector<float> peaked(2 * 10, 0.f), flat(2 * 10, 1.f);
  peaked[3] = 5.f;
  peaked[10 + 7] = 2.f;
  absl::StatusOr<LayerBudgets> b = Mass({peaked, flat}, 2, 10, 0.3, 0.0);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->budget, (std::vector<int64_t>{1, 5}));
  EXPECT_NEAR(b->alpha[1], 0.5, 1e-12);
  // Equal layers: ties go to the lower layer first (round(0.25 * 3 * 10) = 8 = 3 + 3 + 2).
  b = Mass({flat, flat, flat}, 2, 10, 0.25, 0.0);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->budget, (std::vector<int64_t>{3, 3, 2}));
  // A head whose scores are all 0 adds no gain; alpha_min's floor still holds.
  std::vector<float> zero(2 * 10, 0.f);
  b = Mass({zero, flat}, 2, 10, 0.5, 0.2);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->budget, (std::vector<int64_t>{2, 8}));
  // rho 1 keeps everything; alpha_max caps a layer.
  b = Mass({peaked, flat}, 2, 10, 1.0);
  EXPECT_EQ(b->budget, (std::vector<int64_t>{10, 10}));
  b = Mass({peaked, flat}, 2, 10, 0.5, 0.0, 0.6);
  EXPECT_EQ(b->budget, (std::vector<int64_t>{4, 6}));
}

// Ties across layers: equal gains go by token rank, then by layer, exactly as
// the reference's sort (identical layers, a part of a column left over; few
// distinct values spread over many ranks; all-zero layers).
TEST(MassBudgetSweepTest, TiesGoByRankThenLayer) {
  test::Rng rng(5);
  for (int64_t layers : {2, 5, 9}) {
    for (int64_t tokens : {10, 33}) {
      for (double rho : {0.13, 0.31, 0.5, 0.77}) {
        for (int pattern = 0; pattern < 3; ++pattern) {
          std::vector<std::vector<float>> scores(layers);
          std::vector<std::vector<double>> ref(layers);
          for (int64_t l = 0; l < layers; ++l) {
            for (int64_t i = 0; i < 2 * tokens; ++i) {
              float v = 1.f;                                                       // identical flat layers
              if (pattern == 1) v = static_cast<float>(static_cast<int>(rng.Uniform() * 3));  // values 0, 1, 2
              if (pattern == 2) v = l % 2 == 0 ? 0.f : static_cast<float>(i % 4);  // zero layers among others
              scores[l].push_back(v);
              ref[l].push_back(v);
            }
          }
          absl::StatusOr<LayerBudgets> b = Mass(scores, 2, tokens, rho, 0.0);
          ASSERT_TRUE(b.ok()) << b.status();
          EXPECT_EQ(b->budget, reference::RefMassBudgets(ref, 2, tokens, rho, 0.0, 1.0))
              << "L" << layers << " T" << tokens << " rho " << rho << " pattern " << pattern;
        }
      }
    }
  }
}

TEST(MassBudgetSweepTest, MatchesTheGreedyReferenceAndKeepsTheTotal) {
  test::Rng rng(77);
  int cases = 0;
  for (int64_t layers : {1, 3, 8}) {
    for (int64_t kv_heads : {1, 3}) {
      for (int64_t tokens : {1, 7, 97}) {
        for (double rho : {0.05, 0.2, 0.5, 1.0}) {
          for (auto [amin, amax] : {std::pair{0.01, 1.0}, std::pair{0.1, 0.5}, std::pair{0.0, 1.0}}) {
            std::vector<std::vector<float>> scores(layers);
            std::vector<std::vector<double>> ref(layers);
            for (int64_t l = 0; l < layers; ++l) {
              // Sharper layers further down; some ties (quantised values) and zero heads.
              for (int64_t i = 0; i < kv_heads * tokens; ++i) {
                const double u = rng.Uniform();
                float v = static_cast<float>(std::pow(u, 1.0 + 3.0 * l) * 8.0);
                if ((l + i) % 5 == 0) v = std::round(v);
                if (l == 1 && i < tokens) v = 0.f;  // layer 1's first head: no mass
                scores[l].push_back(v);
                ref[l].push_back(v);
              }
            }
            absl::StatusOr<LayerBudgets> b = Mass(scores, kv_heads, tokens, rho, amin, amax);
            ASSERT_TRUE(b.ok()) << b.status();
            const std::vector<int64_t> want = reference::RefMassBudgets(ref, kv_heads, tokens, rho, amin, amax);
            const std::string at = absl::StrCat("L", layers, " H", kv_heads, " T", tokens, " rho ", rho, " clamps ",
                                                amin, "-", amax);
            EXPECT_EQ(b->budget, want) << at;
            const int64_t lo = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(amin * tokens)), 1, tokens);
            const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(tokens, std::floor(amax * tokens)));
            EXPECT_EQ(Sum(b->budget),
                      std::clamp<int64_t>(reference::RoundHalfUp(rho * layers * tokens), layers * lo, layers * hi))
                << at;
            for (int64_t l = 0; l < layers; ++l) {
              EXPECT_GE(b->budget[l], lo) << at;
              EXPECT_LE(b->budget[l], hi) << at;
              EXPECT_DOUBLE_EQ(b->alpha[l], static_cast<double>(b->budget[l]) / tokens) << at;
            }
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 3 * 2 * 3 * 4 * 3);
}

TEST(MassBudgetInvalidTest, RejectsBadInputs) {
  const std::vector<float> ok(2 * 5, 1.f);
  EXPECT_EQ(Mass({}, 2, 5, 0.2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Mass({ok}, 2, 0, 0.2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Mass({ok}, 0, 5, 0.2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Mass({ok}, 2, 5, 1.5).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<LayerBudgets> b = Mass({ok, std::vector<float>(9, 1.f)}, 2, 5, 0.2);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(b.status().message()).find("layer 1 has 9 scores"), std::string::npos) << b.status();
  std::vector<float> bad = ok;
  bad[7] = -1.f;
  b = Mass({ok, bad}, 2, 5, 0.2);
  EXPECT_NE(std::string(b.status().message()).find("layer 1 head 1 token 2"), std::string::npos) << b.status();
  bad[7] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(Mass({bad}, 2, 5, 0.2).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- amber's depth budgets ----------------------------------------------------------

TEST(GlobalHeadBudgetTest, MatchesTheReferenceWithTiesAndZeros) {
  // Scores drawn from a few values (many ties, zeros and -0 among them), sizes odd and even.
  const float values[] = {0.f, -0.f, 0.125f, 0.5f, 0.5f, 1.f, 3e-39f /* subnormal */, 7.f};
  uint64_t state = 9;
  for (int64_t layers : {1, 3, 7}) {
    for (int64_t kv_heads : {1, 2, 5}) {
      for (int64_t tokens : {1, 2, 9, 130}) {
        for (double rho : {0.01, 0.1, 0.37, 0.5, 1.0}) {
          for (int64_t forced : {int64_t{1}, std::min<int64_t>(3, tokens), tokens}) {
            std::vector<std::vector<float>> s(layers, std::vector<float>(kv_heads * tokens));
            std::vector<std::vector<double>> d(layers, std::vector<double>(kv_heads * tokens));
            for (int64_t l = 0; l < layers; ++l) {
              for (int64_t i = 0; i < kv_heads * tokens; ++i) {
                state = state * 6364136223846793005ULL + 1442695040888963407ULL;
                s[l][i] = values[(state >> 33) % 8];
                d[l][i] = s[l][i];
              }
            }
            const std::string what = absl::StrCat("L", layers, " H", kv_heads, " T", tokens, " rho ", rho,
                                                  " forced ", forced);
            absl::StatusOr<std::vector<int64_t>> got = GlobalHeadBudgets(s, kv_heads, tokens, rho, forced);
            ASSERT_TRUE(got.ok()) << what << ": " << got.status();
            EXPECT_EQ(*got, reference::RefGlobalHeadBudgets(d, kv_heads, tokens, rho, forced)) << what;
            for (int64_t n : *got) EXPECT_TRUE(n >= forced && n <= tokens) << what;
          }
        }
      }
    }
  }
}

TEST(GlobalHeadBudgetTest, RejectsBadInputs) {
  const std::vector<std::vector<float>> ok(2, std::vector<float>(6, 0.5f));
  EXPECT_TRUE(GlobalHeadBudgets(ok, 2, 3, 0.5, 1).ok());
  EXPECT_FALSE(GlobalHeadBudgets({}, 2, 3, 0.5, 1).ok());
  EXPECT_FALSE(GlobalHeadBudgets(ok, 3, 3, 0.5, 1).ok());  // 6 scores, 9 expected
  EXPECT_FALSE(GlobalHeadBudgets(ok, 2, 3, 0.5, 0).ok());
  EXPECT_FALSE(GlobalHeadBudgets(ok, 2, 3, 0.5, 4).ok());
  EXPECT_FALSE(GlobalHeadBudgets(ok, 2, 3, 0.0, 1).ok());
  EXPECT_FALSE(GlobalHeadBudgets(ok, 2, 3, 1.5, 1).ok());
  std::vector<std::vector<float>> bad = ok;
  bad[1][4] = -1.f;
  EXPECT_FALSE(GlobalHeadBudgets(bad, 2, 3, 0.5, 1).ok());
  bad[1][4] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(GlobalHeadBudgets(bad, 2, 3, 0.5, 1).ok());
}

TEST(DepthBudgetTest, MatchesTheReferenceAndKeepsTheTotal) {
  for (int64_t layers : {1, 2, 3, 7, 30, 64}) {
    for (int64_t tokens : {1, 2, 5, 97, 1000}) {
      for (double rho : {0.01, 0.05, 0.2, 0.5, 0.9, 1.0}) {
        for (double ratio : {0.01, 0.3, 0.8, 1.0, 1.25, 4.0, 100.0}) {
          const std::string what = absl::StrCat("L=", layers, " T=", tokens, " rho=", rho, " r=", ratio);
          absl::StatusOr<std::vector<int64_t>> b = DepthBudgets(layers, tokens, rho, ratio);
          ASSERT_TRUE(b.ok()) << what << ": " << b.status();
          EXPECT_EQ(*b, reference::RefDepthBudgets(layers, tokens, rho, ratio)) << what;
          const int64_t c = UniformBudget(rho, tokens);
          EXPECT_EQ(std::accumulate(b->begin(), b->end(), int64_t{0}), layers * c) << what;
          for (int64_t l = 0; l < layers; ++l) {
            EXPECT_GE((*b)[l], 1) << what;
            EXPECT_LE((*b)[l], tokens) << what;
            // Monotone in depth: up for r < 1, down for r > 1, flat for r = 1.
            if (l > 0 && ratio < 1.0) {
              EXPECT_GE((*b)[l], (*b)[l - 1]) << what << " layer " << l;
            }
            if (l > 0 && ratio > 1.0) {
              EXPECT_LE((*b)[l], (*b)[l - 1]) << what << " layer " << l;
            }
            if (ratio == 1.0) {
              EXPECT_EQ((*b)[l], c) << what;
            }
          }
        }
      }
    }
  }
}

TEST(DepthBudgetTest, KnownSplit) {
  // r = 0.5 over 3 layers: weights 0.5, 1.25, 2 (sum 3.75); C = 20, total 60:
  // shares 8, 20, 32.
  absl::StatusOr<std::vector<int64_t>> b = DepthBudgets(3, 100, 0.2, 0.5);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, (std::vector<int64_t>{8, 20, 32}));
  // A share above T is clipped and its excess goes to the other layers.
  b = DepthBudgets(2, 10, 0.9, 0.25);  // C = 9, shares 18 * 0.25 / 4.25 = 1.06 and 16.9 -> 10
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, (std::vector<int64_t>{8, 10}));
}

TEST(DepthBudgetTest, RejectsBadInputs) {
  EXPECT_EQ(DepthBudgets(0, 10, 0.2, 0.8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DepthBudgets(3, 0, 0.2, 0.8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DepthBudgets(3, 10, 0.0, 0.8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DepthBudgets(3, 10, 1.5, 0.8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DepthBudgets(3, 10, 0.2, 0.0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DepthBudgets(3, 10, 0.2, -1.0).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::vector<int64_t>> b = DepthBudgets(3, 10, 0.2, std::numeric_limits<double>::infinity());
  EXPECT_NE(std::string(b.status().message()).find("depth_ratio must be finite and > 0"), std::string::npos)
      << b.status();
}

}  // namespace
}  // namespace medakv
