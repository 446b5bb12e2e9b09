// cpu::SelectTokens (docs/algorithm.md, MEDA step 3) against the naive reference,
// its invariants, hand cases of each text prior, and argument validation.
//
// Scores are multiples of 2^-12 (or of 2^-3 for the tie-heavy runs) with few
// significant bits, so that the sums over heads and the additive prior are
// exact in fp32 and in fp64: the comparison with the reference is exact,
// ties included.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "kernels/ops/op_args.h"
#include "tests/kernels/test_util.h"
#include "tests/reference/reference.h"

namespace medakv {
namespace {

using test::VisualPattern;

std::string PriorTag(TextPrior p) {
  switch (p) {
    case TextPrior::kAdditive:
      return "Additive";
    case TextPrior::kKeepAllText:
      return "KeepAllText";
    case TextPrior::kNone:
      return "NoPrior";
  }
  return "Unknown";
}

absl::Status Select(const std::vector<float>& scores, const std::vector<uint8_t>& modality,
                    int64_t kv_heads, int64_t tokens, int64_t budget, double recent_fraction,
                    TextPrior prior, bool shared, std::vector<int32_t>* kept) {
  SelectArgs a;
  a.scores = scores.data();
  a.modality = modality.data();
  a.kv_heads = kv_heads;
  a.tokens = tokens;
  a.budget = budget;
  a.recent_fraction = recent_fraction;
  a.text_prior = prior;
  a.shared_selection = shared;
  kept->assign(static_cast<size_t>(std::max<int64_t>(1, kv_heads * budget)), -1);
  return cpu::SelectTokens(a, kept->data());
}

struct SelectCase {
  int64_t tokens;
  int64_t kv_heads;
  TextPrior prior;
  bool shared;
  bool ties;  // scores from a small set of values
  VisualPattern pattern;
};

std::string SelectName(const SelectCase& c) {
  return absl::StrCat("T", c.tokens, "_Kv", c.kv_heads, "_", PriorTag(c.prior), "_",
                      c.shared ? "Shared" : "PerHead", "_", c.ties ? "Ties" : "Distinct", "_",
                      test::VisualPatternTag(c.pattern));
}

std::vector<SelectCase> SelectCases() {
  std::vector<SelectCase> out;
  int n = 0;
  const VisualPattern patterns[] = {VisualPattern::kMiddle, VisualPattern::kInterleaved,
                                    VisualPattern::kStart, VisualPattern::kNone};
  for (int64_t tokens : {1, 7, 769}) {
    for (int64_t kv_heads : {1, 3}) {
      for (TextPrior prior : {TextPrior::kAdditive, TextPrior::kKeepAllText, TextPrior::kNone}) {
        for (bool shared : {false, true}) {
          for (bool ties : {false, true}) {
            out.push_back({tokens, kv_heads, prior, shared, ties, patterns[n++ % 4]});
          }
        }
      }
    }
  }
  return out;
}

// Budgets that exercise the edges: 1, T, small, about a third, T - 1.
std::vector<int64_t> BudgetsFor(int64_t tokens) {
  std::vector<int64_t> b = {1, tokens, std::max<int64_t>(1, tokens / 3), std::max<int64_t>(1, tokens - 1),
                            std::min<int64_t>(tokens, 2), std::min<int64_t>(tokens, 5)};
  std::sort(b.begin(), b.end());
  b.erase(std::unique(b.begin(), b.end()), b.end());
  return b;
}

class SelectSweepTest : public ::testing::TestWithParam<SelectCase> {};

TEST_P(SelectSweepTest, MatchesReferenceAndKeepsInvariants) {
  const SelectCase& c = GetParam();
  const std::vector<uint8_t> modality = test::MakeModality(c.pattern, c.tokens);
  test::Rng rng(static_cast<uint64_t>(c.tokens * 131 + c.kv_heads * 7 + static_cast<int>(c.prior) * 3 +
                                      (c.shared ? 1 : 0) + (c.ties ? 1000 : 0)));
  std::vector<float> scores(c.kv_heads * c.tokens);
  for (float& s : scores) {
    s = c.ties ? static_cast<float>(rng.Int(0, 4)) * 0.125f
               : static_cast<float>(rng.Int(0, (1 << 16) - 1)) * 0x1.0p-12f;
  }
  const std::vector<double> scores64(scores.begin(), scores.end());

  for (int64_t budget : BudgetsFor(c.tokens)) {
    for (double recent_fraction : {0.0, 0.5, 0.75, 1.0}) {
      SCOPED_TRACE(absl::StrCat("budget ", budget, " recent_fraction ", recent_fraction));
      std::vector<int32_t> kept;
      ASSERT_TRUE(Select(scores, modality, c.kv_heads, c.tokens, budget, recent_fraction, c.prior,
                         c.shared, &kept)
                      .ok());
      const std::vector<int32_t> ref = reference::RefSelect(
          scores64, modality, c.kv_heads, c.tokens, budget, recent_fraction, c.prior, c.shared);
      EXPECT_EQ(kept, ref);

      const int64_t recent = std::min<int64_t>(budget, reference::RoundHalfUp(recent_fraction * budget));
      for (int64_t h = 0; h < c.kv_heads; ++h) {
        const std::vector<int32_t> head(kept.begin() + h * budget, kept.begin() + (h + 1) * budget);
        // Size B, strictly ascending (so unique), inside [0, T).
        ASSERT_EQ(static_cast<int64_t>(head.size()), budget);
        for (int64_t i = 0; i < budget; ++i) {
          EXPECT_GE(head[i], 0);
          EXPECT_LT(head[i], c.tokens);
          if (i > 0) {
            EXPECT_LT(head[i - 1], head[i]) << "head " << h;
          }
        }
        // The M most recent tokens are kept: they are the last M entries.
        for (int64_t m = 0; m < recent; ++m) {
          EXPECT_EQ(head[budget - recent + m], c.tokens - recent + m) << "head " << h;
        }
        if (c.shared && h > 0) {
          EXPECT_TRUE(std::equal(head.begin(), head.end(), kept.begin())) << "head " << h;
        }
        // KEEP_ALL_TEXT: a visual token outside the recent window is kept
        // only when every text token outside it is.
        if (c.prior == TextPrior::kKeepAllText) {
          int64_t text_pool = 0, text_kept = 0, visual_kept = 0;
          for (int64_t t = 0; t < c.tokens - recent; ++t) text_pool += modality[t] == 0;
          for (int32_t t : head) {
            if (t < c.tokens - recent) (modality[t] == 0 ? text_kept : visual_kept) += 1;
          }
          if (visual_kept > 0) {
            EXPECT_EQ(text_kept, text_pool) << "head " << h;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, SelectSweepTest, ::testing::ValuesIn(SelectCases()),
                         [](const ::testing::TestParamInfo<SelectCase>& info) {
                           return SelectName(info.param);
                         });

// ---- hand cases --------------------------------------------------------------------

// Tokens: 0 T, 1 V, 2 T, 3 V, 4 V, 5 T. B = 3, M = round(3 / 3) = 1 (token 5),
// so two of tokens 0..4 are chosen.
class SelectHandTest : public ::testing::Test {
 protected:
  std::vector<int32_t> Run(TextPrior prior) {
    std::vector<int32_t> kept;
    EXPECT_TRUE(Select(scores_, modality_, 1, 6, 3, 1.0 / 3, prior, false, &kept).ok());
    return kept;
  }
  const std::vector<uint8_t> modality_ = {0, 1, 0, 1, 1, 0};
  const std::vector<float> scores_ = {0.0f, 0.9f, 0.2f, 0.8f, 0.7f, 0.05f};
};

TEST_F(SelectHandTest, NoPriorTakesTheTopScores) {
  EXPECT_EQ(Run(TextPrior::kNone), (std::vector<int32_t>{1, 3, 5}));
}

TEST_F(SelectHandTest, AdditivePriorAddsTheMaxToText) {
  // Text scores become 0.9 (token 0), 1.1 (token 2); token 1 (visual) stays
  // 0.9 and ties with token 0: the later position (1) wins.
  EXPECT_EQ(Run(TextPrior::kAdditive), (std::vector<int32_t>{1, 2, 5}));
}

TEST_F(SelectHandTest, KeepAllTextRanksTextFirst) {
  EXPECT_EQ(Run(TextPrior::kKeepAllText), (std::vector<int32_t>{0, 2, 5}));
}

TEST_F(SelectHandTest, AdditiveMaxIsOverAllTokensIncludingTheRecentWindow) {
  // The largest score sits in the recent window (token 5, 2.0). Text token 0
  // (0.0 + 2.0) beats visual tokens 1 (1.5) and 3 (1.9).
  const std::vector<float> scores = {0.0f, 1.5f, 0.0f, 1.9f, 0.1f, 2.0f};
  const std::vector<uint8_t> modality = {0, 1, 1, 1, 1, 0};
  std::vector<int32_t> kept;
  ASSERT_TRUE(Select(scores, modality, 1, 6, 2, 0.5, TextPrior::kAdditive, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{0, 5}));
}

TEST(SelectTieTest, EqualScoresPreferLaterPositions) {
  const std::vector<float> scores(10, 1.0f);
  const std::vector<uint8_t> modality(10, 1);
  std::vector<int32_t> kept;
  ASSERT_TRUE(Select(scores, modality, 1, 10, 3, 0.0, TextPrior::kNone, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{7, 8, 9}));
  // Same with the recent window taking the last token: the next latest win.
  ASSERT_TRUE(Select(scores, modality, 1, 10, 3, 0.34, TextPrior::kNone, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{7, 8, 9}));
  // Ties within KEEP_ALL_TEXT's text class too.
  const std::vector<uint8_t> mixed = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
  ASSERT_TRUE(Select(scores, mixed, 1, 10, 2, 0.0, TextPrior::kKeepAllText, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{6, 8}));
}

TEST(SelectRecentTest, RecentCountRoundsHalfUp) {
  // B = 5, fraction 0.5: M = round(2.5) = 3, even though the scores prefer the start.
  const std::vector<float> scores = {9, 8, 7, 6, 5, 0, 0, 0, 0, 0};
  const std::vector<uint8_t> modality(10, 1);
  std::vector<int32_t> kept;
  ASSERT_TRUE(Select(scores, modality, 1, 10, 5, 0.5, TextPrior::kNone, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{0, 1, 7, 8, 9}));
  // M = B: only the most recent tokens.
  ASSERT_TRUE(Select(scores, modality, 1, 10, 4, 1.0, TextPrior::kNone, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{6, 7, 8, 9}));
}

TEST(SelectSharedTest, SumsRawScoresThenAppliesThePrior) {
  // Two heads. Per head, head 0 prefers token 1 and head 1 token 2; summed,
  // token 0 (text, 0.5 + 0.5 = 1.0, plus the summed max 1.0) wins, then token 2.
  const std::vector<float> scores = {0.5f, 1.0f, 0.0f, 0.0f,    // head 0
                                     0.5f, 0.0f, 0.75f, 0.0f};  // head 1
  const std::vector<uint8_t> modality = {0, 1, 1, 1};
  std::vector<int32_t> kept;
  ASSERT_TRUE(Select(scores, modality, 2, 4, 1, 0.0, TextPrior::kNone, true, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{1, 1}));  // 1.0 vs 0.75 vs 1.0: tie 0/1 -> later (1)
  ASSERT_TRUE(Select(scores, modality, 2, 4, 1, 0.0, TextPrior::kAdditive, true, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{0, 0}));  // 1.0 + max(1.0) = 2.0
  ASSERT_TRUE(Select(scores, modality, 2, 4, 2, 0.0, TextPrior::kNone, false, &kept).ok());
  EXPECT_EQ(kept, (std::vector<int32_t>{0, 1, 0, 2}));
}

// ---- invalid arguments -------------------------------------------------------------

TEST(SelectInvalidTest, RejectsBadBudgetsAndPointers) {
  const std::vector<float> scores(2 * 7, 1.f);
  const std::vector<uint8_t> modality(7, 0);
  std::vector<int32_t> kept;
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_TRUE(Select(scores, modality, 2, 7, 7, 0.5, TextPrior::kAdditive, false, &kept).ok());
  EXPECT_EQ(Select(scores, modality, 2, 7, 0, 0.5, TextPrior::kAdditive, false, &kept).code(), kInvalid);
  EXPECT_EQ(Select(scores, modality, 2, 7, 8, 0.5, TextPrior::kAdditive, false, &kept).code(), kInvalid);
  EXPECT_EQ(Select(scores, modality, 2, 7, -1, 0.5, TextPrior::kAdditive, true, &kept).code(), kInvalid);
  for (double rf : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    EXPECT_EQ(Select(scores, modality, 2, 7, 3, rf, TextPrior::kAdditive, false, &kept).code(), kInvalid)
        << rf;
  }
  EXPECT_EQ(Select(scores, modality, 2, 7, 3, 0.5, static_cast<TextPrior>(9), false, &kept).code(),
            kInvalid);
  EXPECT_EQ(Select(scores, modality, 0, 7, 3, 0.5, TextPrior::kAdditive, false, &kept).code(), kInvalid);

  SelectArgs a;
  a.scores = scores.data();
  a.modality = modality.data();
  a.kv_heads = 2;
  a.tokens = 7;
  a.budget = 3;
  int32_t out[6];
  EXPECT_TRUE(cpu::SelectTokens(a, out).ok());
  EXPECT_EQ(cpu::SelectTokens(a, nullptr).code(), kInvalid);
  a.scores = nullptr;
  EXPECT_EQ(cpu::SelectTokens(a, out).code(), kInvalid);
  a.scores = scores.data();
  a.modality = nullptr;
  EXPECT_EQ(cpu::SelectTokens(a, out).code(), kInvalid);
  a.modality = modality.data();
  a.tokens = 0;
  a.budget = 0;
  EXPECT_EQ(cpu::SelectTokens(a, out).code(), kInvalid);
}

}  // namespace
}  // namespace medakv
