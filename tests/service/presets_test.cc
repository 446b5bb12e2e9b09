// Policy presets (service/server/presets.h, docs/presets.md): names, the
// text-format file and its errors, how a request's policy resolves, and
// PolicyToProto against OptionsFromProto.
#include "service/server/presets.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/message_differencer.h"
#include "service/server/convert.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

void ExpectError(const absl::Status& s, absl::StatusCode code, const std::string& fragment) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_NE(std::string(s.message()).find(fragment), std::string::npos) << "'" << fragment << "' not in: " << s;
}

constexpr char kPresets[] = R"pb(
# Two presets and a default.
preset {
  name: "meda-soft"
  description: "meda, flatter budgets, no merge"
  policy { rho: 0.1 meda { tau: 5 select { merge: MERGE_MODE_NONE } } }
}
preset {
  name: "default"
  policy { rho: 0.25 h2o {} }
}
preset {
  name: "snap.32"
  policy { snapkv { window: 32 } }
}
)pb";

std::shared_ptr<const PresetTable> Table(const char* text = kPresets) {
  absl::StatusOr<std::shared_ptr<const PresetTable>> t = PresetTable::Parse(text, "presets.txtpb");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : std::make_shared<PresetTable>();
}

TEST(PresetNameTest, AcceptsAndRejects) {
  for (const char* ok : {"a", "0", "meda-soft", "snap.32", "x_y", "default"}) {
    EXPECT_TRUE(ValidatePresetName(ok).ok()) << ok;
  }
  EXPECT_TRUE(ValidatePresetName(std::string(64, 'a')).ok());
  ExpectError(ValidatePresetName(""), absl::StatusCode::kInvalidArgument, "must not be empty");
  ExpectError(ValidatePresetName(std::string(65, 'a')), absl::StatusCode::kInvalidArgument, "at most 64");
  ExpectError(ValidatePresetName("-a"), absl::StatusCode::kInvalidArgument, "must start with");
  ExpectError(ValidatePresetName("Meda"), absl::StatusCode::kInvalidArgument, "must start with");
  ExpectError(ValidatePresetName("a b"), absl::StatusCode::kInvalidArgument, "only lower-case");
  ExpectError(ValidatePresetName("aB"), absl::StatusCode::kInvalidArgument, "only lower-case");
  ExpectError(ValidatePresetName("none"), absl::StatusCode::kInvalidArgument, "reserved");
}

TEST(PresetTableTest, ParsesAndResolves) {
  const std::shared_ptr<const PresetTable> t = Table();
  ASSERT_EQ(t->size(), 3u);
  EXPECT_EQ(t->presets()[0].name, "meda-soft");
  EXPECT_EQ(t->presets()[0].description, "meda, flatter budgets, no merge");
  EXPECT_EQ(t->Find("nope"), nullptr);

  // A preset by name: its options, its rho.
  v1::Policy p;
  p.set_preset("meda-soft");
  absl::StatusOr<ResolvedPolicy> r = t->Resolve(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "meda-soft");
  EXPECT_EQ(r->options.policy, PolicyKind::kMeda);
  EXPECT_EQ(r->options.budget.rho, 0.1);
  EXPECT_EQ(r->options.budget.tau, 5);
  EXPECT_EQ(r->options.merge, MergeMode::kNone);
  EXPECT_EQ(r->options.text_prior, TextPrior::kAdditive);  // meda's default, untouched

  // rho > 0 replaces the preset's; out of range is refused.
  p.set_rho(0.5);
  r = t->Resolve(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->options.budget.rho, 0.5);
  EXPECT_EQ(r->options.budget.tau, 5);
  p.set_rho(1.5);
  ExpectError(t->Resolve(p).status(), absl::StatusCode::kInvalidArgument, "policy.rho must be in (0, 1]");

  // A preset without rho: the policy's default rho.
  p = v1::Policy();
  p.set_preset("snap.32");
  r = t->Resolve(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->options.policy, PolicyKind::kSnapKV);
  EXPECT_EQ(r->options.window, 32);
  EXPECT_EQ(r->options.budget.rho, 0.2);

  // No preset and no kind: the table's "default".
  r = t->Resolve(v1::Policy());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "default");
  EXPECT_EQ(r->options.policy, PolicyKind::kH2O);
  EXPECT_EQ(r->options.budget.rho, 0.25);
  p = v1::Policy();
  p.set_rho(0.05);
  r = t->Resolve(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "default");
  EXPECT_EQ(r->options.budget.rho, 0.05);

  // A kind: no preset involved.
  p = v1::Policy();
  p.mutable_streaming_llm()->set_sinks(2);
  r = t->Resolve(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "");
  EXPECT_EQ(r->options.policy, PolicyKind::kStreamingLlm);
  EXPECT_EQ(r->options.sinks, 2);
}

TEST(PresetTableTest, AReconstructionPassGetsItsOwnDefault) {
  // No preset named default_reconstruct: the built-in reconstruction options, with the request's rho.
  const std::shared_ptr<const PresetTable> t = Table();  // has "default" (h2o)
  absl::StatusOr<ResolvedPolicy> r = t->Resolve(v1::Policy(), /*reconstruction=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "");
  EXPECT_EQ(r->options.policy, PolicyKind::kAmber);
  EXPECT_EQ(r->options.score_norm, ScoreNorm::kMax);
  EXPECT_EQ(r->options.layer_budget, LayerBudget::kGlobal);
  EXPECT_EQ(r->options.sinks, 4);
  EXPECT_EQ(r->options.recent_search_rows, 0);
  EXPECT_EQ(r->options.recent_fraction, 0.0);
  EXPECT_EQ(r->options.budget.rho, 0.2);
  EXPECT_TRUE(ValidateOptions(r->options).ok());
  v1::Policy p;
  p.set_rho(0.1);
  r = t->Resolve(p, true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->options.layer_budget, LayerBudget::kGlobal);
  EXPECT_EQ(r->options.budget.rho, 0.1);
  p.set_rho(2);
  ExpectError(t->Resolve(p, true).status(), absl::StatusCode::kInvalidArgument, "rho");
  // A named policy or preset is what it names, probes or not.
  p = v1::Policy();
  p.mutable_h2o();
  r = t->Resolve(p, true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->options.policy, PolicyKind::kH2O);
  p = v1::Policy();
  p.set_preset("snap.32");
  r = t->Resolve(p, true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->options.policy, PolicyKind::kSnapKV);
  // A table with default_reconstruct: that preset.
  absl::StatusOr<std::shared_ptr<const PresetTable>> own = PresetTable::Parse(
      "preset { name: \"default\" policy { h2o {} } }\n"
      "preset { name: \"default_reconstruct\" policy { rho: 0.15 amber { layer_budget: LAYER_BUDGET_MASS } } }\n",
      "f.txtpb");
  ASSERT_TRUE(own.ok()) << own.status();
  r = (*own)->Resolve(v1::Policy(), true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "default_reconstruct");
  EXPECT_EQ(r->options.layer_budget, LayerBudget::kMass);
  EXPECT_EQ(r->options.budget.rho, 0.15);
  r = (*own)->Resolve(v1::Policy(), false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "default");
}

TEST(PresetTableTest, ResolveErrors) {
  const std::shared_ptr<const PresetTable> t = Table();
  v1::Policy p;
  p.set_preset("meda-soft");
  p.mutable_h2o();
  ExpectError(t->Resolve(p).status(), absl::StatusCode::kInvalidArgument, "both set");
  p = v1::Policy();
  p.set_preset("missing");
  ExpectError(t->Resolve(p).status(), absl::StatusCode::kInvalidArgument,
              "no such preset (this server has: meda-soft, default, snap.32)");
  const PresetTable empty;
  ExpectError(empty.Resolve(p).status(), absl::StatusCode::kInvalidArgument, "this server has no presets");
  // Without presets, a policy with no kind is amber with its defaults.
  absl::StatusOr<ResolvedPolicy> r = empty.Resolve(v1::Policy());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->preset, "");
  EXPECT_EQ(r->options.policy, PolicyKind::kAmber);
  EXPECT_EQ(r->options.budget.rho, 0.2);
  // OptionsFromProto never takes a preset.
  ExpectError(OptionsFromProto(p).status(), absl::StatusCode::kInvalidArgument, "takes no preset");
}

TEST(PresetTableTest, FileErrorsNameTheLine) {
  auto parse = [](const std::string& text) { return PresetTable::Parse(text, "f.txtpb").status(); };
  // Syntax: line and column, 1-based.
  ExpectError(parse("preset {\n  name: \"a\"\n  polcy { }\n}\n"), absl::StatusCode::kInvalidArgument,
              "f.txtpb:3:");
  ExpectError(parse("preset { name: \"a\" policy { meda { tau: \"x\" } } }"), absl::StatusCode::kInvalidArgument,
              "f.txtpb:1:");
  // Checks: the preset's line, its index and name, and what is wrong.
  const std::string two = "preset { name: \"a\" policy { h2o {} } }\n\npreset {\n name: \"%s\" policy { %s } }\n";
  auto second = [&](const std::string& name, const std::string& policy) {
    std::string text = two;
    text.replace(text.find("%s"), 2, name);
    text.replace(text.find("%s"), 2, policy);
    return parse(text);
  };
  ExpectError(second("a", "h2o {}"), absl::StatusCode::kInvalidArgument,
              "f.txtpb:3: preset 2 ('a'): the name is used by an earlier preset");
  ExpectError(second("B", "h2o {}"), absl::StatusCode::kInvalidArgument, "preset 2 ('B'): name 'B'");
  ExpectError(second("none", "h2o {}"), absl::StatusCode::kInvalidArgument, "reserved");
  ExpectError(second("b", "meda { tau: -1 }"), absl::StatusCode::kInvalidArgument,
              "f.txtpb:3: preset 2 ('b'): policy.meda.tau must be in [1e-06, 1e+06], got -1");
  ExpectError(second("b", "rho: 2 h2o {}"), absl::StatusCode::kInvalidArgument, "policy.rho must be in (0, 1]");
  ExpectError(second("b", "preset: \"a\""), absl::StatusCode::kInvalidArgument,
              "a preset cannot name another preset");
  ExpectError(parse("preset { name: \"a\" }"), absl::StatusCode::kInvalidArgument, "preset 1 ('a'): no policy");
  std::string many;
  for (int i = 0; i <= kMaxPresets; ++i) absl::StrAppend(&many, "preset { name: \"p", i, "\" policy { h2o {} } }\n");
  ExpectError(parse(many), absl::StatusCode::kInvalidArgument, "65 presets, at most 64");
  // An empty file is an empty table.
  absl::StatusOr<std::shared_ptr<const PresetTable>> empty = PresetTable::Parse("# nothing\n", "f");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE((*empty)->empty());
}

TEST(PresetTableTest, LoadsFiles) {
  const std::string path = absl::StrCat(testing::TempDir(), "/presets_test_", getpid(), ".txtpb");
  {
    std::ofstream out(path);
    out << kPresets;
  }
  absl::StatusOr<std::shared_ptr<const PresetTable>> t = PresetTable::Load(path);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->size(), 3u);
  {
    std::ofstream out(path);
    out << "preset { name: \"x\" policy { meda { alpha_min: 2 } } }\n";
  }
  ExpectError(PresetTable::Load(path).status(), absl::StatusCode::kInvalidArgument,
              absl::StrCat(path, ":1: preset 1 ('x'): policy.meda.alpha_min"));
  {
    std::ofstream out(path);
    out << std::string((1 << 20) + 1, '#');
  }
  ExpectError(PresetTable::Load(path).status(), absl::StatusCode::kInvalidArgument, "larger than");
  std::remove(path.c_str());
  ExpectError(PresetTable::Load(path).status(), absl::StatusCode::kNotFound, "cannot open");
}

// Options covering every kind and every option that PolicyToProto writes.
std::vector<CompressOptions> VariedOptions() {
  std::vector<CompressOptions> all;
  for (PolicyKind p : {PolicyKind::kFull, PolicyKind::kMeda, PolicyKind::kStreamingLlm, PolicyKind::kH2O,
                       PolicyKind::kSnapKV, PolicyKind::kPyramidKV, PolicyKind::kLookM}) {
    all.push_back(DefaultOptions(p));
  }
  CompressOptions m = DefaultOptions(PolicyKind::kMeda);
  m.budget = {.rho = 0.07, .tau = 3.5, .alpha_min = 0.02, .alpha_max = 0.9, .exact_total = false};
  m.entropy_heads = EntropyHeads::kMeanEntropy;
  m.entropy_source = EntropySource::kCausal;
  m.recent_fraction = 0.25;
  m.text_prior = TextPrior::kKeepAllText;
  m.shared_selection = true;
  m.merge = MergeMode::kWeighted;
  m.merge_threshold = MergeThreshold::kMean;
  m.scale = 0.125f;
  all.push_back(m);
  CompressOptions s = DefaultOptions(PolicyKind::kStreamingLlm);
  s.sinks = 0;
  all.push_back(s);
  CompressOptions a = DefaultOptions(PolicyKind::kAmber);
  a.score_norm = ScoreNorm::kSum;
  a.layer_budget = LayerBudget::kMass;
  a.sinks = 7;
  a.budget.alpha_min = 0.03;
  a.recent_search_rows = 0;
  a.depth_ratio = 1.5;
  all.push_back(a);
  all.push_back(DefaultOptions(PolicyKind::kAmber));
  CompressOptions y = DefaultOptions(PolicyKind::kPyramidKV);
  y.window = 9;
  y.pool_kernel = 7;
  y.pyramid_beta = 3;
  y.merge = MergeMode::kPivotal;
  y.text_prior = TextPrior::kNone;
  all.push_back(y);
  return all;
}

TEST(PolicyToProtoTest, RoundTripsThroughOptionsFromProto) {
  for (const CompressOptions& o : VariedOptions()) {
    const v1::Policy p = PolicyToProto(o);
    EXPECT_TRUE(p.preset().empty());
    absl::StatusOr<CompressOptions> back = OptionsFromProto(p);
    ASSERT_TRUE(back.ok()) << PolicyName(o.policy) << ": " << back.status();
    EXPECT_EQ(back->policy, o.policy);
    EXPECT_EQ(back->budget.rho, o.budget.rho);
    std::string diff;
    google::protobuf::util::MessageDifferencer d;
    d.ReportDifferencesToString(&diff);
    EXPECT_TRUE(d.Compare(PolicyToProto(*back), p)) << PolicyName(o.policy) << ": " << diff;
  }
  const CompressOptions m = VariedOptions()[7];
  absl::StatusOr<CompressOptions> back = OptionsFromProto(PolicyToProto(m));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->budget.tau, 3.5);
  EXPECT_EQ(back->budget.exact_total, false);
  EXPECT_EQ(back->merge_threshold, MergeThreshold::kMean);
  EXPECT_EQ(back->scale, 0.125f);
  EXPECT_EQ(back->shared_selection, true);
  back = OptionsFromProto(PolicyToProto(VariedOptions()[9]));  // the amber variant
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->layer_budget, LayerBudget::kMass);
  EXPECT_EQ(back->recent_search_rows, 0);
  EXPECT_EQ(back->depth_ratio, 1.5);
}

TEST(PresetsToTextTest, ParsesBackToTheSameTable) {
  v1::PolicyPresets presets;
  int i = 0;
  for (const CompressOptions& o : VariedOptions()) {
    v1::PolicyPreset* p = presets.add_preset();
    p->set_name(absl::StrCat("p", i++, "-", PolicyName(o.policy)));
    p->set_description(absl::StrCat("preset ", i));
    *p->mutable_policy() = PolicyToProto(o);
  }
  const std::string text = PresetsToText(presets, "written by a test\nsecond line");
  EXPECT_EQ(text.rfind("# written by a test\n# second line\n", 0), 0u) << text;
  absl::StatusOr<std::shared_ptr<const PresetTable>> t = PresetTable::Parse(text, "out");
  ASSERT_TRUE(t.ok()) << t.status() << "\n" << text;
  ASSERT_EQ((*t)->size(), static_cast<size_t>(presets.preset_size()));
  for (int k = 0; k < presets.preset_size(); ++k) {
    const PresetTable::Preset& got = (*t)->presets()[k];
    EXPECT_EQ(got.name, presets.preset(k).name());
    EXPECT_EQ(got.description, presets.preset(k).description());
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(got.policy, presets.preset(k).policy()))
        << got.name;
  }
}

}  // namespace
}  // namespace medakv
