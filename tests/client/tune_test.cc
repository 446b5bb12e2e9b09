// `medakv tune` (client/cli/tune.h) on the checked-in real SmolLM2 cache
// (tests/data/smollm2_short*.safetensors): candidate names and grids, every
// row equal to a direct evaluation of its options, the best the lowest, the
// presets file the server reads back to the same options, sample loading and
// its errors.
#include "client/cli/tune.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/cli/cache_file.h"
#include "client/io/safetensors.h"
#include "google/protobuf/util/message_differencer.h"
#include "service/server/convert.h"
#include "service/server/presets.h"

namespace medakv {
namespace {

constexpr char kCache[] = MEDAKV_TEST_REAL_DIR "/smollm2_short.safetensors";
constexpr char kFuture[] = MEDAKV_TEST_REAL_DIR "/smollm2_short.future.safetensors";

std::string TempPath(const std::string& name) {
  return absl::StrCat(testing::TempDir(), "/tune_test_", getpid(), "_", name);
}

TEST(CandidateNameTest, NamesWhatDiffersFromThePolicysDefaults) {
  for (PolicyKind p : {PolicyKind::kFull, PolicyKind::kMeda, PolicyKind::kH2O, PolicyKind::kLookM}) {
    EXPECT_EQ(CandidateName(DefaultOptions(p)), PolicyName(p));
  }
  CompressOptions o = DefaultOptions(PolicyKind::kMeda);
  o.budget.rho = 0.7;  // never part of the name
  o.budget.tau = 5;
  o.merge = MergeMode::kNone;
  o.text_prior = TextPrior::kNone;
  EXPECT_EQ(CandidateName(o), "meda tau=5 text-prior=none merge=none");
  CompressOptions s = DefaultOptions(PolicyKind::kSnapKV);
  s.window = 16;
  s.pool_kernel = 9;
  EXPECT_EQ(CandidateName(s), "snapkv window=16 pool-kernel=9");
  // look_m's own defaults (keep_all_text, pivotal) are not differences; meda's would be.
  CompressOptions l = DefaultOptions(PolicyKind::kLookM);
  l.merge = MergeMode::kAverage;
  EXPECT_EQ(CandidateName(l), "look_m merge=average");
}

TEST(TuneGridTest, GridsHaveUniqueValidCandidates) {
  for (const char* grid : {"baselines", "quick", "full"}) {
    absl::StatusOr<std::vector<TuneCandidate>> c = TuneGrid(grid);
    ASSERT_TRUE(c.ok()) << c.status();
    std::set<std::string> names;
    for (const TuneCandidate& t : *c) {
      EXPECT_TRUE(names.insert(t.name).second) << grid << ": " << t.name;
      EXPECT_EQ(t.name, CandidateName(t.options)) << grid;
      EXPECT_TRUE(ValidateOptions(t.options).ok()) << grid << ": " << t.name;
      EXPECT_NE(t.options.policy, PolicyKind::kFull) << grid;
    }
    EXPECT_TRUE(names.count("h2o") && names.count("meda") && names.count("snapkv")) << grid;
  }
  // The reconstruction default is a candidate of the quick grid (and so of the full one).
  const std::string rebuild = CandidateName(ReconstructionOptions());
  for (const char* grid : {"quick", "full"}) {
    const std::vector<TuneCandidate> c = *TuneGrid(grid);
    EXPECT_TRUE(std::any_of(c.begin(), c.end(), [&](const TuneCandidate& t) { return t.name == rebuild; }))
        << grid << " lacks " << rebuild;
  }
  EXPECT_EQ(TuneGrid("baselines")->size(), 7u);  // amber too
  EXPECT_GT(TuneGrid("full")->size(), TuneGrid("quick")->size());
  EXPECT_EQ(TuneGrid("huge").status().code(), absl::StatusCode::kInvalidArgument);
}

class TuneRealCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<LoadedSample> s = LoadSample(kCache, Layout::kHND, 16);
    ASSERT_TRUE(s.ok()) << s.status();
    sample_ = *std::move(s);
  }
  LoadedSample sample_;
};

TEST_F(TuneRealCacheTest, RowsEqualADirectEvaluationAndTheBestIsTheLowest) {
  EXPECT_EQ(sample_.future_source, kFuture);
  ASSERT_EQ(sample_.sample.future.size(), 30u);
  EXPECT_EQ(sample_.sample.future[0].tokens, 16);
  absl::StatusOr<std::vector<TuneCandidate>> grid = TuneGrid("quick");
  ASSERT_TRUE(grid.ok());
  const std::vector<double> rhos = {0.2, 0.05};  // sorted by Tune
  auto backend = MakeCpuBackend();
  int64_t calls = 0, last_total = 0;
  absl::StatusOr<TuneReport> report = Tune({sample_.sample}, *grid, rhos, *backend, [&](int64_t done, int64_t total) {
    ++calls;
    EXPECT_EQ(done, calls);
    last_total = total;
  });
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(calls, static_cast<int64_t>(2 * grid->size()));
  EXPECT_EQ(last_total, calls);
  ASSERT_EQ(report->rhos, (std::vector<double>{0.05, 0.2}));
  ASSERT_EQ(report->rows.size(), 2 * grid->size());
  // Each row is the evaluation of its options alone.
  std::vector<CompressOptions> runs;
  for (const TuneRow& r : report->rows) runs.push_back(r.options);
  absl::StatusOr<std::vector<EvalResult>> direct =
      EvaluateHeldOut(sample_.sample.observed, sample_.sample.future, runs, *backend);
  ASSERT_TRUE(direct.ok()) << direct.status();
  for (size_t i = 0; i < runs.size(); ++i) {
    const TuneRow& r = report->rows[i];
    EXPECT_EQ(r.candidate, (*grid)[i % grid->size()].name);
    EXPECT_EQ(r.rho, report->rhos[i / grid->size()]);
    EXPECT_EQ(r.options.budget.rho, r.rho);
    ASSERT_EQ(r.sample_error.size(), 1u);
    EXPECT_EQ(r.sample_error[0], (*direct)[i].mean_rel_error) << r.candidate;
    EXPECT_EQ(r.mean_error, r.sample_error[0]);
    EXPECT_EQ(r.kept_fraction, (*direct)[i].kept_fraction);
    EXPECT_EQ(r.baseline, r.candidate == PolicyName(r.options.policy) && r.options.policy != PolicyKind::kAmber)
        << r.candidate;
    EXPECT_GT(r.mean_error, 0.0) << r.candidate;
  }
  ASSERT_EQ(report->best.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const TuneRow& best = report->rows[report->best[i]];
    EXPECT_EQ(best.rho, report->rhos[i]);
    for (const TuneRow& r : report->rows) {
      if (r.rho == best.rho) {
        EXPECT_LE(best.mean_error, r.mean_error) << r.candidate;
      }
    }
  }
  const std::string table = FormatTuneTable(*report);
  EXPECT_NE(table.find("<- best"), std::string::npos) << table;
  EXPECT_NE(table.find("best baseline ("), std::string::npos) << table;
  const std::string csv = TuneCsv(*report);
  EXPECT_EQ(csv.rfind(absl::StrCat("candidate,rho,kept_fraction,mean_rel_error,baseline,", kCache, "\n"), 0), 0u);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), static_cast<long>(runs.size() + 1));

  // The presets: one per rho and "default"; the server's parser gives back the best's options.
  absl::StatusOr<v1::PolicyPresets> presets = TunePresets(*report, "tuned", 0.2);
  ASSERT_TRUE(presets.ok()) << presets.status();
  ASSERT_EQ(presets->preset_size(), 3);
  EXPECT_EQ(presets->preset(0).name(), "tuned-r0.05");
  EXPECT_EQ(presets->preset(1).name(), "tuned-r0.2");
  EXPECT_EQ(presets->preset(2).name(), "default");
  absl::StatusOr<std::shared_ptr<const PresetTable>> table_back =
      PresetTable::Parse(PresetsToText(*presets, "test"), "tuned.txtpb");
  ASSERT_TRUE(table_back.ok()) << table_back.status();
  for (size_t i = 0; i < 2; ++i) {
    const TuneRow& best = report->rows[report->best[i]];
    const PresetTable::Preset& p = (*table_back)->presets()[i];
    EXPECT_NE(p.description.find(best.candidate), std::string::npos) << p.description;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(PolicyToProto(p.options),
                                                                    PolicyToProto(best.options)))
        << p.name;
  }
  EXPECT_EQ(TunePresets(*report, "tuned", 0.1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TunePresets(*report, "tuned", 0.0)->preset_size(), 2);
}

TEST_F(TuneRealCacheTest, RejectsBadArguments) {
  auto backend = MakeCpuBackend();
  const std::vector<TuneCandidate> one = {{"h2o", DefaultOptions(PolicyKind::kH2O)}};
  EXPECT_EQ(Tune({}, one, {0.1}, *backend).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tune({sample_.sample}, {}, {0.1}, *backend).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tune({sample_.sample}, one, {}, *backend).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tune({sample_.sample}, one, {1.5}, *backend).status().code(), absl::StatusCode::kInvalidArgument);
  const std::vector<TuneCandidate> twice = {one[0], one[0]};
  absl::StatusOr<TuneReport> r = Tune({sample_.sample}, twice, {0.1}, *backend);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("two candidates are named 'h2o'"), std::string::npos);
  CompressOptions bad = DefaultOptions(PolicyKind::kH2O);
  bad.recent_fraction = 2;
  r = Tune({sample_.sample}, {{"bad", bad}}, {0.1}, *backend);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("candidate 'bad' at rho 0.1"), std::string::npos) << r.status();
}

TEST(LoadSampleTest, FutureFileOrHoldout) {
  EXPECT_EQ(FutureFileOf("/a/b.safetensors"), "/a/b.future.safetensors");
  EXPECT_EQ(FutureFileOf("/a/b.bin"), "/a/b.bin.future.safetensors");
  // Without a future file beside it: the last --holdout rows of the cache's queries.
  const std::string copy = TempPath("alone.safetensors");
  std::filesystem::copy_file(kCache, copy, std::filesystem::copy_options::overwrite_existing);
  absl::StatusOr<LoadedSample> s = LoadSample(copy, Layout::kHND, 8);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->sample.future[0].tokens, 8);
  EXPECT_EQ(s->sample.observed.layers[0].query.tokens, 48 - 8);
  EXPECT_NE(s->future_source.find("last 8 query rows"), std::string::npos);
  EXPECT_EQ(LoadSample(copy, Layout::kHND, 48).status().code(), absl::StatusCode::kInvalidArgument);
  // A future file of the wrong shape names the tensor.
  {
    safetensors::Writer w;
    std::vector<uint8_t> bytes(9 * 2 * 32 * 2, 0);
    ASSERT_TRUE(w.Add("layer.0.query", safetensors::ElementType::kF16, {9, 2, 32}, bytes).ok());
    ASSERT_TRUE(w.WriteFile(FutureFileOf(copy)).ok());
  }
  s = LoadSample(copy, Layout::kHND, 8);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.status().message()).find("layer.0.query missing or not F16 [q_heads, rows, head_dim]"),
            std::string::npos)
      << s.status();
  std::remove(FutureFileOf(copy).c_str());
  std::remove(copy.c_str());
  EXPECT_EQ(LoadSample(TempPath("none.safetensors"), Layout::kHND, 8).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace medakv
