// The medakv cache file format: loading (every malformed case gets a precise
// message), writing, and synth -> load -> compress -> write -> read.
#include "client/cli/cache_file.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/cli/synth.h"
#include "kernels/common/tensor_util.h"

namespace medakv {
namespace {

using safetensors::ElementType;

std::string TempPath(const std::string& name) { return ::testing::TempDir() + "/medakv_cache_file_" + name; }

absl::Span<const uint8_t> Zeros(size_t n) {
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  return absl::Span<const uint8_t>(zeros.data(), n);
}

// A small valid query-form file described by tensors that tests then break.
struct Builder {
  int64_t layers = 2, kv = 2, q = 4, t = 5, d = 4, qt = 2;
  safetensors::Writer w;
  void Add(const std::string& name, ElementType type, std::vector<int64_t> shape) {
    int64_t n = safetensors::ElementSize(type);
    for (int64_t s : shape) n *= s;
    ASSERT_TRUE(w.Add(name, type, shape, Zeros(static_cast<size_t>(n))).ok()) << name;
  }
  void AddLayer(int64_t l, bool with_query = true) {
    Add(absl::StrCat("layer.", l, ".key"), ElementType::kF16, {kv, t, d});
    Add(absl::StrCat("layer.", l, ".value"), ElementType::kF16, {kv, t, d});
    if (with_query) Add(absl::StrCat("layer.", l, ".query"), ElementType::kF16, {q, qt, d});
  }
  absl::StatusOr<std::unique_ptr<LoadedCache>> Load(Layout layout = Layout::kHND) {
    absl::StatusOr<std::string> bytes = w.Serialize();
    if (!bytes.ok()) return bytes.status();
    absl::StatusOr<safetensors::File> f = safetensors::File::FromBytes(*std::move(bytes));
    if (!f.ok()) return f.status();
    return LoadCache(*std::move(f), layout);
  }
};

void ExpectError(absl::StatusOr<std::unique_ptr<LoadedCache>> r, const std::string& fragment) {
  ASSERT_FALSE(r.ok()) << "expected an error mentioning '" << fragment << "'";
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find(fragment), std::string::npos) << r.status().message();
}

TEST(LoadCacheTest, ValidFileLoads) {
  Builder b;
  b.AddLayer(0);
  b.AddLayer(1);
  b.Add("modality", ElementType::kU8, {5});
  auto r = b.Load();
  ASSERT_TRUE(r.ok()) << r.status();
  const CacheInput& in = (*r)->input;
  EXPECT_EQ(in.layers.size(), 2u);
  EXPECT_EQ(in.kv_heads, 2);
  EXPECT_EQ(in.q_heads, 4);
  EXPECT_EQ(in.tokens, 5);
  EXPECT_EQ(in.head_dim, 4);
  EXPECT_EQ(in.dtype, DType::kFloat16);
  EXPECT_EQ(in.stats, StatsForm::kQueries);
  EXPECT_EQ(in.layers[1].query.tokens, 2);
}

TEST(LoadCacheTest, MissingLayer) {
  Builder b;
  b.AddLayer(0);
  b.AddLayer(2);
  ExpectError(b.Load(), "missing tensor layer.1.key");
}

// tests/fuzz/fuzz_safetensors (corpus/fuzz_safetensors/crash-*layer-index*):
// a tiny file naming a huge layer index sized the per-layer vectors by it
// (a length_error here; 16 GB for layer.99999999), and INT64_MAX overflowed.
TEST(LoadCacheTest, HugeLayerIndexIsAMissingLayer) {
  for (const char* index : {"9223372036854775806", "9223372036854775807"}) {
    Builder b;
    b.AddLayer(0);
    b.Add(absl::StrCat("layer.", index, ".key"), ElementType::kF16, {b.kv, b.t, b.d});
    ExpectError(b.Load(), "missing tensor layer.1.key");
  }
}

// tests/fuzz/fuzz_safetensors (corpus/fuzz_safetensors/crash-ignored-*): these
// tensors were accepted and never read.
TEST(LoadCacheTest, NonCanonicalLayerIndexIsUnknown) {
  for (const char* name : {"layer.00.key", "layer.+1.value", "layer. 1.key", "layer.01.query"}) {
    Builder b;
    b.AddLayer(0);
    b.AddLayer(1);
    b.Add(name, ElementType::kF16, {0});
    ExpectError(b.Load(), absl::StrCat("unexpected tensor '", name, "'"));
  }
}

TEST(LoadCacheTest, QueryPositionsWithPrecomputedScores) {
  Builder b;
  b.AddLayer(0, /*with_query=*/false);
  b.Add("layer.0.scores", ElementType::kF32, {b.kv, b.t});
  b.Add("layer.0.entropy", ElementType::kF32, {1});
  b.Add("layer.0.query_positions", ElementType::kI32, {b.qt});
  ExpectError(b.Load(), "tensor layer.0.query_positions in a file with precomputed scores");
}

TEST(LoadCacheTest, EmptyFileIsNotACache) {
  Builder b;
  ExpectError(b.Load(), "not a medakv cache file");
}

TEST(LoadCacheTest, WrongKeyDType) {
  Builder b;
  b.Add("layer.0.key", ElementType::kI32, {2, 5, 4});
  b.Add("layer.0.value", ElementType::kI32, {2, 5, 4});
  b.Add("layer.0.query", ElementType::kI32, {4, 2, 4});
  ExpectError(b.Load(), "expected F16, BF16 or F32");
}

TEST(LoadCacheTest, ValueShapeMismatch) {
  Builder b;
  b.Add("layer.0.key", ElementType::kF16, {2, 5, 4});
  b.Add("layer.0.value", ElementType::kF16, {2, 6, 4});
  b.Add("layer.0.query", ElementType::kF16, {4, 2, 4});
  ExpectError(b.Load(), "layer.0.value: shape [2, 6, 4] (expected [2, 5, 4])");
}

TEST(LoadCacheTest, ValueDTypeMismatch) {
  Builder b;
  b.Add("layer.0.key", ElementType::kF16, {2, 5, 4});
  b.Add("layer.0.value", ElementType::kBF16, {2, 5, 4});
  b.Add("layer.0.query", ElementType::kF16, {4, 2, 4});
  ExpectError(b.Load(), "layer.0.value: dtype BF16 (expected F16)");
}

TEST(LoadCacheTest, RankTwoKey) {
  Builder b;
  b.Add("layer.0.key", ElementType::kF16, {10, 4});
  ExpectError(b.Load(), "rank 2");
}

TEST(LoadCacheTest, QueryHeadDimMismatch) {
  Builder b;
  b.Add("layer.0.key", ElementType::kF16, {2, 5, 4});
  b.Add("layer.0.value", ElementType::kF16, {2, 5, 4});
  b.Add("layer.0.query", ElementType::kF16, {4, 2, 8});
  ExpectError(b.Load(), "layer.0.query");
}

TEST(LoadCacheTest, QueryHeadsNotMultipleOfKvHeads) {
  Builder b;
  b.Add("layer.0.key", ElementType::kF16, {2, 5, 4});
  b.Add("layer.0.value", ElementType::kF16, {2, 5, 4});
  b.Add("layer.0.query", ElementType::kF16, {3, 2, 4});
  ExpectError(b.Load(), "q_heads");
}

TEST(LoadCacheTest, MixedStatisticsForms) {
  Builder b;
  b.AddLayer(0);
  b.AddLayer(1, /*with_query=*/false);
  b.Add("layer.1.scores", ElementType::kF32, {2, 5});
  b.Add("layer.1.entropy", ElementType::kF32, {1});
  ExpectError(b.Load(), "layer 1 has precomputed scores but layer 0 has queries; give one form");
}

TEST(LoadCacheTest, NeitherQueriesNorScores) {
  Builder b;
  b.AddLayer(0, /*with_query=*/false);
  ExpectError(b.Load(), "neither layer.0.query nor layer.0.scores");
}

TEST(LoadCacheTest, UnknownTensor) {
  Builder b;
  b.AddLayer(0);
  b.Add("layer.0.querry", ElementType::kF16, {4, 2, 4});
  ExpectError(b.Load(), "unexpected tensor 'layer.0.querry'");
}

TEST(LoadCacheTest, ModalityWrongLength) {
  Builder b;
  b.AddLayer(0);
  b.Add("modality", ElementType::kU8, {4});
  ExpectError(b.Load(), "modality: shape [4] (expected [5])");
}

TEST(LoadCacheTest, QueryPositionsWrongType) {
  Builder b;
  b.AddLayer(0);
  b.Add("layer.0.query_positions", ElementType::kI64, {2});
  ExpectError(b.Load(), "query_positions: dtype I64 (expected I32)");
}

TEST(LoadCacheTest, PrecomputedScoresWrongShapeAndMissingEntropy) {
  {
    Builder b;
    b.AddLayer(0, false);
    b.Add("layer.0.scores", ElementType::kF32, {3, 5});
    b.Add("layer.0.entropy", ElementType::kF32, {1});
    ExpectError(b.Load(), "layer.0.scores: F32 [3, 5]");
  }
  {
    Builder b;
    b.AddLayer(0, false);
    b.Add("layer.0.scores", ElementType::kF32, {2, 5});
    ExpectError(b.Load(), "missing tensor layer.0.entropy");
  }
}

TEST(LoadCacheTest, ModalityValueOutOfRange) {
  Builder b;
  b.AddLayer(0);
  const std::vector<uint8_t> m = {0, 1, 7, 0, 0};
  ASSERT_TRUE(b.w.Add("modality", ElementType::kU8, {5}, m).ok());
  ExpectError(b.Load(), "modality[2] is 7");
}

TEST(LoadCacheTest, NhdLayoutDims) {
  Builder b;
  b.Add("layer.0.key", ElementType::kF16, {5, 2, 4});
  b.Add("layer.0.value", ElementType::kF16, {5, 2, 4});
  b.Add("layer.0.query", ElementType::kF16, {2, 4, 4});
  auto r = b.Load(Layout::kNHD);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->input.tokens, 5);
  EXPECT_EQ((*r)->input.kv_heads, 2);
  EXPECT_EQ((*r)->input.q_heads, 4);
  EXPECT_EQ((*r)->input.layout, Layout::kNHD);
}

TEST(LoadCacheTest, UnalignedTensorIsCopiedExactly) {
  // A 1-byte tensor first puts the F32 key at an odd offset.
  safetensors::Writer w;
  const std::vector<uint8_t> pad = {0};
  std::vector<float> key(1 * 3 * 2), value(6, 0.f), query(1 * 1 * 2, 1.f);
  for (size_t i = 0; i < key.size(); ++i) key[i] = 0.25f * static_cast<float>(i) - 1.f;
  auto bytes = [](const std::vector<float>& v) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * 4);
  };
  const std::vector<uint8_t> modality = {0, 0, 0};  // the Writer keeps a view: must outlive Serialize
  ASSERT_TRUE(w.Add("modality", ElementType::kU8, {3}, modality).ok());
  ASSERT_TRUE(w.Add("layer.0.key", ElementType::kF32, {1, 3, 2}, bytes(key)).ok());
  ASSERT_TRUE(w.Add("layer.0.value", ElementType::kF32, {1, 3, 2}, bytes(value)).ok());
  ASSERT_TRUE(w.Add("layer.0.query", ElementType::kF32, {1, 1, 2}, bytes(query)).ok());
  auto f = safetensors::File::FromBytes(*w.Serialize());
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_NE(reinterpret_cast<uintptr_t>(f->Find("layer.0.key")->data) % 4, 0u) << "the test needs an unaligned key";
  auto r = LoadCache(*std::move(f), Layout::kHND);
  ASSERT_TRUE(r.ok()) << r.status();
  const TensorView& k = (*r)->input.layers[0].key;
  EXPECT_EQ(reinterpret_cast<uintptr_t>(k.data) % 4, 0u);
  EXPECT_EQ(std::memcmp(k.data, key.data(), key.size() * 4), 0);
}

class SynthRoundTripTest : public ::testing::TestWithParam<std::tuple<DType, Layout, bool>> {};

TEST_P(SynthRoundTripTest, SynthLoadCompressWriteRead) {
  const auto [dtype, layout, precomputed] = GetParam();
  SynthOptions o;
  o.layers = 3;
  o.kv_heads = 2;
  o.q_heads = 4;
  o.tokens = 40;
  o.head_dim = 8;
  o.q_tokens = 6;
  o.dtype = dtype;
  o.layout = layout;
  o.precomputed = precomputed;
  o.seed = 3;
  const std::string in_path = TempPath(absl::StrCat("in_", static_cast<int>(dtype), static_cast<int>(layout), precomputed));
  const std::string out_path = in_path + ".out";
  ASSERT_TRUE(WriteSynthCache(o, in_path).ok());
  auto file = safetensors::File::Open(in_path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto loaded = LoadCache(*std::move(file), layout);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const CacheInput& in = (*loaded)->input;
  EXPECT_EQ(in.stats, precomputed ? StatsForm::kPrecomputed : StatsForm::kQueries);
  EXPECT_EQ(in.tokens, 40);
  // Default visual span: tokens [4, 28).
  for (int64_t t = 0; t < 40; ++t) EXPECT_EQ(in.modality[t], (t >= 4 && t < 28) ? 1 : 0) << t;

  CompressOptions co;
  co.budget.rho = 0.25;
  auto result = Compress(in, co, *MakeCpuBackend());
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(WriteCompressed(*result, in, {{"policy", "meda"}}, out_path).ok());

  auto out = safetensors::File::Open(out_path);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->metadata().at("policy"), "meda");
  int64_t kept = 0;
  for (int64_t l = 0; l < 3; ++l) {
    const LayerResult& lr = result->layers[l];
    const auto* key = out->Find(absl::StrCat("layer.", l, ".key"));
    const auto* pos = out->Find(absl::StrCat("layer.", l, ".positions"));
    const auto* budget = out->Find(absl::StrCat("layer.", l, ".budget"));
    ASSERT_TRUE(key && pos && budget);
    const std::vector<int64_t> shape = layout == Layout::kHND ? std::vector<int64_t>{2, lr.budget, 8}
                                                              : std::vector<int64_t>{lr.budget, 2, 8};
    EXPECT_EQ(key->shape, shape);
    EXPECT_EQ(std::memcmp(key->data, lr.key.data(), lr.key.size()), 0);
    EXPECT_EQ(pos->shape, (std::vector<int64_t>{2, lr.budget}));
    EXPECT_EQ(std::memcmp(pos->data, lr.positions.data(), lr.positions.size() * 4), 0);
    int32_t b = 0;
    std::memcpy(&b, budget->data, 4);
    EXPECT_EQ(b, lr.budget);
    kept += b;
  }
  EXPECT_EQ(kept, 30);  // round(0.25 * 3 * 40)
}

INSTANTIATE_TEST_SUITE_P(Forms, SynthRoundTripTest,
                         ::testing::Combine(::testing::Values(DType::kFloat16, DType::kBFloat16, DType::kFloat32),
                                            ::testing::Values(Layout::kHND, Layout::kNHD), ::testing::Bool()),
                         [](const auto& info) {
                           return absl::StrCat(DTypeName(std::get<0>(info.param)), LayoutName(std::get<1>(info.param)),
                                               std::get<2>(info.param) ? "Precomputed" : "Queries");
                         });

TEST(SynthTest, RejectsBadOptions) {
  SynthOptions o;
  o.q_heads = 3;
  o.kv_heads = 2;
  absl::Status s = WriteSynthCache(o, TempPath("bad"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("--q-heads"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(TempPath("bad")));
}

TEST(SynthTest, SameSeedSameBytes) {
  SynthOptions o;
  o.tokens = 50;
  o.q_tokens = 8;
  o.layers = 2;
  ASSERT_TRUE(WriteSynthCache(o, TempPath("seed_a")).ok());
  ASSERT_TRUE(WriteSynthCache(o, TempPath("seed_b")).ok());
  o.seed = 1;
  ASSERT_TRUE(WriteSynthCache(o, TempPath("seed_c")).ok());
  auto read = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  EXPECT_EQ(read(TempPath("seed_a")), read(TempPath("seed_b")));
  EXPECT_NE(read(TempPath("seed_a")), read(TempPath("seed_c")));
}

}  // namespace
}  // namespace medakv
